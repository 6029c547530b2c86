"""Progressive scoring without recomputing what has not changed: a cache of what the network's
already-pruned prefix makes of each chunk of scoring images.

Progressive scoring (`prune.pipeline.selection`) scores group l on the network already pruned
at groups < l. Its units are a forward of the whole prefix, yet the surgery of group l-1 (and the
BatchNorm refit after it) changes only modules from some point of the network on. The cache
keeps, per scoring chunk (class, images start:stop), the values the model's fx graph holds at a
*cut*: the outputs of the nodes before the cut that nodes at or after it read (one tensor in a
chain, the block input and its shortcut inside a residual stage). A chunk's units are then the
graph run from its cut to the unit's node, not from the input. The per-layer `scoring_top1`
diagnostic's chunks are kept the same way (their own keys, the same budgets) and run from their
cut to the model's output.

Exactness, not approximation:
- a cut is placed before the shallowest conv scored since the last change (a group's root;
  a residual group's members span the stage, so its shallowest member), the first module the
  coming surgery can change;
- around the surgery and refit (`PrefixCache.tracking`) every node before the deepest cut is
  compared, bitwise, before and after: the module's parameters and buffers, a `get_attr`
  tensor, the node's op and arguments in the re-traced graph. Entries whose cut lies past the
  first changed node are dropped. The BatchNorm refit resets every BatchNorm; where it
  re-estimates an unchanged prefix from the same batches (a seeded loader, no random
  augmentation) its statistics come out bitwise equal and the entries stay; where they differ
  (the first refit after the loaded statistics, random augmentation) the entries go;
  the refit itself runs from the cuts it stored (`prune.pipeline.refit`), reading `settle()`'s
  entries between the surgery and the refit;
- the chunks are the ones the uncached path forwards (same images together, so every op sees
  the same batch); the first chunk of a class (one image, which sizes the others) is always the
  uncached forward;
- values are stored and handed out as clones with the same strides (an in-place op in the
  graph, or in a scorer, never reaches the cache); a value whose clone would change strides,
  or that is not a tensor or an immutable scalar, is not stored.

Memory: entries stay within a byte budget (`PREFIX_CACHE_BYTES`, or the `budget_bytes` given);
a chunk's entry that does not fit is spilled to disk at full precision (`prune.pipeline.spill`:
exact dtype, strides and bits, within `spill_bytes`, in a private temporary folder removed on
`close()`) and read back when the chunk is scored; one that fits neither keeps its shallower
entry, or none, and is recomputed from there, exactly. Nothing is kept in lower precision (fp16
would change the scores).
A model fx cannot trace (or with more than one input) gets no cache: scoring takes the
uncached path.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager

import torch
from torch import fx, nn

from prune.pipeline.sites import traced_graph, unit_site
from prune.pipeline.spill import SPILL_BYTES, Spill
from scoring.model_state import model_device

PREFIX_CACHE_BYTES = 256 << 20
"""Default budget of a prefix cache (256 MiB): the bytes of all chunks' cut values held at once.
The embedded default's largest cut needs 31 MiB; VGG16 at 224² with 1,000 scoring images needs
6–13 GB per layer, which goes to disk at any budget that keeps scoring within 2 GiB of memory."""

UnitRunner = Callable[[slice, torch.Tensor], torch.Tensor]
"""run(where, images [n, 3, H, W]) → the units [n, C, m, m] of one chunk (as captured: detached,
channels at dim 1), `where` the chunk's images within its class."""
OutputRunner = Callable[[slice, torch.Tensor], torch.Tensor]
"""run(where, images [n, 3, H, W]) → the model's output for one chunk (e.g. logits [n, K])."""

_NOT_STORED = object()
"""What `_kept` returns for a value the cache cannot hold exactly."""


@dataclass
class _Entry:
    """One chunk's cut: `values` of the nodes before node position `cut` that later nodes read,
    in memory (`nbytes` of them), or spilled to the file `path` (then `values` is None, `nbytes` 0)."""

    cut: int
    values: dict[str, Any] | None
    nbytes: int
    path: Path | None = None


@dataclass(frozen=True)
class _Segment:
    """The graph from a cut to a unit node: inputs (node names), then returns (unit, *saved)."""

    module: fx.GraphModule
    inputs: tuple[str, ...]
    saved: tuple[str, ...]


def prefix_cache(model: nn.Module, *, budget_bytes: int = PREFIX_CACHE_BYTES, spill_bytes: int = SPILL_BYTES,
                 spill_dir: str | os.PathLike | None = None) -> PrefixCache | None:
    """A cache for scoring `model` progressively; None where it cannot be exact (fx cannot trace
    the model, it takes more than one input) or it could hold nothing (`budget_bytes` and
    `spill_bytes` both 0)."""
    graph = traced_graph(model)
    if max(budget_bytes, spill_bytes) <= 0 or graph is None or sum(n.op == "placeholder" for n in graph.nodes) != 1:
        return None
    return PrefixCache(model, budget_bytes=budget_bytes, spill=Spill(budget_bytes=spill_bytes, directory=spill_dir))


