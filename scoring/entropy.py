"""Feature entropy (paper §3.2): how concentrated a unit's birth times are over a class.

    births = birth_times(acts)            # [N, C] (0 = no birth), scoring.topology
    H = feature_entropy(births.T)         # [C] nats; low = stable unit
    scorer = scoring.create("entropy")    # score = −mean_c H_c, higher = keep
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from scoring.base import ClassBatch, LayerSpec, Scorer
from scoring.registry import register
from scoring.topology import CONVENTIONS, birth_times


def _as_births(births: Any) -> np.ndarray:
    if isinstance(births, torch.Tensor):
        births = births.detach().to("cpu").numpy()
    arr = np.asarray(births)
    if arr.dtype.kind not in "iub":
        if arr.dtype.kind != "f" or not np.array_equal(arr, np.round(arr)):
            raise ValueError(f"births must be integers (0 = no birth); got dtype {arr.dtype}")
    if arr.ndim == 0 or arr.shape[-1] == 0:
        raise ValueError(f"births must have shape [..., N] with N ≥ 1; got {arr.shape}")
    if (arr < 0).any():
        raise ValueError("births must be ≥ 0 (0 = no birth); got a negative value")
    return arr.astype(np.int64)


def selective_rate(births: Any) -> np.ndarray:
    """ε: fraction of images with a birth. births [..., N] int (0 = none) → float64 [...]."""
    arr = _as_births(births)
    return np.count_nonzero(arr, axis=-1) / arr.shape[-1]


def _run_counts(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows [R, N] → (sorted rows, per-element size of its run of equal values)."""
    s = np.sort(arr, axis=-1)
    rows, n = s.shape
    new = np.ones_like(s, dtype=bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    run = np.cumsum(new, axis=1) - 1 + (np.arange(rows) * n)[:, None]
    return s, np.bincount(run.ravel(), minlength=rows * n)[run]


def feature_entropy(births: Any, p: float = 0.1, convention: str = "paper") -> np.ndarray:
    """Feature entropy (nats) of birth times over images. Lower = more stable unit.

    births: [..., N] integers, 0 = no birth (numpy or torch). Returns float64 [...].
    paper (Eq. 9–12): P(x) = #{i: b_i = x}/N over the images with a birth (so ΣP = ε);
    H = −Σ P ln P; if ε < p then H = (1 − ε)·ln N.
    reference (authors' code): P normalised by the images with a birth, no p rule;
    ln N when no image has a birth.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; use one of {CONVENTIONS}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1]; got {p}")
    arr = _as_births(births)
    lead, n = arr.shape[:-1], arr.shape[-1]
    s, counts = _run_counts(arr.reshape(-1, n))
    born = s != 0
    nborn = born.sum(axis=1)
    if convention == "paper":
        logp = np.log(counts / n, where=born, out=np.zeros(s.shape))
        h = -logp.sum(axis=1) / n
        eps = nborn / n
        h = np.where(eps < p, (1.0 - eps) * math.log(n), h)
    else:
        denom = np.maximum(nborn, 1)[:, None]
        logp = np.log(counts / denom, where=born, out=np.zeros(s.shape))
        h = np.where(nborn > 0, -logp.sum(axis=1) / np.maximum(nborn, 1), math.log(n))
    return (h + 0.0).reshape(lead)


@register(
    "entropy",
    needs_data=True,
    description="feature entropy of topological birth times, −mean over classes",
)
class FeatureEntropyScorer(Scorer):
    """Score = −(mean over classes of the feature entropy H_c) per channel; higher = keep.

    p: selective-rate threshold of Eq. 12. convention: "paper" or "reference" (birth
    times and entropy as in the authors' released code). Maps must be square (m×m, the
    paper's setting); rectangular maps raise ValueError rather than being cropped.
    """

    def __init__(self, p: float = 0.1, convention: str = "paper") -> None:
        if convention not in CONVENTIONS:
            raise ValueError(f"unknown convention {convention!r}; use one of {CONVENTIONS}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1]; got {p}")
        self.p = float(p)
        self.convention = convention
        self._total: np.ndarray | None = None
        self._classes = 0

    def reset(self, layer: LayerSpec) -> None:
        super().reset(layer)
        self._total = None
        self._classes = 0

    def update(self, batch: ClassBatch) -> None:
        """Add one class: activations [N, C, m, m] → H_c [C] into the running sum."""
        acts = batch.activations
        if acts.ndim != 4:
            raise ValueError(
                f"activations must be [N, C, m, m]; got shape {tuple(acts.shape)}"
            )
        births = birth_times(acts, convention=self.convention)  # [N, C]
        h = feature_entropy(births.T, p=self.p, convention=self.convention)  # [C]
        if self._total is not None and self._total.shape != h.shape:
            raise ValueError(
                f"class {batch.class_index} has {h.shape[0]} channels, earlier classes "
                f"{self._total.shape[0]}; pass activations of one layer"
            )
        self._total = h if self._total is None else self._total + h
        self._classes += 1

    def state(self) -> np.ndarray:
        """Sum of the per-class entropies H_c [C] seen so far."""
        return self._total.copy()

    def merge(self, states: Sequence[np.ndarray]) -> None:
        for h in states:
            self._total = h if self._total is None else self._total + h
        self._classes = len(states)

    def compute(self) -> torch.Tensor:
        """Scores [C] float32 CPU: −mean_c H_c (higher = more stable = keep)."""
        if self._total is None:
            raise ValueError("the entropy scorer needs data: call update() with a class first")
        return torch.from_numpy(-self._total / self._classes).to(torch.float32)
