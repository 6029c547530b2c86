"""Multi-process helpers for `torchrun -m prune`: process group, rank, gather, broadcast.

Started by torchrun (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT in the
environment) the job joins a process group (nccl on CUDA, gloo on CPU); otherwise every
helper is a no-op for a single process, so the single-process path pays nothing.
`env_world()` is the one reader of torchrun's environment; whether a process group of several
processes is running is `finetune.ddp.is_distributed()` (finetune may not import prune).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from finetune.ddp import is_distributed
from prune.errors import UsageError

T = TypeVar("T")

TIMEOUT = timedelta(hours=4)
"""How long a rank waits for the others (rank 0 alone evaluates before and after pruning)."""


@dataclass(frozen=True)
class World:
    """This process's place: `rank` in 0..`size`−1; `local_rank` on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """True on the process that writes files and prints (rank 0)."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """True when several processes take part."""
        return self.size > 1


SINGLE = World()


def _env_int(name: str, default: int) -> int:
    """The integer in environment variable `name` (UsageError if it is not one)."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"environment variable {name}={text!r} is not an integer; unset it or launch with torchrun") from None


def launched_by_torchrun() -> bool:
    """True when the environment carries torchrun's WORLD_SIZE > 1."""
    return _env_int("WORLD_SIZE", 1) > 1


def env_world() -> World:
    """The World described by torchrun's environment variables; SINGLE unless WORLD_SIZE > 1
    (a stray RANK alone does not make this process a non-main rank)."""
    if not launched_by_torchrun():
        return SINGLE
    return World(rank=_env_int("RANK", 0), size=_env_int("WORLD_SIZE", 1), local_rank=_env_int("LOCAL_RANK", 0))


def init(device: torch.device) -> World:
    """Join torchrun's process group (nccl for CUDA, gloo otherwise); SINGLE if not launched.

    On CUDA each process uses GPU `LOCAL_RANK`.
    """
    world = env_world()
    if not world.active:
        return SINGLE
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group(backend=backend, timeout=TIMEOUT)
    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=world.local_rank)


def local_device(device: torch.device, world: World) -> torch.device:
    """This process's device: cuda:LOCAL_RANK under torchrun with CUDA, else `device`."""
    if world.active and device.type == "cuda":
        return torch.device("cuda", world.local_rank)
    return device


def shutdown() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process (no-op for one)."""
    if is_distributed():
        dist.barrier()


def gather(obj: T) -> list[T]:
    """Every process's `obj`, in rank order, on every process (picklable objects)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: T, src: int = 0) -> T:
    """Process `src`'s `obj` on every process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shard(items: Sequence[T], world: World) -> list[T]:
    """This rank's share of `items` (round-robin: items rank, rank + size, ...)."""
    return list(items[world.rank :: world.size])
