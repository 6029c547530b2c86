"""Deployable output: the pruned model as ONNX (`--export onnx` writes `<out>/model.onnx`).

Opset 17 (ONNX 1.12+, ONNX Runtime 1.13+, TensorRT 8.6+; the first opset with
LayerNormalization, which ConvNeXt-style models need). The graph takes `images`
[batch, 3, s, s] float32 (normalised as for the PyTorch model) and returns `logits`
[batch, classes]; the batch axis is dynamic. The file is made with torch's TorchScript-based
exporter (`dynamo=False`): the torch.export-based one would add onnxscript to the
dependencies. Before the file is written, ONNX Runtime runs it once on a seeded batch of
2 and its logits are compared with PyTorch's, so a file that does not reproduce the model is
never written.
"""

from __future__ import annotations

import io
import os
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import nn

from prune.core.files import write_bytes
from prune.errors import UsageError, first_line
from scoring.model_state import model_device, model_dtype

OPSET = 17
FORMATS = ("onnx",)
INSTALL_HINT = 'pip install "topoprune[export]"'


def require_onnx() -> tuple[ModuleType, ModuleType]:
    """(onnx, onnxruntime), or UsageError naming the install command if either is missing."""
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise UsageError(f"--export onnx needs onnx and onnxruntime ({exc.name} is missing); {INSTALL_HINT}") from None
    return onnx, onnxruntime


def check_export(fmt: str | None) -> None:
    """UsageError, before any work, for an unknown export format or a missing exporter."""
    if fmt is None:
        return
    if fmt not in FORMATS:
        raise UsageError(f"--export {fmt!r} is unknown; use one of {', '.join(FORMATS)}")
    require_onnx()


@contextmanager
def _stdout_silenced() -> Iterator[None]:
    """Send file descriptor 1 to /dev/null: torch's exporter prints the whole graph there (from C++,
    past `sys.stdout`) when it fails."""
    if sys.stdout is not None:
        sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no descriptor 1 (closed): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def exporter_says(exc: Exception) -> str:
    """The first sentence of the exporter's message, without its request to report and its graph."""
    return re.split(r"\. Please feel free| \[Caused by", first_line(exc))[0].rstrip(".")


def onnx_bytes(model: nn.Module, *, input_size: int, opset: int = OPSET, export_params: bool = True) -> bytes:
    """`model` (eval mode) as a serialised ONNX graph: images [batch, 3, s, s] → logits [batch, K]
    (UsageError naming the install command if onnx or onnxruntime is missing). `export_params=False`
    leaves the weights out (a check that the graph exports, at a third of the memory)."""
    require_onnx()
    device = model_device(model)
    example = torch.zeros(1, 3, input_size, input_size, device=device, dtype=model_dtype(model))
    buffer = io.BytesIO()
    log_was_on = torch._C._jit_is_onnx_log_enabled()
    try:
        with warnings.catch_warnings(), _stdout_silenced():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
            torch.onnx.export(
                model.eval(),
                (example,),
                buffer,
                dynamo=False,
                export_params=export_params,
                opset_version=opset,
                input_names=["images"],
                output_names=["logits"],
                dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            )
    finally:  # torch's exporter turns its log on and leaves it on, for later exports to print graphs
        torch._C._jit_set_onnx_log_enabled(log_was_on)
    return buffer.getvalue()


def onnxruntime_logits(graph: bytes, images: torch.Tensor) -> np.ndarray:
    """Logits [n, K] of the ONNX `graph` for `images` [n, 3, s, s] in ONNX Runtime on CPU."""
    _, ort = require_onnx()
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"images": images.detach().cpu().float().numpy()})[0]


@torch.no_grad()
def export_onnx(model: nn.Module, path: Path, *, input_size: int, opset: int = OPSET) -> Path:
    """Write `model` to `path` as ONNX (atomically, temp file then rename) and return `path`.

    The graph is checked with `onnx.checker` and run in ONNX Runtime on a seeded batch of 2;
    logits that differ from PyTorch's by more than 1e-4 + 1e-3·max|logit| raise RuntimeError
    (nothing is written): float32 rounding grows with the size of the activations, so a logit
    near 0 in a batch whose logits reach 40 may differ by 1e-2 in a faithful graph.
    """
    onnx, _ = require_onnx()
    graph = onnx_bytes(model, input_size=input_size, opset=opset)
    onnx.checker.check_model(onnx.load_from_string(graph))
    images = torch.randn(2, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
    expected = model(images.to(model_device(model))).float().cpu().numpy()
    got = onnxruntime_logits(graph, images)
    if got.shape != expected.shape:
        raise RuntimeError(f"the ONNX export of the model gives logits {got.shape}, not {expected.shape}; {path} not written")
    difference, tolerance = float(np.abs(got - expected).max()), 1e-4 + 1e-3 * float(np.abs(expected).max())
    if not difference <= tolerance:
        raise RuntimeError(f"the ONNX export of the model does not reproduce its logits (largest difference "
                           f"{difference:.3g}, tolerance {tolerance:.3g}); {path} not written")
    write_bytes(Path(path), graph)
    return Path(path)
