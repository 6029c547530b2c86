"""torch-pruning's own importance criteria as scorers (`tp-magnitude`, `tp-lamp`, `tp-fpgm`,
`tp-bnscale`, `tp-taylor`, `tp-hessian`).

Each scores a conv's output channels with the library's class on the conv's whole pruning
group: a `tp.DependencyGraph` traced on `layer.model` (read only here, never pruned) gives
`get_pruning_group(conv, prune_conv_out_channels, idxs=range(C))`, and the importance
aggregates over the coupled layers (the conv, its BatchNorm, the next layer's input
channels) by its default `group_reduction="mean"`. Scores are the raw per-channel values
(`normalizer=None`; LAMP keeps its own `"lamp"` normaliser, which is the criterion): [C]
float32 on CPU, higher = more important = keep.

Tracing needs an input: `layer.example` [1, 3, H, W], else the first image of the first
scoring batch seen. The model's train/eval flags and any `.grad` it had are restored; its
weights and BatchNorm statistics are never changed (passes run in eval mode).

The gradient criteria (`tp-taylor`, `tp-hessian`) take cross-entropy gradients of
`layer.model` on the scoring images, labels = each batch's class. Their state is a sum over
classes (gradient sums and an image count), so they shard by class (exactly, but for a large
Linear weight: within float rounding). torch-pruning reads gradients from `param.grad`; they
are set there only for the call and then restored.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from scoring.base import ClassBatch, LayerSpec, Scorer
from scoring.chunked import ChunkedScorer
from scoring.dependency import dependency_graph
from scoring.hooks import images_per_pass, prunable_convs
from scoring.model_state import eval_mode, model_device, probe_input
from scoring.registry import register

Sums = dict[str, torch.Tensor]
"""One tensor per parameter name, shaped like the parameter."""


# ---------------------------------------------------------------- the model, left as found


@contextmanager
def _held(model: nn.Module, differentiable: Sequence[str] | None = None) -> Iterator[None]:
    """Eval mode, grad enabled and every parameter differentiable inside (only those named in
    `differentiable`, if given: a forward then saves nothing for a backward before the first of
    them); train/eval flags, `requires_grad` and `.grad` of the caller's model restored on exit."""
    named = list(model.named_parameters())
    saved = [(p.requires_grad, p.grad) for _, p in named]
    wanted = None if differentiable is None else set(differentiable)
    try:
        for name, p in named:
            p.requires_grad_(wanted is None or name in wanted)
            p.grad = None
        with eval_mode(model), torch.enable_grad():
            yield
    finally:
        for (_, p), (requires, grad) in zip(named, saved):
            p.grad = grad
            p.requires_grad_(requires)


def pruning_group(layer: LayerSpec, example: torch.Tensor) -> Any:
    """torch-pruning's group for all C output channels of `layer.conv`, traced on `example`."""
    import torch_pruning as tp

    device = model_device(layer.model)
    graph = dependency_graph(layer.model, example.to(device))
    return graph.get_pruning_group(layer.conv, tp.prune_conv_out_channels, idxs=list(range(layer.num_channels)))


# ---------------------------------------------------------------- weight criteria


class TPScorer(Scorer):
    """A torch-pruning importance `tp.importance.<criterion>(**options)` as a scorer."""

    criterion: ClassVar[str]
    options: ClassVar[dict[str, Any]] = {"normalizer": None}

    def reset(self, layer: LayerSpec) -> None:
        super().reset(layer)
        self._example = layer.example

    def update(self, batch: ClassBatch) -> None:
        self.note_example(batch)

    def note_example(self, batch: ClassBatch) -> None:
        """Keep the first scoring image [1, 3, H, W] to trace on, if the layer gave none."""
        if self._example is None:
            self._example = batch.images[:1]

    def importance(self) -> Any:
        """A fresh `tp.importance.<criterion>` with this scorer's options (through `_Bounded` where
        large slices have a chunked form)."""
        import torch_pruning as tp

        if self.criterion in LARGE_SLICE:
            return _Bounded(self.criterion, **self.options)
        return getattr(tp.importance, self.criterion)(**self.options)

    def prepare(self) -> dict[str, torch.Tensor]:
        """Gradients to place on the parameters (by name) while the importance runs; none here."""
        return {}

    def compute(self) -> torch.Tensor:
        layer: LayerSpec | None = getattr(self, "layer", None)
        if layer is None:
            raise ValueError(f"{self.info.name}: call reset(layer) before compute()")
        if self._example is None:
            raise ValueError(f"{self.info.name}: no input to trace the model; set LayerSpec.example [1, 3, H, W]")
        grads = self.prepare()
        with _held(layer.model):
            group = pruning_group(layer, self._example)
            for name, p in layer.model.named_parameters():
                p.grad = grads.get(name)
            scores = self.importance()(group)
        if scores is None:
            raise ValueError(self.missing(layer))
        scores = scores.detach().float().cpu()
        if not torch.isfinite(scores).all():
            raise ValueError(f"{self.info.name}: NaN/Inf scores at layer {layer.name!r}; check the model weights")
        return scores

    def missing(self, layer: LayerSpec) -> str:
        """Why the importance found nothing to score in `layer`'s group (it returned None)."""
        return f"{self.info.name}: torch-pruning found no parameterised layer in the group of {layer.name!r}"


