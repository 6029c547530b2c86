"""The channels the main job removes, and what it reports about them, are those of the committed
selections (tests/data/selections.json, written by this file's `--write` at the commit it names):
embedded and embedded-plain × entropy / l1 / apoz, ratio 0.5, no fine-tuning. Changes to how
scoring runs (caching, threads, bounded diagnostics) must leave them as they were.

    PYTHONPATH=<checkout> python tests/test_selections.py --write   # regenerate at a checkout
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import prune

FIXTURE = Path(__file__).parent / "data" / "selections.json"
SIDES = ("before", "after", "pruned_before_finetune", "pruned_bn_reestimated")
CASES = [(model, scorer) for model in ("embedded", "embedded-plain") for scorer in ("entropy", "l1", "apoz")]


def selection(model: str, scorer: str) -> dict:
    """The main job's removed channels per layer and its report numbers (no fine-tuning, no img/s)."""
    config = prune.PruneConfig(model=model, scorer=scorer, ratio=0.5, finetune=False)
    with tempfile.TemporaryDirectory() as tmp:
        report = prune.run(config, out=Path(tmp) / "run", quiet=True, speed=False).as_dict()
    numbers = {side: {k: v for k, v in report[side].items() if k not in ("img_per_s", "device", "throughput")}
               for side in SIDES}
    return {"layers": {layer["name"]: layer["removed"] for layer in report["layers"]}, **numbers}


@pytest.mark.parametrize(("model", "scorer"), CASES)
def test_the_main_job_removes_the_committed_channels(model: str, scorer: str) -> None:
    """Channels, counts and accuracies exactly; the mean loss to float rounding (its last digits differ
    between CPU models: AMD and Intel give values one float32 step apart)."""
    committed = json.loads(FIXTURE.read_text())["cases"][f"{model}/{scorer}"]
    found = selection(model, scorer)
    assert without_loss(found) == without_loss(committed)
    for side in SIDES:
        assert found[side]["loss"] == pytest.approx(committed[side]["loss"], rel=1e-6)


def without_loss(case: dict) -> dict:
    return {**case, **{side: {k: v for k, v in case[side].items() if k != "loss"} for side in SIDES}}


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(prune.__file__).parent).stdout.strip()
    cases = {f"{m}/{s}": selection(m, s) for m, s in CASES}
    FIXTURE.write_text(json.dumps({"commit": commit, "cases": cases}, indent=1) + "\n")
