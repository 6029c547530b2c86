"""Bad input: `python -m prune` ends with exit code 2, one line on stderr, and no output."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prune.outputs.outdir import RUN_FILE, RUN_FORMAT, claim
from helpers import image_folder

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--classes", "2", "--samples-per-class", "2", "--no-finetune", "--quiet"]


def prune_cli(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    """Run `python -m prune args` (or `python -c code args`) from the repository root."""
    head = ["-c", code] if code else ["-m", "prune"]
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    return subprocess.run([sys.executable, *head, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)


def assert_usage_error(result: subprocess.CompletedProcess, *words: str) -> None:
    """Exit code 2 and exactly one stderr line 'error: ...' containing every word."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def snapshot(path: Path) -> dict[str, bytes] | None:
    """Every file under `path` with its bytes (None if `path` does not exist)."""
    if not path.exists():
        return None
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> list[str]:
    """--data/--input-size of a 10-class folder of 8×8 images (quicker than the embedded set)."""
    root = image_folder(tmp_path_factory.mktemp("tiny") / "data", classes=10, train=2, val=2, size=8)
    return ["--data", str(root), "--input-size", "32", *SMALL]


@pytest.fixture(scope="module")
def embedded_weights(tmp_path_factory) -> Path:
    """A state_dict for the embedded architecture (random init, seeded)."""
    from prune.zoo.embedded_model import EmbeddedVGG

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "embedded.pt"
    torch.save(EmbeddedVGG(num_classes=10).state_dict(), path)
    return path


@pytest.mark.parametrize("ratio", ["1.0", "-0.1"])
def test_ratio_outside_range(tmp_path, ratio):
    assert_usage_error(prune_cli("--ratio", ratio, "--out", str(tmp_path / "out")), "[0, 1)")
    assert not (tmp_path / "out").exists()


def test_unknown_scorer_lists_the_known_ones(tmp_path):
    assert_usage_error(prune_cli("--scorer", "entropyy", "--out", str(tmp_path / "out")), "entropy", "apoz", "l1")
    assert not (tmp_path / "out").exists()


def test_unknown_model_lists_the_known_ones(tmp_path):
    result = prune_cli("--model", "vgg61", "--out", str(tmp_path / "out"), *SMALL)
    assert_usage_error(result, "embedded", "timm:", "vgg16")
    assert not (tmp_path / "out").exists()


def test_bad_argument_type_is_one_line(tmp_path):
    assert_usage_error(prune_cli("--epochs", "three", "--out", str(tmp_path / "out")), "--epochs", "--help")
    assert_usage_error(prune_cli("--no-such-flag"), "--no-such-flag")


def test_missing_data_path(tmp_path):
    assert_usage_error(prune_cli("--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")), "does not exist")
    assert not (tmp_path / "out").exists()


def test_empty_data_folder(tmp_path):
    (tmp_path / "data").mkdir()
    assert_usage_error(prune_cli("--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")), "train/")
    (tmp_path / "data" / "train" / "a").mkdir(parents=True)
    (tmp_path / "data" / "val" / "a").mkdir(parents=True)
    assert_usage_error(prune_cli("--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")), "no images")
    assert not (tmp_path / "out").exists()


def test_fewer_classes_than_asked(tmp_path):
    data = image_folder(tmp_path / "data", classes=2, train=2, val=2, size=8)
    result = prune_cli("--data", str(data), "--classes", "5", "--out", str(tmp_path / "out"))
    assert_usage_error(result, "--classes 5", "2 classes")
    assert not (tmp_path / "out").exists()


def test_fewer_images_than_asked_fails_before_out_is_created(tmp_path):
    data = image_folder(tmp_path / "data", classes=10, train=2, val=2, size=8)
    result = prune_cli("--data", str(data), "--samples-per-class", "5", "--out", str(tmp_path / "out"))
    assert_usage_error(result, "--samples-per-class")
    assert not (tmp_path / "out").exists()


