"""The three allocations of a FLOPs budget against each other, fine-tuned, paired by seed.

    python -m benchmarks.budget                    # full: 2 testbeds × 3 allocations × 3 scorers × 10 seeds
    python -m benchmarks.budget --preset quick     # a smoke run (embedded, l1, 2 seeds, N = 5, no fine-tuning)

At `--target-flops 0.25` (about what ratio 0.5 gives) on `fashion-plain` (fine-tuned on its fixed
10,000-image subset, as benchmarks.compare) and `embedded`, every allocation (`uniform`, `global`,
`sensitivity`) runs with `l1`, `entropy` and `tp-fpgm` (the best torch-pruning criterion of the
scorer comparison on fashion-plain), through the main job unchanged (progressive selection, or
one-shot for `global`; the paper's fine-tuning). A seed changes the scoring images, the scorers'
draws and the fine-tuning order; the same seed gives every arm the same, so the differences
against `uniform` (same scorer, same seed) are **paired**; means with 95% t-intervals.

An arm is `<allocation>-<scorer>` (e.g. `sensitivity-l1`). One JSON per run under
benchmarks/results/budget/<testbed>/ (budget-quick/ for the quick preset); finished runs are
skipped on restart. Summary: benchmarks/results/budget.{json,md,png} (the plot: fine-tuned top-1
against the achieved FLOPs fraction).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import markdown_table, new_figure, save_figure
from benchmarks.compare import (
    Study,
    fmt,
    given_settings,
    load_runs,
    mean_ci,
    paired,
    run_every_arm,
    run_main_job,
    run_path,
    study_config,
    study_parser,
    summarise,
    write_summary,
)
from prune import ALLOCATIONS, PruneConfig, exit_code, write_json

BASELINE = "uniform"


@dataclass(frozen=True)
class Settings(Study):
    """What the budget benchmark runs (frozen; `quick` and `full` presets below)."""

    testbeds: tuple[str, ...] = ("fashion-plain", "embedded")
    train_images: tuple[tuple[str, int], ...] = (("fashion-plain", 10_000),)
    name: str = "budget"
    allocations: tuple[str, ...] = ALLOCATIONS
    scorers: tuple[str, ...] = ("l1", "entropy", "tp-fpgm")
    target_flops: float = 0.25

    def arms_of(self, testbed: str) -> tuple[str, ...]:
        """Every `<allocation>-<scorer>` arm (the same on every testbed)."""
        return tuple(arm_name(a, s) for s in self.scorers for a in self.allocations)

    def config(self, testbed: str, arm: str, seed: int) -> PruneConfig:
        """The main job at `target_flops` with the arm's allocation and scorer."""
        allocation, scorer = split_arm(arm)
        return study_config(self, testbed, seed, target_flops=self.target_flops, allocation=allocation, scorer=scorer)


PRESETS = {
    "full": Settings(),
    "quick": Settings(testbeds=("embedded",), scorers=("l1",), samples_per_class=5, epochs=0, seeds=2, jobs=1,
                      name="budget-quick"),
}


def arm_name(allocation: str, scorer: str) -> str:
    return f"{allocation}-{scorer}"


def split_arm(arm: str) -> tuple[str, str]:
    """(allocation, scorer) of an arm name."""
    allocation, scorer = arm.split("-", 1)
    return allocation, scorer


def run_one(settings: Settings, testbed: str, arm: str, seed: int) -> dict:
    """One main job on one thread; writes and returns its result entry ("scorer" holds the arm's name,
    as benchmarks.compare's statistics read it)."""
    allocation, scorer = split_arm(arm)
    report, entry = run_main_job(settings.config(testbed, arm, seed), arm)
    entry.update(allocation=allocation, criterion=scorer, flops_fraction=report.budget.achieved_flops,
                 ratios=list(report.budget.ratios))
    write_json(run_path(settings, testbed, arm, seed), entry)
    return entry


def summary_rows(runs: list[dict], settings: Settings) -> list[dict]:
    """compare's per-arm rows plus the mean achieved FLOPs fraction and the mean per-layer ratios."""
    rows = []
    for tb in settings.testbeds:
        for row in summarise(runs, tb, settings.arms_of(tb)):
            mine = [r for r in runs if r["testbed"] == tb and r["scorer"] == row["scorer"]]
            row["flops_fraction"], row["flops_fraction_hw95"] = mean_ci([r["flops_fraction"] for r in mine])
            row["ratios"] = [sum(col) / len(col) for col in zip(*(r["ratios"] for r in mine))]
            rows.append(row)
    return rows


