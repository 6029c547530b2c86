"""Shared pieces of the paper experiments (`benchmarks.ablation`, `units`, `characterise`,
`pruning_curve`): flags, model/data loading, unit collection, the unit-ablation mask, BN
folding, a small per-epoch training loop and result writing (JSON, Markdown, PNG).

Every experiment takes the main CLI's `--model/--weights/--data`; with none of them it runs
on the embedded shapes10 model and data. `--quick` shrinks the data (embedded: 30 train /
20 test images per class) and the work so that a run takes well under a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset
from tqdm.auto import tqdm

import scoring
from benchmarks.common import RESULTS, machine, markdown_table
from finetune.metrics import one_vs_rest_balanced_accuracy
from prune.zoo.data import DataBundle, class_images, load_data, make_loader
from prune.errors import UsageError
from prune.outputs.files import write_bytes, write_json, write_text
from prune.zoo.models import load_model
from prune.pipeline.observe import following_norm, collect_units

QUICK_PER_CLASS = {"train": 30, "test": 20}
"""Images per class of the embedded data in --quick mode."""


# ---------------------------------------------------------------- flags and setup


def base_parser(prog: str, doc: str, *, analysis: bool = True) -> argparse.ArgumentParser:
    """Parser with the flags every experiment shares (model/data like `python -m prune`);
    `analysis` adds --test-per-class and --class (experiments that evaluate by themselves)."""
    p = argparse.ArgumentParser(
        prog=f"python -m benchmarks.{prog}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a = p.add_argument
    a("--model", default="embedded", help="'embedded', a torchvision name or timm:<name> (as python -m prune)")
    a("--weights", default=None, help="checkpoint path or torchvision weights name (default: shipped embedded weights)")
    a("--data", default=None, help="ImageFolder root with train/ and val/ (default: embedded shapes10)")
    a("--input-size", type=int, default=None, help="image side (default: 32 embedded, 224 otherwise)")
    if analysis:
        a("--test-per-class", type=int, default=None, help="cap on test images per class (default: all; 20 with --quick)")
        a("--class", dest="cls", type=int, default=0, help="the class studied where one class is used")
    a("--seed", type=int, default=0, help="seed of every random choice")
    a("--quick", action="store_true", help="small, fast mode (tests); writes <name>-quick.*")
    a("--quiet", action="store_true", help="no progress bars")
    a("--threads", type=int, default=None, help="torch CPU threads (default: 1 with --quick, else torch's choice)")
    a("--results-dir", "--out", dest="results_dir", type=Path, default=RESULTS, help="where JSON/MD/PNG go")
    return p


@dataclass
class Setup:
    """A loaded model (eval mode, CPU) with its data; `test` is (images [N,3,s,s], labels [N])."""

    model: nn.Module
    data: DataBundle
    test: tuple[torch.Tensor, torch.Tensor]
    args: argparse.Namespace

    @property
    def num_classes(self) -> int:
        return len(self.data.classes)


def quick_embedded_data() -> DataBundle:
    """The embedded shapes10 set, shrunk to QUICK_PER_CLASS images per class."""
    from prune.zoo.embedded_model import EMBEDDED_INPUT_SIZE
    from prune.zoo.shapes import CLASSES, make_shapes

    train = make_shapes("train", per_class=QUICK_PER_CLASS["train"], size=EMBEDDED_INPUT_SIZE)
    val = make_shapes("test", per_class=QUICK_PER_CLASS["test"], size=EMBEDDED_INPUT_SIZE)
    targets = tuple(int(t) for t in train.tensors[1])
    return DataBundle(train=train, val=val, classes=tuple(CLASSES), train_targets=targets, input_size=EMBEDDED_INPUT_SIZE)


def load_bundle(args: argparse.Namespace) -> DataBundle:
    """The data the flags name; the shrunk embedded set with --quick and no --data."""
    if args.data is None and args.quick and args.input_size is None:
        return quick_embedded_data()
    return load_data(args.data, input_size=args.input_size)


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


def load_setup(args: argparse.Namespace) -> Setup:
    """Model and data from the shared flags; the test split is read into memory once."""
    torch.manual_seed(args.seed)
    data = load_bundle(args)
    model = load_model(args.model, weights=args.weights, num_classes=len(data.classes)).eval()
    cap = args.test_per_class if args.test_per_class is not None else (QUICK_PER_CLASS["test"] if args.quick else None)
    test = dataset_tensors(data.val, per_class=cap, seed=args.seed)
    if not 0 <= args.cls < len(data.classes):
        raise UsageError(f"--class {args.cls} is not a class index; use 0..{len(data.classes) - 1}")
    return Setup(model=model, data=data, test=test, args=args)


@contextmanager
def torch_threads(args: argparse.Namespace) -> Iterator[None]:
    """Use `--threads` torch threads (1 with --quick) inside the block, then restore.

    One thread avoids OpenMP spin-waits on a busy machine, which can cost more than the
    second core gains for these small networks.
    """
    wanted = args.threads if args.threads is not None else (1 if args.quick else None)
    before = torch.get_num_threads()
    if wanted is not None:
        torch.set_num_threads(max(1, wanted))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def guarded(body: Callable[[], object]) -> int:
    """Run `body`; a UsageError or missing file becomes a one-line error and exit code 2."""
    try:
        body()
    except (UsageError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


# ---------------------------------------------------------------- layers and units


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """(qualified name, module) of every Conv2d, in registration (≈ depth) order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def find_conv(model: nn.Module, name: str | None) -> tuple[str, nn.Conv2d]:
    """The conv called `name`, or the last conv when `name` is None."""
    convs = conv_layers(model)
    if not convs:
        raise UsageError("the model has no Conv2d layer; pass a CNN")
    if name is None:
        return convs[-1]
    for n, m in convs:
        if n == name:
            return n, m
    raise UsageError(f"no conv layer {name!r}; choose one of {', '.join(n for n, _ in convs)}")


