"""`python -m prune`: prune a CNN's channels layer by layer and report what it cost and kept."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import io
import os
import sys
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr
from pathlib import Path
from typing import TYPE_CHECKING

import scoring
from finetune.schedule import SCHEDULES
from prune.config import ALLOCATIONS, PruneConfig
from prune.errors import UsageError, exit_code, one_line, usage_errors
from prune.pipeline.speed import SPEED_SECONDS

if TYPE_CHECKING:
    from prune.outputs.report import PruneReport

DEFAULTS = PruneConfig()


def _scorer_help() -> str:
    return "; ".join(f"{n}: {scoring.scorer_info(n).description}" for n in scoring.list_scorers())


class OneLineParser(argparse.ArgumentParser):
    """ArgumentParser whose errors raise UsageError (one line, exit 2) instead of printing usage."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message}; see python -m prune --help")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m prune",
        description="Score every conv channel (unit), remove the lowest-scoring ones layer by layer "
        "(shallow to deep) with torch-pruning, fine-tune, and report params, FLOPs, accuracy and speed. "
        "With no arguments it runs on the embedded shapes data set and model (no download).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a = p.add_argument
    a("--model", default=DEFAULTS.model, help="a name of prune.list_models(): 'embedded', 'embedded-plain', "
      "'fashion', 'fashion-plain', 'fashion-resnet', a torchvision name (vgg16, resnet34, ...), timm:<name>, "
      "or one a module of yours registers (--import)")
    a("--import", dest="imports", action="append", default=[], metavar="MODULE",
      help="import MODULE first (repeatable): a module of yours that registers models (register_model, "
      "register_family) or scorers (scoring.register), e.g. --import mynet for ./mynet.py")
    a("--weights", default=None, help="checkpoint path (a state_dict, or a training script's checkpoint: docs/your-model.md) or "
      "torchvision weights name (IMAGENET1K_V1); "
      "default: the shipped weights for the shipped models (embedded, embedded-plain, fashion, "
      "fashion-plain, fashion-resnet), random init otherwise")
    a("--data", default=None, help="ImageFolder root with train/ and val/ class folders; default: the model's own data "
      "(the generated shapes set; Fashion-MNIST for the fashion models)")
    a("--ratio", type=float, default=argparse.SUPPRESS,
      help=f"fraction of channels removed at each prunable conv, in [0, 1) (default {DEFAULTS.ratio}; "
      "not with a target)")
    a("--target-flops", type=float, default=None, metavar="F",
      help="instead of --ratio: keep this fraction of the unpruned FLOPs, in (0, 1), with per-layer ratios "
      "chosen by --allocation")
    a("--target-speedup", type=float, default=None, metavar="S",
      help="instead of --ratio: be S times faster (img/s on --device, pruned vs unpruned measured in this "
      "process, within 5%%), per-layer ratios chosen by --allocation")
    a("--allocation", choices=ALLOCATIONS, default=DEFAULTS.allocation,
      help="how a target is shared between layers: uniform (one ratio, by bisection), global (channels ranked "
      "across layers by normalised scores, one-shot), sensitivity (per-layer ratios with the least held-out "
      "loss increase; curves in --out)")
    a("--max-layer-ratio", type=float, default=DEFAULTS.max_layer_ratio, metavar="R",
      help="with a target: the largest fraction of one layer's channels removed (at least one is kept)")
    a("--scorer", default=DEFAULTS.scorer, help=f"channel scorer (higher = keep). {_scorer_help()}")
    a("--scorer-opt", action="append", default=[], metavar="KEY=VALUE",
      help="scorer option, repeatable (e.g. convention=authors, p=0.1 for entropy); the seed comes from --seed")
    a("--classes", type=int, default=None, metavar="K", help="classes whose images score the units (default: min(10, all))")
    a("--samples-per-class", type=int, default=DEFAULTS.samples_per_class, metavar="N", help="training images per class for scoring")
    a("--schedule", choices=("progressive", "oneshot"), default=DEFAULTS.schedule,
      help="progressive: score each layer on the net already pruned above it; oneshot: score all on the original net")
    a("--rounding", choices=("round", "floor-keep"), default=DEFAULTS.rounding,
      help="channels removed per layer: round(ratio*C), or keep floor((1-ratio)*C) as the paper's Table 12")
    a("--layer-bn-batches", type=int, default=DEFAULTS.layer_bn_batches, metavar="B",
      help="progressive schedule: after each layer's surgery, re-estimate BatchNorm statistics on B training "
      "batches before the next layer is scored (0: off; no effect on models without BatchNorm; a scorer that "
      "reads only weights gets the last one only, the one that shapes the final network)")
    a("--bn-recalibration", type=int, default=DEFAULTS.bn_recalibration, metavar="BATCHES",
      help="after pruning, re-estimate BatchNorm statistics on this many training batches (0: off, as the paper)")
    a("--epochs", type=int, default=argparse.SUPPRESS,
      help=f"fine-tuning epochs (default {DEFAULTS.epochs}; with --reinit, a shipped model's own training recipe)")
    a("--lr-schedule", choices=SCHEDULES, default=DEFAULTS.lr_schedule,
      help="fine-tuning learning rate: step (lr ÷10 after each epoch, the paper's) or cosine (linear warm-up over "
      "the first 5%% of the steps, then cosine to 0)")
    a("--distill", action="store_true",
      help="fine-tune with the unpruned network as teacher: (1-α)·CE + α·T²·KL(teacher ‖ student) at temperature T")
    a("--distill-alpha", type=float, default=DEFAULTS.distill_alpha, metavar="α",
      help="weight of the teacher's soft targets, in [0, 1]")
    a("--distill-temperature", type=float, default=DEFAULTS.distill_temperature, metavar="T",
      help="softmax temperature of the distillation, > 0")
    a("--iterative-steps", type=int, default=DEFAULTS.iterative_steps, metavar="S",
      help="reach the ratio (or target) in S equal steps, each scoring the network the last one left and "
      "fine-tuned --step-epochs before the next")
    a("--step-epochs", type=int, default=DEFAULTS.step_epochs, metavar="E",
      help="fine-tuning epochs after each iterative step but the last")
    a("--round-to", type=int, default=DEFAULTS.round_to, metavar="N",
      help="every pruned layer keeps a multiple of N channels (at least N; the nearest multiple), as "
      "torch-pruning's round_to; budgets count the rounded network")
    a("--reinit", action="store_true",
      help="train the pruned architecture from fresh weights instead of fine-tuning it (Scratch-E): a shipped "
      "model with its own training recipe, any other with --epochs, --lr and --lr-schedule")
    a("--lr", type=float, default=DEFAULTS.lr, help="initial SGD learning rate for fine-tuning")
    a("--momentum", type=float, default=DEFAULTS.momentum, help="SGD momentum")
    a("--weight-decay", type=float, default=DEFAULTS.weight_decay, help="SGD weight decay")
    a("--no-finetune", action="store_true", help="skip fine-tuning")
    a("--train-images", type=int, default=None, metavar="N",
      help="fine-tune on a fixed, class-balanced subset of N training images, the same whatever --seed "
      "(default: the whole train split)")
    a("--batch-size", type=int, default=DEFAULTS.batch_size, help="batch size for fine-tuning and evaluation")
    a("--input-size", type=int, default=None,
      help="image side in pixels (default: the model's, from its registry entry: 32 embedded, 224 vgg16, ...; "
      "the generated embedded data stays 32 unless this is given)")
    a("--device", default=DEFAULTS.device, help="cpu, cuda or cuda:N")
    a("--seed", type=int, default=DEFAULTS.seed, help="seed for class/image choice, scorers and fine-tuning")
    a("--out", type=_user_path, default=None, help="output folder (default: runs/<model>-<scorer>-r<ratio>, with a budget -flops<F>-<allocation> "
      "or -speedup<S>-<allocation> in place of -r<ratio>; a "
      "leading ~ is the home folder, also where no shell expanded it, as in --out=~/runs/x)")
    a("--export", choices=("onnx",), default=None,
      help="also write the pruned model as <out>/model.onnx (opset 17, dynamic batch; needs pip install \"topoprune[export]\")")
    a("--overwrite", action="store_true", help="replace an --out folder that holds a different run")
    a("--no-speed", action="store_true",
      help="skip the img/s measurement before and after (report.json's img_per_s is null); not with --target-speedup")
    a("--speed-seconds", type=float, default=SPEED_SECONDS, metavar="S",
      help="time budget of the img/s measurements before and after (and of the final speed-up check of "
      "--target-speedup): a warm-up, then timed windows of about 20 ms (at least one batch; at least 3, "
      "at most 10 windows) until S seconds have passed; report.json holds their median and spread")
    a("--quiet", action="store_true", help="no progress bars")
    return p


