"""Data: the embedded shapes set, or an ImageFolder root with train/ and val/.

Scoring draws `samples_per_class` training images of each of K classes; fine-tuning uses the
whole train split; evaluation uses val (the embedded set's test split).
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, default_collate

from prune.errors import UsageError

if TYPE_CHECKING:  # image folders need torchvision, imported when one is loaded (prune.zoo.folder)
    from torchvision import transforms

    from prune.zoo.folder import TolerantImageFolder

UNREADABLE = (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError)
"""What decoding a bad image file raises (a decompression bomb included)."""
T = TypeVar("T")
MAX_SIDE = 50_000
MAX_ASPECT = 100
"""Images with a side over MAX_SIDE pixels or an aspect ratio over MAX_ASPECT are unreadable."""
WIDE_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")
"""PIL modes of 16-bit (and 32-bit integer) grayscale images, scaled to 8 bits before RGB."""


class SymlinkLoops(UserWarning):
    """Symlinked folders under a data split that loop (or repeat a folder) were not followed."""


class ImagesLeftOut(UserWarning):
    """Image files of a type torchvision's ImageFolder does not read (e.g. .gif) were left out."""


@dataclass(frozen=True)
class DataBundle:
    """train/val datasets yield (image [3, s, s] float32, label); `train_targets[i]` is the
    label of train item i; `classes` are the class names."""

    train: Dataset
    val: Dataset
    classes: tuple[str, ...]
    train_targets: tuple[int, ...]
    input_size: int
    files: tuple[str, ...] = ()
    """Data files read besides the images in folders (Fashion-MNIST's IDX files): the run's data digest covers them."""


