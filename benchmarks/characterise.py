"""How feature entropy depends on its ingredients (paper Table 5, A.2, A.4).

    python -m benchmarks.characterise [--quick] [--layer NAME] [--class C]

1. Table 5 — the entropy of three characterisations of each unit's first Betti curve over
   the class's images: the birth time (the fast engine), the maximum of β1 and its integral
   over the filtration steps (full gudhi persistence, `scoring.topology.betti1_curve`; 0 =
   the curve is 0 everywhere, counted like "no birth"). Rows: the reference unit, the mean
   over the layer's units, and that mean averaged over classes. Units and images are
   subsampled (`--max-units`, `--max-images`) to keep gudhi fast.
2. A.2 — clique vs cubical complex, per conv layer: fraction of (unit, image) pairs with no
   birth and the mean feature entropy, clique (paper) vs gudhi CubicalComplex on −U.
3. A.4 — sample size: feature entropy of the reference unit and the layer mean for N training
   images per class (10, 25, 50, 100, 200 and all), over repeated random subsets (mean ± std).

The reference unit is the one `benchmarks.units` uses (lowest entropy among the units with a
birth on at least half of the images of the class).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from benchmarks.common import (
    ExperimentSettings,
    Setup,
    base_parser,
    int_list,
    load_setup,
    markdown_table,
    mean_std,
    new_figure,
    parse_settings,
    positive_int,
    run_experiment,
    setup_info,
)
from benchmarks.layers import class_batch, conv_layers, find_conv, layer_entropy, per_class_count, pick_unit
from prune import exit_code
from scoring.entropy import feature_entropy, selective_rate
from scoring.topology import betti1_curve, birth_times, cubical_birth_times

CHARACTERISATIONS = ("birth_time", "betti1_max", "betti1_integral")


@dataclass(frozen=True)
class Settings(ExperimentSettings):
    """The three parts' work; `table_classes` None = all classes."""

    layer: str | None = None
    samples_per_class: int = 100
    max_units: int = 64
    max_images: int = 100
    table_classes: int | None = None
    sizes: tuple[int, ...] = (10, 25, 50, 100, 200)
    repeats: int = 100


FULL = Settings()
QUICK = Settings(quick=True, samples_per_class=20, max_units=6, max_images=20, table_classes=2, repeats=5)


def parse_args(argv: list[str] | None) -> Settings:
    p = base_parser("characterise", __doc__)
    a = p.add_argument
    a("--layer", help="conv layer of Table 5 and A.4 (default: the last conv)")
    a("--samples-per-class", type=positive_int, help="training images per class (100; 20 quick)")
    a("--max-units", type=positive_int, help="units per layer in the gudhi parts (64; 6 quick)")
    a("--max-images", type=positive_int, help="images per class in the gudhi parts (100; 20 quick)")
    a("--table-classes", type=positive_int, help="classes averaged in Table 5 and A.2 (all; 2 quick)")
    a("--sizes", type=int_list, help="sample sizes of A.4 (10,25,50,100,200; those above the class size are dropped)")
    a("--repeats", type=positive_int, help="random subsets per sample size (100; 5 quick)")
    return parse_settings(p, argv, full=FULL, quick=QUICK)


def classes_of(setup: Setup) -> list[int]:
    return sorted({setup.settings.cls, *range(setup.num_classes)[: setup.settings.table_classes]})


def subsample(acts: torch.Tensor, units: list[int], max_images: int) -> torch.Tensor:
    """acts [N, C, m, m] → [min(N, max_images), len(units), m, m]."""
    return acts[:max_images, units]


def unit_subset(channels: int, max_units: int, must: int | None, *, seed: int) -> list[int]:
    """Up to `max_units` channel indices (seeded choice), always including `must`."""
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(channels, generator=g)[:max_units].tolist()
    if must is not None and must not in chosen:
        chosen[-1] = must
    return sorted(chosen)


# ---------------------------------------------------------------- Table 5


def characterise(maps: torch.Tensor) -> dict[str, np.ndarray]:
    """maps [N, U, m, m] → per characterisation an int array [U, N] (0 = none) and timings."""
    n, u = maps.shape[:2]
    start = time.perf_counter()
    births = birth_times(maps).T
    t_birth = time.perf_counter() - start
    mx, integral = np.zeros((u, n), np.int64), np.zeros((u, n), np.int64)
    start = time.perf_counter()
    for i in range(n):
        for j in range(u):
            curve = betti1_curve(maps[i, j])
            mx[j, i], integral[j, i] = curve.max(initial=0), curve.sum()
    t_curve = time.perf_counter() - start
    return {"birth_time": births, "betti1_max": mx, "betti1_integral": integral,
            "seconds": np.array([t_birth, t_curve]) / max(1, n * u)}


