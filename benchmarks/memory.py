"""Peak memory of scoring: torchvision VGG16 (random weights) at 224², K classes × N images.

    python -m benchmarks.memory                 # K = 10, N = 100, entropy (the goal: ≤ 2 GiB)
    python -m benchmarks.memory --layers 3      # the first 3 layers only (the largest maps)
    python -m benchmarks.memory --quick         # K = 2, N = 10, first 4 layers (a minute or two)
    python -m benchmarks.memory --json PATH     # default benchmarks/results/memory.json

Scoring streams one layer, one class and one chunk of images at a time (prune.pipeline.selection:
the largest tensor of a chunk's forward pass stays under `--chunk-mib`), progressively pruned at
`--ratio` as the main job does. Images are seeded noise made on demand (no download, no data set held in memory). Memory is the
process's resident-set high-water mark (getrusage ru_maxrss), so it counts torch, numpy and
numba allocations alike; the JSON is rewritten after every layer, so an interrupted full run
still leaves its peak so far. After the measurement, `chunking_exact` records that the first
layer's scores with chunks of 2 images equal those of whole classes (K = 2, N = 5).
"""

from __future__ import annotations

import argparse
import resource
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torchvision
from torch.utils.data import Dataset

import scoring
from benchmarks.common import RESULTS, machine, positive_int, settings_from
from prune import (
    DataBundle,
    ScoringData,
    Surgeon,
    channels_to_remove,
    class_batches,
    exit_code,
    lowest,
    score_group,
    write_json,
)

GIB = 1024**3
MIB = 1024**2
GOAL_GIB = 2.0


@dataclass(frozen=True)
class Settings:
    """What is scored: K `classes` × N `per_class` images of `input_size`² through VGG16."""

    classes: int = 10
    per_class: int = 100
    input_size: int = 224
    scorer: str = "entropy"
    ratio: float = 0.5
    layers: int | None = None
    seed: int = 0
    chunk_mib: int = 32
    batch_size: int = 32


FULL = Settings()
QUICK = Settings(classes=2, per_class=10, layers=4)


class NoiseImages(Dataset):
    """`classes` × `per_class` seeded N(0, 1) images [3, s, s], each made when asked for."""

    def __init__(self, classes: int, per_class: int, size: int) -> None:
        self.classes, self.per_class, self.size = classes, per_class, size

    def __len__(self) -> int:
        return self.classes * self.per_class

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(i)
        return torch.randn(3, self.size, self.size, generator=g), i // self.per_class


def peak_rss() -> int:
    """Resident-set high-water mark of this process, bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bundle(s: Settings) -> DataBundle:
    images = NoiseImages(s.classes, s.per_class, s.input_size)
    targets = tuple(i // s.per_class for i in range(len(images)))
    names = tuple(f"class{c}" for c in range(s.classes))
    return DataBundle(images, images, names, targets, s.input_size)


def vgg16(s: Settings) -> tuple[torch.nn.Module, Surgeon]:
    """Seeded random-weight VGG16 in eval mode and its Surgeon (traced at `input_size`²)."""
    torch.manual_seed(s.seed)
    model = torchvision.models.vgg16(weights=None).eval()
    return model, Surgeon(model, torch.zeros(1, 3, s.input_size, s.input_size))


def source_of(s: Settings) -> ScoringData:
    """K × N noise images, forward batches of at most `batch_size` images and `chunk_mib` MiB per tensor."""
    return ScoringData(bundle(s), list(range(s.classes)), s.per_class, s.seed, batch_size=s.batch_size,
                       chunk_bytes=s.chunk_mib * MIB)


def measure(s: Settings, path: Path) -> dict:
    """Score (and prune) VGG16 layer by layer; write and return the result after each layer."""
    model, surgeon = vgg16(s)
    source = source_of(s)
    scorer = scoring.create(s.scorer)
    result = {"benchmark": "memory", "settings": asdict(s), "machine": machine(),
              "baseline_rss_bytes": peak_rss(), "layers": []}
    start = time.perf_counter()
    groups = surgeon.groups[: s.layers]
    for group in groups:
        t = time.perf_counter()
        channels = group.num_channels
        scores = score_group(model, group, scorer, source)
        surgeon.prune(group, lowest(scores, channels_to_remove(channels, s.ratio)))
        result["layers"].append({"name": group.name, "channels": channels, "seconds": round(time.perf_counter() - t, 2),
                                 "peak_rss_bytes_so_far": peak_rss()})
        result.update(peak_rss_bytes=peak_rss(), peak_rss_gib=round(peak_rss() / GIB, 3),
                      seconds=round(time.perf_counter() - start, 1), complete=len(result["layers"]) == len(groups),
                      layers_covered=f"{len(result['layers'])} of {len(surgeon.groups)}", goal_gib=GOAL_GIB)
        write_json(path, result)
    return result


def chunking_exact(s: Settings) -> dict:
    """Whether the first layer's scores with chunks of 2 images equal whole classes' (K = 2, N = 5)."""
    small = replace(s, classes=2, per_class=5)
    model, surgeon = vgg16(small)
    group = surgeon.groups[0]
    name, conv = group.names[0], group.convs[0]
    layer = scoring.LayerSpec(model=model, conv=conv, name=name)
    per_image = conv.out_channels * s.input_size**2 * 4  # units [C, s, s] float32 (3×3 conv, padding 1)
    source = replace(source_of(small), chunk_bytes=2 * per_image)  # chunks of 1, 2, 2 images
    whole = scoring.create(s.scorer)(layer, class_batches(model, conv, name, source))
    chunked = score_group(model, group, scoring.create(s.scorer), source)
    return {"layer": name, "classes": 2, "per_class": 5, "chunks": [1, 2, 2], "equal": bool(torch.equal(chunked, whole))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="K = 2, N = 10, first 4 layers")
    p.add_argument("--classes", type=positive_int, help="K (default 10; 2 with --quick)")
    p.add_argument("--samples-per-class", dest="per_class", type=positive_int, help="N (default 100; 10 with --quick)")
    p.add_argument("--layers", type=positive_int, help="score only the first L layers (default all; 4 with --quick)")
    p.add_argument("--scorer", help="scorer (default entropy)")
    p.add_argument("--chunk-mib", type=positive_int, help="most MiB in the largest tensor of a forward chunk (default 32)")
    p.add_argument("--json", type=Path, default=None,
                   help="where the result goes (default benchmarks/results/memory.json, memory-quick.json with --quick)")
    a = p.parse_args(argv)
    s = settings_from(a, full=FULL, quick=QUICK)
    path = a.json or RESULTS / ("memory-quick.json" if a.quick else "memory.json")
    r = measure(s, path)
    r["chunking_exact"] = chunking_exact(s)
    write_json(path, r)
    print(f"VGG16 {s.input_size}² · {s.scorer} · K={s.classes} N={s.per_class} · {r['layers_covered']} layers: "
          f"peak RSS {r['peak_rss_gib']:.2f} GiB (goal ≤ {GOAL_GIB:g} GiB) in {r['seconds']:.0f} s; "
          f"chunked = whole-class scores: {r['chunking_exact']['equal']} → {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(exit_code(main))
