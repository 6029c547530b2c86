"""The time-bounded img/s measurement (prune.pipeline.speed): warm-up, windows to a budget, median
and spread, with counts derived by hand from a step of known duration."""

from __future__ import annotations

import json

import pytest
from torch import nn

from prune.core.throughput import Throughput
from prune.pipeline import speed


class Clock:
    """A stand-in for `time` in `prune.pipeline.speed`: `perf_counter` reads a clock that only
    `step` advances (by `seconds`, binary fractions so that sums are exact): timing without sleeps."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def step(self, seconds: float, calls: list[int]):
        def run() -> None:
            calls.append(1)
            self.now += seconds
        return run


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(speed, "time", fake)
    return fake


def test_a_slow_step_is_timed_to_the_budget_one_batch_per_window(clock: Clock):
    calls: list[int] = []
    t = speed.timed_throughput(clock.step(1 / 16, calls), batch_size=32, seconds=0.25)
    # warm-up stops once a third of the budget (0.083 s) has passed: after the 2nd call of 0.0625 s
    assert t.warmup == 2
    # a call is longer than a window's 20 ms, so one call per window; windows until 0.25 s have passed: 4
    assert t.iters == t.windows == 4
    assert len(calls) == t.warmup + t.iters
    assert t.img_per_s == t.spread[0] == t.spread[1] == 32 * 16 and t.seconds == 0.25


def test_a_zero_budget_times_the_minimum_of_windows(clock: Clock):
    calls: list[int] = []
    t = speed.timed_throughput(clock.step(1 / 32, calls), batch_size=4, seconds=0.0)
    assert t.warmup == 1 and t.windows == speed.MIN_WINDOWS


def test_the_warm_up_ends_when_a_third_of_the_budget_has_passed(clock: Clock):
    calls: list[int] = []
    t = speed.timed_throughput(clock.step(1 / 16, calls), batch_size=2, seconds=3 / 16)
    assert t.warmup == 1  # one call of 1/16 s is exactly a third of 3/16 s


def test_a_short_step_fills_each_window_to_its_length(clock: Clock):
    calls: list[int] = []
    t = speed.timed_throughput(clock.step(1 / 128, calls), batch_size=4, seconds=0.0)
    # ⌈20 ms / 7.8 ms⌉ = 3 calls per window, the minimum of 3 windows; each window 3/128 s for 3 batches of 4
    assert t.warmup == 1 and t.windows == speed.MIN_WINDOWS and t.iters == 3 * speed.MIN_WINDOWS
    assert t.img_per_s == t.spread[0] == t.spread[1] == 4 * 128


def test_windows_vary_and_the_median_is_reported(clock: Clock):
    durations = iter([1 / 4] + [1 / 16, 1 / 4, 1 / 8, 1 / 16, 1 / 32])  # one warm-up call (past a third of 0.5 s), then one per window
    calls: list[int] = []

    def step() -> None:
        calls.append(1)
        clock.now += next(durations)

    t = speed.timed_throughput(step, batch_size=8, seconds=0.5)
    # windows of 1/16, 1/4, 1/8 s: 0.4375 s < 0.5, so a 4th (1/16) ends at 0.5 s
    assert t.warmup == 1 and t.windows == 4
    assert t.spread == (8 * 4, 8 * 16) and t.img_per_s == (8 * 8 + 8 * 16) / 2


def test_a_fast_step_fills_windows_and_stops_at_the_most_windows():
    calls: list[int] = []
    t = speed.timed_throughput(lambda: calls.append(1), batch_size=1, seconds=60.0)
    assert t.warmup == speed.MAX_WARMUP and t.windows == speed.MAX_WINDOWS  # never near the 60 s budget
    assert t.iters % t.windows == 0 and t.iters // t.windows > 1  # a call of ~0.1 µs: many calls per window
    assert t.iters // t.windows <= speed.MAX_PER_WINDOW
    assert len(calls) == t.warmup + t.iters


def test_median_of_the_windows_on_a_model():
    net = nn.Conv2d(3, 4, 3)
    t = speed.measure_throughput(net, input_size=8, batch_size=2, seconds=0.05)
    assert speed.MIN_WINDOWS <= t.windows <= speed.MAX_WINDOWS
    assert t.spread[0] <= t.img_per_s <= t.spread[1]


def test_a_record_read_back_from_json_equals_the_original():
    t = Throughput(img_per_s=3.0, device="cpu", batch_size=2, dtype="float32", threads=1, warmup=1, iters=6,
                   channels_last=False, windows=3, spread=(2.0, 4.0), seconds=1.0)
    assert Throughput(**json.loads(json.dumps(t.as_dict()))) == t
