"""Planning a FLOPs budget: candidate structures read off the weight shapes vs counted on pruned copies.

    python -m benchmarks.plan_speed                                  # resnet18, mobilenet_v2, regnet_x_400mf
    python -m benchmarks.plan_speed --models densenet121 --shapes-only

Per model (torchvision, random weights drawn after seed 0, 224²) and allocation (`uniform`, `global`
with `l1` scores), `--target-flops 0.5 --round-to 8`, in one process: the plan made twice, once with
every candidate structure counted on a pruned copy by fvcore (`StructureCost(read_shapes=False)`)
and once read off the weight shapes (`prune.pipeline.shape_cost`), each on a fresh `StructureCost`.
Reported: the wall time of each, their ratio, the FLOPs fraction reached, and whether the two plans
are the same ratios (they must be: structures are read off the shapes only where that is exact, and
the plan is counted on a copy once more). One JSON per model and allocation under
benchmarks/results/plan_speed/ (a rerun skips those there, so a long run resumes); the table in
benchmarks/results/plan_speed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

import torch
import torchvision

import scoring
from benchmarks.common import RESULTS, machine, markdown_table
from prune import Surgeon, exit_code, write_json, write_text
from prune.pipeline.allocation import StructureCost, capped, global_ranking, uniform
from prune.pipeline.selection import stored_or_scored

MODELS = ("resnet18", "mobilenet_v2", "regnet_x_400mf")
ALLOCATIONS = ("uniform", "global")
FOLDER = RESULTS / "plan_speed"
NOTE = ("Timings move with the machine's load (1-minute load average before and after each row in its JSON); "
        "the ratio of a row is of one process, both ways under the same load. Seconds include the plan's "
        "recount on a copy (`StructureCost.confirmed`), not building the Surgeon.\n")


def allocate(allocation: str, surgeon: Surgeon) -> Callable[[StructureCost, float], tuple[float, ...]]:
    """The allocation as (cost, target) → ratios, capped at 0.9 as the main job caps it."""
    if allocation == "uniform":
        return lambda cost, target: capped(cost, uniform(cost, target, 0.9), 0.9)
    l1 = scoring.create("l1")
    scores = [stored_or_scored(surgeon, i, g, l1, None) for i, g in enumerate(surgeon.groups)]
    return lambda cost, target: capped(cost, global_ranking(cost, scores, target, 0.9), 0.9)


def timed_plan(surgeon: Surgeon, plan: Callable, args: argparse.Namespace, *, read_shapes: bool) -> dict:
    """Seconds to make the plan on a fresh cost, its ratios and FLOPs fraction (counted on a copy)."""
    started = time.perf_counter()
    cost = StructureCost(surgeon, args.input_size, round_to=args.round_to, read_shapes=read_shapes)
    ratios = plan(cost, args.target_flops)
    confirmed = cost.confirmed(ratios)  # as make_plan does: the plan counted on a copy once more
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 2), "ratios": list(ratios), "flops_fraction": cost.fraction_at(ratios),
            "confirmed_on_a_copy": confirmed}


def one(model: str, allocation: str, args: argparse.Namespace) -> dict:
    """Both ways of planning `model` with `allocation`."""
    torch.manual_seed(0)  # the random weights `global`'s l1 scores rank
    net = getattr(torchvision.models, model)(weights=None).eval()
    surgeon = Surgeon(net, torch.zeros(1, 3, args.input_size, args.input_size))
    plan = allocate(allocation, surgeon)
    load_before = os.getloadavg()
    result = {"model": model, "allocation": allocation, "groups": len(surgeon.groups),
              "shapes": timed_plan(surgeon, plan, args, read_shapes=True)}
    if not args.shapes_only:
        result["copies"] = timed_plan(surgeon, plan, args, read_shapes=False)
        result["same_plan"] = result["copies"]["ratios"] == result["shapes"]["ratios"]
        result["speedup"] = result["copies"]["seconds"] / result["shapes"]["seconds"]
    return result | {"settings": {"target_flops": args.target_flops, "round_to": args.round_to,
                                  "input_size": args.input_size, "threads": torch.get_num_threads()},
                     "load_average_1_5_15": {"before": [round(v, 2) for v in load_before],
                                             "after": [round(v, 2) for v in os.getloadavg()]},
                     "machine": machine()}


def row(r: dict) -> list:
    copies = r.get("copies")
    return [r["model"], r["allocation"], r["groups"], "—" if copies is None else copies["seconds"],
            r["shapes"]["seconds"], "—" if copies is None else f"{r['speedup']:.0f}×",
            f"{r['shapes']['flops_fraction']:.4f}", "—" if copies is None else ("yes" if r["same_plan"] else "NO")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.plan_speed", description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), help="torchvision model names")
    p.add_argument("--allocations", nargs="+", choices=ALLOCATIONS, default=list(ALLOCATIONS))
    p.add_argument("--target-flops", type=float, default=0.5)
    p.add_argument("--round-to", type=int, default=8)
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--shapes-only", action="store_true", help="skip counting on copies (hours on DenseNet)")
    args = p.parse_args(argv)
    for model in args.models:
        for allocation in args.allocations:
            path = FOLDER / f"{model}-{allocation}-r{args.round_to}.json"
            if not path.exists():
                write_json(path, one(model, allocation, args))
    results = [json.loads(f.read_text()) for f in sorted(FOLDER.glob("*.json"))]
    table = markdown_table(["model", "allocation", "groups", "s, copies", "s, shapes", "faster", "FLOPs reached",
                            "same plan"], [row(r) for r in results])
    print(table)
    write_text(RESULTS / "plan_speed.md", "# Planning a FLOPs budget: shapes vs pruned copies\n\n"
               "`python -m benchmarks.plan_speed`: target 0.5 of the FLOPs, `--round-to 8`, 224², random "
               "weights; both ways of a row in one process; machine and threads in each JSON under plan_speed/. `—`: not counted on copies "
               f"(`--shapes-only`).\n\n{table}\n\n{NOTE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(exit_code(main))
