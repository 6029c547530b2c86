"""Collecting a layer's units: hooks owned by a context manager, so none ever leaks.

A unit is one output channel of a conv layer observed **after the activation the model
actually applies to it**, found from the model's torch.fx graph (`prune.pipeline.sites`):
ReLU in VGG, ReLU6 in MobileNetV2, GELU in ConvNeXt, SiLU, Hardswish, … as modules,
functions (F.relu, torch.relu_, F.silu) or methods (x.relu()), inplace or not. The walk from
the conv's output crosses only ops that keep its channels one-to-one: norms (BatchNorm,
GroupNorm, LayerNorm over the channels alone), identity, dropout, permutes, scaling by a
constant. Where the model applies no activation to them, what is read is documented here:

- **Residual branch** (the conv's output meets an addition before any activation, e.g.
  ResNet's ``bn2 → += identity → relu``): the unit is read at the **block's output, after the
  activation applied to the sum** (the sum itself where none is, as in MobileNetV2 and
  ConvNeXt). This is the paper's reading of ResNet34 units (A.5): its units are taken at
  "conv5_3_out", "the output of a residual convolutional block" (Tables 6-7, Figs. 9A, 11);
  A.5 also notes that the branch's last conv read on its own is "non-activated" and has a
  higher entropy that the shortcut then lowers. It is also what pruning acts on: the channels
  tied by the addition are one torch-pruning group, and removing channel c removes channel c
  of the block's output. `UnitSite.residual` records the case. A norm after the sum is not
  crossed: it belongs to the next stage (ConvNeXt's downsampling LayerNorm).
- **No activation before a channel-mixing op** (MobileNetV2's projection conv outside a
  residual block; ConvNeXt's depthwise conv → permute → LayerNorm → pointwise conv/Linear →
  GELU): the unit is the last tensor that still holds the conv's channels one-to-one (the
  norm's output), with no activation; the GELU after the pointwise layer belongs to *that*
  layer's units, since its channels are no longer this conv's.
- A tensor consumed twice (a fork) ends the walk there.

How it is captured, exactly: when the unit is a module's output it is hooked there (its
n-th call in one forward, as in the graph: ResNet's blocks call one ReLU twice); when it is a
functional op's output, the traced graph is run on the model's own submodules up to that
node. Either way the forward pass stops as soon as the units are captured. A model fx cannot
trace falls back to the registration-order rule (norm and activation module registered
right after the conv) with one warning.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from prune.errors import UsageError
from prune.pipeline.sites import UnitSite, prefix_module, unit_site
from scoring.hooks import StopForward, largest_output, run_until_stopped
from scoring.model_state import model_device

__all__ = [
    "CHUNK_BYTES", "UnitSite", "collect_units", "following_norm", "iter_units", "observe", "run_until_captured",
    "unit_site",
]

CHUNK_BYTES = 1 << 25
"""Default bound on the largest tensor of one forward chunk (32 MiB): its units, or a larger
map the forward makes on the way; what scoring holds at once is a small multiple of it."""


def conv_name(model: nn.Module, conv: nn.Conv2d) -> str:
    """The qualified name of `conv` in `model`."""
    name = next((n for n, m in model.named_modules() if m is conv), None)
    if name is None:
        raise UsageError("the conv layer is not part of the model; pass a conv from model.named_modules()")
    return name


def following_norm(model: nn.Module, conv: nn.Conv2d) -> nn.Module | None:
    """The BatchNorm that directly consumes `conv`'s output (from the traced graph), if any."""
    norm = unit_site(model, conv_name(model, conv)).norm
    return None if norm is None else model.get_submodule(norm)


@contextmanager
def observe(model: nn.Module, conv: nn.Conv2d) -> Iterator[list[torch.Tensor]]:
    """Inside the block, every forward of `model` appends the units [N, C, m, m] of `conv`.

    Use `run_until_captured(model, x)` to forward; the hooks are removed on exit.
    """
    captured: list[torch.Tensor] = []
    site = unit_site(model, conv_name(model, conv))

    def finish(t: torch.Tensor) -> None:
        captured.append(t.detach().movedim(site.channel_dim, 1))
        raise StopForward

    if not site.traced:
        handles = _chain_hooks(model, site, finish)
    elif site.module is None:
        handles = _graph_hooks(model, site, finish)
    else:
        handles = _module_hooks(model, site, finish)
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


Finish = Callable[[torch.Tensor], None]


def _module_hooks(model: nn.Module, site: UnitSite, finish: Finish) -> list:
    """Capture the output of call number `site.call` of module `site.module` in each forward."""
    calls = [0]

    def reset(_m: nn.Module, _args: tuple) -> None:
        calls[0] = 0

    def on_output(_m: nn.Module, _i: tuple, out: torch.Tensor) -> None:
        calls[0] += 1
        if calls[0] == site.call + 1:
            finish(out)

    return [
        model.register_forward_pre_hook(reset),
        model.get_submodule(site.module).register_forward_hook(on_output),
    ]


