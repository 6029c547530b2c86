"""A failure on one torchrun rank is raised on every rank as the same exception
(prune.core.distributed.main_only / every_rank), tested with a fake World of 3 ranks."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from prune.core.distributed import SINGLE, World, every_rank, main_only
from prune.errors import UsageError


@dataclass(frozen=True)
class FakeWorld(World):
    """Rank `rank` of `size`; the other ranks' contributions to a collective are `others` (by rank)."""

    others: dict = field(default_factory=dict)

    def gather(self, obj):
        return [obj if r == self.rank else self.others[r] for r in range(self.size)]

    def broadcast(self, obj, src: int = 0):
        return obj if self.rank == src else self.others[src]


class Unpicklable(Exception):
    def __init__(self, message: str, *, detail: object) -> None:  # keyword-only: pickling cannot rebuild it
        super().__init__(message)
        self.detail = detail


def test_rank_zeros_usage_error_is_a_usage_error_on_every_rank() -> None:
    def fail() -> int:
        raise UsageError("--out is taken; pass --overwrite")

    with pytest.raises(UsageError, match="pass --overwrite") as own:
        main_only(fail, FakeWorld(rank=0, size=3))
    assert own.value.__traceback__ is not None  # rank 0 raises its own exception
    for rank in (1, 2):
        with pytest.raises(UsageError, match="pass --overwrite"):
            main_only(lambda: pytest.fail("only rank 0 runs it"), FakeWorld(rank=rank, size=3, others={0: own.value}))


def test_main_only_returns_the_result_on_rank_zero_and_none_elsewhere() -> None:
    assert main_only(lambda: 7, SINGLE) == 7
    assert main_only(lambda: 7, FakeWorld(rank=1, size=2, others={0: None})) is None


def test_every_rank_raises_the_first_failing_ranks_exception_everywhere() -> None:
    lost = (None, KeyError("class 3"))
    usage = (None, UsageError("scorer 'nisp' needs 2 images"))
    ok = ([(0, "state")], None)
    with pytest.raises(KeyError, match="class 3"):  # rank 0 succeeded; rank 1 failed first
        every_rank(lambda: [(0, "state")], FakeWorld(rank=0, size=3, others={1: lost, 2: usage}))

    def refuse() -> list:
        raise UsageError("scorer 'nisp' needs 2 images")

    with pytest.raises(UsageError, match="needs 2 images"):  # this rank (1) failed: it raises its own
        every_rank(refuse, FakeWorld(rank=1, size=2, others={0: ok}))
    assert every_rank(lambda: [(1, "b")], FakeWorld(rank=1, size=2, others={0: ok})) == [[(0, "state")], [(1, "b")]]


def test_an_exception_that_cannot_travel_arrives_as_a_runtime_error_with_its_type() -> None:
    def fail() -> None:
        raise Unpicklable("bad state", detail=object())

    sent: list = []

    class Recording(FakeWorld):
        def broadcast(self, obj, src: int = 0):
            sent.append(obj)
            return obj

    with pytest.raises(Unpicklable):  # rank 0 keeps its own
        main_only(fail, Recording(rank=0, size=2))
    assert type(sent[0]) is RuntimeError and str(sent[0]) == "Unpicklable: bad state"
