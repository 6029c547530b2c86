"""Kill the main job (SIGKILL) while scoring and while fine-tuning; the rerun ends as an
uninterrupted run would (same removed channels, params, FLOPs, accuracy)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from prune.zoo.embedded_model import EMBEDDED_WEIGHTS, EmbeddedVGG
from helpers import image_folder

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