def scorer_options(scorer: str, pairs: list[str]) -> tuple[tuple[str, object], ...]:
    """`--scorer-opt KEY=VALUE` pairs → sorted (key, typed value) pairs; UsageError if one is bad."""
    if not pairs:
        return ()
    with usage_errors("; see python -m prune --help"):
        options = scoring.parse_options(scorer, pairs)
    return tuple(sorted(options.items()))


def config_from_args(args: argparse.Namespace) -> PruneConfig:
    """The PruneConfig of parsed flags; `--data` is normalised (`d/` and `./d` are `d`)."""
    data = os.path.normpath(args.data) if args.data else args.data
    ratio = getattr(args, "ratio", None)  # absent unless given
    if ratio is not None and (args.target_flops is not None or args.target_speedup is not None):
        raise UsageError("--ratio and a target (--target-flops / --target-speedup) were both given; pass one of them")
    return PruneConfig(
        model=args.model, weights=args.weights, data=data,
        ratio=DEFAULTS.ratio if ratio is None else ratio, target_flops=args.target_flops,
        target_speedup=args.target_speedup, allocation=args.allocation, max_layer_ratio=args.max_layer_ratio,
        scorer=args.scorer,
        scorer_options=scorer_options(args.scorer, args.scorer_opt), classes=args.classes,
        samples_per_class=args.samples_per_class, schedule=args.schedule, rounding=args.rounding,
        layer_bn_batches=args.layer_bn_batches, bn_recalibration=args.bn_recalibration,
        finetune=not args.no_finetune, epochs=_epochs(args), train_images=args.train_images, lr=args.lr,
        lr_schedule=args.lr_schedule, distill=args.distill, distill_alpha=args.distill_alpha,
        distill_temperature=args.distill_temperature, iterative_steps=args.iterative_steps,
        step_epochs=args.step_epochs, round_to=args.round_to, reinit=args.reinit,
        momentum=args.momentum, weight_decay=args.weight_decay, batch_size=args.batch_size,
        input_size=args.input_size, device=args.device, seed=args.seed,
    )