def table5(setup: Setup, layer: str, unit: int, units: list[int], acts: dict[int, torch.Tensor]) -> dict:
    """Feature entropy with each characterisation: reference unit, layer mean, class mean."""
    cfg = setup.settings
    per_class = {}
    for c in tqdm(acts, desc="Table 5 (gudhi)", disable=cfg.quiet):
        values = characterise(subsample(acts[c], units, cfg.max_images))
        per_class[c] = {k: feature_entropy(values[k]) for k in CHARACTERISATIONS}
        per_class[c]["seconds"] = values["seconds"]
    ref = units.index(unit)
    rows = {
        "reference unit": {k: float(per_class[cfg.cls][k][ref]) for k in CHARACTERISATIONS},
        "layer": {k: float(per_class[cfg.cls][k].mean()) for k in CHARACTERISATIONS},
        f"layer ({len(acts)} classes)": {k: float(np.mean([per_class[c][k].mean() for c in acts])) for k in CHARACTERISATIONS},
    }
    sec = np.mean([per_class[c]["seconds"] for c in acts], axis=0)
    return {"layer": layer, "units": units, "rows": rows, "ms_per_map": {"birth_time": 1e3 * sec[0], "betti1_curve": 1e3 * sec[1]}}


# ---------------------------------------------------------------- A.2


def clique_vs_cubical(setup: Setup, n: int) -> list[dict]:
    """Per conv layer: no-birth fraction and mean feature entropy, clique vs cubical."""
    cfg, model = setup.settings, setup.model
    rows = []
    for li, (name, conv) in enumerate(tqdm(conv_layers(model), desc="A.2 cubical", disable=cfg.quiet)):
        units = unit_subset(conv.out_channels, cfg.max_units, None, seed=cfg.seed + li)
        stats = {"clique": [], "cubical": []}
        for c in classes_of(setup):
            maps = subsample(class_batch(model, conv, name, setup.data, c, n, seed=cfg.seed).activations, units, cfg.max_images)
            for kind, births in (("clique", birth_times(maps).T), ("cubical", cubical_birth_times(maps).T)):
                stats[kind].append((1.0 - selective_rate(births).mean(), feature_entropy(births).mean()))
        row = {"layer": name, "map_size": int(maps.shape[-1]), "units": len(units)}
        for kind, vals in stats.items():
            row[f"{kind}_no_birth"] = float(np.mean([v[0] for v in vals]))
            row[f"{kind}_entropy"] = float(np.mean([v[1] for v in vals]))
        rows.append(row)
    return rows


# ---------------------------------------------------------------- A.4


def sample_size(setup: Setup, layers: list[str], unit: int, unit_layer: str) -> dict:
    """Layer means of feature entropy (and that of `unit` in `unit_layer`) vs images per class."""
    cfg, model = setup.settings, setup.model
    total = per_class_count(setup.data, 10**9)
    sizes = [s for s in cfg.sizes if s < total] + [total]
    g = np.random.default_rng(cfg.seed)
    out: dict = {"sizes": sizes, "class_images": total, "layers": {}}
    for name in layers:
        conv = find_conv(model, name)[1]
        acts = class_batch(model, conv, name, setup.data, cfg.cls, total, seed=cfg.seed).activations
        births = birth_times(acts).T  # [C, total]
        per_size = []
        for s in sizes:
            reps = 1 if s == total else cfg.repeats
            layer_means, unit_vals = [], []
            for _ in range(reps):
                h = feature_entropy(births[:, g.choice(total, size=s, replace=False)])
                layer_means.append(h.mean())
                unit_vals.append(h[unit] if name == unit_layer else np.nan)
            unit_stat = mean_std(unit_vals) if name == unit_layer else None
            per_size.append({"size": s, "repeats": reps, "layer": mean_std(layer_means), "unit": unit_stat})
        out["layers"][name] = per_size
    return out


# ---------------------------------------------------------------- report


def run_characterise(setup: Setup) -> dict:
    cfg, model = setup.settings, setup.model
    layer, conv = find_conv(model, cfg.layer)
    n = per_class_count(setup.data, cfg.samples_per_class)
    acts = {c: class_batch(model, conv, layer, setup.data, c, n, seed=cfg.seed).activations for c in classes_of(setup)}
    unit = pick_unit(*layer_entropy(acts[cfg.cls]))
    units = unit_subset(conv.out_channels, cfg.max_units, unit, seed=cfg.seed)
    names = [nm for nm, _ in conv_layers(model)]
    a4_layers = names[max(0, names.index(layer) - 1) : names.index(layer) + 1]
    return {
        "experiment": "characterisations (paper Table 5, A.2, A.4)",
        "setup": setup_info(setup),
        "layer": layer,
        "unit": unit,
        "class": cfg.cls,
        "class_name": setup.data.classes[cfg.cls],
        "samples_per_class": n,
        "max_images": cfg.max_images,
        "table5": table5(setup, layer, unit, units, acts),
        "cubical": clique_vs_cubical(setup, n),
        "sample_size": sample_size(setup, a4_layers, unit, layer),
    }


