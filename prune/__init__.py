"""topoprune: prune CNN channels by feature entropy and other scorers."""

from prune.version import __version__


def load_pruned(path):
    """Rebuild a pruned model written by `python -m prune` (see prune.outputs.checkpoint.load_pruned)."""
    from prune.outputs.checkpoint import load_pruned as _load

    return _load(path)


def as_tp_importance(name, *, images, labels, **options):
    """A registered scorer as a torch-pruning importance (see prune.pipeline.importance.as_tp_importance)."""
    from prune.pipeline.importance import as_tp_importance as _make

    return _make(name, images=images, labels=labels, **options)
