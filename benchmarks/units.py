"""Feature entropy as an indicator of unit status (paper §4.2–4.4, Tables 1–2, Figs. 5–6).

    python -m benchmarks.units [--quick] [--layer NAME] [--class C] [--unit U] [--random-inits R]

The reference unit is one unit of `--layer` (default: the last conv), by default the one
with the lowest feature entropy on `--class` among the units with a birth on at least half
of the images (a unit with a few births also has a low entropy, see Eq. 9); its values are computed as the scorers do:
L1 of the filter, APoZ (fraction of zero activations on the class's images), class
selectivity (over the images of all classes) and feature entropy H and selective rate ε
(on the class's training images).

1. Table 1 — rescaling: input images ×0.5 and/or the layer's filters and bias ×0.5. The eval
   BN after the conv is first folded into the conv (W' = W·γ/σ, b' = (b − μ)·γ/σ + β) in
   every row, so "filters ×0.5" halves the unit itself, as for the paper's VGG16 without BN
   (rescaling a conv followed by eval BN would not rescale the unit; in training mode BN
   would absorb it). L1 is that of the folded filter.
2. Table 2 — the trained unit vs the same unit in R random initialisations (mean, std).
3. Layers (Fig. 5A) — mean feature entropy and selective rate per conv layer, trained vs a
   random initialisation, for the class and averaged over classes.
4. Training (Fig. 5B) — a fresh model trained for a few epochs (prune.zoo.train_embedded's
   recipe): last-layer feature entropy vs training loss and test accuracy after each epoch.
5. Corrupted labels (§4.4, Fig. 6B) — models trained on a subset whose labels are replaced by
   uniform random ones with probability p, without augmentation: last-layer feature entropy on
   their training images (grouped by true class) against the generalisation gap
   (train accuracy on the labels trained on − test accuracy).
"""

from __future__ import annotations

import argparse
import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from benchmarks.common import (
    ExperimentSettings,
    Setup,
    base_parser,
    dataset_tensors,
    float_list,
    load_setup,
    markdown_table,
    mean_std,
    new_figure,
    parse_settings,
    positive_int,
    run_experiment,
    setup_info,
)
from benchmarks.layers import (
    class_batch,
    conv_layers,
    find_conv,
    layer_entropy,
    module_name,
    per_class_count,
    pick_unit,
    score_layer,
)
from finetune.batches import in_order
from finetune.metrics import Evaluation, class_metrics, predict, summarize
from prune import DataBundle, TrainConfig, UsageError, create_model, exit_code, fit_embedded, following_norm

INDICATORS = ("l1", "apoz", "selectivity", "entropy", "selective_rate")


@dataclass(frozen=True)
class Settings(ExperimentSettings):
    """The five parts' work; `layer_classes` None = all classes."""

    layer: str | None = None
    unit: int | None = None
    samples_per_class: int = 100
    random_inits: int = 50
    layer_classes: int | None = None
    train_epochs: int = 8
    train_per_class: int | None = None
    corruptions: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    corrupt_per_class: int = 50
    corrupt_epochs: int = 40


FULL = Settings()
QUICK = Settings(
    quick=True, samples_per_class=20, random_inits=3, layer_classes=2, train_epochs=1,
    corruptions=(0.0, 0.5, 1.0), corrupt_per_class=10, corrupt_epochs=3,
)


def _fractions(text: str) -> tuple[float, ...]:
    values = float_list(text)
    if any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError("--corruptions must be fractions in [0, 1]")
    return values


