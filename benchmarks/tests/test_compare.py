"""benchmarks.compare: paired statistics and the per-run files it resumes from."""

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks import budget, compare
from prune import LayerResult

TESTBED = "embedded-plain"
"""A shipped testbed: the arms' scorers are checked against its model."""


def fake_runs(settings: compare.Settings | None = None) -> list[dict]:
    # arm l1 beats random by exactly 0.1 on every seed while both vary a lot between seeds
    runs = []
    for seed, base in enumerate([0.5, 0.7, 0.6, 0.9]):
        for arm, shift in (("random", 0.0), ("l1", 0.1)):
            runs.append({"testbed": TESTBED, "scorer": arm, "seed": seed, "top1": base + shift,
                         "top1_pruned": base / 2, "top1_pruned_bn": base / 2 + shift, "removed_sha256": f"{arm}{seed}",
                         "top1_unpruned": 0.94,
                         "settings": None if settings is None else settings.config(TESTBED, arm, seed).as_dict()})
    return runs


def test_t_quantile_matches_the_table() -> None:
    assert compare.t95(2) == pytest.approx(12.706, abs=1e-3)
    assert compare.t95(10) == pytest.approx(2.262, abs=1e-3)


def test_interval_by_hand() -> None:
    mean, hw = compare.mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and hw == pytest.approx(4.303 * 1.0 / math.sqrt(3), rel=1e-3)
    assert compare.mean_ci([0.5]) == (0.5, None)  # no interval from one value: JSON null, not Infinity


def test_paired_difference_removes_the_seed_to_seed_spread() -> None:
    runs = fake_runs()
    rows = {r["scorer"]: r for r in compare.summarise(runs, TESTBED, ("l1", "random"))}
    assert rows["l1"]["top1_hw95"] > 0.2  # unpaired: the seeds' spread
    (diff,) = compare.paired(runs, TESTBED, ("l1", "random"), "random")
    assert diff["mean"] == pytest.approx(0.1) and diff["hw95"] == pytest.approx(0.0, abs=1e-12)
    assert diff["seeds"] == 4 and rows["l1"]["distinct_selections"] == 4
    assert compare.needs_more(list(rows.values()), 0.03)


def test_removed_digest_depends_on_every_layer() -> None:
    def layer(name: str, removed: tuple[int, ...]) -> LayerResult:
        return LayerResult(name, (name,), 4, 4 - len(removed), removed, 8, None)

    layers = [layer("a", (0, 2)), layer("b", (1,))]
    assert compare.removed_digest(layers) == compare.removed_digest([layer("a", (0, 2)), layer("b", (1,))])
    assert compare.removed_digest(layers) != compare.removed_digest([layer("a", (0, 2)), layer("b", (2,))])


def test_finished_runs_are_found_and_skipped(tmp_path: Path) -> None:
    settings = compare.Settings(testbeds=(TESTBED,), arms=("l1", "random"), results=tmp_path)
    for run in fake_runs(settings):
        compare.write_json(compare.run_path(settings, TESTBED, run["scorer"], run["seed"]), run)
    assert len(compare.load_runs(settings)) == 8
    compare.run_seeds(settings, {(TESTBED, "l1"): 4, (TESTBED, "random"): 4})  # every run exists: nothing is started
    summary = compare.report(settings)
    assert [r["scorer"] for r in summary["rows"]] == ["l1", "random"]
    assert (tmp_path / "compare.md").exists() and (tmp_path / "compare.png").exists()


def test_an_arm_the_model_refuses_is_skipped_with_its_reason(tmp_path: Path) -> None:
    settings = compare.Settings(testbeds=(TESTBED,), arms=("l1", "random", "tp-bnscale"), results=tmp_path)
    for run in fake_runs(settings):
        compare.write_json(compare.run_path(settings, TESTBED, run["scorer"], run["seed"]), run)
    assert settings.arms_of(TESTBED) == ("l1", "random")
    (why,) = settings.skipped(TESTBED).values()
    assert "BatchNorm" in why and "\n" not in why
    summary = compare.report(settings)
    assert summary["skipped"] == {TESTBED: {"tp-bnscale": why}}
    assert f"Not run: tp-bnscale ({why})." in (tmp_path / "compare.md").read_text()


@pytest.mark.parametrize("testbed", ["embedded", "embedded-plain"])
def test_the_feature_map_family_is_a_default_arm(testbed: str) -> None:
    arms = compare.PRESETS["full"].arms_of(testbed)
    assert {"hrank", "chip", "thinet", "entropy", "l1", "random"} <= set(arms)


def test_a_run_made_under_other_settings_is_neither_reused_nor_summarised(tmp_path: Path) -> None:
    settings = compare.Settings(testbeds=(TESTBED,), arms=("l1", "random"), results=tmp_path)
    for run in fake_runs(replace(settings, epochs=settings.epochs + 1)):  # the same files, another budget
        compare.write_json(compare.run_path(settings, TESTBED, run["scorer"], run["seed"]), run)
    assert compare.load_runs(settings) == [] and not compare.finished_run(settings, TESTBED, "l1", 0)
    assert len(compare.load_runs(replace(settings, epochs=settings.epochs + 1))) == 8


@pytest.mark.parametrize("module", [compare, budget])
def test_every_committed_run_is_current_under_the_full_preset(module) -> None:
    """A change to the study settings or PruneConfig that would silently rerun (or drop) the
    committed runs fails here first."""
    settings = module.PRESETS["full"]
    files = sorted(settings.runs_dir.rglob("*.json"))
    assert files and all(compare.is_current(settings, json.loads(f.read_text())) for f in files)
