"""Atomic file writes: write to a temporary file in the same folder, then rename.

The temporary file is `.<name>.<random>.topoprune.tmp` (`is_temp` recognises one a killed run
left), created by `tempfile.mkstemp` with O_CREAT | O_EXCL | O_NOFOLLOW: never through a
symbolic link, never over an existing file; the rename replaces a link at the path, not its target.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

TEMP_SUFFIX = ".topoprune.tmp"
"""The ending of this module's temporary files (they also start with a dot)."""


def is_temp(path: Path) -> bool:
    """True if `path` is a temporary file of an unfinished atomic write (a regular file, not a link)."""
    path = Path(path)
    return path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX) and path.is_file() and not path.is_symlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    _atomic(Path(path), lambda f: f.write(data))


def write_text(path: Path, text: str) -> None:
    """Write `text` to `path` atomically (UTF-8)."""
    write_bytes(path, text.encode())


def write_json(path: Path, obj: Any) -> None:
    """Write `obj` as indented JSON atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def torch_save(path: Path, obj: Any) -> None:
    """torch.save `obj` atomically (keep it to tensors and plain containers)."""
    _atomic(Path(path), lambda f: torch.save(obj, f))
