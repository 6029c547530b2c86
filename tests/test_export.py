"""`--export onnx`: the pruned model as ONNX, reproducing `prune.load_pruned`'s logits in ONNX Runtime."""

from __future__ import annotations

import os
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
from prune.outputs.export import OPSET, check_export, export_onnx, onnx_bytes
from prune.pipeline import run as run_module
from prune.pipeline.contract import check_exportable
from prune.zoo import registry
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


def pooled_to_three() -> nn.Module:
    """A 6² input reaches its adaptive pooling to 3x3 as 4x4 maps: 3 does not divide 4, which
    torch's ONNX exporter (opset 17) refuses."""
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(3), nn.Flatten(), nn.Linear(36, 2))


def test_a_model_the_exporter_refuses_is_one_usage_error_and_prints_no_graph(capfd):
    model = pooled_to_three().train()
    model[0].eval()  # a mixed state: every module's own mode must come back
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch._C._jit_set_onnx_log_enabled(False)  # as in a fresh process (an export elsewhere may have left it on)
    with pytest.raises(UsageError) as refused:  # named as a registered model made for 32² images
        check_exportable(model, input_size=6, name="embedded", device=torch.device("cpu"))
    message = str(refused.value)
    assert "adaptive_avg_pool2d" in message and "embedded at 6² input" in message
    assert "pass --input-size 32" in message and message.endswith("leave out --export onnx")
    assert "\n" not in message and "Please feel free" not in message and "%" not in message
    assert [m.training for m in model.modules()] == [True, False, True, True, True]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    os.write(1, b"printed after the check\n")  # descriptor 1 is the terminal's again
    out, _ = capfd.readouterr()
    assert "graph" not in out and "printed after the check" in out  # torch prints the graph to fd 1 from C++
    assert not torch._C._jit_is_onnx_log_enabled()  # torch's exporter leaves its log on; put back off
    assert onnx_bytes(pooled_to_three(), input_size=8)  # 6x6 maps: 3 divides 6, exported


def test_an_error_of_the_exporter_that_is_not_a_refusal_stays_an_error(monkeypatch):
    def fails(*_args, **_kwargs):
        raise RuntimeError("an exporter bug")

    monkeypatch.setattr(torch.onnx, "export", fails)
    with pytest.raises(RuntimeError, match="an exporter bug"):
        check_exportable(pooled_to_three(), input_size=8, name="embedded", device=torch.device("cpu"))


class PooledToSeven(nn.Module):
    """Made for 224² (as torchvision's VGG, it pools adaptively to 7x7): 32² images reach the pooling
    as 8x8 maps, and 7 does not divide 8."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                                      nn.ReLU(), nn.AdaptiveAvgPool2d(7))
        self.classifier = nn.Linear(8 * 7 * 7, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def test_the_run_refuses_an_unexportable_model_before_any_work(tmp_path, capfd, monkeypatch, scratch_registry):
    def started(*_args, **_kwargs):
        raise AssertionError("the run claimed --out before checking the export")

    registry.register_model("pooled-to-seven", input_size=224, num_classes=10)(PooledToSeven)
    monkeypatch.setattr(run_module, "_claim", started)
    out = tmp_path / "out"
    assert main(["--model", "pooled-to-seven", *RUN, "--out", str(out), "--export", "onnx"]) == 2  # 32² images
    stdout, err = capfd.readouterr()
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert "adaptive_avg_pool2d" in err and "--input-size 224" in err and "leave out --export onnx" in err
    assert not stdout.strip() and not out.exists()


@pytest.mark.parametrize(("error", "passes"), [(5e-3, True), (0.1, False)])
def test_the_onnx_check_scales_with_the_largest_logit(tmp_path, monkeypatch, error, passes):
    """A graph whose logits reach 40 may be off by 5e-3 on a logit near 0 (float32 rounding): kept;
    off by 0.1 (over 1e-4 + 1e-3 · 40): refused, nothing written."""
    from prune.outputs import export

    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    real = export.onnxruntime_logits

    def off(graph: bytes, images: torch.Tensor) -> np.ndarray:
        logits = real(graph, images)
        return logits + np.where(np.abs(logits) == np.abs(logits).min(), error, 0.0).astype(logits.dtype)

    with torch.no_grad():
        model[0].weight.fill_(0.0)
        model[0].bias.copy_(torch.tensor([40.0, 0.01]))
    monkeypatch.setattr(export, "onnxruntime_logits", off)
    path = tmp_path / "model.onnx"
    if passes:
        assert export_onnx(model, path, input_size=8) == path and path.exists()
    else:
        with pytest.raises(RuntimeError, match="largest difference"):
            export_onnx(model, path, input_size=8)
        assert not path.exists()
