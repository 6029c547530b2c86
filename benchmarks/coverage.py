"""Which CNNs prune end to end: the main job on every torchvision classification model and on
models of the timm CNN families, with a weight, an activation and a gradient scorer.

    python -m benchmarks.coverage                       # everything (hours on 2 cores; resumable)
    python -m benchmarks.coverage --models 'resnet*' 'timm:regnet*' --scorers l1
    python -m benchmarks.coverage --report              # only rewrite coverage.json / .md from the run files
    python -m benchmarks.coverage --finetune            # l1, then one epoch of fine-tuning (train mode, backward)

Each (model, scorer) is one `python -m prune` process on random weights: a generated ImageFolder
of 2 classes (4 training and 2 validation images each), K = 2, N = 3, --no-finetune, --no-speed,
at 64² (at 224² for a model that refuses 64², e.g. a ViT with a fixed patch grid). Its outcome:
- `pruned`: exit 0, report.json written, `prune.load_pruned` rebuilds model.pt, and the rebuilt
  network's val loss and top-1 equal what the run measured on its pruned network (the same
  images: a rebuild with other channels or weights gives other logits);
- `refused`: exit 2, one line saying why (e.g. torch-pruning cannot trace a channel shuffle;
  `lines` counts what the run printed);
- `failed`: anything else (an internal error, a rebuild that differs, a timeout): a bug.
One result file per run under benchmarks/results/coverage/ (a finished run is not redone);
the summary is benchmarks/results/coverage.json and .md. With `--finetune` (l1 unless `--scorers`
says otherwise) each run also fine-tunes the pruned network for one epoch (batch 4: two steps), so
its train-mode forward and backward pass run too, and the rebuilt network must give what the run
measured after fine-tuning; files under coverage-finetune/, summary coverage-finetune.json / .md.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import io
import json
import math
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

from benchmarks.common import RESULTS, machine, markdown_table, random_image_folder
from prune import exit_code, write_json, write_text

SCORERS = ("l1", "entropy", "tp-taylor")
"""One scorer of each kind: weights only, activations, gradients."""
SIZES = (64, 224)
"""Input sides tried in turn: the small one, then the ImageNet side for models that need it."""
TIMEOUT_S = 3600
"""Seconds one model's runs (every scorer) may take."""
SETTINGS = {"classes": 2, "samples_per_class": 3, "train_per_class": 4, "val_per_class": 2, "ratio": 0.5}
TIMM_MODELS = {
    "resnet": "resnet18", "resnet-d": "resnet10t", "resnext": "resnext26ts", "seresnext": "seresnext26d_32x4d",
    "res2net": "res2net50_14w_8s", "resnest": "resnest14d", "skresnet": "skresnet18", "regnet": "regnetx_002",
    "regnety": "regnety_002", "regnetz": "regnetz_005", "efficientnet": "efficientnet_b0",
    "efficientnetv2": "tf_efficientnetv2_b0", "mixnet": "mixnet_s", "tinynet": "tinynet_e",
    "mobilenetv3": "mobilenetv3_small_050", "mobilenetv4": "mobilenetv4_conv_small", "lcnet": "lcnet_050",
    "mnasnet": "mnasnet_small", "fbnet": "fbnetc_100", "ghostnet": "ghostnet_050", "repghost": "repghostnet_050",
    "rexnet": "rexnet_100", "convnext": "convnext_atto", "convnextv2": "convnextv2_atto", "densenet": "densenet121",
    "dla": "dla46_c", "cspnet": "cspresnet50", "cs3darknet": "cs3darknet_s", "darknet": "darknet17",
    "dpn": "dpn48b", "repvgg": "repvgg_a0", "mobileone": "mobileone_s0", "fastvit": "fastvit_t8",
    "hrnet": "hrnet_w18_small", "inception": "inception_v3", "xception": "xception41", "vgg": "vgg11",
    "selecsls": "selecsls42b", "nfnet": "nf_resnet26", "hgnet": "hgnet_tiny", "vovnet": "ese_vovnet19b_dw",
    "gernet": "gernet_s", "edgenext": "edgenext_xx_small", "inception_next": "inception_next_atto",
    "efficientvit": "efficientvit_b0", "mobilevit": "mobilevit_xxs", "vit": "vit_tiny_patch16_224",
}
"""One model of each timm family (the smallest or a small member)."""


def all_models() -> list[str]:
    """Every torchvision classification model, then one `timm:` model per family."""
    import torchvision

    return [*torchvision.models.list_models(module=torchvision.models), *(f"timm:{n}" for n in TIMM_MODELS.values())]


def family(model: str) -> str:
    """The table's family column: torchvision, or the timm family."""
    if not model.startswith("timm:"):
        return "torchvision"
    return next(f for f, n in TIMM_MODELS.items() if n == model.removeprefix("timm:"))


