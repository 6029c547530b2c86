"""`nisp`: neuron importance score propagation (Yu et al. 2018).

1. Score the F features that feed the model's classifier (the input of the last nn.Linear its forward runs)
   with Infinite Feature Selection, Inf-FS (Roffo et al. 2015), over every class batch given.
2. Propagate the scores back to the scored conv's output channels with s_k = |W_{k+1}|ᵀ s_{k+1}
   (paper Eq. 14), as a vector–Jacobian product through a linearised absolute copy of the model
   (float32; float64 where a product of |W| overflows float32).

Linearised copy (choices):
- conv / linear: weight |W|, bias 0;
- BatchNorm: multiplication by |γ| / sqrt(running_var + eps) per channel (the |W| of the
  diagonal linear map BN is in eval mode); GroupNorm/LayerNorm/LocalResponseNorm: identity;
- ReLU-like activations and Dropout: identity;
- MaxPool2d: sum pooling over the same windows (AvgPool2d with divisor 1), so every input of
  a window receives the window's full score; AdaptiveMaxPool2d: AdaptiveAvgPool2d;
  average pooling, flatten and reshapes: themselves (they are already linear, weights ≥ 0);
- residual additions pass the score to both branches, as NISP intends.
The copy runs on an all-ones input, so every value is positive and functional ReLUs in a
model's forward() also pass scores through; functional max pooling is not linearised.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Container
from typing import Any

import torch
from torch import nn

from scoring.base import ClassBatch, LayerSpec
from scoring.chunked import ChunkedScorer
from scoring.hooks import capture, images_per_pass, last_run, run_until_stopped
from scoring.model_state import eval_mode, model_device
from scoring.registry import register

_IDENTITY_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
)  # fmt: skip
BLOCK_BYTES = 32 * 2**20
"""Most bytes of one float64 block of a linear layer's |W| in the linearised copy."""


