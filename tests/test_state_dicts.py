"""`--weights PATH` takes the checkpoints training scripts write (prune.zoo.state_dicts): the state_dict
under their keys, EMA first, with a wrapper's key prefix removed; anything else is still refused."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import torch
import torchvision

from prune.errors import UsageError
from prune.zoo.models import create_model
from prune.zoo.state_dicts import state_dict_in, without_wrapper_prefix


@pytest.fixture(scope="module")
def weights() -> dict:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=2).state_dict()


def _shifted(state: dict, by: float) -> dict:
    return {k: v + by if v.is_floating_point() else v for k, v in state.items()}


def _averaged(state: dict) -> dict:
    """The state_dict torch's AveragedModel (torchvision's `model_ema`) has for a model with weights `state`."""
    model = torchvision.models.resnet18(num_classes=2)
    model.load_state_dict(state)
    return torch.optim.swa_utils.AveragedModel(model).state_dict()


LAYOUTS = {
    "bare": lambda w: w,
    "DataParallel / DDP": lambda w: {f"module.{k}": v for k, v in w.items()},
    "torchvision reference": lambda w: {"model": w, "optimizer": {"state": {}, "param_groups": []}, "epoch": 3,
                                        "args": argparse.Namespace(lr=0.1, model="resnet18")},
    "timm train": lambda w: {"state_dict": w, "epoch": 9, "arch": "resnet18"},
    "Lightning": lambda w: {"state_dict": {f"model.{k}": v for k, v in w.items()}, "epoch": 1},
    "DDP inside a dict": lambda w: {"model": {f"module.model.{k}": v for k, v in w.items()}},
    "torchvision reference with EMA": lambda w: {"model": _shifted(w, 1.0), "model_ema": _averaged(w), "epoch": 3},
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_training_scripts_checkpoint_loads_the_same_weights(tmp_path, weights, layout):
    torch.save(LAYOUTS[layout](weights), tmp_path / "ckpt.pt")
    model = create_model("resnet18", weights=str(tmp_path / "ckpt.pt"), num_classes=2)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(("blob", "said"), [({"epoch": 3, "optimizer": {}}, "holds no weights (top-level keys: epoch, optimizer)"),
                                             ({0: torch.zeros(1)}, "keys that are not parameter names")])
def test_a_file_without_weights_is_refused_saying_what_it_holds(tmp_path, blob, said):
    torch.save(blob, tmp_path / "ckpt.pt")
    with pytest.raises(UsageError, match=re.escape(said)):
        create_model("resnet18", weights=str(tmp_path / "ckpt.pt"), num_classes=2)


def test_a_file_weights_only_cannot_read_is_refused_with_torchs_reason(tmp_path):
    torch.save({"model": {}, "args": Path("/tmp")}, tmp_path / "ckpt.pt")  # a Path: not among the allowed globals
    with pytest.raises(UsageError, match=r"cannot read weights from .*UnpicklingError: .*training checkpoint") as err:
        create_model("resnet18", weights=str(tmp_path / "ckpt.pt"), num_classes=2)
    assert "\x1b" not in str(err.value)  # torch's message bolds words with terminal codes: not in our line


def test_ema_weights_are_taken_first_as_timm_does(tmp_path, weights):
    torch.save({"model": weights, "model_ema": _shifted(weights, 1.0)}, tmp_path / "ckpt.pt")
    model = create_model("resnet18", weights=str(tmp_path / "ckpt.pt"), num_classes=2)
    assert torch.equal(model.conv1.weight, weights["conv1.weight"] + 1.0)
    torch.save({"model": weights, "model_ema": {}}, tmp_path / "empty_ema.pt")  # an empty entry is passed over
    model = create_model("resnet18", weights=str(tmp_path / "empty_ema.pt"), num_classes=2)
    assert torch.equal(model.conv1.weight, weights["conv1.weight"])


def test_a_checkpoint_of_another_model_is_still_refused_naming_the_key(tmp_path):
    other = torchvision.models.resnet34(num_classes=2).state_dict()
    torch.save({"module." + k: v for k, v in other.items()}, tmp_path / "ckpt.pt")
    with pytest.raises(UsageError, match=r"do not fit the model ResNet: unexpected key 'layer1\.2\.conv1\.weight'"):
        create_model("resnet18", weights=str(tmp_path / "ckpt.pt"), num_classes=2)


def test_a_prefix_is_removed_only_when_no_key_fits_and_every_key_shares_it():
    expected = {"conv.weight", "fc.weight"}
    t = torch.zeros(1)
    assert without_wrapper_prefix({"conv.weight": t, "fc.weight": t}, expected).keys() == expected
    assert without_wrapper_prefix({"module.conv.weight": t, "module.fc.weight": t}, expected).keys() == expected
    mixed = {"module.conv.weight": t, "head.fc.weight": t}  # two first names: no wrapper to remove
    assert without_wrapper_prefix(mixed, expected) == mixed
    assert without_wrapper_prefix({"a.b.c.conv.weight": t}, expected) == {"conv.weight": t}  # three names
    assert without_wrapper_prefix({"a.b.c.d.conv.weight": t}, expected) == {"a.b.c.d.conv.weight": t}  # not four
    assert without_wrapper_prefix({}, expected) == {}
    unfitting = {"backbone.layer9.weight": t}  # stripping fits nothing: the file's own spelling is kept for the error
    assert without_wrapper_prefix(unfitting, expected) == unfitting
    assert without_wrapper_prefix({"_orig_mod.conv.weight": t}, expected).keys() == {"conv.weight"}  # torch.compile


def test_the_state_dict_is_found_where_scripts_keep_it():
    t = torch.zeros(1)
    assert state_dict_in({"w": t}) == {"w": t}
    assert state_dict_in({"state_dict": {"w": t}, "model": {"v": t}}) == {"w": t}
    assert state_dict_in({"model_ema": {"e": t}, "state_dict": {"w": t}}) == {"e": t}
    assert state_dict_in({"epoch": 3}) == {"epoch": 3}  # none there: what it is, for the mismatch message
    assert state_dict_in([t]) == [t]
