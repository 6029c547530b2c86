"""Fashion-MNIST (Zalando Research, MIT licence) read from its four IDX files, no download.

    --data fashion-mnist            the files Debian's `dataset-fashion-mnist` installs
                                    under /usr/share/datasets/fashion-mnist
    --data fashion-mnist:<dir>      a folder holding the four IDX files (gzipped or not),
                                    or a torchvision `FashionMNIST` root (<dir>/FashionMNIST/raw)

60,000 train and 10,000 test grey 28x28 photos of products in 10 classes. The train split is
`train`, the official test split is `val`. Each image is converted to 3 channels, resized to
the model's input side when that is not 28 (the images are square, so nothing is cropped)
and normalised with the model's mean and std.

The files are checked completely before anything is written (each failure a UsageError naming
the file and the fix): a `.gz` must decompress (a damaged deflate stream, header or CRC is
refused); images must be uint8 [N, 28, 28] (another side is refused, not resized: the shipped
models were trained on 28x28, and a wrong side means a wrong file); labels must be an integer
IDX type, or whole-valued floats (NaN or 0.7 is refused, never truncated), within the classes
0..9, one per image.

>>> from prune.zoo.fashion import load_fashion_mnist
>>> train, val = load_fashion_mnist(None, input_size=28, mean=(0.286,) * 3, std=(0.353,) * 3)
>>> image, label = train[0]                  # [3, 28, 28] float32, int
"""

from __future__ import annotations

import gzip
import os
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from prune.errors import UsageError, one_line

__all__ = [
    "CLASSES", "DEBIAN_DIR", "MEAN", "NATIVE_SIZE", "PREFIX", "STD", "FashionSplit", "find_idx_files",
    "is_fashion_mnist", "load_fashion_mnist", "read_folders", "write_idx",
]

PREFIX = "fashion-mnist"
"""`--data` value (or `fashion-mnist:<dir>`) that selects this data set."""
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where `apt-get install dataset-fashion-mnist` puts the four IDX files."""
CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
"""The class names by label, as torchvision's `FashionMNIST.classes` (written out: the model registry
imports this module, and a run on other data never imports torchvision)."""
NATIVE_SIZE = 28
MEAN: tuple[float, float, float] = (0.286,) * 3
STD: tuple[float, float, float] = (0.353,) * 3
"""Normalisation of the [0, 1] grey values; the train split measures mean 0.2860, std 0.3530."""

FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
"""split → (images file, labels file), as Zalando names them (each may end in .gz)."""


def is_fashion_mnist(data: str | None) -> bool:
    """True if the `--data` value names Fashion-MNIST (`fashion-mnist` or `fashion-mnist:<dir>`)."""
    return data is not None and (data == PREFIX or data.startswith(PREFIX + ":"))


def _folder(data: str) -> Path:
    """The folder a `--data` value names: the Debian one for the bare name."""
    rest = data[len(PREFIX) + 1 :] if data.startswith(PREFIX + ":") else ""
    return Path(rest) if rest else DEBIAN_DIR


def read_folders(data: str) -> list[Path]:
    """The real folders (symlinks resolved) a Fashion-MNIST `--data` value reads: its folder and
    those its IDX files really lie in (when they are there)."""
    try:
        files = [path for pair in find_idx_files(data).values() for path in pair]
    except UsageError:
        files = []
    found = [Path(os.path.realpath(_folder(data)))] + [Path(os.path.realpath(f)).parent for f in files]
    return list(dict.fromkeys(found))


def _not_found(folder: Path, missing: str) -> UsageError:
    return UsageError(
        f"Fashion-MNIST file {missing}[.gz] not found in {folder}; install it with "
        "`apt-get install dataset-fashion-mnist` or pass --data fashion-mnist:<dir> with the four IDX files"
    )


def find_idx_files(data: str) -> dict[str, tuple[Path, Path]]:
    """split → (images path, labels path) for a `--data` value; UsageError naming both ways to get them.

    Looks in the folder itself and in a torchvision root's `FashionMNIST/raw/`, plain or gzipped.
    """
    folder = _folder(data)
    places = [folder, folder / "FashionMNIST" / "raw"]
    found: dict[str, tuple[Path, Path]] = {}
    for split, names in FILES.items():
        paths = []
        for name in names:
            hits = [p / f for p in places for f in (name, name + ".gz") if (p / f).is_file()]
            if not hits:
                raise _not_found(folder, name)
            paths.append(hits[0])
        found[split] = (paths[0], paths[1])
    return found


def _fix(path: Path) -> str:
    return f"reinstall `dataset-fashion-mnist` or replace {path.name} with Zalando's file"


def _decompressed(path: Path) -> bytes:
    """The bytes of a gzipped file; UsageError naming it if it does not decompress (a damaged or
    truncated deflate stream, a bad header or CRC: zlib.error, EOFError, gzip.BadGzipFile, OSError)."""
    try:
        with gzip.open(path, "rb") as src:
            return src.read()
    except (zlib.error, EOFError, OSError) as exc:
        raise UsageError(f"{path} does not decompress ({type(exc).__name__}: {one_line(exc)}); {_fix(path)}") from None


def _parse_idx(path: Path, file: str) -> torch.Tensor:
    """The IDX data in `file` (`path` itself or its decompressed copy), parsed by torchvision's MNIST
    reader; UsageError naming `path` if it is not an IDX file (bad magic, type or size)."""
    from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor

    try:
        return read_sn3_pascalvincent_tensor(file, strict=True)
    except (AssertionError, RuntimeError, ValueError, KeyError, EOFError, OSError) as exc:
        raise UsageError(f"{path} is not a readable IDX file ({type(exc).__name__}); {_fix(path)}") from None


def _read_idx(path: Path) -> torch.Tensor:
    """An IDX file (plain or gzipped) as a tensor; UsageError naming the file if it does not
    decompress or is not an IDX file."""
    if path.suffix != ".gz":
        return _parse_idx(path, str(path))
    blob = _decompressed(path)
    with tempfile.NamedTemporaryFile(suffix=".idx") as tmp:
        tmp.write(blob)
        tmp.flush()
        return _parse_idx(path, tmp.name)


def _check_images(path: Path, images: torch.Tensor) -> torch.Tensor:
    """`images` if they are Fashion-MNIST's: uint8 [N, 28, 28], N > 0. Other sizes are refused, not
    resized: the shipped models were trained on 28x28 and a wrong side usually means a wrong file."""
    if images.dtype != torch.uint8 or images.dim() != 3 or len(images) == 0:
        raise UsageError(f"{path} holds {images.dtype} {list(images.shape)}, not grey 8-bit images [N, 28, 28]; "
                         f"{_fix(path)}")
    if tuple(images.shape[1:]) != (NATIVE_SIZE, NATIVE_SIZE):
        h, w = images.shape[1:]
        raise UsageError(f"{path} holds {h}x{w} images but Fashion-MNIST's are {NATIVE_SIZE}x{NATIVE_SIZE}; "
                         f"{_fix(path)} (other images go in an ImageFolder: --data <dir>)")
    return images


def _check_labels(path: Path, labels: torch.Tensor) -> torch.Tensor:
    """`labels` [N] as int64 if they are classes 0..9: an integer IDX type, or floats that are all
    whole numbers (NaN, infinities and fractions are refused, never truncated)."""
    if labels.dim() != 1:
        raise UsageError(f"{path} holds an array of shape {list(labels.shape)}, not labels [N]; {_fix(path)}")
    if labels.is_floating_point():
        bad = ~torch.isfinite(labels) | (labels != labels.round())
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            raise UsageError(f"{path} holds labels that are not whole numbers (item {first} is "
                             f"{float(labels[first]):g}); Fashion-MNIST labels are the classes 0..9: {_fix(path)}")
    if len(labels) and not (float(labels.min()) >= 0 and float(labels.max()) < len(CLASSES)):
        raise UsageError(f"{path} holds labels from {float(labels.min()):g} to {float(labels.max()):g}, not labels "
                         f"0..9 of Fashion-MNIST's classes; {_fix(path)}")
    return labels.long()


def _read_split(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N, 28, 28] uint8, labels [N] int64); UsageError naming the file that is not Fashion-MNIST's."""
    images = _check_images(images_path, _read_idx(images_path))
    labels = _check_labels(labels_path, _read_idx(labels_path))
    if len(images) != len(labels):
        raise UsageError(f"{images_path} holds {len(images)} images but {labels_path} {len(labels)} labels; "
                         f"{_fix(labels_path)}")
    return images, labels