def unit_module(model: nn.Module, conv: nn.Conv2d) -> nn.Module:
    """The module whose output becomes the units after ReLU: the BN right after `conv`, or `conv`."""
    norm = following_norm(model, conv)
    return conv if norm is None else norm


def module_name(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def class_batch(
    model: nn.Module, conv: nn.Conv2d, name: str, data: DataBundle, cls: int, n: int, *, seed: int, scale: float = 1.0
) -> scoring.ClassBatch:
    """Units [n, C, m, m] of `conv` for `n` training images of class `cls` (same choice as the main job)."""
    images = class_images(data, cls, n, seed=seed) * scale
    units = collect_units(model, conv, images, name=name)
    return scoring.ClassBatch(class_index=cls, images=images, activations=units)


def per_class_count(data: DataBundle, wanted: int) -> int:
    """`wanted`, lowered to the smallest class's number of training images."""
    counts = np.bincount(np.asarray(data.train_targets), minlength=len(data.classes))
    return int(min(wanted, counts.min()))


def score_layer(
    scorer_name: str, model: nn.Module, conv: nn.Conv2d, name: str, batches: Sequence[scoring.ClassBatch], **options: Any
) -> torch.Tensor:
    """Scores [C] (higher = keep) of one layer with a registry scorer."""
    scorer = scoring.create(scorer_name, **options)
    layer = scoring.LayerSpec(model=model, conv=conv, name=name)
    return scorer(layer, batches if scorer.info.needs_data else ()).float()


def layer_entropy(acts: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Units [N, C, m, m] → (feature entropy [C] in nats, selective rate ε [C]) over the N images."""
    from scoring.entropy import feature_entropy, selective_rate
    from scoring.topology import birth_times

    births = birth_times(acts).T  # [C, N]
    return feature_entropy(births), selective_rate(births)


def pick_unit(entropy: np.ndarray, rate: np.ndarray, *, min_rate: float = 0.5) -> int:
    """The reference unit: lowest feature entropy among units with ε ≥ `min_rate` (a unit
    with few births also has a low entropy, paper Eq. 9); among all units if none has."""
    ok = rate >= min_rate
    return int(np.argmin(np.where(ok, entropy, np.inf))) if ok.any() else int(np.argmin(entropy))


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


# ---------------------------------------------------------------- ablation


@contextmanager
def channel_mask(module: nn.Module, mask: torch.Tensor) -> Iterator[None]:
    """Multiply `module`'s output channels by `mask` [C] (0 = ablated) during the block."""

    def hook(_m: nn.Module, _i: tuple, out: torch.Tensor) -> torch.Tensor:
        return out * mask.to(out.dtype).view(1, -1, *([1] * (out.ndim - 2)))

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class _Stop(Exception):
    pass


def _tail_graph(model: nn.Module, name: str) -> nn.Module | None:
    """The part of `model` after module `name`, as an fx GraphModule taking that module's
    output; None when tracing fails or later layers also need earlier values (skips)."""
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception:  # untraceable model: fall back to full forwards
        return None
    graph = gm.graph
    nodes = [n for n in graph.nodes if n.op == "call_module" and n.target == name]
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(nodes) != 1:
        return None
    with graph.inserting_after(inputs[-1]):
        units = graph.placeholder("units")
    nodes[0].replace_all_uses_with(units)
    graph.eliminate_dead_code()
    if any(n.users for n in inputs):
        return None
    for n in inputs:
        graph.erase_node(n)
    gm.recompile()
    return gm.eval()


class LayerTail:
    """Logits of fixed images with some units of one layer zeroed (cumulative ablation).

    The output of the unit module (BN after the conv, else the conv) is computed once; each
    call runs only the rest of the network (fx split) on that output times the mask, or, when
    the model cannot be split, the whole forward with a masking hook.
    """

    def __init__(self, model: nn.Module, conv: nn.Conv2d, images: torch.Tensor, *, batch_size: int = 256) -> None:
        self.model = model.eval()
        self.module = unit_module(model, conv)
        self.images = images
        self.batch_size = batch_size
        self.tail = _tail_graph(model, module_name(model, self.module))
        self.cached = self._capture() if self.tail is not None else None

    @torch.no_grad()
    def _capture(self) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []

        def grab(_m: nn.Module, _i: tuple, y: torch.Tensor) -> None:
            out.append(y.detach().clone())
            raise _Stop

        handle = self.module.register_forward_hook(grab)
        try:
            for x in self.images.split(self.batch_size):
                try:
                    self.model(x)
                except _Stop:
                    pass
        finally:
            handle.remove()
        return out

    @torch.no_grad()
    def logits(self, mask: torch.Tensor) -> torch.Tensor:
        """Logits [N, K] with the units multiplied by `mask` [C] (1 = kept, 0 = ablated)."""
        return self.logits_many(mask.unsqueeze(0))[0]

    @torch.no_grad()
    def logits_many(self, masks: torch.Tensor, *, max_images: int = 4096) -> torch.Tensor:
        """Logits [S, N, K] for masks [S, C]; several masks share one tail call (fx split)."""
        if self.cached is None:
            out = []
            for mask in masks:
                with channel_mask(self.module, mask):
                    out.append(torch.cat([self.model(x) for x in self.images.split(self.batch_size)]))
            return torch.stack(out)
        per_call = max(1, max_images // self.batch_size)
        rows = []
        for chunk in masks.split(per_call):
            view = chunk.view(len(chunk), 1, -1, 1, 1)
            parts = []
            for z in self.cached:
                y = self.tail((z.unsqueeze(0) * view.to(z.dtype)).flatten(0, 1))
                parts.append(y.view(len(chunk), len(z), -1))
            rows.append(torch.cat(parts, dim=1))
        return torch.cat(rows)


def ablation_masks(order: torch.Tensor, steps: Sequence[int]) -> torch.Tensor:
    """Masks [S, C]: row s has the first `steps[s]` channels of `order` zeroed."""
    masks = torch.ones(len(steps), len(order))
    for row, k in enumerate(steps):
        masks[row, order[:k]] = 0.0
    return masks


def confusion_matrix(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[K, K] counts, rows = true class, columns = top-1 prediction."""
    pred = logits.argmax(dim=1)
    return torch.bincount(labels * num_classes + pred, minlength=num_classes**2).view(num_classes, num_classes)


def class_metrics(logits: torch.Tensor, labels: torch.Tensor, cls: int) -> dict[str, float]:
    """Accuracy and mean cross-entropy on the images of class `cls`, and its one-vs-rest
    balanced accuracy over all images."""
    own = labels == cls
    k = logits.shape[1]
    acc = float((logits[own].argmax(1) == cls).float().mean()) if own.any() else float("nan")
    loss = float(nn.functional.cross_entropy(logits[own], labels[own])) if own.any() else float("nan")
    bal = one_vs_rest_balanced_accuracy(confusion_matrix(logits, labels, k), cls)
    return {"accuracy": acc, "loss": loss, "balanced_accuracy": bal}


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean())


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """Logits [N, K] of `model` in eval mode."""
    model.eval()
    return torch.cat([model(x) for x in images.split(batch_size)])


# ---------------------------------------------------------------- training


def train_epochs(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    seed: int,
    lr: float | None = None,
    augment: bool = True,
    on_epoch_end: Callable[[int, nn.Module, float], None] | None = None,
    quiet: bool = True,
    desc: str = "train",
) -> None:
    """Train `model` in place like `prune.zoo.train_embedded` (SGD + Nesterov, warm-up + cosine,
    flips if `augment`); `on_epoch_end(epoch, model, mean_loss)` after each epoch (1-based)."""
    from prune.zoo.train_embedded import TrainConfig, augment_flips, warmup_cosine_lr

    cfg = TrainConfig(seed=seed)
    base = cfg.lr if lr is None else lr
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=base, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    per_epoch = -(-len(labels) // cfg.batch_size)
    total, step = epochs * per_epoch, 0
    for epoch in tqdm(range(1, epochs + 1), desc=desc, disable=quiet, leave=False):
        model.train()
        order = torch.randperm(len(labels), generator=gen)
        loss_sum = 0.0
        for i in range(0, len(labels), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            for group in opt.param_groups:
                group["lr"] = warmup_cosine_lr(step, total=total, warmup=min(per_epoch, total // 4), base=base)
            x = augment_flips(images[idx], gen=gen) if augment else images[idx]
            loss = nn.functional.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(idx)
            step += 1
        model.eval()
        if on_epoch_end is not None:
            on_epoch_end(epoch, model, loss_sum / len(labels))


# ---------------------------------------------------------------- results


def mean_std(values: Sequence[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0}


def stem(name: str, quick: bool) -> str:
    """File stem of an experiment's outputs: `name`, or `name-quick` in quick mode."""
    return f"{name}-quick" if quick else name


def save_figure(fig: Any, path: Path) -> None:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    write_bytes(path, buf.getvalue())


def new_figure(rows: int = 1, cols: int = 1, *, size: tuple[float, float] = (6.0, 4.0)) -> tuple[Any, Any]:
    """A matplotlib figure on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)


def setup_info(setup: Setup) -> dict:
    """What was run on: model, weights, data, sizes and the machine."""
    a = setup.args
    return {
        "model": a.model,
        "weights": a.weights,
        "data": a.data or "embedded shapes10",
        "input_size": setup.data.input_size,
        "classes": list(setup.data.classes),
        "train_images": len(setup.data.train_targets),
        "test_images": int(len(setup.test[1])),
        "quick": bool(a.quick),
        "seed": a.seed,
        "machine": {**machine(), "torch_threads": torch.get_num_threads()},
    }


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


__all__ = [
    "LayerTail",
    "Setup",
    "ablation_masks",
    "accuracy",
    "base_parser",
    "channel_mask",
    "class_batch",
    "class_metrics",
    "confusion_matrix",
    "conv_layers",
    "dataset_tensors",
    "find_conv",
    "guarded",
    "fold_bn",
    "load_setup",
    "markdown_table",
    "mean_std",
    "new_figure",
    "layer_entropy",
    "per_class_count",
    "pick_unit",
    "predict",
    "score_layer",
    "setup_info",
    "torch_threads",
    "train_epochs",
    "unit_module",
    "write_results",
]


def run_experiment(
    name: str,
    args: argparse.Namespace,
    compute: Callable[[], dict],
    markdown: Callable[[dict], str],
    figures: Callable[[dict], dict],
) -> int:
    """Compute a result under the --threads setting, write `<name>.{json,md}` and
    `<name>-*.png`, print the table unless --quiet; exit code 2 with one line on bad input."""
    started = time.perf_counter()

    def body() -> None:
        result = compute()
        text = markdown(result)
        write_results(args.results_dir, name, quick=args.quick, payload=result, markdown=text,
                      figures=figures(result), started=started)
        if not args.quiet:
            print(text)

    with torch_threads(args):
        return guarded(body)