def _epochs(args: argparse.Namespace) -> int:
    """--epochs, or its default; UsageError for --reinit on a model without a training recipe and no --epochs."""
    from prune.zoo.recipes import training_recipe

    epochs = getattr(args, "epochs", None)  # absent unless given
    recipe = training_recipe(args.model) if args.reinit else None
    if args.reinit and not args.no_finetune and epochs is None and recipe is None:  # with it: validate's refusal
        raise UsageError(f"--reinit trains the pruned {args.model} from fresh weights, and it has no shipped training "
                         "recipe; pass the training's --epochs E (with --lr and --lr-schedule cosine)")
    if recipe is not None and epochs is not None:
        raise UsageError(f"--reinit trains {args.model} with its own recipe ({recipe.epochs} epochs); drop --epochs")
    return DEFAULTS.epochs if epochs is None else epochs


def _user_path(text: str) -> Path:
    """`text` as a path, a leading ~ or ~user expanded (a shell leaves `--out=~/x` as it is)."""
    return Path(text).expanduser()


def default_out(config: PruneConfig) -> Path:
    """runs/<model>-<scorer>[-<option>=<value>...]-r<ratio>: scorer options get their own folder;
    a target replaces -r<ratio> by -flops<F>-<allocation> or -speedup<S>-<allocation>."""
    model = config.model.replace(":", "-").replace("/", "-")
    options = "".join(f"-{k}={v}" for k, v in config.scorer_options)
    return Path("runs") / f"{model}-{config.scorer}{options}-{_budget_name(config)}"


