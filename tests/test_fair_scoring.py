"""Fair scoring: BatchNorm re-estimated between layers, seeds and options reaching the scorers."""

import json
import statistics
from pathlib import Path

import pytest
import torch
from helpers import run_benchmark

import scoring
from finetune.batchnorm import recalibrate_batchnorm
from prune.cli import main
from prune.config import PruneConfig
from prune.pipeline.run import make_scorer
from prune.pipeline.selection import LayerDecision, ScoringData, scoring_top1, select_and_prune
from prune.pipeline.surgery import Surgeon
from prune.zoo.data import load_data, make_loader
from prune.zoo.embedded_model import EmbeddedVGG
from prune.zoo.models import create_model


@pytest.fixture(scope="module")
def shapes():
    return load_data(None)


def prune_embedded(scorer: scoring.Scorer, source: ScoringData | None, **kwargs) -> list[LayerDecision]:
    model = create_model("embedded") if source is not None else EmbeddedVGG().eval()
    surgeon = Surgeon(model, torch.zeros(1, 3, 32, 32))
    return select_and_prune(surgeon, scorer, source, ratio=0.5, quiet=True, **kwargs)


def removed(decisions: list[LayerDecision]) -> list[tuple[int, ...]]:
    return [d.removed for d in decisions]


@pytest.mark.parametrize("schedule, last_only, expected", [("progressive", False, 5), ("progressive", True, 1),
                                                          ("oneshot", False, 0), ("oneshot", True, 0)])
def test_refit_runs_between_layers_of_the_progressive_schedule(schedule: str, last_only: bool, expected: int) -> None:
    calls: list[int] = []
    decisions = prune_embedded(scoring.create("l1"), None, schedule=schedule, refit=lambda: calls.append(1),
                               last_refit_only=last_only)
    assert len(decisions) == 6 and len(calls) == expected  # after every layer but the last, or the last of those
    assert [d.map_size for d in decisions] == [32, 32, 16, 16, 8, 8]
    assert all(d.scoring_top1 is None for d in decisions)  # no scoring images given


def test_last_refit_only_is_refused_where_scoring_images_read_the_network(shapes) -> None:
    source = ScoringData(shapes, classes=range(2), per_class=2, seed=0)
    with pytest.raises(ValueError, match="last_refit_only needs source=None"):
        prune_embedded(scoring.create("l1"), source, refit=lambda: None, last_refit_only=True)


@pytest.mark.parametrize("name", [n for n in scoring.list_scorers() if not scoring.scorer_info(n).needs_data])
def test_one_last_refit_ends_as_a_refit_after_every_layer(shapes, name: str) -> None:
    """A weight-only scorer reads no BatchNorm statistics: the same channels go and the network
    ends bit for bit the same with the last refit alone as with one after every layer."""
    ends = []
    for last_only in (False, True):
        model = create_model("embedded")
        surgeon = Surgeon(model, torch.zeros(1, 3, 32, 32))

        def refit(model: torch.nn.Module = model) -> None:
            recalibrate_batchnorm(model, make_loader(shapes.train, batch_size=64, shuffle=True, seed=4), batches=2,
                                  device="cpu")

        decisions = select_and_prune(surgeon, scoring.create(name), None, ratio=0.5, quiet=True, refit=refit,
                                     last_refit_only=last_only)
        ends.append((removed(decisions), model.state_dict()))
    (kept_all, state_all), (kept_last, state_last) = ends
    assert kept_all == kept_last
    assert state_all.keys() == state_last.keys()
    assert all(torch.equal(state_all[k], state_last[k]) for k in state_all)


def test_bn_reestimation_restores_the_network_that_is_scored(shapes) -> None:
    # l1 reads only conv weights, so both runs remove the same channels: any difference in
    # scoring_top1 comes from the BatchNorm statistics alone.
    source = ScoringData(shapes, classes=range(10), per_class=5, seed=4)
    stale = prune_embedded(scoring.create("l1"), source)
    refits: list[torch.nn.Module] = []

    def refit() -> None:
        loader = make_loader(shapes.train, batch_size=64, shuffle=True, seed=4)
        recalibrate_batchnorm(refits[0], loader, batches=5, device="cpu")

    model = create_model("embedded")
    refits.append(model)
    surgeon = Surgeon(model, torch.zeros(1, 3, 32, 32))
    fitted = select_and_prune(surgeon, scoring.create("l1"), source, ratio=0.5, quiet=True, refit=refit)
    assert removed(fitted) == removed(stale)
    assert fitted[0].scoring_top1 == stale[0].scoring_top1 > 0.8
    gain = statistics.fmean(f.scoring_top1 - s.scoring_top1 for f, s in zip(fitted[1:], stale[1:]))
    assert gain >= 0.15


