"""Does the oracle predict the outcome? The criteria benchmark's oracle measures against the scorer
comparison's fine-tuned top-1, from the committed results only.

    python -m benchmarks.trust                     # reads and writes benchmarks/results
    python -m benchmarks.trust --bootstrap 5000

`benchmarks.criteria` ranks criteria by how they agree with the oracle (the loss increase when one
channel is zeroed), `benchmarks.compare` by the top-1 after pruning and fine-tuning, on the same
testbeds. Per testbed, over the criteria present in both `criteria.json` and `compare.json` (named
in the output):

- **across criteria**: Spearman ρ and Kendall τ-b between each oracle measure of a criterion
  (`oracle_rho`: its Spearman ρ with the oracle, mean over layers; `oracle_layer_top1`: top-1 with
  the lowest-scored half of one layer zeroed, mean over layers) and its mean fine-tuned top-1;
- **across runs**: Kendall τ-b between top-1 right after pruning and after fine-tuning over every
  run of the testbed (all arms and seeds).

Each with a 95% percentile bootstrap interval over seeds: `bootstrap` resamples of the testbed's
compare seeds with replacement (one draw for every arm, so arms stay paired by seed; a stream per
testbed seeded by `seed` and its name), each arm's mean recomputed over its runs at the drawn seeds
(repeats counted), then the correlation. The oracle measures are held fixed: that interval is the
seeds' noise in the outcome only. Across criteria a second interval resamples the criteria too
(with replacement, beside the seeds): how far the correlation rests on the handful of criteria there are.

Reads benchmarks/results/criteria.json, compare.json and the per-run files
compare/<testbed>/<arm>-sNNN.json made under compare.json's settings (whose count per arm must
match compare.json); writes
trust.json and trust.md.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np

from benchmarks import compare
from benchmarks.common import RESULTS, interval, markdown_table, positive_int, settings_json
from prune import exit_code, write_json, write_text
from scoring.control import layer_seed

MEASURES = {"oracle_rho": "ρ with the oracle (mean over layers)",
            "oracle_layer_top1": "layer top-1, half zeroed (mean over layers)"}
"""The oracle measures of a criterion in criteria.json, and how the tables name them."""


@dataclass(frozen=True)
class Settings:
    """Where the results are and how the intervals are drawn."""

    results: Path = RESULTS
    bootstrap: int = 2000
    seed: int = 0
    name: str = "trust"


@dataclass(frozen=True)
class Runs:
    """One testbed's compare runs as arrays: `top1` and `pruned` [A, S] (NaN where arm a has no run
    at seeds[s]), arms in compare.json's order."""

    arms: tuple[str, ...]
    seeds: tuple[int, ...]
    top1: np.ndarray
    pruned: np.ndarray

    @property
    def has(self) -> np.ndarray:
        """[A, S] True where the arm has a run at the seed."""
        return ~np.isnan(self.top1)

    def only(self, arms: Sequence[str]) -> Runs:
        """These arms' runs."""
        rows = [self.arms.index(a) for a in arms]
        return Runs(arms=tuple(arms), seeds=self.seeds, top1=self.top1[rows], pruned=self.pruned[rows])

    def means(self, counts: np.ndarray) -> np.ndarray:
        """Each arm's mean fine-tuned top-1 [B, A] with seed s counted counts[b, s] times; NaN
        where an arm has none of the drawn seeds."""
        weights = counts[:, None, :] * self.has[None]  # [B, A, S]
        with np.errstate(invalid="ignore", divide="ignore"):
            return (weights * np.nan_to_num(self.top1)[None]).sum(-1) / weights.sum(-1)

    def mean_top1(self) -> np.ndarray:
        """Each arm's mean fine-tuned top-1 over its runs [1, A]."""
        return self.means(np.ones((1, len(self.seeds))))


# ---------------------------------------------------------------- reading the committed results


def oracle_measures(criteria: dict) -> dict[str, dict[str, dict[str, float | None]]]:
    """testbed → criterion → each of MEASURES, the mean over the layers where it is defined (None on none)."""
    out: dict[str, dict[str, dict[str, list[float]]]] = {}
    for row in criteria["rows"]:
        cell = out.setdefault(row["testbed"], {}).setdefault(row["scorer"], {k: [] for k in MEASURES})
        for measure, key in (("oracle_rho", "rho"), ("oracle_layer_top1", "layer_top1")):
            if row[key] is not None:
                cell[measure].append(row[key])
    return {tb: {arm: {k: float(np.mean(v)) if v else None for k, v in cell.items()} for arm, cell in arms.items()}
            for tb, arms in out.items()}


