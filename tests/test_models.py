"""The model registry: listing, unknown names, duplicates, a new family end to end, input defaults."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest
import torch
import torchvision
from helpers import image_folder
from PIL import Image
from torch import nn

import prune
from prune.cli import main
from prune.errors import UsageError
from prune.outputs.checkpoint import FORMAT, read_checkpoint
from prune.zoo import registry
from prune.zoo.data import load_data
from prune.zoo.models import create_model
from prune.zoo.registry import ModelEntry, model_entry, register_family, register_model


class ToyNet(nn.Module):
    """Two conv layers and a linear head: [N, 3, s, s] → [N, num_classes]."""

    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def register_toy() -> None:
    widths = {"tiny": 8, "small": 16}

    @register_family("toy", names=lambda: list(widths), description="toy nets (tiny, small)")
    def toy(name: str) -> ModelEntry:
        return ModelEntry(f"toy:{name}", build=lambda n: ToyNet(widths[name], n), input_size=16, num_classes=2)


def test_list_models_holds_every_kind_and_filters():
    names = registry.list_models()
    assert {"embedded", "embedded-plain", "vgg16", "resnet34", "timm:convnext_atto"} <= set(names)
    assert names == sorted(set(names))
    assert set(torchvision.models.list_models(module=torchvision.models)) <= set(names)
    timm_names = registry.list_models("timm:convnext_*")
    assert timm_names and all(fnmatch.fnmatch(n, "timm:convnext_*") for n in timm_names)
    assert registry.list_models("embedded*") == ["embedded", "embedded-plain"]


@pytest.mark.parametrize("name, near", [
    ("vgg61", "'vgg16'"),
    ("embeded", "'embedded'"),
    ("resnet35", "'resnet34'"),
    ("timm:convnxt_atto", "'timm:convnext_atto'"),
])
def test_unknown_name_lists_the_close_ones(name, near):
    with pytest.raises(UsageError, match="unknown model") as err:
        model_entry(name)
    message = str(err.value)
    assert "\n" not in message and "Did you mean" in message and near in message, message


def test_unknown_bare_name_says_what_is_known():
    with pytest.raises(ValueError) as err:  # UsageError is a ValueError
        model_entry("toy:x")
    for word in ("'embedded'", "'embedded-plain'", "vgg16", "'timm:<name>'"):
        assert word in str(err.value)


def test_duplicate_registration_raises(scratch_registry):
    with pytest.raises(ValueError, match="already registered"):
        register_model("embedded", input_size=32, num_classes=10)(lambda n: ToyNet(4, n))
    with pytest.raises(ValueError, match="already registered"):
        register_family("timm", names=list, description="again")(lambda name: None)
    register_toy()
    with pytest.raises(ValueError, match="already registered"):
        register_toy()
    with pytest.raises(ValueError, match="family"):
        register_model("toy:big", input_size=16, num_classes=2)(lambda n: ToyNet(32, n))
    assert model_entry("embedded").input_size == 32  # the first registration is kept


def test_a_new_family_is_one_registration_end_to_end(scratch_registry, tmp_path, capsys):
    register_toy()
    assert registry.list_models("toy:*") == ["toy:small", "toy:tiny"]
    with pytest.raises(UsageError, match="'toy:tiny'"):
        model_entry("toy:tinny")
    data = image_folder(tmp_path / "data", classes=2, train=3, val=2, size=20)
    out = tmp_path / "out"
    code = main(["--model", "toy:tiny", "--data", str(data), "--ratio", "0.5", "--scorer", "l1", "--classes", "2",
                 "--samples-per-class", "2", "--no-finetune", "--quiet", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    blob = read_checkpoint(out / "model.pt", FORMAT)
    assert blob["model"] == "toy:tiny" and blob["input_size"] == 16  # the entry's default input size
    model = prune.load_pruned(out / "model.pt")
    assert isinstance(model, ToyNet) and model.features[0].out_channels == 4
    assert model(torch.zeros(1, 3, 16, 16)).shape == (1, 2)


def uniform_folder(root: Path, value: int, size: int = 40) -> str:
    """An ImageFolder of one class whose only images are uniform RGB `value`."""
    for split in ("train", "val"):
        (root / split / "c0").mkdir(parents=True)
        Image.new("RGB", (size, size), (value,) * 3).save(root / split / "c0" / "a.png")
    return str(root)


def test_input_size_and_normalisation_come_from_the_model(tmp_path):
    root = uniform_folder(tmp_path / "data", 128)
    expected = {
        "embedded": (32, (0.5, 0.29)),                       # shapes10's own normalisation
        "vgg16": (224, (0.485, 0.229)),                      # ImageNet (red channel)
        "inception_v3": (torchvision.models.Inception_V3_Weights.DEFAULT.transforms().crop_size[0], (0.485, 0.229)),
    }
    for model, (size, (mean, std)) in expected.items():
        data = load_data(root, model=model)
        image, _ = data.train[0]
        assert data.input_size == size and image.shape == (3, size, size), model
        assert torch.allclose(image[0], torch.full((size, size), (128 / 255 - mean) / std), atol=1e-5), model
    assert load_data(root, input_size=24, model="vgg16").input_size == 24  # --input-size wins


def test_cli_input_size_default_is_the_models(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "registry entry" in capsys.readouterr().out


def test_timm_entry_follows_timm_pretrained_config():
    import timm

    cfg = timm.get_pretrained_cfg("inception_v3")
    entry = model_entry("timm:inception_v3")
    assert entry.input_size == cfg.input_size[-1] and entry.mean == tuple(cfg.mean) and entry.std == tuple(cfg.std)


@pytest.mark.parametrize("name", ["resnet18", "inception_v3", "convnext_atto"])
def test_timm_entry_preprocesses_folder_images_as_timm(name: str) -> None:
    """Crop fraction and interpolation come from timm's pretrained config: the folder transform gives
    what timm's own eval transform gives on the same (non-square) image."""
    import timm
    from timm.data import create_transform, resolve_data_config

    cfg = timm.get_pretrained_cfg(name)
    entry = model_entry(f"timm:{name}")
    assert entry.crop_pct == cfg.crop_pct and entry.interpolation == cfg.interpolation
    pixels = torch.randint(0, 256, (300, 360, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    image = Image.fromarray(pixels.numpy())
    expected = create_transform(**resolve_data_config({}, pretrained_cfg=cfg.to_dict()))(image)
    assert torch.allclose(entry.transform()(image), expected, atol=1e-6)


@pytest.mark.parametrize("name", ["vgg16", "resnet50", "vit_b_16"])
def test_torchvision_entry_preprocesses_as_its_weights(name: str) -> None:
    """Resize side, crop, interpolation and normalisation are those of the DEFAULT weights' preset."""
    preset = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    resize, crop, _, normalize = model_entry(name).transform().transforms
    assert [resize.size] == preset.resize_size and list(crop.size) == preset.crop_size * 2
    assert resize.interpolation == preset.interpolation
    assert list(normalize.mean) == preset.mean and list(normalize.std) == preset.std


def test_embedded_entries_do_not_crop() -> None:
    """A folder image of the model's side reaches it unchanged (crop_pct 1.0): a pixel grid survives."""
    for name in ("embedded", "fashion", "fashion-plain"):
        entry = model_entry(name)
        size = entry.input_size
        pixels = torch.randint(0, 256, (size, size, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
        x = entry.transform()(Image.fromarray(pixels.numpy()))
        mean, std = torch.tensor(entry.mean).view(3, 1, 1), torch.tensor(entry.std).view(3, 1, 1)
        assert torch.allclose(x, (pixels.permute(2, 0, 1) / 255 - mean) / std, atol=1e-6), name


def test_create_model_uses_entry_weights_and_checks_classes():
    model = create_model("embedded", weights=None, num_classes=10)
    entry = model_entry("embedded")
    assert torch.equal(model.state_dict()["features.0.weight"],
                       torch.load(entry.weights, weights_only=True)["features.0.weight"])
    with pytest.raises(UsageError, match="predicts 10 classes but the data has 3"):
        create_model("embedded", weights=None, num_classes=3)
    with pytest.raises(UsageError, match="not found"):
        create_model("timm:resnet18", weights="no-such-file.pt", num_classes=3)
    assert create_model("embedded-plain", num_classes=3, pretrained=False).classifier[-1].out_features == 3
