"""Where a conv layer's units are read: found from the model's torch.fx graph, never assumed.

`unit_site(model, conv_name)` walks forward from the conv's output node through ops that keep
the conv's channels one-to-one ("transparent": norms, identity, dropout, permutes, scaling by
a constant, a residual addition) to the first activation the model applies. The rules (the
reasons are in `prune.pipeline.observe`):

- the unit is the output of that first activation (module or functional, inplace or not);
- an addition of another data tensor (a residual shortcut) is crossed: the unit is the
  block's output, after the activation applied to the sum if there is one;
- the walk stops before an op that mixes or drops channels (conv, linear, pooling, flatten,
  concat, a data-dependent product), where a tensor feeds two consumers (a fork), and at a
  norm after an addition (that norm belongs to the next stage, e.g. ConvNeXt's downsampling
  LayerNorm); then the unit is the last tensor reached, with no activation (e.g. the norm's
  output, or the sum);
- LayerNorm counts as transparent only over the channel dim alone (ConvNeXt's channels-last
  LayerNorm); the unit keeps track of where the channels are (`UnitSite.channel_dim`).

Tracing: torch.fx symbolic tracing in eval mode (the mode units are read in; python branches
on `self.training` inside traced-through modules take the eval branch), with timm's
no-trace modules and functions and timm's activation modules as leaves.

A site names modules and fx nodes, never module objects, so it stays valid after
torch-pruning surgery (which changes widths, not names or topology). Resolutions are cached
per model and recomputed only when the model's module structure (names and types) changes; the
graph that runs a prefix (`prefix_module`) is traced again when the widths changed (surgery), as
a trace bakes attributes such as a LayerNorm's `normalized_shape` into it.
Where fx cannot trace a model the fallback is the registration-order rule (the norm and the
activation module registered right after the conv), announced by one warning per model class.
"""

from __future__ import annotations

import sys
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from prune.errors import UsageError, first_line
from scoring.model_state import eval_mode

ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh,
    nn.Softplus, nn.Softsign, nn.LogSigmoid, nn.Threshold,
)  # fmt: skip
"""Element-wise activation modules (ReLU6 is a Hardtanh)."""

ACTIVATION_FUNCTIONS: frozenset[str] = frozenset(
    "relu relu_ relu6 leaky_relu leaky_relu_ prelu rrelu rrelu_ elu elu_ celu celu_ selu selu_ "
    "gelu silu mish hardswish hardsigmoid hardtanh hardtanh_ sigmoid sigmoid_ tanh tanh_ "
    "softplus softsign logsigmoid threshold threshold_".split()
)
"""Names of element-wise activations as functions (F.relu, torch.relu_) or methods (x.relu())."""

_TIMM_ACTIVATIONS = "timm.layers.activations"  # timm's own activation modules (GELU, Sigmoid, …)
_NORMS_CHANNEL_FIRST = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
_PASS_MODULES = (nn.Identity, nn.modules.dropout._DropoutNd)
_PASS_CALLS = frozenset(
    "contiguous clone dropout dropout2d alpha_dropout feature_alpha_dropout float to type_as".split()
)
_ARITHMETIC = {
    **dict.fromkeys(("add", "iadd", "add_"), True),
    **dict.fromkeys(("sub", "isub", "sub_", "mul", "imul", "mul_", "truediv", "div", "div_"), False),
}
"""Arithmetic that keeps channels when the other operand is a constant (a parameter, a number);
with another data tensor, True marks a residual addition (crossed), False ends the walk."""
_OPERAND_SECOND_OK = ("add", "iadd", "add_", "mul", "imul", "mul_")  # commutative: x may be the 2nd operand
_METADATA_CALLS = frozenset("size dim numel getattr shape".split())


@dataclass(frozen=True)
class UnitSite:
    """Where the units [N, C, m, m] of conv `conv` are read.

    `module` (call number `call` in one forward, 0 = first) is the module whose output is the
    unit; None when the unit is a functional op's output, fx node `node` (then the traced graph
    is run up to that node). `activation`: the activation's class or function name, None when
    none is applied before a channel-mixing op. `residual`: an addition lies between conv and
    unit (the unit is the block's output). `channel_dim`: where the C channels are in the
    captured tensor (1, or 3 for channels-last). `norm`: the BatchNorm directly consuming the
    conv's output, if any. `traced`: found from the fx graph (False: registration-order fallback).
    `path`: the fx nodes walked, conv to unit (fallback: the modules conv, norm, activation).
    """

    conv: str
    module: str | None
    call: int = 0
    node: str | None = None
    activation: str | None = None
    residual: bool = False
    channel_dim: int = 1
    norm: str | None = None
    traced: bool = True
    path: tuple[str, ...] = field(default=(), compare=False)


