"""The map-size study of `benchmarks.criteria`: feature entropy against the oracle as the maps grow.

    python -m benchmarks.criteria --map-size-study            # shapes10 at 32², 64², 96²
    python -m benchmarks.criteria --map-sizes 32 64 96 128 --n-study embedded-plain-128

The BatchNorm-free embedded VGG (`embedded-plain`, the paper's setting) is trained on shapes10
generated at each input side s with the recipe of the shipped model
(`prune.zoo.recipes.RECIPES["embedded-plain"]`, the same data counts and seed); its first
two conv layers then read maps of s × s, the last four of s/2 × s/2. At the side the shipped model
was trained on, its weights are used. Each network gets the criteria benchmark with the
`map_size_arms` (entropy in both conventions, the other feature-map criteria HRank, CHIP and
ThiNet, L1, first-order Taylor): ρ with the oracle and its
bootstrap interval, top-20 recall, split-half reliability. The oracle uses 100 held-out images per
class, 50 where the first layer's maps exceed 64 × 64 (the cost of a forward grows with s²).

Trained weights (`map-size/embedded-plain-<s>.pt`, with `train-<s>.json`: recipe, seconds,
test top-1) and each side's result (`map-size/embedded-plain-<s>.json`) are kept under the
criteria results folder; a restart skips what exists and measures only the arms a side lacks.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, fields, replace
from pathlib import Path

import numpy as np

import prune
from benchmarks.common import QUICK_PER_CLASS, Testbed, fmt_rho, machine, markdown_table, new_figure, save_figure
from benchmarks.criteria_settings import Settings
from finetune.metrics import evaluate

Measure = Callable[["Settings", Testbed, Path], dict]
"""`benchmarks.criteria.run_testbed`: the criteria rows of a testbed, written to a path (a finished
run there kept, the arms it lacks added)."""

MODEL = "embedded-plain"
"""The network of the study: no BatchNorm, as the paper's VGG16."""
LARGE_MAP = 64
"""Above this first-layer side the oracle uses `LARGE_MAP_ORACLE_PER_CLASS` images per class."""
LARGE_MAP_ORACLE_PER_CLASS = 50


def folder(s: Settings) -> Path:
    return s.runs_dir / "map-size"


def testbed_name(size: int) -> str:
    return f"{MODEL}-{size}"


def native_size() -> int:
    """The input side the shipped `embedded-plain` weights were trained at (32)."""
    return prune.model_entry(MODEL).input_size


def trained_weights(s: Settings, size: int) -> Path:
    """The state_dict of `embedded-plain` trained at side `size` with its recipe (trained here if
    missing, e.g. by `python -m prune.zoo.train_embedded --model embedded-plain --input-size <size>`),
    with its training record `train-<size>.json` (recipe, images, seconds, test top-1)."""
    path = folder(s) / f"{testbed_name(size)}.pt"
    record = folder(s) / f"train-{size}.json"
    if path.exists() and record.exists():
        return path
    if path.exists():  # trained by the command above: record its recipe and test top-1 (no timing)
        entry = dict(config=asdict(replace(prune.RECIPES[MODEL], epochs=1) if s.quick else prune.RECIPES[MODEL]),
                     input_size=size, seconds=None, **heldout_top1(s, path, size))
    else:
        quick = dict(per_class=QUICK_PER_CLASS["train"], epochs=1) if s.quick else {}
        trained = prune.train_variant(MODEL, input_size=size, quiet=s.quiet, **quick)
        prune.torch_save(path, trained.model.state_dict())
        entry = {f.name: getattr(trained, f.name) for f in fields(trained) if f.name != "model"}
        entry["config"] = asdict(trained.config)
    prune.write_json(record, {"model": MODEL, **entry, "machine": machine()})
    return path


def heldout_top1(s: Settings, path: Path, size: int) -> dict:
    """Top-1 of the weights at `path` on the shapes10 test split at side `size`, with the image counts."""
    per_class = QUICK_PER_CLASS["train"] if s.quick else None
    data = prune.embedded_data(input_size=size, train_per_class=per_class, val_per_class=per_class)
    model = prune.create_model(MODEL, weights=str(path), num_classes=len(data.classes))
    top1 = evaluate(model, prune.make_loader(data.val, batch_size=500, shuffle=False, seed=0)).top1
    return {"train_images": len(data.train), "test_images": len(data.val), "test_top1": top1}


