"""Input checking shared by the topology functions: any array of m×m maps → numpy."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def _to_numpy(maps: Any) -> np.ndarray:
    if isinstance(maps, torch.Tensor):
        t = maps.detach().to("cpu")
        if t.is_complex():
            raise ValueError("maps must be real; got a complex tensor")
        if t.dtype in (torch.float16, torch.bfloat16) or not t.is_floating_point():
            t = t.to(torch.float64 if not t.is_floating_point() else torch.float32)
        return t.numpy()
    arr = np.asarray(maps)
    if arr.dtype.kind == "c":
        raise ValueError("maps must be real; got a complex array")
    if arr.dtype.kind not in "f" or arr.dtype.itemsize < 4:
        arr = arr.astype(np.float32 if arr.dtype == np.float16 else np.float64)
    elif arr.dtype.itemsize > 8:
        arr = arr.astype(np.float64)
    return arr


def _check_finite(arr: np.ndarray) -> None:
    if np.isfinite(arr).all():
        return
    bad = np.argwhere(~np.isfinite(arr))[0]
    kind = "NaN" if np.isnan(arr[tuple(bad)]) else "Inf"
    raise ValueError(
        f"maps contain {kind} at index {tuple(int(i) for i in bad)}; check the activations "
        "(a diverged model or corrupt input) and pass finite values"
    )


def as_maps(maps: Any) -> tuple[np.ndarray, tuple[int, ...]]:
    """Maps [..., m, m] (numpy or torch, any device) → (C-contiguous float32/float64
    array [N, m, m], leading shape). Raises ValueError on bad shape or NaN/Inf."""
    arr = _to_numpy(maps)
    if arr.ndim < 2:
        raise ValueError(f"maps must have shape [..., m, m]; got shape {tuple(arr.shape)}")
    m_h, m_w = arr.shape[-2:]
    if m_h != m_w:
        raise ValueError(
            f"maps must be square (m×m); got {m_h}×{m_w}. Resize the input images to a "
            "square size (the paper's setting) or crop the maps to a square first"
        )
    if m_h == 0:
        raise ValueError("maps are empty (m = 0); pass at least 1×1 maps")
    _check_finite(arr)
    lead = tuple(int(s) for s in arr.shape[:-2])
    return np.ascontiguousarray(arr.reshape(-1, m_h, m_w)), lead
