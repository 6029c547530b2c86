"""benchmarks.trust: the rank correlations against hand-computed cases and scipy, the bootstrap
over seeds on made-up results whose answer is known, and the committed trust.json is current."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import kendalltau, spearmanr

from benchmarks import compare, trust
from benchmarks.common import settings_json
from prune import write_json


@pytest.mark.parametrize(("x", "y", "rho", "tau"), [
    ([1, 2, 3], [1, 3, 2], 1 - 6 * 2 / (3 * 8), 1 / 3),  # Σd² = 2; one discordant pair of three
    ([1, 2, 3, 4], [4, 3, 2, 1], -1.0, -1.0),
    # x ties a pair: centred ranks (−½, −½, 1) and (−1, 0, 1) → ρ = 1.5 / √(1.5 · 2); τ-b = 2 / √((3 − 1) · 3)
    ([1, 1, 2], [1, 2, 3], 1.5 / math.sqrt(1.5 * 2), 2 / math.sqrt(6)),
])
def test_rank_correlations_by_hand(x: list, y: list, rho: float, tau: float) -> None:
    assert trust.spearman_rows(np.array(x), np.array(y))[0] == pytest.approx(rho)
    assert trust.kendall_rows(np.array(x), np.array(y))[0] == pytest.approx(tau)


def test_a_constant_side_has_no_correlation() -> None:
    assert np.isnan(trust.spearman_rows(np.ones(4), np.arange(4.0))[0])
    assert np.isnan(trust.kendall_rows(np.arange(4.0), np.full(4, 2.0))[0])


def test_rows_and_weights_match_scipy_on_the_same_data() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 4, (6, 9)).astype(float), rng.integers(0, 5, (6, 9)).astype(float)  # many ties
    for i in range(6):
        assert trust.spearman_rows(x, y)[i] == pytest.approx(spearmanr(x[i], y[i]).statistic)
        assert trust.kendall_rows(x, y)[i] == pytest.approx(kendalltau(x[i], y[i]).statistic)
    weights = rng.integers(0, 4, (5, 9))  # a weight counts an observation that many times (0: left out)
    taus = trust.kendall_rows(x[0], y[0], weights)
    for w, tau in zip(weights, taus):
        assert tau == pytest.approx(kendalltau(np.repeat(x[0], w), np.repeat(y[0], w)).statistic)


STUDY = compare.Settings(testbeds=("embedded",), arms=("l1", "fpgm", "apoz", "random"), peers=())
"""The made-up comparison's settings (each fake run file records its own, as compare writes them)."""


def fake_results(folder: Path, *, seeds: int = 6) -> None:
    """criteria.json and compare results on `embedded` where a criterion's oracle ρ orders its
    fine-tuned top-1 exactly (l1, fpgm, apoz; seed noise far below the gaps), and top-1 after pruning
    orders every run as top-1 after fine-tuning; `selectivity` is only in criteria.json, `random` only in compare."""
    level = {"l1": 0.2, "fpgm": 0.5, "apoz": 0.8}
    rows = [{"testbed": "embedded", "layer": f"l{k}", "scorer": arm, "rho": level[arm] - 0.1 * k,
             "layer_top1": level[arm]} for arm in level for k in range(2)]
    rows += [{"testbed": "embedded", "layer": "l0", "scorer": "selectivity", "rho": 0.0, "layer_top1": None}]
    write_json(folder / "criteria.json", {"rows": rows})
    study = replace(STUDY, results=folder)
    for arm, top1 in {**level, "random": 0.1}.items():
        for seed in range(seeds):
            noise = 0.001 * seed
            write_json(compare.run_path(study, "embedded", arm, seed),
                       {"testbed": "embedded", "scorer": arm, "seed": seed, "top1": top1 + noise,
                        "top1_pruned": top1 / 2 + noise, "settings": study.config("embedded", arm, seed).as_dict()})
    write_json(folder / "compare.json", {"settings": settings_json(study), "rows": [
        {"testbed": "embedded", "scorer": a, "seeds": seeds} for a in (*level, "random")]})


def test_a_known_answer_with_its_intervals(tmp_path: Path) -> None:
    fake_results(tmp_path)
    result = trust.trust(trust.Settings(results=tmp_path, bootstrap=200))
    (t,) = result["testbeds"]
    assert t["criteria"] == ["l1", "fpgm", "apoz"]
    assert t["only_in_criteria"] == ["selectivity"] and t["only_in_compare"] == ["random"]
    assert [c["top1"] for c in t["per_criterion"]] == pytest.approx([0.2025, 0.5025, 0.8025])
    for entry in t["across_criteria"]:
        for name in ("spearman", "kendall"):
            assert entry[name] == 1.0 and entry[f"{name}_seeds_95"] == [1.0, 1.0]
            low, high = entry[f"{name}_criteria_seeds_95"]  # resampled criteria: some draws repeat one criterion
            assert low == high == 1.0
    assert t["across_runs"]["runs"] == 24 and t["across_runs"]["kendall"] == pytest.approx(1.0)
    assert (tmp_path / "trust.md").read_text().count("| +1.00 | [+1.00, +1.00] | [+1.00, +1.00] |") == 4
    assert trust.trust(trust.Settings(results=tmp_path, bootstrap=200)) == result  # seeded: the same again


def test_per_run_files_that_disagree_with_compare_json_are_refused(tmp_path: Path) -> None:
    fake_results(tmp_path)
    runs = tmp_path / "compare" / "embedded"
    (runs / "l1-s005.json").unlink()
    with pytest.raises(ValueError, match="5 runs of l1 under compare.json's settings, it has 6"):
        trust.summary(trust.Settings(results=tmp_path, bootstrap=10))
    with pytest.raises(FileNotFoundError, match="benchmarks.criteria"):
        trust.summary(trust.Settings(results=tmp_path / "none"))


def test_a_run_file_left_from_other_settings_is_not_read(tmp_path: Path) -> None:
    """A run made with other fine-tuning epochs than compare.json's is not one of its runs."""
    fake_results(tmp_path)
    path = tmp_path / "compare" / "embedded" / "fpgm-s002.json"
    entry = json.loads(path.read_text())
    write_json(path, {**entry, "settings": {**entry["settings"], "epochs": STUDY.epochs + 2}})
    with pytest.raises(ValueError, match="5 runs of fpgm under compare.json's settings, it has 6"):
        trust.summary(trust.Settings(results=tmp_path, bootstrap=10))


def test_the_committed_trust_json_is_current() -> None:
    """trust.json follows from the committed criteria and compare results (rerun `python -m
    benchmarks.trust` after either changes)."""
    committed = json.loads((trust.RESULTS / "trust.json").read_text())
    now = json.loads(json.dumps(trust.summary(trust.Settings())))
    committed["settings"].pop("results"), now["settings"].pop("results")  # the checkout's own path
    assert now == committed