@register("tp-magnitude", needs_data=False,
          description="torch-pruning group magnitude: mean over the coupled layers of Σ w², p = 2")
class TPMagnitude(TPScorer):
    """`GroupMagnitudeImportance(p=2)`: mean over the group's conv out, BatchNorm γ and next-layer
    in-channel slices of Σ|w|²; [C], higher = keep."""

    criterion = "GroupMagnitudeImportance"
    options = {"p": 2, "normalizer": None}


@register("tp-lamp", needs_data=False,
          description="torch-pruning LAMP: group magnitude over the sum of the larger ones (Lee et al. 2021)")
class TPLamp(TPScorer):
    """`LAMPImportance`: s[c] / Σ_{s[j] ≥ s[c]} s[j] of the group magnitude s (p = 2); [C], higher = keep
    (same order as the magnitude within a layer; its normaliser is the criterion itself)."""

    criterion = "LAMPImportance"
    options = {"p": 2}


@register("tp-fpgm", needs_data=False,
          description="torch-pruning FPGM: summed distance of |w|² filters to the others (He et al. 2019)")
class TPFPGM(TPScorer):
    """`FPGMImportance`: mean over the group's conv slices of Σ_j ‖|F_i|² − |F_j|²‖₂ (no BatchNorm);
    [C], higher = keep (far from the geometric median). A large slice (VGG16's last group: the
    classifier's 25,088 inputs, whose n × n distance matrix torch-pruning holds twice: 5 GB) is
    squared and its distance sums taken in chunks (`_Bounded`, equal within float rounding); a
    grouped conv's input channels (ResNeXt), where torch-pruning raises, are each read as the
    weights of the filters of their own group (`_grouped_fpgm`; torch-pruning's magnitude, LAMP,
    Taylor and Hessian read channel c there as the row c mod in/groups across all filters);
    every other slice goes through torch-pruning itself."""

    criterion = "FPGMImportance"


CDIST_ROWS = 4096
"""Rows of a slice above which tp-fpgm sums its distances in chunks (its distance matrix would
pass 64 MiB)."""
CHUNK_BYTES = 64 * 2**20
"""Most bytes of one chunk of a slice or of its distances; a slice above it is large."""


class _Bounded:
    """torch-pruning's `<criterion>(**options)` with bounded memory. Each item of the group goes
    through torch-pruning on its own (its exact operations), except a large Conv/Linear weight
    slice (above `CHUNK_BYTES`, or above `CDIST_ROWS` rows for FPGM; VGG16's last group: the
    classifier's 25,088 inputs × 4,096, 0.4 GB), which `LARGE_SLICE[criterion]` computes in chunks
    where torch-pruning holds two or three whole copies of it (and FPGM its n × n distances), and
    FPGM's grouped-conv inputs, where torch-pruning raises (`_grouped_fpgm`); then torch-pruning's
    own reduction and normaliser over the items' entries, in group order."""

    def __init__(self, criterion: str, **options: Any) -> None:
        import torch_pruning as tp

        cls = getattr(tp.importance, criterion)
        self._importance = cls(**options)
        self._entries = type(f"Entries{criterion}", (cls,), {
            "_reduce": lambda _self, imps, roots: (imps, roots), "_normalize": lambda _self, x, _how: x})(**options)
        self._large = LARGE_SLICE[criterion]

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor | None:
        imp, imps, roots = self._importance, [], []
        for i in range(len(group)):
            item = group[i]
            local = self._large(imp, item.dep.layer, item.dep.pruning_fn, item.idxs)
            if local is not None:
                imps.append(local)
                roots.append(item.root_idxs)
            elif (found := self._entries([item])) is not None:  # torch-pruning's entries for this item
                imps += found[0]
                roots += found[1]
        if not imps:
            return None
        return imp._normalize(imp._reduce(imps, roots), imp.normalizer)


