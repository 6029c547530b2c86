"""A budget turned into the per-layer ratios a run prunes with (its `Plan`).

`--target-flops F`: the allocation (prune/pipeline/allocation.py) for F. `--target-speedup S`:
a bisection over the FLOPs target, each candidate allocation measured as a structurally pruned
copy against the unpruned model in this process (`measure_speedup`, the report's img/s
protocol; rank 0 alone under torchrun), until the speed-up is within SPEEDUP_TOLERANCE of S.
Where a target cannot be met (the --max-layer-ratio cap, timing noise), the plan says what was
reached and why (`Plan.note`, warned as TargetNotMet and kept in the report). The plan is kept
in --out/cache/plan.pt, so a resumed run prunes with the same ratios (a speed search is not
measured twice).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

import scoring
from prune.config import PruneConfig
from prune.core import distributed
from prune.outputs.cache_file import CacheFile
from prune.outputs.score_store import ScoreStore
from prune.pipeline.allocation import StructureCost, capped, global_ranking, least_loss, uniform
from prune.pipeline.selection import ScoringData, stored_or_scored
from prune.pipeline.sensitivity import SensitivityCurves, heldout, measure_curves, write_curves
from prune.pipeline.speed import measure_speedup
from prune.pipeline.surgery import Surgeon
from prune.zoo.data import DataBundle

SPEEDUP_TOLERANCE = 0.05
FLOPS_TOLERANCE = 0.03
"""A FLOPs plan further than this (relative) from its target says so in its note (a warning)."""
SPEED_STEPS = 8
"""At most this many candidate FLOPs targets are measured by a speed search."""
PLAN_FORMAT = "topoprune/plan/v2"
"""v2: sensitivity curves on held-out training images (v1 plans, measured on val, are not resumed)."""


@dataclass(frozen=True)
class Plan:
    """ratios: one per prunable group, shallow → deep. flops_target: the FLOPs fraction they
    were allocated for; planned_flops: the fraction their structure has (counted). speedup:
    measured while planning (speed target only). note: why the target is not met ("" if it is).
    schedule: the selection's (`global` ranks channels scored once: oneshot)."""

    ratios: tuple[float, ...]
    flops_target: float
    planned_flops: float
    schedule: str
    speedup: float | None = None
    note: str = ""
    curves: SensitivityCurves | None = None

    def as_dict(self) -> dict:
        return {**asdict(self), "curves": None if self.curves is None else self.curves.as_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        curves = None if d["curves"] is None else SensitivityCurves.from_dict(d["curves"])
        return cls(**{**d, "ratios": tuple(d["ratios"]), "curves": curves})


@dataclass(frozen=True)
class Planning:
    """What a plan is made from: the unpruned network (`surgeon`), its scorer and scoring
    images, the data (held-out training images for the sensitivity curves), and the run's settings."""

    config: PruneConfig
    surgeon: Surgeon
    scorer: scoring.Scorer
    source: ScoringData | None
    data: DataBundle
    store: ScoreStore
    quiet: bool = True
    world: distributed.World = distributed.SINGLE
    """The run's processes: data scorers shard classes over them, so every rank gets the same scores."""
    refit: Callable[[nn.Module], object] | None = None
    """Re-estimates a pruned copy's BatchNorm statistics before its sensitivity is measured (None: not)."""


def allocator(p: Planning, cost: StructureCost) -> tuple[Callable[[float], tuple[float, ...]], SensitivityCurves | None]:
    """A function FLOPs target → ratios for `p.config.allocation` (scores or curves computed once), and the curves."""
    cap, name = p.config.max_layer_ratio, p.config.allocation
    if name == "uniform":
        return (lambda f: uniform(cost, f, cap)), None
    if name == "global":
        scores = [stored_or_scored(p.surgeon, i, g, p.scorer, p.source, p.store, p.world) for i, g in enumerate(p.surgeon.groups)]
        return (lambda f: global_ranking(cost, scores, f, cap)), None
    images = heldout(p.data, p.source, seed=p.config.seed)  # apart from the run's scoring images, whatever the scorer
    curves = measure_curves(p.surgeon, p.scorer, p.source, images, rounding=p.config.rounding, round_to=p.config.round_to,
                            batch_size=p.config.batch_size, quiet=p.quiet, refit=p.refit, world=p.world)
    increase = curves.increase()
    return (lambda f: least_loss(cost, increase, f, cap, grid=curves.ratios)), curves


def make_plan(p: Planning) -> Plan:
    """The plan for `p.config`'s target (the surgeon's model is left unpruned). Every rank calls it;
    a speed search is timed on rank 0 alone (the other ranks idle meanwhile) and its plan broadcast."""
    cost = StructureCost(p.surgeon, int(p.surgeon.example.shape[-1]), p.config.rounding, p.config.round_to)
    uncapped, curves = allocator(p, cost)

    def allocate(target: float) -> tuple[float, ...]:  # aligned widths kept within --max-layer-ratio
        return capped(cost, uncapped(target), p.config.max_layer_ratio)

    schedule = "oneshot" if p.config.allocation == "global" else p.config.schedule
    if p.config.target_speedup is None:  # the same on every rank: each counts the same structures
        return recounted(cost, lambda: flops_plan(cost, allocate, p.config, schedule=schedule, curves=curves))
    searched = distributed.main_only(lambda: recounted(cost, lambda: speed_search(p.surgeon, cost, allocate, p.config)),
                                     p.world)
    return replace(p.world.broadcast(searched), schedule=schedule, curves=curves)


def recounted(cost: StructureCost, make: Callable[[], Plan]) -> Plan:
    """The plan `make` makes, made again with every structure counted on pruned copies where the
    weight shapes counted its own structure otherwise (`StructureCost.confirmed`)."""
    plan = make()
    return plan if cost.confirmed(plan.ratios) else make()


def flops_plan(cost: StructureCost, allocate: Callable[[float], tuple[float, ...]], config: PruneConfig, *,
               schedule: str, curves: SensitivityCurves | None) -> Plan:
    """The allocation for `config.target_flops`; its note says so when the cap keeps the FLOPs above the target."""
    target, cap = config.target_flops, config.max_layer_ratio
    ratios = allocate(target)
    planned_flops, note = cost.fraction_at(ratios), ""
    floor = cost.fraction_at(allocate(0.0)) if planned_flops > target else planned_flops  # the most it removes
    if floor > target:
        note = (f"FLOPs fraction {planned_flops:.4f} reached, not {target:g}: the most the {config.allocation} "
                f"allocation removes under --max-layer-ratio {cap:g} keeps {floor:.4f} of the FLOPs; pass a higher "
                "--max-layer-ratio, a larger --target-flops or another --allocation")
    elif abs(planned_flops / target - 1) > FLOPS_TOLERANCE:
        steps = f" with --round-to {config.round_to} (widths move in steps of {config.round_to})" if config.round_to > 1 else ""
        note = (f"FLOPs fraction {planned_flops:.4f} reached, not {target:g} within {FLOPS_TOLERANCE:.0%}: the closest "
                f"the {config.allocation} allocation lands{steps}; try another --allocation"
                + (" or a smaller --round-to" if steps else ""))
    return Plan(ratios, target, planned_flops, schedule, note=note, curves=curves)


def speed_search(surgeon: Surgeon, cost: StructureCost, allocate: Callable[[float], tuple[float, ...]],
                 config: PruneConfig) -> Plan:
    """Bisection over the FLOPs target f until the measured speed-up is within tolerance of the target."""
    goal, cap = config.target_speedup, config.max_layer_ratio
    measured: list[tuple[float, float, tuple[float, ...]]] = []  # (speed-up, f, ratios)

    def speedup(f: float) -> float:
        ratios = allocate(f)
        pruned = surgeon.pruned_copy(cost.counts(ratios))
        s = measure_speedup(pruned, surgeon.model, input_size=cost.input_size, device=surgeon.example.device)
        measured.append((s, f, ratios))
        return s

    def met(s: float) -> bool:
        return abs(s / goal - 1) <= SPEEDUP_TOLERANCE

    def plan(s: float, f: float, ratios: tuple[float, ...], note: str = "") -> Plan:
        return Plan(ratios, f, cost.fraction_at(ratios), config.schedule, speedup=s, note=note)

    floor = cost.fraction_at(allocate(0.0))  # every layer at the cap
    fastest = speedup(floor)
    if fastest < goal * (1 - SPEEDUP_TOLERANCE):
        return plan(*measured[-1], note=(
            f"speed-up {fastest:.2f} reached, not {goal:g}: at --max-layer-ratio {cap:g} the pruned network keeps "
            f"{floor:.3f} of the FLOPs and is no faster on {surgeon.example.device.type}; pass a higher "
            "--max-layer-ratio or a smaller --target-speedup"))
    lo, hi = floor, 1.0
    if not met(fastest):
        for _ in range(SPEED_STEPS):
            mid = (lo + hi) / 2
            s = speedup(mid)
            if met(s):
                break
            lo, hi = (mid, hi) if s > goal else (lo, mid)
    best = min(measured, key=lambda m: abs(m[0] / goal - 1))
    note = "" if met(best[0]) else (
        f"speed-up {best[0]:.2f} reached, not {goal:g} within {SPEEDUP_TOLERANCE:.0%}: {len(measured)} measured "
        f"FLOPs targets between {floor:.3f} and 1 do not land closer (timing noise or channel rounding on "
        f"{surgeon.example.device.type})")
    return plan(*best, note=note)


def plan_file(out: Path, *, resume: bool, world: distributed.World) -> CacheFile:
    """`<out>/cache/plan.pt`: the plan of this run, kept for a rerun to resume with."""
    return CacheFile(Path(out) / "cache" / "plan.pt", PLAN_FORMAT, resume=resume, world=world)


def _usable(kept: dict | None, groups: int) -> Plan | None:
    """The plan an earlier attempt kept (`CacheFile.read`), or None if there is none that fits."""
    try:
        plan = None if kept is None else Plan.from_dict(kept["plan"])
    except (KeyError, TypeError, ValueError):
        return None
    return plan if plan is not None and len(plan.ratios) == groups else None


def planned(p: Planning, out: Path, *, resume: bool, world: distributed.World = distributed.SINGLE) -> Plan:
    """The run's plan: rank 0's cached one on resume, else made here (rank 0's is used by every
    rank) and kept in `out` with the sensitivity curves (sensitivity.json, sensitivity.png)."""
    kept = plan_file(out, resume=resume, world=world)
    plan = _usable(kept.read(), len(p.surgeon.groups))
    if plan is not None:
        return plan
    with torch.no_grad():
        plan = make_plan(p)
    plan = world.broadcast(plan)
    if plan.curves is not None:
        distributed.main_only(lambda: write_curves(out, plan.curves), world)
    kept.write({"plan": plan.as_dict()})  # last: an attempt killed before it made no plan
    return plan
