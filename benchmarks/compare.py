"""Every scorer through the same pipeline and budget: accuracy before and after fine-tuning.

`python -m benchmarks.compare --ratio 0.5 --seeds 3 [--model …] [--data …] [--scorers …] [--json PATH]`

For each scorer and seed, the main job runs unchanged (progressive selection, torch-pruning
surgery, the paper's fine-tuning schedule). Reported: top-1 right after pruning and after
fine-tuning, mean ± 95% t-interval over seeds, plus params and FLOPs. Writes JSON, a
Markdown table and a PNG bar plot under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import scoring  # noqa: E402
from benchmarks.common import RESULTS, machine, markdown_table  # noqa: E402
from prune.config import PruneConfig  # noqa: E402
from prune.outputs.files import write_json, write_text  # noqa: E402
from prune.pipeline.run import run  # noqa: E402

# Two-sided 95% Student-t quantiles for n-1 degrees of freedom (n = number of seeds).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% t-interval (0 for a single value)."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, 0.0
    t = _T95.get(len(values) - 1, 1.96)
    return m, t * statistics.stdev(values) / math.sqrt(len(values))


def run_one(base: PruneConfig, scorer: str, seed: int) -> dict:
    """One pruning run; returns the numbers the comparison needs."""
    config = PruneConfig(**{**base.as_dict(), "scorer": scorer, "seed": seed})
    with tempfile.TemporaryDirectory() as tmp:
        report = run(config, out=Path(tmp) / "out", quiet=True)
    return {
        "scorer": scorer,
        "seed": seed,
        "top1_pruned": report["pruned_before_finetune"]["top1"],
        "top1_finetuned": report["after"]["top1"],
        "top1_unpruned": report["before"]["top1"],
        "params": report["after"]["params"],
        "flops": report["after"]["flops"],
        "seconds": sum(report["timings"].values()),
    }


def summarise(runs: list[dict], scorers: list[str]) -> list[dict]:
    """One row per scorer: mean ± CI of the accuracies over seeds."""
    rows = []
    for name in scorers:
        mine = [r for r in runs if r["scorer"] == name]
        pruned = mean_ci([r["top1_pruned"] for r in mine])
        tuned = mean_ci([r["top1_finetuned"] for r in mine])
        rows.append({
            "scorer": name, "seeds": len(mine),
            "top1_pruned": pruned[0], "top1_pruned_ci95": pruned[1],
            "top1_finetuned": tuned[0], "top1_finetuned_ci95": tuned[1],
            "params": mine[0]["params"], "flops": mine[0]["flops"],
        })
    return rows


def table(rows: list[dict], unpruned: float) -> str:
    body = [[r["scorer"], f"{r['top1_pruned']:.4f} ± {r['top1_pruned_ci95']:.4f}",
             f"{r['top1_finetuned']:.4f} ± {r['top1_finetuned_ci95']:.4f}",
             f"{r['params'] / 1e6:.3f}M", f"{r['flops'] / 1e6:.1f}M"] for r in rows]
    text = markdown_table(["scorer", "top-1 pruned (no fine-tune)", "top-1 fine-tuned", "params", "FLOPs"], body)
    return f"Unpruned top-1: {unpruned:.4f}\n\n{text}\n"


def plot(rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4))
    x = range(len(rows))
    w = 0.38
    ax.bar([i - w / 2 for i in x], [r["top1_pruned"] for r in rows], w,
           yerr=[r["top1_pruned_ci95"] for r in rows], label="pruned, no fine-tune", capsize=3)
    ax.bar([i + w / 2 for i in x], [r["top1_finetuned"] for r in rows], w,
           yerr=[r["top1_finetuned_ci95"] for r in rows], label="fine-tuned", capsize=3)
    ax.set_xticks(list(x), [r["scorer"] for r in rows])
    ax.set_ylabel("top-1 (mean ± 95% CI over seeds)")
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.splitlines()[0])
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--scorers", nargs="+", default=None, help="default: every registered scorer")
    p.add_argument("--model", default="embedded")
    p.add_argument("--weights", default=None)
    p.add_argument("--data", default=None)
    p.add_argument("--classes", type=int, default=None)
    p.add_argument("--samples-per-class", type=int, default=50)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    p.add_argument("--json", type=Path, default=None, help="default: <results-dir>/compare.json")
    args = p.parse_args(argv)
    scorers = args.scorers or scoring.list_scorers()
    base = PruneConfig(model=args.model, weights=args.weights, data=args.data, ratio=args.ratio,
                       classes=args.classes, samples_per_class=args.samples_per_class, epochs=args.epochs)
    runs = []
    for seed in range(args.seeds):
        for name in scorers:
            runs.append(run_one(base, name, seed))
            r = runs[-1]
            print(f"seed {seed} {name:12s} pruned {r['top1_pruned']:.4f} fine-tuned {r['top1_finetuned']:.4f} "
                  f"({r['seconds']:.0f}s)", flush=True)
    rows = summarise(runs, scorers)
    unpruned = runs[0]["top1_unpruned"]
    text = table(rows, unpruned)
    print(text)
    out_json = args.json or args.results_dir / "compare.json"
    write_json(out_json, {"machine": machine(), "settings": {**base.as_dict(), "seeds": args.seeds},
                          "unpruned_top1": unpruned, "rows": rows, "runs": runs})
    write_text(args.results_dir / "compare.md", f"# Scorer comparison (ratio {args.ratio}, {args.seeds} seeds)\n\n{text}")
    plot(rows, args.results_dir / "compare.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