def _weight_rows(imp: Any, layer: nn.Module, prune_fn: Any, of: str = "data") -> torch.Tensor | None:
    """The weight of `layer` (`of` "data", or "grad" for its gradient) as the rows that `prune_fn`
    removes ([channels, ...], a view), as torch-pruning's criteria read them; None where they read
    something else (BatchNorm, grouped convs' inputs, biases, other functions) or it is missing."""
    from torch_pruning.pruner import function

    out_fns = (function.prune_conv_out_channels, function.prune_linear_out_channels)
    in_fns = (function.prune_conv_in_channels, function.prune_linear_in_channels)
    if not isinstance(layer, tuple(imp.target_types)) or getattr(imp, "bias", False) or prune_fn not in out_fns + in_fns:
        return None
    if prune_fn == function.prune_conv_in_channels and layer.groups not in (1, layer.in_channels):
        return None
    w = getattr(layer.weight, of)
    if w is None:  # no gradient
        return None
    transposed = getattr(layer, "transposed", False)
    if prune_fn in out_fns:
        return w.transpose(1, 0) if transposed else w
    return w if transposed else w.transpose(0, 1)


def _is_large(rows: torch.Tensor | None, idxs: Sequence[int]) -> bool:
    """Whether the slice `rows[idxs]` passes `CHUNK_BYTES` (False where there are no rows)."""
    return rows is not None and len(idxs) * rows[0].numel() * rows.element_size() > CHUNK_BYTES


