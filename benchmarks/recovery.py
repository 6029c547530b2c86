"""Does the pruned network recover its accuracy, and does the criterion still matter once it does?

    python -m benchmarks.recovery                   # full: 3 testbeds × 4 scorers × 4 recipes + scratch, 5 seeds
    python -m benchmarks.recovery --preset quick    # a smoke run (embedded, 2 scorers, 1 epoch, 2 seeds)

At ratio 0.5 on `fashion-plain` (VGG without BatchNorm), `fashion` (with BatchNorm) and
`fashion-resnet` (ResNet-20), every scorer of `l1`, `tp-fpgm`, `entropy` and `random` is
recovered with every recipe:

- `paper`: the paper's 3 epochs, lr 1e-3 ÷10 per epoch;
- `long`: 15 epochs, cosine schedule with a 5% warm-up, at the testbed's tuned lr;
- `long-distill`: `long` distilled from the unpruned network (α 0.5, T 4: `finetune.distillation`);
- `iterative-distill`: 5 steps of equal increments, 3 epochs after each of the first four and 3 at
  the end (15 in all, as `long`), cosine and distilled, at the tuned lr;

and one `scratch` arm per testbed (at one ratio every scorer leaves the same architecture): the
pruned architecture from fresh weights, trained with the testbed's own training recipe
(`--reinit`; Liu et al. 2019, Scratch-E). Every run fine-tunes (or trains) on the same fixed
class-balanced 10,000 training images (as benchmarks.compare) and reports top-1 on the 10,000
official test images. Scratch therefore trains on a sixth of the 60,000 images the unpruned
network (the pruned arms' start) was trained on: Scratch-E on the full set is the stronger
baseline, which this one bounds from below. A seed changes the scoring images, the scorers' draws and the training
order; the same seed gives every arm the same, so differences are **paired** by seed.

The lr of the cosine recipes is chosen once per testbed, before any comparison, by one
scorer-independent rule: the `long` recipe with the `random` control at seed 1000 (no compared
run's seed) for each lr of
`LR_GRID`; the lr with the best top-1 on 5,000 held-out training images (500 per class, none of
them fine-tuned on) wins, the smaller on a tie. α, T and the warm-up are not tuned. The choice and
its held-out accuracies are written to benchmarks/results/recovery/<testbed>/lr.json.

One JSON per run under benchmarks/results/recovery/<testbed>/ (skipped when finished on restart);
summary benchmarks/results/recovery.{json,md,png}: top-1 per recipe and scorer (mean ± 95%
t-interval), the paired differences entropy − random, entropy − l1, l1 − random per recipe, and
each recipe's best against scratch. A run that ends at chance (top-1 ≤ 0.15) is listed as such.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from benchmarks.common import markdown_table, new_figure, save_figure
from benchmarks.compare import (
    Study,
    fmt,
    given_settings,
    load_runs,
    paired,
    run_every_arm,
    run_main_job,
    run_path,
    study_parser,
    summarise,
    write_summary,
)
from prune import PruneConfig, exit_code, write_json

SCORERS = ("l1", "tp-fpgm", "entropy", "random")
RECIPES: dict[str, dict[str, object]] = {
    "paper": {"epochs": 3, "lr": 1e-3},
    "long": {"epochs": 15, "lr_schedule": "cosine"},
    "long-distill": {"epochs": 15, "lr_schedule": "cosine", "distill": True},
    "iterative-distill": {"epochs": 3, "iterative_steps": 5, "step_epochs": 3, "lr_schedule": "cosine", "distill": True},
}
"""Each recipe's PruneConfig fields; the cosine ones take the testbed's tuned lr."""
SCRATCH = "scratch"
LR_GRID = (1e-3, 3e-3, 1e-2, 3e-2)
HELDOUT_PER_CLASS = 500
TUNING_SEED = 1000
"""The seed of the lr tuning runs: none of the compared runs' seeds."""
CHANCE = 0.15
"""A run at or below this top-1 (chance is 0.1 on 10 classes) is reported as failed to train."""


