"""What the pipeline needs from a model's forward: RGB images in, a logits tensor [N, classes] out,
in eval and in train mode.

Evaluation, the scorers that read the loss, fine-tuning and distillation all take `model(images)` as
logits. torch-pruning traces the network in eval mode, so a module with weights that only a
train-mode forward runs (an auxiliary head) would keep its unpruned input channels and fail at the
first fine-tuning step, after the whole selection. Both are refused before any output is written,
in one line naming the fix (`check_forward`).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from finetune.batchnorm import running_norms
from prune.errors import UsageError, first_line, out_of_memory
from prune.outputs.export import OPSET, exporter_says, onnx_bytes
from scoring.hooks import forward_hooks
from scoring.model_state import model_dtype

WRAP_HINT = "wrap the model in a module whose forward returns the logits (see docs/your-model.md)"


SIZE_ERRORS = (RuntimeError, AssertionError, ValueError)
"""What models raise for an input they cannot take (they check sizes many ways)."""


@torch.no_grad()
def _first_conv_run(model: nn.Module, images: torch.Tensor) -> nn.Conv2d | None:
    """The first Conv2d a forward of `images` reaches (its input checked or not), None if none does."""
    reached: list[nn.Module] = []
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    handles = [m.register_forward_pre_hook(lambda m, _i: reached.append(m)) for m in convs]
    try:
        model(images)
    except SIZE_ERRORS:
        pass
    finally:
        for h in handles:
            h.remove()
    return reached[0] if reached else None


def _size_hint(name: str, size: int) -> str:
    """The fix for a model that cannot run on `size`² images: the side its registry entry names, or a larger one."""
    from prune.zoo.registry import model_entry

    built_for = model_entry(name).input_size
    if built_for != size:
        return f"pass --input-size {built_for}, the side its registry entry names"
    return "pass a larger --input-size, e.g. 224"


@torch.no_grad()
def example_input(model: nn.Module, size: int, name: str, device: torch.device) -> torch.Tensor:
    """A zero image [1, 3, size, size] that `model` runs on; UsageError naming the fix if it cannot (a
    first conv that takes other than 3 channels, or a side the model cannot take)."""
    example = torch.zeros(1, 3, size, size, device=device)
    try:
        model(example)
    except SIZE_ERRORS as exc:
        if out_of_memory(exc):  # the machine's limit, not the model's: exit_code names what to lower
            raise
        first = _first_conv_run(model, example)
        if first is not None and first.in_channels != 3:
            raise UsageError(f"model {name}'s first conv takes {first.in_channels}-channel images, but images are "
                             "fed as RGB [N, 3, H, W]; wrap the model so its forward turns them into what it takes "
                             "(e.g. x.mean(1, keepdim=True) for grey), see docs/your-model.md") from None
        raise UsageError(f"model {name} cannot run on {size}x{size} images ({first_line(exc)}); "
                         f"{_size_hint(name, size)}") from None
    return example


def _parametrized(m: nn.Module) -> bool:
    """Whether `m`'s weights are computed by a parametrization (torch.nn.utils.parametrizations' weight_norm /
    spectral_norm, or the older hook-based torch.nn.utils.weight_norm / spectral_norm)."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    hooks = m._forward_pre_hooks.values()
    return parametrize.is_parametrized(m) or any(isinstance(h, (WeightNorm, SpectralNorm)) for h in hooks)


def check_plain_weights(model: nn.Module, name: str) -> None:
    """UsageError naming the modules of `model` whose weights a parametrization computes: torch-pruning
    removes channels from stored weights and cannot rewrite a parametrization's own tensors."""
    found = [n for n, m in model.named_modules() if _parametrized(m)]
    if found:
        raise UsageError(
            f"model {name} has parametrized weights ({', '.join(found[:3])}{', …' if len(found) > 3 else ''}: "
            "weight_norm or spectral_norm), which torch-pruning cannot rewrite; remove them first with "
            "torch.nn.utils.parametrize.remove_parametrizations(module, 'weight') (torch.nn.utils.remove_weight_norm / "
            "remove_spectral_norm for the older hooks): the module keeps the weights they compute")


def _shown(out: object) -> str:
    """`out` in a message: a tensor by its shape, anything else by its type."""
    return f"a {list(out.shape)} tensor" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"


def check_logits(out: object, name: str, *, mode: str, classes: int) -> None:
    """UsageError unless `out` (the model's output in `mode`, "eval" or "train") is a 2-D tensor
    [N, classes]: one logit per class of the data."""
    if not (isinstance(out, torch.Tensor) and out.ndim == 2):
        raise UsageError(f"model {name} returns {_shown(out)} in {mode} mode, not logits [N, classes]; {WRAP_HINT}")
    if out.shape[1] != classes:
        given = f"{out.shape[1]} logit{'' if out.shape[1] == 1 else 's'}"
        raise UsageError(f"model {name} gives {given} per image in {mode} mode but the data has {classes} "
                         "classes; build it with one output per class (its builder gets num_classes; two classes "
                         "need 2 logits, not 1)")


def _modules_run(model: nn.Module, images: torch.Tensor) -> tuple[set[str], object]:
    """(names of the modules holding weights that a forward of `images` runs, its output)."""
    names = {m: n for n, m in model.named_modules() if n and next(m.parameters(), None) is not None}
    ran: set[str] = set()
    with forward_hooks(names, lambda m, _i, _o: ran.add(names[m])):
        out = model(images)
    return ran, out