def _chunked_rows(rows: torch.Tensor, idxs: Sequence[int], reduce: Any, *more: torch.Tensor) -> torch.Tensor:
    """`reduce(rows[idxs].flatten(1), *(m[idxs].flatten(1) for m in more))` [len(idxs), ...], made
    `CHUNK_BYTES` of rows at a time (each a gathered copy: `reduce` may work in place on it)."""
    step = max(1, CHUNK_BYTES // (rows[0].numel() * rows.element_size()))
    out = None
    for start in range(0, len(idxs), step):
        take = torch.as_tensor(idxs[start:start + step], device=rows.device)
        part = reduce(rows[take].flatten(1), *(m[take].flatten(1) for m in more))
        if out is None:
            out = part.new_empty((len(idxs), *part.shape[1:]))
        out[start:start + len(part)] = part
    return out


def _large_magnitude(imp: Any, layer: nn.Module, prune_fn: Any, idxs: Sequence[int]) -> torch.Tensor | None:
    """Σ|w|^p of each row of a large slice (torch-pruning's Conv/Linear magnitude), else None."""
    rows = _weight_rows(imp, layer, prune_fn)
    if not _is_large(rows, idxs):
        return None
    return _chunked_rows(rows, idxs, lambda x: x.abs().pow(imp.p).sum(1))


def _large_fpgm(imp: Any, layer: nn.Module, prune_fn: Any, idxs: Sequence[int]) -> torch.Tensor | None:
    """FPGM's distance sums of the |w|^p rows of a large slice (`_distance_sums`), else None."""
    rows = _weight_rows(imp, layer, prune_fn)
    if rows is None or (len(idxs) <= CDIST_ROWS and not _is_large(rows, idxs)):
        return None
    return _distance_sums(_chunked_rows(rows, idxs, lambda x: x.abs().pow(imp.p)))


def _grouped_fpgm(imp: Any, layer: nn.Module, prune_fn: Any, idxs: Sequence[int]) -> torch.Tensor | None:
    """FPGM's distance sums over the input channels `idxs` of a grouped conv (1 < groups < in_channels,
    as ResNeXt's), else None. Input channel c of group q = c // (in/groups) is read by that group's
    out/groups filters only: its row is weight[q·out/g : (q+1)·out/g, c mod in/g] flattened, |·|^p.
    (torch-pruning 1.6.0 repeats a 2-D tensor with one repeat count here and raises.)"""
    from torch_pruning.pruner import function

    if prune_fn != function.prune_conv_in_channels or not isinstance(layer, tuple(imp.target_types)):
        return None
    groups = layer.groups
    if groups in (1, layer.in_channels):
        return None
    w = layer.weight.data  # [in, out/g, k, k] when transposed, else [out, in/g, k, k]
    if getattr(layer, "transposed", False):
        rows = w.flatten(1)
    else:
        per_group = w.shape[0] // groups
        rows = torch.cat([w[q * per_group:(q + 1) * per_group].transpose(0, 1).flatten(1) for q in range(groups)])
    return _distance_sums(rows[list(idxs)].abs().pow(imp.p))


def _fpgm_slice(imp: Any, layer: nn.Module, prune_fn: Any, idxs: Sequence[int]) -> torch.Tensor | None:
    """FPGM's distance sums of a grouped conv's input channels or of a large slice, else None."""
    found = _grouped_fpgm(imp, layer, prune_fn, idxs)
    return found if found is not None else _large_fpgm(imp, layer, prune_fn, idxs)


def _distance_sums(x: torch.Tensor) -> torch.Tensor:
    """Σ_i ‖x_i − x_j‖₂ for each row j of `x` [n, d] → [n] (FPGM's column sums of its distance
    matrix). Up to `CDIST_ROWS` rows as torch-pruning computes them (`torch.cdist`); above, in chunks
    of rows as ‖a‖² + ‖b‖² − 2a·b, the form torch.cdist uses, without the padded copy of `x` that
    torch.cdist makes for every call (0.4 GB for VGG16's classifier)."""
    n = x.shape[0]
    if n <= CDIST_ROWS:
        return torch.sum(torch.abs(torch.cdist(x.unsqueeze(0), x.unsqueeze(0), p=2).squeeze(0)), dim=0)
    # buffers preallocated and reused: a fresh temporary per chunk leaves a heap hole per chunk (glibc)
    step = max(1, CHUNK_BYTES // (x.shape[1] * x.element_size()))
    squares, norms = x.new_empty(min(step, n), x.shape[1]), x.new_empty(n)
    for start in range(0, n, step):
        chunk = x[start:start + step]
        torch.sum(torch.square(chunk, out=squares[: len(chunk)]), dim=1, out=norms[start:start + step])
    del squares
    rows = max(1, CHUNK_BYTES // (n * x.element_size()))
    sums, distances = x.new_zeros(n), x.new_empty(rows, n)
    for part in (slice(start, start + rows) for start in range(0, n, rows)):
        squared = torch.add(norms[part, None], norms, out=distances[: len(norms[part])])
        sums += squared.addmm_(x[part], x.T, alpha=-2).clamp_min_(0).sqrt_().sum(dim=0)
    return sums


def _large_taylor(imp: Any, layer: nn.Module, prune_fn: Any, idxs: Sequence[int]) -> torch.Tensor | None:
    """Σ|w·g| (Σ(w·g) in absolute value when multivariable) of each row of a large slice, else None."""
    rows, grads = _weight_rows(imp, layer, prune_fn), _weight_rows(imp, layer, prune_fn, of="grad")
    if grads is None or not _is_large(rows, idxs):
        return None
    if imp.multivariable:
        return _chunked_rows(rows, idxs, lambda w, g: w.mul_(g).sum(1).abs(), grads)
    return _chunked_rows(rows, idxs, lambda w, g: w.mul_(g).abs_().sum(1), grads)


def _large_hessian(imp: Any, layer: nn.Module, prune_fn: Any, idxs: Sequence[int]) -> torch.Tensor | None:
    """Σ w²·h of each row of a large slice (h: the mean squared gradient in `.grad`), else None."""
    rows, grads = _weight_rows(imp, layer, prune_fn), _weight_rows(imp, layer, prune_fn, of="grad")
    if grads is None or not _is_large(rows, idxs):
        return None
    return _chunked_rows(rows, idxs, lambda w, h: w.square_().mul_(h).sum(1), grads)


LARGE_SLICE = {"GroupMagnitudeImportance": _large_magnitude, "LAMPImportance": _large_magnitude,
               "FPGMImportance": _fpgm_slice, "GroupTaylorImportance": _large_taylor,
               "GroupHessianImportance": _large_hessian}
"""The criteria whose large slices `_Bounded` computes in chunks, and how."""


@register("tp-bnscale", needs_data=False,
          description="torch-pruning BatchNorm scale |γ| (network slimming, Liu et al. 2017)")
class TPBNScale(TPScorer):
    """`BNScaleImportance`: |γ| of the BatchNorm after the conv (mean over BatchNorms in the group);
    [C], higher = keep. Refuses models without BatchNorm."""

    criterion = "BNScaleImportance"

    def check(self, model: nn.Module, *, classes: int, samples_per_class: int) -> None:
        """Refuse a model without BatchNorm, and one with a prunable conv (`prunable_convs`) whose
        group holds no affine BatchNorm (a squeeze-and-excitation conv, as in EfficientNet),
        naming the first such conv. Traced on a zero image (`probe_input`); where the model runs
        on none, or torch-pruning cannot trace or group a conv, the Surgeon or the scoring of
        that layer says so instead."""
        if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            raise ValueError("scorer 'tp-bnscale' needs BatchNorm layers and the model has none; "
                             "choose another scorer, e.g. --scorer tp-magnitude")
        example = probe_input(model)
        if example is None:
            return
        names = {m: n for n, m in model.named_modules()}
        with _held(model):  # torch-pruning traces through grad_fn and sets eval mode: both restored
            try:
                graph = dependency_graph(model, example)
            except Exception:  # noqa: BLE001 (whatever torch-pruning raises: the Surgeon reports it)
                return
            for conv in prunable_convs(model, example):
                items = _group_items(graph, conv)
                if items is not None and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine
                                                 for m in items):
                    raise ValueError(_no_batchnorm(names[conv]))

    def missing(self, layer: LayerSpec) -> str:
        return _no_batchnorm(layer.name)


def _group_items(graph: Any, conv: nn.Conv2d) -> list[nn.Module] | None:
    """The modules of `conv`'s pruning group (all its output channels) in torch-pruning's `graph`;
    None where torch-pruning cannot group the conv."""
    import torch_pruning as tp

    try:
        group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(conv.out_channels)))
    except Exception:  # noqa: BLE001 (whatever torch-pruning raises: the Surgeon reports it)
        return None
    return [dep.target.module for dep, _ in group]