def make_folder(root: Path) -> Path:
    """A 2-class ImageFolder of random 64² RGB images (SETTINGS' counts), made once."""
    return random_image_folder(root, classes=2, train_per_class=SETTINGS["train_per_class"],
                               val_per_class=SETTINGS["val_per_class"], side=64)


FINETUNE_FLAGS = ("--epochs", "1", "--batch-size", "4")
"""What `--finetune` runs instead of --no-finetune: one epoch of two steps (8 training images)."""


def stem(finetune: bool) -> str:
    """The name of the run folder and summary files: coverage, or coverage-finetune."""
    return "coverage-finetune" if finetune else "coverage"


def run_file(results: Path, model: str, scorer: str, finetune: bool = False) -> Path:
    return results / stem(finetune) / f"{model.replace(':', '_')}-{scorer}.json"


def prune_argv(model: str, scorer: str, size: int, data: Path, out: Path, finetune: bool = False) -> list[str]:
    return ["--model", model, "--scorer", scorer, "--data", str(data), "--input-size", str(size),
            "--classes", str(SETTINGS["classes"]), "--samples-per-class", str(SETTINGS["samples_per_class"]),
            "--ratio", str(SETTINGS["ratio"]), *(FINETUNE_FLAGS if finetune else ("--no-finetune",)), "--no-speed",
            "--quiet", "--out", str(out)]


def rebuilt_matches(out: Path, data: Path, model: str, size: int, after: dict) -> str | None:
    """None when `prune.load_pruned(out/model.pt)` gives the val loss and top-1 the run measured
    on its pruned network; else what differs."""
    import torch

    import prune
    from finetune.metrics import evaluate

    net = prune.load_pruned(out / "model.pt")
    bundle = prune.load_data(str(data), input_size=size, model=model)
    loader = prune.make_loader(bundle.val, batch_size=64, shuffle=False, seed=0)
    with torch.no_grad():
        ev = evaluate(net, loader, device=torch.device("cpu"))
    if ev.top1 != after["top1"] or not math.isclose(ev.loss, after["loss"], rel_tol=1e-4, abs_tol=1e-6):
        return f"rebuilt model gives top-1 {ev.top1} loss {ev.loss}, the run measured {after['top1']} {after['loss']}"
    return None


def one(model: str, scorer: str, data: Path, finetune: bool = False) -> dict:
    """The main job (`prune.cli.main`, in this process) on `model` with `scorer` (and one epoch of
    fine-tuning with `finetune`), at each of SIZES until one is not refused for its size; its outcome."""
    from prune.cli import main as prune_main

    outcome: dict = {}
    for size in SIZES:
        with tempfile.TemporaryDirectory() as tmp:
            out, said = Path(tmp) / "run", io.StringIO()
            start = time.perf_counter()
            with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                code = prune_main(prune_argv(model, scorer, size, data, out, finetune))
            lines = [line for line in said.getvalue().splitlines() if line.strip()]
            last = lines[-1] if lines else ""
            outcome = {"model": model, "scorer": scorer, "size": size, "exit": code,
                       "seconds": round(time.perf_counter() - start, 1)}
            if code == 0:
                return {**outcome, **_pruned(out, data, model, size)}
            outcome.update(outcome="refused" if code == 2 else "failed", why=last[-400:], lines=len(lines))
            if not (code == 2 and "cannot run on" in last):
                return outcome
    return outcome


def _pruned(out: Path, data: Path, model: str, size: int) -> dict:
    """The outcome of an exit-0 run: its cost before → after, and whether its model.pt rebuilds it."""
    report = json.loads((out / "report.json").read_text())
    b, a = report["before"], report["after"]
    differs = rebuilt_matches(out, data, model, size, a)
    found = {"params": [b["params"], a["params"]], "flops": [b["flops"], a["flops"]], "layers": len(report["layers"])}
    return {**found, "outcome": "failed" if differs else "pruned", **({"why": differs} if differs else {})}


def worker(model: str, scorers: tuple[str, ...], data: Path, results: Path, finetune: bool = False) -> None:
    """Run `model` with each of `scorers` in this process (one torch thread: several workers may
    share the machine), writing each run file as it ends."""
    import torch

    torch.set_num_threads(1)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    for scorer in scorers:
        result = {**one(model, scorer, data, finetune), "commit": commit or None}
        write_json(run_file(results, model, scorer, finetune), result)
        print(f"{model:28s} {scorer:10s} {result['outcome']:8s} {result['seconds']:7.1f}s "
              f"{result.get('why', '')[:150]}", flush=True)