def compare_settings(compare_json: dict, results: Path) -> compare.Settings:
    """The comparison's settings as compare.json records them, its runs under `results`."""
    def frozen(value: object) -> object:
        return tuple(frozen(v) for v in value) if isinstance(value, list) else value

    known = {f.name for f in fields(compare.Settings)} - {"results"}
    given = {k: frozen(v) for k, v in compare_json["settings"].items() if k in known}
    return replace(compare.Settings(), results=results, **given)


def read_runs(compare_json: dict, results: Path) -> dict[str, Runs]:
    """testbed → its runs: the per-run files of every (testbed, arm) row of compare.json made under
    its settings (`compare.is_current`; a file left from other settings is not read)."""
    settings = compare_settings(compare_json, results)
    out = {}
    for testbed in dict.fromkeys(r["testbed"] for r in compare_json["rows"]):
        rows = [r for r in compare_json["rows"] if r["testbed"] == testbed]
        entries = {r["scorer"]: [e for p in sorted((settings.runs_dir / testbed).glob(f"{r['scorer']}-s*.json"))
                                 if compare.is_current(settings, e := json.loads(p.read_text()))] for r in rows}
        for r in rows:
            if len(entries[r["scorer"]]) != r["seeds"]:
                raise ValueError(f"{settings.runs_dir / testbed}: {len(entries[r['scorer']])} runs of {r['scorer']} under "
                                 f"compare.json's settings, it has {r['seeds']}; run `python -m benchmarks.compare "
                                 "--report-only`")
        out[testbed] = as_arrays(entries)
    return out


def as_arrays(entries: dict[str, list[dict]]) -> Runs:
    """Runs of one testbed, arm → its run entries (keys seed, top1, top1_pruned)."""
    seeds = tuple(sorted({e["seed"] for runs in entries.values() for e in runs}))
    column = {s: i for i, s in enumerate(seeds)}
    top1, pruned = (np.full((len(entries), len(seeds)), np.nan) for _ in range(2))
    for a, runs in enumerate(entries.values()):
        for e in runs:
            top1[a, column[e["seed"]]], pruned[a, column[e["seed"]]] = e["top1"], e["top1_pruned"]
    return Runs(arms=tuple(entries), seeds=seeds, top1=top1, pruned=pruned)


# ---------------------------------------------------------------- rank correlations, many rows at once


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, NaN where den is 0 (a constant side)."""
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's ρ of each row of x and y [B, n] (broadcast; ties share their average rank) [B];
    NaN where a row is constant."""
    from scipy.stats import rankdata

    rx, ry = (rankdata(np.atleast_2d(v), axis=-1) for v in (x, y))
    rx, ry = rx - rx.mean(-1, keepdims=True), ry - ry.mean(-1, keepdims=True)
    return _ratio((rx * ry).sum(-1), np.sqrt((rx * rx).sum(-1) * (ry * ry).sum(-1)))


