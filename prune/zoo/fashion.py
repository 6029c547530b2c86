"""Fashion-MNIST (Zalando Research, MIT licence) read from its four IDX files, no download.

    --data fashion-mnist            the files Debian's `dataset-fashion-mnist` installs
                                    under /usr/share/datasets/fashion-mnist
    --data fashion-mnist:<dir>      a folder holding the four IDX files (gzipped or not),
                                    or a torchvision `FashionMNIST` root (<dir>/FashionMNIST/raw)

60,000 train and 10,000 test grey 28x28 photos of products in 10 classes. The train split is
`train`, the official test split is `val`. Each image is converted to 3 channels, resized to
the model's input side when that is not 28 (the images are square, so nothing is cropped)
and normalised with the model's mean and std.

>>> from prune.zoo.fashion import load_fashion_mnist
>>> train, val = load_fashion_mnist(None, input_size=28, mean=(0.286,) * 3, std=(0.353,) * 3)
>>> image, label = train[0]                  # [3, 28, 28] float32, int
"""

from __future__ import annotations

import gzip
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision.datasets import FashionMNIST
from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor

from prune.errors import UsageError

__all__ = [
    "CLASSES", "DEBIAN_DIR", "MEAN", "NATIVE_SIZE", "PREFIX", "STD", "FashionSplit", "find_idx_files",
    "is_fashion_mnist", "load_fashion_mnist", "read_folders", "write_idx",
]

PREFIX = "fashion-mnist"
"""`--data` value (or `fashion-mnist:<dir>`) that selects this data set."""
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where `apt-get install dataset-fashion-mnist` puts the four IDX files."""
CLASSES: tuple[str, ...] = tuple(FashionMNIST.classes)
"""'T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot'."""
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


def _read_idx(path: Path) -> torch.Tensor:
    """An IDX file (plain or gzipped) as a tensor, parsed by torchvision's MNIST reader."""
    if path.suffix != ".gz":
        return read_sn3_pascalvincent_tensor(str(path), strict=True)
    with gzip.open(path, "rb") as src, tempfile.NamedTemporaryFile(suffix=".idx") as tmp:
        tmp.write(src.read())
        tmp.flush()
        return read_sn3_pascalvincent_tensor(tmp.name, strict=True)


def _read_split(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N, 28, 28] uint8, labels [N] int64); UsageError if the files are not Fashion-MNIST's."""
    try:
        images, labels = _read_idx(images_path), _read_idx(labels_path)
    except (OSError, EOFError, AssertionError, RuntimeError, ValueError, KeyError) as exc:
        raise UsageError(
            f"{images_path} or {labels_path} is not a readable IDX file ({type(exc).__name__}); "
            "reinstall `dataset-fashion-mnist` or fix the files"
        ) from None
    ok = (images.dim() == 3 and images.dtype == torch.uint8 and labels.dim() == 1 and len(images) == len(labels)
          and len(labels) > 0 and int(labels.min()) >= 0 and int(labels.max()) < len(CLASSES))
    if not ok:
        raise UsageError(
            f"{images_path} and {labels_path} do not hold Fashion-MNIST images [N, 28, 28] with labels 0..9; "
            "fix the files"
        )
    return images, labels.long()


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
