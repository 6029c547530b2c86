"""Pruning to a budget: allocations meet their FLOPs target, `sensitivity` spares the sensitive
layer, bad budget flags are one line (exit 2), the plan is resumed, PruneConfig checks the fields.

Expected values are derived here independently: FLOPs from the conv/linear shapes of the pruned
network (2·C_out·C_in·k²·H·W + 2·in·out), sensitivity by zeroing a layer's lowest-l1 channels.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import quick_run
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

import scoring
from prune import PruneConfig, Surgeon, UsageError
from prune.core.distributed import SINGLE, World
from prune.outputs.score_store import NO_STORE
from prune.pipeline.allocation import StructureCost, least_loss, uniform
from prune.pipeline.budget import Planning, flops_plan, make_plan
from prune.pipeline.selection import ScoringData, select_and_prune
from prune.pipeline.sensitivity import heldout
from prune.zoo.data import DataBundle, class_images

ROOT = Path(__file__).resolve().parents[1]
SIZE, CLASSES = 8, 4


class Tiny(nn.Module):
    """conv a (3→16) → ReLU → conv b (16→16) → ReLU → global mean → linear head (16→4)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.b(F.relu(self.a(x)))).mean((2, 3)))


def tiny() -> nn.Module:
    """Layer a: every channel matters. Layer b: only channels 0..3 reach the head (large weights);
    channels 4..15 have tiny weights (the lowest l1) and no head weight, so removing them costs nothing."""
    torch.manual_seed(0)
    model = Tiny()
    with torch.no_grad():
        model.b.weight[4:] *= 0.01
        model.b.bias[4:] = 0
        model.head.weight[:, 4:] = 0
        model.head.weight[:, :4] *= 50  # confident: the unpruned loss on its own predictions is near 0
    return model.eval()


def bundle(model: nn.Module) -> DataBundle:
    """Random images labelled by `model`'s own predictions, as train and val."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 3, SIZE, SIZE, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    ds = TensorDataset(x, y)
    return DataBundle(ds, ds, tuple(f"c{i}" for i in range(CLASSES)), tuple(y.tolist()), SIZE)


def flops(model: Tiny) -> int:
    """FLOPs of `model` from its shapes (2 × MACs of the two convs and the head) for one image."""
    a, b, head = model.a, model.b, model.head
    return 2 * (SIZE * SIZE * 9 * (a.out_channels * a.in_channels + b.out_channels * b.in_channels)
                + head.in_features * head.out_features)


def masked_loss(model: Tiny, data: DataBundle, layer: str, n: int) -> float:
    """Loss on the val images with the `n` lowest-l1 output channels of `layer` zeroed (after its ReLU)."""
    conv = getattr(model, layer)
    drop = conv.weight.abs().sum((1, 2, 3)).argsort()[:n]
    x, y = data.val.tensors
    with torch.no_grad():
        h = F.relu(model.a(x))
        if layer == "a":
            h[:, drop] = 0
        h = F.relu(model.b(h))
        if layer == "b":
            h[:, drop] = 0
        return float(F.cross_entropy(model.head(h.mean((2, 3))), y))


def plan_for(allocation: str, target: float, model: nn.Module | None = None, cap: float = 0.9):
    model = tiny() if model is None else model
    surgeon = Surgeon(model, torch.zeros(1, 3, SIZE, SIZE))
    config = PruneConfig(target_flops=target, allocation=allocation, scorer="l1", batch_size=64, max_layer_ratio=cap)
    planning = Planning(config=config, surgeon=surgeon, scorer=scoring.create("l1"), source=None,
                        data=bundle(model), store=NO_STORE)
    return make_plan(planning), surgeon


def test_sensitivity_spares_the_more_sensitive_layer(one_thread):
    model = tiny()
    data = bundle(model)
    base = masked_loss(model, data, "a", 0)
    increase = {layer: masked_loss(model, data, layer, 8) - base for layer in ("a", "b")}
    assert increase["a"] > increase["b"] + 0.1  # a is the sensitive layer (measured here, by masking)
    plan, _ = plan_for("sensitivity", 0.6, model)
    ratio = dict(zip(("a", "b"), plan.ratios))
    assert ratio["a"] < ratio["b"]
    assert plan.curves is not None and plan.curves.layers == ("a", "b")


@pytest.mark.parametrize("allocation", ["uniform", "global", "sensitivity"])
def test_every_allocation_meets_its_flops_target(allocation, one_thread):
    target = 0.5
    plan, surgeon = plan_for(allocation, target)
    before = flops(surgeon.model)
    select_and_prune(surgeon, scoring.create("l1"), None, ratio=plan.ratios, schedule=plan.schedule, quiet=True)
    achieved = flops(surgeon.model) / before
    # channel granularity: one step removes at most one channel of a and one of b
    step = 2 * SIZE * SIZE * 9 * ((3 + 16) + 16) / before
    assert abs(achieved - target) <= step / 2, (allocation, achieved, plan.ratios)
    assert plan.planned_flops == pytest.approx(achieved)


def test_uniform_picks_the_closest_reachable_ratio(one_thread):
    """No single ratio on a fine grid gives a FLOPs fraction closer to the target than the bisection's."""
    target = 0.37
    plan, surgeon = plan_for("uniform", target)
    before = flops(surgeon.model)

    def fraction(r: float) -> float:
        n = [round(r * c) for c in (16, 16)]
        twin = Tiny()
        twin.a.out_channels, twin.b.in_channels, twin.b.out_channels, twin.head.in_features = (
            16 - n[0], 16 - n[0], 16 - n[1], 16 - n[1])
        return flops(twin) / before

    best = min(abs(fraction(r) - target) for r in np.linspace(0, 0.9, 901))
    assert abs(fraction(plan.ratios[0]) - target) == pytest.approx(best)
    assert len(set(plan.ratios)) == 1


