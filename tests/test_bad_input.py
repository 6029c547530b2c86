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
from helpers import image_folder, quick_run

from prune.outputs.outdir import RUN_FILE, RUN_FORMAT, claim

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
        "r.create_model = lambda *a, **k: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10)); "
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


# --- in-process: `prune.cli.main` returns 2 and prints one line; a traceback would fail the test


def main_error(capsys, *args: str) -> str:
    """Run `prune.cli.main(args)` in-process; assert exit 2 and one stderr line 'error: …'; return it."""
    from prune.cli import main

    capsys.readouterr()
    code = main(list(args))
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> list[str]:
    """Flags of a fast run: a 3-class folder of 8×8 images, random embedded weights, the l1 scorer."""
    return [*quick_run(tmp_path_factory.mktemp("quick")), *SMALL]


def test_overwrite_refuses_a_folder_of_user_files(tmp_path, capsys, quick):
    out = tmp_path / "mine"
    (out / "photos").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "photos" / "a.jpg").write_bytes(b"\xff\xd8")
    before = snapshot(out)
    line = main_error(capsys, *quick, "--overwrite", "--out", str(out))
    assert "not a topoprune run" in line and "--overwrite" in line
    assert snapshot(out) == before and not (out / RUN_FILE).exists()


def test_overwrite_replaces_an_empty_folder_and_a_run(tmp_path, quick):
    from prune.cli import main

    out = tmp_path / "out"
    out.mkdir()
    assert main([*quick, "--overwrite", "--out", str(out)]) == 0
    assert main([*quick, "--ratio", "0.3", "--overwrite", "--out", str(out)]) == 0
    assert json.loads((out / "report.json").read_text())["settings"]["ratio"] == 0.3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no lock, no replaced run left


@pytest.mark.parametrize("where", ["data", "data/", "data/train/run", "data/..", "weights-folder"])
def test_out_that_overlaps_the_data_or_weights_is_refused(tmp_path, capsys, quick, where):
    data = Path(quick[quick.index("--data") + 1])
    weights = Path(quick[quick.index("--weights") + 1])
    out = str(weights.parent) if where == "weights-folder" else str(data) + where[len("data"):]
    before = snapshot(data.parent)
    line = main_error(capsys, *quick, "--overwrite", "--out", out)
    assert "--out" in line and ("--data" in line or "--weights" in line)
    assert snapshot(data.parent) == before  # nothing deleted, nothing written (no run.json, no class folder)


@pytest.mark.parametrize(
    "flag, value",
    [("--lr", "nan"), ("--lr", "inf"), ("--lr", "0"), ("--momentum", "nan"), ("--momentum", "-1"),
     ("--momentum", "1"), ("--weight-decay", "-1"), ("--weight-decay", "inf"), ("--input-size", "0"),
     ("--seed", str(2**64)), ("--seed", "-1"), ("--device", "meta"), ("--classes", "0")],
)
def test_impossible_numbers_are_refused_before_anything_is_written(tmp_path, capsys, flag, value):
    line = main_error(capsys, *SMALL, flag, value, "--out", str(tmp_path / "out"))
    assert flag in line
    assert not (tmp_path / "out").exists()


def test_input_size_too_small_for_the_model(tmp_path, capsys, quick):
    line = main_error(capsys, *quick, "--input-size", "1", "--out", str(tmp_path / "out"))
    assert "--input-size" in line and "1x1" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["dangling-symlink", "under-a-file", "name-too-long", "not-writable"])
def test_out_the_file_system_refuses(tmp_path, capsys, monkeypatch, quick, kind):
    if kind == "dangling-symlink":
        out = tmp_path / "link"
        out.symlink_to(tmp_path / "nowhere")
    elif kind == "under-a-file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out"
    elif kind == "name-too-long":
        out = tmp_path / ("n" * 300) / "out"
    else:
        (tmp_path / "ro").mkdir()
        out = tmp_path / "ro" / "out"
        if os.geteuid() == 0:  # root writes anywhere: make the folder look read-only
            real_access = os.access
            monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path / "ro" else real_access(p, mode))
        else:
            (tmp_path / "ro").chmod(0o500)
    before = snapshot(tmp_path)
    line = main_error(capsys, *quick, "--out", str(out))
    assert "--out" in line and "choose" in line
    assert snapshot(tmp_path) == before and not list(tmp_path.rglob(RUN_FILE))


