"""Unit scorers behind one interface (higher score = more important = keep).

>>> import scoring
>>> scoring.list_scorers()            # doctest: +SKIP
['apoz', 'chip', 'entropy', 'fpgm', 'hrank', 'l1', 'nisp', 'random', 'selectivity', 'thinet',
 'tp-bnscale', 'tp-fpgm', 'tp-hessian', 'tp-lamp', 'tp-magnitude', 'tp-taylor']
>>> scorer = scoring.create("entropy")
>>> scores = scorer(layer, class_batches)  # [C] float32, higher = keep
"""

# Importing a scorer module registers it.
from scoring import activations, chip, control, entropy, hrank, nisp, thinet, tp_importances, weights  # noqa: E402,F401
from scoring.base import ClassBatch, LayerSpec, Scorer, ScorerInfo
from scoring.registry import create, list_scorers, parse_options, register, scorer_info, scorer_options

__all__ = [
    "ClassBatch",
    "LayerSpec",
    "Scorer",
    "ScorerInfo",
    "create",
    "list_scorers",
    "parse_options",
    "register",
    "scorer_info",
    "scorer_options",
]
