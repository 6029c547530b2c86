"""Small seeded data sets shared by the tests, and running a benchmark as its user does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import TensorDataset

from prune.zoo.data import DataBundle

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(name: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """`python -m benchmarks.<name> *args` from the checkout (benchmarks are not an installed package)."""
    return subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


_CHANNELS = {"L": 1, "RGB": 3, "RGBA": 4}


def image_folder(
    root: Path, *, classes: int = 10, train: int = 12, val: int = 3, size: int = 32, mode: str = "RGB", corrupt: int = 0
) -> Path:
    """ImageFolder root (train/, val/) of seeded random PNGs of `mode`, `classes` class folders,
    plus `corrupt` random-byte .jpg files per class folder."""
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"class{c:02d}"
            folder.mkdir(parents=True)
            for i in range(n):
                shape = (size, size, _CHANNELS[mode])
                pixels = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).squeeze(-1)
                Image.fromarray(pixels.numpy(), mode).save(folder / f"img{i}.png")
            for i in range(corrupt):
                noise = torch.randint(0, 256, (64,), generator=g, dtype=torch.uint8)
                (folder / f"bad{i}.jpg").write_bytes(noise.numpy().tobytes())
    return root


def small_data(classes: int = 5, per_class: int = 10, size: int = 32) -> DataBundle:
    """A seeded in-memory data set of random images [3, size, size], `per_class` per class."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(classes * per_class, 3, size, size, generator=g)
    y = torch.arange(classes).repeat_interleave(per_class)
    ds = TensorDataset(x, y)
    return DataBundle(ds, ds, tuple(f"c{i}" for i in range(classes)), tuple(y.tolist()), size)


def quick_run(root: Path) -> list[str]:
    """Flags of a fast main job under `root`: a 3-class folder of 8×8 images, random embedded
    weights, the l1 scorer, 16² input, batch 8."""
    from prune.zoo.embedded_model import EmbeddedVGG

    torch.manual_seed(0)
    torch.save(EmbeddedVGG(num_classes=3).state_dict(), root / "weights.pt")
    data = image_folder(root / "data", classes=3, train=2, val=2, size=8)
    return ["--data", str(data), "--weights", str(root / "weights.pt"), "--scorer", "l1", "--input-size", "16",
            "--batch-size", "8"]
