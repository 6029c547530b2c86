"""shapes10: a procedurally drawn, seeded image-classification data set.

Ten classes of shapes and textures, drawn at a random position, scale, rotation (where it
means something) and colour over a cluttered, noisy background. It is generated in memory in
a second or two, bit-for-bit the same for the same arguments, so the embedded default model
(:mod:`prune.zoo.embedded_model`) can be scored and fine-tuned on a machine with no download.

>>> from prune.zoo.shapes import CLASSES, make_shapes
>>> train = make_shapes("train")              # 10 x 600 images
>>> images, labels = train.tensors            # [6000, 3, 32, 32] float32, [6000] int64

Images are drawn in [0, 1] and normalised per channel with :data:`MEAN` / :data:`STD`
(``(x - MEAN) / STD``); labels index :data:`CLASSES`. Samples are grouped by class (all of
class 0, then class 1, ...); shuffle when training.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

__all__ = ["CLASSES", "DEFAULT_PER_CLASS", "MEAN", "MIN_SIZE", "SPLITS", "STD", "make_shapes"]

CLASSES: tuple[str, ...] = (
    "circle",
    "ring",
    "square",
    "triangle",
    "cross",
    "horizontal stripes",
    "vertical stripes",
    "diagonal stripes",
    "checkerboard",
    "dots grid",
)
"""Human-readable class names; label ``i`` is ``CLASSES[i]``."""

SPLITS: tuple[str, ...] = ("train", "test")
MIN_SIZE: int = 16
"""Smallest image side `make_shapes` draws: below it the shapes and textures are a few pixels."""
DEFAULT_PER_CLASS: dict[str, int] = {"train": 600, "test": 200}

MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
STD: tuple[float, float, float] = (0.29, 0.29, 0.29)
"""Fixed per-channel normalisation of the [0, 1] drawings, ``(x - MEAN) / STD``; the default
train split measures mean ≈ (0.502, 0.499, 0.496) and std ≈ (0.292, 0.290, 0.291)."""

_TEXTURES = frozenset({"horizontal stripes", "vertical stripes", "diagonal stripes", "checkerboard", "dots grid"})
_MAX_BLOBS = 5  # clutter: small discs of random colour behind the object
_MAX_LINES = 2  # clutter: thin line segments behind the object
_NOISE_STD = 0.09  # per-pixel Gaussian noise in [0, 1] units


def make_shapes(
    split: str, *, per_class: int | None = None, size: int = 32, seed: int = 0
) -> TensorDataset:
    """Generate the shapes10 ``split`` ("train" or "test").

    Returns a TensorDataset of images ``[N, 3, size, size]`` float32 (normalised with
    MEAN/STD) and labels ``[N]`` int64, ``N = len(CLASSES) * per_class``, grouped by class.
    ``per_class`` defaults to 600 for "train" and 200 for "test". The two splits draw from
    different seeds, so they never share images. Same arguments → identical tensors.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    n = DEFAULT_PER_CLASS[split] if per_class is None else per_class
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"per_class must be a positive int, got {per_class!r}: pass e.g. per_class=100")
    if isinstance(size, bool) or not isinstance(size, int) or size < MIN_SIZE:
        raise ValueError(f"size must be an int >= {MIN_SIZE}, got {size!r}: pass e.g. size=32")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}: pass e.g. seed=0")

    images, labels = [], []
    for label, name in enumerate(CLASSES):
        gen = _generator(seed=seed, split=split, label=label)
        images.append(_draw_class(name, n=n, size=size, gen=gen))
        labels.append(torch.full((n,), label, dtype=torch.int64))
    x = torch.cat(images)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return TensorDataset((x - mean) / std, torch.cat(labels))