@dataclass(frozen=True)
class Settings(Study):
    """What the recovery benchmark runs (frozen; `full` and `quick` presets below)."""

    testbeds: tuple[str, ...] = ("fashion-plain", "fashion", "fashion-resnet")
    train_images: tuple[tuple[str, int], ...] = (("fashion-plain", 10_000), ("fashion", 10_000),
                                                 ("fashion-resnet", 10_000))
    name: str = "recovery"
    seeds: int = 5
    jobs: int = 1
    ratio: float = 0.5
    scorers: tuple[str, ...] = SCORERS
    recipes: tuple[str, ...] = tuple(RECIPES)
    lrs: tuple[tuple[str, float], ...] = field(default=())
    """The tuned lr of each testbed (filled in by `with_tuned_lrs`)."""
    recipe_scale: float = 1.0
    """Every recipe's epochs times this (the quick preset's shortcut; 1 in the full run)."""
    scratch: bool = True

    def arms_of(self, testbed: str) -> tuple[str, ...]:
        """`<recipe>-<scorer>` for every recipe and scorer, and `scratch`."""
        return (*(f"{r}-{s}" for r in self.recipes for s in self.scorers), *((SCRATCH,) if self.scratch else ()))

    def recipe(self, testbed: str, name: str) -> dict[str, object]:
        fields = dict(RECIPES[name])
        if fields.get("lr_schedule") == "cosine":
            fields["lr"] = dict(self.lrs)[testbed]
        for key in ("epochs", "step_epochs"):
            if key in fields:
                fields[key] = max(1, round(int(fields[key]) * self.recipe_scale))
        return fields

    def config(self, testbed: str, arm: str, seed: int) -> PruneConfig:
        """The main job at `ratio` with the arm's recipe and scorer (scratch: `--reinit`, scored by l1)."""
        if arm == SCRATCH:
            return replace(self.base(testbed, seed), scorer="l1", reinit=True)
        recipe, scorer = split_arm(arm)
        return replace(self.base(testbed, seed), scorer=scorer, **self.recipe(testbed, recipe))

    def base(self, testbed: str, seed: int) -> PruneConfig:
        return PruneConfig(model=testbed, ratio=self.ratio, samples_per_class=self.samples_per_class,
                           train_images=dict(self.train_images).get(testbed), seed=seed)


PRESETS = {
    "full": Settings(),
    "quick": Settings(testbeds=("embedded",), train_images=(), scorers=("l1", "random"),
                      recipes=("paper", "long-distill"), samples_per_class=5, seeds=2, recipe_scale=0.1,
                      scratch=False, name="recovery-quick"),
}


def split_arm(arm: str) -> tuple[str, str]:
    """(recipe, scorer) of a `<recipe>-<scorer>` arm."""
    recipe = next(r for r in sorted(RECIPES, key=len, reverse=True) if arm.startswith(r + "-"))
    return recipe, arm[len(recipe) + 1:]


# --- the lr of the cosine recipes, chosen once per testbed on held-out training images


def heldout_top1(model_path: Path, testbed: str, settings: Settings) -> float:
    """Top-1 of the pruned model in `model_path` on `HELDOUT_PER_CLASS` training images per class
    that the fixed fine-tuning subset leaves out (the first ones of each class, in file order)."""
    import torch
    from torch.utils.data import Subset

    import prune
    from finetune.metrics import evaluate
    from prune.zoo.data import balanced_subset, make_loader

    data = prune.load_data(None, model=testbed)  # the testbed's own data set
    n = dict(settings.train_images).get(testbed)
    used = set(balanced_subset(data.train_targets, n, classes=len(data.classes))) if n else set()
    taken: dict[int, int] = {}
    held = []
    for i, t in enumerate(data.train_targets):
        if i not in used and taken.get(t, 0) < HELDOUT_PER_CLASS:
            taken[t] = taken.get(t, 0) + 1
            held.append(i)
    torch.set_num_threads(1)
    loader = make_loader(Subset(data.train, held), batch_size=500, shuffle=False, seed=0)
    return evaluate(prune.load_pruned(model_path), loader).top1


def tune_one(settings: Settings, testbed: str, lr: float) -> float:
    """Held-out top-1 of the `long` recipe with `random` at seed `TUNING_SEED` and `lr`."""
    import prune

    config = replace(settings.base(testbed, TUNING_SEED), scorer="random", **{**RECIPES["long"], "lr": lr})
    config = replace(config, epochs=max(1, round(config.epochs * settings.recipe_scale)))
    with tempfile.TemporaryDirectory() as tmp:
        prune.run(config, out=Path(tmp) / "out", quiet=True, speed=False)
        return heldout_top1(Path(tmp) / "out" / "model.pt", testbed, settings)