def test_out_error_while_claiming_undoes_the_claim(tmp_path, capsys, monkeypatch, quick):
    """An OSError after the checks (here: a full disk writing run.json) is one line; nothing is left."""
    import errno

    import prune.outputs.outdir as outdir

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(outdir, "write_json", full)
    line = main_error(capsys, *quick, "--out", str(tmp_path / "a" / "out"))
    assert "no space" in line and "--out" in line
    assert list(tmp_path.iterdir()) == []


def _png_header(width: int, height: int) -> bytes:
    """A valid PNG that declares width × height pixels but holds one row of data."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decompression_bombs_are_unreadable(tmp_path, monkeypatch):
    from PIL import Image

    from prune.zoo.data import readable

    (tmp_path / "bomb.png").write_bytes(_png_header(100_000, 100_000))  # > 2 × MAX_IMAGE_PIXELS: PIL raises
    Image.new("RGB", (16, 16)).save(tmp_path / "big.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # between 1× and 2× the limit PIL only warns
    assert not readable(str(tmp_path / "bomb.png"))
    assert not readable(str(tmp_path / "big.png"))
    assert readable(str(tmp_path / "small.png"))


@pytest.mark.parametrize("train", [2, 1])
def test_bomb_and_fifo_images_are_skipped_never_hang(tmp_path, quick, train):
    """In every class folder: a decompression bomb and a FIFO named .png. With 2 good images per
    class the run warns and succeeds; with 1 it fails cleanly (too few readable)."""
    data = image_folder(tmp_path / "data", classes=3, train=train, val=1, size=8)
    for folder in [*(data / "train").iterdir(), *(data / "val").iterdir()]:
        (folder / "bomb.png").write_bytes(_png_header(100_000, 100_000))
        os.mkfifo(folder / "fifo.png")
    out = tmp_path / "out"
    result = prune_cli(*quick, "--data", str(data), "--out", str(out))  # prune_cli's timeout ends a hang
    if train == 1:
        assert_usage_error(result, "readable", "unreadable")
        assert not out.exists()
        return
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings and "unreadable" in warnings[0] and "Traceback" not in result.stderr


@pytest.mark.parametrize("kind", ["missing", "unexpected", "shape"])
def test_weights_that_do_not_fit_name_the_key(tmp_path, capsys, quick, kind):
    state = torch.load(quick[quick.index("--weights") + 1], weights_only=True)
    first = next(iter(state))
    if kind == "missing":
        del state[first]
    elif kind == "unexpected":
        state["extra.weight"] = torch.zeros(1)
    else:
        state[first] = torch.zeros(2, 2)
    torch.save(state, tmp_path / "w.pt")
    weights = ["--weights", str(tmp_path / "w.pt")]
    line = main_error(capsys, *quick, *weights, "--out", str(tmp_path / "out"))
    expected = {"missing": f"missing key {first!r}", "unexpected": "unexpected key 'extra.weight'",
                "shape": f"{first!r} has shape (2, 2)"}[kind]
    assert expected in line and "--model" in line
    assert not (tmp_path / "out").exists()


def test_a_stray_rank_variable_does_not_silence_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert "--ratio" in main_error(capsys, "--ratio", "2", "--out", str(tmp_path / "out"))


def test_data_paths_that_name_the_same_folder_are_the_same_run():
    from prune.cli import build_parser, config_from_args

    fingerprints = {config_from_args(build_parser().parse_args(["--data", d])).fingerprint() for d in ("d", "d/", "./d")}
    assert len(fingerprints) == 1
