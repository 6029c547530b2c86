"""Every scorer through the same pipeline and budget, on several testbeds, with enough seeds to rank.

    python -m benchmarks.compare                    # full: four testbeds, ≥ 10 seeds, N = 100
    python -m benchmarks.compare --preset quick     # a smoke run (2 seeds, N = 5, no fine-tune epochs)

Testbeds: `embedded` (VGG with BatchNorm on the generated shapes10, last maps 8x8),
`embedded-plain` (the same without BatchNorm, last maps 16x16, the paper's setting), and the
same two on real images, `fashion` (last maps 7x7) and `fashion-plain` (14x14) on Fashion-MNIST,
which fine-tune on a fixed class-balanced subset of 10,000 training images (`--train-images`)
to keep a run near a minute. Every project scorer (HRank, CHIP and ThiNet included) runs on
every testbed; torch-pruning's own criteria (the `tp-*` peers) run on the Fashion-MNIST testbeds.
An arm whose scorer refuses a testbed's model (`Scorer.check`: `tp-bnscale` needs BatchNorm,
`thinet` a conv or linear consumer, ...) is skipped there, its one-line reason printed and kept
in the summary. For each testbed, arm (a scorer with its options) and
seed, the main job runs unchanged: progressive selection with BatchNorm re-estimated after each
layer, torch-pruning surgery, the paper's fine-tuning schedule. A seed changes the scoring
images, every scorer's own draws and the fine-tuning order; the same seed gives every arm the
same images and order, so differences between arms are **paired** by seed.

Reported per testbed and arm: mean and 95% t-interval of top-1 right after pruning, after
pruning with BatchNorm statistics re-estimated (no fine-tune), and after fine-tuning; and the
paired difference of fine-tuned top-1 against `random` and against `l1` (over the seeds both
arms have). Seeds are added to an arm, two at a time, until its fine-tuned half-width is at most
`target_halfwidth` (0.03), or `--max-seeds` is reached; every arm runs seeds 0..n-1.

One JSON file per run under benchmarks/results/compare/<testbed>/ (compare-quick/ for the quick
preset); finished runs are skipped on restart. The summary goes to benchmarks/results/compare.{json,md,png}
(compare-quick.* for the quick preset).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path

import prune
import scoring
from benchmarks.common import RESULTS, machine, markdown_table, new_figure, not_run, save_figure, settings_json
from benchmarks.layers import refusal
from prune import LayerResult, PruneConfig, PruneReport, exit_code, write_json, write_text


@dataclass(frozen=True)
class Arm:
    """A scorer with its options, as compared."""

    name: str
    scorer: str
    options: tuple[tuple[str, object], ...] = ()


ARMS: tuple[Arm, ...] = (
    Arm("entropy", "entropy"),
    Arm("entropy-authors", "entropy", (("convention", "authors"),)),
    Arm("l1", "l1"),
    Arm("fpgm", "fpgm"),
    Arm("apoz", "apoz"),
    Arm("selectivity", "selectivity"),
    Arm("nisp", "nisp"),
    Arm("hrank", "hrank"),
    Arm("chip", "chip"),
    Arm("thinet", "thinet"),
    Arm("random", "random"),
)
"""The arms compared by default."""
EXTRA_ARMS: tuple[Arm, ...] = tuple(Arm(name, name) for name in scoring.list_scorers("tp-*"))
"""torch-pruning's own criteria: the peers of the Fashion-MNIST testbeds, anywhere when named in `--arms`."""
BASELINES = ("random", "l1")


