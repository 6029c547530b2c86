"""The BatchNorm refit between progressive surgeries, run from the prefix cache's cuts
(`prune.pipeline.refit`), leaves the same statistics, scores and decisions bit for bit as the
whole refit, on a BatchNorm chain and a residual network, in memory or spilled; it runs fewer
images through the early layers; new images at a refit make it the whole refit."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
import torch
from test_prefix_cache import DATA, SOURCE, assert_same, bn_chain, refit_for, resnet
from torch import nn

import scoring
from finetune.batchnorm import recalibrate_batchnorm
from prune.pipeline.refit import BatchNormRefit
from prune.pipeline.selection import select_and_prune
from prune.pipeline.surgery import Surgeon
from prune.zoo.data import make_loader

MODELS = {"bn": bn_chain, "resnet": resnet}


def seeded_loader() -> Iterable:
    """The pipeline's refit batches: a seeded loader made anew, the same 2 batches every time."""
    return make_loader(DATA.train, batch_size=6, shuffle=True, seed=0)


def run(build: Callable[[], nn.Module], scorer: str, *, cached_refit: bool, cache_bytes: int = 1 << 30,
        spill_bytes: int = 0, spill_dir: Path | None = None, loader: Callable[[], Iterable] = seeded_loader,
        batches: int = 2, counted: list[int] | None = None) -> tuple[list, nn.Module]:
    """Decisions and pruned model of a progressive run at ratio 0.5 (seeded weights), refitting
    with a `BatchNormRefit` (from the cache's cuts) or a plain callable doing the whole refit;
    `counted` gets the images each train-mode forward of the first BatchNorm sees."""
    torch.manual_seed(0)
    model = build().eval()
    if cached_refit:
        refit = BatchNormRefit(model, loader, batches=batches)
    else:
        def refit() -> int:
            return recalibrate_batchnorm(model, loader(), batches=batches, device="cpu")
    first = next(m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    hook = first.register_forward_hook(
        lambda m, args, _o: counted.append(len(args[0])) if counted is not None and m.training else None)
    try:
        decisions = select_and_prune(Surgeon(model, torch.zeros(1, 3, 16, 16)), scoring.create(scorer), SOURCE,
                                     ratio=0.5, refit=refit, quiet=True, cache_bytes=cache_bytes,
                                     spill_bytes=spill_bytes, spill_dir=spill_dir)
    finally:
        hook.remove()
    return decisions, model


@pytest.mark.parametrize("scorer", ["entropy", "apoz"])
@pytest.mark.parametrize("model", MODELS)
def test_a_refit_from_cuts_equals_the_whole_refit_bit_for_bit(model: str, scorer: str) -> None:
    whole = run(MODELS[model], scorer, cached_refit=False, cache_bytes=0)
    assert len(whole[0]) >= 3
    assert_same(run(MODELS[model], scorer, cached_refit=True), whole)


@pytest.mark.parametrize("model", MODELS)
def test_a_refit_from_spilled_cuts_equals_the_whole_refit(model: str, tmp_path: Path) -> None:
    whole = run(MODELS[model], "entropy", cached_refit=False, cache_bytes=0)
    assert_same(run(MODELS[model], "entropy", cached_refit=True, cache_bytes=0, spill_bytes=1 << 30,
                    spill_dir=tmp_path), whole)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("model", MODELS)
def test_refits_from_cuts_skip_the_unchanged_prefix(model: str) -> None:
    whole: list[int] = []
    cut: list[int] = []
    run(MODELS[model], "apoz", cached_refit=False, counted=whole)
    run(MODELS[model], "apoz", cached_refit=True, counted=cut)
    refits = len(run(MODELS[model], "apoz", cached_refit=False)[0]) - 1
    assert sum(whole) == refits * 2 * 6  # 2 batches of 6 images at every refit
    # the first refits run whole (the loaded statistics change, then the cut is stored); later ones
    # start from the cut before the group pruned last, past the first BatchNorm once that lies before it
    assert sum(cut) < sum(whole)
    assert sum(cut) % 12 == 0  # a refit runs all its batches whole or none


def test_new_images_at_each_refit_make_it_the_whole_refit() -> None:
    """New batches at each refit: no entry fits, each refit resets and re-estimates everything,
    as the whole refit does."""
    whole = run(bn_chain, "entropy", cached_refit=False, cache_bytes=0, loader=continuing())
    assert_same(run(bn_chain, "entropy", cached_refit=True, loader=continuing()), whole)
    same = run(bn_chain, "entropy", cached_refit=False, cache_bytes=0)
    assert not torch.equal(whole[1].state_dict()["features.1.running_mean"],  # the batches did differ
                           same[1].state_dict()["features.1.running_mean"])


def test_kept_batchnorms_keep_their_statistics() -> None:
    torch.manual_seed(0)
    model = bn_chain().eval()
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.running_mean.uniform_()
    before = [m.running_mean.clone() for m in norms]
    recalibrate_batchnorm(model, seeded_loader(), batches=2, device="cpu", kept={norms[0]},
                          forward=lambda _i, x: model(x))
    assert torch.equal(norms[0].running_mean, before[0]) and norms[0].num_batches_tracked == 0
    assert all(not torch.equal(m.running_mean, b) for m, b in zip(norms[1:], before[1:]))
    assert all(m.num_batches_tracked == 2 for m in norms[1:]) and not model.training


def test_the_plain_refit_matches_the_whole_refit() -> None:
    """`BatchNormRefit()` is `recalibrate_batchnorm` on a fresh loader (the pipeline's refit)."""
    torch.manual_seed(0)
    a, b = bn_chain().eval(), bn_chain().eval()
    b.load_state_dict(a.state_dict())
    assert BatchNormRefit(a, seeded_loader, batches=2)() == refit_for(b)() == 2 * 6
    assert all(torch.equal(t, b.state_dict()[k]) for k, t in a.state_dict().items())


class SharedNorm(nn.Module):
    """One BatchNorm called twice: on the input, and after the conv chain on the pooled input
    (a cut between its calls must not keep it: the whole refit re-estimates it from both)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(3)
        self.convs = nn.Sequential(*[nn.Sequential(nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1), nn.BatchNorm2d(8),
                                                   nn.ReLU()) for i in range(4)])
        self.fc, self.aux = nn.Linear(8, 3), nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.convs(self.norm(x)).mean((2, 3))
        return self.fc(h) + self.aux(self.norm(nn.functional.avg_pool2d(x, 2)).mean((2, 3)))


class TracedNorm(nn.BatchNorm2d):
    """A BatchNorm with its own forward, which fx traces through (in eval mode: its train-mode
    branch is not in the graph, so a refit must run the model itself)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.num_batches_tracked.add_(1)
        average = 1.0 / float(self.num_batches_tracked) if self.training else 0.0
        return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                        self.training, average, self.eps)


