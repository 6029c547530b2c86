"""The embedded default: shapes10 data, EmbeddedVGG, shipped weights, train_embedded CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from finetune.batches import in_order
from finetune.metrics import evaluate
from prune.zoo import train_embedded
from prune.zoo.embedded_model import EMBEDDED_INPUT_SIZE, VARIANTS, EmbeddedVGG
from prune.zoo.models import create_model
from prune.zoo.shapes import CLASSES, DEFAULT_PER_CLASS, make_shapes
from scoring.hooks import forward_hooks


def test_classes_are_named_and_enough() -> None:
    assert len(CLASSES) >= 10
    assert len(set(CLASSES)) == len(CLASSES)
    assert all(isinstance(c, str) and c for c in CLASSES)
    assert DEFAULT_PER_CLASS["train"] >= 100


@pytest.mark.parametrize("split", ["train", "test"])
def test_same_seed_gives_identical_tensors(split: str) -> None:
    a = make_shapes(split, per_class=8, seed=3).tensors
    b = make_shapes(split, per_class=8, seed=3).tensors
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = make_shapes(split, per_class=8, seed=4).tensors
    assert not torch.equal(a[0], c[0])


def test_train_and_test_differ() -> None:
    train_x, _ = make_shapes("train", per_class=20).tensors
    test_x, _ = make_shapes("test", per_class=20).tensors
    # no test image equals any train image
    dist = torch.cdist(test_x.flatten(1), train_x.flatten(1))
    assert dist.min() > 1.0


def test_shapes_dtypes_and_counts() -> None:
    x, y = make_shapes("test").tensors
    n = len(CLASSES) * DEFAULT_PER_CLASS["test"]
    assert x.shape == (n, 3, EMBEDDED_INPUT_SIZE, EMBEDDED_INPUT_SIZE) and x.dtype == torch.float32
    assert y.shape == (n,) and y.dtype == torch.int64
    assert torch.equal(torch.bincount(y, minlength=len(CLASSES)), torch.full((len(CLASSES),), n // len(CLASSES)))
    assert torch.isfinite(x).all()
    assert abs(float(x.mean())) < 0.3 and 0.7 < float(x.std()) < 1.5  # roughly normalised
    x64, _ = make_shapes("train", per_class=2, size=64).tensors
    assert x64.shape == (2 * len(CLASSES), 3, 64, 64)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"split": "val"}, "train, test"),
        ({"split": "train", "per_class": 0}, "per_class"),
        ({"split": "train", "size": 8}, "size"),
        ({"split": "train", "seed": -1}, "seed"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, match: str) -> None:
    split = kwargs.pop("split")
    with pytest.raises(ValueError, match=match):
        make_shapes(split, **kwargs)


def test_last_conv_maps_are_at_least_8x8() -> None:
    model = EmbeddedVGG().eval()
    last_conv = [m for m in model.features if isinstance(m, nn.Conv2d)][-1]
    seen: list[torch.Size] = []
    with forward_hooks([last_conv], lambda _m, _i, out: seen.append(out.shape)), torch.no_grad():
        logits = model(torch.zeros(2, 3, EMBEDDED_INPUT_SIZE, EMBEDDED_INPUT_SIZE))
    assert logits.shape == (2, len(CLASSES))
    assert seen[0][-2] >= 8 and seen[0][-1] >= 8


@pytest.mark.parametrize("variant", sorted(v for v, spec in VARIANTS.items() if spec.dataset == "shapes10"))
def test_shipped_weights_load_and_are_accurate(variant: str) -> None:
    path = VARIANTS[variant].weights
    assert path.is_file(), f"run `python -m prune.zoo.train_embedded --model {variant}`"
    assert path.stat().st_size < 2 * 1024 * 1024
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    model = create_model(variant)
    assert not model.training
    images, labels = make_shapes("test", size=EMBEDDED_INPUT_SIZE).tensors
    assert evaluate(model, in_order(images, labels, batch_size=500)).top1 >= 0.85


def test_plain_variant_is_the_papers_setting() -> None:
    model = create_model("embedded-plain")
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    last_conv = [m for m in model.features if isinstance(m, nn.Conv2d)][-1]
    seen: list[torch.Size] = []
    with forward_hooks([last_conv], lambda _m, _i, out: seen.append(out.shape)), torch.no_grad():
        model(torch.zeros(1, 3, EMBEDDED_INPUT_SIZE, EMBEDDED_INPUT_SIZE))
    assert seen[0][-1] >= 14 and seen[0][-2] >= 14  # VGG16's last conv maps are 14x14 at 224


def test_missing_weights_name_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    from prune import UsageError
    from prune.zoo import models

    with pytest.raises(UsageError, match="not found"):  # a --weights path that does not exist
        create_model("embedded", weights=str(tmp_path / "absent.pt"))
    shipped = dataclasses.replace(models.model_entry("embedded"), weights=str(tmp_path / "absent.pt"))
    monkeypatch.setattr(models, "model_entry", lambda _name: shipped)
    with pytest.raises(FileNotFoundError, match="python -m prune.zoo.train_embedded"):  # shipped file gone
        create_model("embedded")
    assert isinstance(create_model("embedded", pretrained=False), EmbeddedVGG)


def test_train_embedded_main_writes_loadable_state_dict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sub" / "vgg.pt"
    assert train_embedded.main(["--epochs", "1", "--per-class", "4", "--out", str(out), "--quiet"]) == 0
    assert "test top-1" in capsys.readouterr().out
    assert [p.name for p in out.parent.iterdir()] == ["vgg.pt"]  # no temp file left behind
    model = create_model("embedded", weights=out)
    assert isinstance(model, EmbeddedVGG)
