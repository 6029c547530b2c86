"""Model loading: the embedded default, torchvision names, and `timm:<name>`."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from prune.errors import UsageError

EMBEDDED_NAMES = ("embedded", "embedded-plain")
"""The shipped embedded models (see prune.zoo.embedded_model.VARIANTS)."""


@dataclass(frozen=True)
class ModelSpec:
    """How to rebuild a model: `name` as given on the command line and its class count."""

    name: str
    num_classes: int


def torchvision_names() -> list[str]:
    """Classification model names torchvision knows."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _unknown_model(name: str) -> UsageError:
    known = [*EMBEDDED_NAMES, *torchvision_names()]
    near = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean {near[0]!r}?" if near else ""
    return UsageError(
        f"unknown model {name!r}; use 'embedded', 'embedded-plain', 'timm:<name>' or a torchvision name "
        f"({', '.join(torchvision_names())}).{hint}"
    )


def check_model_name(name: str) -> None:
    """UsageError (listing the known names) unless `name` is a model `build_model` knows."""
    if name in EMBEDDED_NAMES:
        return
    if name.startswith("timm:"):
        import timm

        timm_name = name.split(":", 1)[1]
        if not timm.is_model(timm_name):
            near = difflib.get_close_matches(timm_name, timm.list_models(), n=1)
            hint = f" Did you mean 'timm:{near[0]}'?" if near else ""
            raise UsageError(f"unknown timm model {timm_name!r}; see timm.list_models().{hint}")
        return
    if name not in torchvision_names():
        raise _unknown_model(name)


def build_model(spec: ModelSpec) -> nn.Module:
    """An untrained instance of `spec` (no download)."""
    if spec.name in EMBEDDED_NAMES:
        from prune.zoo.embedded_model import build_embedded

        return build_embedded(spec.name, num_classes=spec.num_classes)
    check_model_name(spec.name)
    if spec.name.startswith("timm:"):
        import timm

        return timm.create_model(spec.name.split(":", 1)[1], pretrained=False, num_classes=spec.num_classes)
    return torchvision.models.get_model(spec.name, weights=None, num_classes=spec.num_classes)


def state_dict_mismatch(model: nn.Module, state: object) -> str | None:
    """Why `state` is not a state_dict of `model`: the first missing or unexpected key or
    mismatched shape (with how many more there are), or None if every key and shape fits.

    Missing BatchNorm `num_batches_tracked` counters are allowed (torch fills them in).
    """
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a state_dict"
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and getattr(state[k], "shape", None) != expected[k].shape]
    problems = [f"missing key {k!r}" for k in missing] + [f"unexpected key {k!r}" for k in unexpected]
    problems += [
        f"key {k!r} has shape {tuple(getattr(state[k], 'shape', ()))} but the model's is {tuple(expected[k].shape)}"
        if isinstance(state[k], torch.Tensor) else f"key {k!r} holds a {type(state[k]).__name__}, not a tensor"
        for k in wrong
    ]
    if not problems:
        return None
    return problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")


def _load_checkpoint_weights(model: nn.Module, path: Path) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file or not a tensor checkpoint
        raise UsageError(f"cannot read weights from {path}: {type(exc).__name__}; pass a state_dict file") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    why = state_dict_mismatch(model, state)
    if why is None:
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as exc:
            why = str(exc).strip().splitlines()[-1].strip()
    if why is not None:
        raise UsageError(f"weights in {path} do not fit the model {type(model).__name__}: {why}; check --model") from None


def load_model(name: str, *, weights: str | None, num_classes: int) -> nn.Module:
    """Build `name` and load `weights`.

    name: 'embedded', 'embedded-plain', a torchvision name (e.g. 'vgg16', 'resnet34') or 'timm:<name>'.
    weights: None (embedded: the shipped weights; others: random init), a checkpoint path
    (a state_dict, loaded with weights_only=True), or a torchvision weights name such as
    'IMAGENET1K_V1' / 'DEFAULT' (needs the torchvision weights cache or network).
    """
    if name in EMBEDDED_NAMES and weights is None:
        from prune.zoo.embedded_model import load_embedded

        model = load_embedded(pretrained=True, variant=name)
        predicted = model.classifier[-1].out_features
        if num_classes != predicted:
            raise UsageError(
                f"the embedded model predicts {predicted} classes but the data has {num_classes}; "
                "pass --weights PATH or use the embedded data"
            )
        return model
    if weights is not None and Path(weights).exists():
        model = build_model(ModelSpec(name, num_classes))
        _load_checkpoint_weights(model, Path(weights))
        return model
    if weights is not None:
        if name.startswith("timm:") or name in EMBEDDED_NAMES:
            raise UsageError(f"weights file {weights!r} not found; pass an existing checkpoint path")
        if name not in torchvision_names():
            raise _unknown_model(name)
        try:
            return torchvision.models.get_model(name, weights=weights)
        except (ValueError, KeyError) as exc:
            raise UsageError(f"unknown weights {weights!r} for {name}: {exc}") from None
        except OSError as exc:
            raise UsageError(
                f"cannot fetch torchvision weights {weights!r} ({type(exc).__name__}); "
                "put them in the torch hub cache or pass a checkpoint path"
            ) from None
    return build_model(ModelSpec(name, num_classes))