def test_global_removes_the_lowest_z_scored_channels_across_layers(one_thread):
    plan, surgeon = plan_for("global", 0.5)
    z = {}
    for name in ("a", "b"):  # l1 of each output channel, z-scored per layer with the sample std
        l1 = getattr(surgeon.model, name).weight.detach().abs().sum((1, 2, 3)).double()
        z[name] = ((l1 - l1.mean()) / l1.std()).tolist()
    decisions = select_and_prune(surgeon, scoring.create("l1"), None, ratio=plan.ratios, schedule=plan.schedule,
                                 quiet=True)
    removed = [z[d.name][i] for d in decisions for i in d.removed]
    kept = [z[d.name][i] for d in decisions for i in range(d.channels_before) if i not in d.removed]
    assert removed and max(removed) <= min(kept)


def test_global_keeps_a_channel_per_layer_under_the_cap(one_thread):
    plan, surgeon = plan_for("global", 0.05)  # unreachable: every layer ends at the cap
    assert all(round(r * 16) <= 14 for r in plan.ratios)  # 0.9·16 = 14.4 → at most 14 of 16
    assert plan.schedule == "oneshot"


def speed_as_inverse_flops(monkeypatch) -> None:
    """Measured speed-up replaced by unpruned FLOPs / pruned FLOPs (from the shapes): deterministic."""
    from prune.pipeline import budget

    monkeypatch.setattr(budget, "measure_speedup", lambda model, baseline, **_: flops(baseline) / flops(model))


def plan_for_speed(target: float, cap: float = 0.9, world: World = SINGLE):
    model = tiny()
    config = PruneConfig(target_speedup=target, max_layer_ratio=cap, scorer="l1")
    planning = Planning(config=config, surgeon=Surgeon(model, torch.zeros(1, 3, SIZE, SIZE)),
                        scorer=scoring.create("l1"), source=None, data=bundle(model), store=NO_STORE, world=world)
    return make_plan(planning)


def test_speed_target_is_searched_to_within_5_percent(monkeypatch, one_thread):
    speed_as_inverse_flops(monkeypatch)
    plan = plan_for_speed(2.0)
    assert abs(plan.speedup / 2.0 - 1) <= 0.05 and plan.note == ""
    assert plan.speedup == pytest.approx(1 / plan.planned_flops)


def test_unreachable_speed_target_says_what_was_reached(monkeypatch, one_thread):
    speed_as_inverse_flops(monkeypatch)
    plan = plan_for_speed(50.0, cap=0.5)
    assert plan.note.startswith(f"speed-up {plan.speedup:.2f} reached, not 50") and "--max-layer-ratio 0.5" in plan.note
    assert [round(r * 16) for r in plan.ratios] == [8, 8]  # the most the cap allows: half of each layer


