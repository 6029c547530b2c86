"""Several processes: class sharding is exact, and `torchrun -m prune` equals one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import image_folder, small_data

import scoring
from prune.core.distributed import World, shard
from prune.pipeline.selection import ScoringData, class_batches, class_states, merged_scores
from prune.zoo.data import choose_classes
from prune.zoo.embedded_model import EMBEDDED_WEIGHTS, EmbeddedVGG

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--classes", "4", "--samples-per-class", "10", "--scorer", "entropy", "--quiet"]


@pytest.fixture(scope="module")
def model_args(tmp_path_factory) -> list[str]:
    """The embedded model (shipped weights, else a seeded random state_dict for the same net)
    on a small 10-class ImageFolder at 32 px (generating the embedded data set is slow)."""
    root = tmp_path_factory.mktemp("ddp")
    args = ["--data", str(image_folder(root / "data")), "--input-size", "32"]
    if EMBEDDED_WEIGHTS.exists():
        return args
    torch.manual_seed(0)
    torch.save(EmbeddedVGG(num_classes=10).state_dict(), root / "embedded.pt")
    return [*args, "--weights", str(root / "embedded.pt")]


SHARDABLE = sorted(n for n in scoring.list_scorers() if scoring.create(n).shardable())


def test_the_class_sum_scorers_are_shardable():
    assert SHARDABLE == ["apoz", "chip", "entropy", "hrank", "selectivity", "thinet", "tp-hessian", "tp-taylor"]


@pytest.mark.parametrize("name", SHARDABLE)
def test_class_sharding_is_exact(name):
    """Scores merged from 3 ranks' per-class states equal one scorer fed every class (bitwise)."""
    torch.manual_seed(0)
    model = EmbeddedVGG(num_classes=10).eval()
    data = small_data()
    source = ScoringData(data=data, classes=choose_classes(data, 4, seed=0), per_class=5, seed=0)
    conv = model.features[3]
    layer = scoring.LayerSpec(model=model, conv=conv, name="features.3")
    scorer = scoring.create(name)
    whole = scorer(layer, class_batches(model, conv, "features.3", source))
    states = {}
    for rank in range(3):
        states.update(class_states(scorer, layer, source, shard(source.classes, World(rank, 3))))
    assert torch.equal(merged_scores(scorer, layer, states, source.classes), whole)


def test_shard_covers_every_item_once():
    items = list(range(7))
    parts = [shard(items, World(r, 3)) for r in range(3)]
    assert sorted(sum(parts, [])) == items


def _torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m", "prune", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)


def _removed(out: Path) -> list[list[int]]:
    return [layer["removed"] for layer in json.loads((out / "report.json").read_text())["layers"]]


def _single(out: Path, *args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "prune", *args, "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr


@pytest.mark.ddp
def test_two_processes_select_what_one_selects(tmp_path, model_args):
    args = [*SMALL, *model_args, "--no-finetune"]
    result = _torchrun(2, *args, "--out", str(tmp_path / "ddp"))
    assert result.returncode == 0, result.stderr[-3000:]
    _single(tmp_path / "one", *args)
    assert _removed(tmp_path / "ddp") == _removed(tmp_path / "one")
    scores = [json.loads((tmp_path / d / "scores.json").read_text()) for d in ("ddp", "one")]
    assert scores[0] == scores[1]
    report = json.loads((tmp_path / "ddp" / "report.json").read_text())
    assert report["processes"] == 2


@pytest.mark.ddp
@pytest.mark.slow
def test_two_processes_fine_tune_with_ddp(tmp_path, model_args):
    """Fine-tuning under DDP: rank 0 writes the checkpoint and the report; selection as one process."""
    args = [*SMALL, *model_args, "--epochs", "1", "--batch-size", "16"]
    result = _torchrun(2, *args, "--out", str(tmp_path / "ddp"))
    assert result.returncode == 0, result.stderr[-3000:]
    _single(tmp_path / "one", *args)
    assert _removed(tmp_path / "ddp") == _removed(tmp_path / "one")
    report = json.loads((tmp_path / "ddp" / "report.json").read_text())
    assert len(report["finetune_losses"]) == 1 and (tmp_path / "ddp" / "cache" / "finetune.pt").exists()
    assert not list((tmp_path / "ddp").rglob("*.tmp"))