def tracking(cache: PrefixCache | None) -> ContextManager[None]:
    """`cache.tracking()`, or nothing to track without a cache."""
    return nullcontext() if cache is None else cache.tracking()


class PrefixCache:
    """Per scoring chunk, the values of `model`'s fx graph at a cut, kept while the modules
    before it are unchanged: `nbytes` ≤ `budget_bytes` in memory, the rest in `spill` (none by
    default). Changes to the model are made inside `tracking()`; `close()` frees everything."""

    def __init__(self, model: nn.Module, *, budget_bytes: int = PREFIX_CACHE_BYTES, spill: Spill | None = None) -> None:
        self.model = model
        self.budget_bytes = budget_bytes
        self.spill = Spill(budget_bytes=0) if spill is None else spill
        self.nbytes = 0
        self._entries: dict[Hashable, _Entry] = {}
        self._used: set[Hashable] = set()  # chunks asked for since the last change
        self._segments: dict[tuple[int, int, int | None], _Segment] = {}
        self._aim = math.inf
        self._snapshot: list[_Signature] | None = None  # inside tracking(): the nodes' signatures at its start
        self._refresh()

    def runner(self, model: nn.Module, conv_name: str, key: Hashable) -> UnitRunner | None:
        """A `UnitRunner` of the conv `conv_name` for the chunks of `key` (e.g. a class); None
        for another model or a conv whose units are not a node of the graph."""
        site = unit_site(model, conv_name)
        if model is not self.model or not site.traced or site.node not in self._order or not site.path:
            return None
        return lambda where, images: self.units(conv_name, key, where, images)

    def output_runner(self, model: nn.Module, key: Hashable, before: Sequence[str], *,
                      may_spill: bool = True) -> OutputRunner | None:
        """A runner of the model's output (e.g. logits [n, K]) for the chunks of `key`, whose values
        are kept at the cut before the convs `before` (the group the next surgery changes), in
        memory or, if `may_spill`, on disk; None for another model, an output that is not the
        graph's last node (one tensor, changed by nothing after it), or a conv of `before` whose
        units are not a node of it."""
        output = self._output
        sites = [unit_site(model, name) for name in before]
        if model is not self.model or output is None or not all(s.traced and s.path and s.path[0] in self._order
                                                                 for s in sites):
            return None
        aim = min((self._order[s.path[0]] for s in sites), default=math.inf)

        def run(where: slice, images: torch.Tensor) -> torch.Tensor:
            self._aim = min(self._aim, aim)
            return self._run((key, where.start, where.stop), output, images, may_spill=may_spill)

        return run

    @torch.no_grad()
    def units(self, conv_name: str, key: Hashable, where: slice, images: torch.Tensor) -> torch.Tensor:
        """Units [n, C, m, m] of `conv_name` for chunk `where` of `key` (`images` [n, 3, H, W]):
        the graph run from the chunk's cut, storing its values at the aimed cut on the way."""
        site = unit_site(self.model, conv_name)
        self._aim = min(self._aim, self._order[site.path[0]])
        units = self._run((key, where.start, where.stop), self._order[site.node], images)
        return units.detach().movedim(site.channel_dim, 1)

    @torch.no_grad()
    def _run(self, chunk: Hashable, target: int, images: torch.Tensor, *, may_spill: bool = True) -> Any:
        """The value of node position `target` for `chunk` (`images` [n, 3, H, W]): the graph run
        from the chunk's cut (from the images without one), storing its values at the aimed cut
        (on disk too if `may_spill`)."""
        self._used.add(chunk)
        entry = self._entries.get(chunk)
        if entry is None or entry.cut > target:
            entry = _Entry(1, {self._input: images.to(model_device(self.model))}, 0)
        save = int(self._aim) if entry.cut < self._aim <= target and self._aim > 1 else None
        segment = self._segment(entry.cut, target, save)
        out = segment.module(*self._inputs(entry, segment.inputs))
        if save is not None:
            self._store(chunk, save, dict(zip(segment.saved, out[1:])), may_spill=may_spill)
        return out[0]

    @contextmanager
    def tracking(self) -> Iterator[None]:
        """Inside, change the model (surgery, a BatchNorm refit); on exit every entry whose cut
        lies past the first node that changed (bitwise) is dropped, and so is every entry no chunk
        asked for since the last change (the chunks follow the layer's map sizes: an entry of a
        chunking no longer used would only hold the budget)."""
        self._snapshot = self._signatures_to_track()
        try:
            yield
        finally:
            self._drop_changed()
            self._snapshot = None
            self._drop_unused()

    def settle(self) -> None:
        """Inside `tracking()`: drop what the changes made so far invalidate (as its end does) and
        track on from here, so runs between two changes (a refit after a surgery) start from
        entries that fit the model as it is."""
        assert self._snapshot is not None, "settle() belongs inside tracking()"
        self._drop_changed()
        self._snapshot = self._signatures_to_track()

    def common_cut(self, chunks: Sequence[tuple[Hashable, slice]]) -> int:
        """The node position where every chunk (key, where) has its entry; 0 if one has none or
        the cuts differ."""
        cuts = {e.cut if (e := self._entries.get((key, where.start, where.stop))) else 0 for key, where in chunks}
        return cuts.pop() if len(cuts) == 1 else 0

    def forget(self, chunks: Sequence[tuple[Hashable, slice]]) -> None:
        """Drop the entries of these chunks (key, where): their next runs start from the images."""
        for key, where in chunks:
            if (key, where.start, where.stop) in self._entries:
                self._drop((key, where.start, where.stop))

    def call_positions(self) -> dict[nn.Module, list[int]]:
        """For each module the graph calls (a `call_module` node's module, with its submodules),
        the positions of the nodes that call it."""
        modules = dict(self.model.named_modules())
        positions: dict[nn.Module, list[int]] = {}
        for i, node in enumerate(self._nodes):
            if node.op == "call_module":
                for m in modules[str(node.target)].modules():
                    positions.setdefault(m, []).append(i)
        return positions

    def close(self) -> None:
        """Drop every entry and remove the spill's folder (the cache stays usable, empty)."""
        for chunk in list(self._entries):
            self._drop(chunk)
        self.spill.close()

    # ------------------------------------------------------------ internals

    def _drop_changed(self) -> None:
        """Re-trace, and drop every entry whose cut lies past the first node that changed (bitwise)
        since `_snapshot` was taken."""
        self._refresh()
        before = self._snapshot
        after = _signatures(self.model, self._nodes[:len(before)], copy=False) if len(self._nodes) >= len(before) else []
        self._drop_past(_first_difference(before, after))
        self._segments.clear()  # they hold the modules and tensors of before
        self._aim = math.inf

    def _signatures_to_track(self) -> list[_Signature]:
        """Copies of the signatures of the nodes before the deepest cut an entry holds."""
        reach = max((e.cut for e in self._entries.values()), default=0)
        return _signatures(self.model, self._nodes[:reach], copy=True)

    def _refresh(self) -> None:
        graph = traced_graph(self.model)
        assert graph is not None, "a PrefixCache needs a model fx can trace"
        self._nodes: list[fx.Node] = [n for n in graph.nodes if n.op != "output"]
        self._order = {n.name: i for i, n in enumerate(self._nodes)}
        self._input = self._nodes[0].name
        self._graph = graph
        output = next(n for n in graph.nodes if n.op == "output").args[0]
        last = len(self._nodes) - 1
        self._output = last if isinstance(output, fx.Node) and self._order.get(output.name) == last else None

    def _drop_past(self, first_changed: int) -> None:
        for chunk in [c for c, e in self._entries.items() if e.cut > first_changed]:
            self._drop(chunk)

    def _drop_unused(self) -> None:
        for chunk in [c for c in self._entries if c not in self._used]:
            self._drop(chunk)
        self._used.clear()

    def _drop(self, chunk: Hashable) -> None:
        entry = self._entries.pop(chunk)
        self.nbytes -= entry.nbytes
        if entry.path is not None:
            self.spill.delete(entry.path)

    def _inputs(self, entry: _Entry, names: Sequence[str]) -> list[Any]:
        """The values `names` of `entry` for a run to own: clones of what memory holds (same
        strides), or read fresh from the spill file."""
        if entry.values is not None:
            return [_clone(entry.values[name]) for name in names]
        values = self.spill.read(entry.path)
        return [values[name] for name in names]

    def _store(self, chunk: Hashable, cut: int, values: dict[str, Any], *, may_spill: bool = True) -> None:
        """Keep `values` at `cut` for `chunk` if exact: in memory within its budget, else (if
        `may_spill`) in the spill within its budget (else keep the old entry)."""
        if any(v is _NOT_STORED for v in values.values()):
            return
        nbytes = sum(v.numel() * v.element_size() for v in values.values() if isinstance(v, torch.Tensor))
        old = self._entries.get(chunk)
        if nbytes <= self.budget_bytes - self.nbytes + (old.nbytes if old else 0):
            new = _Entry(cut, values, nbytes)
        elif may_spill and (path := self.spill.write(values, nbytes)) is not None:
            new = _Entry(cut, None, 0, path)
        else:
            return
        if old is not None:
            self._drop(chunk)
        self._entries[chunk] = new
        self.nbytes += new.nbytes

    def _segment(self, cut: int, unit: int, save: int | None) -> _Segment:
        key = (cut, unit, save)
        if key not in self._segments:
            self._segments[key] = _build_segment(self.model, self._nodes, cut, unit, save)
        return self._segments[key]