def _generator(*, seed: int, split: str, label: int) -> torch.Generator:
    """An independent torch.Generator per (seed, split, class)."""
    state = np.random.SeedSequence([seed, SPLITS.index(split), label]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _uniform(gen: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    """[n, 1, 1] uniform draws in [low, high)."""
    return low + (high - low) * torch.rand(n, 1, 1, generator=gen)


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates ``x, y`` each [1, size, size] (x along columns)."""
    c = torch.arange(size, dtype=torch.float32) + 0.5
    y, x = torch.meshgrid(c, c, indexing="ij")
    return x[None], y[None]


def _draw_class(name: str, *, n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` images of class ``name`` in [0, 1], [n, 3, size, size]."""
    fg, bg = _colours(n, gen)
    canvas = _background(bg, size=size, gen=gen)
    canvas = _clutter(canvas, size=size, gen=gen)
    alpha = _object_alpha(name, n=n, size=size, gen=gen)[:, None]  # [n, 1, s, s]
    img = canvas * (1 - alpha) + fg[:, :, None, None] * alpha
    img = img + _NOISE_STD * torch.randn(img.shape, generator=gen)
    return img.clamp_(0, 1)


def _colours(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground and background RGB [n, 3], at least 0.25 apart in every channel."""
    fg = torch.rand(n, 3, generator=gen)
    offset = 0.25 + 0.5 * torch.rand(n, 3, generator=gen)
    return fg, (fg + offset) % 1.0


def _background(bg: torch.Tensor, *, size: int, gen: torch.Generator) -> torch.Tensor:
    """Background colour plus smooth low-frequency variation, [n, 3, size, size]."""
    n = bg.shape[0]
    coarse = 0.25 * (torch.rand(n, 3, 4, 4, generator=gen) - 0.5)
    smooth = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return bg[:, :, None, None] + smooth


def _clutter(canvas: torch.Tensor, *, size: int, gen: torch.Generator) -> torch.Tensor:
    """Paint random small discs and thin segments of random colour onto ``canvas``."""
    n = canvas.shape[0]
    x, y = _grid(size)
    x, y = x[:, None], y[:, None]  # [1, 1, s, s]
    # discs: [n, K, 1, 1] parameters
    cx = size * torch.rand(n, _MAX_BLOBS, 1, 1, generator=gen)
    cy = size * torch.rand(n, _MAX_BLOBS, 1, 1, generator=gen)
    r = size * (0.03 + 0.05 * torch.rand(n, _MAX_BLOBS, 1, 1, generator=gen))
    on = torch.rand(n, _MAX_BLOBS, 1, 1, generator=gen) < 0.5
    alpha = (r - torch.sqrt((x - cx) ** 2 + (y - cy) ** 2) + 0.5).clamp(0, 1) * on
    # segments: distance from each pixel to segment (p0, p1), 1 px wide
    p0x, p0y, p1x, p1y = (size * torch.rand(n, _MAX_LINES, 1, 1, generator=gen) for _ in range(4))
    dx, dy = p1x - p0x, p1y - p0y
    t = (((x - p0x) * dx + (y - p0y) * dy) / (dx**2 + dy**2 + 1e-6)).clamp(0, 1)
    dist = torch.sqrt((x - p0x - t * dx) ** 2 + (y - p0y - t * dy) ** 2)
    on = torch.rand(n, _MAX_LINES, 1, 1, generator=gen) < 0.5
    alpha = torch.cat([alpha, (1.0 - dist).clamp(0, 1) * on], dim=1)  # [n, K+L, s, s]
    colours = torch.rand(n, alpha.shape[1], 3, generator=gen)
    for k in range(alpha.shape[1]):  # paint in order, later items on top
        a = alpha[:, k, None]
        canvas = canvas * (1 - a) + colours[:, k, :, None, None] * a
    return canvas


def _object_alpha(name: str, *, n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Coverage in [0, 1] of the class object, [n, size, size] (anti-aliased edges)."""
    scale = size * _uniform(gen, n, 0.18, 0.35)  # object radius in pixels
    margin = 0.7 * scale
    cx = margin + (size - 2 * margin) * torch.rand(n, 1, 1, generator=gen)
    cy = margin + (size - 2 * margin) * torch.rand(n, 1, 1, generator=gen)
    if name in _TEXTURES:
        jitter = math.radians(15.0)
        angle = _uniform(gen, n, -jitter, jitter)
        if name == "diagonal stripes":  # either diagonal, "/" or "\"
            sign = torch.where(torch.rand(n, 1, 1, generator=gen) < 0.5, 1.0, -1.0)
            angle = angle + sign * math.pi / 4
    else:
        angle = _uniform(gen, n, 0.0, 2 * math.pi)
    x, y = _grid(size)
    cos, sin = torch.cos(angle), torch.sin(angle)
    u = (cos * (x - cx) + sin * (y - cy)) / scale  # object frame, radius 1
    v = (-sin * (x - cx) + cos * (y - cy)) / scale
    if name in _TEXTURES:
        sd = _texture_sd(name, u=u, v=v, scale=scale, size=size, gen=gen)
    else:
        sd = _SHAPE_SD[name](u, v) * scale  # signed distance in pixels, > 0 inside
    return (sd + 0.5).clamp(0, 1)


def _sd_circle(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return 1.0 - torch.sqrt(u**2 + v**2)


def _sd_ring(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return 0.22 - (torch.sqrt(u**2 + v**2) - 0.75).abs()


def _sd_square(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return 0.8 - torch.maximum(u.abs(), v.abs())


def _sd_triangle(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Equilateral triangle with circumradius 1 (inradius 0.5)."""
    sides = [0.5 - (u * math.cos(a) + v * math.sin(a)) for a in (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)]
    return torch.minimum(torch.minimum(sides[0], sides[1]), sides[2])


def _sd_cross(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    bar_u = torch.minimum(0.28 - u.abs(), 0.95 - v.abs())
    bar_v = torch.minimum(0.28 - v.abs(), 0.95 - u.abs())
    return torch.maximum(bar_u, bar_v)


_SHAPE_SD = {
    "circle": _sd_circle,
    "ring": _sd_ring,
    "square": _sd_square,
    "triangle": _sd_triangle,
    "cross": _sd_cross,
}


def _texture_sd(
    name: str, *, u: torch.Tensor, v: torch.Tensor, scale: torch.Tensor, size: int, gen: torch.Generator
) -> torch.Tensor:
    """Signed distance (pixels) of a periodic pattern clipped to a disc or square patch."""
    n = scale.shape[0]
    period = size * _uniform(gen, n, 0.13, 0.2)  # pattern period in pixels
    phase_u, phase_v = torch.rand(n, 1, 1, generator=gen), torch.rand(n, 1, 1, generator=gen)
    pu, pv = u * scale / period + phase_u, v * scale / period + phase_v  # in periods

    def stripes(t: torch.Tensor) -> torch.Tensor:  # 50% duty, > 0 on a stripe
        return (0.25 - (torch.frac(t) - 0.5).abs()) * period

    if name == "horizontal stripes":
        pattern = stripes(pv)
    elif name in ("vertical stripes", "diagonal stripes"):
        pattern = stripes(pu)
    elif name == "checkerboard":
        a, b = stripes(pu), stripes(pv)
        pattern = torch.sign(a * b) * torch.minimum(a.abs(), b.abs())
    else:  # dots grid
        du, dv = torch.frac(pu) - 0.5, torch.frac(pv) - 0.5
        pattern = (0.28 - torch.sqrt(du**2 + dv**2)) * period
    disc = torch.rand(n, 1, 1, generator=gen) < 0.5
    region = torch.where(disc, _sd_circle(u, v), _sd_square(u, v) / 0.8) * scale
    return torch.minimum(pattern, region)
