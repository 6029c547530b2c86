"""Inference throughput: images per second with warm-up and synchronised timing."""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

from prune.core.throughput import Throughput
from scoring.model_state import eval_mode


def device_name(device: torch.device) -> str:
    """A human-readable device name (GPU model or 'cpu')."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def _resolved(device: torch.device) -> torch.device:
    """`cuda` as the `cuda:N` it means, so that devices compare equal."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _placed(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """`model` itself when it already is on `device` in the wanted memory format, else a copy that is."""
    tensors = [*model.parameters(), *model.buffers()]
    here = all(_resolved(t.device) == device for t in tensors)
    if here and not channels_last and all(t.is_contiguous() for t in tensors):
        return model
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return copy.deepcopy(model).to(device).to(memory_format=fmt)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_throughput(
    model: nn.Module,
    *,
    input_size: int,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    amp: bool = False,
    channels_last: bool = False,
    warmup: int = 3,
    iters: int = 10,
) -> Throughput:
    """Images per second of `model` in eval mode on random [batch, 3, s, s] inputs.

    amp: bf16 autocast on CPU, fp16 on CUDA. channels_last: NHWC memory format. The caller's
    model is never moved or converted (a copy is measured where needed); its modes are restored.
    """
    device = _resolved(torch.device(device))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = _placed(model, device, channels_last)
    x = torch.randn(batch_size, 3, input_size, input_size, device=device).to(memory_format=fmt)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    with eval_mode(model), torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
        for _ in range(warmup):
            model(x)
        _sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            model(x)
        _sync(device)
        elapsed = time.perf_counter() - start
    return Throughput(
        img_per_s=batch_size * iters / elapsed,
        device=device_name(device),
        batch_size=batch_size,
        dtype=str(amp_dtype).replace("torch.", "") if amp else "float32",
        threads=torch.get_num_threads(),
        warmup=warmup,
        iters=iters,
        channels_last=channels_last,
    )


def measure_speedup(model: nn.Module, baseline: nn.Module, *, input_size: int, device: str | torch.device = "cpu",
                    batch_size: int = 32, repeats: int = 5) -> float:
    """img/s of `model` over img/s of `baseline` (`measure_throughput`, batch `batch_size`),
    measured alternately `repeats` times in this process; the median ratio."""
    ratios = []
    for _ in range(repeats):
        base = measure_throughput(baseline, input_size=input_size, batch_size=batch_size, device=device).img_per_s
        mine = measure_throughput(model, input_size=input_size, batch_size=batch_size, device=device).img_per_s
        ratios.append(mine / base)
    return sorted(ratios)[len(ratios) // 2]
