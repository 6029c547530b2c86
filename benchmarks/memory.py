"""Peak memory of scoring: torchvision VGG16 (random weights) at 224², K classes × N images.

    python -m benchmarks.memory                 # K = 10, N = 100, entropy (the goal: ≤ 4 GiB)
    python -m benchmarks.memory --quick         # K = 2, N = 10, first 4 layers (a minute or two)
    python -m benchmarks.memory --json PATH     # default benchmarks/results/memory.json

Scoring streams one layer and one class at a time (prune.pipeline.selection), progressively pruned
at `--ratio` as the main job does. Images are seeded noise made on demand (no download, no
data set held in memory). Memory is the process's resident-set high-water mark
(getrusage ru_maxrss), so it counts torch, numpy and numba allocations alike; the JSON is
rewritten after every layer, so an interrupted full run still leaves its peak so far.
"""

from __future__ import annotations

import argparse
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torchvision
from torch.utils.data import Dataset

import scoring
from benchmarks.common import RESULTS, machine, positive_int, settings_from
from prune import DataBundle, ScoringData, Surgeon, channels_to_remove, exit_code, lowest, score_group, write_json

GIB = 1024**3


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


def measure(s: Settings, path: Path) -> dict:
    """Score (and prune) VGG16 layer by layer; write and return the result after each layer."""
    torch.manual_seed(s.seed)
    model = torchvision.models.vgg16(weights=None).eval()
    surgeon = Surgeon(model, torch.zeros(1, 3, s.input_size, s.input_size))
    source = ScoringData(bundle(s), list(range(s.classes)), s.per_class, s.seed, batch_size=32)
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
                      goal_gib=4.0)
        write_json(path, result)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="K = 2, N = 10, first 4 layers")
    p.add_argument("--classes", type=positive_int, help="K (default 10; 2 with --quick)")
    p.add_argument("--samples-per-class", dest="per_class", type=positive_int, help="N (default 100; 10 with --quick)")
    p.add_argument("--layers", type=positive_int, help="score only the first L layers (default all; 4 with --quick)")
    p.add_argument("--scorer", help="scorer (default entropy)")
    p.add_argument("--json", type=Path, default=None,
                   help="where the result goes (default benchmarks/results/memory.json, memory-quick.json with --quick)")
    a = p.parse_args(argv)
    s = settings_from(a, full=FULL, quick=QUICK)
    path = a.json or RESULTS / ("memory-quick.json" if a.quick else "memory.json")
    r = measure(s, path)
    print(f"VGG16 {s.input_size}² · {s.scorer} · K={s.classes} N={s.per_class} · {len(r['layers'])} layers: "
          f"peak RSS {r['peak_rss_gib']:.2f} GiB (goal ≤ 4 GiB) in {r['seconds']:.0f} s → {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(exit_code(main))
