"""How many training batches should re-estimate BatchNorm between layers? (`--layer-bn-batches`)

    python -m benchmarks.layer_bn                  # embedded, entropy, r = 0.5, K = 10, N = 20, seeds 4 and 5
    python -m benchmarks.layer_bn --preset quick

For each B, the main job runs without fine-tuning and reports `scoring_top1` per layer: the top-1
of the whole network on the scoring images (the first ⌊100 / K⌋ of each class; the committed
layer_bn.json was measured when the bound was 256, i.e. all 20 of each class) at the moment a
layer is scored. Its mean over layers 2..L says how intact the network was that the scorer judged;
the selection time says what B costs.
Writes benchmarks/results/layer_bn.json and .md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from benchmarks.common import RESULTS, machine, markdown_table
from prune import PruneConfig, exit_code, write_json, write_text


@dataclass(frozen=True)
class Settings:
    """The sweep (frozen; `quick` and `full` presets below)."""

    batches: tuple[int, ...] = (0, 1, 2, 5, 10, 20, 50)
    seeds: tuple[int, ...] = (4, 5)
    scorer: str = "entropy"
    samples_per_class: int = 20
    results: Path = RESULTS


PRESETS = {"full": Settings(), "quick": Settings(batches=(0, 2), seeds=(4,), samples_per_class=3)}


def one(settings: Settings, batches: int, seed: int) -> dict:
    """One main job without fine-tuning; the per-layer scoring_top1 and the selection time."""
    import prune

    config = PruneConfig(scorer=settings.scorer, seed=seed, classes=10, samples_per_class=settings.samples_per_class,
                         finetune=False, layer_bn_batches=batches)
    with tempfile.TemporaryDirectory() as tmp:
        report = prune.run(config, out=Path(tmp) / "out", quiet=True)
    top1 = [layer.scoring_top1 for layer in report.layers]
    return {"batches": batches, "seed": seed, "scoring_top1": top1, "mean_layers_2_to_L": statistics.fmean(top1[1:]),
            "select_and_prune_s": report.timings["select_and_prune"], "top1_pruned": report.pruned_before_finetune.top1}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.layer_bn", description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=tuple(PRESETS), default="full")
    p.add_argument("--results", type=Path, default=None)
    args = p.parse_args(argv)
    settings = PRESETS[args.preset] if args.results is None else replace(PRESETS[args.preset], results=args.results)
    runs = []
    for b in settings.batches:
        for seed in settings.seeds:
            runs.append(one(settings, b, seed))
            print(f"B={b:3d} seed {seed}: mean scoring top-1 (layers 2..L) {runs[-1]['mean_layers_2_to_L']:.3f}, "
                  f"selection {runs[-1]['select_and_prune_s']:.1f}s", flush=True)
    rows = []
    for b in settings.batches:
        mine = [r for r in runs if r["batches"] == b]
        rows.append([b, statistics.fmean(r["mean_layers_2_to_L"] for r in mine),
                     statistics.fmean(r["select_and_prune_s"] for r in mine),
                     statistics.fmean(r["top1_pruned"] for r in mine)])
    text = markdown_table(["B", "mean scoring top-1, layers 2..L", "selection s", "top-1 pruned"], rows)
    print(text)
    name = "layer_bn" if args.preset == "full" else f"layer_bn-{args.preset}"
    settings.results.mkdir(parents=True, exist_ok=True)
    write_json(settings.results / f"{name}.json",
               {"machine": machine(), "settings": {**settings.__dict__, "results": str(settings.results)}, "runs": runs})
    write_text(settings.results / f"{name}.md", f"# BatchNorm re-estimation between layers ({settings.scorer})\n\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(exit_code(main))