def _budget_name(config: PruneConfig) -> str:
    if config.target_speedup is not None:
        return f"speedup{config.target_speedup:g}-{config.allocation}"
    if config.target_flops is not None:
        return f"flops{config.target_flops:g}-{config.allocation}"
    return f"r{config.ratio:g}"


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {one_line(message)}", file=sys.stderr if file is None else file)


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Inside: library warnings are hidden and topoprune's own are one line each."""
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        warnings.simplefilter("ignore")
        warnings.filterwarnings("default", module=r"prune(\.|$)")
        yield


def _is_main_process() -> bool:
    """False only on a non-zero rank of a torchrun launch (a stray RANK does not count)."""
    from prune.core.distributed import env_world

    try:
        return env_world().is_main
    except UsageError:
        return True


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code: 0, 2 for bad input (one line naming the fix), 1 for a
    bug (one line naming the file that holds its traceback), 130 when interrupted (prune.errors).

    Under torchrun every process runs this; only rank 0 prints.
    """

    def job() -> int:
        with quiet_libraries():
            args = build_parser().parse_args(argv)
            import_modules(args.imports)
            config = config_from_args(args)
            out = args.out or default_out(config)
            import prune

            report = prune.run(config, out=out, overwrite=args.overwrite, quiet=args.quiet, export=args.export,
                               speed=not args.no_speed, speed_seconds=args.speed_seconds)
        if report is not None:
            print(summary_line(report, out))
        return 0

    return exit_code(job, speak=_is_main_process())


def import_modules(names: list[str]) -> None:
    """Import each `--import` module (what it registers becomes a --model or --scorer name);
    UsageError naming the module, and the line of its file where its import failed."""
    for name in names:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):  # a missing parent package, a relative or empty name
            spec = None
        if spec is None:
            raise UsageError(f"--import {name}: no such module; pass a module importable from the current folder "
                             "(--import mynet for ./mynet.py) or installed")
        printed = io.StringIO()  # what the module prints on stderr: passed on once imported, else the last line said
        try:
            with redirect_stderr(printed):
                importlib.import_module(name)
        except Exception as exc:  # the module's own code failed (a package it imports missing included)
            raise UsageError(f"--import {name} failed at {_failing_line(exc, spec.origin)}: {type(exc).__name__}: "
                             f"{one_line(str(exc))}; fix that module") from None
        except SystemExit as exc:  # a script's command-line code (e.g. its argparse), run on import
            code = 0 if exc.code is None else exc.code
            said = [line for line in printed.getvalue().splitlines() if line.strip()]
            raise UsageError(f"--import {name} ended the process at {_failing_line(exc, spec.origin)} (exit code "
                             f"{code!r}{', saying: ' + one_line(said[-1]) if said else ''}): a script's own command-line "
                             "code runs when it is imported; put it under `if __name__ == \"__main__\":`") from None
        sys.stderr.write(printed.getvalue())  # e.g. its warnings, once it imported


def _failing_line(exc: BaseException, origin: str | None) -> str:
    """file:line where `exc` left the module file `origin` (for a SyntaxError: where it is)."""
    if isinstance(exc, SyntaxError):
        return f"{exc.filename}:{exc.lineno}"
    frames = traceback.extract_tb(exc.__traceback__)
    frame = next((f for f in reversed(frames) if f.filename == origin), frames[-1])
    return f"{frame.filename}:{frame.lineno}"


def summary_line(report: PruneReport, out: Path) -> str:
    """The one line the CLI prints after a run: what pruning cost and kept, and where the report is."""
    config, b, a = report.settings, report.before, report.after
    what = f"ratio {config.ratio}" if report.budget is None else (
        f"{_budget_name(config).replace('-', ' ')}: FLOPs fraction {report.budget.achieved_flops:.4f}"
        + ("" if report.budget.speedup is None else f", speed-up {report.budget.speedup:.2f} measured"))
    return (
        f"{config.model} · {config.scorer} · {what}: params {b.params:,} → {a.params:,}, "
        f"FLOPs {b.flops / 1e6:.1f}M → {a.flops / 1e6:.1f}M, top-1 {b.top1:.4f} → {a.top1:.4f} "
        f"(pruned, before fine-tune {report.pruned_before_finetune.top1:.4f}); report: {out / 'report.md'}"
    )
