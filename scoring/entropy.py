"""Feature entropy (paper §3.2): how concentrated a unit's birth times are over a class.

    births = birth_times(acts)            # [N, C] (0 = no birth), scoring.topology
    H = feature_entropy(births.T)         # [C] nats; low = stable unit
    scorer = scoring.create("entropy")    # score = −mean_c H_c, higher = keep

The authors' released code (convention="authors", docs/definitions.md) differs in the births (see
`scoring.topology.birth_times`) and in the per-class quantity, the ineffectiveness d:

    births = birth_times(acts, convention="authors")
    d = ineffectiveness(births.T)         # [C]; low = better unit
    scorer = scoring.create("entropy", convention="authors")   # score = −mean_c d_c
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from scoring.base import ClassBatch, LayerSpec
from scoring.chunked import ChunkedScorer
from scoring.registry import register
from scoring.topology import birth_times, resolve_convention


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


def _check_p(p: Any) -> float:
    """p as a float in [0, 1], else ValueError."""
    try:
        value = float(p)
    except (TypeError, ValueError):
        raise ValueError(f"p must be a number in [0, 1]; got {p!r}") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"p must be in [0, 1]; got {p!r}")
    return value


def _born_entropy(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows [R, N] → (authors' H over the born images [R], #born [R]); H = 0 if none born."""
    s, counts = _run_counts(arr)
    born = s != 0
    nborn = born.sum(axis=1)
    denom = np.maximum(nborn, 1)[:, None]
    logp = np.log(counts / denom, where=born, out=np.zeros(s.shape))
    return -logp.sum(axis=1) / denom[:, 0] + 0.0, nborn


def feature_entropy(births: Any, p: float = 0.1, convention: str = "paper") -> np.ndarray:
    """Feature entropy (nats) of birth times over images. Lower = more stable unit.

    births: [..., N] integers, 0 = no birth (numpy or torch). Returns float64 [...].

    paper (default, Eq. 9–12): P(x) = #{i: b_i = x}/N over the images with a birth (so
    ΣP = ε, the selective rate); H = −Σ P ln P; if ε < p then H = (1 − ε)·ln N.

    authors (the authors' released code): P(x) = #{i: b_i = x}/#born over the images with a
    birth only (ΣP = 1), H = −Σ P ln P, 0 when no image has a birth; p is ignored. The
    authors' scorer does not average this H but the ineffectiveness d = H/ε with its
    worst-case rule: see :func:`ineffectiveness`. "reference" is a deprecated alias.
    """
    convention = resolve_convention(convention, stacklevel=2)
    p = _check_p(p)
    arr = _as_births(births)
    lead, n = arr.shape[:-1], arr.shape[-1]
    if convention == "authors":
        return _born_entropy(arr.reshape(-1, n))[0].reshape(lead)
    s, counts = _run_counts(arr.reshape(-1, n))
    born = s != 0
    logp = np.log(counts / n, where=born, out=np.zeros(s.shape))
    h = -logp.sum(axis=1) / n
    eps = born.sum(axis=1) / n
    h = np.where(eps < p, (1.0 - eps) * math.log(n), h)
    return (h + 0.0).reshape(lead)


WORST_INEFFECTIVENESS = 100.0 * math.log(100.0)  # authors' value for |d| < 0.1
_SMALL_INEFFECTIVENESS = 0.1


def ineffectiveness(births: Any) -> np.ndarray:
    """The authors' per-class ineffectiveness d of each unit. Lower = better unit.

    births: [..., N] integers, 0 = no birth (numpy or torch). Returns float64 [...], in
    nats per unit of selective rate. With H the authors' entropy over the images with a
    birth (:func:`feature_entropy` with convention="authors") and ε = #born/N:
    d = H/ε (d = H = 0 when ε = 0); then |d| < 0.1 → d = 100·ln 100 (the worst value).
    The last rule also rates a unit whose born images all share one birth time (H = 0),
    or that is never born, as worst. The authors' layer score is −mean over classes of d.
    """
    arr = _as_births(births)
    lead, n = arr.shape[:-1], arr.shape[-1]
    h, nborn = _born_entropy(arr.reshape(-1, n))
    d = np.where(nborn > 0, h / (np.maximum(nborn, 1) / n), h)
    d = np.where(np.abs(d) < _SMALL_INEFFECTIVENESS, WORST_INEFFECTIVENESS, d)
    return d.reshape(lead)