def parse_args(argv: list[str] | None) -> Settings:
    p = base_parser("units", __doc__)
    a = p.add_argument
    a("--layer", help="conv layer of the reference unit (default: the last conv)")
    a("--unit", type=int, help="reference unit index (default: lowest feature entropy on --class)")
    a("--samples-per-class", type=positive_int, help="training images per class (100; 20 quick)")
    a("--random-inits", type=positive_int, help="random initialisations in Table 2 (50; 3 quick; the paper uses 100)")
    a("--layer-classes", type=positive_int, help="classes averaged in parts 3-5 (all; 2 quick)")
    a("--train-epochs", type=positive_int, help="epochs of the training analysis (8; 1 quick; the shipped recipe trains 15)")
    a("--train-per-class", type=positive_int,
      help="training images per class of the training analysis (default: the whole train split)")
    a("--corruptions", type=_fractions, help="label-corruption fractions (0,0.2,0.4,0.6,0.8,1; 0,0.5,1 quick)")
    a("--corrupt-per-class", type=positive_int, help="training images per class of the corrupted-label models (50; 10 quick)")
    a("--corrupt-epochs", type=positive_int, help="epochs of the corrupted-label models (40; 3 quick)")
    return parse_settings(p, argv, full=FULL, quick=QUICK)


def evaluation(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, Evaluation]:
    """Logits [N, K] of `model` (eval mode) on `images` and the metrics against `labels`."""
    logits, _ = predict(model, in_order(images, labels, batch_size=256))
    return logits, summarize(logits, labels)


def train_model(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, epochs: int, seed: int, augment: bool = True,
    on_epoch_end=None, quiet: bool = True, desc: str = "train",
) -> None:
    """Train `model` in place with `prune.zoo.train_embedded`'s recipe for `epochs` epochs
    (warm-up: one epoch, at most a quarter of the steps); `on_epoch_end(epoch, mean_loss)`
    after each epoch (1-based), the model in eval mode."""
    config = TrainConfig(epochs=epochs, seed=seed)
    per_epoch = math.ceil(len(labels) / config.batch_size)
    torch.manual_seed(seed)
    fit_embedded(
        model, images, labels, config=config, warmup_steps=min(per_epoch, epochs * per_epoch // 4), augment=augment,
        on_epoch_end=None if on_epoch_end is None else (lambda epoch, loss: on_epoch_end(epoch + 1, loss)),
        desc=desc, quiet=quiet,
    )


def fold_bn(model: nn.Module, conv: nn.Conv2d) -> None:
    """Fold the eval-mode BN after `conv` into it (in place); the BN becomes nn.Identity.

    W' = W·γ/σ, b' = (b − μ)·γ/σ + β per output channel. Afterwards scaling the conv's weight
    and bias by s scales the layer's units by exactly s (for s a power of two).
    """
    norm = following_norm(model, conv)
    if norm is None:
        return
    with torch.no_grad():
        std = torch.sqrt(norm.running_var + norm.eps)
        gamma = norm.weight if norm.affine else torch.ones_like(std)
        beta = norm.bias if norm.affine else torch.zeros_like(std)
        factor = gamma / std
        bias = conv.bias if conv.bias is not None else torch.zeros_like(std)
        conv.weight.mul_(factor.view(-1, 1, 1, 1))
        new_bias = (bias - norm.running_mean) * factor + beta
        if conv.bias is None:
            conv.bias = nn.Parameter(new_bias)
        else:
            conv.bias.copy_(new_bias)
    parent_name, _, attr = module_name(model, norm).rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, nn.Identity())


# ---------------------------------------------------------------- the reference unit


def unit_values(model: nn.Module, layer: str, unit: int, data: DataBundle, cls: int, n: int, *, seed: int, scale: float = 1.0) -> dict:
    """L1, APoZ, selectivity, feature entropy and ε of one unit (images × `scale`)."""
    name, conv = find_conv(model, layer)
    batches = [class_batch(model, conv, name, data, c, n, seed=seed, scale=scale) for c in range(len(data.classes))]
    own = batches[cls]
    h, eps = layer_entropy(own.activations)
    return {
        "l1": float(score_layer("l1", model, conv, name, [])[unit]),
        "apoz": float(1.0 - score_layer("apoz", model, conv, name, [own])[unit]),
        "selectivity": float(score_layer("selectivity", model, conv, name, batches)[unit]),
        "entropy": float(h[unit]),
        "selective_rate": float(eps[unit]),
    }


