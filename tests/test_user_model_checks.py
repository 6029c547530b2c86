"""What a user's own model or settings meet before any work (found by probing as a new user):
batches of one image where BatchNorm sees 1x1 maps, a --round-to that prunes nothing, a fine-tuning
that diverges, frozen parameters, half-precision and torch.compile'd models, SIGTERM."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from helpers import image_folder, quick_run
from test_input_checks import SMALL, cli_error
from torch import nn

import prune
import scoring
from prune.errors import UsageError
from prune.pipeline.contract import check_batch_of_one
from prune.zoo import registry

pytestmark = pytest.mark.usefixtures("one_thread")


def net(*, pooled_norm: bool = False) -> nn.Module:
    """conv-BN-ReLU, conv-ReLU, pool, (a BatchNorm on the 1x1 pooled map), linear."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), *([nn.BatchNorm2d(8)] if pooled_norm else []),
                         nn.Flatten(), nn.Linear(8, 3))


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> list[str]:
    return quick_run(tmp_path_factory.mktemp("quick"))


def test_batches_of_one_image_with_a_batchnorm_on_1x1_maps_are_refused_and_nothing_changes() -> None:
    model, example = net(pooled_norm=True).eval(), torch.randn(1, 3, 8, 8)
    state = {k: t.clone() for k, t in model.state_dict().items()}
    with pytest.raises(UsageError, match="--batch-size 1 cannot re-estimate .* pass --batch-size 2 or more"):
        check_batch_of_one(model, example, "mine", batch_size=1)
    assert all(torch.equal(t, model.state_dict()[k]) for k, t in state.items()) and not model.training
    check_batch_of_one(model, example, "mine", batch_size=2)
    check_batch_of_one(net().eval(), example, "mine", batch_size=1)  # 8x8 maps: one image gives 64 values


def test_a_round_to_that_leaves_every_layer_whole_is_refused(tmp_path, capsys, quick) -> None:
    line = cli_error(capsys, *quick, *SMALL, "--round-to", "4096", "--out", str(tmp_path / "o"))
    assert "--round-to 4096 leaves every layer" in line and "at --ratio 0.5" in line and "a larger --ratio" in line
    assert not (tmp_path / "o").exists()


def test_a_diverging_fine_tuning_is_refused_naming_the_learning_rate(tmp_path, capsys, quick) -> None:
    line = cli_error(capsys, *quick, "--classes", "2", "--samples-per-class", "2", "--quiet", "--epochs", "2",
                     "--lr", "1e30", "--out", str(tmp_path / "o"))
    assert "diverged" in line and "epoch 2" in line and "lower --lr (now 1e+30)" in line
    assert not (tmp_path / "o").exists()


class WithCounter(nn.Module):
    """`net()` holding an integer Parameter (no gradient can flow to it)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = net()
        self.steps = nn.Parameter(torch.zeros((), dtype=torch.long), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_frozen_parameters_are_traced_and_stay_frozen_through_surgery() -> None:
    example = torch.zeros(1, 3, 16, 16)
    torch.manual_seed(0)
    free, frozen = net(), net()
    frozen.load_state_dict(free.state_dict())
    for p in [*frozen[0].parameters(), *frozen[1].parameters()]:
        p.requires_grad_(False)
    names = [g.names for g in prune.Surgeon(free, example).groups]
    surgeon = prune.Surgeon(frozen, example)
    assert names and [g.names for g in surgeon.groups] == names
    flags = [p.requires_grad for p in frozen.parameters()]
    assert flags == [False] * 4 + [True] * 4
    surgeon.prune(surgeon.groups[0], [0, 1, 2])  # the frozen conv and its BatchNorm get new Parameters
    assert frozen[0].out_channels == 5 and [p.requires_grad for p in frozen.parameters()] == flags
    assert [g.names for g in prune.Surgeon(WithCounter(), example).groups] == [("body." + n[0],) for n in names]


@pytest.mark.parametrize("convert", ["half", "bfloat16", "double"])
def test_other_dtypes_prune_by_weights_and_are_refused_scoring_images(convert: str) -> None:
    from test_prefix_cache import SOURCE

    torch.manual_seed(0)
    example = torch.zeros(1, 3, 16, 16, dtype=getattr(torch, "float64" if convert == "double" else convert))
    model = getattr(net(), convert)()
    prune.select_and_prune(prune.Surgeon(model, example), scoring.create("l1"), None, ratio=0.5, quiet=True)
    assert model[0].out_channels == 4 and model[0].weight.dtype == example.dtype
    with pytest.raises(UsageError, match=r"score and prune model\.float\(\)"):
        prune.select_and_prune(prune.Surgeon(getattr(net(), convert)(), example), scoring.create("apoz"), SOURCE,
                               ratio=0.5, quiet=True)


@pytest.mark.parametrize("convert", ["half", "double"])
def test_the_main_job_refuses_other_dtypes_naming_the_conversion_not_the_input_size(tmp_path, capsys,
                                                                                    scratch_registry, convert):
    registry.register_model("low-net", input_size=8, num_classes=3)(lambda n: getattr(net(), convert)())
    data = image_folder(tmp_path / "data", classes=3, train=2, val=2, size=8)
    line = cli_error(capsys, "--model", "low-net", "--data", str(data), *SMALL, "--out", str(tmp_path / "o"))
    assert "score and prune model.float()" in line and "--input-size" not in line
    assert not (tmp_path / "o").exists()


def test_a_compiled_model_is_refused_naming_the_module_it_wraps() -> None:
    with pytest.raises(UsageError, match=r"model\._orig_mod"):
        prune.Surgeon(torch.compile(net()), torch.zeros(1, 3, 16, 16))


def test_cost_and_speed_take_the_models_dtype() -> None:
    torch.manual_seed(0)
    model = net()
    low = net().bfloat16()
    assert prune.count_cost(low, input_size=16).flops == prune.count_cost(model, input_size=16).flops
    assert prune.measure_throughput(low, input_size=16, batch_size=2, seconds=0.2).dtype == "bfloat16"


def test_sigterm_ends_in_one_line_and_exit_143() -> None:
    code = ("import os, signal, sys; from prune.errors import exit_code; "
            "sys.exit(exit_code(lambda: os.kill(os.getpid(), signal.SIGTERM)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 143, done.stderr
    assert done.stderr.strip().splitlines() == ["error: terminated; run the same command again to continue where it "
                                                "stopped"]
