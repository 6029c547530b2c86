"""topoprune: prune CNN channels by feature entropy and other scorers."""
__version__ = "0.1.0"


def load_pruned(path):
    """Rebuild a pruned model written by `python -m prune` (see prune.checkpoint.load_pruned)."""
    from prune.checkpoint import load_pruned as _load

    return _load(path)