def _inside(path: str, folder: str) -> bool:
    """True if real path `path` is `folder` or lies inside it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def walk_once(top: str, *, outside: str) -> tuple[list[str], list[str]]:
    """Files under `top` (symlinks followed, in torchvision's sorted order) and the symlinked
    folders not followed: one whose real path was already visited, or holds the folder it is
    in or `outside` (a loop). Every real directory is visited once, so this always ends."""
    seen = {os.path.realpath(top)}
    found: list[tuple[str, list[str]]] = []
    skipped: list[str] = []
    for folder, subfolders, files in os.walk(top, followlinks=True):
        here = os.path.realpath(folder)
        kept = []
        for name in sorted(subfolders):
            real = os.path.realpath(os.path.join(folder, name))
            if real in seen or _inside(here, real) or _inside(outside, real):
                skipped.append(os.path.join(folder, name))
            else:
                seen.add(real)
                kept.append(name)
        subfolders[:] = kept
        found.append((folder, sorted(files)))
    return [os.path.join(folder, f) for folder, files in sorted(found) for f in files], skipped


def sane_size(size: tuple[int, int]) -> bool:
    """True if an image of `size` (width, height) is worth decoding: no side over MAX_SIDE, aspect
    ratio at most MAX_ASPECT, at most PIL's `Image.MAX_IMAGE_PIXELS` pixels (a decompression bomb)."""
    width, height = size
    limit = Image.MAX_IMAGE_PIXELS
    return (
        0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE and max(width, height) <= MAX_ASPECT * min(width, height)
        and (limit is None or width * height <= limit)
    )


def _open_sane(path: str, use: Callable[[Image.Image], T]) -> T | None:
    """`use(image)` of the file at `path` opened by PIL, or None if it is unreadable: not a regular
    file (a FIFO or device would block or never end), not an image, of a size not `sane_size` (read
    from the header before anything is decoded), or failing in `use`."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        with Image.open(path) as img:
            return use(img) if sane_size(img.size) else None
    except UNREADABLE:
        return None


def header_ok(path: str) -> bool:
    """True if the header of the image file at `path` reads and declares a `sane_size` (nothing
    is decoded: cheap enough for every file of a data set)."""
    return _open_sane(path, lambda _img: True) is not None


def to_rgb(img: Image.Image) -> Image.Image:
    """`img` as 8-bit RGB; 16-bit grayscale (`WIDE_MODES`) is scaled (value / 257), not clipped."""
    if img.mode in WIDE_MODES:
        pixels = np.asarray(img, dtype=np.float64) / 257
        img = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def decode_rgb(path: str) -> Image.Image | None:
    """The image file at `path` as RGB (`to_rgb`), or None if it is unreadable (`_open_sane`)."""
    return _open_sane(path, to_rgb)


def readable(path: str) -> bool:
    """True if `decode_rgb` can decode the image file at `path`."""
    return decode_rgb(path) is not None


def skip_none_collate(batch: list, image_shape: tuple[int, ...] = (3, 1, 1)):
    """Collate that drops the None items a TolerantImageFolder yields for corrupt files.

    An all-None batch becomes an empty batch of images [0, *image_shape].
    """
    kept = [b for b in batch if b is not None]
    if not kept:
        return torch.zeros(0, *image_shape), torch.zeros(0, dtype=torch.long)
    return default_collate(kept)


def _folder_split(dataset: Dataset) -> TolerantImageFolder | None:
    """`dataset` if it is a TolerantImageFolder, else None; prune.zoo.folder (and torchvision with it)
    is not imported for this: until something imports it, no folder exists."""
    folder = sys.modules.get("prune.zoo.folder")
    return dataset if folder is not None and isinstance(dataset, folder.TolerantImageFolder) else None


def _image_folder(root: Path, transform: transforms.Compose, input_size: int) -> TolerantImageFolder:
    from prune.zoo.folder import TolerantImageFolder

    if not root.is_dir():
        raise UsageError(f"data folder {root} does not exist; --data needs train/ and val/ class folders")
    try:
        folder = TolerantImageFolder(str(root), transform, input_size=input_size)
    except (FileNotFoundError, RuntimeError) as exc:
        raise UsageError(f"no images under {root} ({str(exc).splitlines()[0]}); put images in class folders") from None
    if len(folder.skipped) == len(folder.samples):
        raise UsageError(f"no readable image under {root}: all {len(folder.samples)} image files are unreadable "
                         "(corrupt, not regular files or of absurd size); replace them")
    return folder


def unreadable_counts(data: DataBundle) -> dict[str, int]:
    """{"train": n, "val": n}: the unreadable image files found so far in each split (0 for
    in-memory data)."""
    return {name: len(getattr(split, "skipped", ())) for name, split in (("train", data.train), ("val", data.val))}


def embedded_data(*, input_size: int | None = None, train_per_class: int | None = None,
                  val_per_class: int | None = None) -> DataBundle:
    """The generated shapes10 set (what `load_data(None)` gives), normalised, at `input_size`
    (default: the embedded model's 32); `*_per_class` shrink a split (default: its full size)."""
    from prune.zoo.embedded_model import EMBEDDED_INPUT_SIZE
    from prune.zoo.shapes import CLASSES, MIN_SIZE, make_shapes

    size = input_size or EMBEDDED_INPUT_SIZE
    if size < MIN_SIZE:
        raise UsageError(f"--input-size {size} is too small for the generated shapes10 data (it draws images of "
                         f"at least {MIN_SIZE} pixels); pass --input-size {MIN_SIZE} or more, or --data with "
                         "your own images")
    train = make_shapes("train", per_class=train_per_class, size=size)
    return DataBundle(
        train=train,
        val=make_shapes("test", per_class=val_per_class, size=size),
        classes=tuple(CLASSES),
        train_targets=tuple(int(t) for t in train.tensors[1]),
        input_size=size,
    )


def data_folders(data: str | None, *, model: str = "embedded") -> list[Path]:
    """The real folders (symlinks resolved) that `--data` reads, in every form `load_data` takes:
    an ImageFolder root, `fashion-mnist:<dir>` or `fashion-mnist` (its folder and those its IDX
    files lie in), or the model's default data when None; none for the generated embedded set."""
    from prune.zoo import fashion
    from prune.zoo.registry import model_entry

    data = data if data is not None else model_entry(model).data
    if data is None:
        return []
    if fashion.is_fashion_mnist(data):
        return fashion.read_folders(data)
    return [Path(os.path.realpath(data))]


def load_data(root: str | None, *, input_size: int | None = None, model: str = "embedded") -> DataBundle:
    """The data `--data` names, for `model`: the embedded set (None, unless the model's entry
    names its own default data), Fashion-MNIST (`fashion-mnist[:<dir>]`, prune.zoo.fashion) or
    an ImageFolder root with train/ and val/.

    The model's registry entry (prune.zoo.registry) gives the default image side (`input_size`
    None) and the normalisation of folder and Fashion-MNIST images. The embedded set is generated
    normalised, at its native 32x32 unless `input_size` asks for more (a 224² copy would take gigabytes).
    """
    from prune.zoo import fashion
    from prune.zoo.embedded_model import EMBEDDED_INPUT_SIZE
    from prune.zoo.registry import model_entry

    entry = model_entry(model)
    root = root if root is not None else entry.data
    if fashion.is_fashion_mnist(root):
        size = input_size or entry.input_size
        train, val = fashion.load_fashion_mnist(root, input_size=size, mean=entry.mean, std=entry.std)
        return DataBundle(
            train=train, val=val, classes=fashion.CLASSES, train_targets=tuple(train.targets), input_size=size,
            files=train.files + val.files,
        )
    size = input_size or (EMBEDDED_INPUT_SIZE if root is None else entry.input_size)
    if root is None:
        return embedded_data(input_size=size)
    base = Path(root)
    if not base.is_dir():
        raise UsageError(f"data path {base} does not exist; pass an ImageFolder root with train/ and val/")
    transform = entry.transform(size)
    train = _image_folder(base / "train", transform, size)
    val = _image_folder(base / "val", transform, size)
    if train.classes != val.classes:
        raise UsageError(f"{base}/train and {base}/val have different class folders; make them match")
    return DataBundle(
        train=train,
        val=val,
        classes=tuple(train.classes),
        train_targets=tuple(train.targets),
        input_size=size,
    )


def balanced_subset(targets: tuple[int, ...], n: int, *, classes: int) -> list[int]:
    """Indices of a fixed, class-balanced subset of `n` items (labels `targets`, `classes` classes).

    Each class gives n // classes items (the first n % classes classes one more), drawn in one
    permutation seeded with 0, so the subset does not depend on the run's seed; returned sorted.
    UsageError if n exceeds the items or a class has too few.
    """
    if not 1 <= n <= len(targets):
        raise UsageError(f"--train-images {n} is not possible: the train split has {len(targets)} images; "
                         f"use 1..{len(targets)}")
    quota = [n // classes + (c < n % classes) for c in range(classes)]
    have = [0] * classes
    for t in targets:
        have[t] += 1
    short = [c for c in range(classes) if have[c] < quota[c]]
    if short:
        c = short[0]
        raise UsageError(f"--train-images {n} needs {quota[c]} images of class {c} but it has {have[c]}; "
                         "lower --train-images")
    chosen: list[int] = []
    for i in torch.randperm(len(targets), generator=torch.Generator().manual_seed(0)).tolist():
        if quota[targets[i]] > 0:
            quota[targets[i]] -= 1
            chosen.append(i)
    return sorted(chosen)


def choose_classes(data: DataBundle, k: int, *, seed: int) -> list[int]:
    """K class indices: all classes if K equals their number, else a seeded random choice, sorted."""
    n = len(data.classes)
    if not 1 <= k <= n:
        raise UsageError(f"--classes {k} is not possible: the data has {n} classes; use 1..{n}")
    if k == n:
        return list(range(n))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=g)[:k].tolist())


def _class_order(data: DataBundle, cls: int, n: int, *, seed: int, indices: list[int] | None = None) -> list[int]:
    """Train indices of class `cls` (`indices` if the caller has them) in the seeded order scoring
    reads them; UsageError if < n."""
    indices = [i for i, t in enumerate(data.train_targets) if t == cls] if indices is None else indices
    if len(indices) < n:
        raise UsageError(
            f"class {data.classes[cls]!r} has {len(indices)} training images but "
            f"--samples-per-class is {n}; lower --samples-per-class or add images"
        )
    g = torch.Generator().manual_seed(seed * 100_003 + cls)
    return [indices[i] for i in torch.randperm(len(indices), generator=g).tolist()]


def _too_few(data: DataBundle, cls: int, found: int, n: int, skipped: int) -> UsageError:
    return UsageError(
        f"class {data.classes[cls]!r} has only {found} readable training images ({skipped} unreadable "
        f"skipped) but --samples-per-class is {n}; lower --samples-per-class or fix the files"
    )


def _scoring_span(data: DataBundle, cls: int, n: int, *, seed: int, indices: list[int] | None = None
                  ) -> tuple[list[int], int, int]:
    """(order, span, skipped): class `cls`'s seeded order; scoring reads order[:span] to find `n`
    readable images, `skipped` of them unreadable (folders only; else span = n)."""
    order = _class_order(data, cls, n, seed=seed, indices=indices)
    folder = _folder_split(data.train)
    if folder is None:
        return order, n, 0
    found = skipped = 0
    for i in order:
        if found == n:
            break
        if folder.readable(i):
            found += 1
        else:
            skipped += 1
    if found < n:
        raise _too_few(data, cls, found, n, skipped)
    return order, found + skipped, skipped


def check_scoring_images(data: DataBundle, classes: list[int], n: int, *, seed: int) -> int:
    """Check, before any output, that each class has `n` readable scoring images.

    Returns how many unreadable files scoring will skip; raises UsageError if a class has
    too few images (counts only for in-memory data; folders are decoded file by file).
    """
    return sum(_scoring_span(data, cls, n, seed=seed)[2] for cls in classes)


def heldout_indices(data: DataBundle, per_class: int, *, scored: Sequence[int], scored_per_class: int,
                    seed: int) -> list[int]:
    """Train indices, sorted: at most `per_class` of each class, none of them a scoring image of the
    classes `scored` (`scored_per_class` each, seed `seed`). They are the tail of each class's seeded
    scoring order, so they do not change with `scored_per_class` as long as the class has room."""
    by_class: dict[int, list[int]] = {cls: [] for cls in range(len(data.classes))}
    for i, t in enumerate(data.train_targets):  # one pass, not one per class
        by_class[t].append(i)
    chosen: list[int] = []
    for cls, indices in by_class.items():
        n = scored_per_class if cls in scored else 0
        order, span, _ = _scoring_span(data, cls, n, seed=seed, indices=indices)
        chosen += order[max(span, len(order) - per_class):]
    return sorted(chosen)


def class_images(data: DataBundle, cls: int, n: int, *, seed: int) -> torch.Tensor:
    """`n` training images of class `cls` (seeded choice) → [n, 3, s, s].

    Unreadable files are skipped (`check_scoring_images` counts them up front); too few
    readable images raise UsageError.
    """
    images: torch.Tensor | None = None  # filled in place: no list of N images beside it
    found = skipped = 0
    for i in _class_order(data, cls, n, seed=seed):
        item = data.train[i]
        if item is None:
            skipped += 1
            continue
        if images is None:
            images = torch.empty((n, *item[0].shape), dtype=item[0].dtype)
        if item[0].shape != images.shape[1:]:
            raise RuntimeError(f"scoring images differ in shape: {tuple(item[0].shape)} and {tuple(images.shape[1:])}")
        images[found] = item[0]
        found += 1
        if found == n:
            break
    if found < n:
        raise _too_few(data, cls, found, n, skipped)
    return images


def _image_shape(dataset: Dataset) -> tuple[int, ...]:
    """The item shape a dataset declares (`image_shape`, looked up through a Subset), else (3, 1, 1)."""
    while isinstance(dataset, Subset) and not hasattr(dataset, "image_shape"):
        dataset = dataset.dataset
    return getattr(dataset, "image_shape", (3, 1, 1))


def make_loader(
    dataset: Dataset, *, batch_size: int, shuffle: bool, seed: int, workers: int = 0, sampler: Sampler | None = None
) -> DataLoader:
    """A seeded DataLoader that tolerates unreadable images (`sampler`, e.g. a
    DistributedSampler, replaces `shuffle`)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=workers,
        collate_fn=partial(skip_none_collate, image_shape=_image_shape(dataset)),
        generator=torch.Generator().manual_seed(seed),
    )