def _graph_hooks(model: nn.Module, site: UnitSite, finish: Finish) -> list:
    """Capture a functional op's output: run the traced graph up to its node instead of the forward."""
    prefix = prefix_module(model, site.node)

    def run_prefix(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        finish(prefix(*args, **kwargs))

    return [model.register_forward_pre_hook(run_prefix, with_kwargs=True)]


def _chain_hooks(model: nn.Module, site: UnitSite, finish: Finish) -> list:
    """Fallback: follow conv → norm → activation by tensor identity; if the chain breaks,
    the deepest link reached in the forward is the unit."""
    chain = [model.get_submodule(n) for n in site.path]
    reached: dict[int, torch.Tensor] = {}

    def reset(_m: nn.Module, _args: tuple) -> None:
        reached.clear()

    def link(k: int) -> Callable:
        def on_output(_m: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
            if k == 0 or (k - 1 in reached and inputs and inputs[0] is reached[k - 1]):
                reached[k] = out
                if k == len(chain) - 1:
                    finish(out)

        return on_output

    def at_end(_m: nn.Module, _i: tuple, _o: object) -> None:
        if reached:
            finish(reached[max(reached)])

    handles = [model.register_forward_pre_hook(reset)]
    handles += [m.register_forward_hook(link(k)) for k, m in enumerate(chain)]
    return handles + [model.register_forward_hook(at_end)]


def run_until_captured(model: nn.Module, images: torch.Tensor) -> None:
    """Forward `images` through `model`, stopping once an `observe` hook has its units."""
    run_until_stopped(model, images)


def iter_units(
    model: nn.Module, conv: nn.Conv2d, images: torch.Tensor, *, name: str, batch_size: int = 128,
    chunk_bytes: int = CHUNK_BYTES, run: Callable[[slice, torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Units of `conv` for `images` [N, 3, H, W], one forward chunk at a time:
    (which images, their units [n, C, m, m] float32 CPU).

    C is `conv.out_channels`. The first chunk is one image; later chunks hold at most
    `batch_size` images, and at most `chunk_bytes` in the largest tensor of their forward pass
    (the units or a larger map before them, as measured on the first image; at least one
    image). The chunks depend only on N, `batch_size`, `chunk_bytes` and the model, so the
    units are the same whether they are kept or scored chunk by chunk, and between chunks no
    hook is left on `model`. NaN/Inf activations raise UsageError.
    `run(where, images[where])`, if given, makes the units of the chunks after the first (the
    same values as a forward, e.g. `prune.pipeline.prefix_cache`); the first is a forward.
    """
    with largest_output(model) as largest:
        first = _units_of(model, conv, images[:1], name)
    per_image = max(largest[0], first[0].numel() * 4, 1)
    step = max(1, min(batch_size, chunk_bytes // per_image))
    yield slice(0, 1), first
    del first
    start = 1
    while start < len(images):
        where = slice(start, min(start + step, len(images)))
        batch = images[where]
        chunk = _units_of(model, conv, batch, name) if run is None else _checked([run(where, batch)], conv, name)
        yield slice(start, start + len(chunk)), chunk
        start += len(chunk)
        del chunk


@torch.no_grad()
def _units_of(model: nn.Module, conv: nn.Conv2d, images: torch.Tensor, name: str) -> torch.Tensor:
    """Units [n, C, m, m] float32 CPU of `conv` for one forward chunk `images` [n, 3, H, W].

    The hooks live for this forward only, so whoever consumes the chunk may run the model."""
    with observe(model, conv) as captured:
        run_until_captured(model, images.to(model_device(model)))
        return _checked(captured, conv, name)


def collect_units(
    model: nn.Module, conv: nn.Conv2d, images: torch.Tensor, *, name: str, batch_size: int = 128,
    chunk_bytes: int = CHUNK_BYTES, run: Callable[[slice, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Units of `conv` for `images` [N, 3, H, W] → [N, C, m, m] float32 CPU, filled chunk by
    chunk (the chunks of `iter_units`, `run` as there) into one preallocated tensor."""
    units: torch.Tensor | None = None
    chunks = iter_units(model, conv, images, name=name, batch_size=batch_size, chunk_bytes=chunk_bytes, run=run)
    for where, chunk in chunks:
        if units is None:
            units = torch.empty((len(images), *chunk.shape[1:]), dtype=torch.float32)
        units[where] = chunk
    assert units is not None
    return units


def _checked(captured: list[torch.Tensor], conv: nn.Conv2d, name: str) -> torch.Tensor:
    """The chunk just captured, as float32 CPU, after checking it is finite with C channels."""
    if not captured:
        raise UsageError(f"the forward pass never reached the units of layer {name}; check that the model uses it")
    chunk = captured.pop().float().cpu()
    if chunk.ndim != 4 or chunk.shape[1] != conv.out_channels:
        raise UsageError(
            f"units of layer {name} have shape {tuple(chunk.shape)}, not [N, {conv.out_channels}, m, m]; "
            "choose a conv whose activations keep its channels"
        )
    if not torch.isfinite(chunk).all():
        raise UsageError(
            f"activations of layer {name} contain NaN or Inf; check the model's weights "
            "(--weights) and the input normalisation"
        )
    return chunk