def _no_batchnorm(name: str) -> str:
    """tp-bnscale's refusal of conv `name`, whose pruning group holds no BatchNorm."""
    return (f"tp-bnscale: conv {name!r} is followed by no BatchNorm with a learned scale γ (affine=True), so its "
            "channels have no scale to read; "
            "choose another scorer, e.g. --scorer tp-magnitude")


# ---------------------------------------------------------------- gradient criteria


def gradient_sums(model: nn.Module, images: torch.Tensor, label: int, *, squared: bool, into: Sums,
                  chunk: int = 32, names: Sequence[str] | None = None) -> None:
    """Add to `into` (running sums by parameter name, created as zeros where missing) the sum over
    `images` [N, 3, H, W] of ∇CE(model(x), label) (squared=False, `chunk` images a pass, fewer
    where one image's largest tensor times `chunk` passes PASS_BYTES: the backward holds the
    pass's activations; VGG16 at 224²: 2) or of (∇CE)² per image (squared=True, one image a pass),
    for the parameters `names` (default all).

    A parameter's class sum is formed first and then added to `into`, except a large Linear
    weight (`_large_linears`): its gradient δᵀx is never formed, each pass adds it to `into` in
    place (one GEMM) from the layer's input x and output gradient δ. Call inside `_held(model, names)`
    (eval mode, grad enabled, those parameters differentiable).
    """
    wanted = None if names is None else set(names)
    named = [(n, p) for n, p in model.named_parameters() if wanted is None or n in wanted]
    large = _large_linears(model, {n for n, _ in named})
    small = [(n, p) for n, p in named if n not in large]
    params = [p for _, p in small]
    device = model_device(model)
    for name, module in large.items():
        if name not in into:
            into[name] = torch.zeros_like(module.weight)
    sums = [torch.zeros_like(p) for p in params]
    images = images.to(device)
    per_pass = 1 if squared or len(images) == 0 else images_per_pass(model, images[:1], most=chunk)
    for part in images.split(per_pass):
        labels = torch.full((len(part),), int(label), dtype=torch.long, device=device)
        with _calls_of(large) as calls:
            loss = F.cross_entropy(model(part), labels, reduction="sum")
        grads = torch.autograd.grad(loss, [*params, *(y for _, _, y in calls)], allow_unused=True)
        for total, grad in zip(sums, grads):
            if grad is not None:
                total += grad.square() if squared else grad
        _add_linear_gradients(into, calls, grads[len(params):], squared=squared)
    for (name, _), total in zip(small, sums):
        if name in into:
            into[name] += total.to(into[name].device)
        else:
            into[name] = total