def reference_unit(setup: Setup, layer: str, n: int) -> int:
    """`--unit`, or the unit of `layer` chosen by `pick_unit` on `--class`."""
    if setup.settings.unit is not None:
        return setup.settings.unit
    name, conv = find_conv(setup.model, layer)
    batch = class_batch(setup.model, conv, name, setup.data, setup.settings.cls, n, seed=setup.settings.seed)
    return pick_unit(*layer_entropy(batch.activations))


def folded(model: nn.Module, layer: str) -> nn.Module:
    """A copy of `model` with the BN after `layer` folded into it."""
    model = copy.deepcopy(model).eval()
    fold_bn(model, find_conv(model, layer)[1])
    return model


def table1(setup: Setup, layer: str, unit: int, n: int) -> list[dict]:
    """Rows (image scale, filter scale) ∈ {1, 0.5}²: accuracy and the unit's values."""
    cfg, (x, y) = setup.settings, setup.test
    base = folded(setup.model, layer)
    rows = []
    for img, filt in ((1.0, 1.0), (0.5, 1.0), (1.0, 0.5), (0.5, 0.5)):
        model = copy.deepcopy(base)
        conv = find_conv(model, layer)[1]
        with torch.no_grad():
            conv.weight.mul_(filt)
            if conv.bias is not None:
                conv.bias.mul_(filt)
        logits, metrics = evaluation(model, x * img, y)
        rows.append(
            {
                "image_scale": img,
                "filter_scale": filt,
                "accuracy": metrics.top1,
                "class_accuracy": class_metrics(logits, y, cfg.cls)["accuracy"],
                **unit_values(model, layer, unit, setup.data, cfg.cls, n, seed=cfg.seed, scale=img),
            }
        )
    return rows


def random_model(setup: Setup, seed: int) -> nn.Module:
    """A freshly initialised model of the same architecture (seeded), eval mode."""
    torch.manual_seed(seed)
    return create_model(setup.settings.model, num_classes=setup.num_classes, pretrained=False).eval()


def table2(setup: Setup, layer: str, unit: int, n: int, trained: dict) -> dict:
    """The trained unit (BN folded) vs the same unit in `--random-inits` random models."""
    cfg = setup.settings
    samples = []
    for r in tqdm(range(cfg.random_inits), desc="random inits", disable=cfg.quiet):
        model = folded(random_model(setup, 10_000 + r), layer)
        samples.append(unit_values(model, layer, unit, setup.data, cfg.cls, n, seed=cfg.seed))
    values = {k: [s[k] for s in samples] for k in INDICATORS}
    better = {  # fraction of random units an indicator ranks as good as or better than the trained one
        "l1": np.mean([v >= trained["l1"] for v in values["l1"]]),
        "apoz": np.mean([v <= trained["apoz"] for v in values["apoz"]]),
        "selectivity": np.mean([v >= trained["selectivity"] for v in values["selectivity"]]),
        "entropy": np.mean([v <= trained["entropy"] for v in values["entropy"]]),
    }
    return {
        "trained": {k: trained[k] for k in INDICATORS},
        "random": {k: mean_std(v) for k, v in values.items()},
        "random_values": values,
        "random_judged_at_least_as_good": {k: float(v) for k, v in better.items()},
    }


# ---------------------------------------------------------------- layers


def studied_classes(setup: Setup) -> list[int]:
    """The first `--layer-classes` classes (all by default) plus `--class`."""
    return sorted({setup.settings.cls, *range(setup.num_classes)[: setup.settings.layer_classes]})


def layer_profile(model: nn.Module, data: DataBundle, classes: list[int], n: int, *, seed: int, quiet: bool) -> list[dict]:
    """Per conv layer: mean over units of H and ε for each class, and their means over classes."""
    rows = []
    for name, conv in tqdm(conv_layers(model), desc="layers", disable=quiet, leave=False):
        per_class = [layer_entropy(class_batch(model, conv, name, data, c, n, seed=seed).activations) for c in classes]
        rows.append(
            {
                "layer": name,
                "entropy": [float(h.mean()) for h, _ in per_class],
                "selective_rate": [float(e.mean()) for _, e in per_class],
                "entropy_mean": float(np.mean([h.mean() for h, _ in per_class])),
                "selective_rate_mean": float(np.mean([e.mean() for _, e in per_class])),
            }
        )
    return rows