def chain_of(norm: type[nn.Module], *, first_norm: bool = True) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        layers: list[nn.Module] = []
        c = 3
        for i, w in enumerate((8, 12, 16, 16)):
            layers += [nn.Conv2d(c, w, 3, padding=1), *([norm(w)] if first_norm or i else []), nn.ReLU()]
            c = w
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 3))
    return build


def continuing() -> Callable[[], Iterable]:
    """A loader that goes on shuffling: new batches at every refit."""
    shared = make_loader(DATA.train, batch_size=6, shuffle=True, seed=0)
    return lambda: shared


@pytest.mark.parametrize("build, loader", [
    (SharedNorm, seeded_loader),
    (chain_of(TracedNorm), seeded_loader),
    (chain_of(nn.BatchNorm2d, first_norm=False), continuing),  # new images, no BatchNorm before the first cuts
], ids=["batchnorm-called-twice", "batchnorm-fx-traces-through", "new-images-no-early-batchnorm"])
def test_models_and_loaders_where_a_cut_cannot_stand_in(build: Callable[[], nn.Module],
                                                        loader: Callable[[], Callable[[], Iterable]] | Callable) -> None:
    make = loader() if loader is continuing else loader
    whole = run(build, "apoz", cached_refit=False, cache_bytes=0, loader=make)
    make = loader() if loader is continuing else loader
    assert_same(run(build, "apoz", cached_refit=True, loader=make), whole)


@pytest.mark.parametrize("budget", [50_000, 100_000, 200_000, 400_000])
@pytest.mark.parametrize("model", MODELS)
def test_budgets_that_hold_some_batches_cuts(model: str, budget: int) -> None:
    """Memory for some of a refit's 3 batches' entries, no disk: the batches' cuts differ or some
    are missing, so the refit runs whole (from the images, every BatchNorm reset)."""
    whole = run(MODELS[model], "apoz", cached_refit=False, cache_bytes=0, batches=3)
    assert_same(run(MODELS[model], "apoz", cached_refit=True, cache_bytes=budget, batches=3), whole)


def test_a_loader_that_grows_shorter_and_batches_beyond_the_held_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = [0]

    def shrinking() -> Iterable:
        calls[0] += 1
        batches = list(seeded_loader())
        return batches if calls[0] < 4 else batches[:1]  # from the 4th refit on, the first batch only

    whole = run(resnet, "apoz", cached_refit=False, cache_bytes=0, loader=shrinking)
    calls[0] = 0
    assert_same(run(resnet, "apoz", cached_refit=True, loader=shrinking), whole)
    monkeypatch.setattr("prune.pipeline.refit.HELD_BYTES", 6 * 3 * 16 * 16 * 4)  # one batch of images
    assert_same(run(resnet, "apoz", cached_refit=True), run(resnet, "apoz", cached_refit=False, cache_bytes=0))
