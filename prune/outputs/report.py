"""The report of a pruning run: typed (`PruneReport`), and as report.json / report.md."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from finetune.metrics import Evaluation
from prune.config import PruneConfig
from prune.core.files import write_json, write_text
from prune.core.throughput import Throughput


@dataclass(frozen=True)
class Measurement:
    """One network measured: cost at the model's input size, accuracy on the val split, speed.

    params: all parameters. macs / flops (= 2 × MACs): conv + linear layers for one image.
    top1, top5, balanced_accuracy in [0, 1]; loss: mean cross-entropy. `throughput`: img/s and
    how it was measured (its `img_per_s` and `device` are also read here as properties), None
    when the run skipped it (`--no-speed`).
    """

    params: int
    macs: int
    flops: int
    top1: float
    top5: float
    balanced_accuracy: float
    loss: float
    throughput: Throughput | None

    @property
    def img_per_s(self) -> float | None:
        return None if self.throughput is None else self.throughput.img_per_s

    @property
    def device(self) -> str | None:
        return None if self.throughput is None else self.throughput.device

    def as_dict(self) -> dict[str, Any]:
        """report.json's "before" / "after" (same keys, same order)."""
        return {
            "params": self.params, "macs": self.macs, "flops": self.flops, "top1": self.top1, "top5": self.top5,
            "balanced_accuracy": self.balanced_accuracy, "loss": self.loss, "img_per_s": self.img_per_s,
            "device": self.device, "throughput": None if self.throughput is None else self.throughput.as_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Measurement:
        """The measurement `as_dict` wrote (report.json's "before" / "after")."""
        own = {k: v for k, v in d.items() if k not in ("img_per_s", "device")}  # stored in report.json for readers
        throughput = None if d["throughput"] is None else Throughput(**d["throughput"])
        return cls(**{**own, "throughput": throughput})


@dataclass(frozen=True)
class LayerResult:
    """What was decided at one prunable group (named by its first conv `name`; `members`: every
    conv whose output channels it removes): the `removed` channel indices and the counts.

    map_size: side m of the [m, m] units that were scored. scoring_top1: top-1 of the whole
    network when the group was scored, on the first ⌊100 / K⌋ scoring images of each class
    (at least one; all N when K·N ≤ 100; None without scoring data, as for a scorer that reads only weights).
    """

    name: str
    members: tuple[str, ...]
    channels_before: int
    channels_after: int
    removed: tuple[int, ...]
    map_size: int
    scoring_top1: float | None

    def as_dict(self) -> dict[str, Any]:
        """One entry of report.json's "layers" (same keys, same order)."""
        return {
            "name": self.name, "members": list(self.members), "channels_before": self.channels_before,
            "channels_after": self.channels_after, "removed": list(self.removed), "map_size": self.map_size,
            "scoring_top1": self.scoring_top1,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerResult:
        """The layer result `as_dict` wrote (one entry of report.json's "layers")."""
        return cls(**{**d, "members": tuple(d["members"]), "removed": tuple(d["removed"])})


@dataclass(frozen=True)
class BudgetResult:
    """How a FLOPs or speed target was shared between layers and what it gave.

    ratios: the chosen ratio of each prunable group, shallow → deep (named as `PruneReport.layers`).
    flops_target: the FLOPs fraction allocated for (`target_flops`, or where a speed search
    settled); achieved_flops: the pruned network's FLOPs over the unpruned one's. speedup: the
    speed-up measured while planning (speed target only); note: why a target is not met ("" if it
    is). schedule: the selection the ratios were pruned with (`global` is always `oneshot`, whatever
    `settings.schedule` says).
    """

    allocation: str
    target_flops: float | None
    target_speedup: float | None
    max_layer_ratio: float
    ratios: tuple[float, ...]
    flops_target: float
    achieved_flops: float
    schedule: str = ""
    """"" only in a report written before the field existed."""
    speedup: float | None = None
    note: str = ""
    final_speedup: float | None = None
    """Speed target only: the final network against an unpruned copy, measured as `speedup` at the end."""

    def as_dict(self) -> dict[str, Any]:
        """report.json's "budget"."""
        return {**asdict(self), "ratios": list(self.ratios)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BudgetResult:
        return cls(**{**d, "ratios": tuple(d["ratios"])})


@dataclass(frozen=True)
class StepResult:
    """One step of an iterative run (`--iterative-steps`): the channels of each prunable group
    after it (shallow → deep), the val top-1 of the network as the step pruned it and after the
    step's fine-tuning (None for the last step, whose fine-tuning is the run's, or without one),
    and that fine-tuning's mean loss per epoch."""

    step: int
    channels: tuple[int, ...]
    pruned_top1: float
    finetuned_top1: float | None
    losses: tuple[float, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """One entry of report.json's "steps"."""
        return {**asdict(self), "channels": list(self.channels), "losses": list(self.losses)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StepResult:
        return cls(**{**d, "channels": tuple(d["channels"]), "losses": tuple(d.get("losses", ()))})


@dataclass(frozen=True)
class PruneReport:
    """Everything a run reports (`prune.run` returns it; report.json is `as_dict()`).

    before / after: the unpruned and the final (fine-tuned) network. pruned_before_finetune:
    the pruned network's evaluation before fine-tuning; pruned_bn_reestimated: the same with
    its BatchNorm statistics re-estimated (equal to it without BatchNorm). layers: one
    decision per prunable group, shallow to deep. timings: seconds per stage. classes_used:
    names of the K scoring classes. processes: torchrun world size (1 alone). unreadable_images:
    {"train": n, "val": n}, the image files skipped as unreadable in each split (every header
    is checked up front; files that fail only when decoded count once the run reads them).
    """

    settings: PruneConfig
    processes: int
    classes_used: tuple[str, ...]
    unreadable_scoring_images: int
    unreadable_images: dict[str, int]
    before: Measurement
    pruned_before_finetune: Evaluation
    pruned_bn_reestimated: Evaluation
    after: Measurement
    finetune_losses: tuple[float, ...]
    layers: tuple[LayerResult, ...]
    timings: dict[str, float]
    versions: dict[str, str]
    device: str
    budget: BudgetResult | None = None
    """The target and each layer's chosen ratio when a budget replaced `--ratio`, else None."""
    steps: tuple[StepResult, ...] = ()
    """An iterative run's steps (`--iterative-steps` > 1), else empty."""

    def as_dict(self) -> dict[str, Any]:
        """The report as report.json holds it (JSON-ready, same keys in the same order)."""
        return {
            "settings": self.settings.as_dict(),
            "processes": self.processes,
            "classes_used": list(self.classes_used),
            "unreadable_scoring_images": self.unreadable_scoring_images,
            "unreadable_images": dict(self.unreadable_images),
            "before": self.before.as_dict(),
            "pruned_before_finetune": self.pruned_before_finetune.as_dict(),
            "pruned_bn_reestimated": self.pruned_bn_reestimated.as_dict(),
            "after": self.after.as_dict(),
            "finetune_losses": list(self.finetune_losses),
            "layers": [layer.as_dict() for layer in self.layers],
            "timings": dict(self.timings),
            "versions": dict(self.versions),
            "device": self.device,
            "budget": None if self.budget is None else self.budget.as_dict(),
            "steps": [step.as_dict() for step in self.steps],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PruneReport:
        """The typed report of a report.json dict (`as_dict()` gives it back)."""
        return cls(
            settings=PruneConfig.from_dict(d["settings"]),
            processes=d["processes"],
            classes_used=tuple(d["classes_used"]),
            unreadable_scoring_images=d["unreadable_scoring_images"],
            unreadable_images=dict(d.get("unreadable_images", {})),
            before=Measurement.from_dict(d["before"]),
            pruned_before_finetune=Evaluation(**d["pruned_before_finetune"]),
            pruned_bn_reestimated=Evaluation(**d["pruned_bn_reestimated"]),
            after=Measurement.from_dict(d["after"]),
            finetune_losses=tuple(d["finetune_losses"]),
            layers=tuple(LayerResult.from_dict(layer) for layer in d["layers"]),
            timings=dict(d["timings"]),
            versions=dict(d["versions"]),
            device=d["device"],
            budget=None if d.get("budget") is None else BudgetResult.from_dict(d["budget"]),
            steps=tuple(StepResult.from_dict(step) for step in d.get("steps", ())),
        )


def _fmt(value: float, unit: str = "") -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{suffix}{unit}"
    return f"{value:.0f}{unit}"


def markdown(report: dict) -> str:
    """The report as Markdown: summary table before/after, then one row per layer."""
    b, a = report["before"], report["after"]
    rows = [
        ("params", _fmt(b["params"]), _fmt(a["params"]), a["params"] / b["params"]),
        ("MACs", _fmt(b["macs"]), _fmt(a["macs"]), a["macs"] / b["macs"]),
        ("FLOPs", _fmt(b["flops"]), _fmt(a["flops"]), a["flops"] / b["flops"]),
        ("top-1", f"{b['top1']:.4f}", f"{a['top1']:.4f}", None),
        ("top-5", f"{b['top5']:.4f}", f"{a['top5']:.4f}", None),
        ("balanced accuracy", f"{b['balanced_accuracy']:.4f}", f"{a['balanced_accuracy']:.4f}", None),
    ]
    if a["throughput"] is not None:
        rows.append(("img/s", f"{b['img_per_s']:.1f}", f"{a['img_per_s']:.1f}", a["img_per_s"] / b["img_per_s"]))
    s, budget = report["settings"], report.get("budget")
    ratios = [s["ratio"]] * len(report["layers"]) if budget is None else budget["ratios"]
    lines = [
        f"# Pruning report: {s['model']} · scorer `{s['scorer']}` · {_what(s)}",
        "",
        *_budget_lines(budget),
        "| metric | before | after | after/before |",
        "|---|---|---|---|",
        *[f"| {n} | {x} | {y} | {'' if r is None else f'{r:.3f}'} |" for n, x, y, r in rows],
        "",
        _throughput_line(a),
        "",
        _recovery_line(s, report["finetune_losses"]),
        "",
        *_unreadable_lines(report.get("unreadable_images", {})),
        *_step_lines(report.get("steps", [])),
        "| layer | ratio | channels before | channels after | removed |",
        "|---|---|---|---|---|",
        *[
            f"| {layer['name']} | {r:.4g} | {layer['channels_before']} | {layer['channels_after']} | "
            f"{len(layer['removed'])} |"
            for layer, r in zip(report["layers"], ratios)
        ],
        "",
        "Stage timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report["timings"].items()),
        "",
    ]
    return "\n".join(lines)


def _unreadable_lines(counts: dict[str, int]) -> list[str]:
    """That unreadable image files were skipped (none: no line)."""
    if not any(counts.values()):
        return []
    return [f"Unreadable image files skipped: {counts.get('train', 0)} in train/, {counts.get('val', 0)} in val/ "
            "(accuracies are over the images that decoded).", ""]


def _throughput_line(after: dict) -> str:
    """How img/s was measured, or that it was not."""
    t = after["throughput"]
    if t is None:
        return "Throughput not measured (--no-speed)."
    line = (f"Throughput on {after['device']}, batch {t['batch_size']}, {t['dtype']}, {t['threads']} threads, "
            f"{t['warmup']} warm-up batches")
    if t.get("spread") is None:
        return line + "."
    low, high = t["spread"]
    per_window = t["iters"] // t["windows"]
    return line + (f", then the median of {t['windows']} timed windows of {per_window} batch"
                   f"{'' if per_window == 1 else 'es'} ({low:.1f}–{high:.1f} img/s; budget {t['seconds']:g} s).")


def _epochs(n: int) -> str:
    return f"{n} epoch" + ("" if n == 1 else "s")


def _scratch_recipe(settings: dict) -> str:
    """What `--reinit` trained with: the shipped model's own recipe, or the fine-tuning settings."""
    from prune.zoo.recipes import training_recipe

    recipe = training_recipe(settings["model"])
    if recipe is None:
        return (f"SGD lr {settings['lr']:g} ({settings.get('lr_schedule', 'step')} schedule), "
                f"batch {settings['batch_size']}")
    return (f"{settings['model']}'s own training recipe (SGD Nesterov lr {recipe.lr:g}, batch {recipe.batch_size}, "
            f"{recipe.warmup_epochs} warm-up epoch then cosine, flips)")


def _recovery_line(settings: dict, losses: list) -> str:
    """How the pruned network was recovered: fine-tuning schedule, distillation, scratch training."""
    aligned = f" Widths aligned to multiples of {settings['round_to']}." if settings.get("round_to", 1) > 1 else ""
    if settings.get("reinit"):
        return (f"Recovery: the pruned architecture trained from fresh weights (`--reinit`), {_epochs(len(losses))}, "
                f"with {_scratch_recipe(settings)}.") + aligned
    steps = settings.get("iterative_steps", 1)
    tuned = settings["finetune"] and settings.get("step_epochs", 0) > 0
    stepped = "" if steps == 1 else (f" Reached in {steps} steps, " + (
        f"{_epochs(settings['step_epochs'])} of fine-tuning after each but the last." if tuned
        else "without fine-tuning between them."))
    if not settings["finetune"] or settings["epochs"] == 0:
        return "Recovery: no final fine-tuning." + stepped + aligned
    line = (f"Recovery: fine-tuned {_epochs(settings['epochs'])}, SGD lr {settings['lr']:g} "
            f"({settings.get('lr_schedule', 'step')} schedule), batch {settings['batch_size']}")
    if settings.get("distill"):
        line += (f", distilled from the unpruned network (α {settings['distill_alpha']:g}, "
                 f"T {settings['distill_temperature']:g})")
    return line + "." + stepped + aligned


def _step_lines(steps: list) -> list[str]:
    """The iterative steps' table of report.md (none for a one-step run)."""
    if not steps:
        return []
    rows = [f"| {st['step']} | {sum(st['channels'])} | {st['pruned_top1']:.4f} | "
            f"{'' if st['finetuned_top1'] is None else format(st['finetuned_top1'], '.4f')} |" for st in steps]
    return ["| step | channels | top-1 pruned | top-1 after the step's fine-tuning |", "|---|---|---|---|", *rows, ""]


def _what(settings: dict) -> str:
    """"ratio r", or the target and its allocation."""
    if settings.get("target_speedup") is not None:
        return f"target speed-up {settings['target_speedup']:g} ({settings['allocation']})"
    if settings.get("target_flops") is not None:
        return f"target FLOPs {settings['target_flops']:g} ({settings['allocation']})"
    return f"ratio {settings['ratio']}"


def _target(budget: dict) -> str:
    if budget["target_speedup"] is not None:
        return f"searched for a speed-up of {budget['target_speedup']:g}"
    return f"target {budget['target_flops']:g}"


def _budget_lines(budget: dict | None) -> list[str]:
    """The budget paragraph of report.md (none without a budget)."""
    if budget is None:
        return []
    speed = "" if budget["speedup"] is None else (
        f" Speed-up measured while planning: {budget['speedup']:.2f} (target {budget['target_speedup']:g}); "
        f"final network against an unpruned copy: {budget['final_speedup']:.2f}.")
    note = f" {budget['note']}." if budget["note"] else ""
    schedule = f"; {budget['schedule']} selection" if budget.get("schedule") else ""
    return [f"Budget: `{budget['allocation']}` allocation for {budget['flops_target']:.4f} of the unpruned FLOPs "
            f"({_target(budget)}, at most {budget['max_layer_ratio']:g} of a layer's channels{schedule}); "
            f"achieved FLOPs fraction {budget['achieved_flops']:.4f}.{speed}{note}", ""]


def write_report(out: Path, report: PruneReport) -> None:
    """Write `out/report.json` (`report.as_dict()`) and `out/report.md` (atomically)."""
    d = report.as_dict()
    write_json(out / "report.json", d)
    write_text(out / "report.md", markdown(d))
