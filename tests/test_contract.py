"""What the pipeline needs from a model's forward (prune.pipeline.contract) and torchvision's
auxiliary heads (prune.zoo.models.drop_auxiliary_heads): a model that returns anything but logits,
or runs weights only in train mode, is refused in one line before any output; GoogLeNet and
Inception v3 prune and fine-tune."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import torchvision
from helpers import image_folder
from torch import nn

import prune
from benchmarks import coverage
from prune.cli import main
from prune.errors import UsageError
from prune.outputs.checkpoint import save_pruned
from prune.pipeline.contract import check_forward, check_plain_weights, example_input, outermost
from prune.zoo import registry
from prune.zoo.models import ModelSpec, create_model, drop_auxiliary_heads

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    """Conv-BN-ReLU, dropout, a linear head; `returns` picks what forward gives back ("logits",
    "tuple", "dict", "maps"); `aux_in_training` adds a head with weights only a train-mode forward runs."""

    def __init__(self, num_classes: int = 3, *, returns: str = "logits", train_returns: str | None = None,
                 aux_in_training: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(8, num_classes)
        self.aux = nn.Sequential(nn.Conv2d(8, 4, 1), nn.ReLU()) if aux_in_training else None
        self.returns, self.train_returns = returns, train_returns

    def forward(self, x: torch.Tensor):
        maps = self.body(x)
        logits = self.head(self.drop(maps.mean((2, 3))))
        if self.aux is not None and self.training:
            logits = logits + self.aux(maps).mean()
        returns = self.train_returns if self.training and self.train_returns else self.returns
        return {"logits": logits, "tuple": (logits, maps), "dict": {"logits": logits}, "maps": maps}[returns]


EXAMPLE = torch.zeros(1, 3, 8, 8)


@pytest.mark.parametrize(("returns", "shown"), [("tuple", "a tuple"), ("dict", "a dict"), ("maps", "a [2, 8, 8, 8]")])
def test_a_forward_that_does_not_return_logits_is_refused_naming_what_it_returns(returns, shown):
    with pytest.raises(UsageError) as info:
        check_forward(Net(returns=returns), EXAMPLE, "mine", trains=False, classes=3)
    assert f"model mine returns {shown}" in str(info.value) and "in eval mode" in str(info.value)
    assert "wrap the model" in str(info.value)


@pytest.mark.parametrize("logits", [1, 5])
def test_logits_of_another_count_than_the_classes_are_refused(logits):
    """One logit for two classes (a binary head) or a builder that ignores num_classes: refused, not
    an internal error in the confusion matrix or a top-1 read from the wrong number of outputs."""
    check_forward(Net(num_classes=2), EXAMPLE, "mine", trains=True, classes=2)
    given = "1 logit" if logits == 1 else f"{logits} logits"
    with pytest.raises(UsageError, match=f"gives {given} per image in eval mode but the data has 2 classes"):
        check_forward(Net(num_classes=logits), EXAMPLE, "mine", trains=False, classes=2)


def test_logits_only_in_eval_mode_are_refused_when_the_run_trains():
    net = Net(returns="logits", train_returns="tuple")
    check_forward(net, EXAMPLE, "mine", trains=False, classes=3)  # prunes without training: accepted
    with pytest.raises(UsageError, match="returns a tuple in train mode"):
        check_forward(net, EXAMPLE, "mine", trains=True, classes=3)


def test_weights_run_only_in_train_mode_are_refused_naming_them_and_the_way_out():
    net = Net(aux_in_training=True)
    check_forward(net, EXAMPLE, "mine", trains=False, classes=3)
    with pytest.raises(UsageError) as info:
        check_forward(net, EXAMPLE, "mine", trains=True, classes=3)
    text = str(info.value)
    assert "runs aux only in train mode" in text and "aux.0" not in text and "--no-finetune" in text


def test_the_train_mode_check_leaves_statistics_modes_and_random_state_as_they_were():
    torch.manual_seed(0)
    net = Net().eval()
    net.body[1].running_mean.normal_()  # statistics a train-mode forward would move
    state = {k: v.clone() for k, v in net.state_dict().items()}
    image = torch.randn(1, 3, 8, 8)
    net.body.register_forward_hook(lambda *_: [random.random(), np.random.rand()] and None)  # draws from both
    rng, python_rng, numpy_rng = torch.get_rng_state(), random.getstate(), np.random.get_state()
    check_forward(net, image, "mine", trains=True, classes=3)
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    assert not any(m.training for m in net.modules())
    assert torch.equal(torch.get_rng_state(), rng)  # the dropout's draws were not taken from the run's stream
    assert random.getstate() == python_rng and np.random.get_state()[1].tolist() == numpy_rng[1].tolist()


def test_outermost_keeps_only_names_without_a_listed_parent():
    assert outermost({"aux1", "aux1.conv", "aux1.fc1", "aux2.fc", "head"}) == ["aux1", "aux2.fc", "head"]
    assert outermost({"a.bc", "a.b"}) == ["a.b", "a.bc"]  # a prefix of a name is not its parent


class Flat(nn.Module):
    """A conv on `channels`-channel images, flattened into a Linear sized for 8x8 maps: runs on 8² images only."""

    def __init__(self, num_classes: int, channels: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).flatten(1))


def test_an_input_the_model_cannot_take_names_the_fix_that_fits(scratch_registry):
    registry.register_model("flat", input_size=8, num_classes=2)(Flat)
    cpu = torch.device("cpu")
    assert example_input(Flat(2), 8, "flat", cpu).shape == (1, 3, 8, 8)
    with pytest.raises(UsageError, match=r"cannot run on 12x12 images \(.*\); pass --input-size 8, the side"):
        example_input(Flat(2), 12, "flat", cpu)  # not "a larger size": the entry's side is what it takes
    with pytest.raises(UsageError, match=r"cannot run on 8x8 images .*pass a larger --input-size"):
        example_input(nn.Sequential(nn.Conv2d(3, 4, 9), nn.Flatten()), 8, "flat", cpu)  # at its own side already
    with pytest.raises(UsageError, match="first conv takes 1-channel images, but images are fed as RGB"):
        example_input(Flat(2, channels=1), 8, "flat", cpu)
    late_stem = Flat(2)
    late_stem.extra = nn.Conv2d(1, 4, 1)  # registered after the stem but run first, on the images
    late_stem.forward = lambda x: late_stem.head(late_stem.conv(late_stem.extra(x)).flatten(1))
    with pytest.raises(UsageError, match="first conv takes 1-channel images"):  # the conv the forward reaches first
        example_input(late_stem, 8, "flat", cpu)
    registered_first = Flat(2)
    registered_first.conv = nn.Conv2d(3, 4, 3, padding=1)
    registered_first.unused = nn.Conv2d(1, 4, 1)  # takes one channel but never runs: no grey hint for a size error
    with pytest.raises(UsageError, match="pass --input-size 8"):
        example_input(registered_first, 12, "flat", cpu)


class NeedsTargets(Net):
    """Like Net, but its train-mode forward wants the labels too (a model with the loss inside)."""

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None):
        if self.training and y is None:
            raise TypeError("forward() missing 1 required positional argument: 'y'")
        return super().forward(x)


def test_a_model_that_cannot_train_on_the_images_is_told_to_prune_without_training():
    with pytest.raises(UsageError) as info:
        check_forward(NeedsTargets(), EXAMPLE, "mine", trains=True, classes=3)
    text = str(info.value)
    assert "cannot run on 8x8 images in train mode (forward() missing" in text and "--no-finetune" in text
    assert "--input-size" not in text  # a missing argument is not a size problem
    check_forward(NeedsTargets(), EXAMPLE, "mine", trains=False, classes=3)


def test_a_forward_that_takes_one_image_only_is_refused():
    squeezing = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(0), nn.Linear(4 * 6 * 6, 2), nn.Unflatten(0, (1, 2)))
    with pytest.raises(UsageError, match="runs on one image but not on a batch of two"):
        check_forward(squeezing.eval(), EXAMPLE, "mine", trains=False, classes=3)


@pytest.mark.parametrize("wrap", [nn.utils.parametrizations.weight_norm, nn.utils.parametrizations.spectral_norm,
                                  nn.utils.weight_norm, nn.utils.spectral_norm])
def test_parametrized_weights_are_refused_naming_them_and_how_to_remove_them(wrap):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), wrap(nn.Conv2d(4, 4, 3))).eval()
    with pytest.raises(UsageError, match=r"parametrized weights \(2: weight_norm or spectral_norm\).*remove"):
        check_plain_weights(net, "mine")
    x = torch.randn(1, 3, 8, 8)
    before = net(x)
    if nn.utils.parametrize.is_parametrized(net[2]):
        nn.utils.parametrize.remove_parametrizations(net[2], "weight")
    elif hasattr(net[2], "weight_g"):
        nn.utils.remove_weight_norm(net[2])
    else:
        nn.utils.remove_spectral_norm(net[2])
    check_plain_weights(net, "mine")  # the way out the message names
    assert torch.allclose(net(x), before, atol=1e-6)  # same weights: the network computes the same


@pytest.mark.parametrize(("fields", "trains"), [
    ({}, True), ({"finetune": False}, False), ({"epochs": 0}, False),
    ({"epochs": 0, "iterative_steps": 3}, True), ({"epochs": 0, "iterative_steps": 3, "step_epochs": 0}, False),
    ({"epochs": 0, "reinit": True}, True),
])
def test_the_run_trains_exactly_when_some_epoch_runs(fields, trains):
    assert prune.PruneConfig(**fields).trains is trains


@pytest.mark.parametrize(("name", "heads"), [("googlenet", ("aux1", "aux2")), ("inception_v3", ("AuxLogits",))])
def test_torchvision_auxiliary_heads_are_dropped_and_what_is_left_passes_the_check(name, heads):
    kept = torchvision.models.get_model(name, weights=None, num_classes=3, init_weights=False).eval()
    size = 299 if name == "inception_v3" else 64
    example = torch.zeros(1, 3, size, size)
    with pytest.raises(UsageError, match=f"runs {', '.join(heads)} only in train mode"):  # the crash, caught
        check_forward(kept, example, name, trains=True, classes=3)
    assert drop_auxiliary_heads(kept) == heads and drop_auxiliary_heads(kept) == ()
    assert all(getattr(kept, h) is None for h in heads) and not kept.aux_logits
    check_forward(kept, example, name, trains=True, classes=3)
    model = create_model(name, num_classes=3, pretrained=False)
    assert all(getattr(model, h) is None for h in heads)
    assert drop_auxiliary_heads(torchvision.models.resnet18(weights=None)) == ()


def test_a_googlenet_checkpoint_loads_with_or_without_its_auxiliary_heads(tmp_path):
    with_heads = torchvision.models.googlenet(weights=None, num_classes=3, aux_logits=True, init_weights=False)
    without = torchvision.models.googlenet(weights=None, num_classes=3, aux_logits=False, init_weights=False)
    for net, file in ((with_heads, "with.pt"), (without, "without.pt")):
        torch.save(net.state_dict(), tmp_path / file)
        model = create_model("googlenet", weights=str(tmp_path / file), num_classes=3)
        assert model.aux1 is None
        assert torch.equal(model.fc.weight, net.fc.weight)
        assert set(model.state_dict()) == set(without.state_dict())


def test_a_pruned_googlenet_reloads_with_its_input_transform_and_without_old_heads(tmp_path):
    """model.pt keeps `transform_input` (torchvision's pretrained GoogLeNet turns it on; no state_dict
    holds it), and a file written while the heads were still kept (their keys in the state_dict) loads."""
    torch.manual_seed(0)
    net = torchvision.models.googlenet(weights=None, num_classes=3, aux_logits=True, transform_input=True,
                                       init_weights=False).eval()
    save_pruned(tmp_path / "model.pt", net, spec=ModelSpec("googlenet", 3), history=[], input_size=64)
    blob = torch.load(tmp_path / "model.pt", weights_only=True)
    assert blob["flags"] == {"transform_input": True} and any(k.startswith("aux1.") for k in blob["state_dict"])
    rebuilt = prune.load_pruned(tmp_path / "model.pt")
    x = torch.randn(2, 3, 64, 64)
    assert rebuilt.transform_input and rebuilt.aux1 is None
    assert torch.equal(rebuilt(x), net(x))  # without the flag the input would be normalised differently
    net.transform_input = False
    assert not torch.equal(rebuilt(x), net(x))


def test_a_model_with_a_training_only_head_is_refused_before_out_is_touched(tmp_path, capsys, scratch_registry):
    registry.register_model("aux-net", input_size=8, num_classes=2)(lambda n: Net(n, aux_in_training=True))
    data = image_folder(tmp_path / "data", classes=2, train=2, val=2, size=8)
    flags = ["--model", "aux-net", "--data", str(data), "--scorer", "l1", "--classes", "2", "--samples-per-class",
             "2", "--quiet"]
    assert main([*flags, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "runs aux only in train mode" in err[0] and not (tmp_path / "o").exists()
    assert main([*flags, "--no-finetune", "--out", str(tmp_path / "p")]) == 0  # the way out the line names


def test_googlenet_prunes_and_fine_tunes(tmp_path):
    data = image_folder(tmp_path / "data", classes=2, train=4, val=2, size=64)
    code = main(["--model", "googlenet", "--data", str(data), "--input-size", "64", "--scorer", "l1", "--classes",
                 "2", "--samples-per-class", "2", "--epochs", "1", "--batch-size", "4", "--no-speed", "--quiet",
                 "--out", str(tmp_path / "o")])
    assert code == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert coverage.rebuilt_matches(tmp_path / "o", data, "googlenet", 64, report["after"]) is None
