"""Multi-process helpers for `torchrun -m prune`: process group, rank, gather, broadcast, and a
failure on one rank raised as the same exception on every rank (`main_only`, `every_rank`).

Started by torchrun (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT in the
environment) the job joins a process group (nccl on CUDA, gloo on CPU); otherwise every
helper is a no-op for a single process, so the single-process path pays nothing.
`env_world()` is the one reader of torchrun's environment; whether a process group of several
processes is running is `finetune.ddp.is_distributed()` (finetune may not import prune).
A process of the job that ends (killed, crashed) makes the others' collectives fail: `peer_lost`
turns that failure into `PeerLost`, a one-line fault that keeps `--out` for the rerun.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from finetune.ddp import is_distributed
from prune.errors import UsageError, one_line

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

    def gather(self, obj: T) -> list[T]:
        """Every process's `obj`, in rank order, on every process (picklable objects); a
        one-process World (`SINGLE`) never joins a collective, even inside a torchrun job."""
        if not (self.active and is_distributed()):
            return [obj]
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: T, src: int = 0) -> T:
        """Process `src`'s `obj` on every process (`obj` itself in a one-process World)."""
        if not (self.active and is_distributed()):
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]


SINGLE = World()

PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote process exited")
"""What gloo's and NCCL's errors say when another process of the job has ended."""


class PeerLost(UsageError):
    """Another process of the torchrun job ended (killed, crashed, its machine lost) while this one
    waited for it: a fault of the machine, not a bug. The run keeps `--out` as an interruption does."""


def peer_lost(exc: BaseException, world: World, out: os.PathLike | str) -> PeerLost | None:
    """A PeerLost naming the rerun if `exc` (or an exception it was raised from or during) is a
    collective failing because another process of this job is gone (a torch.distributed
    DistError, or gloo's/NCCL's closed-connection errors); None otherwise or for one process."""
    if not world.active:
        return None
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, PeerLost):
            return exc
        if isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and any(s in str(exc) for s in PEER_GONE)):
            cause = re.sub(r"^\[[^\]]*\]\s*", "", one_line(exc)).split(". ")[0][:200]  # gloo: "[file:line] ..."
            return PeerLost(f"another process of this torchrun job ended ({cause}); what was done is kept in --out "
                            f"{out}: rerun the same command to continue")
        exc = exc.__cause__ or exc.__context__
    return None


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


@torch.no_grad()
def same_state(model: torch.nn.Module, world: World) -> None:
    """Every rank's `model` takes rank 0's parameters and buffers (DDP keeps the parameters equal,
    but each rank's last training forward updates its BatchNorm statistics from its own batch)."""
    if not world.active:
        return
    for tensor in model.state_dict().values():
        torch.distributed.broadcast(tensor, src=0)


def shard(items: Sequence[T], world: World) -> list[T]:
    """This rank's share of `items` (round-robin: items rank, rank + size, ...)."""
    return list(items[world.rank :: world.size])


# ---------------------------------------------------------------- one failure, raised on every rank


def _portable(exc: Exception) -> Exception:
    """`exc` if it can travel to another process as itself (pickled: same type and message),
    else a RuntimeError naming its type and message."""
    try:
        copy = pickle.loads(pickle.dumps(exc))
        if type(copy) is type(exc) and str(copy) == str(exc):
            return exc
    except Exception:  # noqa: BLE001 - any exception that does not pickle travels as a RuntimeError
        pass
    return RuntimeError(f"{type(exc).__name__}: {exc}")


def _raise_first(errors: Sequence[Exception | None], mine: Exception | None, rank: int) -> None:
    """Raise the first of `errors` (index = rank) that is not None: where that rank is this one
    (`rank`), its own exception `mine` with its traceback, else the copy received."""
    failed = [i for i, error in enumerate(errors) if error is not None]
    if failed:
        raise mine if failed[0] == rank else errors[failed[0]]


def main_only(fn: Callable[[], T], world: World) -> T | None:
    """`fn()` run on rank 0 only (its result there, None on the other ranks). If it raises, every
    rank raises that exception (same type and message), so no rank is left waiting and a
    UsageError stays a UsageError. All ranks call this together."""
    result, mine = None, None
    if world.is_main:
        try:
            result = fn()
        except Exception as exc:  # raised on every rank below
            mine = exc
    _raise_first([world.broadcast(None if mine is None else _portable(mine))], mine, world.rank)
    return result


def every_rank(fn: Callable[[], T], world: World) -> list[T]:
    """`fn()` run on every rank; every rank's result in rank order, on every rank. If it raises
    on any rank, every rank raises the first failing rank's exception (same type and message).
    All ranks call this together."""
    result, mine = None, None
    try:
        result = fn()
    except Exception as exc:  # raised on every rank below
        mine = exc
    outcomes = world.gather((result, None if mine is None else _portable(mine)))
    _raise_first([error for _, error in outcomes], mine, world.rank)
    return [value for value, _ in outcomes]
