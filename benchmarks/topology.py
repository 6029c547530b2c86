"""Speed of the birth-time engine vs gudhi, and vs a VGG16 forward pass (1 thread).

    python -m benchmarks.topology [--quick] [--json PATH] [--images N]

Per map size m and map family (random ReLU maps; smooth CNN-like maps = ReLU of blurred
Gaussian noise) it times the engine and the gudhi reference (`gudhi_birth_time`) in ms per
unit and prints the speedup. Then it runs torchvision's VGG16 (random init, no download)
on synthetic 224² images and compares the time to compute the birth times of every unit
of its 13 conv layers (after ReLU) with the time of the forward pass that produced them.
All timings are wall clock with numba and torch on 1 thread; process CPU time is reported
alongside (robust when other jobs share the cores).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import RESULTS, machine, positive_int, settings_from
from prune import exit_code, write_json
from scoring.hooks import forward_hooks

SIZES = (7, 14, 28, 56, 112, 224)
QUICK_SIZES = (7, 14, 28, 56)
FAMILIES = ("relu", "smooth")
GUDHI_REPS = {7: 40, 14: 20, 28: 10, 56: 4, 112: 2, 224: 1}
DEFAULT_JSON = RESULTS / "topology.json"


@dataclass(frozen=True)
class Settings:
    """Map sizes m timed against gudhi and VGG16 images of the forward-pass comparison."""

    sizes: tuple[int, ...] = SIZES
    images: int = 100


FULL = Settings()
QUICK = Settings(sizes=QUICK_SIZES, images=4)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [B, 1, H, W]."""
    r = int(3 * sigma)
    k = torch.exp(-torch.arange(-r, r + 1.0) ** 2 / (2 * sigma**2))
    k = (k / k.sum()).to(x.dtype)
    x = F.conv2d(x, k.view(1, 1, 1, -1), padding=(0, r))
    return F.conv2d(x, k.view(1, 1, -1, 1), padding=(r, 0))


def make_maps(family: str, n: int, m: int, seed: int = 0) -> np.ndarray:
    """n synthetic units [n, m, m] float32 of one family ("relu" or "smooth")."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, m, m, generator=gen)
    if family == "smooth":
        x = _blur(x, sigma=max(1.0, m / 28))
    elif family != "relu":
        raise ValueError(f"unknown map family {family!r}; use one of {FAMILIES}")
    return torch.relu(x)[:, 0].contiguous().numpy()


class _Clock:
    """Wall-clock and process-CPU seconds of a `with` block (CPU time is robust to other
    processes sharing the cores; wall time is what a user waits)."""

    def __enter__(self) -> "_Clock":
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu


def _engine_ms(maps: np.ndarray, repeats: int = 3) -> tuple[float, float]:
    """(wall, cpu) ms per map of `birth_times`, best of `repeats`."""
    from scoring.topology import birth_times

    birth_times(maps[:2])  # compile / load the cache outside the timing
    wall = cpu = float("inf")
    for _ in range(repeats):
        with _Clock() as clock:
            birth_times(maps)
        wall, cpu = min(wall, clock.wall), min(cpu, clock.cpu)
    return 1e3 * wall / len(maps), 1e3 * cpu / len(maps)


def _gudhi_ms(maps: np.ndarray) -> tuple[float, float]:
    """(wall, cpu) ms per map of `gudhi_birth_time`."""
    from scoring.topology import gudhi_birth_time

    gudhi_birth_time(maps[0][:5, :5])  # import gudhi outside the timing
    with _Clock() as clock:
        for U in maps:
            gudhi_birth_time(U)
    return 1e3 * clock.wall / len(maps), 1e3 * clock.cpu / len(maps)


def bench_sizes(sizes: tuple[int, ...], quiet: bool = False) -> list[dict[str, Any]]:
    """Engine vs gudhi, ms per unit, for every size × family."""
    rows = []
    for m in sizes:
        for family in FAMILIES:
            n = int(np.clip(3_000_000 // (m * m), 50, 4000))
            maps = make_maps(family, n, m, seed=m)
            engine, engine_cpu = _engine_ms(maps)
            gudhi, gudhi_cpu = _gudhi_ms(maps[: GUDHI_REPS.get(m, 1)])
            row = {"m": m, "family": family, "engine_ms": engine, "gudhi_ms": gudhi,
                   "speedup": gudhi / engine, "engine_cpu_ms": engine_cpu,
                   "gudhi_cpu_ms": gudhi_cpu, "speedup_cpu": gudhi_cpu / engine_cpu,
                   "units": n, "gudhi_units": min(n, GUDHI_REPS.get(m, 1))}  # fmt: skip
            rows.append(row)
            if not quiet:
                print(f"{m:>5} {family:>7} {engine:>12.4f} {gudhi:>12.2f} {gudhi / engine:>10.0f}x"
                      f" {gudhi_cpu / engine_cpu:>10.0f}x", flush=True)  # fmt: skip
    return rows


def _relu_outputs(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The ReLU modules that follow each conv of a torchvision VGG."""
    mods = list(model.features)
    return [b for a, b in zip(mods, mods[1:]) if isinstance(a, torch.nn.Conv2d)]


