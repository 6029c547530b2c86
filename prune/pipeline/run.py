"""The main job: load → score and prune layer by layer → fine-tune → evaluate → report."""

from __future__ import annotations

import copy
import importlib.metadata
import math
import os
import platform
import time
import warnings
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch_pruning as tp
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

import scoring
from finetune import checkpoint, ddp
from finetune.distillation import Distillation
from finetune.metrics import Evaluation, evaluate
from finetune.schedule import SCHEDULES
from finetune.train import Diverged, FinetuneConfig, finetune
from prune.config import ALLOCATIONS, DEFAULTS, MAX_LAYER_RATIO, PruneConfig, check_type
from prune.core import distributed
from prune.core.files import write_json
from prune.errors import UsageError, usage_errors
from prune.outputs.cache_file import CacheFile
from prune.outputs.checkpoint import save_pruned
from prune.outputs.export import check_export, export_onnx
from prune.outputs.outdir import Claim, claim, locked
from prune.outputs.outdir import check as check_out
from prune.outputs.report import BudgetResult, Measurement, PruneReport, StepResult, write_report
from prune.outputs.score_store import FileScoreStore, RememberingStore, ScoreStore
from prune.pipeline.budget import Plan, Planning, planned
from prune.pipeline.contract import (
    check_batch_of_one,
    check_exportable,
    check_float32_for_scoring,
    check_forward,
    check_plain_weights,
    example_input,
)
from prune.pipeline.counting import count_cost
from prune.pipeline.iterative import merged, step_counts
from prune.pipeline.provenance import inputs_fingerprint
from prune.pipeline.refit import BatchNormRefit
from prune.pipeline.scratch import reinitialise, train_recipe
from prune.pipeline.selection import ScoringData, select_and_prune
from prune.pipeline.speed import SPEED_SECONDS, device_name, measure_speedup, measure_throughput
from prune.pipeline.surgery import Surgeon, channels_to_remove
from prune.version import __version__
from prune.zoo.data import (
    DataBundle,
    balanced_subset,
    check_scoring_images,
    choose_classes,
    class_images,
    data_folders,
    load_data,
    make_loader,
    unreadable_counts,
)
from prune.zoo.models import ModelSpec, check_model_name, create_model
from prune.zoo.recipes import training_recipe
from scoring.hooks import forward_hooks, map_sizes
from scoring.model_state import model_device

PROBE_IMAGES = 4
"""Scoring images per class forwarded through the whole model to find NaN/Inf early."""


class UnreadableImages(UserWarning):
    """Some image files could not be decoded and are skipped."""


class TargetNotMet(UserWarning):
    """A speed target could not be reached; the run prunes to what was reached."""


SEED_LIMIT = 2**32
DEVICE_TYPES = ("cpu", "cuda")


def _check_range(flag: str, value: float, ok: bool, wanted: str) -> None:
    """UsageError unless `value` is finite and `ok` (its range test) holds."""
    if not (math.isfinite(value) and ok):
        raise UsageError(f"{flag} {value} is not possible; it must be {wanted}")


def _check_paths(config: PruneConfig, out: Path) -> None:
    """UsageError if `out` is, contains or lies inside a folder --data reads (in any of its forms,
    see `data_folders`), or contains the --weights file (replacing or writing `out` would destroy
    or change them)."""
    target = Path(os.path.realpath(out))
    for data in data_folders(config.data, model=config.model):
        if target == data or data in target.parents or target in data.parents:
            raise UsageError(f"--out {out} is, contains or lies inside the data folder {data} (--data "
                             f"{config.data or 'default of --model ' + config.model}); choose an --out outside it")
    if config.weights and Path(config.weights).exists():
        weights = Path(os.path.realpath(config.weights))
        if target == weights or target in weights.parents:
            raise UsageError(f"--out {out} contains the --weights file {config.weights}; choose another --out")


