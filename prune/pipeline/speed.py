"""Inference throughput: images per second with warm-up and synchronised timing."""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from prune.core.throughput import Throughput
from scoring.model_state import eval_mode, model_dtype


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


SPEED_SECONDS = 3.0
"""Default time budget of the timed windows of one measurement (`--speed-seconds`)."""
MIN_WINDOWS, MAX_WINDOWS = 3, 10
"""A measurement times at least MIN_WINDOWS windows and stops at MAX_WINDOWS or, after MIN_WINDOWS, at the budget."""
WINDOW_SECONDS, MAX_PER_WINDOW = 0.02, 1000
"""A window holds enough batches to last about WINDOW_SECONDS (one where a batch is longer; at most MAX_PER_WINDOW)."""
MAX_WARMUP = 3
"""Warm-up batches: at most this many, fewer once they have taken a third of the budget (at least one)."""


@torch.no_grad()
def measure_throughput(
    model: nn.Module,
    *,
    input_size: int,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    amp: bool = False,
    channels_last: bool = False,
    seconds: float = SPEED_SECONDS,
) -> Throughput:
    """Images per second of `model` in eval mode on random [batch, 3, s, s] inputs in the model's
    dtype: the median of timed windows after a warm-up, bounded in time (`seconds`, see the
    constants above), with the slowest and fastest window as its spread.

    amp: bf16 autocast on CPU, fp16 on CUDA. channels_last: NHWC memory format. The caller's
    model is never moved or converted (a copy is measured where needed); its modes are restored.
    """
    device = _resolved(torch.device(device))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = _placed(model, device, channels_last)
    dtype = model_dtype(model)
    x = torch.randn(batch_size, 3, input_size, input_size, device=device, dtype=dtype).to(memory_format=fmt)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    with eval_mode(model), torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
        return timed_throughput(lambda: model(x), batch_size=batch_size, seconds=seconds, device=device,
                                label=device_name(device), dtype=str(amp_dtype if amp else dtype).replace("torch.", ""),
                                channels_last=channels_last)


def timed_throughput(step: Callable[[], object], *, batch_size: int, seconds: float = SPEED_SECONDS,
                     device: torch.device = torch.device("cpu"), label: str = "cpu", dtype: str = "float32",
                     channels_last: bool = False) -> Throughput:
    """The Throughput of `step` (one batch of `batch_size` images through a model, on `device`):
    a warm-up, then timed windows to the budget `seconds` (the constants above); `label`, `dtype`
    and `channels_last` are recorded as given."""
    warmup, last = _warm_up(step, device, seconds)
    per_window = min(MAX_PER_WINDOW, max(1, math.ceil(WINDOW_SECONDS / max(last, 1e-9))))
    rates = _timed_windows(step, device, seconds, per_window, batch_size)
    return Throughput(img_per_s=statistics.median(rates), device=label, batch_size=batch_size, dtype=dtype,
                      threads=torch.get_num_threads(), warmup=warmup, iters=per_window * len(rates),
                      channels_last=channels_last, windows=len(rates), spread=(min(rates), max(rates)),
                      seconds=seconds)


def _warm_up(step: Callable[[], object], device: torch.device, seconds: float) -> tuple[int, float]:
    """Run `step` MAX_WARMUP times, or fewer once a third of `seconds` has passed (at least once):
    (batches run, seconds of the last one)."""
    start = time.perf_counter()
    for done in range(1, MAX_WARMUP + 1):
        began = time.perf_counter()
        step()
        _sync(device)
        last = time.perf_counter() - began
        if time.perf_counter() - start >= seconds / 3:
            break
    return done, last


def _timed_windows(step: Callable[[], object], device: torch.device, seconds: float, per_window: int,
                   batch_size: int) -> list[float]:
    """img/s of each timed window of `per_window` calls of `step`: MIN_WINDOWS..MAX_WINDOWS of them,
    stopping after MIN_WINDOWS once `seconds` have passed."""
    rates: list[float] = []
    start = time.perf_counter()
    while len(rates) < MAX_WINDOWS and (len(rates) < MIN_WINDOWS or time.perf_counter() - start < seconds):
        began = time.perf_counter()
        for _ in range(per_window):
            step()
        _sync(device)
        rates.append(batch_size * per_window / (time.perf_counter() - began))
    return rates


def measure_speedup(model: nn.Module, baseline: nn.Module, *, input_size: int, device: str | torch.device = "cpu",
                    batch_size: int = 32, repeats: int = 5, seconds: float = SPEED_SECONDS) -> float:
    """img/s of `model` over img/s of `baseline` (`measure_throughput`, batch `batch_size`),
    measured alternately `repeats` times in this process, each with a budget of `seconds` / `repeats`;
    the median ratio."""
    ratios = []
    each = seconds / repeats
    for _ in range(repeats):
        base = measure_throughput(baseline, input_size=input_size, batch_size=batch_size, device=device,
                                  seconds=each).img_per_s
        mine = measure_throughput(model, input_size=input_size, batch_size=batch_size, device=device,
                                  seconds=each).img_per_s
        ratios.append(mine / base)
    return sorted(ratios)[len(ratios) // 2]
