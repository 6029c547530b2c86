"""Inputs checked before work starts (issue 18): scorer requirements, input sizes, timm tags,
one-image BatchNorm batches, named weights' heads, edited model.pt files, as_tp_importance labels."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch_pruning as tp
import torchvision
from helpers import image_folder, quick_run
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import prune
import scoring
from finetune.batches import in_order
from finetune.batchnorm import recalibrate_batchnorm
from finetune.train import fit
from prune.cli import main
from prune.errors import UsageError
from prune.outputs.checkpoint import FORMAT, read_checkpoint
from prune.zoo import registry
from prune.zoo.embedded_model import EmbeddedVGG
from prune.zoo.models import classifier, create_model, fit_head
from prune.zoo.shapes import MIN_SIZE, make_shapes

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["--classes", "2", "--samples-per-class", "2", "--no-finetune", "--quiet"]


def cli_error(capsys, *args: str) -> str:
    """Run `main(args)`; assert exit code 2 and one stderr line 'error: ...' with no traceback; that line."""
    code = main(list(args))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> list[str]:
    """quick_run's flags: a 3-class folder of 8x8 images, random embedded weights, l1, 16² input."""
    return quick_run(tmp_path_factory.mktemp("quick"))



# ---------------------------------------------------------------- 1. scorers' own requirements


def test_selectivity_with_one_class_is_a_usage_error(tmp_path, capsys, quick):
    line = cli_error(capsys, *quick, *SMALL, "--scorer", "selectivity", "--classes", "1", "--out", str(tmp_path / "o"))
    assert "selectivity" in line and "pass --classes 2 or more" in line and "--scorer" in line
    assert not (tmp_path / "o").exists()


def test_nisp_with_one_image_is_a_usage_error(tmp_path, capsys, quick):
    line = cli_error(capsys, *quick, *SMALL, "--scorer", "nisp", "--classes", "1", "--samples-per-class", "1",
                     "--out", str(tmp_path / "o"))
    assert "nisp" in line and "at least 2 scoring images, got 1" in line and "--classes 2" in line
    assert not (tmp_path / "o").exists()


class ConvHead(nn.Module):
    """Two convs, the second a 1x1 classifier conv, then global pooling: no nn.Linear."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(8, num_classes, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_nisp_on_a_model_without_linear_classifier_is_a_usage_error(tmp_path, capsys, scratch_registry):
    registry.register_model("conv-head-net", input_size=16, num_classes=2)(ConvHead)
    data = image_folder(tmp_path / "data", classes=2, train=2, val=2, size=8)
    line = cli_error(capsys, "--model", "conv-head-net", "--data", str(data), "--scorer", "nisp", *SMALL,
                     "--out", str(tmp_path / "o"))
    assert "nisp" in line and "nn.Linear" in line and "choose another --scorer" in line
    assert not (tmp_path / "o").exists()


class HeadFirst(nn.Module):
    """The head `fc` registered before a squeeze-excitation of two Linears and an unused Linear
    (the last registered nn.Linear is not the classifier, the last one the forward runs is); with
    `functional`, the head applied as F.linear to fc's weights (no Linear runs last)."""

    def __init__(self, num_classes: int, functional: bool = False) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 12, 3, padding=1)
        self.fc = nn.Linear(12, num_classes)
        self.se_fc1, self.se_fc2 = nn.Linear(12, 4), nn.Linear(4, 12)
        self.unused = nn.Linear(12, 7) if not functional else None
        self.functional = functional

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        gate = torch.sigmoid(self.se_fc2(torch.relu(self.se_fc1(x.mean((2, 3))))))
        pooled = (x * gate[:, :, None, None]).mean((2, 3))
        return F.linear(pooled, self.fc.weight, self.fc.bias) if self.functional else self.fc(pooled)


def test_the_classifier_is_the_layer_the_forward_runs_last_when_its_width_is_the_logits():
    example = torch.zeros(1, 3, 8, 8)
    model = HeadFirst(5)
    assert classifier(model, example) == ("fc", model.fc)
    assert classifier(model) == ("unused", model.unused)  # without a forward: the last registered
    functional = HeadFirst(5, functional=True)
    assert classifier(functional, example) == ("fc", functional.fc)  # se_fc2 runs last, 12 wide: not it