def validate(config: PruneConfig, out: Path | None = None) -> None:
    """Raise UsageError for settings that cannot work (and an `out` that would overwrite the
    data or weights), before anything is loaded or written."""
    if not 0.0 <= config.ratio < 1.0:
        raise UsageError(f"--ratio {config.ratio} is outside [0, 1); pass e.g. --ratio 0.5")
    _validate_budget(config)
    with usage_errors("; fix --scorer or --scorer-opt"):
        make_scorer(config)
    check_model_name(config.model)
    if config.schedule not in ("progressive", "oneshot"):
        raise UsageError(f"--schedule {config.schedule!r} is unknown; use progressive or oneshot")
    if config.rounding not in ("round", "floor-keep"):
        raise UsageError(f"--rounding {config.rounding!r} is unknown; use round or floor-keep")
    for flag, value in (("--samples-per-class", config.samples_per_class), ("--batch-size", config.batch_size)):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    if config.epochs < 0 or config.bn_recalibration < 0 or config.layer_bn_batches < 0:
        raise UsageError("--epochs, --layer-bn-batches and --bn-recalibration must be >= 0")
    _check_range("--lr", config.lr, config.lr > 0, "a finite number > 0, e.g. --lr 1e-3")
    _check_range("--momentum", config.momentum, 0 <= config.momentum < 1, "in [0, 1), e.g. --momentum 0.9")
    _check_range("--weight-decay", config.weight_decay, config.weight_decay >= 0, "a finite number >= 0, e.g. 5e-4")
    _validate_recovery(config)
    if config.train_images is not None and config.train_images < 1:
        raise UsageError(f"--train-images must be at least 1, got {config.train_images}; or leave it out for all")
    if config.classes is not None and config.classes < 1:
        raise UsageError(f"--classes must be at least 1, got {config.classes}")
    if config.input_size is not None and config.input_size < 1:
        raise UsageError(f"--input-size must be at least 1 pixel, got {config.input_size}; e.g. --input-size 224")
    if not 0 <= config.seed < SEED_LIMIT:
        raise UsageError(f"--seed {config.seed} is outside 0..{SEED_LIMIT - 1}; pass e.g. --seed 0")
    try:
        device_type = torch.device(config.device).type
    except (RuntimeError, ValueError, TypeError):
        device_type = None
    if device_type not in DEVICE_TYPES:
        raise UsageError(f"--device {config.device!r} is not supported; use cpu, cuda or cuda:N")
    if config.data == "":
        raise UsageError("--data is empty; pass an ImageFolder root or leave --data out for the embedded set")
    if out is not None:
        _check_paths(config, Path(out))


def _validate_recovery(config: PruneConfig) -> None:
    """UsageError for recovery settings that cannot work (distillation, schedules, iterative steps,
    aligned widths, training from scratch)."""
    if config.lr_schedule not in SCHEDULES:
        raise UsageError(f"--lr-schedule {config.lr_schedule!r} is unknown; use one of {', '.join(SCHEDULES)}")
    tuning = [flag for flag, on in (("--distill", config.distill), ("--lr-schedule", config.lr_schedule != "step"),
                                    ("--reinit", config.reinit)) if on]
    if tuning and not config.finetune:
        raise UsageError(f"{tuning[0]} trains the pruned network, but --no-finetune was given; drop one of them")
    if config.reinit and config.distill:
        raise UsageError("--reinit is the scratch baseline, the pruned architecture trained from fresh weights with "
                         "the model's own recipe and no teacher; --distill is not part of it: drop one of them")
    if config.reinit and config.iterative_steps > 1:
        raise UsageError("--reinit trains the pruned architecture from fresh weights, which throws away the weights "
                         "--iterative-steps fine-tunes between steps; drop one of them")
    if config.reinit and config.epochs < 1 and training_recipe(config.model) is None:
        raise UsageError("--reinit needs at least one training epoch; pass --epochs E (E >= 1)")
    _check_range("--distill-alpha", config.distill_alpha, 0 <= config.distill_alpha <= 1, "in [0, 1], e.g. 0.5")
    _check_range("--distill-temperature", config.distill_temperature, config.distill_temperature > 0,
                 "a finite number > 0, e.g. 4")
    for flag, value, least in (("--iterative-steps", config.iterative_steps, 1), ("--step-epochs", config.step_epochs, 0),
                               ("--round-to", config.round_to, 1)):
        if value < least:
            raise UsageError(f"{flag} must be at least {least}, got {value}")
    _refuse_idle_flags(config)


def _refuse_idle_flags(config: PruneConfig) -> None:
    """UsageError for a recovery setting that would change nothing: distillation settings without
    --distill, --step-epochs without iterative steps, --distill with no epoch to train."""
    idle = [flag for flag, changed in (
        ("--distill-alpha", config.distill_alpha != DEFAULTS.distill_alpha),
        ("--distill-temperature", config.distill_temperature != DEFAULTS.distill_temperature)) if changed]
    if idle and not config.distill:
        raise UsageError(f"{idle[0]} acts only with --distill; add --distill or drop {idle[0]}")
    if config.step_epochs != DEFAULTS.step_epochs and (config.iterative_steps == 1 or not config.finetune):
        raise UsageError("--step-epochs fine-tunes between steps: it acts only with --iterative-steps S (S > 1) "
                         "and without --no-finetune; drop --step-epochs or change those")
    if config.distill and not config.trains:
        raise UsageError("--distill with --epochs 0 trains nothing; pass --epochs E (E >= 1) or drop --distill")