def _large_linears(model: nn.Module, names: set[str]) -> dict[str, nn.Linear]:
    """The nn.Linear modules (the class itself: a subclass may read its weight without its forward,
    as MultiheadAttention's out_proj) whose weight is among `names`, above CHUNK_BYTES (VGG16's
    first classifier layer: 25,088 × 4,096, 0.4 GB) and held by no other module (a tied weight's
    other uses would be missed), by the weight's parameter name."""
    named = {id(p): n for n, p in model.named_parameters() if n in names}
    holders = Counter(id(w) for m in model.modules() if isinstance(w := getattr(m, "weight", None), torch.Tensor))
    return {named[id(m.weight)]: m for m in model.modules()
            if type(m) is nn.Linear and id(m.weight) in named and holders[id(m.weight)] == 1
            and m.weight.numel() * m.weight.element_size() > CHUNK_BYTES}


@contextmanager
def _calls_of(linears: dict[str, nn.Linear]) -> Iterator[list[tuple[str, torch.Tensor, torch.Tensor]]]:
    """Records (weight name, input x [..., in], output y [..., out]) of each call of `linears`
    during a forward; the network reads a copy of y, so that an in-place op after the layer
    (VGG16's ReLU) leaves y's gradient ∂L/∂y to be asked for."""
    calls: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def record(name: str) -> Any:
        def hook(_module: nn.Module, args: tuple, kwargs: dict, y: torch.Tensor) -> torch.Tensor:
            calls.append((name, args[0] if args else kwargs["input"], y))
            return y.clone()
        return hook

    handles = [m.register_forward_hook(record(name), with_kwargs=True) for name, m in linears.items()]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def _add_linear_gradients(into: Sums, calls: Sequence[tuple[str, torch.Tensor, torch.Tensor]],
                          deltas: Sequence[torch.Tensor | None], *, squared: bool) -> None:
    """Add one pass's weight gradient Σ_calls δᵀx [out, in] of each recorded Linear to `into` in
    place; squared (one image a pass): its square, as (δ²)ᵀx² where the image is one row of x
    and the layer is called once (no gradient formed), else formed and squared."""
    for name in dict.fromkeys(name for name, _, _ in calls):
        pairs = [(x.reshape(-1, x.shape[-1]), d.reshape(-1, d.shape[-1]))
                 for (n, x, _), d in zip(calls, deltas) if n == name and d is not None]
        if not squared:
            for x, d in pairs:
                into[name].addmm_(d.T, x)
        elif len(pairs) == 1 and len(pairs[0][0]) == 1:
            into[name].addmm_(pairs[0][1].square().T, pairs[0][0].square())
        elif pairs:
            into[name] += sum(d.T @ x for x, d in pairs).square_()


