"""Fair scoring: BatchNorm re-estimated between layers, seeds and options reaching the scorers."""

import json
import statistics
from pathlib import Path

import pytest
import torch
from torch import nn

import scoring
from prune.cli import main
from prune.pipeline.selection import select_and_prune
from prune.pipeline.surgery import Surgeon
from prune.zoo.embedded_model import EmbeddedVGG

FAST = ["--classes", "10", "--samples-per-class", "5", "--no-finetune", "--quiet"]


def run_cli(out: Path, *args: str) -> dict:
    assert main(["--out", str(out), *args, *FAST]) == 0
    return json.loads((out / "report.json").read_text())


def removed(report: dict) -> list[list[int]]:
    return [layer["removed"] for layer in report["layers"]]


@pytest.mark.parametrize("schedule, expected", [("progressive", 5), ("oneshot", 0)])
def test_refit_runs_between_layers_of_the_progressive_schedule(schedule: str, expected: int) -> None:
    model = EmbeddedVGG().eval()
    surgeon = Surgeon(model, torch.zeros(1, 3, 32, 32))
    calls: list[int] = []
    decisions = select_and_prune(surgeon, scoring.create("l1"), None, ratio=0.5, schedule=schedule,
                                 refit=lambda: calls.append(1), quiet=True)
    assert len(decisions) == 6 and len(calls) == expected  # after every layer but the last
    assert [d.map_size for d in decisions] == [32, 32, 16, 16, 8, 8]
    assert all(d.scoring_top1 is None for d in decisions)  # no scoring images given


def test_layer_bn_reestimation_restores_the_network_that_is_scored(tmp_path: Path) -> None:
    # l1 reads only conv weights, so both runs remove the same channels: any difference in
    # scoring_top1 comes from the BatchNorm statistics alone.
    fitted = run_cli(tmp_path / "fitted", "--scorer", "l1")
    stale = run_cli(tmp_path / "stale", "--scorer", "l1", "--layer-bn-batches", "0")
    assert removed(fitted) == removed(stale)
    assert fitted["layers"][0]["scoring_top1"] == stale["layers"][0]["scoring_top1"] > 0.8
    gain = statistics.fmean(f["scoring_top1"] - s["scoring_top1"]
                            for f, s in zip(fitted["layers"][1:], stale["layers"][1:]))
    assert gain >= 0.15
    assert [layer["map_size"] for layer in fitted["layers"]] == [32, 32, 16, 16, 8, 8]
    # without BatchNorm re-estimated at the end the pruned network is as stale as it was scored
    assert stale["pruned_bn_reestimated"]["top1"] > stale["pruned_before_finetune"]["top1"]


def test_seed_reaches_the_random_scorer(tmp_path: Path) -> None:
    one = run_cli(tmp_path / "a", "--scorer", "random", "--seed", "1")
    again = run_cli(tmp_path / "b", "--scorer", "random", "--seed", "1")
    two = run_cli(tmp_path / "c", "--scorer", "random", "--seed", "2")
    assert removed(one) == removed(again)
    assert removed(one) != removed(two)


def test_authors_convention_selects_differently_and_is_reported(tmp_path: Path) -> None:
    paper = run_cli(tmp_path / "paper", "--scorer", "entropy")
    authors = run_cli(tmp_path / "authors", "--scorer", "entropy", "--scorer-opt", "convention=authors")
    assert authors["settings"]["scorer_options"] == {"convention": "authors"}
    assert paper["settings"]["scorer_options"] == {}
    assert removed(paper) != removed(authors)


@pytest.mark.parametrize("opt, words", [
    ("colour=blue", ["no option 'colour'", "convention"]),
    ("p=high", ["p='high'", "float"]),
    ("p=2", ["p must be in [0, 1]"]),
    ("convention=mine", ["convention"]),
    ("novalue", ["KEY=VALUE"]),
    ("seed=3", ["--seed"]),
])
def test_bad_scorer_option_is_one_line_exit_2(tmp_path: Path, capsys, opt: str, words: list[str]) -> None:
    scorer = "random" if opt.startswith("seed") else "entropy"
    out = tmp_path / "out"
    assert main(["--scorer", scorer, "--scorer-opt", opt, "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err
    assert all(w in err for w in words), err
    assert not out.exists()


def test_parse_options_types_follow_the_defaults() -> None:
    assert scoring.parse_options("nisp", ["alpha=0.25", "normalize=no", "max_samples=64"]) == {
        "alpha": 0.25, "normalize": False, "max_samples": 64}
    with pytest.raises(ValueError, match="not a int"):
        scoring.parse_options("nisp", ["max_samples=1.5"])
    assert scoring.scorer_options("l1") == {}
