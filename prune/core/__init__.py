"""The floor below `outputs` and `pipeline`: what both use (the process group of a torchrun job,
atomic file writes, the throughput record, replaying a pruning history). Imports only `prune.errors`
and `prune.version` of the project."""