# ---------------------------------------------------------------- graph segments


def live(nodes: Sequence[fx.Node], cut: int) -> list[fx.Node]:
    """The nodes before position `cut` whose values a node at or after it reads (in order);
    `get_attr` nodes are read again from the model, never held."""
    later = set(nodes[cut:])
    return [n for n in nodes[:cut] if n.op != "get_attr" and any(u in later or u.op == "output" for u in n.users)]


def _build_segment(model: nn.Module, nodes: Sequence[fx.Node], cut: int, unit: int, save: int | None) -> _Segment:
    """Nodes[cut..unit] as a GraphModule on `model`'s submodules; inputs: the values live at `cut`;
    returns (unit value, *kept copies of the values live at `save`, taken when the run reaches it)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    inputs = live(nodes, cut)
    for n in inputs:
        env[n] = graph.placeholder(n.name)
    saved = live(nodes, save) if save is not None else []
    kept: list[fx.Node] = []

    def arg(n: fx.Node) -> fx.Node:
        if n not in env:  # a get_attr before the cut, read again here
            env[n] = graph.node_copy(n, arg)
        return env[n]

    for i in range(cut, unit + 1):
        if i == save:
            kept = [graph.call_function(_kept, (arg(n),)) for n in saved]
        env[nodes[i]] = graph.node_copy(nodes[i], arg)
    graph.output((env[nodes[unit]], *kept))
    return _Segment(fx.GraphModule(model, graph), tuple(n.name for n in inputs), tuple(n.name for n in saved))


def _kept(value: Any) -> Any:
    """A copy of `value` the graph cannot change later: a tensor cloned with its strides, an
    immutable scalar or size as is; `_NOT_STORED` for anything else."""
    if isinstance(value, torch.Tensor):
        copy = value.detach().clone()
        return copy if copy.stride() == value.stride() else _NOT_STORED
    if value is None or isinstance(value, (bool, int, float, torch.Size)):
        return value
    if isinstance(value, tuple) and all(isinstance(v, (bool, int, float)) for v in value):
        return value
    return _NOT_STORED


def _clone(value: Any) -> Any:
    """A cached value handed to a run: a clone (same strides) for a tensor, so the run cannot change the cache."""
    return value.clone() if isinstance(value, torch.Tensor) else value


# ---------------------------------------------------------------- change detection

_Signature = tuple[str, list[tuple[str, torch.Tensor]]]


def _signatures(model: nn.Module, nodes: Sequence[fx.Node], *, copy: bool) -> list[_Signature]:
    """Per node: its name, op and arguments (as text), and the tensors it reads from the model
    (a module's parameters and buffers, a `get_attr` tensor), copied if `copy`."""
    modules = dict(model.named_modules())
    take = (lambda t: t.detach().clone()) if copy else (lambda t: t.detach())
    return [_signature(node, modules, model, take) for node in nodes]


def _signature(node: fx.Node, modules: dict[str, nn.Module], model: nn.Module,
               take: Callable[[torch.Tensor], torch.Tensor]) -> _Signature:
    text = repr((node.name, node.op, node.target, node.args, node.kwargs))
    if node.op == "call_module":
        module = modules[str(node.target)]
        state = [*module.named_parameters(), *module.named_buffers()]
        return f"{text}{module.extra_repr()} training={module.training}", [(name, take(t)) for name, t in state]
    if node.op == "get_attr":
        value = _attribute(model, str(node.target))
        return text, [("", take(value))] if isinstance(value, torch.Tensor) else [(repr(value), None)]
    return text, []


def _attribute(model: nn.Module, target: str) -> Any:
    value: Any = model
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _first_difference(before: list[_Signature], after: list[_Signature]) -> int:
    """Position of the first node whose signature differs (bitwise for tensors); len(before) if none."""
    for i, (a, b) in enumerate(zip(before, after)):
        if not _same_signature(a, b):
            return i
    return min(len(before), len(after))


def _same_signature(a: _Signature, b: _Signature) -> bool:
    (text_a, state_a), (text_b, state_b) = a, b
    if text_a != text_b or len(state_a) != len(state_b):
        return False
    return all(na == nb and _same_bits(ta, tb) for (na, ta), (nb, tb) in zip(state_a, state_b))


def _same_bits(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Whether two tensors have the same dtype, shape and bytes (so -0.0 ≠ 0.0, NaN = same NaN)."""
    if a is None or b is None:
        return a is b
    if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


__all__ = ["PREFIX_CACHE_BYTES", "OutputRunner", "PrefixCache", "UnitRunner", "live", "prefix_cache", "tracking"]
