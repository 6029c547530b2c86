"""Data that is never silently wrong: unreadable splits, 16-bit images, symlink loops, absurd
image sizes and complex weights are each skipped with a warning or refused with one line."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import image_folder, quick_run
from PIL import Image
from test_bad_input import ROOT, SMALL, assert_usage_error, main_error, prune_cli

from prune.zoo.data import decode_rgb, sane_size, to_rgb
from prune.zoo.folder import TolerantImageFolder
from prune.zoo.transforms import folder_transform

MEMORY_LIMIT = 6 << 30
"""Address-space bound of a memory-bounded run: importing torch (CUDA build) maps about 3.5 GB;
the rest leaves about 2.5 GB, far below what resizing a 1×4,000,000 image takes."""


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> list[str]:
    """Flags of a fast run: a 3-class folder of 8×8 images, random embedded weights, the l1 scorer."""
    return [*quick_run(tmp_path_factory.mktemp("quick")), *SMALL]


def warning_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("warning:")]


def _truncate(path: Path) -> None:
    """Cut the file at `path` to half its bytes: its header still reads, decoding fails."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("kind", ["random-bytes", "truncated"])
def test_every_val_image_unreadable_is_a_usage_error(tmp_path, quick, kind):
    """Random bytes fail the header check at load; truncated files only when evaluated (the
    run's failure handling then undoes --out). Either way: one line, exit 2, no output."""
    data = image_folder(tmp_path / "data", classes=3, train=2, val=1, size=8, corrupt=int(kind == "random-bytes"))
    for png in (data / "val").rglob("*.png"):
        png.unlink() if kind == "random-bytes" else _truncate(png)
    out = tmp_path / "out"
    assert_usage_error(prune_cli(*quick, "--data", str(data), "--out", str(out)), "val", "unreadable")
    assert not out.exists()


def test_unreadable_train_and_val_images_are_counted(tmp_path, quick):
    classes, corrupt = 3, 2
    data = image_folder(tmp_path / "data", classes=classes, train=2, val=1, size=8, corrupt=corrupt)
    _truncate(next((data / "val").rglob("*.png")))  # found only when val is decoded
    out = tmp_path / "out"
    result = prune_cli(*quick, "--data", str(data), "--out", str(out))
    assert result.returncode == 0, result.stderr
    found = {"train": classes * corrupt, "val": classes * corrupt}
    assert f"{found['train']} in train/" in warning_lines(result)[0] and f"{found['val']} in val/" in warning_lines(result)[0]
    report = json.loads((out / "report.json").read_text())
    assert report["unreadable_images"] == {"train": found["train"], "val": found["val"] + 1}
    final = f"more unreadable image files: {found['train']} in train/ and {found['val'] + 1} in val/ were skipped"
    assert len(warning_lines(result)) == 2 and final in warning_lines(result)[1]  # the truncated one, found later
    assert f"skipped: {found['train']} in train/, {found['val'] + 1} in val/" in (out / "report.md").read_text()


@pytest.mark.parametrize("mode, name", [("I;16", "wide.png"), ("I", "wide.tif")])
def test_16_bit_images_are_scaled_not_clipped(tmp_path, mode, name):
    """Levels 1, 64, 128 of 255 stored as 16 bits (× 257) decode to 1, 64, 128 (clipping gave 255)."""
    levels = np.array([[1, 64, 128]], dtype=np.uint16)
    wide = Image.fromarray((levels * 257).astype(np.uint16 if mode == "I;16" else np.int32))
    assert wide.mode == mode
    wide.save(tmp_path / name)  # a 16-bit PNG, a 32-bit TIFF
    for decoded in (to_rgb(wide), decode_rgb(str(tmp_path / name))):
        pixels = np.asarray(decoded)
        assert pixels.shape == (1, 3, 3) and (pixels == levels[..., None]).all(), pixels


LIST_SAMPLES = """
import json, sys, warnings
from prune.zoo.folder import TolerantImageFolder
from prune.zoo.transforms import folder_transform
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    folder = TolerantImageFolder(sys.argv[1], folder_transform(8), input_size=8)
print(json.dumps({"samples": folder.samples, "classes": folder.classes, "warnings": [str(w.message) for w in caught]}))
"""