@contextmanager
def _state_kept(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Inside, `model` may run in train mode: its buffers (BatchNorm statistics), every module's
    mode and the random number generators (torch's on the CPU and `device`, Python's, numpy's)
    are as they were afterwards."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    modes = [(m, m.training) for m in model.modules()]
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            yield
        finally:
            for b, saved in buffers:
                b.copy_(saved)
            for m, training in modes:
                m.training = training
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def outermost(names: set[str]) -> list[str]:
    """The names of `names` none of whose parents (dotted prefixes) is in `names`, sorted."""
    return sorted(n for n in names if not any(n.startswith(f"{p}.") for p in names))


@torch.no_grad()
def check_forward(model: nn.Module, example: torch.Tensor, name: str, *, trains: bool, classes: int) -> None:
    """UsageError unless `model` maps two copies of `example` [1, 3, H, W] to logits [2, classes] in
    eval mode and, when the run `trains` (fine-tuning, distillation, scratch training), in train mode
    too, running no module with weights that eval mode does not run.

    The model is left exactly as it was (`_state_kept`): same BatchNorm statistics, modes and random
    state, so the run's results do not depend on this check.
    """
    images = example.repeat(2, 1, 1, 1)  # two: train-mode BatchNorm needs more than one value per channel
    with _state_kept(model, example.device):
        model.eval()
        try:
            in_eval, out = _modules_run(model, images)
        except SIZE_ERRORS as exc:
            if out_of_memory(exc):
                raise
            raise UsageError(f"model {name} runs on one image but not on a batch of two ({first_line(exc)}); its "
                             "forward must take a batch [N, 3, H, W]") from None
        check_logits(out, name, mode="eval", classes=classes)
        if not trains:
            return
        model.train()
        try:
            in_train, out = _modules_run(model, images)
        except (*SIZE_ERRORS, TypeError) as exc:
            if out_of_memory(exc):
                raise
            size = example.shape[-1]
            other = f", or {_size_hint(name, size)}" if isinstance(exc, (RuntimeError, ValueError)) else ""
            raise UsageError(f"model {name} cannot run on {size}x{size} images in train mode ({first_line(exc)}); "
                             f"pass --no-finetune to prune without training{other}") from None
    extra = outermost(in_train - in_eval)
    if extra:
        raise UsageError(f"model {name} runs {', '.join(extra)} only in train mode: pruning traces the eval-mode "
                         "network, so fine-tuning could not run them; build the model without them, or pass "
                         "--no-finetune to prune without training")
    check_logits(out, name, mode="train", classes=classes)


@torch.no_grad()
def check_batch_of_one(model: nn.Module, example: torch.Tensor, name: str, *, batch_size: int) -> None:
    """UsageError if batches of one image (`batch_size` 1) cannot re-estimate `model`'s BatchNorm
    statistics: a train-mode BatchNorm needs more than one value per channel, which one image
    gives only where its map is larger than 1x1. Every run re-estimates them (the pruned
    network's BatchNorm-refitted evaluation, the refits between layers, fine-tuning). The model
    is left exactly as it was."""
    norms = running_norms(model)
    if batch_size != 1 or not norms:
        return
    with _state_kept(model, example.device):
        model.eval()
        for m in norms:
            m.train()
        try:
            model(example[:1])
        except ValueError as exc:
            if "more than 1 value per channel" not in str(exc):
                raise
            raise UsageError(f"--batch-size 1 cannot re-estimate the BatchNorm statistics of model {name}: one image "
                             "has a 1x1 map there; pass --batch-size 2 or more") from None


def check_not_compiled(model: nn.Module) -> None:
    """UsageError for a `torch.compile` wrapper: the pruning analysis traces the module, whose graph
    the wrapper hides behind dynamo's."""
    if type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
        raise UsageError("the model is a torch.compile wrapper: prune the module it wraps (model._orig_mod), "
                         "then compile the pruned module")


def check_float32_for_scoring(model: nn.Module) -> None:
    """UsageError if images (float32) cannot go through `model`: its first floating-point weights
    are of another dtype. The library's weight scorers take any; the main job feeds images to every
    model (checks, evaluation)."""
    dtype = model_dtype(model)
    if dtype != torch.float32:
        name = str(dtype).replace("torch.", "")
        raise UsageError(f"the model's weights are {name} and the images float32; score and prune "
                         f"model.float(), then convert the pruned model back (model.to(torch.{name}))")


def check_exportable(model: nn.Module, *, input_size: int, name: str, device: torch.device) -> None:
    """UsageError, before any work, if torch's ONNX exporter refuses `model` at `input_size`² (e.g.
    an adaptive pooling to 7x7 fed maps whose side 7 does not divide: a model made for 224² fed
    smaller images). Only the exporter's own refusals are the input's fault; anything else it raises
    stays an error of its own. The model's state is left as it was."""
    try:
        with _state_kept(model, device):
            onnx_bytes(model, input_size=input_size, export_params=False)
    except torch.onnx.errors.OnnxExporterError as exc:
        said = exporter_says(exc)
        hint = f"{_size_hint(name, input_size)}, or " if "adaptive" in said else ""
        raise UsageError(f"torch's ONNX exporter (opset {OPSET}) cannot export {name} at {input_size}² input ({said}); "
                         f"{hint}leave out --export onnx") from None