@dataclass(frozen=True)
class Study:
    """What a seeded study of the main job shares (benchmarks.compare, benchmarks.budget): testbeds,
    the scoring and fine-tuning budget, seeds, parallel runs and where one JSON per run goes."""

    testbeds: tuple[str, ...] = ("embedded", "embedded-plain", "fashion", "fashion-plain")
    train_images: tuple[tuple[str, int], ...] = (("fashion", 10_000), ("fashion-plain", 10_000))
    """Testbeds that fine-tune on a fixed class-balanced subset of the train split (`--train-images`)."""
    samples_per_class: int = 100
    epochs: int = 3
    seeds: int = 10
    jobs: int = 2
    results: Path = RESULTS
    name: str = "compare"

    @property
    def runs_dir(self) -> Path:
        """One JSON per run; a preset of its own keeps its runs apart from the full ones."""
        return self.results / self.name

    def config(self, testbed: str, arm: str, seed: int) -> PruneConfig:
        """The main job's settings of one run (each study says what its arms are)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Settings(Study):
    """What the comparison runs (frozen; `quick` and `full` presets below)."""

    arms: tuple[str, ...] = tuple(a.name for a in ARMS)
    peers: tuple[str, ...] = tuple(a.name for a in EXTRA_ARMS)
    """Arms added on `peer_testbeds` only (where the scorer applies to the model)."""
    peer_testbeds: tuple[str, ...] = ("fashion", "fashion-plain")
    ratio: float = 0.5
    max_seeds: int = 80
    target_halfwidth: float = 0.03

    def config(self, testbed: str, arm: str, seed: int) -> PruneConfig:
        """The main job at `ratio` with the arm's scorer and options."""
        a = arm_of(arm)
        return study_config(self, testbed, seed, ratio=self.ratio, scorer=a.scorer, scorer_options=a.options)

    def wanted(self, testbed: str) -> tuple[str, ...]:
        """The arms asked for on `testbed`: `arms`, plus the peers on a peer testbed."""
        peers = self.peers if testbed in self.peer_testbeds else ()
        return self.arms + tuple(p for p in peers if p not in self.arms)

    def arms_of(self, testbed: str) -> tuple[str, ...]:
        """The arms run on `testbed`: those of `wanted` that apply to its model."""
        return tuple(a for a in self.wanted(testbed) if applies(a, testbed))

    def skipped(self, testbed: str) -> dict[str, str]:
        """The arms of `wanted` that `testbed`'s model refuses, with the scorer's one-line reason."""
        return {a: why for a in self.wanted(testbed) if (why := refusal_of(a, testbed)) is not None}


PRESETS = {
    "full": Settings(),
    "quick": Settings(testbeds=("embedded", "embedded-plain"), samples_per_class=5, epochs=0, seeds=2, max_seeds=2,
                      jobs=1, name="compare-quick"),
}


def arm_of(name: str) -> Arm:
    """The arm called `name` (default or peer)."""
    return next(a for a in ARMS + EXTRA_ARMS if a.name == name)


@functools.cache
def refusal_of(arm_name: str, testbed: str) -> str | None:
    """Why the arm's scorer refuses the testbed's model (`Scorer.check`'s one line, e.g. tp-bnscale
    without BatchNorm), or None if it applies; `testbed` is a model name `prune.create_model` takes."""
    from prune import create_model

    arm = arm_of(arm_name)
    model = create_model(testbed, pretrained=False)  # the architecture is all a check looks at
    return refusal(scoring.create(arm.scorer, **dict(arm.options)), model, classes=2, samples_per_class=2)


def applies(arm_name: str, testbed: str) -> bool:
    """True unless the arm's scorer refuses the testbed's model (`refusal_of`)."""
    return refusal_of(arm_name, testbed) is None


def t95(n: int) -> float:
    """Two-sided 95% Student-t quantile for a mean of n values (n - 1 degrees of freedom)."""
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1))


