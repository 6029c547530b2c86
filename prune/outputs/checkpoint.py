"""Saving and reloading a pruned model: state_dict + torch-pruning history, weights_only safe."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from prune.version import __version__
from prune.errors import UsageError
from prune.outputs.files import torch_save
from prune.zoo.models import ModelSpec, build_model
from prune.pipeline.surgery import replay_history

FORMAT = "topoprune/pruned-model/v1"


def save_pruned(path: Path, model: nn.Module, *, spec: ModelSpec, history: list, input_size: int) -> None:
    """Write the pruned `model` so that `load_pruned(path)` rebuilds it exactly."""
    torch_save(
        Path(path),
        {
            "format": FORMAT,
            "version": __version__,
            "model": spec.name,
            "num_classes": spec.num_classes,
            "input_size": input_size,
            "pruning_history": history,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        },
    )


def read_checkpoint(path: Path, expected_format: str) -> dict:
    """Load a topoprune file with weights_only=True; refuse anything else with UsageError."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist; pass the path of a topoprune output")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UsageError(
            f"{path} is not a topoprune checkpoint (cannot be read safely: {type(exc).__name__}); "
            "pass a file written by topoprune"
        ) from None
    if not isinstance(blob, dict) or blob.get("format") != expected_format:
        raise UsageError(f"{path} is not a topoprune checkpoint of kind {expected_format!r}; pass a file written by topoprune")
    return blob


def load_pruned(path: str | Path) -> nn.Module:
    """Rebuild a pruned model saved by `python -m prune` (`<out>/model.pt`), in eval mode.

    The architecture is rebuilt from the model name, the saved torch-pruning history is
    replayed, then the weights are loaded (all with `weights_only=True`).
    """
    blob = read_checkpoint(Path(path), FORMAT)
    model = build_model(ModelSpec(blob["model"], int(blob["num_classes"])))
    example = torch.zeros(1, 3, int(blob["input_size"]), int(blob["input_size"]))
    model.eval()
    replay_history(model, example, blob["pruning_history"])
    model.load_state_dict(blob["state_dict"])
    return model.eval()