def run_model(model: str, scorers: tuple[str, ...], data: Path, results: Path, timeout: float,
              finetune: bool = False) -> None:
    """`worker` in a fresh process (memory returned after each model); runs it left unfinished
    (the process died or ran past `timeout`) are written as failed."""
    argv = [sys.executable, "-m", "benchmarks.coverage", "--worker", model, "--scorers", *scorers,
            "--results", str(results), "--data", str(data), *(["--finetune"] if finetune else [])]
    start = time.perf_counter()
    try:
        proc = subprocess.run(argv, timeout=timeout, stderr=subprocess.PIPE, text=True)
        why = f"the worker process ended with {proc.returncode}: {proc.stderr.strip()[-300:]}"
    except subprocess.TimeoutExpired:
        why = f"timed out after {timeout:.0f} s"
    for scorer in scorers:
        if not run_file(results, model, scorer, finetune).exists():
            write_json(run_file(results, model, scorer, finetune), {"model": model, "scorer": scorer, "size": SIZES[0],
                       "outcome": "failed", "why": why, "seconds": round(time.perf_counter() - start, 1)})


def summary_rows(runs: list[dict]) -> list[list]:
    rows = []
    for r in runs:
        cost = ""
        if r["outcome"] == "pruned":
            cost = (f"{r['params'][0] / 1e6:.2f}M → {r['params'][1] / 1e6:.2f}M · "
                    f"{r['flops'][0] / 1e6:.0f}M → {r['flops'][1] / 1e6:.0f}M")
        rows.append([r["model"], family(r["model"]), r["scorer"], r["size"], r["outcome"], cost, r["seconds"],
                     r.get("why", "")[:160]])
    return rows


def write_summary(results: Path, models: list[str], scorers: tuple[str, ...], finetune: bool = False) -> dict:
    """coverage.json / .md (coverage-finetune.*) from every run file present (in `models` × `scorers` order)."""
    runs = [json.loads(f.read_text()) for m in models for s in scorers
            if (f := run_file(results, m, s, finetune)).exists()]
    counts = {k: sum(r["outcome"] == k for r in runs) for k in ("pruned", "refused", "failed")}
    done = {r["model"] for r in runs}
    per_scorer = Counter(r["scorer"] for r in runs)
    what = "one epoch of fine-tuning (batch 4)" if finetune else "no fine-tuning"
    text = (f"# Coverage{' with fine-tuning' if finetune else ''}: the main job on {len(done)} models\n\n"
            f"Models run per scorer: {', '.join(f'{s} {n}' for s, n in per_scorer.items())}. "
            f"{counts['pruned']} runs pruned, {counts['refused']} refused in one line, {counts['failed']} failed "
            f"(random weights, {SETTINGS['classes']} classes × {SETTINGS['samples_per_class']} scoring images, "
            f"ratio {SETTINGS['ratio']}, {what}; params and FLOPs before → after).\n\n"
            + markdown_table(["model", "family", "scorer", "side", "outcome", "params · FLOPs", "s", "why"],
                             summary_rows(runs)) + "\n")
    payload = {"machine": machine(), "settings": {**SETTINGS, "sizes": SIZES, "scorers": scorers, "finetune": finetune},
               "counts": counts, "models": len(done), "runs": runs}
    write_json(results / f"{stem(finetune)}.json", payload)
    write_text(results / f"{stem(finetune)}.md", text)
    return counts


def every_scorer() -> tuple[str, ...]:
    """SCORERS, then every other registered scorer: the summary lists the runs of each."""
    import scoring

    return (*SCORERS, *(s for s in scoring.list_scorers() if s not in SCORERS))


def _todo(file: Path, redo_failed: bool) -> bool:
    """Whether the run of `file` is still to do."""
    return not file.exists() or (redo_failed and json.loads(file.read_text())["outcome"] == "failed")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.coverage", description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["*"], help="fnmatch patterns over the model names")
    p.add_argument("--scorers", nargs="+", default=None, help="default: l1 entropy tp-taylor (l1 with --finetune)")
    p.add_argument("--finetune", action="store_true", help="fine-tune each pruned network one epoch (batch 4)")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds one model's runs may take")
    p.add_argument("--redo-failed", action="store_true", help="run again the runs whose file says failed")
    p.add_argument("--report", action="store_true", help="only rewrite the summary from the run files")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one model, in this process
    p.add_argument("--data", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    models = [m for m in all_models() if any(fnmatch.fnmatch(m, pat) for pat in args.models)]
    scorers = tuple(args.scorers or (("l1",) if args.finetune else SCORERS))
    if args.worker:
        worker(args.worker, scorers, args.data, args.results, args.finetune)
        return 0
    if not args.report:
        data = make_folder(Path(tempfile.gettempdir()) / "topoprune-coverage-data")
        for model in models:
            todo = tuple(s for s in scorers if _todo(run_file(args.results, model, s, args.finetune), args.redo_failed))
            if todo:
                run_model(model, todo, data, args.results, args.timeout, args.finetune)
    counts = write_summary(args.results, all_models(), every_scorer(), args.finetune)
    print(f"pruned {counts['pruned']}, refused {counts['refused']}, failed {counts['failed']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(exit_code(main))