def mean_ci(values: list[float]) -> tuple[float, float | None]:
    """Mean and half-width of its 95% t-interval (None, JSON null, for fewer than two values)."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, None
    return m, t95(len(values)) * statistics.stdev(values) / math.sqrt(len(values))


def removed_digest(layers: Sequence[LayerResult]) -> str:
    """sha256 of the removed channel indices of every layer, in layer order."""
    text = json.dumps([[layer.name, list(layer.removed)] for layer in layers])
    return hashlib.sha256(text.encode()).hexdigest()


def run_path(settings: Study, testbed: str, arm: str, seed: int) -> Path:
    return settings.runs_dir / testbed / f"{arm}-s{seed:03d}.json"


def study_config(settings: Study, testbed: str, seed: int, **arm: object) -> PruneConfig:
    """The settings of one run: the study's testbed, scoring and fine-tuning budget and seed, plus the
    arm's own fields (`arm`: scorer, ratio, target, ...)."""
    return PruneConfig(
        model=testbed, samples_per_class=settings.samples_per_class, epochs=settings.epochs,
        finetune=settings.epochs > 0, train_images=dict(settings.train_images).get(testbed), seed=seed, **arm,
    )


def run_main_job(config: PruneConfig, arm: str) -> tuple[PruneReport, dict]:
    """Run `config` on one thread in a temporary folder: its report, and the entry every study
    records (testbed, arm as "scorer", seed, accuracies, selection digest, cost, seconds, settings)."""
    import torch

    torch.set_num_threads(1)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        report = prune.run(config, out=Path(tmp) / "out", quiet=True)
    entry = {
        "testbed": config.model,
        "scorer": arm,
        "seed": config.seed,
        "top1": report.after.top1,
        "top1_pruned": report.pruned_before_finetune.top1,
        "top1_pruned_bn": report.pruned_bn_reestimated.top1,
        "top1_unpruned": report.before.top1,
        "removed_sha256": removed_digest(report.layers),
        "params": report.after.params,
        "flops": report.after.flops,
        "seconds": round(time.perf_counter() - start, 1),
        "settings": config.as_dict(),
    }
    return report, entry


def run_one(settings: Settings, testbed: str, arm_name: str, seed: int) -> dict:
    """One main job on one thread; writes and returns its result entry."""
    arm = arm_of(arm_name)
    report, entry = run_main_job(settings.config(testbed, arm.name, seed), arm.name)
    entry.update(scorer_options=dict(arm.options), scoring_top1=[layer.scoring_top1 for layer in report.layers],
                 map_size=[layer.map_size for layer in report.layers])
    write_json(run_path(settings, testbed, arm.name, seed), entry)
    return entry


def is_current(settings: Study, entry: dict) -> bool:
    """True if a run file's `entry` was run with the settings `settings` gives that run now (same
    `PruneConfig.fingerprint`; a field added since counts at its default). A run made under other
    settings is neither reused nor summarised."""
    try:
        saved = PruneConfig.from_dict(entry["settings"])
    except (KeyError, TypeError, AttributeError, prune.UsageError):
        return False
    return saved.fingerprint() == settings.config(entry["testbed"], entry["scorer"], entry["seed"]).fingerprint()


def finished_run(settings: Study, testbed: str, arm: str, seed: int) -> bool:
    """True if the run has a file made under the current settings (`is_current`)."""
    path = run_path(settings, testbed, arm, seed)
    return path.exists() and is_current(settings, json.loads(path.read_text()))


def load_runs(settings: Study) -> list[dict]:
    """Every finished run of the settings' testbeds and arms made under the current settings."""
    runs = []
    for testbed in settings.testbeds:
        for arm in settings.arms_of(testbed):
            for path in sorted((settings.runs_dir / testbed).glob(f"{arm}-s*.json")):
                entry = json.loads(path.read_text())
                if is_current(settings, entry):
                    runs.append(entry)
    return runs


