"""The main job: load → score and prune layer by layer → fine-tune → evaluate → report."""

from __future__ import annotations

import platform
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

import scoring
from finetune.metrics import evaluate
from finetune.train import FinetuneConfig, finetune
from prune import __version__
from prune.checkpoint import read_checkpoint, save_pruned
from prune.config import PruneConfig
from prune.counting import count_cost
from prune.data import DataBundle, choose_classes, load_data, make_loader
from prune.errors import UsageError
from prune.files import torch_save, write_json
from prune.models import ModelSpec, load_model
from prune.outdir import claim
from prune.report import write_report
from prune.selection import LayerDecision, ScoringData, select_and_prune
from prune.speed import device_name, measure_throughput
from prune.surgery import PrunableGroup, Surgeon

FINETUNE_FORMAT = "topoprune/finetune-state/v1"
SCORES_FORMAT = "topoprune/scores/v1"


def validate(config: PruneConfig) -> None:
    """Raise UsageError for settings that cannot work, before anything is loaded."""
    if not 0.0 <= config.ratio < 1.0:
        raise UsageError(f"--ratio {config.ratio} is outside [0, 1); pass e.g. --ratio 0.5")
    try:
        scoring.scorer_info(config.scorer)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if config.schedule not in ("progressive", "oneshot"):
        raise UsageError(f"--schedule {config.schedule!r} is unknown; use progressive or oneshot")
    for flag, value in (("--samples-per-class", config.samples_per_class), ("--batch-size", config.batch_size)):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    if config.epochs < 0 or config.lr <= 0:
        raise UsageError("--epochs must be >= 0 and --lr > 0")


def resolve_device(name: str) -> torch.device:
    """torch.device for `--device`; a CUDA request without CUDA is a UsageError."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return device


@contextmanager
def _timed(timings: dict[str, float], stage: str):
    start = time.perf_counter()
    yield
    timings[stage] = round(time.perf_counter() - start, 3)


def measure(model: nn.Module, data: DataBundle, config: PruneConfig, device: torch.device, quiet: bool) -> dict:
    """Params, MACs, FLOPs, accuracies and img/s of `model` (the report's before/after)."""
    loader = make_loader(data.val, batch_size=config.batch_size, shuffle=False, seed=config.seed)
    ev = evaluate(model, loader, device=device, quiet=quiet)
    speed = measure_throughput(model, input_size=data.input_size, batch_size=32, device=device)
    return {
        **count_cost(model, input_size=data.input_size).as_dict(),
        "top1": ev.top1,
        "top5": ev.top5,
        "balanced_accuracy": ev.balanced_accuracy,
        "loss": ev.loss,
        "img_per_s": speed.img_per_s,
        "device": speed.device,
        "throughput": speed.as_dict(),
    }


def _score_cache(out: Path, resume: bool):
    """Per-layer score files in `out/cache`: reused on resume, written after each layer."""

    def cached(i: int, group: PrunableGroup, compute) -> torch.Tensor:
        path = out / "cache" / f"scores-{i:03d}.pt"
        if resume and path.exists():
            blob = read_checkpoint(path, SCORES_FORMAT)
            if blob["layer"] == group.name:
                return blob["scores"]
        scores = compute()
        torch_save(path, {"format": SCORES_FORMAT, "layer": group.name, "scores": scores})
        return scores

    return cached


def _finetune(model, data, config, device, out: Path, resume: bool, quiet: bool) -> list[float]:
    """Fine-tune with a checkpoint after each epoch; resume from it if present."""
    ft = FinetuneConfig(epochs=config.epochs, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    optimizer = torch.optim.SGD(model.parameters(), lr=ft.lr, momentum=ft.momentum, weight_decay=ft.weight_decay)
    path = out / "cache" / "finetune.pt"
    start, losses = 0, []
    if resume and path.exists():
        state = read_checkpoint(path, FINETUNE_FORMAT)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, losses = int(state["epoch"]) + 1, list(state["losses"])

    def checkpoint(epoch: int, opt: torch.optim.Optimizer, loss: float) -> None:
        losses.append(loss)
        torch_save(
            path,
            {"format": FINETUNE_FORMAT, "epoch": epoch, "losses": losses, "model": model.state_dict(), "optimizer": opt.state_dict()},
        )

    loader = make_loader(data.train, batch_size=config.batch_size, shuffle=True, seed=config.seed)
    finetune(model, loader, config=ft, device=device, quiet=quiet, start_epoch=start, optimizer=optimizer,
             on_epoch_end=checkpoint, seed=config.seed)
    return losses


def versions() -> dict[str, str]:
    """Versions of the software that produced a report."""
    import fvcore  # noqa: F401
    import gudhi

    return {
        "topoprune": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_pruning": tp.__version__,
        "gudhi": gudhi.__version__,
        "numpy": np.__version__,
    }


def run(config: PruneConfig, *, out: Path, overwrite: bool = False, quiet: bool = False) -> dict:
    """Run the main job and write its outputs into `out`; returns the report dict."""
    validate(config)
    out = Path(out)
    timings: dict[str, float] = {}
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    with _timed(timings, "load"):
        data = load_data(config.data, input_size=config.input_size)
        k = config.classes if config.classes is not None else min(10, len(data.classes))
        classes = choose_classes(data, k, seed=config.seed)
        model = load_model(config.model, weights=config.weights, num_classes=len(data.classes)).to(device).eval()
        example = torch.zeros(1, 3, data.input_size, data.input_size, device=device)
        surgeon = Surgeon(model, example)
        scorer = scoring.create(config.scorer)
    resume = claim(out, config.fingerprint(), overwrite=overwrite)
    with _timed(timings, "evaluate_before"):
        before = measure(model, data, config, device, quiet)
    source = ScoringData(data=data, classes=classes, per_class=config.samples_per_class, seed=config.seed)
    with _timed(timings, "select_and_prune"):
        decisions = select_and_prune(
            surgeon, scorer, source, ratio=config.ratio, schedule=config.schedule, rounding=config.rounding,
            cache=_score_cache(out, resume), quiet=quiet,
        )
    with _timed(timings, "evaluate_pruned"):
        pruned_eval = evaluate(model, make_loader(data.val, batch_size=config.batch_size, shuffle=False, seed=0), device=device)
    losses: list[float] = []
    if config.finetune and config.epochs > 0:
        with _timed(timings, "finetune"):
            losses = _finetune(model, data, config, device, out, resume, quiet)
    model.eval()
    with _timed(timings, "evaluate_after"):
        after = measure(model, data, config, device, quiet)
    spec = ModelSpec(config.model, len(data.classes))
    save_pruned(out / "model.pt", model, spec=spec, history=surgeon.history(), input_size=data.input_size)
    write_json(out / "scores.json", {d.name: [float(s) for s in d.scores] for d in decisions})
    report = {
        "settings": config.as_dict(),
        "classes_used": [data.classes[c] for c in classes],
        "before": before,
        "pruned_before_finetune": pruned_eval.as_dict(),
        "after": after,
        "finetune_losses": losses,
        "layers": [d.as_dict() for d in decisions],
        "timings": timings,
        "versions": versions(),
        "device": device_name(device),
    }
    write_report(out, report)
    return report
