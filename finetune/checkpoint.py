"""Fine-tuning that survives an interruption: a checkpoint after each epoch, resumed from on the next start.

A checkpoint is one dict: "epoch" (the last epoch done, 0-based), "losses" (each epoch's mean loss so
far), "model" and "optimizer" (state_dicts). Where it is kept is the caller's `CheckpointFile`
(the main job keeps it in `--out/cache/finetune.pt`, with `FORMAT` as its "format"). A checkpoint
that does not fit the model (or has no optimizer state) is ignored: fine-tuning starts again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

FORMAT = "topoprune/finetune-state/v1"
"""The "format" of the main job's fine-tuning checkpoint file."""


class CheckpointFile(Protocol):
    """Where the checkpoint is kept. Every process calls `read` and `write` in the same order;
    `read` gives every process the same dict (or None: nothing to resume from)."""

    def read(self) -> dict | None:
        """The saved state, the same on every process; None when there is nothing to resume from."""
        ...

    def write(self, state: dict) -> None:
        """Keep `state` (a dict of tensors and numbers) so that a later `read` returns it."""
        ...


def state_dict_mismatch(model: nn.Module, state: object) -> str | None:
    """Why `state` is not a state_dict of `model`: the first missing or unexpected key or
    mismatched shape (with how many more there are), or None if every key and shape fits.

    Missing BatchNorm `num_batches_tracked` counters are allowed (torch fills them in).
    """
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a state_dict"
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and getattr(state[k], "shape", None) != expected[k].shape]
    problems = [f"missing key {k!r}" for k in missing] + [f"unexpected key {k!r}" for k in unexpected]
    problems += [
        f"key {k!r} has shape {tuple(getattr(state[k], 'shape', ()))} but the model's is {tuple(expected[k].shape)}"
        if isinstance(state[k], torch.Tensor) else f"key {k!r} holds a {type(state[k]).__name__}, not a tensor"
        for k in wrong
    ]
    if not problems:
        return None
    return problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")


def _fits(state: dict | None, model: nn.Module) -> bool:
    """True if `state` is a checkpoint that `model` and an optimizer can resume from."""
    return (state is not None and state_dict_mismatch(model, state.get("model")) is None
            and isinstance(state.get("optimizer"), dict))


@dataclass
class Progress:
    """Where fine-tuning stands: the next epoch to run and the mean loss of each epoch done."""

    start_epoch: int = 0
    losses: list[float] = field(default_factory=list)


def restore(file: CheckpointFile | None, model: nn.Module, optimizer: torch.optim.Optimizer) -> Progress:
    """Load the checkpoint in `file` (if any, and if it fits) into `model` and `optimizer`; the progress it records."""
    state = file.read() if file is not None else None
    if not _fits(state, model):
        return Progress()
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return Progress(int(state["epoch"]) + 1, list(state["losses"]))


def save(file: CheckpointFile, epoch: int, progress: Progress, model: nn.Module,
         optimizer: torch.optim.Optimizer) -> None:
    """Keep the state after `epoch` (its loss already in `progress.losses`) in `file`."""
    file.write({"epoch": epoch, "losses": progress.losses, "model": model.state_dict(),
                "optimizer": optimizer.state_dict()})
