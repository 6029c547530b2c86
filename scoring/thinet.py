"""ThiNet (Luo et al., ICCV 2017): remove the channels whose removal changes the *next* layer's
output least, chosen greedily; score = the order in which the greedy step discards them.

The next layer ("consumers"): every nn.Conv2d or nn.Linear whose input channels torch-pruning
removes together with the layer's output channels (the in-channel members of the layer's
pruning group, traced on `layer.example` or the first scoring image). That is the next conv in a
plain net; after a residual addition, every conv and the classifier that read the sum (pruning
channel c removes it from every member of the addition, so input channel c of each reader
vanishes); the classifier after pooling and flatten, whose input features are mapped back to
the channel they come from (as the reference handles fc6 after conv5_3). Other readers
(ConvTranspose, attention) are not measured. A layer with no conv or linear consumer is refused
in one line (also up front by `check`, before a run writes anything).

Samples (as the reference: 10 locations per image). Per image, `samples` triples (image, output
unit of a consumer, output location), the unit uniform over the consumers' output channels
(their concatenation), the location uniform over that consumer's output positions (one for an
[N, F] Linear input). A triple's contribution vector x̂ [C]: x̂_c = Σ_{i→c} Σ_k W[o, i, k] ·
X_pad[i, loc + k], the part of that output (bias excluded) that comes through the consumer's
input channels i tied to channel c, read from the consumer's actual input X (after pooling,
BatchNorm, activation, addition). The draws come from a generator seeded by
`numpy.random.SeedSequence([seed, class_index])`: each class's samples depend on the seed and
the class only, whatever the chunking, sharding or class order.

Greedy step: removing a set T changes the sampled outputs by Σ_t (Σ_{c∈T} x̂_tc)² = 1_Tᵀ G 1_T,
G = Σ_t x̂_t x̂_tᵀ [C, C] (float64). From T = ∅, repeatedly discard the channel that adds least,
2·(G 1_T)_c + G_cc (ties: the lowest index), until every channel is discarded; score[c] = its
position in that order (0 = discarded first, C − 1 = kept last). G is a sum over images, kept per
class and added in class order, so chunks and shards give bit-identical scores. A dead unit (its
activations are 0 on every scoring image) is discarded before the greedy step, in index order,
so it never scores above a live one. ThiNet ignores classes (all classes are pooled), unlike
feature entropy, which is per class. ThiNet's later least-squares rescaling of the kept
channels is a surgery step, not part of the scores.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scoring.activations import checked_activations
from scoring.base import ClassBatch, LayerSpec
from scoring.chunked import PerClassSums
from scoring.dependency import dependency_graph
from scoring.hooks import StopForward, images_per_pass, prunable_convs, run_until_stopped
from scoring.model_state import eval_mode, model_device, probe_input
from scoring.registry import register
from scoring.tp_importances import _held

FORWARD_BATCH = 16
"""Most images per forward pass when a class is scored (never dependent on chunking); fewer where
one image's largest tensor passes PASS_BYTES / FORWARD_BATCH (VGG16 at 224²: 2)."""


@dataclass(frozen=True)
class Consumer:
    """A layer reading the scored channels: `module` (Conv2d or Linear) and `to_root` [inputs, C]
    float64, 1 where its input channel (a Linear's input feature) is the scored layer's channel."""

    module: nn.Module
    to_root: torch.Tensor

    @property
    def outputs(self) -> int:
        return int(self.module.out_channels if isinstance(self.module, nn.Conv2d) else self.module.out_features)


def find_consumers(model: nn.Module, convs: Iterable[nn.Conv2d], example: torch.Tensor) -> dict[nn.Conv2d, list[Consumer]]:
    """The consumers of each conv in `convs` (see the module doc), from one dependency graph of
    `model` traced on `example` [1, 3, H, W]; the model is left as found."""
    import torch_pruning as tp

    found: dict[nn.Conv2d, list[Consumer]] = {}
    with _held(model):
        graph = dependency_graph(model, example.to(model_device(model)))
        for conv in convs:
            channels = int(conv.out_channels)
            group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(channels)))
            found[conv] = []
            for item in group:
                module = item.dep.target.module
                if not isinstance(module, (nn.Conv2d, nn.Linear)) or not graph.is_in_channel_pruning_fn(item.dep.handler):
                    continue
                width = module.in_channels if isinstance(module, nn.Conv2d) else module.in_features
                to_root = torch.zeros(width, channels, dtype=torch.float64)
                for i, r in zip(item.idxs, item.root_idxs):
                    if r is not None and 0 <= int(r) < channels and 0 <= int(i) < width:
                        to_root[int(i), int(r)] = 1.0
                if to_root.any():
                    found[conv].append(Consumer(module, to_root))
    return found