def layers(setup: Setup, n: int) -> dict:
    """Layer profile of the trained model and of one random initialisation."""
    cfg = setup.settings
    classes = studied_classes(setup)
    prof = lambda m: layer_profile(m, setup.data, classes, n, seed=cfg.seed, quiet=cfg.quiet)  # noqa: E731
    return {"classes": classes, "trained": prof(setup.model), "random": prof(random_model(setup, 10_000))}


# ---------------------------------------------------------------- training and corrupted labels


def last_layer_entropy(model: nn.Module, data: DataBundle, classes: list[int], n: int, *, seed: int) -> dict:
    """Mean feature entropy and ε of the last conv's units, per class and averaged."""
    name, conv = find_conv(model, None)
    per = [layer_entropy(class_batch(model, conv, name, data, c, n, seed=seed).activations) for c in classes]
    return {
        "entropy": [float(h.mean()) for h, _ in per],
        "selective_rate": [float(e.mean()) for _, e in per],
        "entropy_mean": float(np.mean([h.mean() for h, _ in per])),
    }


def training(setup: Setup, n: int) -> list[dict]:
    """Train a fresh model; after each epoch (and at 0): losses, test accuracy, last-layer H."""
    cfg = setup.settings
    x, y = dataset_tensors(setup.data.train, per_class=cfg.train_per_class, seed=cfg.seed)
    classes = studied_classes(setup)
    model = random_model(setup, cfg.seed)
    history: list[dict] = []

    def record(epoch: int, train_loss: float | None) -> None:
        _, test = evaluation(model, *setup.test)
        fe = last_layer_entropy(model, setup.data, classes, n, seed=cfg.seed)
        history.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "train_loss_eval": evaluation(model, x, y)[1].loss,
                "test_accuracy": test.top1,
                "test_loss": test.loss,
                "class_entropy": fe["entropy"][classes.index(cfg.cls)],
                **fe,
            }
        )

    record(0, None)
    train_model(model, x, y, epochs=cfg.train_epochs, seed=cfg.seed, on_epoch_end=record, quiet=cfg.quiet, desc="training")
    return history


def corrupt_labels(labels: torch.Tensor, fraction: float, num_classes: int, *, seed: int) -> torch.Tensor:
    """Each label replaced, with probability `fraction`, by a uniform random class (Zhang et al. 2017)."""
    g = torch.Generator().manual_seed(seed)
    flip = torch.rand(len(labels), generator=g) < fraction
    random = torch.randint(num_classes, (len(labels),), generator=g)
    return torch.where(flip, random, labels)


def subset_bundle(data: DataBundle, x: torch.Tensor, y: torch.Tensor) -> DataBundle:
    """A DataBundle whose train split is (x, y) (true labels, for class_images)."""
    return DataBundle(
        train=torch.utils.data.TensorDataset(x, y), val=data.val, classes=data.classes,
        train_targets=tuple(int(t) for t in y), input_size=data.input_size,
    )


