"""Fashion-MNIST as data (`--data fashion-mnist[:<dir>]`) and the models trained on it.

Every test writes its own small IDX files, so the suite needs no Debian package; the shipped
weights' accuracy on the real 10,000 test images is checked by the slow test at the end.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_bad_input import assert_usage_error, prune_cli
from torch import nn

from prune.errors import UsageError
from prune.zoo import fashion, train_embedded
from prune.zoo.data import load_data
from prune.zoo.embedded_model import VARIANTS
from prune.zoo.models import create_model
from prune.zoo.registry import model_entry
from scoring.hooks import forward_hooks

PER_CLASS = {"train": 4, "val": 2}


def idx_folder(root: Path, *, gz: bool = True, side: int = 28) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Write the four IDX files of a tiny seeded Fashion-MNIST (PER_CLASS images per class) under `root`;
    returns split → (images [N, side, side] uint8, labels [N])."""
    g = torch.Generator().manual_seed(0)
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, (images_name, labels_name) in fashion.FILES.items():
        labels = torch.arange(10).repeat(PER_CLASS[split]).to(torch.uint8)
        images = torch.randint(0, 256, (len(labels), side, side), generator=g, dtype=torch.uint8)
        suffix = ".gz" if gz else ""
        fashion.write_idx(root / (images_name + suffix), images)
        fashion.write_idx(root / (labels_name + suffix), labels)
        written[split] = (images, labels.long())
    return written


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_loads_as_train_and_val(tmp_path: Path, gz: bool) -> None:
    written = idx_folder(tmp_path / "fm", gz=gz)
    data = load_data(f"fashion-mnist:{tmp_path / 'fm'}", model="fashion-plain")
    entry = model_entry("fashion-plain")
    assert data.classes == fashion.CLASSES and len(data.classes) == 10
    assert data.input_size == entry.input_size == 28
    assert len(data.train) == 40 and len(data.val) == 20
    images, labels = written["train"]
    assert data.train_targets == tuple(labels.tolist())
    x, y = data.train[7]
    expected = (images[7].float() / 255 - entry.mean[0]) / entry.std[0]  # grey → 3 equal channels
    assert x.shape == (3, 28, 28) and x.dtype == torch.float32 and y == int(labels[7])
    for c in range(3):
        assert torch.allclose(x[c], expected, atol=1e-6)
    assert sorted(Path(f).name for f in data.files) == sorted(
        n + (".gz" if gz else "") for names in fashion.FILES.values() for n in names
    )


def test_torchvision_root_layout_and_resize(tmp_path: Path) -> None:
    idx_folder(tmp_path / "root" / "FashionMNIST" / "raw", gz=False)
    data = load_data(f"fashion-mnist:{tmp_path / 'root'}", model="fashion", input_size=40)
    x, _ = data.val[0]
    assert x.shape == (3, 40, 40) and data.input_size == 40


def test_the_files_are_read_as_written(tmp_path: Path) -> None:
    """write_idx and the reader agree with the IDX format: magic 0x00000803 and big-endian sizes."""
    images = torch.arange(2 * 3 * 5, dtype=torch.uint8).view(2, 3, 5)
    fashion.write_idx(tmp_path / "x.gz", images)
    raw = gzip.decompress((tmp_path / "x.gz").read_bytes())
    assert raw[:4] == bytes([0, 0, 8, 3]) and [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(3)] == [
        2, 3, 5,
    ]
    assert raw[16:] == images.numpy().tobytes()


def test_missing_files_name_both_fixes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fashion, "DEBIAN_DIR", tmp_path / "absent")
    for data in ("fashion-mnist", f"fashion-mnist:{tmp_path}"):
        with pytest.raises(UsageError, match="apt-get install dataset-fashion-mnist") as info:
            load_data(data, model="fashion-plain")
        assert "fashion-mnist:<dir>" in str(info.value)


def test_missing_files_are_one_line_exit_2(tmp_path: Path) -> None:
    result = prune_cli("--model", "fashion-plain", "--data", f"fashion-mnist:{tmp_path / 'empty'}", "--quiet",
                       "--out", str(tmp_path / "out"))
    assert_usage_error(result, "apt-get install dataset-fashion-mnist")
    assert not (tmp_path / "out").exists()


def test_not_fashion_mnist_files_are_refused(tmp_path: Path) -> None:
    idx_folder(tmp_path / "fm")
    fashion.write_idx(tmp_path / "fm" / "t10k-labels-idx1-ubyte.gz", torch.full((20,), 12, dtype=torch.uint8))
    with pytest.raises(UsageError, match="labels 0..9"):
        load_data(f"fashion-mnist:{tmp_path / 'fm'}", model="fashion")