def testbed(s: Settings, size: int) -> Testbed:
    """The study's network at input side `size` (shipped weights at the native side)."""
    if size == native_size():
        return Testbed(name=testbed_name(size), model=MODEL)
    return Testbed(name=testbed_name(size), model=MODEL, weights=str(trained_weights(s, size)), input_size=size)


def study_settings(s: Settings, size: int) -> Settings:
    """The criteria settings of one side: the study's arms, no random draws (layer top-1 is not
    part of the study), fewer oracle images where the maps exceed `LARGE_MAP`."""
    per_class = LARGE_MAP_ORACLE_PER_CLASS if size > LARGE_MAP and not s.quick else s.oracle_per_class
    return replace(s, arms=s.map_size_arms, random_draws=0, oracle_per_class=min(per_class, s.oracle_per_class))


def run_side(s: Settings, size: int, measure: Measure) -> dict:
    """The criteria rows of the network at side `size` (map-size/embedded-plain-<size>.json), one per
    arm of the study: a finished side is kept and gets the arms it lacks. At the native side the
    shipped network's testbed run is that measurement: it gets the study's arms it lacks, and the
    side is taken from it."""
    path = folder(s) / f"{testbed_name(size)}.json"
    if size == native_size():
        shipped = measure(replace(s, arms=s.map_size_arms), Testbed.shipped(MODEL), s.runs_dir / f"{MODEL}.json")
        return from_testbed_run(s, shipped, path)
    return measure(study_settings(s, size), testbed(s, size), path)


def from_testbed_run(s: Settings, result: dict, path: Path) -> dict:
    """The side of the shipped network taken from the criteria run of its testbed (same model,
    oracle images and settings; the study's arms kept), written to `path`."""
    side = {**result, "testbed": testbed_name(native_size()), "input_size": native_size(),
            "rows": [r for r in result["rows"] if r["scorer"] in s.map_size_arms],
            "taken_from": f"{MODEL}.json"}
    prune.write_json(path, side)
    return side


def entries(result: dict, top1: float | None) -> list[dict]:
    """The `map_size_study` entries of one side's result."""
    keys = ("layer", "map_size", "scorer", "rho", "rho_low", "rho_high", "split_half", "top20_recall")
    return [{"input_size": result["input_size"], "testbed": result["testbed"], **{k: r[k] for k in keys},
             "oracle_images": result["oracle_images"], "model_top1": top1} for r in result["rows"]]


def model_top1(s: Settings, size: int) -> float | None:
    """Test top-1 of the side's network from its training record (None for the shipped one)."""
    record = folder(s) / f"train-{size}.json"
    return json.loads(record.read_text())["test_top1"] if record.exists() else None


def run_study(s: Settings, measure: Measure) -> list[dict]:
    """Every side of `s.map_sizes` not yet finished (measured by `measure`), then the study's entries."""
    return [e for size in s.map_sizes for e in entries(run_side(s, size, measure), model_top1(s, size))]


def finished(s: Settings) -> list[dict]:
    """The entries of the sides already finished (no work)."""
    out = []
    done = [p for p in folder(s).glob(f"{MODEL}-*.json") if p.stem.rsplit("-", 1)[1].isdigit()]  # not .partial
    for path in sorted(done, key=lambda p: int(p.stem.rsplit("-", 1)[1])):
        result = json.loads(path.read_text())
        out += entries(result, model_top1(s, result["input_size"]))
    return out


# ---------------------------------------------------------------- tables and plots


def markdown(study: list[dict]) -> str:
    """ρ [95% interval] per layer for each scorer and input side, with split-half ρ (mean over layers)."""
    if not study:
        return ""
    sizes = sorted({e["input_size"] for e in study})
    text = ["", "## Map-size study (embedded-plain trained at each input side; ρ with the oracle [95% interval])", ""]
    for size in sizes:
        mine = [e for e in study if e["input_size"] == size]
        layers = list(dict.fromkeys(e["layer"] for e in mine))
        top1 = mine[0]["model_top1"]
        body = []
        for scorer in dict.fromkeys(e["scorer"] for e in mine):
            row = {e["layer"]: e for e in mine if e["scorer"] == scorer}
            halves = [row[n]["split_half"] for n in layers if row[n]["split_half"] is not None]
            body.append([scorer, *(fmt_rho(row[n]) for n in layers), f"{np.mean(halves):.2f}" if halves else "—"])
        sides = {e["layer"]: e["map_size"] for e in mine}
        shown = "shipped weights" if top1 is None else f"test top-1 {top1:.3f}"
        text += [f"### input {size}² ({shown}, {mine[0]['oracle_images']} oracle images)", "",
                 markdown_table(["scorer", *(f"{n} ({sides[n]}²)" for n in layers), "split-half ρ"], body), ""]
    return "\n".join(text)