@dataclass
class _Resolution:
    fingerprint: tuple[tuple[str, type], ...]
    graph: fx.Graph | None
    sites: dict[str, UnitSite]
    widths: tuple[torch.Size, ...]
    """Parameter shapes when `graph` was traced (a trace bakes e.g. a LayerNorm's `normalized_shape`)."""


_CACHE: weakref.WeakKeyDictionary[nn.Module, _Resolution] = weakref.WeakKeyDictionary()
_WARNED: set[str] = set()


def unit_site(model: nn.Module, conv_name: str) -> UnitSite:
    """The site of the units of the Conv2d called `conv_name` in `model` (cached per model)."""
    resolution = _resolution(model)
    if conv_name not in resolution.sites:
        conv = dict(model.named_modules()).get(conv_name)
        if not isinstance(conv, nn.Conv2d):
            raise UsageError(f"no conv layer {conv_name!r} in the model; pass the qualified name of an nn.Conv2d")
        site = _walk(resolution.graph, model, conv_name) if resolution.graph is not None else None
        if site is None and resolution.graph is not None:
            _warn_once(f"{type(model).__qualname__}.{conv_name}", f"{conv_name} is not a node of the fx graph")
        resolution.sites[conv_name] = site or _registration_site(model, conv_name)
    return resolution.sites[conv_name]


def traced_graph(model: nn.Module) -> fx.Graph | None:
    """The cached fx graph of `model` (traced in eval mode), None where fx cannot trace it;
    traced again when the model's widths changed since (surgery), as the graph holds constants
    taken from its modules."""
    resolution = _resolution(model)
    widths = _widths(model)
    if resolution.graph is not None and resolution.widths != widths:
        resolution.graph, resolution.widths = _trace(model), widths
    return resolution.graph


def prefix_module(model: nn.Module, node_name: str) -> fx.GraphModule:
    """`model`'s traced graph up to fx node `node_name`, which it returns; built on the model's
    current submodules (so it follows surgery and module replacement)."""
    graph = traced_graph(model)
    assert graph is not None, "prefix_module needs a traced model"
    prefix = fx.Graph()
    copies: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        copies[node] = prefix.node_copy(node, lambda n: copies[n])
        if node.name == node_name:
            prefix.output(copies[node])
            break
    return fx.GraphModule(model, prefix)


# ---------------------------------------------------------------- tracing


def _fingerprint(model: nn.Module) -> tuple[tuple[str, type], ...]:
    return tuple((name, type(m)) for name, m in model.named_modules())


def _widths(model: nn.Module) -> tuple[torch.Size, ...]:
    return tuple(p.shape for p in model.parameters())


def _resolution(model: nn.Module) -> _Resolution:
    fingerprint = _fingerprint(model)
    cached = _CACHE.get(model)
    if cached is None or cached.fingerprint != fingerprint:
        cached = _Resolution(fingerprint, _trace(model), {}, _widths(model))
        _CACHE[model] = cached
    return cached


class _Tracer(fx.Tracer):
    """fx tracer with timm's leaf modules / functions and timm's activation modules as leaves."""

    def __init__(self) -> None:
        leaves, functions = _timm_notrace()
        super().__init__(autowrap_functions=functions)
        self._leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        timm_act = type(m).__module__.startswith(_TIMM_ACTIVATIONS)
        return isinstance(m, self._leaves) or timm_act or super().is_leaf_module(m, qualname)


def _timm_notrace() -> tuple[tuple[type, ...], tuple[Callable, ...]]:
    """timm's no-trace modules and functions; none while timm is not imported (no model holds a timm
    module then, and importing timm for nothing costs seconds)."""
    if sys.modules.get("timm") is None:
        return (), ()
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:
        return (), ()
    return tuple(get_notrace_modules()), tuple(f for f in get_notrace_functions() if callable(f))


