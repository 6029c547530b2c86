"""The one way to get a model: `create_model(name, weights=, num_classes=)`, any name of the
model registry (prune.zoo.registry) with its weights, as torchvision's `get_model` and timm's
`create_model`."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from finetune.checkpoint import state_dict_mismatch
from prune.errors import UsageError, first_line
from prune.zoo.registry import ModelEntry, model_entry
from prune.zoo.state_dicts import CHECKPOINT_KEYS, read_weights_file, state_dict_in, without_wrapper_prefix
from scoring.hooks import logits_layer, width
from scoring.model_state import eval_mode


@dataclass(frozen=True)
class ModelSpec:
    """How to rebuild a model: `name` as given on the command line and its class count."""

    name: str
    num_classes: int


def check_model_name(name: str) -> None:
    """UsageError (listing the known names and the nearest ones) unless the registry knows `name`."""
    model_entry(name)


REAL_DTYPES = frozenset({
    torch.bool, torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.int8, torch.int16, torch.int32, torch.int64,
})
"""Non-floating dtypes a weights tensor may have (every real floating dtype is allowed too)."""


def check_dtypes(state: dict, path: Path) -> None:
    """UsageError naming the first tensor of `state` whose dtype is not a real floating, integer
    or bool dtype (complex, quantized, ...): loading it would silently drop or misread values."""
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and not (value.dtype.is_floating_point or value.dtype in REAL_DTYPES):
            raise UsageError(f"weights in {path}: key {key!r} has dtype {value.dtype}, which is not supported; "
                             "save real-valued (floating-point) weights")


def auxiliary_heads(model: nn.Module) -> tuple[str, ...]:
    """The attribute names of the auxiliary heads of torchvision's GoogLeNet and Inception v3; () for any other model."""
    torchvision = sys.modules.get("torchvision")  # not imported: not a torchvision model (and no import for nothing)
    if torchvision is None:
        return ()
    if isinstance(model, torchvision.models.GoogLeNet):
        return ("aux1", "aux2")
    if isinstance(model, torchvision.models.Inception3):
        return ("AuxLogits",)
    return ()


def drop_auxiliary_heads(model: nn.Module) -> tuple[str, ...]:
    """Remove the auxiliary heads of torchvision's GoogLeNet and Inception v3 from `model` (in place), as
    torchvision does after loading their pretrained weights (`aux_logits = False`, heads set to None);
    the names of the heads removed (none for any other model, or one without them).

    The heads are training aids an eval-mode forward never runs: torch-pruning traces in eval mode,
    so a head kept would keep its unpruned input channels and break the first fine-tuning step.
    """
    names = auxiliary_heads(model)
    if not names or not model.aux_logits:
        return ()
    model.aux_logits = False
    for name in names:
        setattr(model, name, None)
    return names


ARCHITECTURE_FLAGS = ("transform_input",)
"""Settings of torchvision's GoogLeNet and Inception v3 that change their outputs but no state_dict holds."""


def architecture_flags(model: nn.Module) -> dict[str, bool]:
    """`model`'s ARCHITECTURE_FLAGS (`transform_input`: torchvision's pretrained weights for GoogLeNet and
    Inception v3 turn it on, it re-normalises the input); {} for any other model. `prune.load_pruned`
    sets them again from model.pt."""
    return {f: bool(getattr(model, f)) for f in ARCHITECTURE_FLAGS} if auxiliary_heads(model) else {}


def without_heads(state: dict, heads: tuple[str, ...]) -> dict:
    """`state` without the keys of the modules named `heads` (top-level attribute names)."""
    return {k: v for k, v in state.items() if k.split(".", 1)[0] not in heads}


def _load_checkpoint_weights(model: nn.Module, path: Path) -> None:
    """Load the weights file `path` into `model` (UsageError naming what does not fit): a state_dict
    or a training script's checkpoint (`prune.zoo.state_dicts`); the keys of auxiliary heads
    (`auxiliary_heads`), present or not in the file, are ignored."""
    try:
        blob = read_weights_file(path)
    except Exception as exc:  # corrupt file or not a tensor checkpoint
        raise UsageError(f"cannot read weights from {path} ({type(exc).__name__}: {first_line(exc)[:200]}); pass a "
                         "state_dict or a training checkpoint saved with torch.save") from None
    state = state_dict_in(blob)
    if isinstance(state, dict):
        if not all(isinstance(k, str) for k in state):
            raise UsageError(f"weights in {path} have keys that are not parameter names; pass a state_dict")
        if not any(isinstance(v, torch.Tensor) for v in state.values()):
            raise UsageError(f"{path} holds no weights (top-level keys: {', '.join(list(state)[:8]) or 'none'}); "
                             f"pass a state_dict, or a checkpoint with it under one of {', '.join(CHECKPOINT_KEYS)}")
        check_dtypes(state, path)
        state = without_heads(without_wrapper_prefix(state, model.state_dict().keys()), auxiliary_heads(model))
    why = state_dict_mismatch(model, state)
    if why is None:
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as exc:
            why = str(exc).strip().splitlines()[-1].strip()
    if why is not None:
        raise UsageError(f"weights in {path} do not fit the model {type(model).__name__}: {why}; check --model") from None