def _validate_budget(config: PruneConfig) -> None:
    """UsageError for a target out of range, two targets, or budget settings without a target."""
    if config.target_flops is not None and config.target_speedup is not None:
        raise UsageError("--target-flops and --target-speedup were both given; pass one of them")
    if config.target_flops is not None:
        _check_range("--target-flops", config.target_flops, 0 < config.target_flops < 1,
                     "a fraction of the unpruned FLOPs in (0, 1), e.g. --target-flops 0.5")
    if config.target_speedup is not None:
        _check_range("--target-speedup", config.target_speedup, config.target_speedup > 1,
                     "a finite number > 1, e.g. --target-speedup 2")
    if config.allocation not in ALLOCATIONS:
        raise UsageError(f"--allocation {config.allocation!r} is unknown; use one of {', '.join(ALLOCATIONS)}")
    _check_range("--max-layer-ratio", config.max_layer_ratio, 0 < config.max_layer_ratio < 1,
                 "in (0, 1), e.g. --max-layer-ratio 0.9")
    if not config.has_target and (config.allocation != "uniform" or config.max_layer_ratio != MAX_LAYER_RATIO):
        raise UsageError("--allocation and --max-layer-ratio share a target between layers; "
                         "pass --target-flops F or --target-speedup S with them")


def make_scorer(config: PruneConfig) -> scoring.Scorer:
    """The configured scorer: its `--scorer-opt` options, and `--seed` if it draws anything.

    ValueError for an unknown scorer or option, a bad option value, or a seed among the options
    (the seed comes from `--seed` only, so it is in the settings once)."""
    options = dict(config.scorer_options)
    if "seed" in options:
        raise ValueError("the scorer's seed comes from --seed; pass --seed N instead of --scorer-opt seed=N")
    if "seed" in scoring.scorer_options(config.scorer):
        options["seed"] = config.seed
    return scoring.create(config.scorer, **options)


def resolve_device(name: str) -> torch.device:
    """torch.device for `--device`; a CUDA request without CUDA is a UsageError."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name} does not exist: {torch.cuda.device_count()} GPU(s) are visible; "
                         "use cuda:0 .. cuda:N-1")
    return device


@contextmanager
def _timed(timings: dict[str, float], stage: str):
    start = time.perf_counter()
    yield
    timings[stage] = round(time.perf_counter() - start, 3)


def measure(model: nn.Module, data: DataBundle, config: PruneConfig, device: torch.device, quiet: bool,
            speed_seconds: float | None = SPEED_SECONDS) -> Measurement:
    """Params, MACs, FLOPs, accuracies and img/s of `model` (the report's before/after; img/s
    timed to a budget of `speed_seconds`, or not measured (throughput None) where it is None)."""
    loader = make_loader(data.val, batch_size=config.batch_size, shuffle=False, seed=config.seed)
    ev = evaluate(model, loader, device=device, quiet=quiet)
    if ev.n == 0:
        raise UsageError(f"no val image could be decoded ({unreadable_counts(data)['val']} unreadable); replace them")
    throughput = None if speed_seconds is None else measure_throughput(
        model, input_size=data.input_size, batch_size=32, device=device, seconds=speed_seconds)
    cost = count_cost(model, input_size=data.input_size)
    return Measurement(
        params=cost.params, macs=cost.macs, flops=cost.flops, top1=ev.top1, top5=ev.top5,
        balanced_accuracy=ev.balanced_accuracy, loss=ev.loss, throughput=throughput,
    )


def _finetune(model: nn.Module, train: Dataset, config: PruneConfig, ctx: RunContext, *,
              teacher: nn.Module | None = None, epochs: int | None = None, name: str = "finetune") -> list[float]:
    """Fine-tune `epochs` (default `config.epochs`) with `config`'s schedule, distilled from
    `teacher` if given, with a checkpoint after each epoch in --out/cache/<name>.pt (rank 0
    writes it), resuming from it if present; the mean loss of every epoch.

    Under torchrun the model is wrapped in DistributedDataParallel and each rank trains on
    its DistributedSampler share of the training set.
    """
    ft = FinetuneConfig(epochs=config.epochs if epochs is None else epochs, lr=config.lr, momentum=config.momentum,
                        weight_decay=config.weight_decay, schedule=config.lr_schedule)
    file = CacheFile(ctx.out / "cache" / f"{name}.pt", checkpoint.FORMAT, resume=ctx.resume, world=ctx.world)
    sampler = ddp.sampler(train, seed=config.seed)
    loader = make_loader(train, batch_size=config.batch_size, shuffle=True, seed=config.seed, sampler=sampler)
    loss_fn = None if teacher is None else Distillation(teacher, alpha=config.distill_alpha,
                                                        temperature=config.distill_temperature)
    try:
        return finetune(ddp.wrap(model, ctx.device), loader, config=ft, device=ctx.device, quiet=ctx.quiet,
                        seed=config.seed, checkpoint=file, loss_fn=loss_fn)
    except Diverged as exc:
        raise UsageError(f"training diverged in {name} ({exc}); lower --lr (now {config.lr:g})") from None


@torch.no_grad()
def check_finite(model: nn.Module, images: torch.Tensor) -> None:
    """UsageError if any conv output or the logits of `images` [n, 3, s, s] hold NaN/Inf."""
    bad: list[str] = []
    names = {m: n for n, m in model.named_modules()}

    def hook(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        if not bad and isinstance(output, torch.Tensor) and not torch.isfinite(output).all():
            bad.append(names[module])

    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    with forward_hooks(convs, hook):
        logits = model(images.to(model_device(model)))
    if bad or not torch.isfinite(logits).all():
        where = f"layer {bad[0]}" if bad else "the output"
        raise UsageError(
            f"activations at {where} contain NaN or Inf; check the model's weights (--weights) "
            "and the input normalisation"
        )


def _evaluate_bn_reestimated(
    model: nn.Module, loader: DataLoader, refit: Callable[[], int], pruned_eval: Evaluation
) -> Evaluation:
    """Evaluation of the pruned network after `refit()` re-estimates its BatchNorm statistics
    (returning the images it used: 0 without BatchNorm, then it is `pruned_eval`). Only the
    BatchNorm buffers are saved and put back afterwards; weights are never touched."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in norms]
    try:
        if refit() == 0:
            return pruned_eval
        return evaluate(model, loader, device=model_device(model))
    finally:
        for m, state in zip(norms, saved):
            m.load_state_dict(state)


