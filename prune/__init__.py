"""topoprune: prune CNN channels by feature entropy and other scorers.

The library API (what `python -m prune` and the benchmarks use)::

    import prune
    report = prune.run(prune.PruneConfig(ratio=0.5, scorer="entropy"), out="runs/r0.5")
    report.after.top1, report.layers[0].removed      # a typed PruneReport
    report = prune.run(prune.PruneConfig(target_flops=0.5, allocation="sensitivity"), out="runs/f0.5")
    report.budget.ratios, report.budget.achieved_flops  # per-layer ratios chosen for a FLOPs budget
    prune.list_models("vgg*")                          # names --model takes
    model = prune.load_pruned("runs/r0.5/model.pt")
    net = prune.create_model("vgg16", weights="IMAGENET1K_V1", num_classes=10)  # the one way to get a model

The mid-level pieces the main job is made of are public too: `prune.load_data`,
`prune.Surgeon` (torch-pruning surgery by channel group), `prune.select_and_prune` (layer-by-layer
selection), `prune.count_cost` (params, MACs, FLOPs) and `prune.measure_throughput` (img/s), with
the pieces they take and give (`DataBundle`, `embedded_data`, `class_images`, `make_loader`,
`model_entry`, `ScoringData`, `score_group`, `class_batches`, `lowest`, `channels_to_remove`,
`collect_units`, `following_norm`, `Throughput`, `onnx_bytes`, `fit_embedded`/`TrainConfig`,
`train_variant`/`RECIPES`, `ALLOCATIONS`), and the command helpers the benchmarks use
(`exit_code`; atomic `write_json`/`write_text`/`write_bytes`/`torch_save`; `file_digest`).

Names are imported on first use, so `import prune` stays light.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from prune.version import __version__

_EXPORTS: dict[str, str] = {
    "PruneConfig": "prune.config",
    "ALLOCATIONS": "prune.config",
    "run": "prune.pipeline.run",
    "PruneReport": "prune.outputs.report",
    "Measurement": "prune.outputs.report",
    "LayerResult": "prune.outputs.report",
    "list_models": "prune.zoo.registry",
    "load_pruned": "prune.outputs.checkpoint",
    "as_tp_importance": "prune.pipeline.importance",
    "UsageError": "prune.errors",
    "create_model": "prune.zoo.models",
    "load_data": "prune.zoo.data",
    "Surgeon": "prune.pipeline.surgery",
    "select_and_prune": "prune.pipeline.selection",
    "count_cost": "prune.pipeline.counting",
    "measure_throughput": "prune.pipeline.speed",
    "timed_throughput": "prune.pipeline.speed",
    "SPEED_SECONDS": "prune.pipeline.speed",
    "Throughput": "prune.core.throughput",
    "DataBundle": "prune.zoo.data",
    "embedded_data": "prune.zoo.data",
    "class_images": "prune.zoo.data",
    "make_loader": "prune.zoo.data",
    "model_entry": "prune.zoo.registry",
    "ScoringData": "prune.pipeline.selection",
    "score_group": "prune.pipeline.selection",
    "class_batches": "prune.pipeline.selection",
    "lowest": "prune.pipeline.selection",
    "channels_to_remove": "prune.pipeline.surgery",
    "collect_units": "prune.pipeline.observe",
    "following_norm": "prune.pipeline.observe",
    "onnx_bytes": "prune.outputs.export",
    "fit_embedded": "prune.zoo.train_embedded",
    "TrainConfig": "prune.zoo.recipes",
    "train_variant": "prune.zoo.train_embedded",
    "RECIPES": "prune.zoo.recipes",
    "exit_code": "prune.errors",
    "write_json": "prune.core.files",
    "write_text": "prune.core.files",
    "write_bytes": "prune.core.files",
    "torch_save": "prune.core.files",
    "file_digest": "prune.pipeline.provenance",
}
"""Public name → the module that defines it."""

__all__ = [  # the names of _EXPORTS, in its order
    "__version__", "PruneConfig", "ALLOCATIONS", "run", "PruneReport", "Measurement", "LayerResult", "list_models", "load_pruned",
    "as_tp_importance", "UsageError", "create_model", "load_data", "Surgeon", "select_and_prune", "count_cost",
    "measure_throughput", "timed_throughput", "SPEED_SECONDS", "Throughput", "DataBundle", "embedded_data", "class_images", "make_loader", "model_entry",
    "ScoringData", "score_group", "class_batches", "lowest", "channels_to_remove", "collect_units", "following_norm", "onnx_bytes",
    "fit_embedded", "TrainConfig", "train_variant", "RECIPES", "exit_code", "write_json", "write_text", "write_bytes",
    "torch_save", "file_digest",
]

if TYPE_CHECKING:  # the names for type checkers; at run time __getattr__ imports them on first use
    from prune.config import ALLOCATIONS as ALLOCATIONS
    from prune.config import PruneConfig as PruneConfig
    from prune.core.files import torch_save as torch_save
    from prune.core.files import write_bytes as write_bytes
    from prune.core.files import write_json as write_json
    from prune.core.files import write_text as write_text
    from prune.core.throughput import Throughput as Throughput
    from prune.errors import UsageError as UsageError
    from prune.errors import exit_code as exit_code
    from prune.outputs.checkpoint import load_pruned as load_pruned
    from prune.outputs.export import onnx_bytes as onnx_bytes
    from prune.outputs.report import LayerResult as LayerResult
    from prune.outputs.report import Measurement as Measurement
    from prune.outputs.report import PruneReport as PruneReport
    from prune.pipeline.counting import count_cost as count_cost
    from prune.pipeline.importance import as_tp_importance as as_tp_importance
    from prune.pipeline.observe import collect_units as collect_units
    from prune.pipeline.observe import following_norm as following_norm
    from prune.pipeline.provenance import file_digest as file_digest
    from prune.pipeline.run import run as run
    from prune.pipeline.selection import ScoringData as ScoringData
    from prune.pipeline.selection import class_batches as class_batches
    from prune.pipeline.selection import lowest as lowest
    from prune.pipeline.selection import score_group as score_group
    from prune.pipeline.selection import select_and_prune as select_and_prune
    from prune.pipeline.speed import SPEED_SECONDS as SPEED_SECONDS
    from prune.pipeline.speed import measure_throughput as measure_throughput
    from prune.pipeline.speed import timed_throughput as timed_throughput
    from prune.pipeline.surgery import Surgeon as Surgeon
    from prune.pipeline.surgery import channels_to_remove as channels_to_remove
    from prune.zoo.data import DataBundle as DataBundle
    from prune.zoo.data import class_images as class_images
    from prune.zoo.data import embedded_data as embedded_data
    from prune.zoo.data import load_data as load_data
    from prune.zoo.data import make_loader as make_loader
    from prune.zoo.models import create_model as create_model
    from prune.zoo.recipes import RECIPES as RECIPES
    from prune.zoo.recipes import TrainConfig as TrainConfig
    from prune.zoo.registry import list_models as list_models
    from prune.zoo.registry import model_entry as model_entry
    from prune.zoo.train_embedded import fit_embedded as fit_embedded
    from prune.zoo.train_embedded import train_variant as train_variant


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first access (then cache it here)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'prune' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
