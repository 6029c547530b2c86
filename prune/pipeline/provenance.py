"""What decides a run's result beyond its settings: the package version, the weights file and
the data files. Stored in run.json beside the settings fingerprint; a resume needs both to match.

The data digest is a manifest digest (relative path, size and mtime of every image file), so
it costs one `stat` per file, never a read: cheap even for ImageNet.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from prune.config import PruneConfig
from prune.version import __version__
from prune.zoo.data import DataBundle

CHUNK = 1 << 20


def file_digest(path: str | Path) -> str:
    """SHA-256 (hex) of the bytes of the file at `path`."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def manifest_digest(root: str | Path, paths: Iterable[str | Path]) -> str:
    """SHA-256 (hex) of the sorted lines 'relative path, size, mtime_ns' of `paths` under `root`
    (a file that cannot be stat-ed counts as 'missing')."""
    h = hashlib.sha256()
    for rel, path in sorted((os.path.relpath(p, root), p) for p in paths):
        try:
            st = os.stat(path)
            line = f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n"
        except OSError:
            line = f"{rel}\tmissing\n"
        h.update(line.encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _weights_file(config: PruneConfig) -> Path | None:
    """The weights file the run loads: --weights if it is a path, else the model's default weights
    file from its registry entry (the shipped embedded weights); None for a torchvision weights
    name or a random init (the settings name them)."""
    if config.weights is not None:
        return Path(config.weights) if Path(config.weights).is_file() else None
    from prune.zoo.registry import model_entry

    default = model_entry(config.model).weights
    return default if default is not None and default.is_file() else None


def _data_files(data: DataBundle) -> list[str]:
    """Every file the data was read from: folder images and data files such as Fashion-MNIST's."""
    return [path for split in (data.train, data.val) for path, _ in getattr(split, "samples", [])] + list(data.files)


def inputs_fingerprint(config: PruneConfig, data: DataBundle) -> dict[str, str | None]:
    """{"version", "weights_digest", "data_digest"} of a run on the loaded `data` (None where
    the settings alone decide: no weights file, the generated embedded data). The data digest's
    paths are relative to the files' common folder, so a moved data set still resumes."""
    weights = _weights_file(config)
    return {
        "version": __version__,
        "weights_digest": file_digest(weights) if weights is not None else None,
        "data_digest": manifest_digest(os.path.commonpath(files), files) if (files := _data_files(data)) else None,
    }