def versions() -> dict[str, str]:
    """Versions of the software that produced a report."""
    return {
        "topoprune": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_pruning": tp.__version__,
        "gudhi": importlib.metadata.version("gudhi"),  # not imported: a run that needs no persistence skips it
        "numpy": np.__version__,
    }


@dataclass(frozen=True)
class RunContext:
    """Where and how a run executes: its processes (`world`, rank 0 writes every file), the
    device, its output folder, whether it continues an earlier attempt, progress bars."""

    world: distributed.World
    device: torch.device
    out: Path
    resume: bool = False
    quiet: bool = False
    speed_seconds: float | None = SPEED_SECONDS
    """Time budget of the img/s measurements before and after (`--speed-seconds`); None: not
    measured (`prune.run(speed=False)`, `--no-speed`)."""


@dataclass(frozen=True)
class Loaded:
    """What the job works on, loaded and checked before any output is written."""

    data: DataBundle
    classes: list[int]
    model: nn.Module
    surgeon: Surgeon
    scorer: scoring.Scorer
    unreadable: int
    finetune_set: Dataset
    """What fine-tuning trains on: the train split, or its `--train-images` subset."""


def load(config: PruneConfig, device: torch.device) -> Loaded:
    """Load data and model and check every input (UsageError), writing nothing.

    Checks: the K classes exist and each has N readable scoring images, the model has a
    prunable conv, and its activations on a few scoring images are finite.
    """
    data = load_data(config.data, input_size=config.input_size, model=config.model)
    k = config.classes if config.classes is not None else min(10, len(data.classes))
    classes = choose_classes(data, k, seed=config.seed)
    unreadable = check_scoring_images(data, classes, config.samples_per_class, seed=config.seed)
    finetune_set = data.train
    if config.train_images is not None:
        finetune_set = Subset(data.train, balanced_subset(data.train_targets, config.train_images,
                                                          classes=len(data.classes)))
    model = create_model(config.model, weights=config.weights, num_classes=len(data.classes)).to(device).eval()
    check_float32_for_scoring(model)
    example = example_input(model, data.input_size, config.model, device)
    check_forward(model, example, config.model, trains=config.trains, classes=len(data.classes))
    check_plain_weights(model, config.model)
    check_batch_of_one(model, example, config.model, batch_size=config.batch_size)
    surgeon = Surgeon(model, example)
    _check_round_to(config, surgeon)
    probe = min(config.samples_per_class, PROBE_IMAGES)
    check_finite(model, torch.cat([class_images(data, c, probe, seed=config.seed) for c in classes]))
    scorer = make_scorer(config)
    with usage_errors():
        scorer.check(model, classes=len(classes), samples_per_class=config.samples_per_class)
        scorer.check_maps(map_sizes(model, example, [name for group in surgeon.groups for name in group.names]))
    return Loaded(data, classes, model, surgeon, scorer, unreadable, finetune_set)