@pytest.mark.parametrize(("scorer", "functional"), [("l1", False), ("nisp", False), ("l1", True)])
def test_a_model_whose_head_is_not_the_last_registered_prunes_and_reloads(tmp_path, capsys, scratch_registry,
                                                                          scorer, functional):
    registry.register_model("head-first", input_size=16, num_classes=2)(lambda n: HeadFirst(n, functional))
    data = image_folder(tmp_path / "data", classes=2, train=2, val=2, size=8)
    out = tmp_path / "out"  # nisp scores the input of the classifier
    assert main(["--model", "head-first", "--data", str(data), "--scorer", scorer, *SMALL, "--no-speed",
                 "--out", str(out)]) == 0, capsys.readouterr().err
    pruned = prune.load_pruned(out / "model.pt")
    assert pruned.conv1.out_channels == 4 and pruned(torch.zeros(2, 3, 16, 16)).shape == (2, 2)
    assert pruned.conv2.out_channels == (12 if functional else 6)  # fc's weights used functionally: left whole


def test_named_weights_for_another_input_size_refit_their_head_without_a_forward(scratch_registry):
    """A named weight set's model may take only its own size (torchvision's ViT SWAG weights: 384²),
    not the entry's: its head is refit without running it."""
    from test_contract import Flat  # runs on 8² images only

    @registry.register_family("sized", names=lambda: ["net"], description="a net for 8² images")
    def sized(_name: str) -> registry.ModelEntry:
        return registry.ModelEntry("sized:net", build=Flat, input_size=16, num_classes=5,
                                   named_weights=lambda _weights: Flat(5))

    model = create_model("sized:net", weights="OTHER_SIZE", num_classes=3)
    assert model.head.out_features == 3 and model(torch.zeros(1, 3, 8, 8)).shape == (1, 3)


class Oblong(nn.Module):
    """A stride of (2, 1): the first conv's maps are twice as wide as high."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, stride=(2, 1), padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3)))


def test_entropy_on_maps_that_are_not_square_is_refused_before_scoring(tmp_path, capsys, scratch_registry):
    registry.register_model("oblong", input_size=16, num_classes=2)(Oblong)
    data = image_folder(tmp_path / "data", classes=2, train=2, val=2, size=8)
    flags = ["--model", "oblong", "--data", str(data), *SMALL, "--no-speed"]
    line = cli_error(capsys, *flags, "--scorer", "entropy", "--out", str(tmp_path / "o"))
    assert "conv1's maps are 8×16" in line and "choose another --scorer" in line
    assert not (tmp_path / "o").exists()
    assert main([*flags, "--scorer", "hrank", "--out", str(tmp_path / "hrank")]) == 0  # the fix it names works


def test_scorer_checks_accept_what_the_scorers_can_score():
    model = EmbeddedVGG(num_classes=2)
    scoring.create("selectivity").check(model, classes=2, samples_per_class=1)
    scoring.create("nisp").check(model, classes=1, samples_per_class=2)
    scoring.create("nisp").check(model, classes=2, samples_per_class=1)
    with pytest.raises(ValueError, match="nn.Linear"):
        scoring.create("nisp").check(ConvHead(2), classes=2, samples_per_class=2)


# ---------------------------------------------------------------- 2. input size of the generated data


def test_input_size_below_the_generators_minimum_is_a_usage_error(tmp_path, capsys):
    line = cli_error(capsys, "--input-size", str(MIN_SIZE // 2), *SMALL, "--out", str(tmp_path / "o"))
    assert f"--input-size {MIN_SIZE // 2}" in line and f"--input-size {MIN_SIZE} or more" in line
    assert not (tmp_path / "o").exists()


def test_the_minimum_size_is_one_the_generator_and_model_take():
    images, _ = make_shapes("test", per_class=1, size=MIN_SIZE).tensors
    assert images.shape == (10, 3, MIN_SIZE, MIN_SIZE)
    assert EmbeddedVGG().eval()(images).shape == (10, 10)
    with pytest.raises(ValueError, match=f">= {MIN_SIZE}"):
        make_shapes("test", per_class=1, size=MIN_SIZE - 1)


# ---------------------------------------------------------------- 3. timm tags


def test_unknown_timm_tag_is_a_usage_error_without_network(tmp_path, capsys, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(UsageError) as info:
        registry.model_entry("timm:resnet18.badtag")
    message = str(info.value)
    assert "'badtag'" in message and "--model timm:resnet18 " in message and "timm:resnet18.a1_in1k" in message
    line = cli_error(capsys, "--model", "timm:resnet18.badtag", *SMALL, "--out", str(tmp_path / "o"))
    assert "pretrained tag 'badtag'" in line
    assert not (tmp_path / "o").exists()
    assert registry.model_entry("timm:resnet18.a1_in1k").name == "timm:resnet18.a1_in1k"


# ---------------------------------------------------------------- 4. a last batch of one image


def bn_net() -> nn.Module:
    """BatchNorm on a 1x1 map (BatchNorm1d): train mode refuses a batch of one image."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))


