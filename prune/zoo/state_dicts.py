"""The state_dict inside a checkpoint file as training scripts write it, for `--weights PATH`.

Besides a bare state_dict, `--weights` takes the checkpoints of the usual training scripts: a dict
holding the state_dict under `state_dict_ema`, `model_ema`, `state_dict`, `model` or
`model_state_dict` (the first present and not empty, EMA weights first as timm's `load_checkpoint`
does; torchvision's reference scripts write `model` / `model_ema` and an `args` Namespace, timm's
`state_dict` / `state_dict_ema`, Lightning `state_dict`, PyTorch's tutorials `model_state_dict`),
with the first name every key shares removed where that makes keys fit the model (a wrapper's:
`module.` of DataParallel and DistributedDataParallel, `model.` of a Lightning module,
`_orig_mod.` of torch.compile). Files are read with `weights_only=True`.
"""

from __future__ import annotations

import argparse
from collections.abc import Collection
from pathlib import Path

import torch

CHECKPOINT_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "model_state_dict")
"""Where training scripts keep the weights in a checkpoint dict, in the order they are looked for."""
SAFE_GLOBALS = [argparse.Namespace]
"""Objects besides tensors and containers a checkpoint may hold and `weights_only` may rebuild
(torchvision's reference scripts save their command line as an argparse Namespace)."""
AVERAGING_COUNTERS = ("n_averaged",)
"""Top-level keys of weight-averaging wrappers (torch.optim.swa_utils.AveragedModel) that are not weights."""
MAX_PREFIXES = 3
"""The most wrapper prefixes removed from the keys (e.g. `module.model.`)."""


def read_weights_file(path: Path) -> object:
    """`torch.load(path)` with weights_only=True (and `SAFE_GLOBALS`), on the CPU."""
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        return torch.load(path, map_location="cpu", weights_only=True)


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def state_dict_in(blob: object) -> object:
    """The state_dict of checkpoint `blob`: `blob` itself when it is one (str → tensor), else its
    entry under the first of CHECKPOINT_KEYS that holds a non-empty dict; else `blob` unchanged."""
    if not isinstance(blob, dict) or _is_state_dict(blob):
        return blob
    return next((blob[k] for k in CHECKPOINT_KEYS if isinstance(blob.get(k), dict) and blob[k]), blob)


def without_wrapper_prefix(state: dict, expected: Collection[str]) -> dict:
    """`state` with the first name every key shares removed (up to MAX_PREFIXES times) while none
    of its keys is one of the model's `expected` keys, kept only where some key then fits; else
    unchanged. The step counter of torch's `AveragedModel` (`n_averaged`: torchvision's `model_ema`)
    goes where the model has no such key."""
    state = {k: v for k, v in state.items() if k not in AVERAGING_COUNTERS or k in expected}
    stripped = state
    for _ in range(MAX_PREFIXES):
        if not stripped or any(k in expected for k in stripped):
            break
        firsts = {k.split(".", 1)[0] for k in stripped}
        if len(firsts) != 1 or any("." not in k for k in stripped):
            break
        cut = len(firsts.pop()) + 1
        stripped = {k[cut:]: v for k, v in stripped.items()}
    return stripped if any(k in expected for k in stripped) else state