@pytest.mark.parametrize("classes, per_class, images", [(10, 15, 100), (3, 50, 99), (10, 5, 50), (5, 1, 5)])
def test_scoring_top1_reads_at_most_100_images(shapes, classes: int, per_class: int, images: int) -> None:
    model = EmbeddedVGG().eval()
    seen: list[int] = []
    model.register_forward_pre_hook(lambda module, args: seen.append(len(args[0])))
    top1 = scoring_top1(model, ScoringData(shapes, classes=range(classes), per_class=per_class, seed=0))
    assert sum(seen) == images and 0.0 <= top1 <= 1.0  # the first ⌊100 / K⌋ (at least one, at most N) per class


def test_seed_reaches_every_scorer_that_draws() -> None:
    def selection(seed: int) -> list[tuple[int, ...]]:
        return removed(prune_embedded(make_scorer(PruneConfig(scorer="random", seed=seed)), None))

    assert selection(1) == selection(1)
    assert selection(1) != selection(2)
    drawing = [n for n in scoring.list_scorers() if "seed" in scoring.scorer_options(n)]
    assert drawing == ["nisp", "random", "thinet"]
    assert all(make_scorer(PruneConfig(scorer=n, seed=7)).seed == 7 for n in drawing)


def test_authors_convention_selects_differently(shapes) -> None:
    source = ScoringData(shapes, classes=range(10), per_class=5, seed=0)
    paper = prune_embedded(make_scorer(PruneConfig(scorer="entropy")), source, refit=None)
    config = PruneConfig(scorer="entropy", scorer_options=(("convention", "authors"),))
    authors = prune_embedded(make_scorer(config), source, refit=None)
    assert removed(paper) != removed(authors)


def test_scorer_options_and_layer_facts_are_in_the_report(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["--scorer", "entropy", "--scorer-opt", "convention=authors", "--classes", "2",
            "--samples-per-class", "4", "--no-finetune", "--quiet", "--out", str(out)]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["scorer_options"] == {"convention": "authors"}
    assert report["settings"]["layer_bn_batches"] == PruneConfig().layer_bn_batches
    assert [layer["map_size"] for layer in report["layers"]] == [32, 32, 16, 16, 8, 8]
    assert all(0.0 <= layer["scoring_top1"] <= 1.0 for layer in report["layers"])
    assert 0.0 <= report["pruned_bn_reestimated"]["top1"] <= 1.0


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
    assert main(["--scorer", scorer, "--scorer-opt", opt, "--out", str(out), "--quiet"]) == 2
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


def test_plain_testbed_runs_the_main_job_with_large_maps(tmp_path: Path) -> None:
    out = tmp_path / "plain"
    args = ["--model", "embedded-plain", "--scorer", "l1", "--classes", "2", "--samples-per-class", "4",
            "--no-finetune", "--quiet", "--out", str(out)]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["before"]["top1"] >= 0.85
    assert report["layers"][-1]["map_size"] >= 14
    assert report["pruned_bn_reestimated"] == report["pruned_before_finetune"]  # nothing to re-estimate


def test_layer_bn_benchmark_quick(tmp_path: Path) -> None:
    done = run_benchmark("layer_bn", "--preset", "quick", "--results", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads((tmp_path / "layer_bn-quick.json").read_text())["runs"]
    by_b = {r["batches"]: r["mean_layers_2_to_L"] for r in runs}
    assert set(by_b) == {0, 2} and by_b[2] > by_b[0]


def test_api_only_bad_input_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    import prune

    for config in (PruneConfig(scorer_options=(("colour", "x"),)), PruneConfig(rounding="bogus"),
                   PruneConfig(scorer="random", scorer_options=(("seed", 3),))):
        with pytest.raises(prune.UsageError):
            prune.run(config, out=tmp_path / "out")
        assert not (tmp_path / "out").exists()


def test_scorer_options_get_their_own_default_out() -> None:
    from prune.cli import default_out

    authors = PruneConfig(scorer_options=(("convention", "authors"),))
    assert default_out(authors) != default_out(PruneConfig())
