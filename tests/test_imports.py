"""What a run imports: the embedded main job imports neither torchvision nor timm (seconds of
imports it does not use), and both still work when a run or a user asks for them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

MAIN_JOB = """
import json, runpy, sys

import prune.zoo.shapes

prune.zoo.shapes.DEFAULT_PER_CLASS.update(train=20, test=10)  # a small shapes10: the same imports, seconds less
sys.argv = ["prune", "--out", sys.argv[1], "--classes", "2", "--samples-per-class", "2", "--epochs", "1",
            "--no-speed", "--quiet"]
try:
    runpy.run_module("prune", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code
seen = {"code": code, "loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("torchvision", "timm"))}

import torch
import torch_pruning as tp
from torch_pruning.utils import op_counter

import prune

seen["tp_counter_has_timm"] = op_counter.has_timm
import timm  # noqa: E402

seen["timm"] = timm.__name__
model = prune.create_model("timm:resnet18", num_classes=3, pretrained=False)
graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, 3, 32, 32))
graph.get_pruning_group(model.conv1, tp.prune_conv_out_channels, idxs=[0, 1]).prune()
seen["timm_pruned"] = [model.conv1.out_channels, list(model(torch.zeros(1, 3, 32, 32)).shape)]
seen["torchvision"] = type(prune.create_model("resnet18", num_classes=3, pretrained=False)).__module__
print(json.dumps(seen))
"""


def _python(code: str, *args: str) -> dict:
    """The JSON that `python -c code args` prints last, run in a fresh process from the checkout."""
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def main_job(tmp_path_factory) -> dict:
    """`python -m prune` on the embedded model and data in a fresh process (classes and images cut
    down), then timm, torch-pruning and a torchvision name used in the same process."""
    return _python(MAIN_JOB, str(tmp_path_factory.mktemp("imports") / "out"))


def test_the_embedded_main_job_imports_neither_torchvision_nor_timm(main_job):
    assert main_job["code"] == 0
    assert main_job["loaded"] == []


def test_the_command_line_builds_torch_prunings_op_counter_without_timm(main_job):
    assert main_job["tp_counter_has_timm"] is False


def test_timm_and_torch_pruning_work_after_the_main_job(main_job):
    assert main_job["timm"] == "timm"
    assert main_job["timm_pruned"] == [62, [1, 3]]  # resnet18's stem conv, 64 → 62 channels, still runs


def test_a_torchvision_name_still_builds_after_the_main_job(main_job):
    assert main_job["torchvision"] == "torchvision.models.resnet"


def test_only_the_command_line_hides_timm_from_torch_pruning():
    """Library users get torch-pruning as it is; so does the command line when timm is already imported."""
    library = "import json, prune.pipeline.run; from torch_pruning.utils import op_counter; print(json.dumps(op_counter.has_timm))"
    assert _python(library) is True
    cli = ("import json, runpy, sys, timm; sys.argv = ['prune', '--help']\n"
           "try:\n    runpy.run_module('prune', run_name='__main__', alter_sys=True)\nexcept SystemExit:\n    pass\n"
           "from torch_pruning.utils import op_counter; print(json.dumps(op_counter.has_timm))")
    assert _python(cli) is True


def test_fashion_mnist_class_names_are_torchvisions():
    """prune.zoo.fashion writes the names out (no torchvision import for them): they must stay torchvision's."""
    from torchvision.datasets import FashionMNIST

    from prune.zoo.fashion import CLASSES

    assert CLASSES == tuple(FashionMNIST.classes)
