"""Progressive scoring with the prefix cache (`prune.pipeline.prefix_cache`) equals scoring by
forwards from the images, bit for bit, on a plain chain, a BatchNorm chain (refit between
layers) and a residual network, in memory or spilled to disk (`prune.pipeline.spill`); it runs
fewer forwards of the early layers; beyond its memory and disk budgets it recomputes, with the
same scores; its spill folder is gone when selection ends, also on a failure."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import small_data
from torch import nn

import scoring
from finetune.batchnorm import recalibrate_batchnorm
from prune.pipeline.prefix_cache import PrefixCache, live, prefix_cache
from prune.pipeline.selection import ScoringData, scoring_top1, select_and_prune
from prune.pipeline.sites import traced_graph
from prune.pipeline.spill import Spill, in_memory
from prune.pipeline.surgery import Surgeon
from prune.zoo.data import make_loader
from prune.zoo.embedded_model import EmbeddedVGG
from prune.zoo.resnet_cifar import ResNetCifar

DATA = small_data(classes=3, per_class=8, size=16)
SOURCE = ScoringData(DATA, classes=[0, 1, 2], per_class=7, seed=0, batch_size=2)  # chunks 1+2+2+2
CHAIN = (8, 12, "M", 16, 16)


def plain_chain() -> nn.Module:
    return EmbeddedVGG(num_classes=3, cfg=CHAIN, batch_norm=False)


def bn_chain() -> nn.Module:
    return EmbeddedVGG(num_classes=3, cfg=CHAIN, batch_norm=True)


def resnet() -> nn.Module:
    return ResNetCifar(num_classes=3, widths=(8, 16, 16), blocks=1)


MODELS = {"plain": plain_chain, "bn": bn_chain, "resnet": resnet}


def refit_for(model: nn.Module, *, same_batches: bool = True) -> Callable[[], int]:
    """The pipeline's refit: every BatchNorm re-estimated on 2 seeded training batches, the same
    ones each time (a loader made anew, as the pipeline does) or, with `same_batches` False,
    the next shuffle of one loader (every BatchNorm's statistics change at every refit)."""
    shared = make_loader(DATA.train, batch_size=6, shuffle=True, seed=0)

    def refit() -> int:
        loader = make_loader(DATA.train, batch_size=6, shuffle=True, seed=0) if same_batches else shared
        return recalibrate_batchnorm(model, loader, batches=2, device="cpu")

    return refit


def pruned(build: Callable[[], nn.Module], scorer: str, *, cache_bytes: int, same_batches: bool = True,
           spill_bytes: int = 0, spill_dir: Path | None = None) -> tuple[list, nn.Module]:
    """Decisions and the pruned model of a progressive run at ratio 0.5 (seeded random weights);
    no spill unless `spill_bytes` is given."""
    torch.manual_seed(0)
    model = build().eval()
    surgeon = Surgeon(model, torch.zeros(1, 3, 16, 16))
    decisions = select_and_prune(surgeon, scoring.create(scorer), SOURCE, ratio=0.5,
                                 refit=refit_for(model, same_batches=same_batches), quiet=True, cache_bytes=cache_bytes,
                                 spill_bytes=spill_bytes, spill_dir=spill_dir)
    return decisions, model


def assert_same(a: tuple[list, nn.Module], b: tuple[list, nn.Module]) -> None:
    (decisions_a, model_a), (decisions_b, model_b) = a, b
    assert [d.name for d in decisions_a] == [d.name for d in decisions_b]
    for da, db in zip(decisions_a, decisions_b):
        assert da.removed == db.removed, da.name
        assert torch.equal(da.scores, db.scores), da.name
        assert da.scoring_top1 == db.scoring_top1, da.name
    state_b = model_b.state_dict()
    assert all(torch.equal(t, state_b[k]) for k, t in model_a.state_dict().items())


@pytest.mark.parametrize("scorer", ["entropy", "apoz"])
@pytest.mark.parametrize("model", MODELS)
def test_cached_scores_equal_uncached_bit_for_bit(model: str, scorer: str) -> None:
    uncached = pruned(MODELS[model], scorer, cache_bytes=0)
    assert len(uncached[0]) >= 3
    assert_same(pruned(MODELS[model], scorer, cache_bytes=1 << 30), uncached)


def forwards_of_first_conv(build: Callable[[], nn.Module], *, cache_bytes: int, spill_bytes: int = 0) -> int:
    """Images through the first conv during a progressive run (scoring, top-1 diagnostics, refits)."""
    torch.manual_seed(0)
    model = build().eval()
    surgeon = Surgeon(model, torch.zeros(1, 3, 16, 16))
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    images = [0]
    handle = first.register_forward_hook(lambda _m, args, _o: images.__setitem__(0, images[0] + len(args[0])))
    try:
        select_and_prune(surgeon, scoring.create("apoz"), SOURCE, ratio=0.5, refit=refit_for(model), quiet=True,
                         cache_bytes=cache_bytes, spill_bytes=spill_bytes)
    finally:
        handle.remove()
    return images[0]


@pytest.mark.parametrize("cache_bytes, spill_bytes", [(1 << 30, 0), (0, 1 << 30)], ids=["memory", "disk"])
@pytest.mark.parametrize("model", MODELS)
def test_the_cache_saves_forwards_of_early_layers(model: str, cache_bytes: int, spill_bytes: int) -> None:
    uncached = forwards_of_first_conv(MODELS[model], cache_bytes=0)
    cached = forwards_of_first_conv(MODELS[model], cache_bytes=cache_bytes, spill_bytes=spill_bytes)
    # chunks after the first of each class (6 of 7 images) skip the pruned prefix from the 3rd group on
    assert cached < uncached - 6 * 3


@pytest.mark.parametrize("model", MODELS)
def test_spilled_scores_equal_uncached_bit_for_bit(model: str, tmp_path: Path) -> None:
    uncached = pruned(MODELS[model], "entropy", cache_bytes=0)
    assert_same(pruned(MODELS[model], "entropy", cache_bytes=0, spill_bytes=1 << 30, spill_dir=tmp_path), uncached)
    assert list(tmp_path.iterdir()) == []  # the spill folder went with the selection


@pytest.mark.parametrize("spill_bytes", [0, 1], ids=["no-disk", "tiny-disk"])
def test_beyond_the_budgets_chunks_are_recomputed_with_the_same_scores(spill_bytes: int, tmp_path: Path) -> None:
    uncached = pruned(bn_chain, "entropy", cache_bytes=0)
    # a cache that holds nothing in memory nor on disk
    assert_same(pruned(bn_chain, "entropy", cache_bytes=1, spill_bytes=spill_bytes, spill_dir=tmp_path), uncached)
    assert list(tmp_path.iterdir()) == []  # no spill folder was ever made
    recomputed = forwards_of_first_conv(bn_chain, cache_bytes=1, spill_bytes=spill_bytes)
    assert recomputed == forwards_of_first_conv(bn_chain, cache_bytes=0)


def test_the_spill_folder_goes_also_when_a_scorer_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entropy = type(scoring.create("entropy"))
    compute = entropy.compute
    spilled: list[int] = []

    def failing(self: scoring.Scorer) -> torch.Tensor:
        spilled.append(len(list(tmp_path.rglob("*.pt"))))
        if len(spilled) == 3:
            raise RuntimeError("the scorer failed")
        return compute(self)

    monkeypatch.setattr(entropy, "compute", failing)
    with pytest.raises(RuntimeError, match="the scorer failed"):
        pruned(bn_chain, "entropy", cache_bytes=0, spill_bytes=1 << 30, spill_dir=tmp_path)
    assert spilled[-1] > 0  # chunks were on disk when it failed
    assert list(tmp_path.iterdir()) == []


def test_a_spill_file_holds_values_exactly(tmp_path: Path) -> None:
    strided = torch.randn(2, 4, 3, 3).to(memory_format=torch.channels_last)
    odd = torch.tensor([-0.0, math.nan, math.inf, 1e-45], dtype=torch.float32)
    values = {"x": strided, "odd": odd, "half": odd.half(), "size": torch.Size([2, 4]), "n": None}
    spill = Spill(budget_bytes=1 << 20, directory=tmp_path)
    path = spill.write(values, 1000)
    assert path is not None and spill.folder is not None and path.parent == spill.folder
    back = spill.read(path)
    assert back["x"].stride() == strided.stride() and back["x"].dtype == strided.dtype
    for name in ("x", "odd", "half"):
        assert torch.equal(back[name].reshape(-1).view(torch.uint8), values[name].reshape(-1).view(torch.uint8))
    assert back["size"] == values["size"] and back["n"] is None
    assert spill.nbytes == path.stat().st_size
    spill.delete(path)
    assert spill.nbytes == 0 and not path.exists()
    spill.write(values, 1000)
    folder = spill.folder
    spill.close()
    assert not folder.exists()
    assert spill.write(values, (1 << 20) + 1) is None  # past the budget


def test_a_spill_keeps_the_free_space_margin_and_goes_when_collected(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    values = {"x": torch.zeros(10)}
    spill = Spill(budget_bytes=1 << 20, directory=tmp_path)
    assert spill.write(values, 40) is not None
    folder = spill.folder
    monkeypatch.setattr("prune.pipeline.spill.SPILL_MARGIN_BYTES", 1 << 62)  # more than any disk is free
    assert spill.write(values, 40) is None
    del spill  # garbage-collected: its folder goes
    assert not folder.exists()
    with pytest.raises(FileNotFoundError, match="create it"):
        Spill(directory=tmp_path / "missing")


def test_a_write_that_fails_on_a_full_disk_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full_disk(values: object, path: Path) -> None:
        Path(path).write_bytes(b"half")  # torch.save reports a failed write as a RuntimeError
        raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file")

    spill = Spill(budget_bytes=1 << 20, directory=tmp_path)
    monkeypatch.setattr(torch, "save", full_disk)
    assert spill.write({"x": torch.zeros(10)}, 40) is None
    assert spill.nbytes == 0 and list(spill.folder.iterdir()) == []


def test_a_killed_process_spill_folder_goes_when_a_new_one_is_made(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f"topoprune-spill-{int(dead.stdout)}-abc"
    alive = tmp_path / f"topoprune-spill-{os.getpid()}-def"
    for folder in (orphan, alive):
        folder.mkdir()
        (folder / "0.pt").write_bytes(b"x")
    spill = Spill(budget_bytes=1 << 20, directory=tmp_path)
    assert spill.write({"x": torch.zeros(10)}, 40) is not None
    assert not orphan.exists() and alive.exists() and spill.folder.name.startswith(f"topoprune-spill-{os.getpid()}-")


def test_nothing_is_spilled_to_a_folder_held_in_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mounts = tmp_path.parent / f"{tmp_path.name}-mounts"
    mounts.write_text(f"/dev/vda / ext4 rw 0 0\ntmpfs {tmp_path} tmpfs rw 0 0\n")
    monkeypatch.setattr("prune.pipeline.spill.MOUNTS", mounts)
    assert in_memory(tmp_path / "sub") and not in_memory(tmp_path.parent)
    assert Spill(budget_bytes=1 << 20, directory=tmp_path).write({"x": torch.zeros(10)}, 40) is None


def test_a_budget_for_some_chunks_keeps_to_it() -> None:
    torch.manual_seed(0)
    model = plain_chain().eval()
    one_chunk = 2 * 8 * 16 * 16 * 4  # the input of the second conv for 2 images
    cache = PrefixCache(model, budget_bytes=one_chunk)
    conv_names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    images = torch.randn(4, 3, 16, 16)
    runs = [cache.runner(model, conv_names[1], key="c") for _ in range(2)]
    first, second = (run(slice(2 * k, 2 * k + 2), images[2 * k : 2 * k + 2]) for k, run in enumerate(runs))
    assert cache.nbytes == one_chunk  # the first chunk fitted, the second did not
    again = cache.runner(model, conv_names[1], key="c")
    assert torch.equal(again(slice(0, 2), images[:2]), first)
    assert torch.equal(again(slice(2, 4), images[2:]), second)


@pytest.mark.parametrize("model", ["bn", "resnet"])
def test_refits_from_new_batches_invalidate_exactly(model: str) -> None:
    """Every refit changes every BatchNorm's statistics: the cache must drop all, and does."""
    uncached = pruned(MODELS[model], "entropy", cache_bytes=0, same_batches=False)
    assert_same(pruned(MODELS[model], "entropy", cache_bytes=1 << 30, same_batches=False), uncached)


def test_stale_entries_would_change_the_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keeping entries past a changed BatchNorm changes the scores: the equalities above test the
    invalidation."""
    uncached = pruned(bn_chain, "entropy", cache_bytes=0, same_batches=False)
    monkeypatch.setattr(PrefixCache, "_drop_past", lambda self, first_changed: None)
    stale = pruned(bn_chain, "entropy", cache_bytes=1 << 30, same_batches=False)
    assert any(not torch.equal(a.scores, b.scores) for a, b in zip(stale[0], uncached[0]))


def test_a_refit_from_the_same_batches_keeps_an_unchanged_prefix() -> None:
    torch.manual_seed(0)
    model = bn_chain().eval()
    refit = refit_for(model)
    refit()
    cache = prefix_cache(model)
    assert cache is not None
    second = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][1]
    cache.runner(model, second, key=0)(slice(1, 3), torch.randn(2, 3, 16, 16))
    kept = cache.nbytes
    assert kept > 0
    with cache.tracking():
        refit()  # the same batches: the BatchNorm before the cut comes out bitwise equal
    assert cache.nbytes == kept
    with cache.tracking():
        model.features[1].running_mean[0] += 1e-7  # the BatchNorm before the cut
    assert cache.nbytes == 0


def test_spilled_entries_that_a_change_invalidates_delete_their_files(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = bn_chain().eval()
    cache = PrefixCache(model, budget_bytes=0, spill=Spill(directory=tmp_path))
    second = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][1]
    images = torch.randn(2, 3, 16, 16)
    units = cache.runner(model, second, key=0)(slice(1, 3), images)
    assert cache.nbytes == 0 and cache.spill.nbytes > 0 and len(list(tmp_path.rglob("*.pt"))) == 1
    assert torch.equal(cache.runner(model, second, key=0)(slice(1, 3), images), units)  # read back
    with cache.tracking():
        model.features[1].running_mean[0] += 1e-7  # the BatchNorm before the cut
    assert cache.spill.nbytes == 0 and list(tmp_path.rglob("*.pt")) == []
    cache.close()
    assert list(tmp_path.iterdir()) == []


def test_entries_no_chunk_asked_for_since_the_last_change_are_dropped() -> None:
    torch.manual_seed(0)
    model = plain_chain().eval()
    cache = PrefixCache(model)
    second = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][1]
    images = torch.randn(2, 3, 16, 16)
    cache.runner(model, second, key=0)(slice(1, 3), images)
    with cache.tracking():
        pass  # nothing changes; the chunk was asked for in this round: kept
    kept = cache.nbytes
    assert kept > 0
    cache.runner(model, second, key=0)(slice(1, 2), images[:1])  # another chunking of the class
    with cache.tracking():
        pass
    assert 0 < cache.nbytes < kept  # the entry of the old chunking went; the new one stayed
    with cache.tracking():
        pass  # nothing asked for in this round
    assert cache.nbytes == 0


def test_live_values_inside_a_residual_block_include_the_shortcut() -> None:
    model = resnet().eval()
    nodes = [n for n in traced_graph(model).nodes if n.op != "output"]
    at = next(i for i, n in enumerate(nodes) if n.op == "call_module" and n.target.endswith("conv2"))
    assert len(live(nodes, at)) == 2  # the branch's value and the block input (the shortcut)


def test_no_cache_where_fx_cannot_trace() -> None:
    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) if x.sum() > 0 else -self.conv(x)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fx's failure is announced once per model class
        assert prefix_cache(Untraceable()) is None


@pytest.mark.parametrize("model", MODELS)
def test_the_top1_diagnostic_runs_from_the_cut(model: str) -> None:
    torch.manual_seed(0)
    net = MODELS[model]().eval()
    convs = [name for name, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    first = next(m for m in net.modules() if isinstance(m, nn.Conv2d))
    images = [0]
    first.register_forward_hook(lambda _m, args, _o: images.__setitem__(0, images[0] + len(args[0])))
    uncached = scoring_top1(net, SOURCE, convs[1:2])
    assert images[0] == 21  # 7 images of each of 3 classes
    cache = prefix_cache(net)
    cached = replace(SOURCE, prefix=cache)
    assert scoring_top1(net, cached, convs[1:2]) == uncached
    assert images[0] == 21 + 21
    assert scoring_top1(net, cached, convs[1:2]) == uncached
    assert images[0] == 21 + 21 + 1  # only the image that sizes the batches passes the first conv again
    x = torch.randn(4, 3, 16, 16)
    run = cache.output_runner(net, "logits", convs[1:2])
    with torch.no_grad():
        assert torch.equal(run(slice(0, 4), x), net(x))  # from the images, storing the cut
        assert torch.equal(run(slice(0, 4), x), net(x))  # from the cut
    cache.close()


class _ShiftedAfterReturn(nn.Module):
    """Its output node is followed by an in-place op that changes the returned tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.fc(self.conv(x).mean((2, 3)))
        logits.sub_(1.0)
        return logits


def test_no_output_runner_where_an_op_follows_the_returned_node() -> None:
    net = _ShiftedAfterReturn().eval()
    cache = prefix_cache(net)
    assert cache is not None and cache.output_runner(net, "logits", ["conv"]) is None
    assert cache.output_runner(plain := plain_chain().eval(), "logits", []) is None  # another model
    assert prefix_cache(plain).output_runner(plain, "logits", []) is not None
