"""Paper experiments (`python -m benchmarks.<name> --quick`): outputs and their invariants.

Each command runs once per module in-process (its --quick mode on the embedded model and
shrunk data) into a temporary folder; the tests then check the JSON/MD/PNG it wrote.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import prune
import scoring
from benchmarks.ablation import ablation_masks
from benchmarks.common import Setup, load_setup, torch_threads
from benchmarks.layers import conv_layers, find_conv
from benchmarks.tail import LayerTail, channel_mask, unit_module
from benchmarks.units import fold_bn
from scoring.hooks import forward_hooks

needs_weights = pytest.mark.skipif(not prune.model_entry("embedded").weights.is_file(), reason="embedded weights not built yet")


def _run(module, tmp: Path, *extra: str) -> dict:
    assert module.main(["--quick", "--quiet", "--results-dir", str(tmp), *extra]) == 0
    name = module.__name__.rsplit(".", 1)[1]
    assert (tmp / f"{name}-quick.md").read_text().strip()
    assert any(p.suffix == ".png" and p.stat().st_size > 1000 for p in tmp.glob(f"{name}-quick-*.png"))
    return json.loads((tmp / f"{name}-quick.json").read_text())


@pytest.fixture(scope="module")
def quick_setup() -> Setup:
    """The model and test data the --quick runs use."""
    from benchmarks.ablation import QUICK, parse_args

    settings = parse_args(["--quick"])
    assert settings == QUICK
    with torch_threads(settings):  # one thread, as the --quick runs
        return load_setup(settings)


# ---------------------------------------------------------------- helpers, no weights needed


def test_flags_override_the_preset_and_none_keeps_it():
    from benchmarks import units

    assert units.parse_args([]) == units.FULL
    s = units.parse_args(["--quick", "--random-inits", "7", "--corruptions", "0,1", "--class", "2"])
    assert s.quick and s.random_inits == 7 and s.corruptions == (0.0, 1.0) and s.cls == 2
    assert s.train_epochs == units.QUICK.train_epochs  # not given: the quick preset's
    with pytest.raises(SystemExit):
        units.parse_args(["--corruptions", "0,1.5"])
    with pytest.raises(SystemExit):
        units.parse_args(["--random-inits", "0"])


def _random_vgg() -> torch.nn.Module:
    torch.manual_seed(0)
    model = prune.create_model("embedded", pretrained=False).eval()
    for m in model.modules():  # non-trivial BN statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model


def test_layer_tail_matches_a_full_forward_with_a_mask_hook():
    model = _random_vgg()
    name, conv = find_conv(model, None)
    images = torch.randn(12, 3, 32, 32)
    tail = LayerTail(model, conv, images, batch_size=5)
    assert tail.tail is not None  # the fx split worked: only the rest of the net is re-run
    masks = ablation_masks(torch.randperm(conv.out_channels), [0, 7, conv.out_channels])
    fast = tail.logits_many(masks)
    with torch.no_grad():
        torch.testing.assert_close(fast[0], model(images))
        for mask, got in zip(masks, fast):
            with channel_mask(unit_module(model, conv), mask):
                torch.testing.assert_close(got, model(images))
        relu = model.features[-1]
        assert isinstance(relu, nn.ReLU)
        with forward_hooks([relu], lambda _m, _i, out: torch.zeros_like(out)):
            torch.testing.assert_close(fast[-1], model(images))  # all units ablated = zero layer output


def test_fold_bn_keeps_the_units_and_makes_filter_rescaling_exact():

    model = _random_vgg()
    name, conv = find_conv(model, "features.14")
    images = torch.randn(6, 3, 32, 32)
    before = prune.collect_units(model, conv, images, name=name)
    fold_bn(model, conv)
    assert isinstance(model.features[15], nn.Identity)
    after = prune.collect_units(model, conv, images, name=name)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        conv.weight.mul_(0.5)
        conv.bias.mul_(0.5)
    assert torch.equal(prune.collect_units(model, conv, images, name=name), after * 0.5)


# ---------------------------------------------------------------- the four commands (quick)


@pytest.fixture(scope="module")
def ablation(tmp_path_factory) -> dict:
    from benchmarks import ablation

    return _run(ablation, tmp_path_factory.mktemp("ablation"))


@needs_weights
def test_ablation_structure(ablation):
    steps, channels = ablation["steps"], ablation["channels"]
    assert steps[0] == 0 and steps[-1] == channels and steps == sorted(steps)
    assert set(ablation["curves"]) == set(scoring.list_scorers())
    for by_order in ablation["curves"].values():
        assert set(by_order) == {"ascending", "descending"}
        for curve in by_order.values():
            assert all(len(curve[m]) == len(steps) for m in ("accuracy", "loss", "balanced_accuracy"))
            assert all(0.0 <= a <= 1.0 for a in curve["accuracy"] + curve["balanced_accuracy"])
    assert all(len(s) == channels for s in ablation["scores"].values())


@needs_weights
def test_ablating_no_unit_keeps_the_accuracy(ablation, quick_setup):
    images, labels = quick_setup.test
    with torch.no_grad():
        logits = quick_setup.model(images)
    own = labels == ablation["class"]
    plain = float((logits[own].argmax(1) == ablation["class"]).float().mean())
    assert ablation["unchanged"]["accuracy"] == pytest.approx(plain)
    for by_order in ablation["curves"].values():
        for curve in by_order.values():
            assert curve["accuracy"][0] == pytest.approx(plain)
            assert curve["loss"][0] == pytest.approx(ablation["unchanged"]["loss"])


@needs_weights
def test_ablating_every_unit_equals_the_zero_layer(ablation, quick_setup):
    model, (images, labels) = quick_setup.model, quick_setup.test
    relu = model.features[-1]  # the last conv's ReLU: zero the layer's output independently
    assert isinstance(relu, nn.ReLU)
    with forward_hooks([relu], lambda _m, _i, out: torch.zeros_like(out)), torch.no_grad():
        logits = model(images)
    own = labels == ablation["class"]
    zero_acc = float((logits[own].argmax(1) == ablation["class"]).float().mean())
    zero_loss = float(nn.functional.cross_entropy(logits[own], labels[own]))
    assert ablation["all_zero"]["accuracy"] == pytest.approx(zero_acc)
    for by_order in ablation["curves"].values():
        for curve in by_order.values():
            assert curve["accuracy"][-1] == pytest.approx(zero_acc)
            assert curve["loss"][-1] == pytest.approx(zero_loss, rel=1e-5)


@needs_weights
def test_ablation_table11(ablation):
    rows = ablation["table11"]["rows"]
    assert set(rows) == set(scoring.list_scorers())
    unchanged = {r["unchanged"] for r in rows.values()}
    assert len(unchanged) == 1  # the same unchanged network for every scorer
    for r in rows.values():
        assert 0.0 <= r["unchanged"] <= r["ablated"] <= 1.0
        assert r["enhanced"] == pytest.approx(r["ablated"] - r["unchanged"])
        assert r["ablated"] >= max(r["best_ascending"], r["best_descending"]) - 1e-12
        assert all(b >= u for b, u in zip(r["per_class_best"], r["per_class_unchanged"]))


@needs_weights
def test_ablation_bad_layer_is_a_usage_error(tmp_path, capsys):
    from benchmarks import ablation

    assert ablation.main(["--quick", "--quiet", "--layer", "nope", "--results-dir", str(tmp_path)]) == 2
    assert "no conv layer 'nope'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
    with pytest.raises(SystemExit):
        ablation.main(["--quick", "--scorers", "entropyy"])


@pytest.fixture(scope="module")
def units(tmp_path_factory) -> dict:
    from benchmarks import units

    return _run(units, tmp_path_factory.mktemp("units"))


@needs_weights
def test_units_table1_rescaling(units):
    base, img, filt, both = units["table1"]
    assert (filt["image_scale"], filt["filter_scale"]) == (1.0, 0.5)
    # BN is folded into the conv, so halving the filter and bias halves the unit exactly:
    assert filt["l1"] == pytest.approx(0.5 * base["l1"], rel=1e-6)
    assert filt["apoz"] == base["apoz"]
    assert filt["entropy"] == base["entropy"]
    assert filt["selective_rate"] == base["selective_rate"]
    assert filt["selectivity"] == pytest.approx(base["selectivity"], abs=1e-5)  # a ratio of means
    assert img["l1"] == base["l1"] and both["l1"] == filt["l1"]
    for row in units["table1"]:
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["apoz"] <= 1.0 and row["entropy"] >= 0.0


@needs_weights
def test_units_table2_and_layers(units):
    t2 = units["table2"]
    for k in ("l1", "apoz", "selectivity", "entropy", "selective_rate"):
        assert len(t2["random_values"][k]) == 3
        assert t2["random"][k]["std"] >= 0.0
        assert t2["trained"][k] == pytest.approx(units["table1"][0][k])
    convs = [n for n, _ in conv_layers(prune.create_model("embedded", pretrained=False))]
    for which in ("trained", "random"):
        assert [row["layer"] for row in units["layers"][which]] == convs
        assert all(0.0 <= row["selective_rate_mean"] <= 1.0 for row in units["layers"][which])


@needs_weights
def test_units_training_and_corrupted_labels(units):
    history = units["training"]
    assert [h["epoch"] for h in history] == [0, 1]
    assert history[0]["train_loss"] is None and history[1]["train_loss"] > 0
    assert all(math.isfinite(h["entropy_mean"]) for h in history)
    rows = units["corrupted"]
    assert [r["corrupted"] for r in rows] == [0.0, 0.5, 1.0]
    assert rows[0]["labels_changed"] == 0.0 and rows[-1]["labels_changed"] > 0.6
    for r in rows:
        assert r["gap"] == pytest.approx(r["train_accuracy"] - r["test_accuracy"])
        assert r["entropy_mean"] >= 0.0


@pytest.fixture(scope="module")
def characterise(tmp_path_factory) -> dict:
    from benchmarks import characterise

    return _run(characterise, tmp_path_factory.mktemp("characterise"))


@needs_weights
def test_characterise_outputs(characterise):
    rows = characterise["table5"]["rows"]
    assert len(rows) == 3
    n = characterise["max_images"]
    for row in rows.values():
        assert set(row) == {"birth_time", "betti1_max", "betti1_integral"}
        assert all(0.0 <= v <= math.log(n) + 1e-9 for v in row.values())
    assert characterise["unit"] in characterise["table5"]["units"]
    for row in characterise["cubical"]:
        for kind in ("clique", "cubical"):
            assert 0.0 <= row[f"{kind}_no_birth"] <= 1.0
            assert row[f"{kind}_entropy"] >= 0.0
    for rows_ in characterise["sample_size"]["layers"].values():
        sizes = [r["size"] for r in rows_]
        assert sizes == sorted(sizes) and sizes[-1] == characterise["sample_size"]["class_images"]
        assert rows_[-1]["repeats"] == 1 and rows_[-1]["layer"]["std"] == 0.0


@pytest.fixture(scope="module")
def pruning_curve(tmp_path_factory) -> dict:
    from benchmarks import pruning_curve

    return _run(pruning_curve, tmp_path_factory.mktemp("pruning_curve"))


@needs_weights
def test_pruning_curve_outputs(pruning_curve):
    rows = pruning_curve["rows"]
    assert {(r["ratio"], r["classes"]) for r in rows} == {(0.5, 2), (0.6, 2), (0.5, 1)}
    for r in rows:
        assert r["scorer"] == "entropy"
        assert 0.0 <= r["top1_after"] <= 1.0 and 0.0 <= r["top1_pruned"] <= 1.0
        assert r["params_after"] < r["params_before"] and r["flops_after"] < r["flops_before"]
        assert len(r["finetune_losses"]) == 1
    by_ratio = {r["ratio"]: r["params_after"] for r in rows if r["classes"] == 2}
    assert by_ratio[0.6] < by_ratio[0.5]
