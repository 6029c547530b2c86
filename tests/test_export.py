"""`--export onnx`: the pruned model as ONNX, reproducing `prune.load_pruned`'s logits in ONNX Runtime."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import prune
from prune.cli import main
from prune.errors import UsageError
from prune.outputs.export import OPSET, check_export, export_onnx
from prune.zoo.data import load_data

RUN = ["--ratio", "0.5", "--scorer", "l1", "--no-finetune", "--classes", "2", "--samples-per-class", "4", "--quiet"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "out"
    assert main([*RUN, "--out", str(out), "--export", "onnx"]) == 0
    return out


def ort_logits(path, images: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]


def test_onnx_runtime_reproduces_the_pruned_model(exported):
    model = prune.load_pruned(exported / "model.pt")
    data = load_data(None)
    for n in (1, 7):  # the batch axis is dynamic
        images = torch.stack([data.val[i][0] for i in range(n)])
        with torch.no_grad():
            expected = model(images).numpy()
        got = ort_logits(exported / "model.onnx", images)
        assert got.shape == expected.shape == (n, len(data.classes))
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_the_file_is_a_valid_graph_with_the_stated_opset_and_a_symbolic_batch(exported):
    graph = onnx.load(str(exported / "model.onnx"))
    onnx.checker.check_model(graph)
    assert {o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")} == {OPSET}
    batch = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value
    assert not [p.name for p in exported.iterdir() if p.name.endswith(".tmp")]


def test_export_is_not_part_of_the_settings(exported):
    # the same run without --export resumes on the exported folder instead of being refused
    assert main([*RUN, "--out", str(exported)]) == 0


def test_export_onnx_of_a_small_model(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2)).eval()
    path = export_onnx(model, tmp_path / "m.onnx", input_size=8)
    images = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        np.testing.assert_allclose(ort_logits(path, images), model(images).numpy(), atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_missing_onnxruntime_is_a_usage_error_naming_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    out = tmp_path / "out"
    assert main([*RUN, "--out", str(out), "--export", "onnx"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and 'pip install "topoprune[export]"' in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_unknown_export_format_is_a_usage_error():
    with pytest.raises(UsageError, match="onnx"):
        check_export("tflite")
    assert main([*RUN, "--export", "tflite"]) == 2
