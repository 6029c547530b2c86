"""Data: the embedded shapes set, or an ImageFolder root with train/ and val/.

Scoring draws `samples_per_class` training images of each of K classes; fine-tuning uses the
whole train split; evaluation uses val (the embedded set's test split).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, default_collate
from torchvision import datasets, transforms

from prune.errors import UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
UNREADABLE = (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError)
"""What decoding a bad image file raises (a decompression bomb included)."""


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


class TolerantImageFolder(datasets.ImageFolder):
    """ImageFolder that yields None for an unreadable image instead of raising (see `decode_rgb`).

    Grayscale and RGBA files are converted to RGB. `skipped` counts the unreadable files.
    """

    def __init__(self, root: str, transform: transforms.Compose, *, input_size: int) -> None:
        super().__init__(root, transform=transform)
        self.skipped: set[str] = set()
        self.image_shape = (3, input_size, input_size)

    def __getitem__(self, index: int):  # type: ignore[override]
        path, target = self.samples[index]
        image = decode_rgb(path)
        if image is None:
            self.skipped.add(path)
            return None
        return self.transform(image), target


def decode_rgb(path: str) -> Image.Image | None:
    """The image file at `path` as RGB, or None if it is unreadable: not a regular file (a
    FIFO or device would block or never end), not decodable, or a decompression bomb (more
    than PIL's `Image.MAX_IMAGE_PIXELS` pixels declared)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        with Image.open(path) as img:
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and img.size[0] * img.size[1] > limit:
                return None
            return img.convert("RGB")
    except UNREADABLE:
        return None


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


def folder_transform(
    input_size: int, *, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD
) -> transforms.Compose:
    """Resize to 256/224 of the input size, center-crop, normalise `(x - mean) / std` (default ImageNet)."""
    return transforms.Compose(
        [
            transforms.Resize(round(input_size * 256 / 224)),
            transforms.CenterCrop(input_size),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )


def _image_folder(root: Path, transform: transforms.Compose, input_size: int) -> TolerantImageFolder:
    if not root.is_dir():
        raise UsageError(f"data folder {root} does not exist; --data needs train/ and val/ class folders")
    try:
        return TolerantImageFolder(str(root), transform, input_size=input_size)
    except (FileNotFoundError, RuntimeError) as exc:
        raise UsageError(f"no images under {root} ({str(exc).splitlines()[0]}); put images in class folders") from None


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
        from prune.zoo.shapes import CLASSES, make_shapes

        train = make_shapes("train", size=size)
        return DataBundle(
            train=train,
            val=make_shapes("test", size=size),
            classes=tuple(CLASSES),
            train_targets=tuple(int(t) for t in train.tensors[1]),
            input_size=size,
        )
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


def _class_order(data: DataBundle, cls: int, n: int, *, seed: int) -> list[int]:
    """Train indices of class `cls` in the seeded order scoring reads them; UsageError if < n."""
    indices = [i for i, t in enumerate(data.train_targets) if t == cls]
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


def check_scoring_images(data: DataBundle, classes: list[int], n: int, *, seed: int) -> int:
    """Check, before any output, that each class has `n` readable scoring images.

    Returns how many unreadable files scoring will skip; raises UsageError if a class has
    too few images (counts only for in-memory data; folders are decoded file by file).
    """
    skipped_total = 0
    samples = getattr(data.train, "samples", None)
    for cls in classes:
        order = _class_order(data, cls, n, seed=seed)
        if samples is None:
            continue
        found = skipped = 0
        for i in order:
            if found == n:
                break
            if readable(samples[i][0]):
                found += 1
            else:
                skipped += 1
        if found < n:
            raise _too_few(data, cls, found, n, skipped)
        skipped_total += skipped
    return skipped_total


def class_images(data: DataBundle, cls: int, n: int, *, seed: int) -> torch.Tensor:
    """`n` training images of class `cls` (seeded choice) → [n, 3, s, s].

    Unreadable files are skipped (`check_scoring_images` counts them up front); too few
    readable images raise UsageError.
    """
    images: list[torch.Tensor] = []
    skipped = 0
    for i in _class_order(data, cls, n, seed=seed):
        item = data.train[i]
        if item is None:
            skipped += 1
            continue
        images.append(item[0])
        if len(images) == n:
            break
    if len(images) < n:
        raise _too_few(data, cls, len(images), n, skipped)
    return torch.stack(images)


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
