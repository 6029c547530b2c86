"""Saving and reloading a pruned model: state_dict + torch-pruning history, weights_only safe."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from finetune.checkpoint import state_dict_mismatch
from prune.core.files import torch_save
from prune.core.history import replay_history
from prune.errors import UsageError
from prune.version import __version__
from prune.zoo.models import (
    ARCHITECTURE_FLAGS,
    ModelSpec,
    architecture_flags,
    auxiliary_heads,
    classifier,
    create_model,
    without_heads,
)
from prune.zoo.registry import model_entry

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
            **({"flags": flags} if (flags := architecture_flags(model)) else {}),  # most models have none
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


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _fields_problem(blob: dict) -> str | None:
    """The first field of a model.pt `blob` that is missing or of the wrong kind (None if all fit)."""
    if not isinstance(blob.get("model"), str):
        return f"field 'model' is {blob.get('model')!r}, not a model name"
    for field in ("num_classes", "input_size"):
        if not _positive_int(blob.get(field)):
            return f"field {field!r} is {blob.get(field)!r}, not a positive int"
    flags = blob.get("flags", {})  # absent in files written before it existed: the defaults
    if not isinstance(flags, dict) or any(k not in ARCHITECTURE_FLAGS or not isinstance(v, bool) for k, v in flags.items()):
        return f"field 'flags' is {flags!r}, not a dict of {', '.join(ARCHITECTURE_FLAGS)} → bool"
    if not isinstance(blob.get("pruning_history"), list):
        return f"field 'pruning_history' is {type(blob.get('pruning_history')).__name__}, not a list"
    state = blob.get("state_dict")
    if not isinstance(state, dict):
        return "field 'state_dict' is missing" if state is None else \
            f"field 'state_dict' is a {type(state).__name__}, not a dict"
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            return f"field 'state_dict': key {key!r} holds a {type(value).__name__}, not a tensor"
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return f"field 'state_dict': key {key!r} holds NaN or Inf values"
    return None


def _classifier_problem(model: nn.Module, blob: dict, example: torch.Tensor) -> str | None:
    """Why `num_classes` does not match the classifier saved in the state_dict (None if it does);
    `example` [1, 3, H, W] finds the classifier (`classifier`)."""
    name, _ = classifier(model, example)
    weight = blob["state_dict"].get(f"{name}.weight")
    if isinstance(weight, torch.Tensor) and weight.dim() >= 1 and weight.shape[0] != blob["num_classes"]:
        return (f"field 'num_classes' is {blob['num_classes']} but the state_dict's classifier {name!r} "
                f"predicts {weight.shape[0]} classes")
    return None


def load_pruned(path: str | Path) -> nn.Module:
    """Rebuild a pruned model saved by `python -m prune` (`<out>/model.pt`), in eval mode.

    Every field is checked before anything is built (the model name, positive int
    `num_classes` and `input_size`, a `state_dict` of finite tensors, the class count against
    its classifier, each `pruning_history` entry against the model as pruned so far, the
    rebuilt architecture against the state_dict); the first problem is one UsageError (a
    ValueError) naming the field. The architecture is rebuilt from the model name, the
    saved torch-pruning history is replayed, then the weights are loaded (all with
    `weights_only=True`).
    """
    path = Path(path)
    blob = read_checkpoint(path, FORMAT)

    def refuse(problem: str) -> UsageError:
        return UsageError(f"{path}: {problem}; pass a model.pt written by topoprune, unedited")

    problem = _fields_problem(blob)
    if problem is not None:
        raise refuse(problem)
    try:
        model_entry(blob["model"])
    except UsageError:
        raise UsageError(f"{path} holds model {blob['model']!r}, which is not registered in this process: import the "
                         "module that registers it (register_model, register_family) first; prune.list_models() "
                         "names the models known") from None
    model = create_model(blob["model"], num_classes=blob["num_classes"], pretrained=False).eval()
    for flag, value in blob.get("flags", {}).items():
        if flag not in architecture_flags(model):
            raise refuse(f"field 'flags' sets {flag!r}, which model {blob['model']!r} does not have")
        setattr(model, flag, value)
    example = torch.zeros(1, 3, blob["input_size"], blob["input_size"])
    problem = _classifier_problem(model, blob, example)
    if problem is not None:
        raise refuse(problem)
    try:
        replay_history(model, example, blob["pruning_history"])
    except ValueError as exc:
        raise refuse(f"field 'pruning_history' does not fit field 'model' ({blob['model']!r}): {exc}") from None
    saved = without_heads(blob["state_dict"], auxiliary_heads(model))  # files from before the heads were dropped
    why = state_dict_mismatch(model, saved)
    if why is not None:
        raise refuse(f"field 'state_dict' does not fit model {blob['model']!r} pruned as 'pruning_history' says: {why}")
    state = OrderedDict(saved)
    state._metadata = model.state_dict()._metadata  # the modules' versions, which some check (MNASNet)
    model.load_state_dict(state)
    return model.eval()
