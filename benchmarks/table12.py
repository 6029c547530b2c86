"""Paper Table 12: VGG16 params and FLOPs at pruning ratios 0, 0.4, 0.5, 0.6.

`python -m benchmarks.table12 [--quick] [--json PATH] [--rounding floor-keep|round]`

torchvision vgg16 (random weights, 224²), pruned through the same selection and surgery as
the main job with the weight-only `l1` scorer (which channels go does not change the counts),
no fine-tuning. The paper's counts follow "keep ⌊(1−r)·C⌋ channels" (`floor-keep`);
`round` (remove round(r·C)) is the toolkit's default and is shown for comparison.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision

import scoring
from benchmarks.common import RESULTS, machine, markdown_table, settings_from
from prune import Surgeon, count_cost, exit_code, select_and_prune, write_json

PAPER = {0.0: (138.0e6, 30.96e9), 0.4: (87.8e6, 11.15e9), 0.5: (75.9e6, 7.87e9), 0.6: (64.2e6, 5.02e9)}


@dataclass(frozen=True)
class Settings:
    """The ratios counted (keys of PAPER) and the channel rounding rule."""

    ratios: tuple[float, ...] = tuple(PAPER)
    rounding: str = "floor-keep"


FULL = Settings()
QUICK = Settings(ratios=(0.0, 0.5))


def vgg16_row(ratio: float, *, rounding: str) -> dict:
    """Params/MACs/FLOPs of torchvision vgg16 pruned at `ratio`, beside the paper's numbers."""
    torch.manual_seed(0)
    model = torchvision.models.vgg16(weights=None).eval()
    surgeon = Surgeon(model, torch.zeros(1, 3, 224, 224))
    select_and_prune(surgeon, scoring.create("l1"), source=None, ratio=ratio, rounding=rounding, quiet=True)
    cost = count_cost(model, input_size=224)
    paper_params, paper_flops = PAPER[ratio]
    return {
        "ratio": ratio,
        "params": cost.params,
        "macs": cost.macs,
        "flops": cost.flops,
        "paper_params": paper_params,
        "paper_flops": paper_flops,
        "params_rel_diff": cost.params / paper_params - 1,
        "flops_rel_diff": cost.flops / paper_flops - 1,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.table12", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="ratios 0 and 0.5 only; writes table12-quick.json")
    p.add_argument("--json", type=Path, default=None, help="where the result goes (default benchmarks/results/table12.json)")
    p.add_argument("--rounding", choices=("floor-keep", "round"), default=None, help="default floor-keep")
    args = p.parse_args(argv)
    s = settings_from(args, full=FULL, quick=QUICK)
    rows = [vgg16_row(r, rounding=s.rounding) for r in s.ratios]
    print(f"VGG16 at 224², rounding {s.rounding}")
    print(markdown_table(
        ["ratio", "params (M)", "paper (M)", "Δ params", "FLOPs (G)", "paper (G)", "Δ FLOPs"],
        [[r["ratio"], r["params"] / 1e6, r["paper_params"] / 1e6, f"{100 * r['params_rel_diff']:+.2f}%",
          r["flops"] / 1e9, r["paper_flops"] / 1e9, f"{100 * r['flops_rel_diff']:+.2f}%"] for r in rows],
    ))
    write_json(args.json or RESULTS / ("table12-quick.json" if args.quick else "table12.json"),
               {"machine": machine(), "rounding": s.rounding, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(exit_code(main))