def no_consumer(name: str) -> str:
    """The one-line refusal of layer `name`."""
    return (f"scorer 'thinet' cannot score layer {name!r}: its output reaches no nn.Conv2d or nn.Linear "
            "(ThiNet measures the next layer's output); choose another --scorer, e.g. --scorer l1")


def contributions(consumer: Consumer, x: torch.Tensor, units: torch.Tensor, fractions: torch.Tensor,
                  images: torch.Tensor) -> torch.Tensor:
    """x̂ [S, C] float64 of S sampled triples: image `images[s]` of the batch, output unit
    `units[s]` of `consumer`, location floor(fractions[s] · positions); `x` the consumer's input."""
    module = consumer.module
    weight = module.weight.detach()
    w = weight[units.to(weight.device)].cpu().double()  # the sampled units' rows only (VGG16's classifier: 0.8 GB whole)
    if isinstance(module, nn.Linear):
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        loc = (fractions * x.shape[1]).long()
        parts = w * x[images.to(x.device), loc.to(x.device)].cpu().double()  # [S, F]
    else:
        pad = module._reversed_padding_repeated_twice
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        xp = F.pad(x, pad, mode=mode) if any(pad) else x
        (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
        out_h = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
        out_w = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
        loc = (fractions * (out_h * out_w)).long()
        rows = (loc // out_w * sh)[:, None] + torch.arange(kh) * dh  # [S, kh]
        cols = (loc % out_w * sw)[:, None] + torch.arange(kw) * dw  # [S, kw]
        per_group = w.shape[1]
        first = units // (module.out_channels // module.groups) * per_group
        channels = first[:, None] + torch.arange(per_group)  # [S, Cin / groups]
        dev = xp.device
        patch = xp[images.to(dev)[:, None, None, None], channels.to(dev)[:, :, None, None],
                   rows.to(dev)[:, None, :, None], cols.to(dev)[:, None, None, :]].cpu().double()
        parts = torch.zeros(len(units), module.in_channels, dtype=torch.float64)
        parts.scatter_(1, channels, (w * patch).sum(dim=(2, 3)))
    if not torch.isfinite(parts).all():
        raise ValueError(f"thinet: NaN/Inf in the input of {type(module).__name__}; check the model weights")
    return parts @ consumer.to_root


def discard_order(gram: torch.Tensor, first: Iterable[int] = ()) -> list[int]:
    """ThiNet's greedy order over the C channels of G [C, C]: `first` (in its order), then each
    time the channel c minimising 2·(G 1_T)_c + G_cc, T the channels discarded so far."""
    c = gram.shape[0]
    order = list(first)
    left = torch.ones(c, dtype=torch.bool)
    left[order] = False
    removed = gram[:, order].sum(dim=1) if order else torch.zeros(c, dtype=gram.dtype)
    diagonal = gram.diagonal()
    inf = torch.tensor(float("inf"), dtype=gram.dtype)
    while len(order) < c:
        i = int(torch.where(left, 2 * removed + diagonal, inf).argmin())
        order.append(i)
        left[i] = False
        removed = removed + gram[:, i]
    return order


def forward_batch(model: nn.Module, consumers: list[Consumer], image: torch.Tensor) -> int:
    """Images per forward pass for `model` up to its `consumers`: FORWARD_BATCH, fewer where the
    largest tensor the pass makes for `image` [1, 3, H, W] times FORWARD_BATCH passes PASS_BYTES."""
    with _reading(consumers):
        return images_per_pass(model, image, most=FORWARD_BATCH)


@contextmanager
def _reading(consumers: list[Consumer]) -> Iterator[dict[nn.Module, torch.Tensor]]:
    """Inside: a forward (run with `run_until_stopped`) records the first input of every consumer
    and stops once it has them all; hooks removed on exit."""
    seen: dict[nn.Module, torch.Tensor] = {}

    def keep(module: nn.Module, args: tuple) -> None:
        seen.setdefault(module, args[0])
        if len(seen) == len(consumers):
            raise StopForward

    with ExitStack() as stack:
        for consumer in consumers:
            stack.callback(consumer.module.register_forward_pre_hook(keep).remove)
        yield seen


@register("thinet", needs_data=True,
          description="order of ThiNet's greedy discarding by the next layer's output change, classes pooled "
          "(Luo et al. 2017, ThiNet)")
class ThiNetScorer(PerClassSums):
    """score[c] = position of channel c in ThiNet's discard order (module doc); [C], higher = keep.

    Options:
      samples (10): sampled (output unit, location) pairs per image, as the reference.
      seed (0): seed of the samples (with the class index, see the module doc).
    """

    def __init__(self, *, samples: int = 10, seed: int = 0) -> None:
        if not isinstance(samples, int) or samples < 1:
            raise ValueError(f"thinet: samples must be a positive int, got {samples!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"thinet: seed must be a non-negative int, got {seed!r}")
        self.samples = samples
        self.seed = seed

    def check(self, model: nn.Module, *, classes: int, samples_per_class: int) -> None:
        """Refuse (one line naming the layer) a prunable conv (`prunable_convs`: one a forward runs,
        not a classifier conv such as SqueezeNet's, which is never pruned) whose output reaches no
        conv or linear layer. Traced on a zero image of the first side in PROBE_SIZES the model
        runs on; if none, the refusal comes when the layer is scored."""
        example = probe_input(model)
        if example is None:
            return
        names = {m: n for n, m in model.named_modules()}
        for conv, consumers in find_consumers(model, prunable_convs(model, example), example).items():
            if not consumers:
                raise ValueError(no_consumer(names[conv]))

    def reset(self, layer: LayerSpec) -> None:
        super().reset(layer)
        self._consumers: list[Consumer] | None = None
        self._batch: int | None = None
        self._alive = torch.zeros(layer.num_channels, dtype=torch.float64)

    def per_image(self, batch: ClassBatch) -> torch.Tensor:
        """A chunk's images [n, 3, H, W]; counts the images on which each unit is not 0."""
        acts = checked_activations(self, batch)
        self._alive += (acts != 0).flatten(2).any(dim=2).sum(dim=0).double()
        return batch.images

    def consumers(self, images: torch.Tensor) -> list[Consumer]:
        """The layer's consumers, traced once per layer; ValueError (one line) if it has none."""
        if self._consumers is None:
            example = self.layer.example if self.layer.example is not None else images[:1]
            self._consumers = find_consumers(self.layer.model, [self.layer.conv], example)[self.layer.conv]
            if not self._consumers:
                raise ValueError(no_consumer(self.layer.name))
        return self._consumers

    @torch.no_grad()
    def reduce_class(self, class_index: int, stats: torch.Tensor) -> None:
        """One class's images [N, 3, H, W] → G [C, C] of its samples, with row C the number of
        images on which each unit is not 0, into the class's sum [C + 1, C] (and N into its count)."""
        consumers = self.consumers(stats)
        model, c = self.layer.model, self.layer.num_channels
        rng = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, class_index]).generate_state(1)[0]))
        n, total = stats.shape[0], sum(k.outputs for k in consumers)
        units = torch.randint(total, (n, self.samples), generator=rng)
        fractions = torch.rand(n, self.samples, generator=rng, dtype=torch.float64)
        starts = torch.tensor([0] + [k.outputs for k in consumers]).cumsum(0)
        gram = torch.zeros(c, c, dtype=torch.float64)
        with eval_mode(model):
            if self._batch is None:
                self._batch = forward_batch(model, consumers, stats[:1].to(model_device(model)))
            for begin in range(0, n, self._batch):
                part = stats[begin:begin + self._batch]
                with _reading(consumers) as seen:
                    run_until_stopped(model, part.to(model_device(model)))
                image = torch.arange(len(part))[:, None].expand(-1, self.samples).reshape(-1)
                unit, frac = units[begin:begin + len(part)].reshape(-1), fractions[begin:begin + len(part)].reshape(-1)
                for j, consumer in enumerate(consumers):
                    if consumer.module not in seen:
                        raise ValueError(f"thinet: layer {self.layer.name!r}: its consumer was not called in forward()")
                    pick = (unit >= starts[j]) & (unit < starts[j + 1])
                    x_hat = contributions(consumer, seen[consumer.module], unit[pick] - starts[j], frac[pick],
                                          image[pick])
                    gram += x_hat.T @ x_hat
        alive, self._alive = self._alive, torch.zeros(c, dtype=torch.float64)
        self._sums[class_index] = self._sums.get(class_index, 0) + torch.cat([gram, alive[None]])
        self._counts[class_index] = self._counts.get(class_index, 0) + n

    def compute(self) -> torch.Tensor:
        total = self.pooled_sum()
        c = self.layer.num_channels
        dead = [i for i in range(c) if total[c, i] == 0]
        scores = torch.empty(c, dtype=torch.float32)
        scores[discard_order(total[:c], dead)] = torch.arange(c, dtype=torch.float32)
        return scores