@register(
    "entropy",
    needs_data=True,
    description="feature entropy of topological birth times, −mean over classes "
    "(convention: paper, or authors for the authors' released code)",
)
class FeatureEntropyScorer(ChunkedScorer):
    """Score = −(mean over classes of a per-class term) per channel; higher = keep.

    convention="paper" (default): the term is the feature entropy H_c (Eq. 9–12) of the
    paper-convention births; p is the selective-rate threshold of Eq. 12.
    convention="authors": the term is the authors' ineffectiveness d_c
    (:func:`ineffectiveness`) of the authors' births; p is not used (validated only).
    "reference" is a deprecated alias of "authors" (one FutureWarning). Invalid options
    raise ValueError. Maps must be square (m×m, the paper's setting); rectangular maps
    raise ValueError rather than being cropped. A class may come in chunks: each chunk's
    births [n, C] are kept and the class term is computed when the class ends.
    """

    reads_only_units = True

    def __init__(self, p: float = 0.1, convention: str = "paper") -> None:
        self.convention = resolve_convention(convention, stacklevel=3)  # via scoring.create
        self.p = _check_p(p)
        self._total: np.ndarray | None = None
        self._classes = 0

    def check_maps(self, sizes: Mapping[str, tuple[int, int]]) -> None:
        """A unit's map is read as an m×m weighted adjacency matrix: every map must be square."""
        for name, (height, width) in sizes.items():
            if height != width:
                raise ValueError(f"scorer 'entropy' reads each unit's map as an m×m matrix, and conv {name}'s maps "
                                 f"are {height}×{width} (a stride or padding that differs between height and "
                                 "width); choose another --scorer, e.g. hrank or l1")

    def reset(self, layer: LayerSpec) -> None:
        super().reset(layer)
        self._total = None
        self._classes = 0
        self._channels: int | None = None

    def _class_term(self, births: np.ndarray) -> np.ndarray:
        """births [C, N] → the per-class term [C] (H_c or d_c; lower = better unit)."""
        if self.convention == "authors":
            return ineffectiveness(births)
        return feature_entropy(births, p=self.p, convention="paper")

    def per_image(self, batch: ClassBatch) -> np.ndarray:
        """Activations [n, C, m, m] → births [n, C] (int64, 0 = no birth)."""
        acts = batch.activations
        if acts.ndim != 4:
            raise ValueError(
                f"activations must be [N, C, m, m]; got shape {tuple(acts.shape)}"
            )
        births = birth_times(acts, convention=self.convention)  # [n, C]
        if self._channels is not None and births.shape[1] != self._channels:
            raise ValueError(
                f"class {batch.class_index} has {births.shape[1]} channels, earlier images "
                f"{self._channels}; pass activations of one layer"
            )
        self._channels = births.shape[1]
        return births

    def reduce_class(self, class_index: int, stats: np.ndarray) -> None:
        """Births [N, C] of one class → H_c or d_c [C] into the running sum."""
        h = self._class_term(stats.T)  # [C]
        self._total = h if self._total is None else self._total + h
        self._classes += 1

    def state(self) -> np.ndarray:
        """Sum of the per-class terms (H_c or d_c) [C] seen so far."""
        self.end_class()
        return self._total.copy()

    def merge(self, states: Sequence[np.ndarray]) -> None:
        for h in states:
            self._total = h if self._total is None else self._total + h
        self._classes = len(states)

    def compute(self) -> torch.Tensor:
        """Scores [C] float32 CPU: −mean_c of H_c or d_c (higher = more stable = keep)."""
        self.end_class()
        if self._total is None:
            raise ValueError("the entropy scorer needs data: call update() with a class first")
        return torch.from_numpy(-self._total / self._classes).to(torch.float32)