def bench_vgg16(images: int, chunk: int = 5, quiet: bool = False) -> dict[str, Any]:
    """Birth times of all 13 conv layers of VGG16 vs the forward pass, seconds."""
    from torchvision.models import vgg16

    from scoring.topology import birth_times

    torch.manual_seed(0)
    model = vgg16(weights=None).eval()
    relus = _relu_outputs(model)
    acts: list[torch.Tensor] = []
    birth_times(torch.rand(2, 2, 7, 7))  # compile / load the cache outside the timing
    forward_s = topology_s = forward_cpu = topology_cpu = 0.0
    gen = torch.Generator().manual_seed(1)
    with forward_hooks(relus, lambda mod, i, o: acts.append(o)):
        for start in range(0, images, chunk):
            b = min(chunk, images - start)
            x = _blur(torch.randn(b * 3, 1, 224, 224, generator=gen), 3.0).view(b, 3, 224, 224)
            acts.clear()
            with torch.no_grad():
                with _Clock() as fwd:
                    model(x)
                with _Clock() as topo:
                    for a in acts:
                        birth_times(a)
            forward_s, forward_cpu = forward_s + fwd.wall, forward_cpu + fwd.cpu
            topology_s, topology_cpu = topology_s + topo.wall, topology_cpu + topo.cpu
            if not quiet:
                print(f"  images {start + b:>4}/{images}: forward {forward_s:8.2f} s, "
                      f"topology {topology_s:8.2f} s", flush=True)  # fmt: skip
    return {"topology_s": topology_s, "forward_s": forward_s, "ratio": topology_s / forward_s,
            "images": images, "layers": len(relus), "topology_cpu_s": topology_cpu,
            "forward_cpu_s": forward_cpu, "ratio_cpu": topology_cpu / forward_cpu}  # fmt: skip


def machine_info() -> dict[str, Any]:
    """The machine (benchmarks.common.machine) plus this benchmark's thread and timer settings."""
    import gudhi
    import numba

    return {**machine(), "threads": 1, "numba": numba.__version__, "gudhi": gudhi.__version__,
            "numpy": np.__version__,
            "timer": "wall clock (perf_counter; engine best of 3); *_cpu: process_time",
            "load_average": os.getloadavg()}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.topology", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer sizes and images")
    parser.add_argument("--json", type=Path, default=None,
                        help=f"write results here (default without --quick: {DEFAULT_JSON})")
    parser.add_argument("--images", type=positive_int, help="VGG16 images (default 100, 4 with --quick)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    s = settings_from(args, full=FULL, quick=QUICK)

    torch.set_num_threads(1)
    if not args.quiet:
        print(f"{'m':>5} {'family':>7} {'engine ms':>12} {'gudhi ms':>12} {'speedup':>11}"
              f" {'(cpu time)':>11}")  # fmt: skip
    sizes = bench_sizes(s.sizes, quiet=args.quiet)
    if not args.quiet:
        print(f"VGG16, {s.images} images at 224², 13 conv layers, 1 thread")
    vgg = bench_vgg16(s.images, quiet=args.quiet)
    if not args.quiet:
        print(f"VGG16 topology {vgg['topology_s']:.2f} s / forward {vgg['forward_s']:.2f} s "
              f"= {vgg['ratio']:.3f} (cpu time: {vgg['ratio_cpu']:.3f})")  # fmt: skip
    out = args.json if args.json is not None else (None if args.quick else DEFAULT_JSON)
    if out is not None:
        write_json(out, {"machine": machine_info(), "sizes": sizes, "vgg16": vgg})
        if not args.quiet:
            print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(exit_code(main))