def tuned_lr(settings: Settings, testbed: str) -> float:
    """The testbed's lr from its lr.json, or chosen now. Each lr's held-out top-1 is written there
    as soon as it is measured (an interrupted tuning resumes at the next lr); "lr" once all are."""
    path = settings.runs_dir / testbed / "lr.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    same = saved.get("seed", TUNING_SEED) == TUNING_SEED and saved.get("grid", list(LR_GRID)) == list(LR_GRID)
    if same and "lr" in saved:
        return float(saved["lr"])
    heldout = {float(k): v for k, v in saved.get("heldout_top1", {}).items()} if same else {}
    record = {"testbed": testbed, "seed": TUNING_SEED, "grid": list(LR_GRID),
              "rule": f"long recipe, random scorer, seed {TUNING_SEED}; best held-out top-1 on {HELDOUT_PER_CLASS} "
                      "training images per class outside the fine-tuning subset"}
    for lr in LR_GRID:
        if lr not in heldout:
            heldout[lr] = tune_one(settings, testbed, lr)
            print(f"{testbed}: lr {lr:g} → held-out top-1 {heldout[lr]:.4f}", flush=True)
            write_json(path, {**record, "heldout_top1": {str(k): v for k, v in heldout.items()}})
    best = max(LR_GRID, key=lambda lr: (heldout[lr], -lr))
    write_json(path, {**record, "lr": best, "heldout_top1": {str(k): v for k, v in heldout.items()}})
    return best


def with_tuned_lrs(settings: Settings) -> Settings:
    return replace(settings, lrs=tuple((tb, tuned_lr(settings, tb)) for tb in settings.testbeds))


# --- runs and summary


def run_one(settings: Settings, testbed: str, arm: str, seed: int) -> dict:
    """One main job on one thread; writes and returns its entry ("scorer" holds the arm's name)."""
    report, entry = run_main_job(settings.config(testbed, arm, seed), arm)
    recipe, scorer = (SCRATCH, "l1") if arm == SCRATCH else split_arm(arm)
    entry.update(recipe=recipe, criterion=scorer, at_chance=report.after.top1 <= CHANCE,
                 steps=[s.as_dict() for s in report.steps])
    write_json(run_path(settings, testbed, arm, seed), entry)
    return entry


def differences(runs: list[dict], settings: Settings) -> list[dict]:
    """Per testbed and recipe: entropy − random, entropy − l1 and l1 − random (fine-tuned top-1, paired by seed)."""
    rows = []
    for tb in settings.testbeds:
        for recipe in settings.recipes:
            for arm, base in (("entropy", "random"), ("entropy", "l1"), ("l1", "random")):
                if arm in settings.scorers and base in settings.scorers:
                    for d in paired(runs, tb, (f"{recipe}-{arm}",), f"{recipe}-{base}"):
                        rows.append({**d, "recipe": recipe, "difference": f"{arm} − {base}"})
            for d in paired(runs, tb, tuple(f"{recipe}-{s}" for s in settings.scorers), SCRATCH):
                rows.append({**d, "recipe": recipe, "difference": f"{split_arm(d['scorer'])[1]} − scratch"})
    return rows


def table(rows: list[dict], settings: Settings, testbed: str) -> str:
    """Fine-tuned top-1 per recipe (rows) and scorer (columns), mean ± 95% half-width (seeds)."""
    by = {r["scorer"]: r for r in rows if r["testbed"] == testbed}

    def cell(arm: str) -> str:
        if arm not in by:
            return "—"
        r = by[arm]
        return fmt(r["top1"], r["top1_hw95"]) + ("" if r["top1_hw95"] is None else f" ({r['seeds']})")

    body = [[recipe, *(cell(f"{recipe}-{s}") for s in settings.scorers)] for recipe in settings.recipes]
    if SCRATCH in by:
        body.append([SCRATCH, cell(SCRATCH), *["" for _ in settings.scorers[1:]]])
    return markdown_table(["recipe", *settings.scorers], body)


def diff_table(diffs: list[dict], testbed: str) -> str:
    body = [[d["recipe"], d["difference"], d["seeds"], fmt(d["mean"], d["hw95"], signed=True)]
            for d in diffs if d["testbed"] == testbed]
    return markdown_table(["recipe", "difference (fine-tuned top-1)", "seeds", "mean ± 95% half-width"], body)


