"""Any registered scorer as a torch-pruning importance (`tp.importance.Importance`).

    imp = prune.as_tp_importance("entropy", images=x, labels=y)
    pruner = tp.pruner.MetaPruner(model, example, importance=imp, pruning_ratio=0.5, iterative_steps=2)
    pruner.step()

For a group, every `nn.Conv2d` whose OUTPUT channels the group prunes (plain, grouped or
depthwise) is scored by the scorer on the model as it is at that call (units collected
afresh, after earlier steps' pruning); the group's score is the mean of its members'
scores (as the toolkit scores a residual group), one value per index of the group's root,
higher = keep. A group without such a conv (e.g. rooted at a Linear, or a ConvNeXt MLP) is
left to torch-pruning as unscorable: `__call__` returns None and MetaPruner skips it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch_pruning as tp
from torch import nn
from torch.utils.data import TensorDataset

import scoring
from prune.errors import UsageError, usage_errors
from prune.pipeline.selection import ScoringData, score_group
from prune.pipeline.surgery import PrunableGroup
from prune.zoo.data import DataBundle
from scoring.model_state import eval_mode, model_device

NORMALIZERS = (None, "mean", "max", "gaussian", "standarization")
"""Names as torch-pruning's importances name them (its `_normalize`)."""
DEFAULT_NORMALIZE = "gaussian"
"""How `as_tp_importance` (and the `global` allocation) make scores of different groups comparable."""
DEPRECATED_NORMALIZERS = {"standardize": "gaussian"}
"""Old name → its torch-pruning name; accepted with a DeprecationWarning for one release."""
_CONV_OUT = (tp.prune_conv_out_channels, tp.prune_depthwise_conv_out_channels)
_EPS = 1e-12


def normalize_scores(scores: torch.Tensor, how: str | None) -> torch.Tensor:
    """Order-preserving rescaling of one group's scores [C] (higher = keep stays higher).

    None: unchanged. "mean": s / mean|s|. "max": s / max|s|. "gaussian": (s − mean) / std (a
    z-score with the sample std). "standarization": (s − min) / (max − min), in [0, 1]. The names and the last two
    formulas are torch-pruning's; dividing by |·| keeps the order for negative scores (entropy's
    −H) too. "standardize" (the old name of "gaussian") still works, with a DeprecationWarning.
    """
    how = _current_name(how)
    s = scores.double()
    if how is None:
        out = s
    elif how == "mean":
        out = s / s.abs().mean().clamp_min(_EPS)
    elif how == "max":
        out = s / s.abs().max().clamp_min(_EPS)
    elif how == "gaussian":
        std = s.std() if len(s) > 1 else s.new_zeros(())  # the sample std, as torch-pruning's
        out = (s - s.mean()) / std.clamp_min(_EPS)
    elif how == "standarization":
        out = (s - s.min()) / (s.max() - s.min()).clamp_min(_EPS)
    else:
        raise UsageError(f"normalize={how!r} is unknown; use one of {NORMALIZERS}")
    return out.float()


def _current_name(how: str | None) -> str | None:
    """`how`, with a deprecated name replaced by its torch-pruning name (and a DeprecationWarning)."""
    if isinstance(how, str) and how in DEPRECATED_NORMALIZERS:
        new = DEPRECATED_NORMALIZERS[how]
        warnings.warn(f"normalize={how!r} is now called {new!r} (torch-pruning's name); the old name will go",
                      DeprecationWarning, stacklevel=3)
        return new
    return how


def checked_labels(labels: torch.Tensor | Sequence[int], n: int, num_classes: int | None = None) -> torch.Tensor:
    """`labels` as a 1-D int64 tensor [n] of class indices in 0..num_classes-1 (any
    non-negative index if `num_classes` is None); UsageError naming the fix otherwise."""
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise UsageError(f"labels must be a 1-D integer tensor [N] of class indices, got shape {tuple(labels.shape)} "
                         f"of {labels.dtype}; pass e.g. torch.tensor([0, 1, 1, 2])")
    if len(labels) != n:
        raise UsageError(f"{n} images but {len(labels)} labels; pass one label per image")
    if n == 0 or int(labels.min()) < 0:
        raise UsageError("labels must be non-negative class indices, at least one image")
    if num_classes is not None and int(labels.max()) >= num_classes:
        raise UsageError(f"label {int(labels.max())} is outside the model's {num_classes} classes; "
                         f"pass class indices in 0..{num_classes - 1}")
    return labels.long()


