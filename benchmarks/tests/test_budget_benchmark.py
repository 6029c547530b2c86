"""benchmarks.budget: paired differences against `uniform`, resumable per-run files, the quick preset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import budget


def fake_runs(settings: budget.Settings) -> list[dict]:
    """global beats uniform by exactly 0.05 and sensitivity loses 0.02 on every seed, whatever the seed's level."""
    shifts = {"uniform": 0.0, "global": 0.05, "sensitivity": -0.02}
    runs = []
    for seed, level in enumerate([0.5, 0.8, 0.6]):
        for allocation, shift in shifts.items():
            runs.append({"testbed": "t", "scorer": budget.arm_name(allocation, "l1"), "allocation": allocation,
                         "criterion": "l1", "seed": seed, "top1": level + shift, "top1_pruned": level / 2,
                         "top1_pruned_bn": level / 2, "top1_unpruned": 0.9, "flops_fraction": 0.25 + seed / 100,
                         "ratios": [0.5, 0.25 * seed], "removed_sha256": f"{allocation}{seed}",
                         "settings": settings.config("t", budget.arm_name(allocation, "l1"), seed).as_dict()})
    return runs


def test_paired_differences_and_resume(tmp_path: Path) -> None:
    settings = budget.Settings(testbeds=("t",), scorers=("l1",), seeds=3, results=tmp_path)
    for run in fake_runs(settings):
        budget.write_json(budget.run_path(settings, "t", run["scorer"], run["seed"]), run)
    # every run exists: nothing is started (a job would fail here), the summary is written
    assert budget.main(["--testbeds", "t", "--scorers", "l1", "--seeds", "3", "--results", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "budget.json").read_text())
    diffs = {d["scorer"]: d for d in summary["paired"]}
    assert diffs["global-l1"]["mean"] == pytest.approx(0.05) and diffs["global-l1"]["hw95"] == pytest.approx(0, abs=1e-9)
    assert diffs["sensitivity-l1"]["mean"] == pytest.approx(-0.02) and diffs["global-l1"]["seeds"] == 3
    rows = {r["scorer"]: r for r in summary["rows"]}
    assert rows["uniform-l1"]["flops_fraction"] == pytest.approx(0.26)
    assert rows["uniform-l1"]["ratios"] == pytest.approx([0.5, 0.25])
    assert (tmp_path / "budget.md").exists() and (tmp_path / "budget.png").exists()


def test_arm_names_round_trip() -> None:
    for allocation in budget.ALLOCATIONS:
        for scorer in ("l1", "tp-fpgm"):
            assert budget.split_arm(budget.arm_name(allocation, scorer)) == (allocation, scorer)


@pytest.mark.slow
def test_quick_preset_runs_and_resumes(tmp_path: Path) -> None:
    args = ["--quick", "--seeds", "1", "--results", str(tmp_path)]
    assert budget.main(args) == 0
    files = sorted((tmp_path / "budget-quick" / "embedded").glob("*.json"))
    assert [f.name for f in files] == sorted(f"{a}-l1-s000.json" for a in budget.ALLOCATIONS)
    stamps = [f.stat().st_mtime_ns for f in files]
    for f in files:
        run = json.loads(f.read_text())
        assert abs(run["flops_fraction"] / 0.25 - 1) <= 0.05, run
    assert budget.main(args) == 0  # resumed: finished runs are not run again
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert (tmp_path / "budget-quick.json").exists() and (tmp_path / "budget-quick.png").exists()
