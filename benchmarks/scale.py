"""What a real network costs to prune on a CPU: the main job's wall time per stage, in units of one
forward of its scoring images through the unpruned network.

    python -m benchmarks.scale                          # VGG16 and ResNet-50, entropy / l1 / tp-taylor (hours)
    python -m benchmarks.scale --models vgg16 --scorers l1
    python -m benchmarks.scale --quick                  # a small network and data set, to try it
    python -m benchmarks.scale --report                 # only rewrite the summary

Each (model, scorer) is one `python -m prune` process on random weights (the cost does not depend
on them) over a generated ImageFolder of random `--input-size`² images: K = `--classes` classes
of N = `--samples-per-class` scoring images, `--val-per-class` validation images, no fine-tuning,
`--threads` torch threads. Recorded: the process's wall time (imports included) and report.json's
stage timings. The unit, measured once per model and CPU model in a process of its own with the same
threads: one forward of the K·N scoring images (batch 32, eval mode, no grad) through the unpruned
network; a run is divided by the unit of the CPU it ran on (none measured there: no ratio).
One result file per run under benchmarks/results/scale/ (a finished run is not redone); the
summary, of every run file at those settings whatever the models and scorers asked for, is
benchmarks/results/scale-k<K>-n<N>-<side>[-t<threads>].json and .md (the load average at each run's end beside it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.common import RESULTS, machine, markdown_table, random_image_folder
from prune import exit_code, write_json, write_text


@dataclass(frozen=True)
class Settings:
    """What `benchmarks.scale` runs (the full preset is the issue's: VGG16 and ResNet-50 at 224², K = 10, N = 100)."""

    models: tuple[str, ...] = ("vgg16", "resnet50")
    scorers: tuple[str, ...] = ("entropy", "l1", "tp-taylor")
    classes: int = 10
    samples_per_class: int = 100
    val_per_class: int = 5
    input_size: int = 224
    threads: int = 2
    ratio: float = 0.5


QUICK = Settings(models=("resnet18",), scorers=("l1", "entropy"), classes=2, samples_per_class=8, val_per_class=2,
                 input_size=64)


def data_folder(s: Settings) -> Path:
    """The generated ImageFolder for `s` (made once, in the temp folder)."""
    name = f"topoprune-scale-k{s.classes}-n{s.samples_per_class}-v{s.val_per_class}-{s.input_size}"
    return random_image_folder(Path(tempfile.gettempdir()) / name, classes=s.classes,
                               train_per_class=s.samples_per_class, val_per_class=s.val_per_class, side=s.input_size)


def forward_seconds(model: str, s: Settings) -> float:
    """Seconds of one forward of K·N random images (batch 32, eval, no grad) through unpruned `model`,
    after one warm-up batch; in this process, with `s.threads` threads."""
    import torch

    from prune import create_model

    torch.set_num_threads(s.threads)
    net = create_model(model, num_classes=s.classes, pretrained=False).eval()
    images = s.classes * s.samples_per_class
    batch = torch.randn(32, 3, s.input_size, s.input_size)
    with torch.no_grad():
        net(batch[:2])
        start = time.perf_counter()
        for first in range(0, images, 32):
            net(batch[: min(32, images - first)])
        return time.perf_counter() - start


def prune_argv(model: str, scorer: str, s: Settings, data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "prune", "--model", model, "--scorer", scorer, "--data", str(data),
            "--classes", str(s.classes), "--samples-per-class", str(s.samples_per_class),
            "--input-size", str(s.input_size), "--ratio", str(s.ratio), "--no-finetune", "--quiet",
            "--out", str(out)]


def one_run(model: str, scorer: str, s: Settings, data: Path) -> dict:
    """The main job on `model` with `scorer` as a process of its own: wall seconds and report.json's timings."""
    env = {**os.environ, "OMP_NUM_THREADS": str(s.threads), "MKL_NUM_THREADS": str(s.threads)}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        start = time.perf_counter()
        done = subprocess.run(prune_argv(model, scorer, s, data, out), capture_output=True, text=True, env=env)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            return {"model": model, "scorer": scorer, "exit": done.returncode, "wall_s": wall,
                    "error": (done.stdout + done.stderr).strip().splitlines()[-1:]}
        report = json.loads((out / "report.json").read_text())
    return {"model": model, "scorer": scorer, "exit": 0, "wall_s": round(wall, 2), "timings": report["timings"],
            "threads": report["before"]["throughput"]["threads"], "load_average_1_5_15": list(os.getloadavg())}


def tag(s: Settings) -> str:
    """The settings a result file depends on, in its name: k<K>-n<N>-<side>, and -t<threads> where
    the threads are not the default's (2)."""
    threads = "" if s.threads == Settings.threads else f"-t{s.threads}"
    return f"k{s.classes}-n{s.samples_per_class}-{s.input_size}{threads}"


def run_file(results: Path, model: str, scorer: str, s: Settings) -> Path:
    return results / "scale" / f"{model}-{scorer}-{tag(s)}.json"


def forward_file(results: Path, model: str, s: Settings, cpu: str) -> Path:
    """The unit of `model` at `s` measured on the CPU model `cpu` (e.g. "AMD EPYC")."""
    return results / "scale" / f"{model}-forward-{tag(s)}-{cpu_slug(cpu)}.json"


def cpu_slug(cpu: str) -> str:
    """`cpu` as a file-name part: "Intel(R) Xeon(R) Processor" → "intel-r-xeon-r-processor"."""
    return "-".join("".join(c if c.isalnum() else " " for c in cpu.lower()).split())


def measure_all(s: Settings, results: Path) -> None:
    """Every (model, scorer) run not yet in `results`, and the unit of each model with such a run
    on this CPU model if not measured yet, one result file each."""
    data, here = data_folder(s), machine()
    for model in s.models:
        pending = [scorer for scorer in s.scorers if not _finished(run_file(results, model, scorer, s))]
        unit = forward_file(results, model, s, here["cpu"])
        if pending and not unit.exists():
            seconds = _in_subprocess(model, s)
            write_json(unit, {"model": model, "forward_s": seconds, "settings": asdict(s), "machine": here,
                              "load_average_1_5_15": list(os.getloadavg())})
            print(f"{model}: one forward of {s.classes * s.samples_per_class} images = {seconds:.1f} s", flush=True)
        for scorer in pending:
            file = run_file(results, model, scorer, s)
            result = one_run(model, scorer, s, data)
            write_json(file, {**result, "settings": asdict(s), "machine": here})
            print(f"{model} {scorer}: {result['wall_s']:.1f} s (exit {result['exit']})", flush=True)


def _finished(file: Path) -> bool:
    """Whether `file` holds a finished run (a failed run is run again)."""
    return file.exists() and json.loads(file.read_text())["exit"] == 0


def _in_subprocess(model: str, s: Settings) -> float:
    """`forward_seconds` in a fresh process (no import or allocator state of this one)."""
    code = ("import json, sys; from benchmarks.scale import Settings, forward_seconds; "
            "s = Settings(**json.loads(sys.argv[2])); print(forward_seconds(sys.argv[1], s))")
    settings = json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in asdict(s).items()})
    env = {**os.environ, "OMP_NUM_THREADS": str(s.threads)}
    done = subprocess.run([sys.executable, "-c", code, model, settings], capture_output=True, text=True, check=True,
                          env=env, cwd=Path(__file__).resolve().parents[1])
    return float(done.stdout.strip().splitlines()[-1])


