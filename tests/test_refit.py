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
        counted: list[int] | None = None) -> tuple[list, nn.Module]:
    """Decisions and pruned model of a progressive run at ratio 0.5 (seeded weights), refitting
    with a `BatchNormRefit` (from the cache's cuts) or a plain callable doing the whole refit;
    `counted` gets the images each train-mode forward of the first BatchNorm sees."""
    torch.manual_seed(0)
    model = build().eval()
    if cached_refit:
        refit = BatchNormRefit(model, loader, batches=2)
    else:
        def refit() -> int:
            return recalibrate_batchnorm(model, loader(), batches=2, device="cpu")
    first = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
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
    """A loader that goes on shuffling (new batches at each refit): no entry fits, each refit
    resets and re-estimates everything, as the whole refit does."""
    def continuing() -> Callable[[], Iterable]:
        shared = make_loader(DATA.train, batch_size=6, shuffle=True, seed=0)
        return lambda: shared

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