def _scoring_source(images: torch.Tensor, labels: torch.Tensor | Sequence[int], batch_size: int,
                    num_classes: int | None = None) -> ScoringData:
    """A ScoringData over in-memory `images` [N, 3, H, W] and `labels` [N] (`checked_labels`).

    Every class contributes the same number n of images (the count of its smallest class;
    larger classes give a seeded choice of n), as feature entropy's ln N rule assumes one N.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise UsageError(f"images must be [N, 3, H, W]; got shape {tuple(images.shape)}")
    labels = checked_labels(labels, len(images), num_classes)
    classes = sorted(set(labels.tolist()))
    per_class = min(int((labels == c).sum()) for c in classes)
    data = DataBundle(
        train=TensorDataset(images.detach().float().cpu(), labels),
        val=TensorDataset(images[:0], labels[:0]),
        classes=tuple(str(c) for c in range(int(labels.max()) + 1)),
        train_targets=tuple(labels.tolist()),
        input_size=int(images.shape[-1]),
    )
    return ScoringData(data=data, classes=classes, per_class=per_class, seed=0, batch_size=batch_size)


class ScorerImportance(tp.importance.Importance):
    """A registered scorer answering torch-pruning's `importance(group) -> [len(group[0].idxs)]`.

    The group's model is `group._DG.model` (the graph the pruner built). The model is scored
    in eval mode (BatchNorm statistics untouched) and its train/eval flags are restored.
    On the first call for a model the labels are checked against its classes (the logits
    of `example`): UsageError if one is outside 0..num_classes-1.
    """

    def __init__(
        self, scorer: scoring.Scorer, source: ScoringData | None, normalize: str | None,
        example: torch.Tensor | None = None,
    ) -> None:
        normalize = _current_name(normalize)
        if normalize not in NORMALIZERS:
            raise UsageError(f"normalize={normalize!r} is unknown; use one of {NORMALIZERS}")
        self.scorer = scorer
        self.source = source
        self.normalize = normalize
        self.example = example
        self._checked: set[int] = set()

    def _check_labels(self, model: nn.Module) -> None:
        """UsageError if a label is not one of `model`'s classes (once per model)."""
        if self.source is None or self.example is None or id(model) in self._checked:
            return
        logits = model(self.example.to(model_device(model)))
        if isinstance(logits, torch.Tensor) and logits.dim() == 2:
            checked_labels(torch.as_tensor(self.source.data.train_targets), len(self.source.data.train_targets),
                           int(logits.shape[1]))
        self._checked.add(id(model))

    @staticmethod
    def members(group: tp.dependency.Group) -> list[tuple[nn.Conv2d, list[int], list[int]]]:
        """(conv, its idxs, the matching root idxs) of each conv whose output channels `group` prunes."""
        found = []
        for item in group:
            module = item.dep.target.module
            if isinstance(module, nn.Conv2d) and item.dep.handler in _CONV_OUT:
                found.append((module, list(item.idxs), list(item.root_idxs)))
        return found

    @torch.no_grad()
    def __call__(self, group: tp.dependency.Group) -> torch.Tensor | None:
        members = self.members(group)
        if not members:
            return None
        model = group._DG.model
        names = {m: n for n, m in model.named_modules()}
        position = {int(r): k for k, r in enumerate(group[0].idxs)}
        total = torch.zeros(len(position), dtype=torch.float64)
        count = torch.zeros(len(position), dtype=torch.float64)
        with eval_mode(model):
            self._check_labels(model)
            for conv, idxs, root_idxs in members:
                one = PrunableGroup(names=(names[conv],), convs=(conv,))
                scores = score_group(model, one, self.scorer, self.source, example=self.example).double()
                for i, r in zip(idxs, root_idxs):
                    if r is not None and int(r) in position:
                        total[position[int(r)]] += scores[i]
                        count[position[int(r)]] += 1
        return normalize_scores(total / count.clamp_min(1), self.normalize)


def as_tp_importance(
    name: str,
    *,
    images: torch.Tensor | None,
    labels: torch.Tensor | Sequence[int] | None,
    normalize: str | None = DEFAULT_NORMALIZE,
    batch_size: int = 128,
    example: torch.Tensor | None = None,
    num_classes: int | None = None,
    **options,
) -> ScorerImportance:
    """Registered scorer `name` as a torch-pruning importance; higher = keep.

    images [N, 3, H, W] (as the model takes them) and labels [N] (1-D integer class indices,
    each below `num_classes` if given, else below the model's output count, checked at the
    first call; UsageError otherwise) feed the data-driven scorers; weight scorers (l1, fpgm,
    random) accept None for both. `options` go to `scoring.create(name, **options)` (e.g.
    p=0.1 for entropy). example [1, 3, H, W]: an
    input the model takes, which torch-pruning's own criteria (tp-*) trace the model on;
    default images[:1] (pass it for tp-magnitude, tp-lamp, tp-fpgm, tp-bnscale without images).

    normalize (per group, order-preserving, named as torch-pruning names them): None | "mean" |
    "max" | "gaussian" (default, a z-score) | "standarization" (min-max, [0, 1]).
    Within a group it never changes which channels are lowest, so local pruning (MetaPruner's
    default) is the same for every choice. It matters for `global_pruning=True`, where scores
    of different layers are ranked together and raw values are rarely comparable: entropy is
    in nats, bounded by ln N and shaped by the map size m (deep 2×2 maps have no births at
    all); l1 grows with fan-in (C_in·k²); fpgm with the layer's width; apoz and selectivity
    lie in [0, 1] but their spread differs by depth; random has no scale. "gaussian" puts
    every group at mean 0, std 1 (a z-score), meaningful for any scorer and sign; None keeps
    the scorer's raw values (use it for local pruning or to compare with the scorer itself).
    """
    with usage_errors():
        scorer = scoring.create(name, **options)
    source = None
    if images is not None or labels is not None:
        if images is None or labels is None:
            raise UsageError("pass both images= and labels= (or neither, for a weight scorer)")
        source = _scoring_source(images, labels, batch_size, num_classes)
    elif scorer.info.needs_data:
        raise UsageError(f"scorer {name!r} needs data: pass images=[N, 3, H, W] and labels=[N]")
    if example is None and images is not None:
        example = images[:1]
    return ScorerImportance(scorer, source, normalize, example)