def summary(s: Settings, results: Path) -> dict:
    """Every run in `results` at `s`'s K, N, side and threads, whatever its model and scorer (those of
    `s` first, in their order), with its times in units of its model's forward on the same CPU
    model (no ratio where that forward was not measured)."""
    runs = [json.loads(f.read_text()) for f in sorted((results / "scale").glob(f"*-{tag(s)}.json"))
            if "-forward-" not in f.name]
    models, scorers = ([*given, *sorted({r[key] for r in runs} - set(given))]
                       for given, key in ((s.models, "model"), (s.scorers, "scorer")))
    rows = []
    for run in sorted(runs, key=lambda r: (models.index(r["model"]), scorers.index(r["scorer"]))):
        model, scorer, cpu = run["model"], run["scorer"], run["machine"]["cpu"]
        unit_file = forward_file(results, model, s, cpu)
        unit = json.loads(unit_file.read_text())["forward_s"] if unit_file.exists() else None
        row = {"model": model, "scorer": scorer, "cpu": cpu, "forward_s": unit, "wall_s": run["wall_s"],
               "exit": run["exit"], "load_average_1": run.get("load_average_1_5_15", [None])[0]}
        if run["exit"] == 0 and unit is not None:
            row["stages_s"] = run["timings"]
            row["wall_over_forward"] = run["wall_s"] / unit
            row["stages_over_forward"] = {k: v / unit for k, v in run["timings"].items()}
        rows.append(row)
    return {"settings": asdict(s), "machine": machine(), "runs": rows}