def plot(study: list[dict], path: Path) -> None:
    """ρ with its interval (top) and split-half ρ (bottom) against each layer's map side, one
    panel per scorer, one colour per input side."""
    from matplotlib import colormaps

    scorers = list(dict.fromkeys(e["scorer"] for e in study))
    sizes = sorted({e["input_size"] for e in study})
    fig, axes = new_figure(2, len(scorers), size=(3.6, 3.2))
    for j, scorer in enumerate(scorers):
        for i, size in enumerate(sizes):
            mine = [e for e in study if e["scorer"] == scorer and e["input_size"] == size and e["rho"] is not None]
            colour = colormaps["viridis"](i / max(1, len(sizes) - 1))
            order = {layer: k for k, layer in enumerate(dict.fromkeys(e["layer"] for e in mine))}
            xs = [e["map_size"] * (1 + 0.04 * (order[e["layer"]] % 4 - 1.5)) for e in mine]  # layers side by side
            ys = np.array([e["rho"] for e in mine])
            err = np.array([[y - e["rho_low"], e["rho_high"] - y] for y, e in zip(ys, mine)]).T.clip(min=0)
            axes[0][j].errorbar(xs, ys, yerr=err, fmt="o", ms=4, capsize=2, color=colour, label=f"input {size}²")
            halves = [(x, e["split_half"]) for x, e in zip(xs, mine) if e["split_half"] is not None]
            if halves:
                axes[1][j].plot(*zip(*halves), "o", ms=4, color=colour, label=f"input {size}²")
        axes[0][j].set_title(scorer)
        if not any(e["split_half"] is not None for e in study if e["scorer"] == scorer):
            axes[1][j].text(0.5, 0.5, "weights only:\nno images to split", ha="center", va="center",
                            transform=axes[1][j].transAxes)
        sides = sorted({e["map_size"] for e in study})
        for row, label in ((0, "Spearman ρ with the oracle"), (1, "split-half ρ")):
            ax = axes[row][j]
            ax.set_xscale("log", base=2)
            ax.set_xticks(sides, [str(m) for m in sides])
            ax.minorticks_off()
            ax.set_xlim(sides[0] / 1.25, sides[-1] * 1.25)
            ax.axhline(0, color="grey", lw=0.5)
            ax.set_ylim(-1, 1.05)
            ax.set_xlabel("map side m of the layer's units")
            ax.set_ylabel(label)
    axes[0][0].legend(fontsize=7)
    save_figure(fig, path)


def plot_n_study(entries_: list[dict], path: Path) -> None:
    """ρ with the oracle and split-half ρ (means over layers) against N, one line per scorer,
    one row of panels per testbed."""
    from matplotlib import colormaps

    testbeds = list(dict.fromkeys(e["testbed"] for e in entries_))
    scorers = list(dict.fromkeys(e["scorer"] for e in entries_))
    colour = {sc: colormaps["tab10"](i % 10) for i, sc in enumerate(scorers)}  # one colour per scorer, all panels
    fig, axes = new_figure(len(testbeds), 2, size=(4.5, 3.2))
    for row, tb in enumerate(testbeds):
        mine = [e for e in entries_ if e["testbed"] == tb]
        ns = sorted({e["n"] for e in mine})
        for scorer in dict.fromkeys(e["scorer"] for e in mine):
            for col, key in enumerate(("rho", "split_half")):
                means = [np.mean(v) if (v := [e[key] for e in mine if e["scorer"] == scorer and e["n"] == n
                                              and e[key] is not None]) else np.nan for n in ns]
                if not np.isnan(means).all():
                    axes[row][col].plot(ns, means, marker="o", label=scorer, color=colour[scorer],
                                        lw=2.5 if "entropy" in scorer else 1)
        for col, label in enumerate(("Spearman ρ with the oracle", "split-half ρ")):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            ax.set_xticks(ns, [str(n) for n in ns])
            ax.axhline(0, color="grey", lw=0.5)
            ax.set_ylim(-1, 1.05)
            ax.set_xlabel("N images per class")
            ax.set_ylabel(label)
            ax.set_title(f"{tb}: mean over layers")
        axes[row][0].legend(fontsize=7)
    save_figure(fig, path)

