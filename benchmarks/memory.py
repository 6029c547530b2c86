"""Peak memory and seconds per layer of every scorer pruning VGG16 (random weights) at 224², K classes × N images.

    python -m benchmarks.memory                         # every registered scorer, K = 10, N = 100 (hours)
    python -m benchmarks.memory --scorers entropy l1    # some scorers
    python -m benchmarks.memory --layers 3              # the first 3 layers of the scorers that need data
    python -m benchmarks.memory --deepest 1             # the last layer of the scorers that need data; under memory-deepest
    python -m benchmarks.memory --quick                 # K = 2, N = 10, 2 layers (20 min); under memory-quick
    python -m benchmarks.memory --report-only           # only rewrite the summary from the scorer files

Each scorer prunes VGG16 as `python -m prune` does (its `check`, its seed, ratio 0.5,
`select_and_prune`'s progressive schedule with its default prefix cache and disk spill; a scorer
that reads only weights gets no scoring images) in a process of its own (`--scorer NAME`), so
its peak is its own: the resident-set high-water mark of that process (VmHWM; not getrusage's
ru_maxrss, which Linux carries over from the parent through fork and exec). Scoring images are
seeded noise made on demand (no download, no data set held in memory). Per layer: the seconds
scoring it (the scorer's work and the forwards it needs), the seconds of the whole layer (from
the end of the previous layer's surgery: its scoring_top1 diagnostic, scoring and surgery) and the
peak so far. `--layers L` stops a scorer that needs data after L layers; a weight-only scorer
always does all 13 (seconds). `--deepest L` measures a scorer that needs data on the last L
layers only (VGG16's last group holds the classifier's 25,088 × 4,096 slice): the earlier layers
are pruned on placeholder scores (the first half of each layer's channels removed, nothing
scored, not recorded), in minutes instead of hours; its files and summary go under
memory-deepest, and weight-only scorers, measured on all 13 layers, are not run there.

One file per scorer, benchmarks/results/memory/<scorer>.json (memory-quick/ with --quick),
rewritten after every layer (an interrupted run leaves its peak so far, outcome "incomplete");
a file finished under the same settings (complete or refused) is skipped on restart. A scorer
that refuses VGG16 (tp-bnscale: no BatchNorm) is recorded as refused with its reason; a process
that fails, as failed with its exit code; a scorer asked for with no file under the current
settings is listed as missing (and the goal not met). Summary: benchmarks/results/memory.json and memory.md
(goal: peak ≤ 2 GiB for every scorer), with `chunking_exact`: the first layer's entropy scores
with chunks of 2 images equal those of whole classes (K = 2, N = 5).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import Dataset

import scoring
from benchmarks.common import RESULTS, machine, markdown_table, positive_int, settings_from, stem
from prune import (
    DataBundle,
    PruneConfig,
    ScoringData,
    Surgeon,
    UsageError,
    class_batches,
    create_model,
    exit_code,
    score_group,
    select_and_prune,
    write_json,
    write_text,
)
from prune.errors import one_line, usage_errors
from prune.pipeline.observe import CHUNK_BYTES
from prune.pipeline.prefix_cache import PREFIX_CACHE_BYTES
from prune.pipeline.run import make_scorer
from prune.pipeline.spill import SPILL_BYTES
from prune.pipeline.surgery import PrunableGroup

GIB = 1024**3
MIB = 1024**2
GOAL_GIB = 2.0
DONE = ("complete", "refused")
"""Outcomes of a scorer file that a restart keeps."""


@dataclass(frozen=True)
class Settings:
    """What is measured: K `classes` × N `per_class` images of `input_size`² through VGG16; the first
    `layers` groups (None: all) of a scorer that needs data, or its last `deepest` groups (the earlier
    ones pruned on placeholder scores); the prefix cache's memory and disk budgets."""

    classes: int = 10
    per_class: int = 100
    input_size: int = 224
    ratio: float = 0.5
    layers: int | None = None
    deepest: int | None = None
    seed: int = 0
    chunk_mib: int = CHUNK_BYTES // MIB
    cache_bytes: int = PREFIX_CACHE_BYTES
    spill_bytes: int = SPILL_BYTES

    def of(self, scorer: str) -> Settings:
        """The settings scorer `scorer` runs under: every layer if it reads only weights."""
        return self if scoring.scorer_info(scorer).needs_data else replace(self, layers=None, deepest=None)


