"""Values kept on disk, exactly, within a byte budget: where the prefix cache
(`prune.pipeline.prefix_cache`) puts what does not fit its memory budget.

Each write is one file (`torch.save`: every tensor with its dtype, shape, strides and bits; small
immutable values as they are) in a private folder (`tempfile.mkdtemp` in the system's temporary
folder or the one given), made on the first write. The folder and its files go on `close()`, when
the spill is garbage-collected, and at interpreter exit. A write that would pass the budget, or
leave less than `SPILL_MARGIN_BYTES` free on that filesystem, or fails (a full disk), writes
nothing: the caller keeps the values another way (the cache recomputes them).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

import torch

SPILL_BYTES = 32 << 30
"""Default disk budget of a spill (32 GiB): the bytes of all its files at once."""

SPILL_MARGIN_BYTES = 1 << 30
"""Free space a write leaves on the spill folder's filesystem at least (1 GiB)."""


class Spill:
    """Files of values in a private temporary folder (inside `directory`, default the system's),
    at most `budget_bytes` in all."""

    def __init__(self, *, budget_bytes: int = SPILL_BYTES, directory: str | os.PathLike | None = None) -> None:
        if directory is not None and not os.path.isdir(directory):
            raise FileNotFoundError(f"spill folder {directory} is not a folder: create it, or pass another one")
        self.budget_bytes = budget_bytes
        self.directory = directory
        self.nbytes = 0
        self._sizes: dict[Path, int] = {}  # file → its bytes
        self._folder: Path | None = None
        self._remove_folder: weakref.finalize | None = None
        self._written = 0

    @property
    def folder(self) -> Path | None:
        """The private folder, once a write made it (None before, and after `close`)."""
        return self._folder

    def write(self, values: dict[str, Any], nbytes: int) -> Path | None:
        """A new file holding `values` (tensors of `nbytes` bytes in all), or None where it would
        pass the budget or the filesystem's free space less the margin, or writing failed."""
        if self.budget_bytes <= 0 or self.nbytes + nbytes > self.budget_bytes:
            return None
        folder = self._make_folder()
        if shutil.disk_usage(folder).free - nbytes < SPILL_MARGIN_BYTES:
            return None
        path = folder / f"{self._written}.pt"
        self._written += 1
        try:
            torch.save(values, path)
            size = path.stat().st_size
        except OSError:  # e.g. the disk filled up meanwhile
            path.unlink(missing_ok=True)
            return None
        self._sizes[path] = size
        self.nbytes += size
        return path

    def read(self, path: Path, device: torch.device) -> dict[str, Any]:
        """The values written to `path`, tensors on `device` (fresh: no one else holds them)."""
        return torch.load(path, map_location=device, weights_only=True)

    def delete(self, path: Path) -> None:
        """Remove the file `path` (of this spill) and give its bytes back to the budget."""
        self.nbytes -= self._sizes.pop(path)
        path.unlink(missing_ok=True)

    def close(self) -> None:
        """Remove the folder and every file in it (a later write makes a new folder)."""
        if self._remove_folder is not None:
            self._remove_folder()
        self._folder, self._remove_folder = None, None
        self._sizes.clear()
        self.nbytes = 0

    def _make_folder(self) -> Path:
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="topoprune-spill-", dir=self.directory))
            self._remove_folder = weakref.finalize(self, shutil.rmtree, self._folder, ignore_errors=True)
        return self._folder


__all__ = ["SPILL_BYTES", "SPILL_MARGIN_BYTES", "Spill"]