def run_on(folder: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """(exit code, stderr) of a quick main job of fashion-plain on the IDX files in `folder`, in process."""
    from prune.cli import main

    code = main(["--model", "fashion-plain", "--data", f"fashion-mnist:{folder}", "--classes", "2",
                 "--samples-per-class", "2", "--no-finetune", "--quiet", "--out", str(out)])
    return code, capsys.readouterr().err


def assert_refused(code: int, err: str, *words: str) -> None:
    """Exit 2 and one line `error: ...` holding every word."""
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert all(word in lines[0] for word in words), lines[0]


def float_labels(path: Path, values: list[float]) -> None:
    """A gzipped IDX file of float32 labels (type code 0x0D, big-endian), written by hand from the format."""
    header = bytes([0, 0, 0x0D, 1]) + len(values).to_bytes(4, "big")
    path.write_bytes(gzip.compress(header + struct.pack(f">{len(values)}f", *values)))


def test_damaged_deflate_data_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    idx_folder(tmp_path / "fm")
    damaged = tmp_path / "fm" / "train-images-idx3-ubyte.gz"
    # gzip.compress's 10-byte header (no file name), then a deflate block of the reserved type 3: zlib.error
    header = gzip.compress(gzip.decompress(damaged.read_bytes()), mtime=0)[:10]
    damaged.write_bytes(header + b"\x07" * 64)
    code, err = run_on(tmp_path / "fm", tmp_path / "out", capsys)
    assert_refused(code, err, str(damaged), "does not decompress", "dataset-fashion-mnist")
    assert not (tmp_path / "out").exists()


def test_nan_labels_are_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    idx_folder(tmp_path / "fm")
    labels = tmp_path / "fm" / "train-labels-idx1-ubyte.gz"
    float_labels(labels, [float("nan")] + [c % 10 for c in range(1, 40)])
    code, err = run_on(tmp_path / "fm", tmp_path / "out", capsys)
    assert_refused(code, err, str(labels), "whole numbers")
    assert not (tmp_path / "out").exists()


def test_fractional_labels_are_refused_not_truncated(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    idx_folder(tmp_path / "fm")
    labels = tmp_path / "fm" / "t10k-labels-idx1-ubyte.gz"
    float_labels(labels, [c % 10 + 0.7 for c in range(20)])
    code, err = run_on(tmp_path / "fm", tmp_path / "out", capsys)
    assert_refused(code, err, str(labels), "whole numbers", "0.7")
    assert not (tmp_path / "out").exists()


def test_whole_valued_float_labels_are_read_as_classes(tmp_path: Path) -> None:
    written = idx_folder(tmp_path / "fm")
    float_labels(tmp_path / "fm" / "t10k-labels-idx1-ubyte.gz", [float(c) for c in written["val"][1].tolist()])
    data = load_data(f"fashion-mnist:{tmp_path / 'fm'}", model="fashion")
    assert [data.val[i][1] for i in range(len(data.val))] == written["val"][1].tolist()


def test_images_other_than_28x28_are_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    idx_folder(tmp_path / "fm", side=32)
    code, err = run_on(tmp_path / "fm", tmp_path / "out", capsys)
    assert_refused(code, err, "32x32", "28x28", "train-images-idx3-ubyte.gz")
    assert not (tmp_path / "out").exists()


def test_fashion_models_are_registry_entries() -> None:
    for name in ("fashion", "fashion-plain", "fashion-resnet"):
        entry = model_entry(name)
        assert entry.data == "fashion-mnist" and entry.num_classes == 10 and entry.weights == VARIANTS[name].weights
        assert entry.mean == fashion.MEAN and entry.std == fashion.STD


@pytest.mark.parametrize(("variant", "side", "batch_norm"), [("fashion", 7, True), ("fashion-plain", 14, False)])
def test_fashion_models_shapes(variant: str, side: int, batch_norm: bool) -> None:
    model = create_model(variant)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == batch_norm
    last_conv = [m for m in model.features if isinstance(m, nn.Conv2d)][-1]
    seen: list[torch.Size] = []
    with forward_hooks([last_conv], lambda _m, _i, out: seen.append(out.shape)), torch.no_grad():
        logits = model(torch.zeros(1, 3, 28, 28))
    assert logits.shape == (1, 10) and seen[0][-2:] == (side, side)


def test_fashion_resnet_is_resnet20() -> None:
    """He et al.'s CIFAR ResNet-20: 19 convs of 3x3 and 2 projection shortcuts, 16/32/64 channels,
    stages mapping 28x28, 14x14 and 7x7, and about 0.27M parameters."""
    model = create_model("fashion-resnet")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert sum(c.kernel_size == (3, 3) for c in convs) == 19 and sum(c.kernel_size == (1, 1) for c in convs) == 2
    assert sorted({c.out_channels for c in convs}) == [16, 32, 64]
    sides: list[int] = []
    with forward_hooks(list(model.stages), lambda _m, _i, out: sides.append(out.shape[-1])), torch.no_grad():
        assert model(torch.zeros(1, 3, 28, 28)).shape == (1, 10)
    assert sides == [28, 14, 7]
    assert 0.26e6 < sum(p.numel() for p in model.parameters()) < 0.28e6


def test_fashion_resnet_prunes_its_residual_streams_as_groups(tmp_path: Path) -> None:
    """Each stage's residual stream (stem or shortcut, every block's second conv) is one group:
    pruned together, so the additions still match."""
    import json

    idx_folder(tmp_path / "fm")
    out = tmp_path / "out"
    result = prune_cli("--model", "fashion-resnet", "--data", f"fashion-mnist:{tmp_path / 'fm'}", "--classes", "2",
                       "--samples-per-class", "3", "--no-finetune", "--quiet", "--scorer", "l1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    layers = json.loads((out / "report.json").read_text())["layers"]
    streams = [layer for layer in layers if len(layer["members"]) > 1]
    assert len(streams) == 3 and all(len(layer["members"]) == 4 for layer in streams)  # stem/shortcut + 3 blocks
    assert all(layer["channels_after"] == layer["channels_before"] // 2 for layer in layers)
    from prune import load_pruned

    pruned = load_pruned(out / "model.pt")
    assert pruned(torch.zeros(2, 3, 28, 28)).shape == (2, 10)
    assert sorted({m.out_channels for m in pruned.modules() if isinstance(m, nn.Conv2d)}) == [8, 16, 32]


def test_main_job_on_an_idx_folder(tmp_path: Path) -> None:
    idx_folder(tmp_path / "fm")
    out = tmp_path / "out"
    result = prune_cli("--model", "fashion-plain", "--data", f"fashion-mnist:{tmp_path / 'fm'}", "--classes", "2",
                       "--samples-per-class", "3", "--no-finetune", "--quiet", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert (out / "report.json").is_file() and (out / "model.pt").is_file()


def test_train_embedded_on_an_idx_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    idx_folder(tmp_path / "fm")
    out = tmp_path / "f.pt"
    code = train_embedded.main(["--model", "fashion", "--epochs", "1", "--per-class", "2", "--quiet",
                                "--data", f"fashion-mnist:{tmp_path / 'fm'}", "--out", str(out)])
    assert code == 0 and "on 20 images" in capsys.readouterr().out
    assert isinstance(create_model("fashion", weights=out), nn.Module)


def png_folder(root: Path, written: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, list[int]]:
    """The images of `idx_folder` as an ImageFolder of grey PNGs (class folders '0'..'9') under `root`;
    returns split → the IDX index of each folder item, in the folder's order."""
    order = {}
    for split, (images, labels) in written.items():
        for i, (image, label) in enumerate(zip(images, labels.tolist(), strict=True)):
            (root / split / str(label)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.numpy(), "L").save(root / split / str(label) / f"{i:05d}.png")
        order[split] = sorted(range(len(labels)), key=lambda i: (int(labels[i]), i))
    return order


@pytest.mark.parametrize("variant", ["fashion", "fashion-plain"])
def test_a_png_folder_gets_the_idx_readers_predictions(tmp_path: Path, variant: str) -> None:
    """The same images as an ImageFolder of PNGs and as IDX files reach the shipped model as the same
    inputs (no ImageNet crop: the weights were trained on uncropped 28² images): same logits, same top-1."""
    written = idx_folder(tmp_path / "idx", gz=False)
    order = png_folder(tmp_path / "png", written)["val"]
    idx = load_data(f"fashion-mnist:{tmp_path / 'idx'}", model=variant).val
    folder = load_data(str(tmp_path / "png"), model=variant).val
    model = create_model(variant)
    with torch.no_grad():
        from_idx = model(torch.stack([idx[i][0] for i in order]))
        from_folder = model(torch.stack([folder[j][0] for j in range(len(folder))]))
    labels = torch.tensor([idx[i][1] for i in order])
    assert [folder[j][1] for j in range(len(folder))] == labels.tolist()
    assert torch.allclose(from_folder, from_idx, atol=1e-4)
    assert torch.equal(from_folder.argmax(1), from_idx.argmax(1))


@pytest.mark.slow
@pytest.mark.parametrize(("variant", "floor"), [("fashion", 0.91), ("fashion-plain", 0.89), ("fashion-resnet", 0.93)])
def test_shipped_fashion_weights_reach_their_floor(variant: str, floor: float) -> None:
    """Needs the real data (`apt-get install dataset-fashion-mnist`)."""
    from finetune.metrics import evaluate
    from prune.zoo.data import make_loader

    data = load_data("fashion-mnist", model=variant)
    assert len(data.val) == 10_000
    top1 = evaluate(create_model(variant), make_loader(data.val, batch_size=500, shuffle=False, seed=0)).top1
    assert top1 >= floor


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["fashion", "fashion-plain"])
def test_shipped_fashion_weights_score_the_same_on_png_folders(tmp_path: Path, variant: str) -> None:
    """Needs the real data: the 10,000 test images as PNGs score the IDX reader's top-1 (within 0.002)."""
    from finetune.metrics import evaluate
    from prune.zoo.data import make_loader

    idx = load_data("fashion-mnist", model=variant).val
    written = {"val": (idx.images, torch.tensor(idx.targets)), "train": (idx.images[:1000], torch.tensor(idx.targets[:1000]))}
    png_folder(tmp_path, written)
    folder = load_data(str(tmp_path), model=variant).val
    model = create_model(variant)
    top1 = [evaluate(model, make_loader(split, batch_size=500, shuffle=False, seed=0)).top1 for split in (idx, folder)]
    assert len(folder) == len(idx) == 10_000 and abs(top1[0] - top1[1]) <= 0.002
