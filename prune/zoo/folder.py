"""Image folders: torchvision's ImageFolder, tolerant of unreadable files and symlink loops.

In its own module because it subclasses torchvision's ImageFolder: importing torchvision costs
seconds, and only a run on `--data <folder>` needs it (prune.zoo.data imports this module when
it loads a folder).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

from PIL import Image
from torchvision import datasets, transforms

from prune.zoo.data import ImagesLeftOut, SymlinkLoops, _inside, decode_rgb, header_ok, walk_once


class TolerantImageFolder(datasets.ImageFolder):
    """ImageFolder that yields None for an unreadable image instead of raising (see `decode_rgb`).

    Grayscale, 16-bit and RGBA files are converted to RGB. Each class folder is walked visiting
    every real directory once (`walk_once`), so symlink loops never hang or repeat images; the
    symlinked folders not followed are in `loops` (one SymlinkLoops warning names them).
    `skipped` holds the unreadable files: those whose header already fails (`header_ok`, checked
    for every file here, without decoding), then any found while decoding.
    """

    def __init__(self, root: str, transform: transforms.Compose, *, input_size: int) -> None:
        self.loops: list[str] = []
        super().__init__(root, transform=transform)
        if self.loops:
            shown = ", ".join(self.loops[:3]) + (", …" if len(self.loops) > 3 else "")
            warnings.warn(f"not following {len(self.loops)} symlinked folder(s) under {root} that loop or repeat a "
                          f"folder ({shown}); remove them", SymlinkLoops)
        self.skipped: set[str] = {path for path, _ in self.samples if not header_ok(path)}
        self.decoded: set[int] = set()
        """Indices `readable` has already decoded successfully (not decoded again there)."""
        self.image_shape = (3, input_size, input_size)

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        """torchvision's class folders, less a symlinked one that holds the split itself (a loop,
        added to `loops`)."""
        split = os.path.realpath(directory)
        names, _ = super().find_classes(directory)
        classes = [n for n in names if not _inside(split, os.path.realpath(os.path.join(directory, n)))]
        self.loops += [os.path.join(directory, n) for n in names if n not in classes]
        return classes, {name: i for i, name in enumerate(classes)}

    def make_dataset(  # type: ignore[override]
        self,
        directory: str | Path,
        class_to_idx: dict[str, int],
        extensions: tuple[str, ...] | None = None,
        is_valid_file: Callable[[str], bool] | None = None,
        allow_empty: bool = False,
    ) -> list[tuple[str, int]]:
        """(path, class index) of every image file, as torchvision's `make_dataset` but walking
        each class folder with `walk_once` (the folders it does not follow go to `loops`)."""
        valid = is_valid_file or (lambda p: datasets.folder.has_file_allowed_extension(p, extensions))
        split = os.path.realpath(directory)
        samples: list[tuple[str, int]] = []
        left_out: list[str] = []
        for name in sorted(class_to_idx):
            files, skipped = walk_once(os.path.join(directory, name), outside=split)
            samples += [(path, class_to_idx[name]) for path in files if valid(path)]
            left_out += [path for path in files if not valid(path) and _image_type(path)]
            self.loops += skipped
        if left_out:
            types = sorted({os.path.splitext(p)[1].lower() for p in left_out})
            warnings.warn(f"left out {len(left_out)} image file(s) under {directory} of a type ImageFolder does not read "
                          f"({', '.join(types)}); convert them to PNG or JPEG", ImagesLeftOut)
        found = {target for _, target in samples}
        empty = sorted(name for name, i in class_to_idx.items() if i not in found)
        if empty and not allow_empty:
            raise FileNotFoundError(f"Found no valid file for the classes {', '.join(empty)}.")
        return samples

    def _decode(self, index: int) -> Image.Image | None:
        """Image `index` as RGB, or None (then its path is in `skipped`)."""
        path = self.samples[index][0]
        image = None if path in self.skipped else decode_rgb(path)
        if image is None:
            self.skipped.add(path)
        return image

    def readable(self, index: int) -> bool:
        """True if image `index` decodes (an unreadable one is added to `skipped`); each image is
        decoded here once (the scoring check and the held-out images both ask)."""
        if index not in self.decoded and self._decode(index) is not None:
            self.decoded.add(index)
        return index in self.decoded

    def __getitem__(self, index: int):  # type: ignore[override]
        image = self._decode(index)
        return None if image is None else (self.transform(image), self.targets[index])


def _image_type(path: str) -> bool:
    """Whether `path`'s extension is one Pillow reads as an image (a .gif, not a .txt)."""
    return os.path.splitext(path)[1].lower() in Image.registered_extensions()