def test_too_few_readable_images(tmp_path):
    data = image_folder(tmp_path / "data", classes=10, train=1, val=1, size=8, corrupt=2)
    result = prune_cli("--data", str(data), "--samples-per-class", "2", "--input-size", "32", "--out", str(tmp_path / "out"))
    assert_usage_error(result, "readable", "unreadable")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_grayscale_rgba_and_corrupt_images_are_handled(tmp_path, mode, embedded_weights):
    """Grayscale/RGBA files are converted; corrupt ones are skipped with one warning line."""
    data = image_folder(tmp_path / "data", classes=10, train=2, val=2, size=8, mode=mode, corrupt=1)
    out = tmp_path / "out"
    result = prune_cli("--data", str(data), "--input-size", "32", "--weights", str(embedded_weights),
                       "--batch-size", "8", "--out", str(out), *SMALL)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings and "unreadable" in warnings[0]
    assert (out / "report.json").exists() and (out / "model.pt").exists()


def test_nan_activations_leave_no_output(tmp_path, embedded_weights, tiny):
    state = torch.load(embedded_weights, weights_only=True)
    state["features.4.weight"] = torch.full_like(state["features.4.weight"], float("nan"))
    torch.save(state, tmp_path / "nan.pt")
    result = prune_cli("--weights", str(tmp_path / "nan.pt"), "--out", str(tmp_path / "out"), *tiny)
    assert_usage_error(result, "NaN", "--weights")
    assert not (tmp_path / "out").exists()


def test_model_without_prunable_conv(tmp_path, tiny):
    code = (
        "import sys, warnings; warnings.simplefilter('ignore'); import torch, prune.pipeline.run as r; "
        "r.load_model = lambda *a, **k: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10)); "
        "from prune.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    result = prune_cli("--out", str(tmp_path / "out"), *tiny, code=code)
    assert_usage_error(result, "no prunable conv")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["pickle", "random-bytes", "other-state-dict"])
def test_weights_that_are_not_ours_are_refused_safely(tmp_path, kind, tiny):
    path = tmp_path / "weights.pt"
    if kind == "pickle":
        path.write_bytes(pickle.dumps(ValueError("not a checkpoint")))
    elif kind == "random-bytes":
        path.write_bytes(os.urandom(256))
    else:
        torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    result = prune_cli("--weights", str(path), "--out", str(tmp_path / "out"), *tiny)
    assert_usage_error(result, "weights")
    assert not (tmp_path / "out").exists()


def test_out_from_another_run_is_refused_unchanged(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / RUN_FILE).write_text(json.dumps({"format": RUN_FORMAT, "settings": "{}", "processes": 1}))
    (out / "report.json").write_text("{}")
    before = snapshot(out)
    assert_usage_error(prune_cli("--out", str(out), *SMALL), "--overwrite")
    assert snapshot(out) == before


def test_out_not_from_topoprune_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert_usage_error(prune_cli("--out", str(out), *SMALL), "--overwrite")
    assert snapshot(out) == {"notes.txt": b"mine"}


def test_out_that_is_a_file(tmp_path):
    (tmp_path / "out").write_text("x")
    assert_usage_error(prune_cli("--out", str(tmp_path / "out"), *SMALL), "folder")


def test_cuda_without_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert_usage_error(prune_cli("--device", "cuda", "--out", str(tmp_path / "out")), "--device cpu")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("state", ["absent", "empty", "earlier-run"])
def test_claim_rollback_restores_the_folder(tmp_path, state):
    """A failure found after --out was claimed leaves it as it was (also with --overwrite)."""
    out = tmp_path / "out"
    if state != "absent":
        out.mkdir()
    if state == "earlier-run":
        (out / RUN_FILE).write_text(json.dumps({"format": RUN_FORMAT, "settings": "old", "processes": 1}))
        (out / "model.pt").write_bytes(b"old")
    before = snapshot(out)
    claimed = claim(out, "new", overwrite=True)
    (out / "cache").mkdir()
    (out / "cache" / "scores-000.pt").write_bytes(b"partial")
    claimed.rollback()
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if state != "absent" else [])