@pytest.mark.parametrize("loops", [1, 2])
def test_symlink_loops_are_walked_once_and_never_hang(tmp_path, loops):
    """Links to the split (`..`) and to the folder itself (`.`) are loops: not followed, one
    warning; a linked folder outside the data is followed. Listed in a subprocess with a timeout."""
    data = image_folder(tmp_path / "data", classes=2, train=2, val=1, size=8)
    train = data / "train"
    elsewhere = image_folder(tmp_path / "elsewhere", classes=1, train=1, val=0, size=8) / "train" / "class00"
    (train / "class01" / "linked").symlink_to(elsewhere, target_is_directory=True)
    expected = TolerantImageFolder(str(train), folder_transform(8), input_size=8).samples
    (train / "class00" / "loop").symlink_to("..", target_is_directory=True)
    if loops == 2:  # two loops in one folder: torchvision's walk branches without end
        (train / "class00" / "again").symlink_to(".", target_is_directory=True)
    result = subprocess.run([sys.executable, "-c", LIST_SAMPLES, str(train)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    assert [tuple(s) for s in listed["samples"]] == expected
    assert str(train / "class01" / "linked" / "img0.png") in [s[0] for s in listed["samples"]]
    assert all(Path(path).relative_to(train).parts[0] == listed["classes"][label] for path, label in listed["samples"])
    assert len(listed["warnings"]) == 1 and f"{loops} symlinked folder(s)" in listed["warnings"][0]


@pytest.mark.parametrize("size, ok", [((1, 4_000_000), False), ((4_000_000, 1), False), ((50_001, 50_001), False),
                                      ((101, 1), False), ((100, 1), True), ((640, 480), True)])
def test_absurd_image_sizes_are_not_decoded(size, ok):
    assert sane_size(size) == ok


def _bounded() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def test_a_thin_image_is_skipped_within_a_memory_bound(tmp_path, quick):
    """A 1×4,000,000 PNG (a few KB, under PIL's pixel limit) in val/ is skipped, with the run's
    address space bounded (resizing it would take gigabytes) and a timeout."""
    data = image_folder(tmp_path / "data", classes=3, train=2, val=1, size=8)
    Image.new("L", (1, 4_000_000)).save(data / "val" / "class00" / "thin.png")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONWARNINGS": "default", "OPENBLAS_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "prune", *quick, "--data", str(data), "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, env=env, timeout=300, preexec_fn=_bounded)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "1 in val/" in warning_lines(result)[0]
    assert json.loads((out / "report.json").read_text())["unreadable_images"]["val"] == 1


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_weights_are_refused(tmp_path, capsys, quick, dtype):
    state = torch.load(quick[quick.index("--weights") + 1], weights_only=True)
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = state[key].to(dtype)
    torch.save(state, tmp_path / "complex.pt")
    line = main_error(capsys, *quick, "--weights", str(tmp_path / "complex.pt"), "--out", str(tmp_path / "out"))
    assert repr(key) in line and str(dtype) in line
    assert not (tmp_path / "out").exists()


def test_readable_decodes_each_image_once(tmp_path, monkeypatch):
    """The scoring check and the held-out images both ask whether an image decodes: it is decoded once."""
    from prune.zoo import data

    root = image_folder(tmp_path / "data", classes=2, train=3, val=1, size=8, corrupt=1)
    folder = TolerantImageFolder(str(root / "train"), folder_transform(8), input_size=8)
    calls: list[str] = []
    monkeypatch.setattr(data, "decode_rgb", lambda path: calls.append(path) or decode_rgb(path))
    first = [folder.readable(i) for i in range(len(folder))]
    assert [folder.readable(i) for i in range(len(folder))] == first and not all(first)
    assert len(calls) == len(set(calls)) <= len(folder)  # none twice; header-checked corrupt files not at all
    assert all(folder[i] is None for i, ok in enumerate(first) if not ok)


def test_image_files_imagefolder_does_not_read_are_named(tmp_path):
    """A .gif beside the PNGs is left out with a warning naming its type; a .txt goes unmentioned."""
    import warnings

    from prune.zoo.data import ImagesLeftOut, load_data

    data = image_folder(tmp_path / "data", classes=2, train=2, val=1, size=8)
    Image.new("RGB", (8, 8)).save(data / "train" / "class00" / "extra.gif")
    (data / "train" / "class00" / "notes.txt").write_text("not an image")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bundle = load_data(str(data), input_size=8)
    left = [str(w.message) for w in caught if issubclass(w.category, ImagesLeftOut)]
    assert len(left) == 1 and "left out 1 image file(s)" in left[0] and "(.gif)" in left[0] and ".txt" not in left[0]
    assert len(bundle.train) == 4 and not any(p.endswith(".gif") for p, _ in bundle.train.samples)
