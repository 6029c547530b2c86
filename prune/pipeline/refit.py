"""The BatchNorm refit between progressive surgeries, run from the prefix cache's cuts.

After group l's surgery every BatchNorm is reset and re-estimated on the same seeded training
batches (`finetune.batchnorm.recalibrate_batchnorm`), a forward of the whole network per batch.
In train mode a BatchNorm normalises with the batch's own statistics, so what reaches a cut
depends only on the weights before it and the images: where the modules before the cut are
unchanged (bitwise, `prune.pipeline.prefix_cache`) and the batches are the same images (a digest
of each is part of its cache key), a re-estimate of the BatchNorms before the cut gives back
the statistics they hold, bit for bit. So each batch runs from the cut the last refit left in
the cache; only the BatchNorms at or after it are reset and re-estimated. Any batch without its
entry (the first refits, new images, a budget that held none) or a BatchNorm called on both
sides of the cut makes it the whole refit, run through the graph so that it stores the cut for
the next one. Where the graph cannot stand for the model in train mode (a BatchNorm it does not
call as a module: fx traced through its forward in eval mode) the refit runs the model itself.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import chain, islice

import torch
from torch import nn

from finetune.batchnorm import batches_run, recalibrate_batchnorm, running_norms
from prune.pipeline.prefix_cache import PrefixCache
from scoring.model_state import model_device

Batch = tuple[torch.Tensor, torch.Tensor]


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


HELD_BYTES = 512 << 20
"""The images a refit from cuts holds at once (its batches are digested before any runs); a refit
whose batches hold more is the whole refit, streamed (`--layer-bn-batches` 5 at batch 64 and 224²: 185 MiB)."""


def refit_from_cuts(refit: BatchNormRefit, cache: PrefixCache, before: Sequence[str]) -> int:
    """`refit()` inside `cache.tracking()` after a surgery, with the same statistics bit for bit,
    each batch run from the cut the cache holds for it; the cut is kept before the convs `before`
    (the group just pruned: the next surgery changes only what lies after it) for the next refit,
    in memory or, on a CPU (where running the prefix again costs more than reading it back), on
    disk. The whole refit, run as `refit()` runs it, where the graph cannot stand for the model
    (a BatchNorm it does not call as a module, an output it cannot run to) or the batches' images
    exceed `HELD_BYTES`. The images used."""
    cache.settle()  # entries that fit the model as the surgery left it
    model, loader = refit.model, iter(refit.loader())
    held: list[Batch] = []
    nbytes = 0
    for batch in islice(loader, refit.batches):
        held.append(batch)
        nbytes += batch[0].numel() * batch[0].element_size()
        if nbytes > HELD_BYTES:
            return recalibrate_batchnorm(model, chain(held, loader), batches=refit.batches, device=refit.device)
    taken = list(batches_run(held, refit.batches))
    chunks = {i: (("refit", len(taken), i, _digest(x)), slice(0, len(x))) for i, x in taken}
    on_cpu = model_device(model).type == "cpu"
    runners = {i: cache.output_runner(model, key, before, may_spill=on_cpu) for i, (key, _) in chunks.items()}
    calls = cache.call_positions()
    norms = running_norms(model)
    if any(run is None for run in runners.values()) or any(m not in calls for m in norms):
        return recalibrate_batchnorm(model, held, batches=refit.batches, device=refit.device)
    cut = cache.common_cut(list(chunks.values()))
    if any(min(calls[m]) < cut <= max(calls[m]) for m in norms):
        cut = 0  # a BatchNorm called on both sides of the cut: every call must run again
    if cut == 0:
        cache.forget(list(chunks.values()))  # every batch from the images, every BatchNorm reset
    return recalibrate_batchnorm(model, held, batches=refit.batches, device=refit.device,
                                 kept={m for m in norms if max(calls[m]) < cut},
                                 forward=lambda i, images: runners[i](chunks[i][1], images))


def _digest(images: torch.Tensor) -> str:
    """A digest of the images' dtype, shape and bytes (a batch's identity across refits)."""
    data = images.detach().cpu().contiguous()
    h = hashlib.blake2b(f"{data.dtype} {tuple(data.shape)}".encode(), digest_size=16)
    h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


__all__ = ["BatchNormRefit", "refit_from_cuts"]
