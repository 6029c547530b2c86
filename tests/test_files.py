"""Atomic writes (prune.core.files): content, permissions from the umask, no temp files left."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from prune.core import files


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(old)


@pytest.mark.parametrize(
    ("write", "read"),
    [
        (lambda p: files.write_bytes(p, b"\x00\x01png"), lambda p: p.read_bytes() == b"\x00\x01png"),
        (lambda p: files.write_text(p, "é\n"), lambda p: p.read_text(encoding="utf-8") == "é\n"),
        (lambda p: files.write_json(p, {"a": [1, 2]}), lambda p: p.read_text() == '{\n  "a": [\n    1,\n    2\n  ]\n}\n'),
        (
            lambda p: files.torch_save(p, {"w": torch.arange(3.0)}),
            lambda p: torch.equal(torch.load(p, weights_only=True)["w"], torch.arange(3.0)),
        ),
    ],
)
def test_writes_land_whole_with_umask_permissions(tmp_path: Path, umask_027, write, read) -> None:
    path = tmp_path / "new" / "out.bin"
    write(path)
    assert read(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask_027  # 0o640, not mkstemp's 0o600
    assert [p.name for p in path.parent.iterdir()] == ["out.bin"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "out.json"
    files.write_text(path, "old")

    class Boom:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        files.torch_save(path, {"x": Boom()})
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