def test_a_last_batch_of_one_image_is_skipped_on_a_batchnorm_model():
    images, labels = torch.randn(5, 3, 6, 6), torch.tensor([0, 1, 0, 1, 0])
    model = bn_net()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        model.train()(images[:1])  # what the skipped batch would have raised
    seen: list[int] = []

    def count(x: torch.Tensor) -> torch.Tensor:
        seen.append(len(x))
        return x

    for batches in (in_order(images, labels, batch_size=4), DataLoader(TensorDataset(images, labels), batch_size=4)):
        seen.clear()
        (loss,) = fit(model, batches, torch.optim.SGD(model.parameters(), lr=0.01), epochs=1, lr=lambda e, b: 0.01,
                      augment=count, quiet=True)
        assert seen == [4] and torch.isfinite(torch.tensor(loss))


def test_batch_size_one_trains_on_every_image():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 2))
    images, labels = torch.randn(3, 3, 6, 6), torch.tensor([0, 1, 0])
    seen: list[int] = []
    fit(model, in_order(images, labels, batch_size=1), torch.optim.SGD(model.parameters(), lr=0.01), epochs=1,
        lr=lambda e, b: 0.01, augment=lambda x: seen.append(len(x)) or x, quiet=True)
    assert seen == [1, 1, 1]


def test_batchnorm_recalibration_skips_a_last_batch_of_one_image():
    model, first_four = bn_net(), bn_net()
    images = torch.randn(5, 3, 6, 6)
    loader = DataLoader(TensorDataset(images, torch.zeros(5)), batch_size=4)
    assert recalibrate_batchnorm(model, loader, batches=2, device="cpu") == 4
    alone = DataLoader(TensorDataset(images[:4], torch.zeros(4)), batch_size=4)
    assert recalibrate_batchnorm(first_four, alone, batches=2, device="cpu") == 4
    for key, value in first_four.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


# ---------------------------------------------------------------- 5. named weights get the data's head


def test_fit_head_replaces_the_classifier_and_keeps_the_rest():
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None)
    conv1 = resnet.conv1.weight.clone()
    assert fit_head(resnet, 3) is resnet
    assert resnet.fc.out_features == 3 and resnet.fc.in_features == 512 and torch.equal(resnet.conv1.weight, conv1)
    assert resnet.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 3)
    head = resnet.fc
    fit_head(resnet, 3)
    assert resnet.fc is head  # already the right count: unchanged
    squeeze = fit_head(torchvision.models.squeezenet1_0(weights=None), 4)  # a 1x1 conv head
    assert squeeze.classifier[1].out_channels == 4
    assert squeeze.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 4)


