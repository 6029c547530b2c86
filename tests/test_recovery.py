"""Recovery after pruning: distillation, the cosine schedule, iterative steps, aligned widths and
training from scratch (`--distill`, `--lr-schedule`, `--iterative-steps`, `--round-to`, `--reinit`)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import quick_run
from torch.utils.data import TensorDataset

from finetune.distillation import Distillation, distillation_loss
from finetune.train import FinetuneConfig, finetune
from prune.cli import main
from prune.pipeline.iterative import merged, step_counts
from prune.pipeline.scratch import reinitialise
from prune.pipeline.selection import LayerDecision
from prune.pipeline.surgery import aligned_removal, channels_to_remove
from prune.zoo.models import create_model

SMALL = ["--classes", "2", "--samples-per-class", "2", "--quiet"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> list[str]:
    return [*quick_run(tmp_path_factory.mktemp("recovery")), *SMALL]


def report_of(args: list[str], out: Path) -> dict:
    assert main([*args, "--out", str(out)]) == 0
    return json.loads((out / "report.json").read_text())


# --- distillation


def _softmax(z: list[float], t: float) -> list[float]:
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


def test_distillation_loss_equals_the_hand_computation() -> None:
    student, teacher, label, alpha, t = [1.0, 2.0, 0.0], [0.5, 0.5, 3.0], 1, 0.3, 2.0
    ce = -math.log(_softmax(student, 1.0)[label])
    p_t, p_s = _softmax(teacher, t), _softmax(student, t)
    kl = sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s))
    expected = (1 - alpha) * ce + alpha * t * t * kl
    got = distillation_loss(torch.tensor([student]), torch.tensor([teacher]), torch.tensor([label]),
                            alpha=alpha, temperature=t)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # alpha 0 is plain cross-entropy; a student equal to its teacher adds nothing to it
    assert distillation_loss(torch.tensor([student]), torch.tensor([teacher]), torch.tensor([label]), alpha=0.0
                             ).item() == pytest.approx(ce, rel=1e-6)
    same = distillation_loss(torch.tensor([student]), torch.tensor([student]), torch.tensor([label]), alpha=0.5)
    assert same.item() == pytest.approx(0.5 * ce, rel=1e-6)


def test_the_teacher_is_untouched_by_fine_tuning() -> None:
    torch.manual_seed(0)
    student = create_model("embedded", pretrained=False)
    teacher = create_model("embedded")
    before = copy.deepcopy(teacher.state_dict())
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    loader = torch.utils.data.DataLoader(TensorDataset(x, y), batch_size=8)
    losses = finetune(student, loader, config=FinetuneConfig(epochs=2, lr=0.01), quiet=True,
                      loss_fn=Distillation(teacher))
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# --- schedules


def test_cosine_schedule_warms_up_then_decays_to_zero() -> None:
    lr = FinetuneConfig(epochs=2, lr=0.1, schedule="cosine", warmup=0.25).lr_at(4)  # 8 steps, 2 of warm-up
    assert [lr(0, 0), lr(0, 1)] == pytest.approx([0.05, 0.1])
    assert lr(0, 2) == pytest.approx(0.1)
    assert lr(1, 3) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 5 / 6)))
    step = FinetuneConfig(epochs=3, lr=1e-3).lr_at(4)  # the paper's: ÷10 per epoch, whatever the batch
    assert [step(e, b) for e in range(3) for b in (0, 3)] == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5])


def test_finetune_with_the_cosine_schedule_sets_each_steps_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[float] = []

    class Recording(torch.optim.SGD):
        def step(self, closure=None):  # type: ignore[override]
            seen.append(self.param_groups[0]["lr"])
            return super().step(closure)

    model = torch.nn.Linear(4, 2)
    loader = torch.utils.data.DataLoader(TensorDataset(torch.randn(12, 4), torch.randint(0, 2, (12,))), batch_size=4)
    config = FinetuneConfig(epochs=2, lr=0.2, schedule="cosine", warmup=0.2)
    monkeypatch.setattr(torch.optim, "SGD", Recording)  # finetune builds its optimiser by this name
    finetune(model, loader, config=config, quiet=True)
    expected = config.lr_at(3)
    assert seen == pytest.approx([expected(e, b) for e in range(2) for b in range(3)])


# --- aligned widths


def test_round_to_keeps_the_nearest_multiple() -> None:
    assert channels_to_remove(64, 0.5, round_to=8) == 32  # already a multiple
    assert channels_to_remove(20, 0.5, round_to=8) == 12  # keep 10 → 8
    assert channels_to_remove(100, 0.3, round_to=16) == 36  # keep 70 → 64
    assert channels_to_remove(48, 0.1, round_to=32) == 16  # keep 43 → 32, at most 48 // 32 · 32
    assert channels_to_remove(6, 0.5, round_to=8) == 0  # narrower than one multiple: kept whole
    assert channels_to_remove(64, 0.0, round_to=8) == 0  # not pruned: left as it is
    assert channels_to_remove(64, 0.9, round_to=16) == 48  # keep 6 → at least 16
    assert channels_to_remove(48, 0.4, blocks=6, round_to=4) == 12  # 6 blocks lose 3 each: keep 30 → lcm(4, 6)·3
    assert aligned_removal(5, 16, round_to=1) == 5


def test_round_to_in_the_main_job_keeps_multiples(tmp_path: Path, quick: list[str]) -> None:
    report = report_of([*quick, "--no-finetune", "--ratio", "0.3", "--round-to", "8"], tmp_path / "r")
    for layer in report["layers"]:
        assert layer["channels_after"] % 8 == 0 and 8 <= layer["channels_after"] <= layer["channels_before"]
    assert [layer["channels_after"] for layer in report["layers"]] == [8, 8, 24, 24, 48, 48]  # 11.2, 22.4, 44.8


def test_a_flops_target_with_round_to_lands_within_3_percent(tmp_path: Path, quick: list[str]) -> None:
    """On ResNet-18's 64–512-channel layers (the embedded model's 16-channel layers can only keep 8
    or 16 channels: no uniform ratio lands within 3% there, and the report says where it landed)."""
    data = quick[: quick.index("--data") + 2]
    report = report_of([*data, *SMALL, "--model", "resnet18", "--input-size", "32", "--scorer", "l1", "--no-finetune",
                        "--target-flops", "0.5", "--round-to", "8", "--no-speed"], tmp_path / "f")
    assert abs(report["budget"]["achieved_flops"] / 0.5 - 1) <= 0.03
    assert all(layer["channels_after"] % 8 == 0 for layer in report["layers"])


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_round_to_respects_the_layer_cap_of_a_target(tmp_path: Path, quick: list[str], allocation: str) -> None:
    """A FLOPs target beyond reach with at most a third of each layer removed: aligned widths stay
    within the cap (the nearest multiple of 8 to 64·2/3 would be 40, past it: 48 is kept)."""
    report = report_of([*quick, "--no-finetune", "--target-flops", "0.1", "--max-layer-ratio", "0.33", "--round-to", "8",
                        "--allocation", allocation, "--no-speed"], tmp_path / "cap")
    for layer in report["layers"]:
        assert layer["channels_before"] - layer["channels_after"] <= 0.33 * layer["channels_before"]
        assert layer["channels_after"] % 8 == 0


# --- iterative pruning


def _decision(before: int, removed: tuple[int, ...], scores: list[float]) -> LayerDecision:
    return LayerDecision(name="c", members=("c",), channels_before=before, channels_after=before - len(removed),
                         removed=removed, map_size=4, scoring_top1=None, scores=torch.tensor(scores))


def test_merged_steps_name_the_original_channels() -> None:
    # 6 channels: step 1 removes 1 and 4; the survivors 0 2 3 5 are renumbered 0..3; step 2 removes
    # positions 0 and 2, i.e. original channels 0 and 3
    steps = [[_decision(6, (1, 4), [1.0] * 6)], [_decision(4, (0, 2), [2.0] * 4)]]
    (one,) = merged(steps)
    assert one.removed == (0, 1, 3, 4) and one.channels_before == 6 and one.channels_after == 2
    assert one.scores.tolist() == [1.0] * 6


@pytest.mark.parametrize(("width", "ratio", "steps"), [(50, 0.05, 3), (10, 0.05, 3), (5, 0.1, 3), (64, 0.7, 7)])
def test_the_last_step_lands_on_the_one_step_count(width: int, ratio: float, steps: int) -> None:
    """ratio · s / S at s = S is not always ratio in floating point (0.05 · 3 / 3): the last step uses ratio itself."""
    from types import SimpleNamespace

    group = SimpleNamespace(num_channels=width, blocks=1)
    removed = 0
    for s in range(1, steps + 1):
        n = step_counts([group], [width], [ratio], s, steps)[0]
        removed += n
        group.num_channels -= n
    assert removed == channels_to_remove(width, ratio)


@pytest.mark.parametrize("extra", [[], ["--round-to", "4"]])
def test_iterative_steps_end_with_the_one_step_counts(tmp_path: Path, quick: list[str], extra: list[str]) -> None:
    args = [*quick, "--no-finetune", "--ratio", "0.6", *extra]
    one = report_of(args, tmp_path / "one")
    five = report_of([*args, "--iterative-steps", "5"], tmp_path / "five")
    assert [x["channels_after"] for x in five["layers"]] == [x["channels_after"] for x in one["layers"]]
    assert [sum(s["channels"]) for s in five["steps"]] == sorted((sum(s["channels"]) for s in five["steps"]),
                                                                reverse=True)
    assert len(five["steps"]) == 5 and one["steps"] == []
    assert all(len(x["removed"]) == x["channels_before"] - x["channels_after"] for x in five["layers"])


def test_a_run_interrupted_in_step_2_of_5_resumes_to_the_same_report(tmp_path: Path, quick: list[str],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import prune.pipeline.run as run_module

    args = [*quick, "--iterative-steps", "5", "--step-epochs", "1", "--epochs", "1", "--distill",
            "--lr-schedule", "cosine", "--no-speed"]
    reference = report_of(args, tmp_path / "reference")
    original = run_module._finetune

    def interrupted(*a, **kw):
        if kw.get("name") == "finetune-step2":
            raise KeyboardInterrupt
        return original(*a, **kw)

    monkeypatch.setattr(run_module, "_finetune", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_module.run(run_module.PruneConfig(**_config_of(reference)), out=out, quiet=True, speed=False)
    assert (out / "cache" / "finetune-step1.pt").exists() and not (out / "report.json").exists()
    monkeypatch.setattr(run_module, "_finetune", original)
    resumed = report_of(args, out)
    for key in ("layers", "after", "finetune_losses", "steps", "pruned_before_finetune"):
        assert resumed[key] == reference[key], key


def _config_of(report: dict) -> dict:
    settings = dict(report["settings"])
    settings["scorer_options"] = tuple(settings["scorer_options"].items())
    return settings


# --- scratch


def test_reinitialise_keeps_shapes_and_changes_every_weight() -> None:
    for name in ("embedded", "fashion-resnet"):
        model = create_model(name, pretrained=name == "embedded")
        if name != "embedded":  # untrained: make every tensor differ from the initialisation first
            for p in model.parameters():
                torch.nn.init.normal_(p)
        before = copy.deepcopy(model.state_dict())
        after = reinitialise(model, seed=3).state_dict()
        for key, value in before.items():
            assert after[key].shape == value.shape, key
            if value.is_floating_point() and value.numel() > 0 and "running" not in key:
                assert not torch.equal(after[key], value), key


def test_reinit_trains_the_pruned_architecture_from_fresh_weights(tmp_path: Path, quick: list[str]) -> None:
    report = report_of([*quick, "--reinit", "--no-speed"], tmp_path / "s")
    pruned = report_of([*quick, "--epochs", "2", "--no-speed"], tmp_path / "p")
    assert report["layers"] == pruned["layers"]  # the same architecture
    assert report["after"]["params"] == pruned["after"]["params"]
    assert len(report["finetune_losses"]) == 15  # the embedded model's own recipe: 15 epochs
    assert "fresh weights" in (tmp_path / "s" / "report.md").read_text()


# --- bad input


@pytest.mark.parametrize(("flags", "words"), [
    (["--distill", "--no-finetune"], ["--distill", "--no-finetune"]),
    (["--lr-schedule", "cosine", "--no-finetune"], ["--lr-schedule"]),
    (["--reinit", "--no-finetune"], ["--reinit"]),
    (["--distill-alpha", "1.5"], ["--distill-alpha", "[0, 1]"]),
    (["--distill-alpha", "nan"], ["--distill-alpha"]),
    (["--distill-temperature", "0"], ["--distill-temperature", "> 0"]),
    (["--distill-temperature", "inf"], ["--distill-temperature"]),
    (["--iterative-steps", "0"], ["--iterative-steps", "at least 1"]),
    (["--iterative-steps", "2.5"], ["--iterative-steps"]),
    (["--step-epochs", "-1"], ["--step-epochs"]),
    (["--round-to", "0"], ["--round-to", "at least 1"]),
    (["--round-to", "8.5"], ["--round-to"]),
    (["--lr-schedule", "linear"], ["--lr-schedule"]),
    (["--model", "resnet18", "--reinit"], ["--reinit", "--epochs"]),
    (["--reinit", "--epochs", "2"], ["--reinit", "recipe", "drop --epochs"]),
    (["--reinit", "--distill"], ["--reinit", "--distill"]),
    (["--reinit", "--iterative-steps", "3"], ["--reinit", "--iterative-steps"]),
    (["--model", "resnet18", "--reinit", "--no-finetune"], ["--reinit", "--no-finetune"]),
    (["--distill-alpha", "0.3"], ["--distill-alpha", "only with --distill"]),
    (["--distill-temperature", "9"], ["--distill-temperature", "only with --distill"]),
    (["--step-epochs", "3"], ["--step-epochs", "only with --iterative-steps"]),
    (["--iterative-steps", "3", "--step-epochs", "2", "--no-finetune"], ["--step-epochs", "--no-finetune"]),
    (["--distill", "--epochs", "0"], ["--distill", "--epochs 0"]),
])
def test_bad_recovery_input_is_one_line(tmp_path: Path, quick: list[str], capsys: pytest.CaptureFixture[str],
                                        flags: list[str], words: list[str]) -> None:
    out = tmp_path / "out"
    code = main([*quick, *flags, "--out", str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert all(word in lines[0] for word in words), lines[0]
    assert not out.exists()