class GradientScorer(ChunkedScorer, TPScorer):
    """A gradient criterion: sums per-class gradient statistics, then hands their mean over
    images to torch-pruning as `param.grad`. A class given in chunks has its gradient passes
    run when it ends, on all its images (the same passes as one whole-class update); the units
    in a batch are not read. Shards merge to the whole run's scores bit for bit, but for a large
    Linear weight (`_large_linears`), summed pass by pass: equal within float rounding there.
    compute() turns the sums into means in place: update, merge and state then need a reset."""

    squared: ClassVar[bool]
    reads_units = False

    def reset(self, layer: LayerSpec) -> None:
        super().reset(layer)
        self._sums: Sums = {}
        self._count = 0
        self._group_parameters: list[str] | None = None
        self._means = False

    def _still_sums(self) -> None:
        """Raise if compute() has turned the sums into means (the state cannot grow any more)."""
        if getattr(self, "_means", False):
            raise ValueError(f"{self.info.name}: compute() has turned the sums into means; call reset(layer) first")

    def per_image(self, batch: ClassBatch) -> torch.Tensor:
        """A chunk's images [n, 3, H, W], kept until the class ends."""
        self._still_sums()
        self.note_example(batch)
        return batch.images

    def reduce_class(self, class_index: int, stats: torch.Tensor) -> None:
        """One class's images [N, 3, H, W] → their gradient sums into the running sums."""
        if self._group_parameters is None:  # torch-pruning traces through grad_fn: every parameter differentiable
            with _held(self.layer.model):
                self.group_parameters()
        names = self.group_parameters()
        with _held(self.layer.model, differentiable=names):
            gradient_sums(self.layer.model, stats, class_index, squared=self.squared, into=self._sums, names=names)
        self._count += len(stats)

    def group_parameters(self) -> list[str]:
        """Names of the parameters of the modules in the layer's pruning group: the only gradients
        torch-pruning reads (summing every parameter's would hold two more copies of the model)."""
        if self._group_parameters is None:
            modules = {dep.target.module for dep, _ in pruning_group(self.layer, self._example)}
            own = [q for m in modules for q in ([m] if isinstance(m, nn.Parameter) else m.parameters(recurse=False))]
            self._group_parameters = [n for n, p in self.layer.model.named_parameters() if any(p is q for q in own)]
        return self._group_parameters

    def _add(self, sums: Sums, count: int) -> None:
        for name, value in sums.items():
            if name not in self._sums:  # on the model's device: merged states come from CPU
                self._sums[name] = torch.zeros_like(value, device=model_device(self.layer.model))
            self._sums[name] += value.to(self._sums[name].device)
        self._count += count

    def state(self) -> tuple[Sums, int, torch.Tensor | None]:
        """(gradient sums by parameter name on CPU, number of images, an image to trace on) so far.
        On CPU the sums are the scorer's own: take the state after the last update (as class
        sharding does, from a scorer reset per class); compute() divides them in place."""
        self._still_sums()
        self.end_class()
        return {n: s.cpu() for n, s in self._sums.items()}, self._count, self._example

    def merge(self, states: Sequence[tuple[Sums, int, torch.Tensor | None]]) -> None:
        self._still_sums()
        for sums, count, example in states:
            self._add(sums, count)
            if self._example is None:
                self._example = example

    def prepare(self) -> dict[str, torch.Tensor]:
        self.end_class()
        if getattr(self, "_count", 0) == 0:
            raise ValueError(f"{self.info.name}: no images seen; call update() with class batches")
        if not self._means:  # the sums become the means in place (VGG16: no second 0.4 GB copy)
            for total in self._sums.values():
                total.div_(self._count)
            self._means = True
        return dict(self._sums)


@register("tp-taylor", needs_data=True,
          description="torch-pruning first-order Taylor |w · ∂L/∂w| (Molchanov et al. 2019)")
class TPTaylor(GradientScorer):
    """`GroupTaylorImportance`: mean over the group's conv/linear slices of Σ|w·g|, g = ∂L/∂w of the
    mean cross-entropy over all scoring images (torch-pruning skips BatchNorm here); [C], higher = keep."""

    criterion = "GroupTaylorImportance"
    squared = False


@register("tp-hessian", needs_data=True,
          description="torch-pruning OBD: w² times the mean squared per-image gradient (LeCun et al. 1989)")
class TPHessian(GradientScorer):
    """`GroupHessianImportance`: mean over the group's layers (conv, BatchNorm γ, next layer) of
    Σ w²·h, h = mean over images of (∂CE_i/∂w)² (Fisher diagonal); [C], higher = keep.

    The per-image squared gradients are summed here, not by the library's `accumulate_grad`:
    in torch-pruning 1.6.0 that keys its sums by parameter but tests membership by name, so
    each call overwrites and only the last image would count. Its `__call__` then reads `h`
    from `param.grad`, as it does after its own accumulation.
    """

    criterion = "GroupHessianImportance"
    squared = True