def run_seeds(settings: Study, seeds: dict[tuple[str, str], int], job: Callable[..., dict] = run_one) -> None:
    """Run every missing (testbed, arm, seed) for seed < seeds[testbed, arm], `settings.jobs`
    processes at a time; `job(settings, testbed, arm, seed)` runs one (a module-level function)
    and returns its entry, with the keys printed below."""
    todo = sorted(
        ((testbed, arm, seed) for (testbed, arm), n in seeds.items() for seed in range(n)
         if not finished_run(settings, testbed, arm, seed)),
        key=lambda job: job[2],  # seed by seed, so a partial run covers every testbed and arm
    )
    if not todo:
        return
    print(f"{len(todo)} runs to do", flush=True)
    with ProcessPoolExecutor(max_workers=settings.jobs, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(job, settings, *one): one for one in todo}
        for done, future in enumerate(futures, 1):
            r = future.result()
            print(f"[{done}/{len(todo)}] {r['testbed']:15s} {r['scorer']:16s} seed {r['seed']:2d}: pruned "
                  f"{r['top1_pruned']:.4f}, BN re-estimated {r['top1_pruned_bn']:.4f}, fine-tuned {r['top1']:.4f} "
                  f"({r['seconds']:.0f}s)", flush=True)


def run_every_arm(settings: Study, job: Callable[..., dict]) -> None:
    """`run_seeds` with seeds 0..settings.seeds-1 for every arm (`settings.arms_of`) of every testbed."""
    run_seeds(settings, {(tb, arm): settings.seeds for tb in settings.testbeds for arm in settings.arms_of(tb)}, job=job)


def summarise(runs: list[dict], testbed: str, arms: tuple[str, ...]) -> list[dict]:
    """One row per arm of `testbed`: mean and 95% half-width of each accuracy over seeds."""
    rows = []
    for arm in arms:
        mine = [r for r in runs if r["testbed"] == testbed and r["scorer"] == arm]
        if not mine:
            continue
        row = {"testbed": testbed, "scorer": arm, "seeds": len(mine),
               "distinct_selections": len({r["removed_sha256"] for r in mine})}
        for key in ("top1_pruned", "top1_pruned_bn", "top1"):
            row[key], row[f"{key}_hw95"] = mean_ci([r[key] for r in mine])
        rows.append(row)
    return rows


def paired(runs: list[dict], testbed: str, arms: tuple[str, ...], baseline: str, key: str = "top1") -> list[dict]:
    """Per arm: mean and 95% half-width of (arm − baseline) over the seeds both have run."""
    base = {r["seed"]: r[key] for r in runs if r["testbed"] == testbed and r["scorer"] == baseline}
    rows = []
    for arm in arms:
        if arm == baseline:
            continue
        diffs = [r[key] - base[r["seed"]] for r in runs
                 if r["testbed"] == testbed and r["scorer"] == arm and r["seed"] in base]
        if diffs:
            mean, hw = mean_ci(diffs)
            rows.append({"testbed": testbed, "scorer": arm, "baseline": baseline, "metric": key,
                         "seeds": len(diffs), "mean": mean, "hw95": hw})
    return rows


def needs_more(rows: list[dict], target: float) -> bool:
    return any(r["top1_hw95"] is None or r["top1_hw95"] > target for r in rows)


def fmt(mean: float, hw: float | None, *, signed: bool = False) -> str:
    """`mean ± hw` to 4 decimals (a sign with `signed`); "(one seed)" where there is no interval."""
    value = f"{mean:+.4f}" if signed else f"{mean:.4f}"
    return f"{value} (one seed)" if hw is None else f"{value} ± {hw:.4f}"


def table(rows: list[dict], diffs: list[dict]) -> str:
    """Markdown: accuracies per arm, then the paired differences against each baseline."""
    by = {(d["scorer"], d["baseline"]): d for d in diffs}

    def diff(arm: str, baseline: str) -> str:
        d = by.get((arm, baseline))
        return "—" if d is None else fmt(d["mean"], d["hw95"], signed=True)

    body = [[r["scorer"], r["seeds"], fmt(r["top1_pruned"], r["top1_pruned_hw95"]),
             fmt(r["top1_pruned_bn"], r["top1_pruned_bn_hw95"]), fmt(r["top1"], r["top1_hw95"]),
             diff(r["scorer"], "random"), diff(r["scorer"], "l1")] for r in rows]
    return markdown_table(
        ["scorer", "seeds", "top-1 pruned", "pruned + BN re-estimated", "fine-tuned",
         "fine-tuned − random (paired)", "fine-tuned − l1 (paired)"], body)


