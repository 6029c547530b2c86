"""The model and data zoo: model registry, embedded models, the generated data set, their training."""
