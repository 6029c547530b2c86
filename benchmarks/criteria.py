"""How well each criterion finds the channels that matter: its scores against the oracle, per layer.

    python -m benchmarks.criteria                                 # every shipped testbed
    python -m benchmarks.criteria --testbeds embedded-plain --bootstrap 20
    python -m benchmarks.criteria --n-study embedded-plain        # also ρ and split-half for N = 25 … 200
    python -m benchmarks.criteria --quick                         # a smoke run (tests)

For the unpruned, trained network of each testbed and each conv layer:

- **oracle importance** of channel c: the increase of the mean cross-entropy on held-out images
  (the val split, `oracle_per_class` per class) when unit c alone is zeroed (Molchanov et al.,
  CVPR 2019). The unit is zeroed at the output of the module the ReLU reads (the BatchNorm after
  the conv, else the conv; for ReLU the same as zeroing after it), and the rest of the network
  is run on a cached copy (`benchmarks.tail.LayerTail`);
- for every arm of `benchmarks.compare` (the project's scorers, HRank, CHIP and ThiNet included,
  both entropy conventions, and the torch-pruning criteria) that applies to the testbed's model
  (one that refuses it is listed under "skipped" with the scorer's one-line reason): **Spearman
  ρ** between its scores (N scoring images per class, all classes, the main job's choice) and the
  oracle, with a 95% percentile bootstrap interval (each replicate resamples the held-out images
  of the oracle and, within each class, the scoring images of the scorer, from a random stream of
  the arm's own; a scorer that draws, such as `random`, draws anew with another seed), and
  **top20_recall**: the share of the oracle's top 20% channels that the scorer's top 20% holds;
- **split_half**: Spearman between the scores from two disjoint sets of N images per class
  (data scorers; null for the weight scorers, whose scores do not depend on images);
- **layer_top1**: held-out top-1 with the round(ratio·C) lowest-scored channels of that layer
  alone zeroed (no fine-tuning), beside the worst and best of `random_draws` random draws.

High ρ = the criterion ranks channels as removing them would; ρ ≈ 0 = unrelated. One JSON per
testbed under benchmarks/results/criteria/; on restart a finished testbed is kept and only the arms
it lacks are measured and added (each arm's row depends on no other arm; rows committed before
the streams were per arm drew from one stream shared in arm order). The summary goes to
benchmarks/results/criteria.{json,md} and criteria-rho.png.

The N study (`--n-study TESTBED`): the same oracle, and for N = 25, 50, 100, 200 images per class
the ρ and split-half reliability of entropy (both conventions), l1 and tp-taylor (the paper
finds 50 images too scattered and uses 100).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

import scoring
from benchmarks import criteria_map_size as map_size
from benchmarks.common import (
    ExperimentSettings,
    Setup,
    Testbed,
    fmt_rho,
    interval,
    load_setup,
    machine,
    markdown_table,
    new_figure,
    not_run,
    save_figure,
    settings_json,
    spearman,
)
from benchmarks.compare import ARMS, EXTRA_ARMS, Arm, applies, arm_of, refusal_of
from benchmarks.criteria_settings import PRESETS, SHIPPED, Settings
from benchmarks.layers import class_batch, conv_layers, score_layer
from benchmarks.tail import LayerTail
from prune import UsageError, exit_code, write_json, write_text
from scoring.control import layer_seed

TOP_SHARE = 0.2
# ---------------------------------------------------------------- statistics


def top_recall(scores: torch.Tensor, oracle: torch.Tensor, share: float = TOP_SHARE) -> float:
    """Share of the oracle's top `share` channels (largest loss increase) among the scorer's top
    `share` (highest scores); at least one channel each."""
    k = max(1, round(share * len(scores)))
    mine = set(torch.argsort(scores, descending=True, stable=True)[:k].tolist())
    best = set(torch.argsort(oracle, descending=True, stable=True)[:k].tolist())
    return len(mine & best) / k


# ---------------------------------------------------------------- oracle


@torch.no_grad()
def per_image_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per image: logits [..., N, K], labels [N] → [..., N]."""
    flat = logits.reshape(-1, logits.shape[-1])
    return F.cross_entropy(flat, labels.repeat(flat.shape[0] // len(labels)), reduction="none").view(logits.shape[:-1])


@torch.no_grad()
def oracle_losses(tail: LayerTail, labels: torch.Tensor, channels: int) -> torch.Tensor:
    """Per-image loss increase [C, N] when each channel alone is zeroed (row c: channel c)."""
    base = per_image_loss(tail.logits(torch.ones(channels)), labels)
    masks = 1.0 - torch.eye(channels)
    return per_image_loss(tail.logits_many(masks), labels) - base


@torch.no_grad()
def pruned_top1(tail: LayerTail, labels: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """Top-1 [S] with the channels of each row of `removed` [S, k] zeroed."""
    masks = torch.ones(len(removed), tail.channels).scatter_(1, removed, 0.0)
    return (tail.logits_many(masks).argmax(-1) == labels).float().mean(-1)


# ---------------------------------------------------------------- scoring


def score(arm: Arm, model: nn.Module, conv: nn.Conv2d, name: str, batches: list[scoring.ClassBatch],
          seed: int) -> torch.Tensor:
    """Scores [C] (higher = keep) of one layer by `arm`, from `batches` (ignored by weight scorers)."""
    options = dict(arm.options)
    if "seed" in scoring.scorer_options(arm.scorer):
        options["seed"] = seed
    return score_layer(arm.scorer, model, conv, name, batches, **options)


def resampled(batches: list[scoring.ClassBatch], rng: np.random.Generator) -> list[scoring.ClassBatch]:
    """Each class's images drawn with replacement (a bootstrap replicate of the scoring images)."""
    out = []
    for b in batches:
        idx = torch.from_numpy(rng.integers(0, len(b.images), len(b.images)))
        out.append(scoring.ClassBatch(class_index=b.class_index, images=b.images[idx], activations=b.activations[idx]))
    return out


def split_half(arm: Arm, model: nn.Module, conv: nn.Conv2d, name: str, pool: list[scoring.ClassBatch], n: int,
               seed: int) -> float | None:
    """Spearman between the arm's scores from the first and from the last `n` images of each class."""
    first, second = halves(pool, n)
    return spearman(score(arm, model, conv, name, first, seed), score(arm, model, conv, name, second, seed))


def halves(batches: list[scoring.ClassBatch], n: int) -> tuple[list, list]:
    """The first and the last `n` images of each class: two disjoint scoring sets."""
    def part(sl: slice) -> list[scoring.ClassBatch]:
        return [scoring.ClassBatch(class_index=b.class_index, images=b.images[sl], activations=b.activations[sl])
                for b in batches]

    return part(slice(0, n)), part(slice(n, 2 * n))


# ---------------------------------------------------------------- one layer, one testbed


def random_range(top1: torch.Tensor | None) -> dict[str, float | None]:
    """Worst, best and mean top-1 [S] of the random draws (None without draws)."""
    stats = {"min": None, "max": None, "mean": None} if top1 is None else {
        "min": float(top1.min()), "max": float(top1.max()), "mean": float(top1.mean())}
    return {f"random_top1_{k}": v for k, v in stats.items()}


@dataclass(frozen=True)
class LayerOracle:
    """What every arm of one conv layer is measured against: the held-out images' loss increase
    `delta` [C, N] per zeroed channel, its mean `oracle` [C], the scoring images (`pool`: 2N per
    class, for split-half; `first`: the N scored), `removed` = round(ratio·C) and the layer's tail."""

    tail: LayerTail
    labels: torch.Tensor
    delta: torch.Tensor
    pool: list[scoring.ClassBatch]
    first: list[scoring.ClassBatch]
    removed: int

    @property
    def oracle(self) -> torch.Tensor:
        return self.delta.mean(1)

    @property
    def map_size(self) -> int:
        return int(self.first[0].activations.shape[-1])


def layer_oracle(s: Settings, model: nn.Module, data, test: tuple[torch.Tensor, torch.Tensor], name: str,
                 conv: nn.Conv2d) -> LayerOracle:
    """The oracle and the scoring images of one conv layer (`LayerOracle`)."""
    images, labels = test
    tail = LayerTail(model, conv, images)
    pool = [class_batch(model, conv, name, data, c, 2 * s.samples_per_class, seed=s.seed)
            for c in range(len(data.classes))]
    return LayerOracle(tail=tail, labels=labels, delta=oracle_losses(tail, labels, conv.out_channels), pool=pool,
                       first=halves(pool, s.samples_per_class)[0], removed=round(s.ratio * conv.out_channels))


def layer_entry(s: Settings, testbed: str, name: str, layer: LayerOracle) -> dict:
    """The layer's entry: its oracle and the top-1 range of `random_draws` random halves."""
    channels, k = layer.tail.channels, layer.removed
    g = torch.Generator().manual_seed(s.seed)
    draws = [torch.randperm(channels, generator=g)[:k] for _ in range(s.random_draws)]
    random_top1 = (pruned_top1(layer.tail, layer.labels, torch.stack(draws)) if k else torch.ones(1)) if draws else None
    return {"testbed": testbed, "layer": name, "map_size": layer.map_size, "channels": channels, "removed": k,
            "oracle": layer.oracle.tolist(), **random_range(random_top1)}


def arm_row(s: Settings, testbed: str, model: nn.Module, conv: nn.Conv2d, name: str, layer: LayerOracle,
            arm: Arm) -> dict:
    """One arm's row of one layer: ρ with the oracle and its bootstrap interval, top-20% recall,
    split-half ρ and layer top-1. The replicates draw from a stream of the arm's own (seeded by the
    seed and the arm's name), so a row does not depend on which other arms are measured."""
    scores = score(arm, model, conv, name, layer.first, s.seed)
    data_driven = scoring.scorer_info(arm.scorer).needs_data
    draws = "seed" in scoring.scorer_options(arm.scorer)
    rng = np.random.default_rng(layer_seed(s.seed, arm.name))
    replicates = []
    for b in range(s.bootstrap):
        idx = torch.from_numpy(rng.integers(0, layer.delta.shape[1], layer.delta.shape[1]))
        seed = s.seed + 1 + b if draws else s.seed  # a scorer that draws, draws anew: its chance is in the interval
        again = (score(arm, model, conv, name, resampled(layer.first, rng) if data_driven else layer.first, seed)
                 if data_driven or draws else scores)
        replicates.append(spearman(again, layer.delta[:, idx].mean(1)))
    low, high = interval(replicates)
    lowest = torch.argsort(scores, stable=True)[:layer.removed].unsqueeze(0)
    return {
        "testbed": testbed, "layer": name, "scorer": arm.name, "map_size": layer.map_size,
        "channels": layer.tail.channels, "rho": spearman(scores, layer.oracle), "rho_low": low, "rho_high": high,
        "top20_recall": top_recall(scores, layer.oracle),
        "split_half": split_half(arm, model, conv, name, layer.pool, s.samples_per_class, s.seed) if data_driven else None,
        "layer_top1": float(pruned_top1(layer.tail, layer.labels, lowest)[0]) if layer.removed else None,
    }


def layer_rows(s: Settings, testbed: str, model: nn.Module, data, test: tuple[torch.Tensor, torch.Tensor],
               name: str, conv: nn.Conv2d, arms: Sequence[Arm], entry: dict | None = None) -> tuple[list[dict], dict]:
    """The rows of one conv layer (one per arm) and its layer entry (`layer_entry`; `entry`, when
    given, is a saved run's, whose oracle this measurement must reproduce)."""
    layer = layer_oracle(s, model, data, test, name, conv)
    if entry is not None:
        check_oracle(entry, layer.oracle)
    rows = [arm_row(s, testbed, model, conv, name, layer, arm) for arm in arms]
    return rows, entry if entry is not None else layer_entry(s, testbed, name, layer)


def check_oracle(entry: dict, oracle: torch.Tensor) -> None:
    """Raise if `oracle` [C] is not the one a saved run measured at `entry`'s layer (to 0.1% of its largest value)."""
    saved = torch.tensor(entry["oracle"], dtype=oracle.dtype)
    if saved.shape != oracle.shape or not torch.allclose(oracle, saved, rtol=0, atol=1e-3 * float(saved.abs().max())):
        raise ValueError(f"{entry['testbed']} layer {entry['layer']}: the oracle measured now differs from the saved "
                         "run's; the data or the network changed: remove the run's JSON to measure every arm again")


def testbed_setup(s: Settings, testbed: Testbed) -> Setup:
    """Model (eval mode), data and the held-out oracle images of `testbed`."""
    return load_setup(ExperimentSettings(model=testbed.model, weights=testbed.weights, data=testbed.data,
                                         input_size=testbed.input_size, test_per_class=s.oracle_per_class,
                                         seed=s.seed, quick=s.quick, quiet=s.quiet))


RESULT_FIELDS = ("samples_per_class", "oracle_per_class", "ratio", "bootstrap", "random_draws", "n_study",
                 "n_study_arms", "seed", "quick")
"""The settings that decide a layer's result (threads, paths, the list of testbeds or sides do not; nor
do the arms: each arm's row depends on none of the others, and a run holds the rows of its arms)."""


def result_settings(s: Settings) -> dict:
    """The settings of `s` that decide a result (`RESULT_FIELDS`), as JSON-ready values."""
    settings = settings_json(s)
    return {f: settings[f] for f in RESULT_FIELDS}


def result_key(s: Settings, testbed: Testbed, **extra: object) -> dict:
    """What a finished run or layer must match to be reused: the result-deciding settings and the network."""
    return {"settings": result_settings(s), "model": testbed.key(), **extra}


def _same(saved: dict, key: dict) -> bool:
    """True if a saved key (which may hold more settings) agrees with `key` on every field `key` has."""
    def agree(a: object, b: object) -> bool:
        if isinstance(b, dict):
            return isinstance(a, dict) and all(agree(a.get(k), v) for k, v in b.items())
        return a == b
    return agree(saved, json.loads(json.dumps(key)))


class LayerProgress:
    """The finished layers of a run in progress, kept in `<path>.partial.json` after each layer, so
    a restart with the same result-deciding settings (`result_key`) continues with the next layer
    (each layer's result depends only on them: its draws are seeded per layer). Removed when the
    run is written."""

    def __init__(self, path: Path, key: dict) -> None:
        self.path = path.with_name(path.stem + ".partial.json")
        self.key = key
        saved = json.loads(self.path.read_text()) if self.path.exists() else {}
        same = _same(saved.get("key", {}), key)
        self.layers: dict[str, object] = saved.get("layers", {}) if same else {}
        self.earlier_seconds: float = saved.get("seconds", 0.0) if same else 0.0
        self.started = time.perf_counter()

    def seconds(self) -> float:
        """Wall seconds over every attempt."""
        return round(self.earlier_seconds + time.perf_counter() - self.started, 1)

    def put(self, layer: str, value: object) -> None:
        self.layers[layer] = value
        write_json(self.path, {"key": self.key, "layers": self.layers, "seconds": self.seconds()})

    def done(self) -> None:
        self.path.unlink(missing_ok=True)


def run_testbed(s: Settings, testbed: Testbed, path: Path | None = None) -> dict:
    """Every layer × arm of one testbed; written to `path` (default runs_dir/<name>.json). A finished
    run of the same network under the same result-deciding settings is kept and only the arms of
    `s.arms` it lacks are measured and added (their oracle checked against the saved one); arms the
    model refuses are listed with the reason under "skipped". Resumes layer by layer (`LayerProgress`)."""
    path = path or s.runs_dir / f"{testbed.name}.json"
    saved = saved_run(s, path, testbed)
    arms = missing_arms(s, saved, testbed)
    if saved is not None and not arms:
        return saved
    setup = testbed_setup(s, testbed)
    model = setup.model.eval()
    entries = {} if saved is None else {layer["layer"]: layer for layer in saved["layers"]}
    progress = LayerProgress(path, result_key(s, testbed, measured=[a.name for a in arms], extends=saved is not None))
    for name, conv in tqdm(conv_layers(model), desc=testbed.name, disable=s.quiet):
        if name not in progress.layers:
            progress.put(name, layer_rows(s, testbed.name, model, setup.data, setup.test, name, conv, arms,
                                          entries.get(name)))
    done = [progress.layers[name] for name, _ in conv_layers(model)]
    rows = in_order(s, [*(saved or {}).get("rows", []), *(r for rows, _ in done for r in rows)],
                    [name for name, _ in conv_layers(model)])
    refused = {**(saved or {}).get("skipped", {}),
               **{a: why for a in s.arms if (why := refusal_of(a, testbed.model)) is not None}}
    measured = {r["scorer"] for r in rows}
    skipped = {a: why for a, why in refused.items() if a not in measured}  # an arm refused once, measured now
    result = {"testbed": testbed.name, "model": testbed.key(),
              "settings": {**settings_json(s), "arms": list(dict.fromkeys(r["scorer"] for r in rows))},
              "machine": machine(), "oracle_images": len(setup.test[1]), "input_size": setup.data.input_size,
              "seconds": round(progress.seconds() + (saved or {}).get("seconds", 0.0), 1), "rows": rows,
              "layers": [layer for _, layer in done], "skipped": skipped}
    write_json(path, result)
    progress.done()
    return result


def saved_run(s: Settings, path: Path, testbed: Testbed) -> dict | None:
    """The run at `path` if it is a finished run of this very network (`Testbed.key`; runs written
    before the network was recorded count as its own) under the result-deciding settings of `s`, else None."""
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    same = _same({"settings": saved.get("settings", {}), "model": saved.get("model", testbed.key())},
                 result_key(s, testbed))
    return saved if same else None


def missing_arms(s: Settings, saved: dict | None, testbed: Testbed) -> list[Arm]:
    """The arms of `s.arms` that apply to the testbed's model and have no row in `saved` (all, without one)."""
    have = {r["scorer"] for r in saved["rows"]} if saved is not None else set()
    return [arm_of(a) for a in s.arms if a not in have and applies(a, testbed.model)]


def in_order(s: Settings, rows: list[dict], layers: Sequence[str]) -> list[dict]:
    """`rows` layer by layer (`layers`' order), within a layer the arms in the order of `s.arms`
    (others after them, as they came)."""
    arm, layer = {a: i for i, a in enumerate(s.arms)}, {n: i for i, n in enumerate(layers)}
    return sorted(rows, key=lambda r: (layer[r["layer"]], arm.get(r["scorer"], len(arm))))


def run_n_study(s: Settings, testbed: Testbed) -> dict:
    """ρ with the oracle and split-half reliability of `n_study_arms` for each N of `n_study`
    (images per class), every layer of `testbed`; written to runs_dir/n-study-<name>.json."""
    setup = testbed_setup(s, testbed)
    model, (images, labels) = setup.model.eval(), setup.test
    arms = [arm_of(a) for a in s.n_study_arms if applies(a, testbed.model)]
    path = s.runs_dir / f"n-study-{testbed.name}.json"
    progress = LayerProgress(path, result_key(s, testbed, n_study=True))
    for name, conv in tqdm(conv_layers(model), desc=f"N study {testbed.name}", disable=s.quiet):
        if name in progress.layers:
            continue
        oracle = oracle_losses(LayerTail(model, conv, images), labels, conv.out_channels).mean(1)
        entries = []
        for n in s.n_study:
            pool = [class_batch(model, conv, name, setup.data, c, 2 * n, seed=s.seed)
                    for c in range(len(setup.data.classes))]
            first, _ = halves(pool, n)
            for arm in arms:
                data_driven = scoring.scorer_info(arm.scorer).needs_data
                entries.append({
                    "testbed": testbed.name, "input_size": setup.data.input_size, "n": n, "layer": name,
                    "map_size": int(first[0].activations.shape[-1]), "scorer": arm.name,
                    "rho": spearman(score(arm, model, conv, name, first, s.seed), oracle),
                    "split_half": split_half(arm, model, conv, name, pool, n, s.seed) if data_driven else None,
                })
        progress.put(name, entries)
    result = {"testbed": testbed.name, "model": testbed.key(), "settings": settings_json(s),
              "machine": machine(), "oracle_images": len(labels), "seconds": progress.seconds(),
              "entries": [e for name, _ in conv_layers(model) for e in progress.layers[name]]}
    write_json(path, result)
    progress.done()
    return result


# ---------------------------------------------------------------- summary


def markdown(results: list[dict]) -> str:
    """One table per testbed: ρ [95% interval] per layer (columns) and arm (rows), then the
    mean over layers of top-20 recall, split-half reliability and layer top-1."""
    text = ["# Criteria against the oracle (Spearman ρ with the loss increase of zeroing each channel alone)", ""]
    for result in results:
        rows, layers = result["rows"], result["layers"]
        names = [layer["layer"] for layer in layers]
        header = ["scorer", *(f"{layer['layer']} ({layer['map_size']}²)" for layer in layers), "top-20 recall",
                  "split-half ρ", f"layer top-1 (r={result['settings']['ratio']})"]
        body = []
        for arm in dict.fromkeys(r["scorer"] for r in rows):
            mine = {r["layer"]: r for r in rows if r["scorer"] == arm}
            halves_ = [mine[n]["split_half"] for n in names if mine[n]["split_half"] is not None]
            top1 = [mine[n]["layer_top1"] for n in names if mine[n]["layer_top1"] is not None]
            body.append([arm, *(fmt_rho(mine[n]) for n in names),
                         f"{np.mean([mine[n]['top20_recall'] for n in names]):.2f}",
                         f"{np.mean(halves_):.2f}" if halves_ else "—", f"{np.mean(top1):.3f}" if top1 else "—"])
        random_range = np.mean([layer["random_top1_min"] for layer in layers]), np.mean(
            [layer["random_top1_max"] for layer in layers])
        text += [f"## {result['testbed']} ({result['oracle_images']} held-out images, "
                 f"{result['settings']['bootstrap']} bootstrap replicates)", "",
                 markdown_table(header, body), "",
                 f"Random draws of the same number of channels, mean over layers: worst {random_range[0]:.3f}, "
                 f"best {random_range[1]:.3f} top-1 ({result['settings']['random_draws']} draws per layer).", ""]
        text += [not_run(result["skipped"]), ""] if result.get("skipped") else []
    return "\n".join(text)


def n_study_markdown(entries: list[dict]) -> str:
    """ρ with the oracle and split-half ρ, mean over layers, per testbed, scorer and N."""
    if not entries:
        return ""
    text = ["", "## N study (images per class; mean over layers)", ""]
    for testbed in dict.fromkeys(e["testbed"] for e in entries):
        mine = [e for e in entries if e["testbed"] == testbed]
        ns = sorted({e["n"] for e in mine})
        body = []
        for arm in dict.fromkeys(e["scorer"] for e in mine):
            cells = []
            for n in ns:
                group = [e for e in mine if e["scorer"] == arm and e["n"] == n]
                rho = [e["rho"] for e in group if e["rho"] is not None]
                half = [e["split_half"] for e in group if e["split_half"] is not None]
                cells.append(f"{np.mean(rho):+.2f} / {np.mean(half):.2f}" if half else
                             f"{np.mean(rho):+.2f} / —" if rho else "—")
            body.append([arm, *cells])
        text += [f"### {testbed}: ρ with the oracle / split-half ρ", "",
                 markdown_table(["scorer", *(f"N = {n}" for n in ns)], body), ""]
    return "\n".join(text)


def plot(results: list[dict], path: Path) -> None:
    """ρ (with its interval) per layer for each arm, one panel per testbed."""
    from matplotlib import colormaps

    fig, axes = new_figure(1, len(results), size=(6.0, 4.0))
    arms = list(dict.fromkeys(r["scorer"] for result in results for r in result["rows"]))
    colour = {arm: colormaps["tab20"](i % 20) for i, arm in enumerate(arms)}  # one colour per arm, all panels
    for ax, result in zip(axes[0], results):
        names = [layer["layer"] for layer in result["layers"]]
        for arm in dict.fromkeys(r["scorer"] for r in result["rows"]):
            mine = {r["layer"]: r for r in result["rows"] if r["scorer"] == arm}
            xs = [i for i, n in enumerate(names) if mine[n]["rho"] is not None]
            ys = [mine[names[i]]["rho"] for i in xs]
            wide = arm.startswith("entropy")  # the criterion under study, drawn bold
            ax.plot(xs, ys, marker="o", label=arm, color=colour[arm], lw=2.5 if wide else 1, zorder=3 if wide else 2)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_ylim(-1, 1)
        ax.set_ylabel("Spearman ρ with the oracle")
        ax.set_title(result["testbed"])
    axes[0][-1].legend(fontsize=6, ncol=2)
    save_figure(fig, path)


def finished_testbeds(s: Settings) -> list[dict]:
    """Every testbed run in `s.runs_dir` finished under the result-deciding settings of `s`,
    whichever --testbeds asked for (shipped order, then by name)."""
    order = {name: i for i, name in enumerate(SHIPPED)}
    paths = sorted((p for p in s.runs_dir.glob("*.json") if not p.name.startswith("n-study-")
                    and ".partial." not in p.name), key=lambda p: (order.get(p.stem, len(order)), p.stem))
    results = [json.loads(p.read_text()) for p in paths]
    return [r for r in results if _same({"settings": r.get("settings", {})}, {"settings": result_settings(s)})]


def report(s: Settings) -> dict:
    """criteria.json / .md / -rho.png (and the studies' plots) from every finished run."""
    results = finished_testbeds(s)
    n_study = [e for p in sorted(s.runs_dir.glob("n-study-*.json")) if not p.name.endswith(".partial.json")
               for e in json.loads(p.read_text())["entries"]]
    map_study = map_size.finished(s)
    summary = {"machine": machine(), "settings": settings_json(s), "rows": [r for res in results for r in res["rows"]],
               "layers": [layer for res in results for layer in res["layers"]],
               "testbeds": [res["testbed"] for res in results], "map_size_study": map_study, "n_study": n_study}
    text = markdown(results) + map_size.markdown(map_study) + n_study_markdown(n_study)
    write_json(s.results / f"{s.name}.json", summary)
    write_text(s.results / f"{s.name}.md", text)
    if results:
        plot(results, s.results / f"{s.name}-rho.png")
    if map_study:
        map_size.plot(map_study, s.results / f"{s.name}-map-size.png")
    if n_study:
        map_size.plot_n_study(n_study, s.results / f"{s.name}-n-study.png")
    if not s.quiet:
        print(text)
    return summary


def finished(s: Settings, path: Path, testbed: Testbed) -> bool:
    """True if `path` holds a finished run of this very network under the result-deciding settings
    of `s` (`saved_run`; a testbed run may still lack arms, `missing_arms`)."""
    return saved_run(s, path, testbed) is not None


def resolve(s: Settings, name: str) -> Testbed:
    """The testbed called `name`: `--model`'s, a side of the map-size study (embedded-plain-<side>)
    or a shipped one."""
    if s.custom is not None and name == s.custom.name:
        return s.custom
    prefix = f"{map_size.MODEL}-"
    if name.startswith(prefix) and name[len(prefix):].isdigit():
        return map_size.testbed(s, int(name[len(prefix):]))
    if name in SHIPPED:
        return Testbed.shipped(name)
    raise UsageError(f"unknown testbed {name!r}; use one of {', '.join(SHIPPED)}, {prefix}<side> or --model")


def criteria(s: Settings, n_study_testbeds: Sequence[str] = (), map_size_study: bool = False) -> dict:
    """Run every testbed, the map-size study and the N studies not yet finished, then summarise."""
    if s.threads:
        torch.set_num_threads(s.threads)
    for name in s.testbeds:
        run_testbed(s, resolve(s, name))  # a finished run is kept, the arms it lacks added
    if map_size_study:
        map_size.run_study(s, run_testbed)
    for name in n_study_testbeds:
        if not finished(s, s.runs_dir / f"n-study-{name}.json", resolve(s, name)):
            run_n_study(s, resolve(s, name))
    return report(s)


def parse(argv: list[str] | None) -> tuple[Settings, bool, tuple[str, ...], bool]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.criteria", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke run on embedded (writes criteria-quick.*)")
    p.add_argument("--testbeds", nargs="+", help=f"shipped testbeds (default: {' '.join(SHIPPED)})")
    p.add_argument("--model", help="measure this model instead of the shipped testbeds (any name python -m prune "
                   "takes), with --weights, --data and --input-size as there")
    p.add_argument("--weights")
    p.add_argument("--data")
    p.add_argument("--input-size", type=int)
    p.add_argument("--arms", nargs="+", choices=[a.name for a in ARMS + EXTRA_ARMS])
    p.add_argument("--samples-per-class", type=int, help="N scoring images per class (split-half uses 2N)")
    p.add_argument("--oracle-per-class", type=int, help="held-out images per class for the oracle")
    p.add_argument("--bootstrap", type=int, help="bootstrap replicates of ρ")
    p.add_argument("--random-draws", type=int, help="random channel draws per layer for the layer top-1 range")
    p.add_argument("--n-study", nargs="+", default=[], metavar="TESTBED",
                   help="also run the N study (N = 25, 50, 100, 200 per class) on these testbeds "
                   "(a shipped one, embedded-plain-<side> of the map-size study, or --model's)")
    p.add_argument("--map-size-study", action="store_true",
                   help="also run the map-size study (embedded-plain trained at each of --map-sizes)")
    p.add_argument("--map-sizes", nargs="+", type=int, help="input sides of the map-size study (default 32 64 96)")
    p.add_argument("--threads", type=int)
    p.add_argument("--results", type=Path)
    p.add_argument("--quiet", action="store_true", default=None)
    p.add_argument("--report-only", action="store_true", help="summarise the finished runs, run nothing")
    args = p.parse_args(argv)
    flags = ("quick", "report_only", "n_study", "map_size_study", "model", "weights", "data", "input_size")
    given = {k: v for k, v in vars(args).items() if k not in flags and v is not None}
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}
    if args.model is not None:
        custom = Testbed(name=args.model.replace(":", "-").replace("/", "-"), model=args.model, weights=args.weights,
                         data=args.data, input_size=args.input_size)
        given.update(custom=custom, testbeds=(custom.name,))
    elif any(v is not None for v in (args.weights, args.data, args.input_size)):
        raise UsageError("--weights, --data and --input-size describe --model's network; pass --model too")
    settings = replace(PRESETS["quick" if args.quick else "full"], **given)
    return settings, args.report_only, tuple(args.n_study), args.map_size_study


def main(argv: list[str] | None = None) -> int:
    settings, report_only, n_study, map_size_study = parse(argv)
    if report_only:
        report(settings)
    else:
        criteria(settings, n_study, map_size_study)
    return 0


if __name__ == "__main__":
    raise SystemExit(exit_code(main))