def markdown(result: dict) -> str:
    s = result["settings"]
    stages = sorted({k for r in result["runs"] for k in r.get("stages_s", {})})
    header = ["model", "scorer", "CPU", "load (1 min)", "forward (s)", "wall (s)", "wall ÷ forward",
              *(f"{k} ÷ forward" for k in stages)]
    rows = [[r["model"], r["scorer"], r["cpu"], "" if r["load_average_1"] is None else f"{r['load_average_1']:.1f}",
             "—" if r["forward_s"] is None else f"{r['forward_s']:.1f}",
             f"{r['wall_s']:.1f}",
             f"{r['wall_over_forward']:.2f}" if "wall_over_forward" in r
             else f"exit {r['exit']}" if r["exit"] else "no forward on this CPU",
             *(f"{r['stages_over_forward'][k]:.2f}" if k in r.get("stages_over_forward", {}) else "" for k in stages)]
            for r in result["runs"]]
    return (f"Main job at {s['input_size']}², K = {s['classes']}, N = {s['samples_per_class']}, ratio {s['ratio']}, "
            f"no fine-tuning, {s['threads']} threads, random weights; unit: one forward of the K·N scoring images "
            "through the unpruned network.\n\n" + markdown_table(header, rows))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.splitlines()[0])
    full = Settings()
    p.add_argument("--models", nargs="+", default=list(full.models))
    p.add_argument("--scorers", nargs="+", default=list(full.scorers))
    p.add_argument("--classes", type=int, default=full.classes)
    p.add_argument("--samples-per-class", type=int, default=full.samples_per_class)
    p.add_argument("--input-size", type=int, default=full.input_size)
    p.add_argument("--threads", type=int, default=full.threads)
    p.add_argument("--quick", action="store_true",
                   help="resnet18 at 64², K = 2, N = 8 (results under scale-quick; the other settings are ignored)")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--report", action="store_true", help="only rewrite the summary from the run files")
    args = p.parse_args(argv)
    if args.classes < 2 or args.samples_per_class < 1 or args.input_size < 8 or args.threads < 1:
        p.error("--classes must be >= 2, --samples-per-class and --threads >= 1, --input-size >= 8")

    def job() -> int:
        s = QUICK if args.quick else Settings(
            models=tuple(args.models), scorers=tuple(args.scorers), classes=args.classes,
            samples_per_class=args.samples_per_class, input_size=args.input_size, threads=args.threads)
        results = args.results / "scale-quick" if args.quick else args.results
        if not args.report:
            measure_all(s, results)
        result = summary(s, results)
        write_json(results / f"scale-{tag(s)}.json", result)
        write_text(results / f"scale-{tag(s)}.md", markdown(result) + "\n")
        print(markdown(result))
        return 0

    return exit_code(job)


if __name__ == "__main__":
    raise SystemExit(main())