def corrupted(setup: Setup) -> list[dict]:
    """One model per corruption fraction: accuracies, gap and last-layer feature entropy."""
    cfg = setup.settings
    x, y = dataset_tensors(setup.data.train, per_class=cfg.corrupt_per_class, seed=cfg.seed)
    sub = subset_bundle(setup.data, x, y)
    n = per_class_count(sub, cfg.samples_per_class)
    classes = studied_classes(setup)
    rows = []
    for frac in tqdm(cfg.corruptions, desc="corrupted labels", disable=cfg.quiet):
        noisy = corrupt_labels(y, frac, setup.num_classes, seed=cfg.seed + 1)
        model = random_model(setup, cfg.seed)
        train_model(model, x, noisy, epochs=cfg.corrupt_epochs, seed=cfg.seed, augment=False, quiet=True)
        train_logits, train = evaluation(model, x, noisy)
        train_acc, test_acc = train.top1, evaluation(model, *setup.test)[1].top1
        fe = last_layer_entropy(model, sub, classes, n, seed=cfg.seed)
        rows.append(
            {
                "corrupted": frac,
                "labels_changed": float((noisy != y).float().mean()),
                "train_accuracy": train_acc,
                "train_accuracy_true_labels": summarize(train_logits, y).top1,
                "test_accuracy": test_acc,
                "gap": train_acc - test_acc,
                "class_entropy": fe["entropy"][classes.index(cfg.cls)],
                **fe,
            }
        )
    return rows


# ---------------------------------------------------------------- report


def run_units(setup: Setup) -> dict:
    cfg = setup.settings
    layer, conv = find_conv(setup.model, cfg.layer)
    n = per_class_count(setup.data, cfg.samples_per_class)
    unit = reference_unit(setup, layer, n)
    if not 0 <= unit < conv.out_channels:
        raise UsageError(f"--unit {unit} is not a unit of {layer} (0..{conv.out_channels - 1})")
    t1 = table1(setup, layer, unit, n)
    return {
        "experiment": "unit status (paper §4, Tables 1-2, Figs. 5-6)",
        "setup": setup_info(setup),
        "layer": layer,
        "unit": unit,
        "class": cfg.cls,
        "class_name": setup.data.classes[cfg.cls],
        "samples_per_class": n,
        "table1": t1,
        "table2": table2(setup, layer, unit, n, t1[0]),
        "layers": layers(setup, n),
        "training_per_class": setup.settings.train_per_class,
        "training": training(setup, n),
        "corrupted": corrupted(setup),
    }


def markdown(r: dict) -> str:
    t1, t2 = r["table1"], r["table2"]
    scale = lambda v: "×" if v == 1.0 else "half"  # noqa: E731
    rand = t2["random"]
    ms = lambda k: f"{rand[k]['mean']:.4g} ({rand[k]['std']:.3g})"  # noqa: E731
    L, T, C = r["layers"], r["training"], r["corrupted"]
    return "\n\n".join(
        [
            f"## Unit status — unit {r['unit']} of `{r['layer']}`, class {r['class']} ({r['class_name']!r}), "
            f"{r['samples_per_class']} training images per class",
            "### Table 1 — rescaling (BN folded into the conv; APoZ = fraction of zeros)",
            markdown_table(
                ["images", "filters", "accuracy", "class acc.", "L1", "APoZ", "selectivity", "feature entropy", "ε"],
                [[scale(w["image_scale"]), scale(w["filter_scale"]), w["accuracy"], w["class_accuracy"], w["l1"],
                  w["apoz"], w["selectivity"], w["entropy"], w["selective_rate"]] for w in t1],
            ),
            f"### Table 2 — trained unit vs {len(t2['random_values']['l1'])} random initialisations, mean (std)",
            markdown_table(
                ["", "L1", "APoZ", "selectivity", "feature entropy", "ε"],
                [["trained unit", *[t2["trained"][k] for k in INDICATORS]], ["random units", *[ms(k) for k in INDICATORS]],
                 ["random judged ≥ trained", *[t2["random_judged_at_least_as_good"].get(k, "-") for k in INDICATORS]]],
            ),
            f"### Layers (Fig. 5A) — mean over units, mean over classes {L['classes']}",
            markdown_table(
                ["layer", "H trained", "H random", "ε trained", "ε random"],
                [[a["layer"], a["entropy_mean"], b["entropy_mean"], a["selective_rate_mean"], b["selective_rate_mean"]]
                 for a, b in zip(L["trained"], L["random"])],
            ),
            "### Training (Fig. 5B) — last conv layer"
            + ("" if r.get("training_per_class") is None
               else f", trained on {r['training_per_class']} images per class"),
            markdown_table(
                ["epoch", "train loss", "train loss (eval)", "test acc.", f"H class {r['class']}", "H mean"],
                [[h["epoch"], "-" if h["train_loss"] is None else h["train_loss"], h["train_loss_eval"], h["test_accuracy"],
                  h["class_entropy"], h["entropy_mean"]] for h in T],
            ),
            "### Corrupted labels (§4.4) — last conv layer on training images",
            markdown_table(
                ["corrupted", "train acc.", "test acc.", "gap", f"H class {r['class']}", "H mean", "ε mean"],
                [[c["corrupted"], c["train_accuracy"], c["test_accuracy"], c["gap"], c["class_entropy"], c["entropy_mean"],
                  float(np.mean(c["selective_rate"]))] for c in C],
            ),
        ]
    )