def _check_round_to(config: PruneConfig, surgeon: Surgeon) -> None:
    """UsageError if `--round-to` leaves every group whole at the run's ratio (with a target: at
    the largest per-layer ratio it may choose, --max-layer-ratio), instead of a run that prunes nothing."""
    if config.round_to == 1 or not surgeon.groups:
        return
    ratio, flag = (config.max_layer_ratio, "--max-layer-ratio") if config.has_target else (config.ratio, "--ratio")
    if ratio > 0 and not any(channels_to_remove(g.num_channels, ratio, rule=config.rounding, blocks=g.blocks,
                                                round_to=config.round_to) for g in surgeon.groups):
        widest = max(g.num_channels for g in surgeon.groups)
        raise UsageError(f"--round-to {config.round_to} leaves every layer of model {config.model} whole at {flag} "
                         f"{ratio:g} (the widest has {widest} channels): nothing would be pruned; pass a smaller "
                         f"--round-to or a larger {flag}")


def _claim(out: Path, config: PruneConfig, data: DataBundle, overwrite: bool, world: distributed.World,
           stack: ExitStack) -> tuple[Claim | None, bool]:
    """Rank 0 locks and claims `out` (the lock is released when `stack` closes); every rank
    learns whether to resume (or raises rank 0's error)."""

    def lock_and_claim() -> Claim:
        inputs = inputs_fingerprint(config, data)
        stack.enter_context(locked(out))
        return claim(out, config.fingerprint(), overwrite=overwrite, processes=world.size, inputs=inputs)

    claimed = distributed.main_only(lock_and_claim, world)
    return claimed, bool(world.broadcast(claimed is not None and claimed.resume))


def run(config: PruneConfig, *, out: str | Path, overwrite: bool = False, quiet: bool = False,
        export: str | None = None, speed: bool = True, speed_seconds: float = SPEED_SECONDS) -> PruneReport | None:
    """Run the main job and write its outputs into `out`; returns the report (report.json is its `as_dict()`).

    Bad input raises UsageError before `out` is touched. Any failure found later (NaN units in
    a deeper layer, a full disk, a bug) is raised after `out` is put back as it was before
    (a run `overwrite` was replacing is restored; a folder that did not exist is removed); an
    interruption (KeyboardInterrupt, or another torchrun process ending: `PeerLost`) keeps what
    resume needs. Started by torchrun, every process runs this: scoring is split by class,
    fine-tuning uses DDP, rank 0 writes every file and returns the report (other ranks return
    None). `export="onnx"` also writes `out/model.onnx`; `speed=False` skips the img/s
    measurement (report's throughput None; not with a speed target), `speed_seconds` bounds it
    (`measure_throughput`). These are output options, not settings that decide the result.
    """
    _check_arguments(config, out, overwrite=overwrite, quiet=quiet, export=export, speed=speed,
                     speed_seconds=speed_seconds)
    if not speed and config.target_speedup is not None:
        raise UsageError("--target-speedup measures img/s; leave out --no-speed")
    validate(config, out)
    check_export(export)
    device = resolve_device(config.device)
    launched = distributed.env_world()
    if launched.is_main:  # refuse a foreign --out before loading anything
        check_out(Path(out), config.fingerprint(), overwrite=overwrite, processes=launched.size)
    joined = launched.active and not torch.distributed.is_initialized()
    world = distributed.init(device)
    try:
        return _run(config, Path(out), overwrite, quiet or not world.is_main, world,
                    distributed.local_device(device, world), export, speed_seconds if speed else None)
    finally:
        if joined:
            distributed.shutdown()


def _check_arguments(config: object, out: object, **flags: object) -> None:
    """UsageError unless `config` is a PruneConfig, `out` a path, `overwrite`/`quiet` bools and `export` None or str."""
    if not isinstance(config, PruneConfig):
        raise UsageError(f"prune.run takes a PruneConfig, not a {type(config).__name__}; "
                         "pass prune.PruneConfig(...) (keywords only)")
    if not isinstance(out, (str, os.PathLike)) or not os.fspath(out):
        raise UsageError(f"prune.run out={out!r} must be a folder path (str or pathlib.Path)")
    check_type("overwrite", flags["overwrite"], ("bool",), "prune.run")
    check_type("quiet", flags["quiet"], ("bool",), "prune.run")
    check_type("export", flags["export"], ("str", "None"), "prune.run")
    check_type("speed", flags["speed"], ("bool",), "prune.run")
    seconds = flags["speed_seconds"]
    check_type("speed_seconds", seconds, ("float",), "prune.run")
    try:
        finite = math.isfinite(seconds)
    except OverflowError:  # an int too large for a float
        finite = False
    if not (finite and seconds >= 0):
        raise UsageError(f"--speed-seconds {seconds} must be a finite number of seconds >= 0, e.g. --speed-seconds 3")