def plot(rows: list[dict], path: Path) -> None:
    """Fine-tuned top-1 by recipe (mean ± 95% half-width), a panel per testbed, a colour per scorer."""
    testbeds = list(dict.fromkeys(r["testbed"] for r in rows))
    recipes = [*RECIPES, SCRATCH]
    fig, axes = new_figure(1, max(1, len(testbeds)), size=(5.5, 4.5))
    for ax, tb in zip(axes[0], testbeds):
        scorers = list(dict.fromkeys(r["criterion"] for r in rows if r["testbed"] == tb))
        for r in (r for r in rows if r["testbed"] == tb):
            x = recipes.index(r["recipe"]) + 0.12 * (scorers.index(r["criterion"]) - len(scorers) / 2)
            ax.errorbar(x, r["top1"], yerr=r["top1_hw95"] or 0.0, fmt="o", capsize=2,
                        color="black" if r["recipe"] == SCRATCH else f"C{scorers.index(r['criterion'])}",
                        label=r["criterion"] if r["recipe"] == "paper" else None)
        unpruned = next((r["top1_unpruned"] for r in rows if r["testbed"] == tb), None)
        if unpruned is not None:
            ax.axhline(unpruned, color="grey", lw=0.8, ls="--", label="unpruned")
        ax.set_xticks(range(len(recipes)), recipes, rotation=30, fontsize=7)
        ax.set(title=tb, ylabel="test top-1 (mean ± 95% CI over seeds)")
        ax.legend(fontsize=7)
    save_figure(fig, path)


def report(settings: Settings) -> dict:
    """Summaries of every finished run: writes <name>.json, <name>.md and <name>.png."""
    runs = load_runs(settings)
    rows = []
    for tb in settings.testbeds:
        for row in summarise(runs, tb, settings.arms_of(tb)):
            mine = [r for r in runs if r["testbed"] == tb and r["scorer"] == row["scorer"]]
            recipe, criterion = (SCRATCH, "l1") if row["scorer"] == SCRATCH else split_arm(row["scorer"])
            row.update(recipe=recipe, criterion=criterion, top1_unpruned=mine[0]["top1_unpruned"],
                       at_chance=sum(r["at_chance"] for r in mine))
            rows.append(row)
    diffs = differences(runs, settings)
    text = [f"# Recovery at ratio {settings.ratio} (N = {settings.samples_per_class} per class, "
            f"lr of the cosine recipes: {dict(settings.lrs)})", ""]
    for tb in settings.testbeds:
        unpruned = next((r["top1_unpruned"] for r in rows if r["testbed"] == tb), None)
        failed = [f"{r['scorer']} ({r['at_chance']} of {r['seeds']})" for r in rows if r["testbed"] == tb
                  and r["at_chance"]]
        mine = [r for r in rows if r["testbed"] == tb]
        text += [f"## {tb}" + ("" if unpruned is None else f" (unpruned top-1 {unpruned:.4f})"), "",
                 table(rows, settings, tb), ""]
        if mine:
            best = max(mine, key=lambda r: r["top1"])
            seeds = "" if best["top1_hw95"] is None else f" over {best['seeds']} seeds"
            text += [f"Best: `{best['scorer']}` {fmt(best['top1'], best['top1_hw95'])}{seeds}, "
                     f"{best['top1'] - unpruned:+.4f} against the unpruned network.", ""]
        text += [diff_table(diffs, tb), ""]
        if failed:
            text += ["Runs at chance (top-1 ≤ 0.15, kept in the means): " + ", ".join(failed), ""]
    return write_summary(settings, {"rows": rows, "paired": diffs, "lrs": dict(settings.lrs), "runs": runs}, text, plot)


def parse(argv: list[str] | None) -> tuple[Settings, bool]:
    p = study_parser("python -m benchmarks.recovery", __doc__, PRESETS)
    p.add_argument("--scorers", nargs="+", default=None)
    p.add_argument("--recipes", nargs="+", default=None, choices=tuple(RECIPES))
    args = p.parse_args(argv)
    return given_settings(PRESETS[args.preset], args, scorers=args.scorers and tuple(args.scorers),
                          recipes=args.recipes and tuple(args.recipes)), args.report_only


def main(argv: list[str] | None = None) -> int:
    settings, report_only = parse(argv)
    if report_only:
        lrs = {tb: saved["lr"] for tb in settings.testbeds if (p := settings.runs_dir / tb / "lr.json").exists()
               and "lr" in (saved := json.loads(p.read_text()))}
        settings = replace(settings, testbeds=tuple(lrs), lrs=tuple(lrs.items()))  # a testbed without one has no runs
    else:
        settings = with_tuned_lrs(settings)
        run_every_arm(settings, run_one)
    report(settings)
    return 0


if __name__ == "__main__":
    raise SystemExit(exit_code(main))