class FashionSplit(Dataset):
    """One split: item i is (image [3, s, s] float32 normalised, label int).

    images: [N, h, w] uint8 grey; labels: [N] int64; `targets` lists the labels; `files` are
    the IDX files read (the run's data digest covers them).
    """

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, *, input_size: int,
        mean: Sequence[float], std: Sequence[float], files: Sequence[Path] = (),
    ) -> None:
        self.images = images
        self.targets: list[int] = labels.tolist()
        self.input_size = input_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.files = tuple(str(f) for f in files)
        self.image_shape = (3, input_size, input_size)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.images[index].to(torch.float32).div(255.0)[None, None]
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
        x = x[0].expand(3, -1, -1)
        return (x - self.mean) / self.std, self.targets[index]


def load_fashion_mnist(
    data: str | None, *, input_size: int, mean: Sequence[float], std: Sequence[float]
) -> tuple[FashionSplit, FashionSplit]:
    """(train, val) of Fashion-MNIST for a `--data` value (None: the Debian folder) at side `input_size`."""
    paths = find_idx_files(data or PREFIX)
    splits = []
    for split in ("train", "val"):
        images, labels = _read_split(*paths[split])
        splits.append(FashionSplit(images, labels, input_size=input_size, mean=mean, std=std, files=paths[split]))
    return splits[0], splits[1]


def write_idx(path: str | os.PathLike, array: torch.Tensor) -> None:
    """Write a uint8 tensor (images [N, h, w] or labels [N]) as an IDX file (gzipped if `path` ends in .gz).

    For tests and small fixtures: the format Fashion-MNIST ships in (magic 0x0000 08 nd, big-endian sizes).
    """
    a = array.to(torch.uint8).contiguous()
    header = bytes([0, 0, 0x08, a.dim()]) + b"".join(int(s).to_bytes(4, "big") for s in a.shape)
    blob = header + a.numpy().tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(blob)