def _run(config: PruneConfig, out: Path, overwrite: bool, quiet: bool, world: distributed.World,
         device: torch.device, export: str | None = None, speed_seconds: float | None = SPEED_SECONDS
         ) -> PruneReport | None:
    timings: dict[str, float] = {}
    torch.manual_seed(config.seed)
    with _timed(timings, "load"):
        loaded = load(config, device)
    counts = unreadable_counts(loaded.data)
    if (loaded.unreadable or any(counts.values())) and world.is_main:
        warnings.warn(f"skipping unreadable image files: {counts['train']} in train/ ({loaded.unreadable} among the "
                      f"scoring images), {counts['val']} in val/; remove or replace them", UnreadableImages, stacklevel=2)
    if export == "onnx":  # a model the exporter refuses fails now (on every rank), not after the run
        distributed.main_only(lambda: check_exportable(
            loaded.model, input_size=loaded.data.input_size, name=config.model, device=device), world)
    with ExitStack() as stack:
        claimed = None
        try:
            claimed, resume = _claim(out, config, loaded.data, overwrite, world, stack)
            ctx = RunContext(world=world, device=device, out=out, resume=resume, quiet=quiet,
                             speed_seconds=speed_seconds)
            report = _job(config, loaded, ctx, timings, export)
        except Exception as exc:  # any failure puts `out` back as it was; an interruption keeps it for resume
            if (lost := distributed.peer_lost(exc, world, out)) is not None:
                raise lost from None  # a process of the job ended: an interruption, not a bug
            if claimed is not None:
                claimed.rollback()
            raise
        if claimed is not None:
            claimed.commit()
    _more_unreadable(loaded, counts, world)
    return report


def _more_unreadable(loaded: Loaded, warned: dict[str, int], world: distributed.World) -> None:
    """Warn with the final counts where decoding the images (not only their headers, as loading
    checks) found more unreadable files than the first warning named."""
    counts = unreadable_counts(loaded.data)
    if counts != warned and world.is_main:
        warnings.warn(f"decoding found more unreadable image files: {counts['train']} in train/ and {counts['val']} in "
                      "val/ were skipped (report.json unreadable_images); remove or replace them", UnreadableImages,
                      stacklevel=3)


def _job(config: PruneConfig, loaded: Loaded, ctx: RunContext, timings: dict[str, float],
         export: str | None = None) -> PruneReport | None:
    """measure → select and prune → fine-tune → measure → write (files by rank 0 only)."""
    main = ctx.world.is_main
    with _timed(timings, "evaluate_before"):
        before = measure(loaded.model, loaded.data, config, ctx.device, ctx.quiet, ctx.speed_seconds) if main else None
    plan, store = None, RememberingStore(FileScoreStore(ctx.out, resume=ctx.resume, world=ctx.world))
    if config.has_target:
        with _timed(timings, "plan"):
            plan = _plan(config, loaded, ctx, store)
    unpruned = copy.deepcopy(loaded.model) if main and config.target_speedup is not None else None
    teacher = copy.deepcopy(loaded.model) if config.distill else None  # the network as loaded
    with _timed(timings, "select_and_prune"):
        if config.iterative_steps == 1:
            decisions, steps = _select_and_prune(config, loaded, ctx, store, plan), []
        else:
            decisions, steps = _prune_iteratively(config, loaded, ctx, store, plan, teacher)
    with _timed(timings, "evaluate_pruned"):
        pruned_eval, pruned_bn_eval = _evaluate_pruned(config, loaded, ctx) if main else (None, None)
    if config.bn_recalibration > 0:
        with _timed(timings, "bn_recalibration"):
            _refit_batchnorm(config, loaded, ctx, config.bn_recalibration)
    losses: list[float] = []
    if config.reinit:
        with _timed(timings, "scratch"):
            losses = _train_from_scratch(config, loaded, ctx)
    elif config.finetune and config.epochs > 0:
        with _timed(timings, "finetune"):
            losses = _finetune(loaded.model, loaded.finetune_set, config, ctx, teacher=teacher)
    loaded.model.eval()
    if not main:
        return None
    with _timed(timings, "evaluate_after"):
        after = measure(loaded.model, loaded.data, config, ctx.device, ctx.quiet, ctx.speed_seconds)
    final_speedup = None if unpruned is None else measure_speedup(
        loaded.model, unpruned, input_size=loaded.data.input_size, device=ctx.device, seconds=ctx.speed_seconds)
    report = PruneReport(
        settings=config,
        processes=ctx.world.size,
        classes_used=tuple(loaded.data.classes[c] for c in loaded.classes),
        unreadable_scoring_images=loaded.unreadable,
        unreadable_images=unreadable_counts(loaded.data),
        before=before,
        pruned_before_finetune=pruned_eval,
        pruned_bn_reestimated=pruned_bn_eval,
        after=after,
        finetune_losses=tuple(losses),
        layers=tuple(d.result() for d in decisions),
        timings=dict(timings),
        versions=versions(),
        device=device_name(ctx.device),
        budget=None if plan is None else _budget_result(config, plan, before, after, final_speedup),
        steps=tuple(steps),
    )
    _write_outputs(config, loaded, ctx, decisions, report, export)
    return report