def markdown(r: dict) -> str:
    t5, ss = r["table5"], r["sample_size"]
    a4 = []
    for name, rows in ss["layers"].items():
        for w in rows:
            u = w["unit"]
            a4.append([name, w["size"], w["repeats"], f"{w['layer']['mean']:.4f} ± {w['layer']['std']:.4f}",
                       "-" if u is None else f"{u['mean']:.4f} ± {u['std']:.4f}"])
    return "\n\n".join(
        [
            f"## Characterisations — layer `{r['layer']}`, reference unit {r['unit']}, class {r['class']} ({r['class_name']!r})",
            f"### Table 5 — feature entropy by characterisation ({len(t5['units'])} units, ≤ {r['max_images']} images per class)",
            markdown_table(["", "birth time", "maximum of β1", "integral of β1"],
                           [[k, *[v[c] for c in CHARACTERISATIONS]] for k, v in t5["rows"].items()]),
            f"Time per map: birth time {t5['ms_per_map']['birth_time']:.4f} ms (engine), "
            f"full Betti curve {t5['ms_per_map']['betti1_curve']:.3f} ms (gudhi).",
            "### A.2 — clique vs cubical complex (mean over sampled units and classes)",
            markdown_table(
                ["layer", "map", "units", "no birth (clique)", "no birth (cubical)", "H clique", "H cubical"],
                [[w["layer"], f"{w['map_size']}×{w['map_size']}", w["units"], w["clique_no_birth"], w["cubical_no_birth"],
                  w["clique_entropy"], w["cubical_entropy"]] for w in r["cubical"]],
            ),
            f"### A.4 — sample size (class {r['class']}, {ss['class_images']} training images; mean ± std over random subsets)",
            markdown_table(["layer", "images", "subsets", "layer mean H", f"unit {r['unit']} H"], a4),
        ]
    )


def figures(r: dict) -> dict:
    figs = {}
    fig, ax = new_figure(1, 1, size=(6, 3.5))
    rows = r["table5"]["rows"]
    x = np.arange(len(rows))
    for i, c in enumerate(CHARACTERISATIONS):
        ax[0][0].bar(x + (i - 1) * 0.27, [v[c] for v in rows.values()], 0.27, label=c)
    ax[0][0].set_xticks(x, list(rows))
    ax[0][0].set_ylabel("feature entropy (nats)")
    ax[0][0].legend()
    figs["table5"] = fig
    fig, ax = new_figure(1, 2, size=(5, 3.5))
    names = [w["layer"] for w in r["cubical"]]
    for kind in ("clique", "cubical"):
        ax[0][0].plot(names, [w[f"{kind}_no_birth"] for w in r["cubical"]], "o-", label=kind)
        ax[0][1].plot(names, [w[f"{kind}_entropy"] for w in r["cubical"]], "o-", label=kind)
    ax[0][0].set_ylabel("fraction with no birth")
    ax[0][1].set_ylabel("feature entropy")
    for a in ax[0]:
        a.tick_params(axis="x", rotation=45)
        a.legend()
    figs["cubical"] = fig
    fig, ax = new_figure(1, 2, size=(5, 3.5))
    for name, rows_ in r["sample_size"]["layers"].items():
        s = [w["size"] for w in rows_]
        for col, key in enumerate(("layer", "unit")):
            if rows_[0][key] is None:
                continue
            ax[0][col].errorbar(s, [w[key]["mean"] for w in rows_], [w[key]["std"] for w in rows_], marker="o", capsize=3, label=name)
    ax[0][0].set_ylabel("layer mean feature entropy")
    ax[0][1].set_ylabel(f"unit {r['unit']} feature entropy")
    for a in ax[0]:
        a.set_xscale("log")
        a.set_xlabel("images per class")
        a.legend()
    figs["sample_size"] = fig
    return figs


def main(argv: list[str] | None = None) -> int:
    """Run the three parts and write characterise.{json,md} and characterise-*.png; returns 0."""
    s = parse_args(argv)
    return run_experiment("characterise", s, lambda: run_characterise(load_setup(s)), markdown, figures)


if __name__ == "__main__":
    raise SystemExit(exit_code(main))
