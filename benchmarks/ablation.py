"""Cumulative unit ablation (paper A.7.1, Fig. 12 and Table 11).

    python -m benchmarks.ablation [--quick] [--layer NAME] [--class C] [--scorers l1,entropy,...]

For one layer (default: the last conv) and each class c, every scorer ranks the layer's
units on c's training images (selectivity, which needs at least two classes, on the
training images of all classes; it is the same for every c). The units are then zeroed
cumulatively with a forward hook (no surgery) in two orders:

- ascending: lowest score first, i.e. the least important unit first (the pruning order;
  for feature entropy this is the paper's "descending feature entropy", Fig. 12B);
- descending: highest score first, the most important unit first (paper Fig. 12A).

After each step the test accuracy and mean cross-entropy on c's test images and the
one-vs-rest balanced accuracy of c on the whole test split are recorded. "Zeroing a unit" is
done at the output of the BN after the conv (or the conv itself), so the unit after its
ReLU is exactly 0 (where a residual addition follows, only this branch is zeroed, matching
the units `prune.pipeline.observe` scores). The unit module's output on the test images is computed once and only
the rest of the network is re-run per step (torch.fx split; a whole forward with a masking
hook when the model cannot be split).

Fig. 12: the curves of every scorer for `--class`. Table 11: per scorer, the balanced
accuracy of c of the unchanged network and the best reached at any step of either order,
averaged over the classes.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

import scoring
from benchmarks.common import (
    ExperimentSettings,
    Setup,
    base_parser,
    load_setup,
    markdown_table,
    new_figure,
    not_run,
    parse_settings,
    positive_int,
    run_experiment,
    setup_info,
)
from benchmarks.layers import class_batch, find_conv, per_class_count, refusal, score_layer
from benchmarks.tail import LayerTail
from finetune.metrics import class_metrics
from prune import UsageError, exit_code

ORDERS = ("ascending", "descending")
METRICS = ("accuracy", "loss", "balanced_accuracy")
NEEDS_ALL_CLASSES = frozenset({"selectivity"})


@dataclass(frozen=True)
class Settings(ExperimentSettings):
    """The ablation's work: `scorers` None = every registered scorer; `table_classes` None = all."""

    layer: str | None = None
    scorers: tuple[str, ...] | None = None
    samples_per_class: int = 100
    step: int = 1
    table_classes: int | None = None


FULL = Settings()
QUICK = Settings(quick=True, samples_per_class=20, step=8, table_classes=3)


