"""Model cost as an analysis object, counted by fvcore (conv + linear layers only).

fvcore's "flop" is one multiply-add, i.e. a MAC; FLOPs here are 2 × MACs.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from scoring.model_state import eval_mode, model_device, model_dtype

with warnings.catch_warnings():  # fvcore scripts a loss of its own with torch.jit.script, which torch deprecates
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    from fvcore.nn import FlopCountAnalysis

_COUNTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
"""The layers counted: every convolution (transposed ones too) and every linear layer."""


@dataclass(frozen=True)
class ModelCost:
    """params: all parameters; macs/flops: conv + linear at one input of `input_size`²."""

    params: int
    macs: int
    input_size: int
    by_module: dict[str, int] = field(default_factory=dict, repr=False)

    @property
    def flops(self) -> int:
        return 2 * self.macs

    def as_dict(self) -> dict[str, int]:
        return {"params": self.params, "macs": self.macs, "flops": self.flops}


@contextmanager
def _quiet_fvcore() -> Iterator[None]:
    """fvcore's logger at ERROR inside the block, its own level restored after."""
    logger = logging.getLogger("fvcore")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def count_cost(model: nn.Module, *, input_size: int) -> ModelCost:
    """Count `model` for one [1, 3, input_size, input_size] image on its own device, in its dtype."""
    device = model_device(model)
    x = torch.zeros(1, 3, input_size, input_size, device=device, dtype=model_dtype(model))
    with eval_mode(model), _quiet_fvcore():
        analysis = FlopCountAnalysis(model, x)
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        per_module = analysis.by_module()
    by_module = {
        name: int(per_module.get(name, 0)) for name, m in model.named_modules() if isinstance(m, _COUNTED)
    }
    params = sum(p.numel() for p in model.parameters())
    return ModelCost(params=params, macs=sum(by_module.values()), input_size=input_size, by_module=by_module)
