"""Shared pieces of the benchmarks and paper experiments: machine description, result paths
and writing (JSON, Markdown, PNG), the settings and flags every experiment shares, setup
loading and the `run_experiment` driver.

Every experiment takes the main CLI's `--model/--weights/--data`; with none of them it runs
on the embedded shapes10 model and data. `--quick` picks the experiment's QUICK settings
(embedded data shrunk to 30 train / 20 test images per class, less work) so that a run takes
well under a minute on 2 cores; flags given explicitly override either preset.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from prune import (
    DataBundle,
    UsageError,
    create_model,
    embedded_data,
    exit_code,
    file_digest,
    load_data,
    make_loader,
    write_bytes,
    write_json,
    write_text,
)

RESULTS = Path(__file__).resolve().parent / "results"

QUICK_PER_CLASS = {"train": 30, "test": 20}
"""Images per class of the embedded data in --quick mode."""


# ---------------------------------------------------------------- machine and tables


def machine() -> dict:
    """CPU model, core count, torch threads and versions, plus the GPU name if any."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table; floats get 4 significant digits."""
    def cell(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def not_run(skipped: Mapping[str, str]) -> str:
    """"Not run: a (why). Not run: b (why)." for the scorers or arms left out, each with its reason ("" for none)."""
    return " ".join(f"Not run: {name} ({why})." for name, why in skipped.items())


def fmt_rho(row: dict) -> str:
    """A correlation `row["rho"]` with its interval [`rho_low`, `rho_high`] when it has one ("—" for none)."""
    if row["rho"] is None:
        return "—"
    band = "" if row.get("rho_low") is None else f" [{row['rho_low']:+.2f}, {row['rho_high']:+.2f}]"
    return f"{row['rho']:+.2f}{band}"


def settings_json(settings: Any) -> dict:
    """A settings dataclass as JSON-ready values (paths as text)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()}


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for one value)."""
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0}


def spearman(a: Sequence[float] | torch.Tensor, b: Sequence[float] | torch.Tensor) -> float | None:
    """Spearman's rank correlation (ties share ranks); None when either side is constant."""
    from scipy.stats import spearmanr

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(spearmanr(x, y).statistic)