def _load_default_weights(entry: ModelEntry, num_classes: int) -> nn.Module:
    """`entry` with its default weights file (the embedded models' shipped weights), eval mode."""
    if num_classes != entry.num_classes:
        raise UsageError(
            f"the {entry.name} model predicts {entry.num_classes} classes but the data has {num_classes}; "
            f"pass --weights PATH or use data with {entry.num_classes} classes"
        )
    path = Path(entry.weights)
    if not path.is_file():
        raise FileNotFoundError(
            f"weights of {entry.name} not found at {path}: run `python -m prune.zoo.train_embedded --model "
            f"{entry.name}` (embedded models) or pass --weights PATH"
        )
    model = entry.build(entry.num_classes)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def classifier(model: nn.Module, example_inputs: torch.Tensor | None = None) -> tuple[str, nn.Linear | nn.Conv2d]:
    """(qualified name, module) of the final classifier, whose outputs are the classes.

    With `example_inputs` [1, 3, H, W], an eval-mode forward says which: the nn.Linear or nn.Conv2d
    it runs last if that has the logits' width (a squeeze-excitation Linear registered after the head
    is not the head), else the last registered layer of that width (a head applied as F.linear to
    its weights runs no layer). Without, or where no layer has that width: the last registered
    nn.Linear, or the last nn.Conv2d of a model with none (SqueezeNet's 1x1 conv head)."""
    if example_inputs is not None:
        with eval_mode(model):
            head, classes = logits_layer(model, example_inputs)
        if head is not None:
            return next(n for n, m in model.named_modules() if m is head), head
        fitting = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
                   and width(m) == classes]
        if fitting:
            return fitting[-1]
    for kind in (nn.Linear, nn.Conv2d):
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, kind)]
        if layers:
            return layers[-1]
    raise UsageError(f"{type(model).__name__} has no nn.Linear or nn.Conv2d classifier")


def _fresh_like(layer: nn.Linear | nn.Conv2d, num_classes: int) -> nn.Linear | nn.Conv2d:
    """A new, randomly initialised copy of `layer` with `num_classes` outputs (same device, dtype)."""
    options = {"device": layer.weight.device, "dtype": layer.weight.dtype, "bias": layer.bias is not None}
    if isinstance(layer, nn.Linear):
        return nn.Linear(layer.in_features, num_classes, **options)
    return nn.Conv2d(layer.in_channels, num_classes, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                     dilation=layer.dilation, groups=layer.groups, padding_mode=layer.padding_mode, **options)


def fit_head(model: nn.Module, num_classes: int) -> nn.Module:
    """`model` (changed in place) predicting `num_classes` classes, as timm's `num_classes=` does.

    The final classifier (`classifier`: a named weight set's model, built for its own input size,
    registers its head last) and every layer
    of its kind with the same number of outputs (auxiliary heads of the same width; torchvision's
    GoogLeNet and Inception v3 have lost theirs by then, `drop_auxiliary_heads`) are replaced by fresh ones with `num_classes` outputs; the rest keeps its weights. A model
    whose head already has `num_classes` outputs is returned unchanged.
    """
    _, head = classifier(model)
    old = width(head)
    if old == num_classes:
        return model
    for name, layer in list(model.named_modules()):
        if name and type(layer) is type(head) and width(layer) == old:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, _fresh_like(layer, num_classes))
    return model


def _built(entry: ModelEntry, num_classes: int) -> nn.Module:
    """An untrained instance of `entry` without auxiliary heads (`drop_auxiliary_heads`)."""
    model = entry.build(num_classes)
    drop_auxiliary_heads(model)
    return model


def create_model(name: str, *, weights: str | None = None, num_classes: int | None = None,
                 pretrained: bool = True) -> nn.Module:
    """The registry model `name` ('embedded', 'fashion-plain', 'vgg16', 'timm:<name>', ...) in eval mode.

    num_classes: the classes it predicts (default: the entry's, e.g. 10 for the embedded models,
    1000 for torchvision's). weights: None (with `pretrained`, the entry's default weights file
    if it has one, e.g. the embedded models' shipped weights; random init otherwise), a
    checkpoint path (a state_dict, loaded with weights_only=True), or a named weight set of the
    family such as torchvision's 'IMAGENET1K_V1' / 'DEFAULT' (needs the torchvision weights
    cache or network), whose classifier is replaced by a fresh one of `num_classes` outputs if
    it predicts another count (`fit_head`). The auxiliary heads of torchvision's GoogLeNet and
    Inception v3 are dropped (`drop_auxiliary_heads`). `pretrained=False`: an untrained instance, no file
    read and no download (`create_model(name, num_classes=n, pretrained=False)` is the
    architecture of any `create_model(name, weights=..., num_classes=n)`).
    """
    entry = model_entry(name)
    num_classes = entry.num_classes if num_classes is None else num_classes
    if weights is None and (entry.weights is None or not pretrained):
        return _built(entry, num_classes).eval()
    if weights is None:
        return _load_default_weights(entry, num_classes)
    if Path(weights).exists():
        model = _built(entry, num_classes)
        _load_checkpoint_weights(model, Path(weights))
        return model.eval()
    if entry.named_weights is None:
        raise UsageError(f"weights file {weights!r} not found; pass an existing checkpoint path")
    model = entry.named_weights(weights)
    drop_auxiliary_heads(model)
    return fit_head(model, num_classes).eval()
