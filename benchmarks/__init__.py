"""Speed benchmarks and paper experiments: `python -m benchmarks.<name>`."""
