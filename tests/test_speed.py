"""The time-bounded img/s measurement (prune.pipeline.speed): warm-up, windows to a budget, median
and spread, with counts derived by hand from a step of known duration."""

from __future__ import annotations

import json
import time

from torch import nn

from prune.core.throughput import Throughput
from prune.pipeline import speed


def sleeper(seconds: float, calls: list[int]):
    def step() -> None:
        calls.append(1)
        time.sleep(seconds)
    return step


def test_a_slow_step_is_timed_to_the_budget_one_batch_per_window():
    calls: list[int] = []
    t = speed.timed_throughput(sleeper(0.05, calls), batch_size=32, seconds=0.2)
    # warm-up stops once a third of the budget (0.067 s) has passed: after the 2nd call of 0.05 s
    # (after the 1st where a sleep overran by 17 ms on a busy machine)
    assert t.warmup in (1, 2)
    # a call is longer than a window's 20 ms, so one call per window; windows until 0.2 s: 4 (5 if a sleep overran)
    assert t.iters == t.windows and t.windows in (4, 5)
    assert len(calls) == t.warmup + t.iters
    low, high = t.spread
    assert low <= t.img_per_s <= high <= 32 / 0.05  # a sleep never ends early
    assert t.img_per_s > 32 / 0.05 / 2 and t.seconds == 0.2


def test_a_zero_budget_times_the_minimum_of_windows():
    calls: list[int] = []
    t = speed.timed_throughput(sleeper(0.03, calls), batch_size=4, seconds=0.0)
    assert t.warmup == 1 and t.windows == speed.MIN_WINDOWS


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