def interval(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """2.5% and 97.5% percentiles of the defined bootstrap values (None if none is)."""
    defined = [v for v in values if v is not None]
    if not defined:
        return None, None
    low, high = np.percentile(defined, [2.5, 97.5])
    return float(low), float(high)


# ---------------------------------------------------------------- settings and flags


@dataclass(frozen=True)
class ExperimentSettings:
    """What every paper experiment shares; each experiment's Settings extends it."""

    model: str = "embedded"
    weights: str | None = None
    data: str | None = None
    input_size: int | None = None
    test_per_class: int | None = None
    cls: int = 0
    seed: int = 0
    quick: bool = False
    quiet: bool = False
    threads: int | None = None
    results_dir: Path = RESULTS


@dataclass(frozen=True)
class Testbed:
    """A trained network and its data: a shipped testbed by name, or any `--model/--weights/--data`."""

    name: str
    model: str
    weights: str | None = None
    data: str | None = None
    input_size: int | None = None

    @classmethod
    def shipped(cls, name: str) -> Testbed:
        """A testbed the project ships (`embedded`, `embedded-plain`, `fashion`, `fashion-plain`)."""
        return cls(name=name, model=name)

    def key(self) -> dict:
        """This network as results record it and are reused by: its fields, with a weights *file*
        named by its content (`sha256:<hex>`), not its path, so the study networks trained into
        the checkout keep their finished runs when it is moved or cloned. A `--data` folder stays
        keyed by its path; shipped weights (None) by the model's name."""
        key = asdict(self)
        if self.weights is not None and Path(self.weights).is_file():
            key["weights"] = f"sha256:{file_digest(self.weights)}"
        return key


S = TypeVar("S")


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def int_list(text: str) -> tuple[int, ...]:
    """argparse type: comma-separated integers → sorted tuple without duplicates."""
    return tuple(sorted({int(v) for v in text.split(",") if v.strip()}))


def float_list(text: str) -> tuple[float, ...]:
    """argparse type: comma-separated numbers → tuple, in the order given."""
    return tuple(float(v) for v in text.split(",") if v.strip())


def base_parser(prog: str, doc: str, *, analysis: bool = True) -> argparse.ArgumentParser:
    """Parser with the flags every experiment shares (model/data like `python -m prune`);
    `analysis` adds --test-per-class and --class (experiments that evaluate by themselves).
    Every flag defaults to None, i.e. "as the preset" (see `parse_settings`)."""
    p = argparse.ArgumentParser(
        prog=f"python -m benchmarks.{prog}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a = p.add_argument
    a("--model", help="'embedded', a torchvision name or timm:<name> (as python -m prune; default embedded)")
    a("--weights", help="checkpoint path or torchvision weights name (default: shipped embedded weights)")
    a("--data", help="ImageFolder root with train/ and val/ (default: embedded shapes10)")
    a("--input-size", type=positive_int, help="image side (default: 32 embedded, 224 otherwise)")
    if analysis:
        a("--test-per-class", type=positive_int, help="cap on test images per class (default: all; 20 with --quick)")
        a("--class", dest="cls", type=int, help="the class studied where one class is used (default 0)")
    a("--seed", type=int, help="seed of every random choice (default 0)")
    a("--quick", action="store_true", default=None, help="small, fast mode (tests); writes <name>-quick.*")
    a("--quiet", action="store_true", default=None, help="no progress bars")
    a("--threads", type=positive_int, help="torch CPU threads (default: 1 with --quick, else torch's choice)")
    a("--results-dir", "--out", dest="results_dir", type=Path, help=f"where JSON/MD/PNG go (default {RESULTS})")
    return p


def settings_from(ns: argparse.Namespace, *, full: S, quick: S) -> S:
    """The `quick` preset if `ns.quick`, else `full`, with every field that `ns` gives (not
    None) overriding it (timm-style: None means "not given")."""
    preset = quick if getattr(ns, "quick", False) else full
    given = {f.name: getattr(ns, f.name) for f in fields(preset) if getattr(ns, f.name, None) is not None}
    return replace(preset, **given)


def parse_settings(parser: argparse.ArgumentParser, argv: list[str] | None, *, full: S, quick: S) -> S:
    """`settings_from` the parsed `argv`."""
    return settings_from(parser.parse_args(argv), full=full, quick=quick)


# ---------------------------------------------------------------- setup


@dataclass
class Setup:
    """A loaded model (eval mode, CPU) with its data; `test` is (images [N,3,s,s], labels [N])."""

    model: nn.Module
    data: DataBundle
    test: tuple[torch.Tensor, torch.Tensor]
    settings: ExperimentSettings

    @property
    def num_classes(self) -> int:
        return len(self.data.classes)


def quick_embedded_data(size: int | None = None) -> DataBundle:
    """The embedded shapes10 set, shrunk to QUICK_PER_CLASS images per class, at side `size`
    (default the embedded models' 32)."""
    return embedded_data(input_size=size, train_per_class=QUICK_PER_CLASS["train"],
                         val_per_class=QUICK_PER_CLASS["test"])


def load_bundle(s: ExperimentSettings) -> DataBundle:
    """The data the settings name; the shrunk embedded set (at --input-size) with --quick and no --data."""
    if s.data is None and s.quick:
        return quick_embedded_data(s.input_size)
    return load_data(s.data, input_size=s.input_size, model=s.model)


def dataset_tensors(
    dataset: Dataset, *, per_class: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A split as (images [N, 3, s, s], labels [N]); at most `per_class` per class (seeded)."""
    if isinstance(dataset, TensorDataset):
        images, labels = dataset.tensors[0], dataset.tensors[1].long()
        if per_class is None:
            return images, labels
        keep = _per_class_indices(labels.tolist(), per_class, seed)
        return images[keep], labels[keep]
    targets = list(getattr(dataset, "targets"))
    indices = range(len(targets)) if per_class is None else _per_class_indices(targets, per_class, seed).tolist()
    subset = torch.utils.data.Subset(dataset, list(indices))
    xs, ys = zip(*make_loader(subset, batch_size=128, shuffle=False, seed=seed))
    return torch.cat(xs), torch.cat(ys).long()


def _per_class_indices(labels: Sequence[int], per_class: int, seed: int) -> torch.Tensor:
    """Sorted indices of at most `per_class` items of each label (seeded choice)."""
    lab = torch.as_tensor(list(labels))
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for c in lab.unique().tolist():
        idx = torch.nonzero(lab == c).flatten()
        chosen.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    return torch.cat(chosen).sort().values


def load_setup(s: ExperimentSettings) -> Setup:
    """Model and data from the shared settings; the test split is read into memory once."""
    torch.manual_seed(s.seed)
    data = load_bundle(s)
    model = create_model(s.model, weights=s.weights, num_classes=len(data.classes)).eval()
    cap = s.test_per_class if s.test_per_class is not None else (QUICK_PER_CLASS["test"] if s.quick else None)
    test = dataset_tensors(data.val, per_class=cap, seed=s.seed)
    if not 0 <= s.cls < len(data.classes):
        raise UsageError(f"--class {s.cls} is not a class index; use 0..{len(data.classes) - 1}")
    return Setup(model=model, data=data, test=test, settings=s)


def setup_info(setup: Setup) -> dict:
    """What was run on: model, weights, data, sizes and the machine."""
    s = setup.settings
    return {
        "model": s.model,
        "weights": s.weights,
        "data": s.data or "embedded shapes10",
        "input_size": setup.data.input_size,
        "classes": list(setup.data.classes),
        "train_images": len(setup.data.train_targets),
        "test_images": int(len(setup.test[1])),
        "quick": bool(s.quick),
        "seed": s.seed,
        "machine": {**machine(), "torch_threads": torch.get_num_threads()},
    }


# ---------------------------------------------------------------- the driver


@contextmanager
def torch_threads(s: ExperimentSettings) -> Iterator[None]:
    """Use `--threads` torch threads (1 with --quick) inside the block, then restore.

    One thread avoids OpenMP spin-waits on a busy machine, which can cost more than the
    second core gains for these small networks.
    """
    wanted = s.threads if s.threads is not None else (1 if s.quick else None)
    before = torch.get_num_threads()
    if wanted is not None:
        torch.set_num_threads(max(1, wanted))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def stem(name: str, quick: bool) -> str:
    """File stem of an experiment's outputs: `name`, or `name-quick` in quick mode."""
    return f"{name}-quick" if quick else name


def new_figure(rows: int = 1, cols: int = 1, *, size: tuple[float, float] = (6.0, 4.0)) -> tuple[Any, Any]:
    """A matplotlib Figure and its axes [rows][cols]; no pyplot, so no backend or global state."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * cols, size[1] * rows))
    return fig, fig.subplots(rows, cols, squeeze=False)


def save_figure(fig: Any, path: Path) -> None:
    """Save a matplotlib figure as PNG atomically."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    write_bytes(path, buf.getvalue())


def write_results(
    results_dir: Path, name: str, *, quick: bool, payload: dict, markdown: str, figures: dict[str, Any], started: float
) -> dict[str, Path]:
    """Write <stem>.json (payload + runtime), <stem>.md and <stem>-<key>.png; returns the paths."""
    base = stem(name, quick)
    payload = {**payload, "runtime_s": round(time.perf_counter() - started, 1)}
    paths = {"json": results_dir / f"{base}.json", "md": results_dir / f"{base}.md"}
    for key, fig in figures.items():
        paths[key] = results_dir / f"{base}-{key}.png"
        save_figure(fig, paths[key])
    write_json(paths["json"], payload)
    write_text(paths["md"], markdown.rstrip() + f"\n\nRuntime: {payload['runtime_s']} s.\n")
    return paths


def run_experiment(
    name: str,
    settings: ExperimentSettings,
    compute: Callable[[], dict],
    markdown: Callable[[dict], str],
    figures: Callable[[dict], dict],
) -> int:
    """Compute a result under the --threads setting, write `<name>.{json,md}` and
    `<name>-*.png`, print the table unless --quiet; the exit code (prune.errors.exit_code: 2 with one
    line on bad input, 1 with the traceback saved for a bug)."""
    started = time.perf_counter()

    def body() -> None:
        result = compute()
        text = markdown(result)
        write_results(settings.results_dir, name, quick=settings.quick, payload=result, markdown=text,
                      figures=figures(result), started=started)
        if not settings.quiet:
            print(text)

    with torch_threads(settings):
        return exit_code(body)


def random_image_folder(root: Path, *, classes: int, train_per_class: int, val_per_class: int, side: int,
                        seed: int = 0) -> Path:
    """An ImageFolder (`train/<class>/`, `val/<class>/`) of random `side`² RGB PNGs at `root`, made
    once: written beside it and renamed into place, so an interrupted attempt leaves no half set
    (a leftover of one is replaced). Classes are named c00, c01, …"""
    import numpy as np
    from PIL import Image

    if root.is_dir():
        return root
    building = root.with_name(root.name + ".partial")
    shutil.rmtree(building, ignore_errors=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for cls in range(classes):
            folder = building / split / f"c{cls:02d}"
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    os.replace(building, root)
    return root
