"""Train an embedded model on its data set (shapes10 or Fashion-MNIST) and write its state_dict.

    python -m prune.zoo.train_embedded                   # writes prune/zoo/assets/embedded_vgg.pt
    python -m prune.zoo.train_embedded --model embedded-plain   # writes .../embedded_plain_vgg.pt
    python -m prune.zoo.train_embedded --model fashion-plain    # Fashion-MNIST, .../fashion_plain_vgg.pt
    python -m prune.zoo.train_embedded --epochs 2 --out /tmp/vgg.pt --quiet

Seeded and deterministic on CPU for a given thread count: SGD with Nesterov momentum, a
cosine learning-rate schedule with one warm-up epoch, random flips: horizontal and vertical
on shapes10 (every class is closed under them), horizontal only on Fashion-MNIST (a shoe
upside down is not a shoe photo). Prints the test top-1 at the end.
``--per-class`` shrinks both splits (for quick checks and tests); ``--data`` points the
Fashion-MNIST models at another folder of its IDX files (`fashion-mnist:<dir>`).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from finetune.batches import Shuffled, in_order
from finetune.metrics import evaluate
from finetune.schedule import warmup_cosine_lr
from finetune.train import fit
from prune.core.files import torch_save
from prune.errors import UsageError
from prune.zoo.embedded_model import VARIANTS
from prune.zoo.models import create_model
from prune.zoo.recipes import RECIPES, TrainConfig, training_recipe
from prune.zoo.shapes import DEFAULT_PER_CLASS, make_shapes

__all__ = [
    "RECIPES", "TrainConfig", "Trained", "augment_flips", "fit_embedded", "main", "train", "train_variant",
    "training_recipe",
]


def augment_flips(x: torch.Tensor, *, gen: torch.Generator, vertical: bool = True) -> torch.Tensor:
    """Random horizontal (and, if `vertical`, vertical) flips per image, [B, 3, H, W] → [B, 3, H, W].

    The vertical draw is made either way, so both settings consume the generator alike."""
    b = x.shape[0]
    hflip = (torch.rand(b, generator=gen) < 0.5).view(b, 1, 1, 1)
    vflip = (torch.rand(b, generator=gen) < 0.5).view(b, 1, 1, 1) & vertical
    x = torch.where(hflip, x.flip(3), x)
    return torch.where(vflip, x.flip(2), x)


def fit_embedded(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    config: TrainConfig,
    warmup_steps: int | None = None,
    augment: bool = True,
    vertical_flips: bool = True,
    on_epoch_end: Callable[[int, float], None] | None = None,
    desc: str = "train",
    quiet: bool = False,
    device: torch.device | str = "cpu",
) -> list[float]:
    """Train `model` (on `device`) in place on images [N, 3, s, s] / labels [N] with the embedded recipe;
    returns each epoch's mean loss (`finetune.train.fit`; `on_epoch_end(epoch, loss)`, 0-based).

    SGD with Nesterov momentum; lr warm-up over `warmup_steps` (default `config.warmup_epochs`
    epochs) then cosine to 0, per step; random flips if `augment`. One Generator seeded with
    `config.seed` draws each epoch's order and the flips. Dropout draws from torch's global
    generator as it stands: seed it before calling.
    """
    gen = torch.Generator().manual_seed(config.seed)
    batches = Shuffled(images, labels, batch_size=config.batch_size, generator=gen)
    per_epoch = len(batches)
    total = config.epochs * per_epoch
    warmup = config.warmup_epochs * per_epoch if warmup_steps is None else warmup_steps
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=True
    )
    return fit(
        model, batches, optimizer, epochs=config.epochs,
        lr=lambda epoch, batch: warmup_cosine_lr(epoch * per_epoch + batch, total=total, warmup=warmup, base=config.lr),
        augment=(lambda x: augment_flips(x, gen=gen, vertical=vertical_flips)) if augment else None,
        on_epoch_end=on_epoch_end, desc=desc, quiet=quiet, device=device,
    )


def train(
    *, data: TensorDataset, config: TrainConfig, quiet: bool = False, variant: str = "embedded"
) -> nn.Module:
    """Train a fresh embedded model `variant` on ``data`` (images [N, 3, s, s], labels [N]) from scratch."""
    torch.manual_seed(config.seed)
    model = create_model(variant, num_classes=10, pretrained=False)
    images, labels = data.tensors
    vertical = VARIANTS[variant].dataset == "shapes10"
    fit_embedded(model, images, labels, config=config, vertical_flips=vertical, quiet=quiet)
    return model.eval()


@dataclass(frozen=True)
class Trained:
    """A model trained by `train_variant` (eval mode) and its record: recipe, image counts and
    side, test top-1 in [0, 1], training seconds."""

    model: nn.Module
    config: TrainConfig
    input_size: int
    train_images: int
    test_images: int
    test_top1: float
    seconds: float


def train_variant(variant: str, *, input_size: int | None = None, per_class: int | None = None,
                  epochs: int | None = None, seed: int = 0, data: str | None = None, quiet: bool = False) -> Trained:
    """Train the embedded model `variant` from scratch with its recipe (`RECIPES`; `epochs` overrides
    its length), deterministic on CPU for a given thread count, on its data at `input_size`
    (shapes10 models only; default the model's side) and evaluate it on the test split."""
    train_set, test_set = training_data(variant, per_class=per_class, seed=seed, data=data, input_size=input_size)
    recipe = RECIPES[variant]
    config = replace(recipe, epochs=epochs or recipe.epochs, seed=seed)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    start = time.perf_counter()
    try:
        model = train(data=train_set, config=config, quiet=quiet, variant=variant)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    seconds = time.perf_counter() - start
    top1 = evaluate(model, in_order(*test_set.tensors, batch_size=500)).top1
    return Trained(model=model, config=config, input_size=int(train_set.tensors[0].shape[-1]),
                   train_images=len(train_set), test_images=len(test_set), test_top1=top1, seconds=round(seconds, 1))


def _balanced_head(dataset, per_class: int | None) -> list[int]:
    """Indices of the first `per_class` items of each class (all items if None)."""
    if per_class is None:
        return list(range(len(dataset)))
    taken: dict[int, int] = {}
    keep = []
    for i, t in enumerate(dataset.targets):
        if taken.get(t, 0) < per_class:
            taken[t] = taken.get(t, 0) + 1
            keep.append(i)
    return keep


def _as_tensors(dataset, indices: list[int]) -> TensorDataset:
    """Items `indices` of a map-style dataset stacked into a TensorDataset (images [N, 3, s, s], labels [N])."""
    images = torch.stack([dataset[i][0] for i in indices])
    return TensorDataset(images, torch.tensor([dataset.targets[i] for i in indices], dtype=torch.long))


def training_data(
    variant: str, *, per_class: int | None, seed: int, data: str | None = None, input_size: int | None = None
) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) of the data set `variant` is trained on, at its input side (or `input_size`,
    shapes10 only: it is generated at any side), normalised as its registry entry says;
    `per_class` keeps that many images per class in each split."""
    v = VARIANTS[variant]
    if v.dataset == "shapes10":
        per_test = None if per_class is None else min(per_class, DEFAULT_PER_CLASS["test"])
        size = input_size or v.input_size
        return (make_shapes("train", per_class=per_class, size=size, seed=seed),
                make_shapes("test", per_class=per_test, size=size, seed=seed))
    if input_size not in (None, v.input_size):
        raise UsageError(f"--input-size {input_size}: {variant} is trained on Fashion-MNIST at its own "
                         f"{v.input_size}x{v.input_size}; drop --input-size or train a shapes10 model")
    from prune.zoo.data import load_data

    bundle = load_data(data, model=variant)
    return (_as_tensors(bundle.train, _balanced_head(bundle.train, per_class)),
            _as_tensors(bundle.val, _balanced_head(bundle.val, per_class)))


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m prune.zoo.train_embedded",
        description="Train an embedded model (a shipped VGG or ResNet-20 on shapes10 or Fashion-MNIST) and write its state_dict.",
    )
    defaults = TrainConfig()
    p.add_argument("--model", choices=tuple(VARIANTS), default="embedded", help="which embedded model (default %(default)s)")
    p.add_argument("--epochs", type=_positive_int, default=None, help="training epochs (default: the model's recipe)")
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed for data and training (default %(default)s)")
    p.add_argument("--out", type=Path, default=None, help="state_dict path (default: the model's shipped asset)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--per-class",
        type=_positive_int,
        default=None,
        help=f"images per class in each split (default {DEFAULT_PER_CLASS['train']} train / "
        f"{DEFAULT_PER_CLASS['test']} test); smaller for quick checks",
    )
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--input-size", type=_positive_int, default=None,
                   help="image side for the shapes10 models (default: the model's, 32); the network takes any side")
    p.add_argument("--data", default=None, help="Fashion-MNIST models: fashion-mnist:<dir> with the IDX files "
                   "(default: the Debian package's folder)")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    args = _parser().parse_args(argv)
    if args.seed < 0:
        print("error: --seed must be >= 0: pass e.g. --seed 0", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        trained = train_variant(args.model, input_size=args.input_size, per_class=args.per_class, epochs=args.epochs,
                                seed=args.seed, data=args.data, quiet=args.quiet)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = args.out or VARIANTS[args.model].weights
    torch_save(out, trained.model.state_dict())
    print(
        f"{args.model}: test top-1 {100 * trained.test_top1:.2f}% on {trained.test_images} images; trained "
        f"{trained.config.epochs} epochs on {trained.train_images} images of side {trained.input_size} in "
        f"{trained.seconds:.0f}s with {torch.get_num_threads()} threads; wrote {out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