def _trace(model: nn.Module) -> fx.Graph | None:
    """fx graph of `model` in eval mode (training flags restored), None with one warning if untraceable."""
    try:
        with eval_mode(model):
            return _Tracer().trace(model)
    except Exception as exc:  # fx raises many kinds (TraceError, TypeError, …) on untraceable code
        reason = first_line(exc)
        _warn_once(type(model).__qualname__, f"torch.fx cannot trace {type(model).__qualname__} ({reason})")
        return None


def _warn_once(key: str, what: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(
            f"{what}; its units are read after the norm and activation modules registered right "
            "after the conv (registration order)",
            stacklevel=4,
        )


# ---------------------------------------------------------------- the walk


@dataclass(frozen=True)
class _Step:
    kind: str  # "act", "pass", "norm" (a pass that ends the walk after an addition), "add" or "stop"
    channel_dim: int = 1
    activation: str | None = None


_STOP = _Step("stop")


def _walk(graph: fx.Graph, model: nn.Module, conv_name: str) -> UnitSite | None:
    """The site of `conv_name` from the graph; None if the conv is not a node of it."""
    nodes = list(graph.nodes)
    start = next((n for n in nodes if n.op == "call_module" and n.target == conv_name), None)
    if start is None:
        return None
    modules = dict(model.named_modules())
    ndim = modules[conv_name].weight.ndim
    node, cdim, residual, path = start, 1, False, [start.name]
    first = _data_users(start)
    direct_bn = len(first) == 1 and _is_module(first[0], modules, nn.modules.batchnorm._BatchNorm)
    norm = str(first[0].target) if direct_bn else None
    activation = None
    while True:
        users = _data_users(node)
        if len(users) != 1:
            break
        step = _classify(users[0], node, cdim, ndim, modules)
        if step.kind == "stop" or (step.kind == "norm" and residual):
            break
        node, cdim = users[0], step.channel_dim
        residual |= step.kind == "add"
        path.append(node.name)
        if step.kind == "act":
            activation = step.activation
            break
    return _site(nodes, node, conv_name, activation, residual, cdim, norm, tuple(path))


def _site(
    nodes: list[fx.Node], unit: fx.Node, conv_name: str, activation: str | None, residual: bool,
    cdim: int, norm: str | None, path: tuple[str, ...],
) -> UnitSite:  # fmt: skip
    """A traced site: the unit is module `unit.target`'s n-th call, or the functional node `unit`."""
    module, call = None, 0
    if unit.op == "call_module":
        module = str(unit.target)
        call = sum(1 for n in nodes[: nodes.index(unit)] if n.op == "call_module" and n.target == module)
    return UnitSite(conv_name, module, call, unit.name, activation, residual, cdim, norm, True, path)


def _data_users(node: fx.Node) -> list[fx.Node]:
    """Consumers of `node`'s values (shape/size queries excluded)."""
    return [u for u in node.users if _call_name(u) not in _METADATA_CALLS]


def _call_name(node: fx.Node) -> str | None:
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        return getattr(node.target, "__name__", None)
    return None


def _is_module(node: fx.Node, modules: dict[str, nn.Module], kinds: type | tuple[type, ...]) -> bool:
    return node.op == "call_module" and isinstance(modules.get(str(node.target)), kinds)


def _classify(user: fx.Node, node: fx.Node, cdim: int, ndim: int, modules: dict[str, nn.Module]) -> _Step:
    """What `user` does to the conv's channels, held at dim `cdim` of `node`'s output."""
    if user.op == "call_module":
        return _classify_module(modules[str(user.target)], cdim, ndim)
    name = _call_name(user)
    if name is None or not user.args or (user.args[0] is not node and name not in _OPERAND_SECOND_OK):
        return _STOP
    if name in ACTIVATION_FUNCTIONS:
        return _Step("act", cdim, name)
    if name in ("permute", "transpose", "swapaxes", "movedim"):
        return _moved(user, cdim, ndim)
    if name in _PASS_CALLS:
        return _Step("pass", cdim)
    if name == "layer_norm":
        return _Step("norm", cdim) if _layer_norm_ok(user, cdim, ndim) else _STOP
    if name in ("batch_norm", "group_norm", "instance_norm"):
        return _Step("norm", cdim) if cdim == 1 else _STOP
    if name in _ARITHMETIC:
        return _arithmetic(user, node, name, cdim)
    return _STOP


def _classify_module(module: nn.Module, cdim: int, ndim: int) -> _Step:
    if isinstance(module, ACTIVATION_MODULES) or type(module).__module__.startswith(_TIMM_ACTIVATIONS):
        return _Step("act", cdim, type(module).__name__)
    if isinstance(module, _PASS_MODULES):
        return _Step("pass", cdim)
    channels_first = type(module).__name__ == "LayerNorm2d" or isinstance(module, _NORMS_CHANNEL_FIRST)
    if channels_first:
        return _Step("norm", cdim) if cdim == 1 else _STOP
    if isinstance(module, nn.LayerNorm):
        return _Step("norm", cdim) if len(module.normalized_shape) == 1 and cdim == ndim - 1 else _STOP
    return _STOP


def _moved(user: fx.Node, cdim: int, ndim: int) -> _Step:
    """Channel dim after permute / transpose / movedim."""
    args = list(user.args[1:]) + list(user.kwargs.values())
    flat = list(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
    if not all(isinstance(a, int) for a in flat):
        return _STOP
    dims = [d % ndim for d in flat]
    name = _call_name(user)
    if name == "permute" and len(dims) == ndim:
        return _Step("pass", dims.index(cdim))
    if name in ("transpose", "swapaxes") and len(dims) == 2:
        a, b = dims
        return _Step("pass", b if cdim == a else a if cdim == b else cdim)
    if name == "movedim" and len(dims) == 2:
        order = [d for d in range(ndim) if d != dims[0]]
        order.insert(dims[1], dims[0])
        return _Step("pass", order.index(cdim))
    return _STOP


def _layer_norm_ok(user: fx.Node, cdim: int, ndim: int) -> bool:
    shape = user.args[1] if len(user.args) > 1 else user.kwargs.get("normalized_shape")
    shape = (shape,) if isinstance(shape, int) else shape
    return isinstance(shape, (tuple, list, torch.Size)) and len(shape) == 1 and cdim == ndim - 1


def _arithmetic(user: fx.Node, node: fx.Node, name: str, cdim: int) -> _Step:
    """x ± c, x·c, x / c with a constant c keep channels; x + y with data y is a residual addition."""
    operands = list(user.args[:2]) + [v for k, v in user.kwargs.items() if k == "other"]
    others = [a for a in operands if a is not node]
    if len(others) != 1:
        return _STOP
    if not _depends_on_input(others[0]):
        return _Step("pass", cdim)
    return _Step("add", cdim) if _ARITHMETIC[name] else _STOP


def _depends_on_input(value: object) -> bool:
    """Whether an fx argument is computed from the model's input (not a parameter or constant)."""
    seen: set[fx.Node] = set()
    todo = _nodes_in(value)
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            return True
        todo.extend(n.all_input_nodes)
    return False


def _nodes_in(value: object) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(value, lambda n: found.append(n) or n)
    return found


# ---------------------------------------------------------------- fallback


def _registration_site(model: nn.Module, conv_name: str) -> UnitSite:
    """Registration-order rule: the BatchNorm registered right after the conv (matching width),
    then the activation module registered right after that, if any."""
    named = list(model.named_modules())
    i = next(k for k, (n, _) in enumerate(named) if n == conv_name)
    conv = named[i][1]
    norm = None
    nxt = named[i + 1] if i + 1 < len(named) else None
    if nxt and isinstance(nxt[1], nn.modules.batchnorm._BatchNorm) and nxt[1].num_features == conv.out_channels:
        norm, i = nxt[0], i + 1
    nxt = named[i + 1] if i + 1 < len(named) else None
    act = nxt[0] if nxt and _classify_module(nxt[1], 1, 4).kind == "act" else None
    path = tuple(n for n in (conv_name, norm, act) if n)
    activation = type(nxt[1]).__name__ if act else None
    return UnitSite(conv_name, path[-1], 0, None, activation, False, 1, norm, False, path)


__all__ = ["ACTIVATION_FUNCTIONS", "ACTIVATION_MODULES", "UnitSite", "prefix_module", "traced_graph", "unit_site"]