def plot(rows: list[dict], path: Path) -> None:
    """Bars of the three accuracies per arm, one panel per testbed (mean ± 95% half-width)."""
    testbeds = list(dict.fromkeys(r["testbed"] for r in rows))
    fig, axes = new_figure(1, len(testbeds), size=(7.0, 4.0))
    keys = (("top1_pruned", "pruned"), ("top1_pruned_bn", "pruned + BN re-estimated"), ("top1", "fine-tuned"))
    for ax, testbed in zip(axes[0], testbeds):
        mine = [r for r in rows if r["testbed"] == testbed]
        w = 0.27
        for k, (key, label) in enumerate(keys):
            xs = [i + (k - 1) * w for i in range(len(mine))]
            ax.bar(xs, [r[key] for r in mine], w, yerr=[r[f"{key}_hw95"] or 0.0 for r in mine], label=label, capsize=2)
        ax.set_xticks(range(len(mine)), [r["scorer"] for r in mine], rotation=30, ha="right")
        ax.set_title(testbed)
        ax.set_ylim(0, 1)
        ax.set_ylabel("top-1 (mean ± 95% CI over seeds)")
    axes[0][0].legend(loc="lower left", fontsize=8)
    save_figure(fig, path)


def report(settings: Settings) -> dict:
    """Summaries of every finished run: writes compare.json, compare.md and compare.png."""
    runs = load_runs(settings)
    rows = [row for tb in settings.testbeds for row in summarise(runs, tb, settings.arms_of(tb))]
    diffs = [d for tb in settings.testbeds for b in BASELINES if b in settings.arms_of(tb)
             for d in paired(runs, tb, settings.arms_of(tb), b)]
    unpruned = {tb: next((r["top1_unpruned"] for r in runs if r["testbed"] == tb), None) for tb in settings.testbeds}
    skipped = {tb: settings.skipped(tb) for tb in settings.testbeds}
    text = [f"# Scorer comparison (ratio {settings.ratio}, N = {settings.samples_per_class} per class, all classes, "
            f"{settings.epochs} fine-tuning epochs)", ""]
    for tb in settings.testbeds:
        top1 = "—" if unpruned[tb] is None else f"{unpruned[tb]:.4f}"
        text += [f"## {tb} (unpruned top-1 {top1})", "",
                 table([r for r in rows if r["testbed"] == tb], [d for d in diffs if d["testbed"] == tb]), ""]
        text += [not_run(skipped[tb]), ""] if skipped[tb] else []
    return write_summary(settings, {"unpruned_top1": unpruned, "skipped": skipped, "rows": rows, "paired": diffs,
                                    "runs": runs}, text, plot)


def write_summary(settings: Study, result: dict, text: list[str], draw: Callable[[list[dict], Path], None]) -> dict:
    """Write <name>.json (the machine, the settings and `result`), <name>.md (`text`) and, when
    `result` has rows, <name>.png (`draw(rows, path)`); print the text; return the JSON's content."""
    summary = {"machine": machine(), "settings": settings_json(settings), **result}
    settings.results.mkdir(parents=True, exist_ok=True)
    write_json(settings.results / f"{settings.name}.json", summary)
    write_text(settings.results / f"{settings.name}.md", "\n".join(text))
    if result["rows"]:
        draw(result["rows"], settings.results / f"{settings.name}.png")
    print("\n".join(text))
    return summary