def kendall_rows(x: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Kendall's τ-b of x and y, each [n] (shared) or [B, n] (one per row), [B]; observation i of
    row b counted weights[b, i] times (weights [n] or [B, n], default once), as if repeated; NaN
    where a side is constant. Over pairs i ≠ j with w = w_i·w_j:
    Σ w·sign(Δx)·sign(Δy) / √(Σ w·|sign(Δx)| · Σ w·|sign(Δy)|). A side given per row takes
    [B, n, n] memory: meant for a few criteria, not for many runs."""
    sx, sy = (np.sign(v[..., :, None] - v[..., None, :]) for v in (np.asarray(x, float), np.asarray(y, float)))
    w = np.atleast_2d(np.ones(sx.shape[-1]) if weights is None else np.asarray(weights, float))

    def form(m: np.ndarray) -> np.ndarray:  # w_bᵀ m w_b per row
        return (w[:, None, :] @ m @ w[:, :, None])[..., 0, 0]

    return _ratio(form(sx * sy), np.sqrt(form(np.abs(sx)) * form(np.abs(sy))))


STATISTICS: dict[str, Callable[..., np.ndarray]] = {"spearman": spearman_rows, "kendall": kendall_rows}
NAMES = {"spearman": "Spearman ρ", "kendall": "Kendall τ-b"}


# ---------------------------------------------------------------- the two questions


def resamples(s: Settings, testbed: str, size: int, what: str) -> np.ndarray:
    """[B, size] indices drawn with replacement from range(size), one row per resample, from a
    stream of their own (`s.seed`, the testbed, `what` is resampled)."""
    rng = np.random.default_rng(layer_seed(s.seed, f"{testbed}/{what}"))
    return rng.integers(0, size, (s.bootstrap, size))


def seed_counts(s: Settings, testbed: str, seeds: int) -> np.ndarray:
    """[B, S]: how often each of `seeds` seeds is drawn in each of the `s.bootstrap` resamples."""
    return np.stack([np.bincount(d, minlength=seeds) for d in resamples(s, testbed, seeds, "seeds")])


def point(values: np.ndarray) -> float | None:
    """The one value of a [1] result (None for NaN)."""
    return None if np.isnan(values[0]) else float(values[0])


def band(replicates: np.ndarray) -> list[float | None]:
    """The 95% percentile interval [low, high] of the defined (not NaN) replicates."""
    return list(interval([float(v) for v in replicates if not np.isnan(v)]))


def across_criteria(s: Settings, testbed: str, measures: dict[str, dict[str, float | None]], runs: Runs,
                    counts: np.ndarray) -> list[dict]:
    """Per oracle measure: Spearman and Kendall over the criteria of `runs.arms` between the measure
    and the mean fine-tuned top-1, with two 95% intervals: over the seed resamples `counts`
    ("seeds_95"), and with the criteria resampled too ("criteria_seeds_95")."""
    top1 = runs.mean_top1()
    means = runs.means(counts)
    kept = ~np.isnan(means).any(axis=1)  # a resample that misses every seed of an arm is left out
    means = means[kept]
    picks = resamples(s, testbed, len(runs.arms), "criteria")[kept]
    out = []
    for measure in MEASURES:
        x = np.array([measures[a][measure] for a in runs.arms])
        entry = {"measure": measure, "replicates": int(kept.sum())}
        for name, rows in STATISTICS.items():
            entry[name] = point(rows(x, top1))
            entry[f"{name}_seeds_95"] = band(rows(x, means))
            entry[f"{name}_criteria_seeds_95"] = band(rows(x[picks], np.take_along_axis(means, picks, axis=1)))
        out.append(entry)
    return out


def across_runs(runs: Runs, counts: np.ndarray) -> dict:
    """Kendall τ-b between top-1 after pruning and after fine-tuning over every run, with its
    interval over the seed resamples `counts` (a run counted as often as its seed is drawn)."""
    has = runs.has
    weights = np.broadcast_to(counts[:, None, :], (len(counts), *has.shape))[:, has]  # [B, runs]
    pruned, top1 = runs.pruned[has], runs.top1[has]
    return {"runs": int(has.sum()), "replicates": len(counts), "kendall": point(kendall_rows(pruned, top1)),
            "kendall_seeds_95": band(kendall_rows(pruned, top1, weights))}


def testbed_entry(s: Settings, testbed: str, measures: dict[str, dict[str, float | None]], runs: Runs) -> dict:
    """Everything trust.json says about one testbed: the criteria are the compare arms with every
    oracle measure in criteria.json; "only_in_compare" the other arms, "only_in_criteria" the criteria
    compare did not run."""
    both = tuple(a for a in runs.arms if a in measures and None not in measures[a].values())
    mine = runs.only(both)
    counts = seed_counts(s, testbed, len(runs.seeds))
    top1 = mine.mean_top1()[0]
    return {
        "testbed": testbed, "criteria": list(both), "seeds": len(runs.seeds),
        "only_in_criteria": [a for a in measures if a not in runs.arms],
        "only_in_compare": [a for a in runs.arms if a not in both],
        "per_criterion": [{"scorer": a, **measures[a], "top1": float(t), "seeds": int(mine.has[i].sum())}
                          for i, (a, t) in enumerate(zip(both, top1))],
        "across_criteria": across_criteria(s, testbed, measures, mine, counts),
        "across_runs": across_runs(runs, counts),
    }


# ---------------------------------------------------------------- report


def fmt(entry: dict, key: str) -> str:
    """The correlation `entry[key]` ("—" where undefined)."""
    return "—" if entry[key] is None else f"{entry[key]:+.2f}"


def fmt_band(band_: list[float | None]) -> str:
    """An interval [low, high] ("—" where undefined)."""
    low, high = band_
    return "—" if low is None else f"[{low:+.2f}, {high:+.2f}]"


def markdown(s: Settings, testbeds: list[dict]) -> str:
    """The method in a paragraph, then a section per testbed (`testbed_markdown`)."""
    return "\n".join([
        "# Does the oracle predict the outcome?", "",
        "Rank correlations between a criterion's agreement with the oracle (`benchmarks.criteria`) and its mean "
        "fine-tuned top-1 (`benchmarks.compare`), across the criteria in both; and between top-1 right after pruning "
        "and after fine-tuning, across runs. Intervals are 95% percentile bootstrap intervals from "
        f"{s.bootstrap} resamples (seed {s.seed}), resampling the compare seeds only (the oracle measures held "
        "fixed: the outcome's seed-to-seed noise) or the criteria as well (how far the correlation rests on these "
        "few criteria).", "", *(testbed_markdown(t) for t in testbeds)])


def testbed_markdown(t: dict) -> str:
    """One testbed: which criteria, the correlations across them and across runs, the data they come from."""
    named = [f"Criteria: {', '.join(t['criteria'])}."]
    named += [f"Only in {where}.json: {', '.join(t[key])}." for where, key in
              (("criteria", "only_in_criteria"), ("compare", "only_in_compare")) if t[key]]
    across = markdown_table(
        ["oracle measure → mean fine-tuned top-1", "statistic", "value", "95%, seeds resampled",
         "95%, criteria and seeds resampled"],
        [[MEASURES[e["measure"]], NAMES[k], fmt(e, k), fmt_band(e[f"{k}_seeds_95"]),
          fmt_band(e[f"{k}_criteria_seeds_95"])] for e in t["across_criteria"] for k in STATISTICS])
    data = markdown_table(
        ["criterion", "ρ with the oracle", "layer top-1, half zeroed", "fine-tuned top-1", "seeds"],
        [[c["scorer"], f"{c['oracle_rho']:+.2f}", f"{c['oracle_layer_top1']:.3f}", f"{c['top1']:.4f}", c["seeds"]]
         for c in t["per_criterion"]])
    runs = t["across_runs"]
    return "\n".join([
        f"## {t['testbed']} ({len(t['criteria'])} criteria, {t['seeds']} seeds)", "", " ".join(named), "", across, "",
        f"Across its {runs['runs']} runs (every arm and seed): Kendall τ between top-1 right after pruning and after "
        f"fine-tuning {fmt(runs, 'kendall')}, 95% {fmt_band(runs['kendall_seeds_95'])} (seeds resampled).", "",
        data, ""])


def read(path: Path) -> dict:
    """A committed summary; FileNotFoundError naming the benchmark that writes it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run `python -m benchmarks.{path.stem}` (or pass --results)")
    return json.loads(path.read_text())


def summary(s: Settings) -> dict:
    """What trust.json holds, from the committed criteria and compare results (writes nothing)."""
    criteria, compare_json = read(s.results / "criteria.json"), read(s.results / "compare.json")
    measures = oracle_measures(criteria)
    runs = read_runs(compare_json, s.results)
    testbeds = [testbed_entry(s, tb, measures[tb], runs[tb]) for tb in runs if tb in measures]
    return {"settings": settings_json(s), "measures": MEASURES, "testbeds": testbeds}


def trust(s: Settings) -> dict:
    """Write trust.json and trust.md (`summary`); return the JSON's content."""
    result = summary(s)
    write_json(s.results / f"{s.name}.json", result)
    write_text(s.results / f"{s.name}.md", markdown(s, result["testbeds"]))
    return result


def parse(argv: list[str] | None) -> Settings:
    p = argparse.ArgumentParser(prog="python -m benchmarks.trust", description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, help="results folder read and written (default benchmarks/results)")
    p.add_argument("--bootstrap", type=positive_int, help="bootstrap resamples (default 2000)")
    p.add_argument("--seed", type=int, help="seed of the resamples (default 0)")
    args = p.parse_args(argv)
    return replace(Settings(), **{k: v for k, v in vars(args).items() if v is not None})


def main(argv: list[str] | None = None) -> int:
    trust(parse(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(exit_code(main))
