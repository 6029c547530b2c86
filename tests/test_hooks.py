"""scoring.hooks: hooks live exactly as long as their block; a hook can end a forward early."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scoring.hooks import forward_hooks


def test_hooks_see_every_module_and_can_replace_outputs() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    seen: list[nn.Module] = []
    with forward_hooks([model[0], model[2]], lambda m, _i, _o: seen.append(m)):
        model(torch.ones(1, 2))
    assert seen == [model[0], model[2]]
    with forward_hooks([model[2]], lambda _m, _i, out: torch.full_like(out, 7.0)):
        assert model(torch.ones(1, 2)).item() == 7.0
    assert model(torch.ones(1, 2)).item() != 7.0  # removed on exit


def test_hooks_are_removed_when_the_block_raises() -> None:
    model = nn.Linear(2, 2)

    def boom(*_args) -> None:
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"), forward_hooks([model], boom):
        model(torch.ones(1, 2))
    assert not model._forward_hooks
    model(torch.ones(1, 2))  # no hook left to raise


def test_a_failed_registration_removes_the_hooks_already_added() -> None:
    first = nn.Linear(2, 2)
    with pytest.raises(AttributeError), forward_hooks([first, object()], lambda *_: None):  # type: ignore[list-item]
        pass
    assert not first._forward_hooks


def test_capture_stops_the_forward_at_the_module() -> None:
    from scoring.hooks import capture, run_until_stopped

    ran: list[str] = []
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with forward_hooks([net[2]], lambda _m, _i, _o: ran.append("last")):
        with capture(net[1]) as outputs, capture(net[2], inputs=True) as inputs:
            run_until_stopped(net, torch.ones(5, 4))
    assert len(outputs) == 1 and outputs[0].shape == (5, 3) and inputs == [] and ran == []  # stopped at ReLU
    with capture(net[2], inputs=True) as inputs:
        run_until_stopped(net, torch.ones(5, 4))
    assert torch.equal(inputs[0], torch.relu(net[0](torch.ones(5, 4)))) and ran == []
    assert not net[1]._forward_hooks and not net[2]._forward_pre_hooks  # removed on exit
    assert net(torch.ones(1, 4)).shape == (1, 2)  # and a plain forward runs to the end
