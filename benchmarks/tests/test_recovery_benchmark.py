"""benchmarks.recovery: recipes as main-job settings, paired differences, resumable per-run files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import recovery


def settings(tmp_path: Path) -> recovery.Settings:
    return recovery.Settings(testbeds=("t",), scorers=("l1", "entropy", "random"), recipes=("paper", "long"),
                             seeds=3, results=tmp_path, lrs=(("t", 0.01),))


def test_recipes_become_main_job_settings(tmp_path: Path) -> None:
    s = recovery.Settings(lrs=(("fashion", 0.03),))
    paper = s.config("fashion", "paper-entropy", 2)
    assert (paper.scorer, paper.epochs, paper.lr, paper.lr_schedule, paper.distill) == ("entropy", 3, 1e-3, "step", False)
    it = s.config("fashion", "iterative-distill-tp-fpgm", 0)
    assert (it.scorer, it.iterative_steps, it.step_epochs, it.epochs, it.lr, it.distill) == ("tp-fpgm", 5, 3, 3, 0.03, True)
    assert it.step_epochs * (it.iterative_steps - 1) + it.epochs == s.config("fashion", "long-l1", 0).epochs == 15
    scratch = s.config("fashion", "scratch", 1)
    assert scratch.reinit and scratch.train_images == 10_000 and scratch.ratio == 0.5
    assert recovery.split_arm("long-distill-random") == ("long-distill", "random")


def fake_runs(s: recovery.Settings) -> list[dict]:
    """entropy is 0.03 below l1 and 0.01 above random on every seed under `paper`; under `long`
    every scorer ties; scratch is 0.02 below long-l1."""
    shifts = {("paper", "l1"): 0.0, ("paper", "entropy"): -0.03, ("paper", "random"): -0.04,
              ("long", "l1"): 0.05, ("long", "entropy"): 0.05, ("long", "random"): 0.05}
    runs = []
    for seed, level in enumerate([0.80, 0.86, 0.83]):
        arms = {f"{r}-{c}": shift for (r, c), shift in shifts.items()} | {"scratch": 0.03}
        for arm, shift in arms.items():
            recipe, crit = ("scratch", "l1") if arm == "scratch" else recovery.split_arm(arm)
            runs.append({"testbed": "t", "scorer": arm, "recipe": recipe, "criterion": crit, "seed": seed,
                         "top1": level + shift, "top1_pruned": 0.3, "top1_pruned_bn": 0.4, "top1_unpruned": 0.92,
                         "removed_sha256": arm, "at_chance": False, "steps": [],
                         "settings": s.config("t", arm, seed).as_dict()})
    return runs


def test_paired_differences_and_resume(tmp_path: Path) -> None:
    s = settings(tmp_path)
    for run in fake_runs(s):
        recovery.write_json(recovery.run_path(s, "t", run["scorer"], run["seed"]), run)
    recovery.write_json(s.runs_dir / "t" / "lr.json", {"lr": 0.01})
    # every run and the lr exist: nothing is started (a job would fail on testbed "t")
    args = ["--testbeds", "t", "--scorers", "l1", "entropy", "random", "--recipes", "paper", "long", "--seeds", "3",
            "--results", str(tmp_path)]
    assert recovery.main(args) == 0
    summary = json.loads((tmp_path / "recovery.json").read_text())
    diffs = {(d["recipe"], d["difference"]): d for d in summary["paired"]}
    assert diffs["paper", "entropy − l1"]["mean"] == pytest.approx(-0.03)
    assert diffs["paper", "entropy − random"]["mean"] == pytest.approx(0.01)
    assert diffs["long", "entropy − l1"]["mean"] == pytest.approx(0.0, abs=1e-12)
    assert diffs["long", "l1 − scratch"]["mean"] == pytest.approx(0.02) and diffs["long", "l1 − scratch"]["seeds"] == 3
    assert summary["lrs"] == {"t": 0.01}
    assert (tmp_path / "recovery.md").exists() and (tmp_path / "recovery.png").exists()
    assert recovery.main([*args, "--report-only"]) == 0


def test_lr_tuning_resumes_at_the_next_lr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each lr's held-out top-1 is written as it is measured; a tuning killed after two lrs measures
    only the others when restarted, and the best (ties to the smaller lr) is chosen over all."""
    s = settings(tmp_path)
    grid = recovery.LR_GRID
    heldout = {grid[0]: 0.5, grid[1]: 0.9, grid[2]: 0.9, grid[3]: 0.7}
    measured: list[float] = []

    def fake_tune(settings: recovery.Settings, testbed: str, lr: float) -> float:
        if len(measured) == 2 and not (tmp_path / "killed").exists():
            (tmp_path / "killed").touch()
            raise KeyboardInterrupt
        measured.append(lr)
        return heldout[lr]

    monkeypatch.setattr(recovery, "tune_one", fake_tune)
    with pytest.raises(KeyboardInterrupt):
        recovery.tuned_lr(s, "t")
    partial = json.loads((s.runs_dir / "t" / "lr.json").read_text())
    assert "lr" not in partial and set(partial["heldout_top1"]) == {str(grid[0]), str(grid[1])}
    assert recovery.tuned_lr(s, "t") == grid[1]
    assert measured == list(grid)  # each lr measured once across both attempts
    assert json.loads((s.runs_dir / "t" / "lr.json").read_text())["lr"] == grid[1]
    assert recovery.tuned_lr(s, "t") == grid[1] and measured == list(grid)  # finished: read, not measured