# ---------------------------------------------------------------- Inf-FS (Roffo et al. 2015)


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Column-wise ranks of [N, F] starting at 1, ties get their average rank → [N, F] float64.

    A block of columns at a time (their ranks are independent), so that the sort's indices and
    the block bounds are held for one block, not for all F columns."""
    ranks = torch.empty(x.shape, dtype=torch.float64, device=x.device)
    columns = max(1, BLOCK_BYTES // (8 * 8 * max(x.shape[0], 1)))  # ~8 temporaries per block
    for start in range(0, x.shape[1], columns):
        ranks[:, start : start + columns] = _column_ranks(x[:, start : start + columns])
    return ranks


def _column_ranks(x: torch.Tensor) -> torch.Tensor:
    """`average_ranks` of one block of columns [N, f] → [N, f] float64."""
    n = x.shape[0]
    values, order = x.sort(dim=0, stable=True)
    pos = torch.arange(n, dtype=torch.float64, device=x.device).unsqueeze(1).expand_as(values)
    new_block = torch.ones_like(values, dtype=torch.bool)
    new_block[1:] = values[1:] != values[:-1]
    start = torch.where(new_block, pos, torch.zeros_like(pos)).cummax(dim=0).values
    last = torch.ones_like(new_block)
    last[:-1] = new_block[1:]
    end = torch.where(last, pos, torch.full_like(pos, n)).flip(0).cummin(dim=0).values.flip(0)
    ranks = torch.empty_like(pos)
    ranks.scatter_(0, order, (start + end) / 2 + 1)
    return ranks


def correlation_matrix(x: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of the columns of [N, F] → [F, F]; constant columns give 0.

    Normalised in place, a block of rows at a time (one F×F matrix and a block, not four F×F)."""
    centred = x - x.mean(dim=0)
    centred[:, (x == x[0]).all(dim=0)] = 0.0  # exact zeros, not rounding noise
    norms = centred.norm(dim=0)
    corr = centred.T @ centred
    for rows in _row_slices(*corr.shape):
        corr[rows] /= torch.outer(norms[rows], norms)
    return corr.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def _row_slices(rows: int, width: int) -> list[slice]:
    """Slices of a matrix [rows, width] into blocks of rows of at most BLOCK_BYTES in float64."""
    step = max(1, BLOCK_BYTES // (8 * max(width, 1)))
    return [slice(i, i + step) for i in range(0, rows, step)]


def inf_fs_scores(
    features: torch.Tensor, *, alpha: float = 0.5, correlation: str = "spearman"
) -> torch.Tensor:
    """Inf-FS feature scores (Roffo et al. 2015, unsupervised) for [N, F] → [F], higher = keep.

    σ_ij = max(σ_i, σ_j), σ the per-feature std, min–max normalised over the matrix;
    c_ij = 1 − |corr_ij| (Spearman, or Pearson), undefined corr → 0;
    a_ij = α σ_ij + (1 − α) c_ij (diagonal included, as the authors' code);
    r = 0.9 / ρ(A); S = (I − rA)^{-1} − I = Σ_{l≥1} (rA)^l; score = S · 1. F×F, float64, built in
    place, bit-identical to the plain formulas: at most two F×F matrices at once (A, and the
    copy eigvalsh or solve makes of it), not six.
    """
    if correlation not in ("spearman", "pearson"):
        raise ValueError(f"correlation must be 'spearman' or 'pearson', got {correlation!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    x = features.to(torch.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"Inf-FS needs features [N >= 2, F], got {list(x.shape)}")
    std = x.std(dim=0)
    # min-max normalising is monotone, so the normalised max(σ_i, σ_j) is the max of normalised σ
    spread = torch.nan_to_num((std - std.min()) / (std.max() - std.min()), nan=0.0)
    ranked = average_ranks(x) if correlation == "spearman" else x
    del x  # [N, F] float64: not held while the F×F matrices are
    a = correlation_matrix(ranked).abs_().neg_().add_(1.0).mul_(1.0 - alpha)  # (1 − α)(1 − |corr|)
    del ranked
    for rows in _row_slices(*a.shape):
        a[rows] += torch.maximum(spread[rows].unsqueeze(1), spread.unsqueeze(0)).mul_(alpha)
    rho = torch.linalg.eigvalsh(a).abs().max()
    ones = torch.ones(a.shape[0], 1, dtype=torch.float64, device=a.device)
    if rho <= 0:
        return torch.zeros(a.shape[0], dtype=torch.float64, device=a.device)
    a.mul_(0.9 / rho).neg_().diagonal().add_(1.0)  # I − rA
    return (torch.linalg.solve(a, ones) - ones).squeeze(1)


# ---------------------------------------------------------------- score propagation


class _ChannelScale(nn.Module):
    """Multiply dim 1 of the input by a fixed non-negative vector [C] (a frozen BatchNorm)."""

    def __init__(self, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.reshape(1, -1, *([1] * (x.ndim - 2)))


class _AbsMatmul(torch.autograd.Function):
    """x [..., in] → x |W|ᵀ [..., out] in x's dtype for a weight W [out, in] of any dtype, forward
    and backward in blocks of rows of W, so that no copy of W in x's dtype is made whole."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.weight = weight
        return torch.cat([x @ weight[rows].abs().to(x).T for rows in _row_slices(*weight.shape)], dim=-1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        out = torch.zeros(*grad.shape[:-1], ctx.weight.shape[1], dtype=grad.dtype, device=grad.device)
        for rows in _row_slices(*ctx.weight.shape):
            out += grad[..., rows] @ ctx.weight[rows].abs().to(grad)
        return out, None


class _AbsLinear(nn.Module):
    """A linear map by |W|, no bias, of the model's own weight W [out, in] (held, not copied:
    a plain attribute, so `.to()` on the copy leaves the model's weight as it is)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight_of_model = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _AbsMatmul.apply(x, self.weight_of_model)


def _linear_counterpart(module: nn.Module, read_in_place: Container[int]) -> nn.Module | None:
    """A replacement for `module` in the linearised copy, or None to keep it (maybe edited);
    a linear layer whose weight's id is in `read_in_place` reads the model's own weight."""
    if isinstance(module, nn.Linear) and id(module.weight) in read_in_place:
        return _AbsLinear(module.weight.detach())
    if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
        module.weight.data.abs_()
        if module.bias is not None:
            module.bias.data.zero_()
        return None
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        gamma = module.weight.detach().abs().cpu() if module.affine else 1.0
        var = module.running_var
        if var is None:  # no running statistics: scale by |γ| alone
            var = torch.full((module.num_features,), 1.0 - module.eps)
        return _ChannelScale((gamma / torch.sqrt(var.cpu() + module.eps)).detach().cpu().clone())
    if isinstance(module, _IDENTITY_MODULES):
        return nn.Identity()
    if isinstance(module, nn.MaxPool2d):
        if module.dilation not in (1, (1, 1)):
            raise ValueError("nisp: dilated MaxPool2d is not supported; use a model without it")
        return nn.AvgPool2d(
            module.kernel_size, module.stride, module.padding, module.ceil_mode,
            count_include_pad=True, divisor_override=1,
        )  # fmt: skip
    if isinstance(module, nn.AdaptiveMaxPool2d):
        return nn.AdaptiveAvgPool2d(module.output_size)
    return None


def linearised_copy(model: nn.Module, dtype: torch.dtype = torch.float64) -> nn.Module:
    """An eval-mode copy of `model` in `dtype` made linear with |W| (see the module doc), with no
    parameter that requires grad. A plain nn.Linear whose weight passes BLOCK_BYTES in float64
    reads the model's own weight (`_AbsLinear`) instead of holding a copy (VGG16's first
    classifier layer, 25,088 × 4,096: 0.8 GB in float64); every other module is copied."""
    device = model_device(model)
    shared = {id(m.weight): m.weight for m in model.modules()
              if type(m) is nn.Linear and m.weight.numel() * 8 > BLOCK_BYTES}
    net = copy.deepcopy(model, memo=dict(shared)).eval()  # those weights are not copied
    for module in net.modules():
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
    replacements: dict[int, nn.Module | None] = {}  # one per module, under each of its names
    for name, module in list(net.named_modules(remove_duplicate=False)):
        if id(module) not in replacements:
            replacements[id(module)] = _linear_counterpart(module, shared)
        replacement = replacements[id(module)]
        if replacement is not None and name:
            parent_name, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent_name), child, replacement)
    if any(p is w for p in net.parameters() for w in shared.values()):
        raise ValueError("nisp: a linear layer's weight is also used outside it; use another scorer")
    return net.to(device=device, dtype=dtype).requires_grad_(False)


def last_linear(model: nn.Module, image: torch.Tensor) -> nn.Module:
    """The model's classifier: the last nn.Linear (or its linearised counterpart) a forward of
    `image` [1, 3, H, W] runs, wherever `__init__` registered it."""
    head = last_run(model, image, (nn.Linear, _AbsLinear))
    if head is None:
        raise ValueError("nisp: the model's forward runs no nn.Linear classifier; use another scorer")
    return head


def _run_to_classifier(model: nn.Module, images: torch.Tensor, head: nn.Module) -> torch.Tensor:
    """Forward `images` up to the classifier `head`; its input flattened to [N, F]."""
    with capture(head, inputs=True) as seen:
        run_until_stopped(model, images)
    if not seen:
        raise ValueError("nisp: the model's classifier was not called in forward() for these images")
    return seen[0].flatten(1)


def _classifier_inputs(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Classifier inputs [N, F] float32 CPU of `images` [N, 3, H, W], in passes of
    `images_per_pass` (measured on the first image, so the passes depend on the model and the
    image size only, never on chunking): a whole class of every shipped testbed in one pass."""
    head = last_linear(model, images[:1])
    if len(images) == 0:
        return _run_to_classifier(model, images, head).float().cpu()
    step = images_per_pass(model, images[:1])
    return torch.cat([_run_to_classifier(model, images[i : i + step], head).float().cpu()
                      for i in range(0, len(images), step)])


def propagate_scores(layer: LayerSpec, feature_scores: torch.Tensor, input_shape: torch.Size) -> torch.Tensor:
    """NISP scores [C] float64 of `layer.conv`'s output channels from classifier-input scores [F].

    s_conv = J_linᵀ s over the linearised copy (s_k = |W_{k+1}|ᵀ s_{k+1} per layer), summed over
    the conv's output positions. `input_shape` is one network input's shape, e.g. [1, 3, H, W].
    Computed in float32 (within ~1e-7 of float64, the same order on VGG16 at 224²), again in
    float64 where a product of |W| passes float32's range: CPU convolutions in float64 take a
    slow path whose buffers cost VGG16 at 224² 0.98 GB more than float32's 0.2 GB.
    """
    for dtype in (torch.float32, torch.float64):
        scores = _propagate(layer, feature_scores, input_shape, dtype)
        if _within_range(scores):
            break
    return scores.double()


def _full_float32() -> contextlib.AbstractContextManager:
    """cuDNN convolutions in full float32 inside (PyTorch lets them use TF32, ~1e-3 relative)."""
    cudnn = torch.backends.cudnn
    return cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                       allow_tf32=False)


def _within_range(scores: torch.Tensor) -> bool:
    """Whether float32 `scores` neither overflowed nor came within 24 bits of underflow (where
    float32 loses precision; 0 stays a valid score: a unit whose weights feed nothing)."""
    tiny = torch.finfo(torch.float32).tiny * 2.0**24
    return bool(torch.isfinite(scores).all() and not ((scores != 0) & (scores.abs() < tiny)).any())


def _propagate(
    layer: LayerSpec, feature_scores: torch.Tensor, input_shape: torch.Size, dtype: torch.dtype
) -> torch.Tensor:
    """`propagate_scores` computed in `dtype` → [C] of that dtype (inf where it overflows)."""
    net = linearised_copy(layer.model, dtype)
    device = model_device(net)
    dummy = torch.ones(1, *input_shape[1:], dtype=dtype, device=device)
    head = last_linear(net, dummy)
    leaves: list[torch.Tensor] = []

    def make_leaf(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        leaf = torch.ones_like(out).requires_grad_(True)
        leaves.append(leaf)
        return leaf

    try:
        conv = net.get_submodule(layer.name)
    except AttributeError as err:
        raise ValueError(f"nisp: the model has no module named {layer.name!r}") from err
    conv.register_forward_hook(make_leaf)
    with torch.enable_grad(), _full_float32():
        features = _run_to_classifier(net, dummy, head)
        if features.shape[1] != feature_scores.numel():
            raise ValueError(
                f"nisp: classifier input has {features.shape[1]} features but "
                f"{feature_scores.numel()} scores were given"
            )
        s = feature_scores.to(device=device, dtype=dtype)
        grads = torch.autograd.grad((features[0] * s).sum(), leaves, allow_unused=True)
    grads = [g for g in grads if g is not None]
    if not grads:
        raise ValueError(f"nisp: layer {layer.name!r} does not reach the classifier input")
    return sum(g[0].flatten(1).sum(dim=1) for g in grads).detach().cpu()


# ---------------------------------------------------------------- scorer


@register(
    "nisp",
    needs_data=True,
    description="Inf-FS score of the classifier input propagated back with |W| (Yu et al. 2018)",
)
class NISPScorer(ChunkedScorer):
    """NISP importance of each output channel; [C], float32, higher = keep.

    Options:
      alpha (0.5): Inf-FS weight of the std term against the correlation term.
      correlation ("spearman"): "spearman" (as Roffo et al.) or "pearson".
      max_samples (4096): feature vectors kept for Inf-FS; beyond it a seeded reservoir
        sample of that size is kept (uniform over all images seen).
      max_features (8192): largest classifier input F allowed; Inf-FS needs F×F float64
        matrices and an F×F eigen-decomposition, so larger F raises ValueError.
      seed (0): seed of the reservoir sample.
      normalize (True): divide the layer's scores by their maximum. Ranking-neutral; keeps
        deep products of |W| inside float32 and makes layers comparable in a residual group.
    A class given in chunks is forwarded when it ends, in the same passes however it was chunked
    (`_classifier_inputs`); the units in a batch are not read.
    """

    reads_units = False

    def __init__(
        self,
        *,
        alpha: float = 0.5,
        correlation: str = "spearman",
        max_samples: int = 4096,
        max_features: int = 8192,
        seed: int = 0,
        normalize: bool = True,
    ) -> None:
        if correlation not in ("spearman", "pearson"):
            raise ValueError(
                f"nisp: correlation must be 'spearman' or 'pearson', got {correlation!r}"
            )
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"nisp: alpha must be in [0, 1], got {alpha!r}")
        if max_samples < 2 or max_features < 1:
            raise ValueError("nisp: max_samples must be >= 2 and max_features >= 1")
        self.alpha = alpha
        self.correlation = correlation
        self.max_samples = max_samples
        self.max_features = max_features
        self.seed = seed
        self.normalize = normalize

    def check(self, model: nn.Module, *, classes: int, samples_per_class: int) -> None:
        """Inf-FS needs at least 2 images in all (correlations); the features are the input of
        the model's classifier, the last nn.Linear its forward runs."""
        if classes * samples_per_class < 2:
            raise ValueError(f"scorer 'nisp' needs at least 2 scoring images, got {classes * samples_per_class}; "
                             "pass --classes 2 or more or --samples-per-class 2 or more, or choose another --scorer")
        if not any(isinstance(m, nn.Linear) for m in model.modules()):
            raise ValueError(f"scorer 'nisp' scores the input of the classifier, an nn.Linear, and "
                             f"{type(model).__name__} has none; choose another --scorer, e.g. --scorer l1")

    def reset(self, layer: LayerSpec) -> None:
        super().reset(layer)
        self._sample: torch.Tensor | None = None  # [n <= max_samples, F] float32 CPU
        self._seen = 0
        self._input_shape: torch.Size | None = None
        self._generator = torch.Generator().manual_seed(self.seed)

    def per_image(self, batch: ClassBatch) -> torch.Tensor:
        """A chunk's images [n, 3, H, W]: the forward to the classifier runs when the class ends
        (`reduce_class`), in passes that do not depend on how the class was chunked."""
        return batch.images

    @torch.no_grad()
    def reduce_class(self, class_index: int, stats: torch.Tensor) -> None:
        """One class's images [N, 3, H, W] → classifier-input features [N, F] into the sample."""
        model = self.layer.model
        device = model_device(model)
        with eval_mode(model):
            feats = _classifier_inputs(model, stats.to(device))
        if feats.shape[1] > self.max_features:
            raise ValueError(
                f"nisp: the classifier input has {feats.shape[1]} features (> max_features="
                f"{self.max_features}); Inf-FS needs {feats.shape[1]}² floats: raise "
                "max_features if memory allows, or choose another scorer"
            )
        if not torch.isfinite(feats).all():
            raise ValueError("nisp: NaN/Inf classifier features; check the model and inputs")
        self._input_shape = stats.shape
        self._add_to_sample(feats)

    def _add_to_sample(self, feats: torch.Tensor) -> None:
        """Reservoir sampling (algorithm R) of the rows of feats [n, F]."""
        room = max(self.max_samples - (0 if self._sample is None else len(self._sample)), 0)
        head, tail = feats[:room], feats[room:]
        self._sample = head.clone() if self._sample is None else torch.cat([self._sample, head])
        self._seen += len(head)
        for row in tail:
            j = int(torch.randint(self._seen + 1, (1,), generator=self._generator))
            if j < self.max_samples:
                self._sample[j] = row
            self._seen += 1

    def compute(self) -> torch.Tensor:
        self.end_class()
        if getattr(self, "_sample", None) is None or self._seen < 2:
            raise ValueError("nisp: needs at least 2 images; call update() with class batches")
        scores = inf_fs_scores(self._sample, alpha=self.alpha, correlation=self.correlation)
        channel_scores = propagate_scores(self.layer, scores, self._input_shape)
        top = channel_scores.max()
        if self.normalize and top > 0:
            channel_scores = channel_scores / top
        return channel_scores.float()