def recorded(s: Settings) -> dict:
    """`s` as its result files record it (without `deepest` where it is not set, as before it existed)."""
    return {k: v for k, v in asdict(s).items() if k != "deepest" or v is not None}


FULL = Settings()
QUICK = Settings(classes=2, per_class=10, layers=2)


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
    """Resident-set high-water mark of this process image, bytes: VmHWM of /proc/self/status (Linux),
    else ru_maxrss. (Linux's ru_maxrss keeps the parent's high-water mark over fork and exec, so a
    child of a large process would report at least the parent's peak.)"""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bundle(s: Settings) -> DataBundle:
    images = NoiseImages(s.classes, s.per_class, s.input_size)
    targets = tuple(i // s.per_class for i in range(len(images)))
    names = tuple(f"class{c}" for c in range(s.classes))
    return DataBundle(images, images, names, targets, s.input_size)


def vgg16(s: Settings) -> tuple[torch.nn.Module, Surgeon]:
    """Seeded random-weight VGG16 of K outputs in eval mode (as `python -m prune --model vgg16`
    makes it) and its Surgeon (traced at `input_size`²)."""
    torch.manual_seed(s.seed)
    model = create_model("vgg16", num_classes=s.classes, pretrained=False).eval()
    return model, Surgeon(model, torch.zeros(1, 3, s.input_size, s.input_size))


def source_of(s: Settings) -> ScoringData:
    """K × N noise images, as `python -m prune` scores them, at most `chunk_mib` MiB per tensor of a forward."""
    return ScoringData(bundle(s), list(range(s.classes)), s.per_class, s.seed, chunk_bytes=s.chunk_mib * MIB)


# ---------------------------------------------------------------- one scorer, in its own process


class _Stop(Exception):
    """Raised after the last layer measured, to end `select_and_prune` early."""


class LayerClock:
    """A ScoreStore that keeps nothing and times layers: `get` starts the scoring clock (or, for the
    first `skip` layers, gives placeholder scores: the later half of the channels kept), `put`
    stops it, `end_layer` (the schedule's refit after each surgery, and after the last) gives a
    scored layer's record to `on_layer` and raises _Stop after `stop_after` scored layers."""

    def __init__(self, on_layer: Callable[[dict], None], stop_after: int, skip: int = 0) -> None:
        self.on_layer, self.stop_after, self.skip, self.layers = on_layer, stop_after, skip, 0
        self._scoring = self._ended = time.perf_counter()
        self._scored: dict = {}
        self._seen = 0

    def get(self, i: int, group: PrunableGroup) -> torch.Tensor | None:
        self._seen = i + 1
        self._scoring = time.perf_counter()
        return torch.arange(group.num_channels, dtype=torch.float32) if i < self.skip else None

    def put(self, i: int, group: PrunableGroup, scores: torch.Tensor) -> None:
        self._scored = {"name": group.name, "channels": group.num_channels,
                        "scoring_s": round(time.perf_counter() - self._scoring, 3)}

    def end_layer(self) -> None:
        now = time.perf_counter()
        if self._seen <= self.skip:  # a placeholder layer
            self._ended = now
            return
        self.on_layer({**self._scored, "layer_s": round(now - self._ended, 3), "peak_rss_bytes": peak_rss()})
        self._ended, self.layers = now, self.layers + 1
        if self.layers >= self.stop_after:
            raise _Stop


def measure(scorer_name: str, s: Settings, path: Path) -> dict:
    """Prune VGG16 with `scorer_name` as `python -m prune` does, in this process, for `s.layers`
    layers (all: None); the result is written to `path` before the first layer and after each."""
    config = PruneConfig(model="vgg16", scorer=scorer_name, ratio=s.ratio, classes=s.classes,
                         samples_per_class=s.per_class, input_size=s.input_size, seed=s.seed)
    scorer = make_scorer(config)
    model, surgeon = vgg16(s)
    total = len(surgeon.groups)
    result = {"benchmark": "memory", "scorer": scorer_name, "needs_data": scorer.info.needs_data,
              "settings": recorded(s), "machine": machine(), "outcome": "incomplete", "layers_total": total,
              "baseline_rss_bytes": peak_rss(), "peak_rss_bytes": peak_rss(), "layers": []}
    try:
        with usage_errors():
            scorer.check(model, classes=s.classes, samples_per_class=s.per_class)
    except UsageError as exc:
        result.update(outcome="refused", reason=one_line(exc))
    write_json(path, result)
    if result["outcome"] == "refused":
        return result
    start, wanted = time.perf_counter(), min(s.deepest or s.layers or total, total)

    def on_layer(layer: dict) -> None:
        result["layers"].append(layer)
        result.update(peak_rss_bytes=layer["peak_rss_bytes"], seconds=round(time.perf_counter() - start, 1),
                      outcome="complete" if len(result["layers"]) == wanted else "incomplete")
        write_json(path, result)
        print(f"{scorer_name} {layer['name']}: {layer['layer_s']:.1f} s (scoring {layer['scoring_s']:.1f} s), "
              f"peak {layer['peak_rss_bytes'] / GIB:.2f} GiB", flush=True)

    source = source_of(s) if scorer.info.needs_data else None
    clock = LayerClock(on_layer, wanted, skip=total - wanted if s.deepest else 0)
    # VGG16 has no BatchNorm, so the main job's refit after each layer does nothing; here it ends the layer's clock
    try:
        select_and_prune(surgeon, scorer, source, ratio=s.ratio, rounding=config.rounding, round_to=config.round_to,
                         store=clock, refit=clock.end_layer, quiet=True, cache_bytes=s.cache_bytes,
                         spill_bytes=s.spill_bytes)
        clock.end_layer()  # the last layer: no refit after it
    except _Stop:
        pass
    return result


# ---------------------------------------------------------------- every scorer, and the summary


def folder_of(results: Path, quick: bool, deepest: int | None = None) -> Path:
    """Where the scorer files go: <results>/memory/ (memory-quick/ with --quick; memory-deepest/ and
    memory-quick-deepest/ with --deepest)."""
    return results / (stem("memory", quick) + ("-deepest" if deepest else ""))


def read(path: Path) -> dict | None:
    """A result file's content (None if there is none or it is unreadable)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def finished(path: Path, settings: dict) -> bool:
    """True if `path` holds a result made under `settings` that a restart keeps (complete or refused)."""
    entry = read(path)
    return entry is not None and entry.get("settings") == settings and entry.get("outcome") in DONE


def child_argv(scorer_name: str, s: Settings, results: Path, quick: bool) -> list[str]:
    """`python -m benchmarks.memory --scorer NAME` with the settings `s` as flags."""
    argv = [sys.executable, "-m", "benchmarks.memory", "--scorer", scorer_name, "--results", str(results.resolve()),
            "--classes", str(s.classes), "--samples-per-class", str(s.per_class), "--input-size", str(s.input_size),
            "--chunk-mib", str(s.chunk_mib)]
    return (argv + (["--layers", str(s.layers)] if s.layers else []) + (["--deepest", str(s.deepest)] if s.deepest else [])
            + (["--quick"] if quick else []))


def run_scorer(scorer_name: str, s: Settings, results: Path, quick: bool) -> dict:
    """Scorer `scorer_name` measured in a process of its own; its file, marked failed (with the exit
    code and the last line of its stderr) if the process did not finish it."""
    path = folder_of(results, quick, s.deepest) / f"{scorer_name}.json"
    done = subprocess.run(child_argv(scorer_name, s, results, quick), stderr=subprocess.PIPE, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    entry = read(path)
    if done.returncode == 0 and finished(path, recorded(s.of(scorer_name))):
        return entry
    if entry is None or entry.get("settings") != recorded(s.of(scorer_name)):
        entry = {"benchmark": "memory", "scorer": scorer_name, "settings": recorded(s.of(scorer_name)), "layers": []}
    error = done.stderr.strip().splitlines()[-1:]
    entry.update(outcome="failed", exit=done.returncode, error=error[0] if error else "")
    write_json(path, entry)
    return entry


def chunking_settings(s: Settings) -> dict:
    """What the chunking check depends on."""
    return {"input_size": s.input_size, "seed": s.seed}


def chunking_exact(s: Settings) -> dict:
    """Whether the first layer's entropy scores with chunks of 2 images equal whole classes' (K = 2, N = 5)."""
    small = replace(s, classes=2, per_class=5)
    model, surgeon = vgg16(small)
    group = surgeon.groups[0]
    name, conv = group.names[0], group.convs[0]
    layer = scoring.LayerSpec(model=model, conv=conv, name=name)
    per_image = conv.out_channels * s.input_size**2 * 4  # units [C, s, s] float32 (3×3 conv, padding 1)
    source = replace(source_of(small), chunk_bytes=2 * per_image)  # chunks of 1, 2, 2 images
    whole = scoring.create("entropy")(layer, class_batches(model, conv, name, source))
    chunked = score_group(model, group, scoring.create("entropy"), source)
    return {"settings": chunking_settings(s), "outcome": "complete", "layer": name,
            "scorer": "entropy", "classes": 2, "per_class": 5, "chunks": [1, 2, 2],
            "equal": bool(torch.equal(chunked, whole))}


def row_of(entry: dict) -> dict:
    """A scorer's summary row: outcome, layers covered, peak and baseline RSS, seconds per layer."""
    layers = entry.get("layers", [])
    row = {"scorer": entry["scorer"], "outcome": entry["outcome"], "needs_data": entry.get("needs_data"),
           "layers_covered": f"{len(layers)} of {entry.get('layers_total', '?')}", "layers_measured": len(layers)}
    if "baseline_rss_bytes" in entry and entry["outcome"] != "refused":
        peak = entry["peak_rss_bytes"]
        row.update(peak_rss_gib=round(peak / GIB, 3), baseline_rss_gib=round(entry["baseline_rss_bytes"] / GIB, 3),
                   within_goal=peak <= GOAL_GIB * GIB)
    row.update(seconds_per_layer={r["name"]: r["layer_s"] for r in layers},
               scoring_seconds_per_layer={r["name"]: r["scoring_s"] for r in layers})
    row.update({k: entry[k] for k in ("reason", "exit", "error") if k in entry})
    return row


def summary(s: Settings, scorers: list[str], folder: Path, deepest_folder: Path | None = None) -> dict:
    """Every scorer file made under the current settings, one row each, and the chunking check;
    with `deepest_folder`, also the rows of the scorers measured there on the last layers
    (`--deepest`, the other settings the same), which count towards `all_within_goal`."""
    current = {name: e for name in scorers
               if (e := read(folder / f"{name}.json")) and e.get("settings") == recorded(s.of(name))}
    rows = [row_of(current[name]) if name in current
            else {"scorer": name, "outcome": "missing", "layers_covered": "—", "seconds_per_layer": {}}
            for name in scorers]
    deepest = [] if deepest_folder is None else deepest_rows(s, scorers, deepest_folder)
    measured = [r for r in rows + deepest if r["outcome"] != "refused"]
    result = {"benchmark": "memory", "machine": machine(), "settings": recorded(s), "goal_gib": GOAL_GIB,
              "all_within_goal": bool(measured) and all(r["outcome"] == "complete" and r.get("within_goal")
                                                        for r in measured),
              "scorers": rows, "chunking_exact": read(folder / "chunking.json")}
    return result | ({"deepest": deepest} if deepest else {})


def deepest_rows(s: Settings, scorers: list[str], folder: Path) -> list[dict]:
    """Rows of `scorers` measured on their last layers in `folder` (`--deepest`) with the settings of
    `s` but the layers measured."""
    def others(settings: dict) -> dict:
        return {k: v for k, v in settings.items() if k not in ("layers", "deepest")}

    return [row_of(e) for name in scorers
            if (e := read(folder / f"{name}.json")) and others(e.get("settings", {})) == others(recorded(s))]


def markdown(result: dict) -> str:
    """A paragraph on the settings, then scorer · outcome · layers · peak RSS · s/layer per layer name."""
    s, rows = result["settings"], result["scorers"]
    names = max((list(r["seconds_per_layer"]) for r in rows), key=len, default=[])
    table = markdown_table(
        ["scorer", "outcome", "layers", "peak RSS GiB", "peak before scoring GiB", f"≤ {GOAL_GIB:g} GiB",
         *(f"{n} s" for n in names)],
        [[r["scorer"], r["outcome"], r["layers_covered"],
          *(f"{r[k]:.3f}" if k in r else "—" for k in ("peak_rss_gib", "baseline_rss_gib")),
          {True: "yes", False: "no"}.get(r.get("within_goal"), "—"),
          *(f"{r['seconds_per_layer'][n]:.1f}" if n in r["seconds_per_layer"] else "" for n in names)]
         for r in rows])
    notes = [f"- {r['scorer']}: refused: {r['reason']}" for r in rows if r["outcome"] == "refused"]
    notes += [f"- {r['scorer']}: failed (exit {r['exit']}): {r['error']}" for r in rows if r["outcome"] == "failed"]
    deep = result.get("deepest", [])
    if deep:
        notes.append("- on the last layers (`--deepest`, the earlier ones pruned on placeholder scores; "
                     "memory-deepest.md): " + ", ".join(
                         f"{r['scorer']} {r['peak_rss_gib']:.2f} GiB" if r["outcome"] == "complete"
                         else f"{r['scorer']} {r['outcome']}" for r in deep) + ".")
    c = result["chunking_exact"]
    check = "" if c is None else (f"\n\nChunked entropy scores equal whole-class scores: {c['equal']} "
                                  f"(layer `{c['layer']}`, K = 2, N = 5, chunks {c['chunks']}).")
    return (f"Pruning VGG16 (random weights) at {s['input_size']}², ratio {s['ratio']}, K = {s['classes']} "
            f"classes × N = {s['per_class']} noise images, chunks of {s['chunk_mib']} MiB, prefix cache "
            f"{s['cache_bytes'] / GIB:g} GiB (disk spill {s['spill_bytes'] / GIB:g} GiB), each scorer in a process of its "
            f"own: peak resident memory (goal ≤ {GOAL_GIB:g} GiB) and seconds per layer (scoring_top1, scoring, "
            "surgery)" + (f", on the last {s['deepest']} layer(s) only, the earlier ones pruned on placeholder scores"
                          if s.get("deepest") else "") + ".\n\n" + table + ("\n\n" + "\n".join(notes) if notes else "") + check)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scorers", nargs="+", help="the scorers measured (default: every registered scorer)")
    p.add_argument("--quick", action="store_true", help="K = 2, N = 10, 2 layers (results under memory-quick)")
    p.add_argument("--classes", type=positive_int, help="K (default 10; 2 with --quick)")
    p.add_argument("--samples-per-class", dest="per_class", type=positive_int, help="N (default 100; 10 with --quick)")
    span = p.add_mutually_exclusive_group()
    span.add_argument("--layers", type=positive_int,
                   help="the first L layers of a scorer that needs data (default all 13; 2 with --quick); "
                        "a weight-only scorer always does all 13, in seconds")
    span.add_argument("--deepest", type=positive_int,
                   help="the last L layers of a scorer that needs data, the earlier ones pruned on placeholder "
                        "scores (results under memory-deepest; weight-only scorers not run)")
    p.add_argument("--input-size", type=positive_int, help="image side (default 224; VGG16 needs 32 or more)")
    p.add_argument("--chunk-mib", type=positive_int,
                   help=f"most MiB in the largest tensor of a forward chunk (default {FULL.chunk_mib}, as python -m prune)")
    p.add_argument("--results", type=Path, default=RESULTS, help=f"where the files go (default {RESULTS})")
    p.add_argument("--report-only", action="store_true", help="only rewrite the summary from the scorer files")
    p.add_argument("--scorer", help="measure this one scorer in this process (what the benchmark runs for each)")
    a = p.parse_args(argv)
    s = settings_from(a, full=FULL, quick=QUICK)
    if s.deepest:
        s = replace(s, layers=None)  # the last layers instead of the first (--quick's 2)
    folder = folder_of(a.results, a.quick, s.deepest)

    def job() -> int:
        if a.scorer is not None:
            measure(a.scorer, s.of(a.scorer), folder / f"{a.scorer}.json")
            return 0
        scorers = a.scorers or scoring.list_scorers()
        if s.deepest:
            scorers = [name for name in scorers if scoring.scorer_info(name).needs_data]
        with usage_errors():
            for name in scorers:
                scoring.scorer_info(name)  # an unknown name: one line naming the known ones
        if not a.report_only:
            for name in scorers:
                if finished(folder / f"{name}.json", recorded(s.of(name))):
                    print(f"{name}: finished under these settings, skipped", flush=True)
                    continue
                entry = run_scorer(name, s, a.results, a.quick)
                print(f"{name}: {entry['outcome']}", flush=True)
            if not finished(folder / "chunking.json", chunking_settings(s)):
                write_json(folder / "chunking.json", chunking_exact(s))
        result = summary(s, scorers, folder, None if s.deepest else folder_of(a.results, a.quick, deepest=1))
        base = folder
        write_json(base.with_suffix(".json"), result)
        write_text(base.with_suffix(".md"), markdown(result) + "\n")
        print(markdown(result))
        return 0

    return exit_code(job)


if __name__ == "__main__":
    raise SystemExit(main())