def test_sensitivity_steps_past_grid_ratios_that_remove_no_more_channels(one_thread):
    """On 8-channel layers 0.2 and 0.3 both remove 2 channels: the allocation must still reach
    what the cap allows (7 of 8, as uniform does), not stop at the first repeated count."""
    narrow = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                           nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, CLASSES))
    cost = StructureCost(Surgeon(narrow, torch.zeros(1, 3, SIZE, SIZE)), SIZE)
    flat = [[0.1 * j for j in range(1, 10)]] * 2  # same loss curve for both layers
    assert cost.counts(least_loss(cost, flat, 0.01, 0.9)) == cost.counts(uniform(cost, 0.01, 0.9)) == (7, 7)


@dataclass(frozen=True)
class SecondRank(World):
    """Rank 1 of 2: each broadcast returns rank 0's next object from `from_rank_0`."""

    from_rank_0: list = field(default_factory=list)

    def broadcast(self, obj, src: int = 0):
        return self.from_rank_0.pop(0)


def test_speed_search_is_timed_on_rank_zero_alone(monkeypatch, one_thread):
    from prune.pipeline import budget

    speed_as_inverse_flops(monkeypatch)
    on_rank_0 = plan_for_speed(2.0)
    monkeypatch.setattr(budget, "measure_speedup", lambda *_, **__: pytest.fail("rank 1 timed a candidate"))
    # what rank 0 broadcasts: main_only's "no error", then its plan
    assert plan_for_speed(2.0, world=SecondRank(rank=1, size=2, from_rank_0=[None, on_rank_0])) == on_rank_0


def test_a_flops_plan_far_from_its_target_says_so():
    """A plan 10% above its target under no cap (coarse widths, e.g. with --round-to) warns, naming the lever."""
    cost = type("Cost", (), {"fraction_at": staticmethod(lambda ratios: 1 - ratios[0])})()
    config = PruneConfig(target_flops=0.5, round_to=8, allocation="global")
    for removed, note in ((0.45, "FLOPs fraction 0.5500 reached, not 0.5 within 3%"), (0.49, "")):
        plan = flops_plan(cost, lambda target, r=removed: (r if target > 0 else 0.9,), config,
                                 schedule="oneshot", curves=None)
        assert plan.note.startswith(note) and ("--round-to" in plan.note) == bool(note), plan.note


@pytest.mark.parametrize("allocation", ["uniform", "global", "sensitivity"])
def test_unreachable_flops_target_says_what_was_reached(allocation, one_thread):
    plan, _ = plan_for(allocation, 0.05, cap=0.5)  # half of each layer at most: far above 0.05 of the FLOPs
    assert plan.note.startswith(f"FLOPs fraction {plan.planned_flops:.4f} reached, not 0.05"), plan.note
    assert "--max-layer-ratio 0.5" in plan.note and plan.planned_flops > 0.2
    assert [round(r * 16) for r in plan.ratios] == [8, 8]
    reachable = plan_for(allocation, 0.5)[0]  # a note exactly when it lands more than 3% away
    assert (reachable.note == "") == (abs(reachable.planned_flops / 0.5 - 1) <= 0.03), reachable.note


def test_sensitivity_images_are_training_images_apart_from_the_scoring_images():
    """Each training image holds its own index in its pixels; the val images hold -1."""
    n = 120  # 30 per class
    x = torch.arange(n, dtype=torch.float32).view(-1, 1, 1, 1).expand(n, 3, SIZE, SIZE).contiguous()
    y = torch.arange(n) % CLASSES
    val = TensorDataset(torch.full((8, 3, SIZE, SIZE), -1.0), torch.zeros(8, dtype=torch.long))
    data = DataBundle(TensorDataset(x, y), val, tuple(f"c{i}" for i in range(CLASSES)), tuple(y.tolist()), SIZE)

    def held_ids(per_class_scored: int) -> list[int]:
        source = ScoringData(data=data, classes=[0, 2], per_class=per_class_scored, seed=3)
        held = heldout(data, source, seed=3, per_class=15)
        return [int(held[i][0][0, 0, 0]) for i in range(len(held))]

    scoring_ids = {int(img[0, 0, 0]) for c in (0, 2) for img in class_images(data, c, 20, seed=3)}
    ids = held_ids(20)
    assert len(ids) == len(set(ids)) and min(ids) >= 0  # distinct training images, none from val
    assert not set(ids) & scoring_ids
    per_class = Counter(int(y[i]) for i in ids)
    assert per_class == {0: 10, 1: 15, 2: 10, 3: 15}  # a scored class gives what its 30 − 20 leave
    assert set(ids) <= set(held_ids(5))  # the tail of each class's order: fewer scoring images keep them
    every = ScoringData(data=data, classes=range(CLASSES), per_class=30, seed=3)
    with pytest.raises(UsageError, match="lower --samples-per-class"):
        heldout(data, every, seed=3)  # every training image is a scoring image


