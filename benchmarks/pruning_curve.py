"""Accuracy after fine-tuning vs pruning ratio and vs the number of classes K (paper Fig. 13).

    python -m benchmarks.pruning_curve [--quick] [--ratios 0.4,0.5,0.6] [--ks 1,2,5,10]

Every point is one run of the main job, `prune.run(prune.PruneConfig(...))` (progressive,
layer by layer, then the paper's fine-tuning: SGD, lr 1e-3 ÷10 per epoch, 3 epochs) with the
entropy scorer, in a temporary output folder. Fig. 13B: the ratios at K = the largest of
`--ks` (at most the number of classes); Fig. 13A: the Ks at ratio `--k-ratio`. A `random`
scorer run at `--k-ratio` (`--baseline`) shows what the criterion adds.

With `--quick` and no `--data`, the shrunk shapes10 set (30 train / 20 test images per class)
is written to a temporary ImageFolder whose pixel values are mapped so that the folder
transform's normalisation (the model's, from its registry entry) gives back the shapes
normalisation (images padded to 37² so Resize(37) + CenterCrop(32) returns them unchanged);
the main job then loads it in well under a second instead of generating the full set.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

import prune
from benchmarks.common import (
    ExperimentSettings,
    base_parser,
    float_list,
    int_list,
    machine,
    markdown_table,
    new_figure,
    parse_settings,
    positive_int,
    quick_embedded_data,
    run_experiment,
)
from prune import PruneConfig, exit_code, model_entry


@dataclass(frozen=True)
class Settings(ExperimentSettings):
    """The runs: `ratios` at K = max(`ks`), the `ks` at `k_ratio`, one `baseline` run ('' = none)."""

    scorer: str = "entropy"
    baseline: str = "random"
    ratios: tuple[float, ...] = (0.4, 0.5, 0.6)
    ks: tuple[int, ...] = (1, 2, 5, 10)
    k_ratio: float = 0.5
    samples_per_class: int = 100
    epochs: int = 3
    train_images: int | None = None
    batch_size: int = 64
    device: str = "cpu"


FULL = Settings()
QUICK = Settings(quick=True, baseline="", ratios=(0.6,), ks=(1, 2), samples_per_class=10, epochs=1)


def parse_args(argv: list[str] | None) -> Settings:
    p = base_parser("pruning_curve", __doc__, analysis=False)
    a = p.add_argument
    a("--scorer", help="scorer of the curves (default: entropy)")
    a("--baseline", help="scorer run once at --k-ratio for comparison (random; none quick; '' for none)")
    a("--ratios", type=float_list, help="pruning ratios of Fig. 13B (0.4,0.5,0.6; 0.6 quick, plus --k-ratio)")
    a("--ks", type=int_list, help="numbers of classes of Fig. 13A (1,2,5,10; 1,2 quick)")
    a("--k-ratio", type=float, help="ratio of the K sweep (default 0.5)")
    a("--samples-per-class", type=positive_int, help="scoring images per class (100; 10 quick)")
    a("--epochs", type=int, help="fine-tuning epochs (3; 1 quick)")
    a("--train-images", type=positive_int,
      help="fine-tune on a seeded class-balanced subset of this many training images (default: all)")
    a("--batch-size", type=positive_int, help="fine-tuning and evaluation batch size (default 64)")
    a("--device", help="cpu or cuda (default cpu)")
    return parse_settings(p, argv, full=FULL, quick=QUICK)


def export_quick_folder(root: Path, model: str) -> Path:
    """Write the shrunk shapes10 set as an ImageFolder (train/, val/) under `root`, its pixels
    mapped so that `model`'s folder normalisation gives back the shapes normalisation."""
    data = quick_embedded_data()
    entry = model_entry(model)
    mean, std = torch.tensor(entry.mean).view(3, 1, 1), torch.tensor(entry.std).view(3, 1, 1)
    for split, dataset in (("train", data.train), ("val", data.val)):
        images, labels = dataset.tensors
        for i, (x, y) in enumerate(zip(images, labels.tolist())):
            pixels = mean + std * x  # (pixels − mean) / std = x
            pixels = torch.nn.functional.pad(pixels.unsqueeze(0), (2, 3, 2, 3), mode="replicate")[0]
            arr = (pixels.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            folder = root / split / f"{y:02d}-{data.classes[y].replace(' ', '_')}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(folder / f"{i:05d}.png")
    return root


def one_run(cfg: Settings, data: str | None, input_size: int | None, *, ratio: float, k: int, scorer: str, work: Path) -> dict:
    """One main-job run; the numbers of its report that the curves need."""
    config = PruneConfig(
        model=cfg.model, weights=cfg.weights, data=data, ratio=ratio, scorer=scorer, classes=k,
        samples_per_class=cfg.samples_per_class, epochs=cfg.epochs, train_images=cfg.train_images,
        batch_size=cfg.batch_size,
        input_size=input_size, device=cfg.device, seed=cfg.seed,
    )
    start = time.perf_counter()
    report = prune.run(config, out=work / f"{scorer}-r{ratio:g}-k{k}", quiet=True)
    b, p, a = report.before, report.pruned_before_finetune, report.after
    return {
        "ratio": ratio, "classes": k, "scorer": scorer,
        "top1_before": b.top1, "top1_pruned": p.top1, "top1_after": a.top1,
        "balanced_accuracy_after": a.balanced_accuracy, "top1_drop": b.top1 - a.top1,
        "params_before": b.params, "params_after": a.params, "flops_before": b.flops, "flops_after": a.flops,
        "finetune_losses": list(report.finetune_losses), "seconds": round(time.perf_counter() - start, 1),
    }


def plan(cfg: Settings) -> list[tuple[float, int, str]]:
    """(ratio, K, scorer) of every run, without duplicates."""
    k_top = max(cfg.ks)
    ratios = sorted({*cfg.ratios, cfg.k_ratio})
    runs = [(r, k_top, cfg.scorer) for r in ratios] + [(cfg.k_ratio, k, cfg.scorer) for k in cfg.ks]
    if cfg.baseline:
        runs.append((cfg.k_ratio, k_top, cfg.baseline))
    return list(dict.fromkeys(runs))


def run_curves(cfg: Settings) -> dict:
    with tempfile.TemporaryDirectory(prefix="pruning_curve-") as tmp:
        work = Path(tmp)
        data, size = cfg.data, cfg.input_size
        if cfg.quick and data is None and size is None:
            data, size = str(export_quick_folder(work / "data", cfg.model)), quick_embedded_data().input_size
        rows = [
            one_run(cfg, data, size, ratio=r, k=k, scorer=s, work=work)
            for r, k, s in tqdm(plan(cfg), desc="runs", disable=cfg.quiet)
        ]
    return {
        "experiment": "pruning curves (paper Fig. 13)",
        "setup": {"model": cfg.model, "weights": cfg.weights, "data": cfg.data or "embedded shapes10",
                  "quick": bool(cfg.quick), "seed": cfg.seed, "samples_per_class": cfg.samples_per_class,
                  "epochs": cfg.epochs, "train_images": cfg.train_images,
                  "machine": {**machine(), "torch_threads": torch.get_num_threads()}},
        "scorer": cfg.scorer,
        "k_ratio": cfg.k_ratio,
        "ratio_classes": max(cfg.ks),
        "rows": rows,
    }


def markdown(r: dict) -> str:
    rows = r["rows"]
    unchanged = rows[0]["top1_before"]
    return "\n\n".join(
        [
            f"## Pruning curves — scorer `{r['scorer']}`, unchanged top-1 {unchanged:.4f}"
            + ("" if r["setup"].get("train_images") is None
               else f", fine-tuned on {r['setup']['train_images']:,} training images"),
            markdown_table(
                ["scorer", "ratio", "K", "top-1 pruned", "top-1 fine-tuned", "drop", "balanced acc.", "params", "MFLOPs", "s"],
                [[w["scorer"], w["ratio"], w["classes"], w["top1_pruned"], w["top1_after"], w["top1_drop"],
                  w["balanced_accuracy_after"], w["params_after"], w["flops_after"] / 1e6, w["seconds"]] for w in rows],
            ),
        ]
    )


def figures(r: dict) -> dict:
    fig, ax = new_figure(1, 2, size=(4.5, 3.5))
    main = [w for w in r["rows"] if w["scorer"] == r["scorer"]]
    by_k = sorted((w for w in main if w["ratio"] == r["k_ratio"]), key=lambda w: w["classes"])
    by_r = sorted((w for w in main if w["classes"] == r["ratio_classes"]), key=lambda w: w["ratio"])
    for a, rows, key, label in ((ax[0][0], by_k, "classes", "classes K"), (ax[0][1], by_r, "ratio", "pruning ratio")):
        a.plot([w[key] for w in rows], [w["top1_after"] for w in rows], "o-", label=f"{r['scorer']}, fine-tuned")
        a.plot([w[key] for w in rows], [w["top1_pruned"] for w in rows], "x:", label=f"{r['scorer']}, before fine-tuning")
        a.axhline(r["rows"][0]["top1_before"], color="grey", ls="--", label="unchanged")
        for w in r["rows"]:
            if w["scorer"] != r["scorer"] and (key == "ratio" or w["ratio"] == r["k_ratio"]):
                a.plot([w[key]], [w["top1_after"]], "s", label=f"{w['scorer']}, fine-tuned")
        a.set_xlabel(label)
        a.set_ylabel("top-1")
    ax[0][0].set_xscale("log")
    ax[0][0].set_title(f"A: ratio {r['k_ratio']}")
    ax[0][1].set_title(f"B: K = {r['ratio_classes']}")
    ax[0][1].legend(fontsize=7)
    return {"curves": fig}


def main(argv: list[str] | None = None) -> int:
    """Run the main job per point and write pruning_curve.{json,md,-curves.png}; returns 0."""
    s = parse_args(argv)
    return run_experiment("pruning_curve", s, lambda: run_curves(s), markdown, figures)


if __name__ == "__main__":
    raise SystemExit(exit_code(main))
