"""Kill the main job (SIGKILL) while scoring and while fine-tuning; the rerun ends as an
uninterrupted run would (same removed channels, params, FLOPs, accuracy)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import image_folder, quick_run

from prune.zoo.embedded_model import EMBEDDED_WEIGHTS, EmbeddedVGG

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ["--classes", "10", "--samples-per-class", "12", "--epochs", "8", "--batch-size", "4", "--quiet"]


@pytest.fixture(scope="module")
def args(tmp_path_factory) -> list[str]:
    """Settings of the job: the embedded model on a small 10-class folder at 32 px."""
    root = tmp_path_factory.mktemp("resume")
    out = ["--data", str(image_folder(root / "data", train=16)), "--input-size", "32", *SETTINGS]
    if not EMBEDDED_WEIGHTS.exists():
        torch.manual_seed(0)
        torch.save(EmbeddedVGG(num_classes=10).state_dict(), root / "embedded.pt")
        out += ["--weights", str(root / "embedded.pt")]
    return out


def start(out: Path, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "prune", *args, "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_when(proc: subprocess.Popen, ready, timeout: float = 600) -> None:
    """SIGKILL `proc` as soon as `ready()` is true; fail if it ends first."""
    end = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the job ended before the stage was reached: {proc.stderr.read()}"
        assert time.monotonic() < end, "stage not reached in time"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def finish(out: Path, args: list[str]) -> dict:
    proc = start(out, args)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err
    return json.loads((out / "report.json").read_text())


def essentials(report: dict) -> dict:
    """What must not depend on an interruption (timings and img/s may)."""
    return {
        "layers": report["layers"],
        "params": report["after"]["params"],
        "flops": report["after"]["flops"],
        "top1": report["after"]["top1"],
        "losses": report["finetune_losses"],
        "pruned_top1": report["pruned_before_finetune"]["top1"],
    }


@pytest.mark.slow
def test_killed_while_scoring_and_fine_tuning_resumes_to_the_same_result(tmp_path, args):
    out = tmp_path / "out"
    cache = out / "cache"
    proc = start(out, args)
    kill_when(proc, lambda: (cache / "scores-000.pt").exists())
    scored = sorted(p.name for p in cache.glob("scores-*.pt"))
    assert not (cache / "finetune.pt").exists() and len(scored) < 6, scored  # killed while scoring
    proc = start(out, args)
    kill_when(proc, lambda: (cache / "finetune.pt").exists())
    epoch = torch.load(cache / "finetune.pt", weights_only=True)["epoch"]
    assert epoch < 7 and not (out / "report.json").exists()  # killed while fine-tuning
    resumed = finish(out, args)
    assert not list(out.rglob("*.tmp"))
    reference = finish(tmp_path / "reference", args)
    assert essentials(resumed) == essentials(reference)
    scores = [json.loads((d / "scores.json").read_text()) for d in (out, tmp_path / "reference")]
    assert scores[0] == scores[1]


def test_a_different_command_on_the_same_out_is_refused_unless_overwrite(tmp_path, args):
    out = tmp_path / "out"
    quick = [*args, "--no-finetune", "--classes", "2", "--samples-per-class", "2"]
    finish(out, quick)
    first = (out / "report.json").read_bytes()
    other = subprocess.run([sys.executable, "-m", "prune", *quick, "--ratio", "0.3", "--out", str(out)],
                           cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert other.returncode == 2 and "--overwrite" in other.stderr
    assert (out / "report.json").read_bytes() == first
    report = finish(out, [*quick, "--ratio", "0.3", "--overwrite"])
    assert report["settings"]["ratio"] == 0.3
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the replaced run is gone


# --- what a resume trusts: fast in-process runs (3 classes of 8×8 images, random weights, l1 scorer)


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> list[str]:
    return [*quick_run(tmp_path_factory.mktemp("quick")), "--classes", "2", "--samples-per-class", "2",
            "--no-finetune", "--quiet"]


@pytest.fixture(scope="module")
def clean(tmp_path_factory, quick) -> dict:
    """The report of an uninterrupted quick run."""
    from prune.cli import main

    out = tmp_path_factory.mktemp("clean") / "out"
    assert main([*quick, "--out", str(out)]) == 0
    return json.loads((out / "report.json").read_text())


def test_tampered_score_cache_is_scored_again(tmp_path, quick, clean):
    from prune.cli import main
    from prune.outputs.score_store import SCORES_FORMAT

    out = tmp_path / "out"
    assert main([*quick, "--out", str(out)]) == 0
    layers = [layer["name"] for layer in clean["layers"]]
    n = [layer["channels_before"] for layer in clean["layers"]]
    # well-formed files of the right layer: too short, NaN, and scores that would remove other channels
    bad = {0: torch.arange(n[0] - 1, dtype=torch.float32), 1: torch.full((n[1],), float("nan")),
           2: torch.cat([torch.zeros(n[2] - 1), torch.tensor([float("inf")])])}
    for i, scores in bad.items():
        torch.save({"format": SCORES_FORMAT, "layer": layers[i], "scores": scores}, out / "cache" / f"scores-{i:03d}.pt")
    (out / "report.json").unlink()
    assert main([*quick, "--out", str(out)]) == 0
    rerun = json.loads((out / "report.json").read_text())
    assert rerun["layers"] == clean["layers"]
    for i in bad:
        scores = torch.load(out / "cache" / f"scores-{i:03d}.pt", weights_only=True)["scores"]
        assert scores.shape == (n[i],) and torch.isfinite(scores).all()


@pytest.mark.parametrize("change", ["data", "weights"])
def test_changed_data_or_weights_under_the_same_command_is_a_different_run(tmp_path, capsys, quick, change):
    import shutil

    from PIL import Image

    from prune.cli import main

    args = list(quick)
    for flag in ("--data", "--weights"):  # private copies, changed below
        i = args.index(flag) + 1
        copy = tmp_path / Path(args[i]).name
        (shutil.copytree if flag == "--data" else shutil.copy)(args[i], copy)
        args[i] = str(copy)
    out = tmp_path / "out"
    assert main([*args, "--out", str(out)]) == 0
    report = (out / "report.json").read_bytes()
    if change == "data":
        image = next((tmp_path / "data" / "train").rglob("*.png"))
        Image.new("RGB", (9, 9), "white").save(image)
    else:
        state = torch.load(tmp_path / "weights.pt", weights_only=True)
        state[next(iter(state))] += 1.0
        torch.save(state, tmp_path / "weights.pt")
    capsys.readouterr()
    assert main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--{change}" in err[0] and "--overwrite" in err[0], err
    assert (out / "report.json").read_bytes() == report
    assert main([*args, "--overwrite", "--out", str(out)]) == 0


def test_one_run_at_a_time_and_a_killed_run_leaves_no_lock(tmp_path, capsys, quick):
    from prune.cli import main
    from prune.outputs.outdir import LOCK_FILE

    out = tmp_path / "out"
    assert main([*quick, "--out", str(out)]) == 0
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from prune.outputs.outdir import locked\n"
         "with locked(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        for extra in ([], ["--overwrite"], ["--ratio", "0.3", "--overwrite"]):
            capsys.readouterr()
            assert main([*quick, *extra, "--out", str(out)]) == 2
            err = capsys.readouterr().err
            assert "in use" in err and f"process {holder.pid}" in err, err
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert (out / LOCK_FILE).exists()  # left by the killed process, but no longer held
    assert main([*quick, "--overwrite", "--out", str(out)]) == 0
    assert not (out / LOCK_FILE).exists()


def test_temporary_files_of_a_killed_run_are_cleaned(tmp_path, quick):
    from prune.cli import main

    out = tmp_path / "out"
    assert main([*quick, "--out", str(out)]) == 0
    debris = [out / ".report.json.k2j3.topoprune.tmp", out / "cache" / ".scores-001.pt.x8a.topoprune.tmp",
              out / ".replaced-q1w2e3r4" / "model.pt"]
    for path in debris:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"partial")
    shutil.copy(out / "run.json", out / ".replaced-q1w2e3r4" / "run.json")  # a moved-aside run: its marker goes last
    (out / "cache" / ".notes.tmp").write_text("not ours: no .topoprune.tmp ending")
    assert main([*quick, "--out", str(out)]) == 0
    assert not any(p.exists() for p in debris) and not (out / ".replaced-q1w2e3r4").exists()
    assert (out / "cache" / ".notes.tmp").exists()
