"""Freed feature-map-sized tensors go back to the system when the scoring loop asks."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

HELD_AFTER_FREEING = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch
    from prune.core.allocator import release_freed_memory

    def rss() -> int:
        line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS:"))
        return int(line.split()[1]) * 1024

    big = torch.ones(30 * 2**18)  # 30 MiB, freed: glibc's own rule raises its mmap threshold to 30 MiB
    del big
    before = rss()
    maps = [torch.ones(2 * 2**20) for _ in range(20)]  # twenty 8 MiB tensors, now from the heap
    del maps[:-1]  # all but the last: holes below it that the heap cannot shrink past
    if sys.argv[1] == "release":
        assert release_freed_memory()
    print((rss() - before) / 2**20)
""")


def held_mib(mode: str) -> float:
    """MiB still resident after freeing 19 of 20 tensors of 8 MiB, in a fresh process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, "-c", HELD_AFTER_FREEING, mode], capture_output=True, text=True, env=env,
                          check=True)
    return float(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or "LD_PRELOAD" in os.environ,
                    reason="glibc's malloc_trim: Linux, no other allocator preloaded")
def test_freed_tensors_go_back_to_the_system_when_released() -> None:
    assert held_mib("release") < 20  # the last tensor (8 MiB) and small change
    assert held_mib("keep") > 100  # without it the 19 freed blocks stay resident: the test can fail


def test_releases_come_at_most_once_an_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    from prune.core import allocator

    calls = []

    class FakeLibc:
        def malloc_trim(self, pad: int) -> int:
            calls.append(pad)
            return 1

    clock = iter([100.0, 100.1, 100.3, 100.4])
    monkeypatch.setattr(allocator, "_glibc", lambda: FakeLibc())
    monkeypatch.setattr(allocator.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(allocator, "_last_release", [float("-inf")])
    assert [allocator.release_freed_memory() for _ in range(4)] == [True, False, True, False]
    assert calls == [0, 0]
