"""DistributedDataParallel pieces for fine-tuning (torchrun): wrap, shard the data, reduce.

Without an initialised process group every helper falls back to the one-process behaviour.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler


def is_distributed() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` wrapped in DistributedDataParallel (as is for one process).

    Parameters and buffers are broadcast from rank 0, so every replica starts equal.
    """
    if not is_distributed():
        return model
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or `model` itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def sampler(dataset: Dataset, *, seed: int) -> DistributedSampler | None:
    """A shuffling DistributedSampler giving this rank its share of `dataset` (None for one process)."""
    if not is_distributed():
        return None
    return DistributedSampler(dataset, num_replicas=dist.get_world_size(), rank=dist.get_rank(), shuffle=True, seed=seed)


def join(model: nn.Module) -> AbstractContextManager:
    """DDP's join context (ranks may see different numbers of non-empty batches)."""
    return model.join() if isinstance(model, DistributedDataParallel) else nullcontext()


def mean_over_ranks(total: float, count: int, device: torch.device) -> float:
    """Σ total / Σ count over all ranks (the local mean for one process)."""
    if not is_distributed():
        return total / max(count, 1)
    t = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t[0] / max(float(t[1]), 1.0))