def compare(settings: Settings) -> dict:
    """Run the missing runs, adding two seeds at a time to each arm whose fine-tuned half-width is
    above the target (seeds 0..n-1 of every arm, so any two arms pair over their common seeds); an
    arm a testbed refuses is skipped there with its reason."""
    for tb in settings.testbeds:
        for arm, why in settings.skipped(tb).items():
            print(f"{tb}: skipping {arm}: {why}", flush=True)
    runs = load_runs(settings)
    seeds = {(tb, arm): max(settings.seeds, sum(r["testbed"] == tb and r["scorer"] == arm for r in runs))
             for tb in settings.testbeds for arm in settings.arms_of(tb)}
    while True:
        run_seeds(settings, seeds)
        runs = load_runs(settings)
        rows = [row for tb in settings.testbeds for row in summarise(runs, tb, settings.arms_of(tb))]
        short = [(r["testbed"], r["scorer"]) for r in rows
                 if needs_more([r], settings.target_halfwidth) and seeds[r["testbed"], r["scorer"]] < settings.max_seeds]
        if not short:
            return report(settings)
        for key in short:
            seeds[key] = min(settings.max_seeds, seeds[key] + 2)
        print(f"half-width above {settings.target_halfwidth}: seeds now "
              f"{ {f'{tb}/{arm}': seeds[tb, arm] for tb, arm in short} }", flush=True)


def study_parser(prog: str, doc: str, presets: dict) -> argparse.ArgumentParser:
    """The flags every seeded study takes: --preset, --testbeds, --seeds, --jobs, --results, --report-only."""
    p = argparse.ArgumentParser(prog=prog, description=doc.splitlines()[0])
    p.add_argument("--preset", choices=tuple(presets), default="full")
    p.add_argument("--testbeds", nargs="+", default=None)
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..n-1 per arm")
    p.add_argument("--jobs", type=int, default=None, help="parallel runs (one thread each)")
    p.add_argument("--results", type=Path, default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--report-only", action="store_true", help="summarise the finished runs, run nothing")
    return p


def given_settings(preset: Study, args: argparse.Namespace, **fields: object) -> Study:
    """`preset` with the study flags of `study_parser` that were given, and `fields` (None: not given)."""
    given = {"testbeds": args.testbeds and tuple(args.testbeds), "seeds": args.seeds, "jobs": args.jobs,
             "results": args.results, **fields}
    return replace(preset, **{k: v for k, v in given.items() if v is not None})


def parse(argv: list[str] | None) -> tuple[Settings, bool]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=tuple(PRESETS), default="full")
    p.add_argument("--testbeds", nargs="+", default=None)
    p.add_argument("--arms", nargs="+", default=None, choices=[a.name for a in ARMS + EXTRA_ARMS],
                   help="exactly these arms on every testbed that takes them (default: the project scorers, plus "
                   "the tp-* peers on the Fashion-MNIST testbeds; an arm a testbed's model refuses is skipped with "
                   "the reason)")
    p.add_argument("--seeds", type=int, default=None, help="seeds to start with per testbed")
    p.add_argument("--max-seeds", type=int, default=None)
    p.add_argument("--jobs", type=int, default=None, help="parallel runs (one thread each)")
    p.add_argument("--results", type=Path, default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--report-only", action="store_true", help="summarise the finished runs, run nothing")
    args = p.parse_args(argv)
    given = {"testbeds": args.testbeds and tuple(args.testbeds), "arms": args.arms and tuple(args.arms),
             "seeds": args.seeds, "max_seeds": args.max_seeds, "jobs": args.jobs, "results": args.results}
    settings = replace(PRESETS[args.preset], **{k: v for k, v in given.items() if v is not None})
    if args.arms:  # exactly the arms named, on every testbed
        settings = replace(settings, peers=())
    return replace(settings, max_seeds=max(settings.max_seeds, settings.seeds)), args.report_only


def main(argv: list[str] | None = None) -> int:
    settings, report_only = parse(argv)
    (report if report_only else compare)(settings)
    return 0


if __name__ == "__main__":
    raise SystemExit(exit_code(main))
