"""Measuring a model leaves it as it was: device, memory format, train/eval flags, fvcore's logger."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from prune.pipeline.counting import count_cost
from prune.pipeline.speed import measure_throughput
from scoring.model_state import eval_mode


def _mixed() -> nn.Sequential:
    """A small CNN in train mode with one module in eval mode."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 2)).train()
    net[1].eval()
    return net


def _flags(net: nn.Module) -> list[bool]:
    return [m.training for m in net.modules()]


def test_eval_mode_restores_every_flag_also_after_an_error():
    net = _mixed()
    before = _flags(net)
    with pytest.raises(RuntimeError), eval_mode(net):
        assert not any(_flags(net))
        raise RuntimeError("inside")
    assert _flags(net) == before


@pytest.mark.parametrize("channels_last", [False, True])
def test_throughput_leaves_the_callers_model_as_it_was(channels_last):
    net = _mixed()
    flags, weight = _flags(net), net[0].weight
    t = measure_throughput(net, input_size=8, batch_size=2, channels_last=channels_last, seconds=0.0)
    assert t.img_per_s > 0 and t.channels_last == channels_last
    assert _flags(net) == flags and net[0].weight is weight and weight.is_contiguous()


def test_counting_restores_modes_and_fvcore_logger_level():
    net = _mixed()
    flags = _flags(net)
    logger = logging.getLogger("fvcore")
    logger.setLevel(logging.DEBUG)
    cost = count_cost(net, input_size=8)
    assert cost.macs == 4 * 3 * 9 * 36 + 4 * 2  # conv 3x3 on 6x6 outputs + linear, by hand
    assert _flags(net) == flags and logger.level == logging.DEBUG


def test_model_device_is_where_the_parameters_are():
    from scoring.model_state import model_device

    assert model_device(_mixed()) == torch.device("cpu")
    assert model_device(nn.ReLU()) == torch.device("cpu")  # no parameters: CPU
