"""One file of a run's `<out>/cache/`, shared by every process: rank 0 reads it (only when the run
resumes) and writes it; what rank 0 read is broadcast, so every process sees the same dict."""

from __future__ import annotations

from pathlib import Path

from prune.core import distributed
from prune.core.files import torch_save
from prune.errors import UsageError
from prune.outputs.checkpoint import read_checkpoint


class CacheFile:
    """`path`, holding a dict whose "format" is `kind` (a `finetune.checkpoint.CheckpointFile`).

    A file that is missing, unreadable or of another kind reads as None (it is made again).
    """

    def __init__(self, path: Path, kind: str, *, resume: bool, world: distributed.World) -> None:
        self.path, self.kind, self.resume, self.world = Path(path), kind, resume, world

    def _read_here(self) -> dict | None:
        """The file's dict on rank 0 of a resumed run (None elsewhere, or if it cannot be used)."""
        if not (self.world.is_main and self.resume and self.path.exists()):
            return None
        try:
            return read_checkpoint(self.path, self.kind)
        except UsageError:
            return None

    def read(self) -> dict | None:
        """Rank 0's dict on every process (all processes call this together)."""
        return self.world.broadcast(self._read_here())

    def write(self, state: dict) -> None:
        """Write {"format": kind, **state} atomically (rank 0; all processes call this together, and
        a failure there is raised on every process)."""
        distributed.main_only(lambda: torch_save(self.path, {"format": self.kind, **state}), self.world)