def figures(r: dict) -> dict:
    """Layers (Fig. 5A), training (Fig. 5B), corrupted labels (Fig. 6B), random units (Table 2)."""
    figs = {}
    fig, ax = new_figure(1, 2, size=(5, 3.5))
    names = [w["layer"] for w in r["layers"]["trained"]]
    for key, col in (("entropy_mean", 0), ("selective_rate_mean", 1)):
        for which in ("trained", "random"):
            ax[0][col].plot(names, [w[key] for w in r["layers"][which]], "o-", label=which)
        ax[0][col].set_ylabel("feature entropy" if col == 0 else "selective rate")
        ax[0][col].tick_params(axis="x", rotation=45)
    ax[0][0].legend()
    figs["layers"] = fig
    fig, ax = new_figure(1, 3, size=(4, 3.2))
    ep = [h["epoch"] for h in r["training"]]
    ax[0][0].plot(ep, [h["train_loss_eval"] for h in r["training"]], "o-")
    ax[0][0].set_ylabel("training loss (eval mode)")
    ax[0][1].plot(ep, [h["entropy_mean"] for h in r["training"]], "o-", label="mean over classes")
    ax[0][1].plot(ep, [h["class_entropy"] for h in r["training"]], "s--", label=f"class {r['class']}")
    ax[0][1].set_ylabel("last-layer feature entropy")
    ax[0][1].legend()
    ax[0][2].plot(ep, [h["test_accuracy"] for h in r["training"]], "o-")
    ax[0][2].set_ylabel("test accuracy")
    for a in ax[0]:
        a.set_xlabel("epoch")
    figs["training"] = fig
    fig, ax = new_figure(1, 2, size=(4.5, 3.5))
    c = r["corrupted"]
    ax[0][0].plot([w["corrupted"] for w in c], [w["entropy_mean"] for w in c], "o-")
    ax[0][0].set_xlabel("fraction of corrupted labels")
    ax[0][0].set_ylabel("last-layer feature entropy")
    ax[0][1].scatter([w["gap"] for w in c], [w["entropy_mean"] for w in c])
    for w in c:
        ax[0][1].annotate(f"{w['corrupted']:g}", (w["gap"], w["entropy_mean"]))
    ax[0][1].set_xlabel("train acc. − test acc.")
    figs["corrupted"] = fig
    fig, ax = new_figure(1, 4, size=(3.2, 2.8))
    for a, k in zip(ax[0], ("l1", "apoz", "selectivity", "entropy")):
        a.hist(r["table2"]["random_values"][k], bins=15, color="tab:grey")
        a.axvline(r["table2"]["trained"][k], color="tab:red", lw=2, label="trained unit")
        a.set_title(k)
    ax[0][0].legend(fontsize=7)
    figs["random"] = fig
    return figs


def main(argv: list[str] | None = None) -> int:
    """Run all five parts and write units.{json,md} and units-*.png; returns 0."""
    s = parse_args(argv)
    return run_experiment("units", s, lambda: run_units(load_setup(s)), markdown, figures)


if __name__ == "__main__":
    raise SystemExit(exit_code(main))
