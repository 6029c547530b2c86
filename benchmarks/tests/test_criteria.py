"""benchmarks.criteria: the oracle and ρ recover importances known by construction; split-half
reliability is 1 for a weight scorer and near 0 for a data scorer on pure noise."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

import scoring
from benchmarks import criteria
from benchmarks.tail import LayerTail
from prune import DataBundle

CONTRIBUTIONS = torch.tensor([0.5, 3.0, 1.0, 2.0, 0.1, 4.0, 1.5, 2.5])
"""Channel c adds CONTRIBUTIONS[c] × (mean image value) to the true class's logit."""


def known_net(weights_scale: torch.Tensor, head: torch.Tensor, other: float = 0.0) -> nn.Sequential:
    """1×1 conv (channel c = weights_scale[c] × the summed input channels) → ReLU → mean → linear
    head: class 0's logit weighs channel c by head[c], class 1's weighs every channel by `other`."""
    c = len(weights_scale)
    net = nn.Sequential(nn.Conv2d(3, c, 1, bias=False), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(c, 2, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(weights_scale.view(c, 1, 1, 1).expand(c, 3, 1, 1))
        net[4].weight[0] = head
        net[4].weight[1] = other
    return net.eval()


def test_the_oracle_ranks_channels_by_their_known_contribution():
    # contribution_c = conv scale × head weight; the two factors are ordered differently,
    # so a weight-norm criterion (conv only) cannot be right by accident
    scale = torch.tensor([1.0, 2.0, 0.5, 4.0, 0.25, 2.0, 3.0, 1.25])
    net = known_net(scale, CONTRIBUTIONS / scale)
    images = torch.rand(12, 3, 6, 6) * 0.1 + 0.05  # positive: every unit is active, label 0
    labels = torch.zeros(12, dtype=torch.long)
    tail = LayerTail(net, net[0], images)
    assert tail.tail is not None  # the fx split runs only the rest of the network
    delta = criteria.oracle_losses(tail, labels, len(scale))
    assert delta.shape == (8, 12) and (delta > 0).all()
    oracle = delta.mean(1)
    assert criteria.spearman(oracle, CONTRIBUTIONS) == pytest.approx(1.0)
    assert criteria.top_recall(CONTRIBUTIONS, oracle) == 1.0
    # zeroing channel c lowers the logit margin by exactly its contribution: check one by hand
    margin = (CONTRIBUTIONS.sum() * 3 * images.mean((1, 2, 3)))
    loss = nn.functional.softplus(-margin)
    by_hand = nn.functional.softplus(-(margin - CONTRIBUTIONS[5] * 3 * images.mean((1, 2, 3)))) - loss
    assert torch.allclose(delta[5], by_hand, atol=1e-5)
    # l1 sees only the conv scale: its ρ with the oracle is that of scale with the contributions
    batch = scoring.ClassBatch(class_index=0, images=images, activations=torch.relu(net[0](images)).detach())
    l1 = criteria.score(criteria.arm_of("l1"), net, net[0], "0", [batch], seed=0)
    assert criteria.spearman(l1, oracle) == pytest.approx(criteria.spearman(scale, CONTRIBUTIONS))
    assert criteria.spearman(l1, oracle) < 0.9


def test_layer_top1_zeroes_the_given_channels():
    net = known_net(torch.ones(8), CONTRIBUTIONS, other=1.5)  # class 0 wins by 14.6 to 12 (× image mean)
    images = torch.rand(10, 3, 4, 4) + 0.1
    tail = LayerTail(net, net[0], images)
    labels = torch.zeros(10, dtype=torch.long)
    # without the 3 largest contributors class 0 has 5.1 against 7.5; without the 3 smallest, 13.0 against 7.5
    removed = torch.tensor([[5, 1, 7], [4, 0, 2]])
    assert criteria.pruned_top1(tail, labels, removed).tolist() == [0.0, 1.0]


def _noise_pool(classes: int, n: int, channels: int, side: int, seed: int) -> list[scoring.ClassBatch]:
    g = torch.Generator().manual_seed(seed)
    return [scoring.ClassBatch(class_index=c, images=torch.randn(n, 3, side, side, generator=g),
                               activations=torch.relu(torch.randn(n, channels, side, side, generator=g)))
            for c in range(classes)]


@pytest.mark.parametrize("arm", ["apoz", "entropy"])
def test_split_half_of_a_data_scorer_on_pure_noise_is_near_zero(arm):
    conv = nn.Conv2d(3, 64, 3, padding=1)
    net = nn.Sequential(conv, nn.ReLU())
    pool = _noise_pool(classes=2, n=40, channels=64, side=6, seed=1)
    rho = criteria.split_half(criteria.arm_of(arm), net, conv, "0", pool, 20, seed=0)
    assert rho is not None and abs(rho) < 0.4  # 64 channels: |ρ| of independent noise has sd ≈ 0.13


def test_split_half_of_a_weight_scorer_is_one():
    conv = nn.Conv2d(3, 64, 3, padding=1)
    net = nn.Sequential(conv, nn.ReLU())
    pool = _noise_pool(classes=2, n=10, channels=64, side=6, seed=2)
    assert criteria.split_half(criteria.arm_of("l1"), net, conv, "0", pool, 5, seed=0) == pytest.approx(1.0)


def test_statistics_helpers():
    assert criteria.spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert criteria.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert criteria.spearman([1, 1, 1], [1, 2, 3]) is None
    assert criteria.interval([None, None]) == (None, None)
    low, high = criteria.interval([float(v) for v in range(101)])
    assert (low, high) == (pytest.approx(2.5), pytest.approx(97.5))
    assert criteria.top_recall(torch.tensor([5.0, 4, 3, 2, 1]), torch.tensor([1.0, 2, 3, 4, 5])) == 0.0


def test_quick_run_writes_a_row_per_layer_and_arm(tmp_path, one_thread):
    assert criteria.main(["--quick", "--results", str(tmp_path), "--n-study", "embedded"]) == 0
    summary = json.loads((tmp_path / "criteria-quick.json").read_text())
    layers = {layer["layer"] for layer in summary["layers"]}
    assert len(layers) == 6 and len(summary["rows"]) == 6 * 3
    for row in summary["rows"]:
        assert {"testbed", "layer", "scorer", "rho", "rho_low", "rho_high", "top20_recall", "split_half",
                "layer_top1", "map_size"} <= row.keys()
        assert row["rho_low"] is not None and row["rho_low"] <= row["rho_high"]
        assert (row["split_half"] is None) == (row["scorer"] in ("l1", "random"))
    assert (tmp_path / "criteria-quick.md").exists() and (tmp_path / "criteria-quick-rho.png").exists()
    assert (tmp_path / "criteria-quick" / "embedded.json").exists()
    n_study = summary["n_study"]
    assert {(e["n"], e["scorer"]) for e in n_study} == {(n, a) for n in (2, 4) for a in ("entropy", "l1")}
    assert all(e["layer"] in layers for e in n_study) and len(n_study) == 2 * 2 * 6
    # a later report asked for another testbed still summarises every finished one
    assert criteria.main(["--quick", "--results", str(tmp_path), "--testbeds", "embedded-plain", "--report-only"]) == 0
    assert json.loads((tmp_path / "criteria-quick.json").read_text())["testbeds"] == ["embedded"]


def test_quick_map_size_study_trains_a_network_per_side_and_keeps_what_it_finished(tmp_path, one_thread):
    args = ["--quick", "--results", str(tmp_path), "--testbeds", "embedded-plain", "--arms", "l1",
            "--map-size-study", "--map-sizes", "32", "24", "--n-study", "embedded-plain-24"]
    assert criteria.main(args) == 0
    summary = json.loads((tmp_path / "criteria-quick.json").read_text())
    study = summary["map_size_study"]
    assert {e["input_size"] for e in study} == {24, 32}
    assert {e["scorer"] for e in study} == {"entropy", "l1"}  # the quick preset's map_size_arms
    for e in study:
        assert {"input_size", "layer", "map_size", "scorer", "rho", "rho_low", "rho_high", "split_half"} <= e.keys()
        first = e["layer"] in ("features.0", "features.2")  # before the plain VGG's first pool
        assert e["map_size"] == (e["input_size"] if first else e["input_size"] // 2)
        assert (e["split_half"] is None) == (e["scorer"] == "l1")
    # at the shipped side the study reuses the testbed run: the same ρ for the same arm and layer
    shipped = {(r["layer"], r["scorer"]): r["rho"] for r in summary["rows"]}
    assert all(e["rho"] == shipped[(e["layer"], e["scorer"])] for e in study if e["input_size"] == 32
               and e["scorer"] == "l1")
    record = json.loads((tmp_path / "criteria-quick" / "map-size" / "train-24.json").read_text())
    assert record["input_size"] == 24 and 0 <= record["test_top1"] <= 1
    assert {e["input_size"] for e in summary["n_study"]} == {24}
    for png in ("map-size", "n-study"):
        assert (tmp_path / f"criteria-quick-{png}.png").stat().st_size > 0
    # a restart skips the trained network and the finished sides
    weights = tmp_path / "criteria-quick" / "map-size" / "embedded-plain-24.pt"
    stamp = weights.stat().st_mtime_ns
    assert criteria.main(args) == 0
    assert weights.stat().st_mtime_ns == stamp


def test_a_finished_run_keeps_its_rows_and_gets_only_the_arms_it_lacks(tmp_path, one_thread):
    """Adding arms measures those arms alone; each arm's row is the same whichever arms run beside
    it; an arm the model refuses is listed with its reason."""
    def run(folder: Path, *arms: str) -> dict:
        args = ["--quick", "--results", str(folder), "--testbeds", "embedded-plain", "--arms", *arms]
        assert criteria.main(args) == 0
        return json.loads((folder / "criteria-quick" / "embedded-plain.json").read_text())

    first = run(tmp_path / "a", "l1", "tp-bnscale")
    assert {r["scorer"] for r in first["rows"]} == {"l1"} and "BatchNorm" in first["skipped"]["tp-bnscale"]
    assert "Not run: tp-bnscale (" in (tmp_path / "a" / "criteria-quick.md").read_text()
    extended = run(tmp_path / "a", "random", "l1", "tp-bnscale")
    assert [r["scorer"] for r in extended["rows"]] == ["random", "l1"] * 6  # layer by layer, in the order asked
    assert [r for r in extended["rows"] if r["scorer"] == "l1"] == first["rows"]
    assert extended["layers"] == first["layers"] and extended["settings"]["arms"] == ["random", "l1"]
    alone = run(tmp_path / "b", "random")
    assert [r for r in extended["rows"] if r["scorer"] == "random"] == alone["rows"]


def test_a_finished_run_is_known_by_its_weights_content_not_their_path(tmp_path):
    """A checkout cloned or moved elsewhere keeps its finished runs; other weights do not reuse them."""
    here, moved, other = tmp_path / "a.pt", tmp_path / "clone" / "a.pt", tmp_path / "b.pt"
    torch.save({"w": torch.ones(3)}, here)
    moved.parent.mkdir()
    shutil.copy(here, moved)
    torch.save({"w": torch.zeros(3)}, other)

    def testbed(weights: Path) -> criteria.Testbed:
        return criteria.Testbed(name="embedded-plain-64", model="embedded-plain", weights=str(weights), input_size=64)

    assert testbed(here).key() == testbed(moved).key() != testbed(other).key()
    s = criteria.Settings()
    result = tmp_path / "run.json"
    result.write_text(json.dumps({"model": testbed(here).key(), "settings": criteria.settings_json(s)}))
    assert criteria.finished(s, result, testbed(moved)) and not criteria.finished(s, result, testbed(other))
    # the same network under other result-deciding settings is not finished
    assert not criteria.finished(replace(s, samples_per_class=s.samples_per_class + 1), result, testbed(here))
    assert criteria.finished(replace(s, threads=1), result, testbed(here))  # threads do not decide results


def test_layer_progress_keeps_finished_layers_for_the_same_settings_only(tmp_path):
    path = tmp_path / "t.json"
    first = criteria.LayerProgress(path, {"settings": {"seed": 0}})
    first.put("features.0", [[{"rho": 0.5}], {"layer": "features.0"}])
    assert criteria.LayerProgress(path, {"settings": {"seed": 0}}).layers == first.layers
    assert criteria.LayerProgress(path, {"settings": {"seed": 1}}).layers == {}  # other settings: start again
    first.done()
    assert not (tmp_path / "t.partial.json").exists()


def random_data(classes: int, per_class: int, size: int) -> DataBundle:
    """Seeded random images [3, size, size], `per_class` of each class, as both splits."""
    x = torch.randn(classes * per_class, 3, size, size, generator=torch.Generator().manual_seed(0))
    y = torch.arange(classes).repeat_interleave(per_class)
    split = torch.utils.data.TensorDataset(x, y)
    return DataBundle(split, split, tuple(f"c{i}" for i in range(classes)), tuple(y.tolist()), size)


def test_the_random_controls_interval_includes_its_own_draws():
    """A seeded scorer draws anew in each bootstrap replicate: the interval of `random` on a
    layer whose oracle is known spans both signs (one fixed draw would give a narrow band)."""
    settings = criteria.Settings(samples_per_class=3, bootstrap=30, random_draws=2, seed=0)
    net = known_net(torch.ones(8), CONTRIBUTIONS)
    data = random_data(classes=2, per_class=10, size=4)
    images = (torch.rand(6, 3, 4, 4, generator=torch.Generator().manual_seed(0)) + 0.1) * 0.02  # small margins
    rows, _ = criteria.layer_rows(settings, "t", net, data, (images, torch.zeros(6, dtype=torch.long)), "0", net[0],
                                  [criteria.arm_of("random")])
    assert rows[0]["rho_low"] < 0 < rows[0]["rho_high"]


def test_every_committed_run_is_finished_under_the_default_settings():
    """A change to the settings or the network key that would silently rerun the committed
    testbed runs, map-size sides and N studies (hours) fails here first (an arm added to the
    defaults is measured on its own and added, `missing_arms`)."""
    s = criteria.parse([])[0]
    names = ["embedded", "embedded-plain", "fashion", "fashion-plain"]
    studies = sorted(p.stem.removeprefix("n-study-") for p in s.runs_dir.glob("n-study-*.json") if ".partial." not in p.name)
    assert studies and all(criteria.finished(s, s.runs_dir / f"{n}.json", criteria.resolve(s, n)) for n in names)
    assert all(criteria.finished(s, s.runs_dir / f"n-study-{n}.json", criteria.resolve(s, n)) for n in studies)
    assert [r["testbed"] for r in criteria.finished_testbeds(s)] == names
    sides = [size for size in s.map_sizes if size != criteria.map_size.native_size()]
    assert all(criteria.finished(criteria.map_size.study_settings(s, size),
                                 criteria.map_size.folder(s) / f"embedded-plain-{size}.json",
                                 criteria.map_size.testbed(s, size)) for size in sides)
