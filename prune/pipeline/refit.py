"""The BatchNorm refit between progressive surgeries, run from the prefix cache's cuts.

After group l's surgery every BatchNorm is reset and re-estimated on the same seeded training
batches (`finetune.batchnorm.recalibrate_batchnorm`), a forward of the whole network per batch.
In train mode a BatchNorm normalises with the batch's own statistics, so what reaches a cut
depends only on the weights before it and the images: where the modules before the cut are
unchanged (bitwise, `prune.pipeline.prefix_cache`) and the batches are the same images (a digest
of each is part of its cache key), a re-estimate of the BatchNorms before the cut gives back
the statistics they hold, bit for bit. So each batch runs from the cut the last refit left in
the cache; only the BatchNorms at or after it are reset and re-estimated. Any batch without its
entry (the first refits, new images, a budget that held none) makes it the whole refit, which
stores the cut for the next one. ResNet-50 with 36 groups: a refit runs the part of the network
after the group pruned before, not the whole network.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from finetune.batchnorm import batches_run, recalibrate_batchnorm
from prune.pipeline.prefix_cache import PrefixCache

Batch = tuple[torch.Tensor, torch.Tensor]
_NO_LABELS = torch.empty(0, dtype=torch.long)
"""The labels of a batch held for a refit (it reads only the images)."""


@dataclass(frozen=True)
class BatchNormRefit:
    """Reset and re-estimate every BatchNorm of `model` on the first `batches` batches of a
    fresh `loader()` (the same batches at every call: a seeded loader)."""

    model: nn.Module
    loader: Callable[[], Iterable[Batch]]
    batches: int
    device: torch.device | str = "cpu"

    def __call__(self) -> int:
        """The images used (`recalibrate_batchnorm`)."""
        return recalibrate_batchnorm(self.model, self.loader(), batches=self.batches, device=self.device)


def refit_from_cuts(refit: BatchNormRefit, cache: PrefixCache, before: Sequence[str]) -> int:
    """`refit()` inside `cache.tracking()` after a surgery, with the same statistics bit for bit,
    each batch run from the cut the cache holds for it; the cut is kept before the convs `before`
    (the group just pruned: the next surgery changes only what lies after it) for the next refit.
    The images used."""
    cache.settle()  # entries that fit the model as the surgery left it
    taken = [x for _, x in batches_run(refit.loader(), refit.batches)]  # held: `batches` × batch size images
    batches = [(x, _NO_LABELS) for x in taken]
    chunks = [(("refit", refit.batches, i, _digest(x)), slice(0, len(x))) for i, x in enumerate(taken)]
    runners = [cache.output_runner(refit.model, key, before) for key, _ in chunks]
    if any(run is None for run in runners):
        return recalibrate_batchnorm(refit.model, batches, batches=len(batches), device=refit.device)
    cut = cache.common_cut(chunks)
    if cut == 0:
        cache.forget(chunks)  # every batch from the images, every BatchNorm reset
    return recalibrate_batchnorm(refit.model, batches, batches=len(batches), device=refit.device,
                                 kept=cache.modules_before(cut),
                                 forward=lambda i, images: runners[i](chunks[i][1], images))


def _digest(images: torch.Tensor) -> str:
    """A digest of the images' dtype, shape and bytes (a batch's identity across refits)."""
    data = images.detach().cpu().contiguous()
    h = hashlib.blake2b(f"{data.dtype} {tuple(data.shape)}".encode(), digest_size=16)
    h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


__all__ = ["BatchNormRefit", "refit_from_cuts"]