def _scorer_names(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    for name in names:
        try:
            scoring.scorer_info(name)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return names


def parse_args(argv: list[str] | None) -> Settings:
    p = base_parser("ablation", __doc__)
    p.add_argument("--layer", help="conv layer name (default: the last conv)")
    p.add_argument("--scorers", type=_scorer_names, help="comma-separated scorers (default: all registered)")
    p.add_argument("--samples-per-class", type=positive_int, help="training images per class for scoring (100; 20 quick)")
    p.add_argument("--step", type=positive_int, help="units zeroed per step (1; 8 quick)")
    p.add_argument("--table-classes", type=positive_int, help="first classes averaged in Table 11 (all; 3 quick)")
    return parse_settings(p, argv, full=FULL, quick=QUICK)


def scorer_names(s: Settings, model: nn.Module, *, classes: int, samples_per_class: int) -> tuple[list[str], dict]:
    """The scorers compared and those left out with the reason: `s.scorers` (one that refuses
    `model` is a usage error), or every registered one that accepts `model` (`Scorer.check`,
    e.g. tp-bnscale needs BatchNorm)."""
    names = list(s.scorers) if s.scorers is not None else scoring.list_scorers()
    kept, skipped = [], {}
    for name in names:
        why = refusal(scoring.create(name), model, classes=classes, samples_per_class=samples_per_class)
        if why is not None and s.scorers is not None:
            raise UsageError(why)
        if why is None:
            kept.append(name)
        else:
            skipped[name] = why
    return kept, skipped


def ablation_masks(order: torch.Tensor, steps: Sequence[int]) -> torch.Tensor:
    """Masks [S, C]: row s has the first `steps[s]` channels of `order` zeroed."""
    masks = torch.ones(len(steps), len(order))
    for row, k in enumerate(steps):
        masks[row, order[:k]] = 0.0
    return masks


# ---------------------------------------------------------------- the experiment


def steps_for(channels: int, step: int) -> list[int]:
    """Numbers of ablated units after each step: 0, step, 2·step, …, channels."""
    steps = list(range(0, channels + 1, max(1, step)))
    return steps if steps[-1] == channels else [*steps, channels]


def ablation_curve(tail: LayerTail, labels: torch.Tensor, order: torch.Tensor, steps: list[int], cls: int) -> dict[str, list[float]]:
    """Class metrics after zeroing the first k units of `order`, for k in `steps`."""
    curve: dict[str, list[float]] = {m: [] for m in METRICS}
    for logits in tail.logits_many(ablation_masks(order, steps)):
        for key, value in class_metrics(logits, labels, cls).items():
            curve[key].append(value)
    return curve


def orders_of(scores: torch.Tensor) -> dict[str, torch.Tensor]:
    """Unit orders (ties by lower index): ascending and descending score."""
    asc = torch.argsort(scores, stable=True)
    desc = torch.argsort(-scores, stable=True)
    return {"ascending": asc, "descending": desc}


def run_ablation(setup: Setup) -> dict:
    """Curves for every class and scorer; returns the JSON payload."""
    model, data, cfg = setup.model, setup.data, setup.settings
    name, conv = find_conv(model, cfg.layer)
    n = per_class_count(data, cfg.samples_per_class)
    names, skipped = scorer_names(cfg, model, classes=setup.num_classes, samples_per_class=n)
    classes = list(range(setup.num_classes))[: cfg.table_classes]
    if cfg.cls not in classes:
        classes.append(cfg.cls)
    images, labels = setup.test
    steps = steps_for(conv.out_channels, cfg.step)
    batches = {
        c: class_batch(model, conv, name, data, c, n, seed=cfg.seed)
        for c in tqdm(range(setup.num_classes), desc="units", disable=cfg.quiet)
    }
    tail = LayerTail(model, conv, images)
    shared = {
        s: score_layer(s, model, conv, name, list(batches.values())) for s in names if s in NEEDS_ALL_CLASSES
    }
    per_class: dict[int, dict] = {}
    scores_fig: dict[str, list[float]] = {}
    for c in tqdm(classes, desc="classes", disable=cfg.quiet):
        per_class[c] = {}
        for s in names:
            scores = shared[s] if s in shared else score_layer(s, model, conv, name, [batches[c]])
            if c == cfg.cls:
                scores_fig[s] = [float(v) for v in scores]
            per_class[c][s] = {o: ablation_curve(tail, labels, order, steps, c) for o, order in orders_of(scores).items()}
    ones, zeros = torch.ones(conv.out_channels), torch.zeros(conv.out_channels)
    return {
        "experiment": "ablation (paper A.7.1, Fig. 12, Table 11)",
        "setup": setup_info(setup),
        "layer": name,
        "channels": conv.out_channels,
        "class": cfg.cls,
        "class_name": data.classes[cfg.cls],
        "samples_per_class": n,
        "scorers": names,
        "scorers_skipped": skipped,
        "orders": {"ascending": "lowest score (least important) first", "descending": "highest score first"},
        "steps": steps,
        "unchanged": class_metrics(tail.logits(ones), labels, cfg.cls),
        "all_zero": class_metrics(tail.logits(zeros), labels, cfg.cls),
        "scores": scores_fig,
        "curves": per_class[cfg.cls],
        "table11": table11(per_class, names),
    }


def table11(per_class: dict[int, dict], scorers: list[str]) -> dict:
    """Per scorer: balanced accuracy of the unchanged network and the best reached during
    ablation (any step, either order), each averaged over the classes."""
    rows = {}
    for s in scorers:
        base = [per_class[c][s]["ascending"]["balanced_accuracy"][0] for c in per_class]
        best = {o: [max(per_class[c][s][o]["balanced_accuracy"]) for c in per_class] for o in ORDERS}
        overall = np.maximum(best["ascending"], best["descending"])
        rows[s] = {
            "unchanged": float(np.mean(base)),
            "ablated": float(np.mean(overall)),
            "enhanced": float(np.mean(overall) - np.mean(base)),
            "best_ascending": float(np.mean(best["ascending"])),
            "best_descending": float(np.mean(best["descending"])),
            "per_class_unchanged": [float(v) for v in base],
            "per_class_best": [float(v) for v in overall],
        }
    return {"classes": sorted(per_class), "rows": rows}


def curve_rows(result: dict) -> list[list]:
    """Summary of the Fig. 12 curves: start, peak, end and where accuracy first hits 0."""
    rows = []
    steps = result["steps"]
    for s, by_order in result["curves"].items():
        for o in ORDERS:
            acc, loss = by_order[o]["accuracy"], by_order[o]["loss"]
            peak = int(np.argmax(acc))
            zero = next((steps[i] for i, a in enumerate(acc) if a == 0.0), "-")
            rows.append([s, o, acc[0], max(acc), steps[peak], zero, max(loss)])
    return rows


def markdown(result: dict) -> str:
    t11 = result["table11"]["rows"]
    return "\n\n".join(
        [
            f"## Cumulative unit ablation — layer `{result['layer']}` ({result['channels']} units)",
            f"Fig. 12 curves for class {result['class']} ({result['class_name']!r}); scores from "
            f"{result['samples_per_class']} training images per class; unchanged class accuracy "
            f"{result['unchanged']['accuracy']:.3f}, all-zero layer accuracy {result['all_zero']['accuracy']:.3f} "
            f"(loss {result['all_zero']['loss']:.3f}). 'ascending' = least important (lowest score) unit first."
            + (f" {not_run(result['scorers_skipped'])}" if result.get("scorers_skipped") else ""),
            markdown_table(
                ["scorer", "order", "acc. unchanged", "peak acc.", "at units", "acc. = 0 at", "peak loss"],
                curve_rows(result),
            ),
            f"### Table 11 — one-vs-rest balanced accuracy, mean over {len(result['table11']['classes'])} classes",
            markdown_table(
                ["scorer", "unchanged", "ablated (best)", "enhanced", "best ascending", "best descending"],
                [[s, r["unchanged"], r["ablated"], r["enhanced"], r["best_ascending"], r["best_descending"]] for s, r in t11.items()],
            ),
        ]
    )


def figures(result: dict) -> dict:
    """Fig. 12 (curves of all scorers) and Table 11 as bars."""
    fig, axes = new_figure(2, 2, size=(5.5, 3.6))
    steps = result["steps"]
    for row, order in enumerate(("descending", "ascending")):
        for col, metric in enumerate(("accuracy", "loss")):
            ax = axes[row][col]
            for s, by_order in result["curves"].items():
                ax.plot(steps, by_order[order][metric], label=s, lw=2.2 if s == "entropy" else 1.2)
            ax.axhline(result["all_zero"][metric], color="grey", ls=":", lw=1, label="all units zero")
            ax.set_xlabel("units ablated")
            ax.set_ylabel(f"class {metric}")
            first = "most important" if order == "descending" else "least important"
            ax.set_title(f"{order} score order ({first} first)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Cumulative ablation of {result['layer']}, class {result['class_name']!r}")
    bars, ax = new_figure(1, 1, size=(7, 3.5))
    ax = ax[0][0]
    rows = result["table11"]["rows"]
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["unchanged"] for r in rows.values()], 0.4, label="unchanged")
    ax.bar(x + 0.2, [r["ablated"] for r in rows.values()], 0.4, label="best during ablation")
    ax.set_xticks(x, list(rows))
    ax.set_ylabel("one-vs-rest balanced accuracy")
    ax.set_ylim(0.4, 1.0)
    ax.legend()
    ax.set_title("Table 11: mean over classes")
    return {"curves": fig, "table11": bars}


def main(argv: list[str] | None = None) -> int:
    """Run the experiment and write ablation.{json,md} and ablation-*.png; returns 0."""
    s = parse_args(argv)
    return run_experiment("ablation", s, lambda: run_ablation(load_setup(s)), markdown, figures)


if __name__ == "__main__":
    raise SystemExit(exit_code(main))
