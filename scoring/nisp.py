"""`nisp`: neuron importance score propagation (Yu et al. 2018).

1. Score the F features that feed the model's classifier (the input of its last nn.Linear)
   with Infinite Feature Selection, Inf-FS (Roffo et al. 2015), over every class batch given.
2. Propagate the scores back to the scored conv's output channels with s_k = |W_{k+1}|ᵀ s_{k+1}
   (paper Eq. 14), as a vector–Jacobian product through a linearised absolute copy of the model.

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

import copy

import torch
from torch import nn

from scoring.base import ClassBatch, LayerSpec
from scoring.chunked import ChunkedScorer
from scoring.hooks import capture, run_until_stopped
from scoring.model_state import eval_mode, model_device
from scoring.registry import register

_IDENTITY_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
)  # fmt: skip


# ---------------------------------------------------------------- Inf-FS (Roffo et al. 2015)


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Column-wise ranks of [N, F] starting at 1, ties get their average rank → [N, F]."""
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
    """Pearson correlation of the columns of [N, F] → [F, F]; constant columns give 0."""
    centred = x - x.mean(dim=0)
    centred[:, (x == x[0]).all(dim=0)] = 0.0  # exact zeros, not rounding noise
    norms = centred.norm(dim=0)
    corr = (centred.T @ centred) / torch.outer(norms, norms)
    return torch.nan_to_num(corr, nan=0.0, posinf=0.0, neginf=0.0)


def inf_fs_scores(
    features: torch.Tensor, *, alpha: float = 0.5, correlation: str = "spearman"
) -> torch.Tensor:
    """Inf-FS feature scores (Roffo et al. 2015, unsupervised) for [N, F] → [F], higher = keep.

    σ_ij = max(σ_i, σ_j), σ the per-feature std, min–max normalised over the matrix;
    c_ij = 1 − |corr_ij| (Spearman, or Pearson), undefined corr → 0;
    a_ij = α σ_ij + (1 − α) c_ij (diagonal included, as the authors' code);
    r = 0.9 / ρ(A); S = (I − rA)^{-1} − I = Σ_{l≥1} (rA)^l; score = S · 1. F×F, float64.
    """
    if correlation not in ("spearman", "pearson"):
        raise ValueError(f"correlation must be 'spearman' or 'pearson', got {correlation!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    x = features.to(torch.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"Inf-FS needs features [N >= 2, F], got {list(x.shape)}")
    std = x.std(dim=0)
    sigma = torch.maximum(std.unsqueeze(0), std.unsqueeze(1))
    sigma = torch.nan_to_num((sigma - sigma.min()) / (sigma.max() - sigma.min()), nan=0.0)
    ranked = average_ranks(x) if correlation == "spearman" else x
    corr = 1.0 - correlation_matrix(ranked).abs()
    a = alpha * sigma + (1.0 - alpha) * corr
    rho = torch.linalg.eigvalsh(a).abs().max()
    ones = torch.ones(a.shape[0], 1, dtype=torch.float64, device=a.device)
    if rho <= 0:
        return torch.zeros(a.shape[0], dtype=torch.float64, device=a.device)
    eye = torch.eye(a.shape[0], dtype=torch.float64, device=a.device)
    return (torch.linalg.solve(eye - (0.9 / rho) * a, ones) - ones).squeeze(1)


# ---------------------------------------------------------------- score propagation


class _ChannelScale(nn.Module):
    """Multiply dim 1 of the input by a fixed non-negative vector [C] (a frozen BatchNorm)."""

    def __init__(self, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.reshape(1, -1, *([1] * (x.ndim - 2)))


def _linear_counterpart(module: nn.Module) -> nn.Module | None:
    """A replacement for `module` in the linearised copy, or None to keep it (maybe edited)."""
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


def linearised_copy(model: nn.Module) -> nn.Module:
    """A float64 eval-mode deep copy of `model` made linear with |W| (see the module doc)."""
    device = model_device(model)
    net = copy.deepcopy(model).eval()
    for module in net.modules():
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
    for name, module in list(net.named_modules()):
        replacement = _linear_counterpart(module)
        if replacement is not None and name:
            parent_name, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent_name), child, replacement)
    return net.to(device=device, dtype=torch.float64)


def last_linear(model: nn.Module) -> nn.Linear:
    """The model's classifier: its last registered nn.Linear."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("nisp: the model has no nn.Linear classifier; use another scorer")
    return linears[-1]


def _run_to_classifier(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Forward `images` up to the classifier; its input flattened to [N, F]."""
    with capture(last_linear(model), inputs=True) as seen:
        run_until_stopped(model, images)
    if not seen:
        raise ValueError("nisp: the model's last nn.Linear was not called in forward()")
    return seen[0].flatten(1)


def propagate_scores(
    layer: LayerSpec, feature_scores: torch.Tensor, input_shape: torch.Size
) -> torch.Tensor:
    """NISP scores [C] of `layer.conv`'s output channels from classifier-input scores [F].

    s_conv = J_linᵀ s over the linearised copy (s_k = |W_{k+1}|ᵀ s_{k+1} per layer), summed over
    the conv's output positions. `input_shape` is one network input's shape, e.g. [1, 3, H, W].
    """
    net = linearised_copy(layer.model)
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
    device = model_device(net)
    dummy = torch.ones(1, *input_shape[1:], dtype=torch.float64, device=device)
    with torch.enable_grad():
        features = _run_to_classifier(net, dummy)
        if features.shape[1] != feature_scores.numel():
            raise ValueError(
                f"nisp: classifier input has {features.shape[1]} features but "
                f"{feature_scores.numel()} scores were given"
            )
        s = feature_scores.to(device=device, dtype=torch.float64)
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
    A class given in chunks is forwarded when it ends, in one pass over its images.
    """

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
        the model's classifier, its last nn.Linear."""
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
        """A chunk's images [n, 3, H, W]: the forward to the classifier runs on the whole class
        (`reduce_class`), so the features are those of one pass over the class's images."""
        return batch.images

    @torch.no_grad()
    def reduce_class(self, class_index: int, stats: torch.Tensor) -> None:
        """One class's images [N, 3, H, W] → classifier-input features [N, F] into the sample."""
        model = self.layer.model
        device = model_device(model)
        with eval_mode(model):
            feats = _run_to_classifier(model, stats.to(device)).float().cpu()
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