# ---------------------------------------------------------------- the CLI


def one_line_exit_2(capsys, *args: str) -> str:
    from prune.cli import main

    capsys.readouterr()
    code = main(list(args))
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.mark.parametrize("args, words", [
    (["--ratio", "0.5", "--target-flops", "0.5"], "--ratio"),
    (["--target-flops", "1.5"], "--target-flops"),
    (["--target-flops", "0"], "--target-flops"),
    (["--target-speedup", "0.5"], "--target-speedup"),
    (["--target-flops", "0.5", "--target-speedup", "2"], "both"),
    (["--allocation", "global"], "--target-flops"),
    (["--target-flops", "0.5", "--max-layer-ratio", "1"], "--max-layer-ratio"),
    (["--target-flops", "0.5", "--allocation", "best"], "--allocation"),
])
def test_bad_budget_flags_are_one_line_exit_2(capsys, tmp_path, args, words):
    assert words in one_line_exit_2(capsys, *args, "--out", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_sensitivity_without_held_out_images_is_one_line_exit_2(tmp_path, capsys):
    # quick_run's classes have 2 training images each: scoring takes both
    args = [*quick_run(tmp_path), "--samples-per-class", "2", "--target-flops", "0.5", "--allocation", "sensitivity"]
    line = one_line_exit_2(capsys, *args, "--quiet", "--out", str(tmp_path / "out"))
    assert "sensitivity needs training images apart from the scoring images" in line and "--samples-per-class 2" in line
    assert not (tmp_path / "out").exists()


def test_rerunning_the_same_command_resumes_with_the_kept_plan(tmp_path, capsys):
    args = [*quick_run(tmp_path), "--samples-per-class", "2", "--target-flops", "0.5", "--allocation", "global",
            "--no-finetune", "--quiet", "--out", str(tmp_path / "out")]

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "prune", *args, *extra], cwd=ROOT, capture_output=True,
                              text=True, timeout=600)

    first = run()
    assert first.returncode == 0, first.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    budget = report["budget"]
    assert budget["schedule"] == "oneshot" and report["settings"]["schedule"] == "progressive"  # global is one-shot
    assert "oneshot selection" in (tmp_path / "out" / "report.md").read_text()
    assert abs(report["after"]["flops"] / report["before"]["flops"] - budget["achieved_flops"]) < 1e-12
    assert len(budget["ratios"]) == len(report["layers"])
    for layer, r in zip(report["layers"], budget["ratios"]):  # the chosen ratio is what was removed
        assert len(layer["removed"]) == round(r * layer["channels_before"])
    # the plan kept in --out/cache is what a rerun prunes with: change it and see the rerun follow it
    path = tmp_path / "out" / "cache" / "plan.pt"
    kept = torch.load(path, weights_only=True)
    kept["plan"]["ratios"] = [0.25] * len(kept["plan"]["ratios"])
    torch.save(kept, path)
    again = run()
    assert again.returncode == 0, again.stderr
    rerun = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rerun["budget"]["ratios"] == [0.25] * len(budget["ratios"])
    assert "different run" in one_line_exit_2(capsys, *args, "--max-layer-ratio", "0.8")  # refused, not resumed


# ---------------------------------------------------------------- PruneConfig


@pytest.mark.parametrize("field, value", [
    ("target_flops", "0.5"), ("target_speedup", True), ("allocation", 3), ("max_layer_ratio", None),
])
def test_budget_fields_are_type_checked(field, value):
    with pytest.raises(UsageError, match=field):
        PruneConfig(**{field: value})


def test_budget_fields_take_numpy_numbers_and_enter_the_fingerprint():
    config = PruneConfig(target_flops=np.float32(0.5), max_layer_ratio=np.float64(0.8), allocation="global")
    assert type(config.target_flops) is float and type(config.max_layer_ratio) is float
    settings = json.loads(config.fingerprint())
    assert (settings["target_flops"], settings["allocation"], settings["max_layer_ratio"]) == (0.5, "global", 0.8)
    assert PruneConfig(target_flops=0.5).fingerprint() != PruneConfig(target_flops=0.5, allocation="global").fingerprint()
    assert "target_flops" not in json.loads(PruneConfig().fingerprint())  # a ratio run keeps its fingerprint