def _refit_batchnorm(config: PruneConfig, loaded: Loaded, ctx: RunContext, batches: int,
                     model: nn.Module | None = None) -> int:
    """Re-estimate the BatchNorm statistics of `model` (default: the run's) on `batches` training batches; images used."""
    return _batchnorm_refit(config, loaded, ctx, batches, model)()


def _batchnorm_refit(config: PruneConfig, loaded: Loaded, ctx: RunContext, batches: int,
                     model: nn.Module | None = None) -> BatchNormRefit:
    """The re-estimation of `model`'s (default: the run's) BatchNorm statistics on the first `batches`
    training batches of a seeded loader, the same batches at every refit."""
    loader = partial(make_loader, loaded.data.train, batch_size=config.batch_size, shuffle=True, seed=config.seed)
    return BatchNormRefit(loaded.model if model is None else model, loader, batches, ctx.device)


def _scoring_data(config: PruneConfig, loaded: Loaded) -> ScoringData:
    return ScoringData(data=loaded.data, classes=loaded.classes, per_class=config.samples_per_class, seed=config.seed)


def _plan(config: PruneConfig, loaded: Loaded, ctx: RunContext, store: ScoreStore) -> Plan:
    """The per-layer ratios of the run's target (kept in --out/cache; a target not met is warned once)."""
    planning = Planning(config=config, surgeon=loaded.surgeon, scorer=loaded.scorer,
                        source=_scoring_data(config, loaded), data=loaded.data, store=store, quiet=ctx.quiet, world=ctx.world,
                        refit=_copy_refit(config, loaded, ctx))
    plan = planned(planning, ctx.out, resume=ctx.resume, world=ctx.world)
    if plan.note and ctx.world.is_main:
        warnings.warn(plan.note, TargetNotMet, stacklevel=2)
    return plan


def _copy_refit(config: PruneConfig, loaded: Loaded, ctx: RunContext) -> Callable[[nn.Module], int] | None:
    """What the progressive schedule does after a layer's surgery (`--layer-bn-batches`), for any model."""
    return partial(_refit_batchnorm, config, loaded, ctx, config.layer_bn_batches) if config.layer_bn_batches else None


def _budget_result(config: PruneConfig, plan: Plan, before: Measurement, after: Measurement,
                   final_speedup: float | None) -> BudgetResult:
    """The report's budget (`final_speedup`: the final network against an unpruned copy, speed target only)."""
    return BudgetResult(
        allocation=config.allocation, target_flops=config.target_flops, target_speedup=config.target_speedup,
        max_layer_ratio=config.max_layer_ratio, ratios=plan.ratios, flops_target=plan.flops_target,
        achieved_flops=after.flops / before.flops, schedule=plan.schedule, speedup=plan.speedup, note=plan.note,
        final_speedup=final_speedup,
    )


def _select_and_prune(config: PruneConfig, loaded: Loaded, ctx: RunContext, store: ScoreStore,
                      plan: Plan | None = None, counts: list[int] | None = None) -> list:
    """Score and prune every layer, shallow → deep, with the per-layer scores kept in --out/cache:
    at `config.ratio`, or at the `plan`'s ratios and schedule (or `counts` channels per layer).
    A scorer that reads only weights gets no scoring images: no forward runs for it (and the
    layers' `scoring_top1` diagnostic is None), and only the last BatchNorm refit runs."""
    source = _scoring_data(config, loaded) if loaded.scorer.info.needs_data else None
    refit = None
    if config.layer_bn_batches > 0:
        refit = _batchnorm_refit(config, loaded, ctx, config.layer_bn_batches)
    ratio, schedule = (config.ratio, config.schedule) if plan is None else (plan.ratios, plan.schedule)
    return select_and_prune(
        loaded.surgeon, loaded.scorer, source, ratio=ratio, schedule=schedule,
        rounding=config.rounding, round_to=config.round_to, counts=counts, store=store,
        quiet=ctx.quiet, world=ctx.world, refit=refit, last_refit_only=source is None,
    )