def test_named_torchvision_weights_fit_the_data_and_reload(tmp_path, monkeypatch):
    calls = []

    def offline(name: str, weights: str) -> nn.Module:  # a 1000-way head, as the real weights have
        calls.append(weights)
        return torchvision.models.get_model(name, weights=None)

    monkeypatch.setattr(registry, "_torchvision_weights", offline)
    assert create_model("resnet18", weights="IMAGENET1K_V1", num_classes=3).fc.out_features == 3
    data = image_folder(tmp_path / "data", classes=2, train=2, val=2, size=8)
    out = tmp_path / "o"
    code = main(["--model", "resnet18", "--weights", "IMAGENET1K_V1", "--data", str(data), "--input-size", "32",
                 "--scorer", "l1", "--batch-size", "4", *SMALL, "--out", str(out)])
    assert code == 0 and calls == ["IMAGENET1K_V1", "IMAGENET1K_V1"]
    blob = read_checkpoint(out / "model.pt", FORMAT)
    assert blob["num_classes"] == 2 and blob["state_dict"]["fc.weight"].shape[0] == 2
    model = prune.load_pruned(out / "model.pt")
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 2)
    assert all(torch.equal(v, blob["state_dict"][k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------- 6. load_pruned checks every field


@pytest.fixture(scope="module")
def saved(tmp_path_factory, quick) -> dict:
    """The fields of a model.pt written by a real quick run (embedded model, 2 classes x 2 images)."""
    out = tmp_path_factory.mktemp("run") / "o"
    assert main([*quick, *SMALL, "--out", str(out)]) == 0
    blob = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    assert len(blob["pruning_history"]) >= 2
    assert "flags" not in blob  # written only for models that have some: other files keep their bytes
    return blob


def edited(tmp_path: Path, blob: dict, **changes) -> Path:
    """A copy of `blob` with `changes` (None drops a field) saved as tmp_path/model.pt."""
    copy = {**blob, "state_dict": dict(blob["state_dict"]), "pruning_history": [list(h) for h in blob["pruning_history"]]}
    for key, value in changes.items():
        if value is None:
            copy.pop(key)
        else:
            copy[key] = value
    torch.save(copy, tmp_path / "model.pt")
    return tmp_path / "model.pt"


def test_an_unedited_model_pt_loads(tmp_path, saved):
    model = prune.load_pruned(edited(tmp_path, saved))
    assert model(torch.zeros(1, 3, 16, 16)).shape == (1, 3)


def _history(saved: dict, i: int, entry: object) -> list:
    history = [list(h) for h in saved["pruning_history"]]
    history[i] = entry
    return history


def _nan_state(saved: dict) -> dict:
    state = dict(saved["state_dict"])
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = state[key].clone().fill_(float("nan"))
    return state


CASES = {
    "history entry dropped": (lambda s: {"pruning_history": [list(h) for h in s["pruning_history"][1:]]},
                              "pruning_history"),
    "history index out of range": (lambda s: {"pruning_history": _history(s, 0, [s["pruning_history"][0][0], True,
                                                                                  [999]])}, "pruning_history"),
    "history entry not a triple": (lambda s: {"pruning_history": _history(s, 1, "features.0")}, "pruning_history"),
    "history flag not a bool": (lambda s: {"pruning_history": _history(s, 0, [s["pruning_history"][0][0], "yes", [0]])},
                                "pruning_history"),
    "unknown layer name": (lambda s: {"pruning_history": _history(s, 0, ["features.99", True, [0]])}, "features.99"),
    "history not a list": (lambda s: {"pruning_history": "none"}, "pruning_history"),
    "input_size 0": (lambda s: {"input_size": 0}, "input_size"),
    "input_size text": (lambda s: {"input_size": "abc"}, "input_size"),
    "num_classes changed": (lambda s: {"num_classes": 5}, "num_classes"),
    "num_classes not an int": (lambda s: {"num_classes": 2.5}, "num_classes"),
    "no state_dict": (lambda s: {"state_dict": None}, "state_dict"),
    "state_dict not a dict": (lambda s: {"state_dict": [1, 2]}, "state_dict"),
    "another model name": (lambda s: {"model": "embedded-plain"}, "'model'"),
    "unknown model name": (lambda s: {"model": "vgg61"}, "import the module that registers it"),
    "NaN weights": (lambda s: {"state_dict": _nan_state(s)}, "NaN"),
    "flags not a dict": (lambda s: {"flags": ["transform_input"]}, "'flags'"),
    "flag not a bool": (lambda s: {"flags": {"transform_input": "yes"}}, "'flags'"),
    "unknown flag": (lambda s: {"flags": {"aux_logits": True}}, "'flags'"),
    "flag the model lacks": (lambda s: {"flags": {"transform_input": True}}, "does not have"),  # the VGG has none
}


@pytest.mark.parametrize("case", list(CASES))
def test_an_edited_model_pt_is_refused_naming_the_field(tmp_path, saved, case):
    change, field = CASES[case]
    with pytest.raises(UsageError) as info:
        prune.load_pruned(edited(tmp_path, saved, **change(saved)))
    message = str(info.value)
    assert field in message and "\n" not in message and "model.pt" in message


# ---------------------------------------------------------------- 7. as_tp_importance labels


def conv_group(num_classes: int = 10):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(6, num_classes)).eval()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, 3, 8, 8))
    return graph.get_pruning_group(model[0], tp.prune_conv_out_channels, idxs=list(range(6)))


def test_labels_outside_the_models_classes_are_refused():
    x = torch.randn(4, 3, 8, 8)
    bad = torch.tensor([0, 1, 1000, 2])
    importance = prune.as_tp_importance("apoz", images=x, labels=bad)
    with pytest.raises(UsageError, match=r"label 1000 is outside the model's 10 classes; pass class indices in 0\.\.9"):
        importance(conv_group(10))
    with pytest.raises(UsageError, match="label 1000 is outside the model's 10 classes"):
        prune.as_tp_importance("apoz", images=x, labels=bad, num_classes=10)
    good = torch.tensor([0, 1, 9, 2])
    assert prune.as_tp_importance("apoz", images=x, labels=good)(conv_group(10)).shape == (6,)


@pytest.mark.parametrize("labels", [torch.zeros(2, 2, dtype=torch.long), torch.tensor([0.0, 1.0, 1.0, 0.0]),
                                    [0.5, 1, 1, 0], torch.tensor([True, False, True, False])])
def test_labels_must_be_a_1d_integer_tensor(labels):
    with pytest.raises(UsageError, match="labels must be a 1-D integer tensor"):
        prune.as_tp_importance("apoz", images=torch.randn(4, 3, 8, 8), labels=labels)