def paired_rows(runs: list[dict], settings: Settings) -> list[dict]:
    """Per testbed and scorer: fine-tuned top-1 of each allocation minus `uniform`'s, paired by seed."""
    return [d for tb in settings.testbeds for s in settings.scorers
            for d in paired(runs, tb, tuple(arm_name(a, s) for a in settings.allocations), arm_name(BASELINE, s))]


def table(rows: list[dict], diffs: list[dict]) -> str:
    by = {d["scorer"]: d for d in diffs}
    body = [[r["scorer"], r["seeds"], fmt(r["flops_fraction"], r["flops_fraction_hw95"]),
             " ".join(f"{x:.2f}" for x in r["ratios"]), fmt(r["top1_pruned"], r["top1_pruned_hw95"]),
             fmt(r["top1"], r["top1_hw95"]),
             "—" if r["scorer"] not in by else fmt(by[r["scorer"]]["mean"], by[r["scorer"]]["hw95"], signed=True)]
            for r in rows]
    return markdown_table(["arm", "seeds", "achieved FLOPs", "mean ratio per layer", "top-1 pruned",
                           "fine-tuned", f"fine-tuned − {BASELINE} (paired)"], body)


MARKERS = {"uniform": "o", "global": "s", "sensitivity": "^"}


def plot(rows: list[dict], path: Path) -> None:
    """Fine-tuned top-1 against the achieved FLOPs fraction (mean ± 95% half-width), a panel per
    testbed; a colour per scorer, a marker per allocation."""
    testbeds = list(dict.fromkeys(r["testbed"] for r in rows))
    scorers = list(dict.fromkeys(split_arm(r["scorer"])[1] for r in rows))
    fig, axes = new_figure(1, len(testbeds), size=(6.0, 4.5))
    for ax, tb in zip(axes[0], testbeds):
        for r in (r for r in rows if r["testbed"] == tb):
            allocation, scorer = split_arm(r["scorer"])
            ax.errorbar(r["flops_fraction"], r["top1"], xerr=r["flops_fraction_hw95"] or 0.0, yerr=r["top1_hw95"] or 0.0,
                        fmt=MARKERS.get(allocation, "o"), color=f"C{scorers.index(scorer)}", capsize=2,
                        label=r["scorer"])
        ax.set(title=tb, xlabel="achieved FLOPs fraction", ylabel="fine-tuned top-1 (mean ± 95% CI over seeds)")
        ax.legend(fontsize=7)
    save_figure(fig, path)


def report(settings: Settings) -> dict:
    """Summaries of every finished run: writes <name>.json, <name>.md and <name>.png."""
    runs = load_runs(settings)
    rows, diffs = summary_rows(runs, settings), paired_rows(runs, settings)
    text = [f"# Allocations at a FLOPs target of {settings.target_flops} (N = {settings.samples_per_class} per "
            f"class, {settings.epochs} fine-tuning epochs)", ""]
    for tb in settings.testbeds:
        text += [f"## {tb}", "", table([r for r in rows if r["testbed"] == tb], [d for d in diffs
                                                                                 if d["testbed"] == tb]), ""]
    return write_summary(settings, {"rows": rows, "paired": diffs, "runs": runs}, text, plot)


def parse(argv: list[str] | None) -> tuple[Settings, bool]:
    p = study_parser("python -m benchmarks.budget", __doc__, PRESETS)
    p.add_argument("--quick", action="store_true", help="the quick preset (same as --preset quick)")
    p.add_argument("--scorers", nargs="+", default=None)
    p.add_argument("--allocations", nargs="+", default=None, choices=ALLOCATIONS)
    args = p.parse_args(argv)
    preset = PRESETS["quick" if args.quick else args.preset]
    return given_settings(preset, args, scorers=args.scorers and tuple(args.scorers),
                          allocations=args.allocations and tuple(args.allocations)), args.report_only


def main(argv: list[str] | None = None) -> int:
    settings, report_only = parse(argv)
    if not report_only:
        run_every_arm(settings, run_one)
    report(settings)
    return 0


if __name__ == "__main__":
    raise SystemExit(exit_code(main))
