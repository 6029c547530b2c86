"""Values kept on disk, exactly, within a byte budget: where the prefix cache
(`prune.pipeline.prefix_cache`) puts what does not fit its memory budget.

Each write is one file (`torch.save`: every tensor with its dtype, shape, strides, device and
bits; small immutable values as they are) in a private folder (`tempfile.mkdtemp` in the system's
temporary folder or the one given, named after the process), made on the first write. The folder
and its files go on `close()`, when the spill is garbage-collected, and at interpreter exit; the
folders of processes that no longer run (killed) go when a new spill makes its folder there. A write
that would pass the budget, or leave less than `SPILL_MARGIN_BYTES` free on that filesystem, or
fails (a full disk), or lands in memory (a tmpfs or ramfs folder), writes nothing: the caller keeps
the values another way (the cache recomputes them).
"""

from __future__ import annotations

import os
import re
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

PREFIX = "topoprune-spill-"
"""Name of a spill folder: PREFIX, the pid of its process, '-', mkdtemp's random part."""

MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})
"""Filesystems held in memory: spilling there saves no memory, so nothing is written."""

MOUNTS = Path("/proc/mounts")
"""Where the filesystems and their kinds are read from (Linux)."""


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
        parent = self.directory or tempfile.gettempdir()
        if in_memory(parent) or shutil.disk_usage(parent).free - nbytes < SPILL_MARGIN_BYTES:
            return None
        path = self._make_folder() / f"{self._written}.pt"
        self._written += 1
        try:
            torch.save(values, path)
            size = path.stat().st_size
        except (OSError, RuntimeError):  # e.g. the disk filled up meanwhile (torch.save raises RuntimeError)
            path.unlink(missing_ok=True)
            return None
        self._sizes[path] = size
        self.nbytes += size
        return path

    def read(self, path: Path) -> dict[str, Any]:
        """The values written to `path`, each tensor on the device it was on (fresh: no one else holds them)."""
        return torch.load(path, weights_only=True)

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
            remove_orphans(Path(self.directory or tempfile.gettempdir()))
            self._folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=self.directory))
            self._remove_folder = weakref.finalize(self, shutil.rmtree, self._folder, ignore_errors=True)
        return self._folder


def in_memory(directory: str | os.PathLike) -> bool:
    """Whether `directory` lies on a filesystem held in memory (`MEMORY_FILESYSTEMS`, per `MOUNTS`;
    False where that file does not exist)."""
    try:
        mounts = [line.split()[1:3] for line in MOUNTS.read_text().splitlines()]
    except OSError:
        return False
    real = os.path.realpath(directory)
    inside = [(point, kind) for point, kind in mounts if real == point or real.startswith(point.rstrip("/") + "/")]
    return bool(inside) and max(inside, key=lambda m: len(m[0]))[1] in MEMORY_FILESYSTEMS


def remove_orphans(directory: Path) -> None:
    """Remove the spill folders in `directory` whose process no longer runs (a killed run's)."""
    for folder in directory.glob(f"{PREFIX}*"):
        match = re.fullmatch(rf"{PREFIX}(\d+)-.*", folder.name)
        if match and folder.is_dir() and not _running(int(match[1])):
            shutil.rmtree(folder, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


__all__ = ["SPILL_BYTES", "SPILL_MARGIN_BYTES", "Spill", "in_memory", "remove_orphans"]