def _prune_iteratively(config: PruneConfig, loaded: Loaded, ctx: RunContext, store: ScoreStore, plan: Plan | None,
                       teacher: nn.Module | None) -> tuple[list, list[StepResult]]:
    """Reach the ratio (or the plan's ratios) in `config.iterative_steps` equal steps
    (`prune.pipeline.iterative`), each scored on the network the previous step left and, but
    the last, fine-tuned `config.step_epochs` epochs (checkpoint --out/cache/finetune-step<s>.pt);
    the merged decisions and each step's record (val top-1 on rank 0; 0.0 elsewhere)."""
    groups = loaded.surgeon.groups
    original = [g.num_channels for g in groups]
    ratios = [config.ratio] * len(groups) if plan is None else list(plan.ratios)
    steps_total, per_step, steps = config.iterative_steps, [], []
    for s in range(1, steps_total + 1):
        counts = step_counts(groups, original, ratios, s, steps_total, rounding=config.rounding,
                             round_to=config.round_to)
        step_store = store if s == 1 else FileScoreStore(ctx.out, resume=ctx.resume, world=ctx.world, prefix=f"step{s}-")
        per_step.append(_select_and_prune(config, loaded, ctx, step_store, plan, counts))
        pruned_top1, tuned_top1, losses = _val_top1(config, loaded, ctx), None, []
        if s < steps_total and config.finetune and config.step_epochs > 0:
            losses = _finetune(loaded.model, loaded.finetune_set, config, ctx, teacher=teacher,
                               epochs=config.step_epochs, name=f"finetune-step{s}")
            loaded.model.eval()
            distributed.same_state(loaded.model, ctx.world)  # the next step scores the same network everywhere
            tuned_top1 = _val_top1(config, loaded, ctx)
        steps.append(StepResult(step=s, channels=tuple(g.num_channels for g in groups), pruned_top1=pruned_top1,
                                finetuned_top1=tuned_top1, losses=tuple(losses)))
    return merged(per_step), steps


def _train_from_scratch(config: PruneConfig, loaded: Loaded, ctx: RunContext) -> list[float]:
    """`--reinit`: fresh weights for the pruned architecture, trained with the shipped model's
    recipe, or else with the fine-tuning settings (`prune.pipeline.scratch`); each epoch's loss."""
    reinitialise(loaded.model, seed=config.seed)
    if training_recipe(config.model) is None:
        return _finetune(loaded.model, loaded.finetune_set, config, ctx, name="scratch")
    return train_recipe(loaded.model, loaded.finetune_set, config.model, seed=config.seed, device=ctx.device,
                        quiet=ctx.quiet)


def _val_top1(config: PruneConfig, loaded: Loaded, ctx: RunContext) -> float:
    """Top-1 of the run's model on the val split (rank 0; 0.0 on the other ranks)."""
    if not ctx.world.is_main:
        return 0.0
    loader = make_loader(loaded.data.val, batch_size=config.batch_size, shuffle=False, seed=0)
    return evaluate(loaded.model, loader, device=ctx.device).top1


def _evaluate_pruned(config: PruneConfig, loaded: Loaded, ctx: RunContext) -> tuple[Evaluation, Evaluation]:
    """The pruned network on the val split before fine-tuning: as pruned, and with BatchNorm re-estimated."""
    loader = make_loader(loaded.data.val, batch_size=config.batch_size, shuffle=False, seed=0)
    pruned_eval = evaluate(loaded.model, loader, device=ctx.device)
    batches = max(config.bn_recalibration, config.layer_bn_batches, 1)
    refit = partial(_refit_batchnorm, config, loaded, ctx, batches)
    return pruned_eval, _evaluate_bn_reestimated(loaded.model, loader, refit, pruned_eval)


def _write_outputs(config: PruneConfig, loaded: Loaded, ctx: RunContext, decisions: list, report: PruneReport,
                   export: str | None) -> None:
    """model.pt, model.onnx (`export`), scores.json, report.json and report.md in --out (rank 0)."""
    model, data = loaded.model, loaded.data
    spec = ModelSpec(config.model, len(data.classes))
    save_pruned(ctx.out / "model.pt", model, spec=spec, history=loaded.surgeon.history(), input_size=data.input_size)
    if export == "onnx":
        export_onnx(model, ctx.out / "model.onnx", input_size=data.input_size)
    write_json(ctx.out / "scores.json", {d.name: [float(s) for s in d.scores] for d in decisions})
    write_report(ctx.out, report)
