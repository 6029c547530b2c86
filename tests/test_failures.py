"""Every failure is one line and an exit code, and never costs the state --out had before."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import subprocess
from pathlib import Path

import pytest
from helpers import quick_run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import prune
from prune import PruneConfig, UsageError
from prune.cli import main
from prune.errors import exit_code

QUICK = ["--classes", "2", "--samples-per-class", "2", "--no-finetune"]


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def _crash_file(line: str) -> Path:
    """The traceback file an exit-1 line names."""
    marker = "the traceback is in "
    assert marker in line, line
    return Path(line.split(marker, 1)[1].split(";", 1)[0])


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path → bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def good_run(tmp_path: Path, one_thread) -> tuple[list[str], Path]:
    """The flags of a quick run and its finished --out."""
    flags = quick_run(tmp_path) + QUICK
    out = tmp_path / "out"
    assert main([*flags, "--out", str(out), "--quiet"]) == 0
    return flags, out


def _break_saving(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    """Make the run fail where it saves model.pt, after --out is claimed and half written."""

    def fail(*_args, **_kwargs):
        raise exc

    monkeypatch.setattr("prune.pipeline.run.save_pruned", fail)


def test_a_bug_in_an_overwrite_run_restores_the_parked_run_every_time(good_run, monkeypatch, capsys):
    flags, out = good_run
    before = _snapshot(out)
    _break_saving(monkeypatch, RuntimeError("boom"))
    capsys.readouterr()
    for _ in range(2):  # the second failure must not clean the first one's parked run away
        assert main([*flags, "--ratio", "0.25", "--out", str(out), "--overwrite", "--quiet"]) == 1
        crash = _crash_file(_one_error_line(capsys.readouterr().err))
        text = crash.read_text()
        assert "Traceback" in text and "RuntimeError: boom" in text
        crash.unlink()
        assert _snapshot(out) == before  # report.json, run.json, model.pt byte-identical; no .replaced-*
    monkeypatch.undo()
    assert main([*flags, "--out", str(out), "--quiet"]) == 0  # it still resumes as the run it was
    layers = [json.loads(snap["report.json"])["layers"] for snap in (before, _snapshot(out))]
    assert layers[0] == layers[1]


def test_a_bug_in_a_new_folder_leaves_no_folder(tmp_path, monkeypatch, capsys, one_thread):
    flags = quick_run(tmp_path) + QUICK
    out = tmp_path / "new" / "out"
    _break_saving(monkeypatch, KeyError("lost"))
    assert main([*flags, "--out", str(out), "--quiet"]) == 1
    _crash_file(_one_error_line(capsys.readouterr().err)).unlink()
    assert not (tmp_path / "new").exists()  # no run.json, no lock, no cache


def test_a_bug_in_a_resumed_run_keeps_what_resume_needs(good_run, monkeypatch, capsys):
    flags, out = good_run
    (out / "report.json").unlink()  # as if it was killed before the report
    _break_saving(monkeypatch, RuntimeError("boom"))
    capsys.readouterr()
    assert main([*flags, "--out", str(out), "--quiet"]) == 1
    _crash_file(_one_error_line(capsys.readouterr().err)).unlink()
    assert (out / "run.json").exists() and any((out / "cache").iterdir())


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, check=False)
    return done.returncode == 0


@pytest.fixture
def small_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A folder on a 96 KiB tmpfs where the machine allows mounting one (root), else a folder
    whose atomic writes of more than 96 KiB fail with ENOSPC. Yields (folder, fill) where
    fill() leaves no space at all."""
    disk = tmp_path / "disk"
    mounted = _mount_tmpfs(disk, "96k")
    if not mounted:
        from prune.core import files

        real = files._atomic
        used: dict[str, int] = {}

        def limited(path: Path, write) -> None:
            if Path(path).is_relative_to(disk):
                import io

                buf = io.BytesIO()
                write(buf)
                used[str(path)] = len(buf.getvalue())
                if sum(used.values()) > 96 * 1024 or used.get("full"):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real(path, write)

        monkeypatch.setattr(files, "_atomic", limited)

    def fill() -> None:
        if mounted:
            with open(disk / "filler", "wb", buffering=0) as f:
                try:
                    while True:
                        f.write(b"\0" * 4096)
                except OSError:
                    pass
        else:
            monkeypatch.setattr("prune.outputs.outdir._take_lock", _no_space_lock)

    yield disk, fill
    if mounted:
        subprocess.run(["umount", str(disk)], check=False)


def _no_space_lock(out: Path):
    (out / ".topoprune.lock").write_bytes(b"")  # created, then its text cannot be written
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_while_model_pt_is_written_is_one_line_and_leaves_nothing(tmp_path, small_disk, capsys,
                                                                               one_thread):
    disk, _ = small_disk
    flags = quick_run(tmp_path) + QUICK
    out = disk / "out"
    assert main([*flags, "--out", str(out), "--quiet"]) == 2
    assert "no space left on the device" in _one_error_line(capsys.readouterr().err)
    assert not out.exists()


def test_a_full_disk_while_out_is_claimed_leaves_no_lock(tmp_path, small_disk, capsys, one_thread):
    disk, fill = small_disk
    flags = quick_run(tmp_path) + QUICK
    fill()
    out = disk / "out"
    assert main([*flags, "--out", str(out), "--quiet"]) == 2
    assert "no space left" in _one_error_line(capsys.readouterr().err)
    assert not out.exists()


def test_exit_code_classifies_each_kind_of_failure(capsys):
    def raises(exc: BaseException):
        def body():
            raise exc
        return body

    full = RuntimeError("PytorchStreamWriter failed writing file")
    full.__context__ = OSError(errno.ENOSPC, "No space left on device")
    cases = [(UsageError("bad --ratio; pass 0.5"), 2), (FileNotFoundError("no such file x"), 2), (full, 2),
             (MemoryError(), 2), (KeyboardInterrupt(), 130), (ZeroDivisionError("division by zero"), 1)]
    for exc, code in cases:
        assert exit_code(raises(exc)) == code
        line = _one_error_line(capsys.readouterr().err)
        if code == 1:
            crash = _crash_file(line)
            assert "ZeroDivisionError: division by zero" in crash.read_text()
            crash.unlink()
    assert exit_code(lambda: 3) == 3 and exit_code(lambda: None) == 0
    assert exit_code(raises(RuntimeError("quiet rank")), speak=False) == 1
    assert capsys.readouterr().err == ""


OOM_FIXES = ("out of memory", "--batch-size", "--samples-per-class", "--input-size")


def test_out_of_memory_on_any_device_is_one_line_exit_2(capsys):
    """A real failed CPU allocation (torch's allocator raises a plain RuntimeError), one re-raised from a
    DataLoader worker, CUDA's OutOfMemoryError and MemoryError: exit 2, one line naming what to lower."""
    import torch

    def allocate():
        torch.empty(2**60, dtype=torch.uint8)  # more than any address space: fails at once, touches nothing

    def in_a_worker():
        try:
            allocate()
        except RuntimeError as exc:  # as torch's DataLoader re-raises a worker's failure
            raise RuntimeError(f"Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback:\n{exc}") from None

    def cuda():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    for body in (allocate, in_a_worker, cuda, lambda: [0] * 2**62):
        assert exit_code(body) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert all(word in line for word in OOM_FIXES), line


def test_an_input_size_too_large_for_memory_is_one_line_exit_2(tmp_path, capsys, one_thread):
    """The issue's case: the default job's data at an --input-size no memory holds (real allocations)."""
    out = tmp_path / "out"
    assert main(["--input-size", "1000000", "--quiet", "--out", str(out)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert all(word in line for word in OOM_FIXES), line
    assert not out.exists()


def test_a_model_input_too_large_for_memory_is_not_blamed_on_the_model(tmp_path, capsys, one_thread):
    """The check that the model runs on one image of --input-size: out of memory there is memory, not the model."""
    out = tmp_path / "out"
    assert main([*quick_run(tmp_path), *QUICK, "--input-size", "4000000", "--quiet", "--out", str(out)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert all(word in line for word in OOM_FIXES) and "cannot run" not in line, line
    assert not out.exists()


# --- the Python API's types ------------------------------------------------------------------

def _allowed(annotation: str) -> tuple[type, ...]:
    """The Python types a PruneConfig field's annotation names (read from the class itself)."""
    names = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "None": (type(None),)}
    if annotation.startswith("tuple"):
        return (tuple,)
    return tuple(t for part in annotation.split("|") for t in names[part.strip()])


def _fits(value: object, annotation: str) -> bool:
    allowed = _allowed(annotation)
    if isinstance(value, bool):
        return bool in allowed
    if annotation.startswith("tuple"):
        return isinstance(value, tuple) and all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str)
                                                for p in value)
    return isinstance(value, allowed)


FIELDS = {f.name: f.type for f in dataclasses.fields(PruneConfig)}
ANY_VALUE = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=4),
                      st.lists(st.integers(), max_size=2), st.tuples(st.integers()), st.just(Path("x")))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(sorted(FIELDS)), value=ANY_VALUE)
def test_a_mistyped_field_is_a_usage_error_before_out_exists(tmp_path, field, value):
    if isinstance(value, Path) and field in ("weights", "data"):
        value = tmp_path / "missing"  # a path is what these take: checked as a path later
    if _fits(value, FIELDS[field]) or (field in ("weights", "data") and isinstance(value, Path)):
        return  # not a mistyped value for this field
    out = tmp_path / f"out-{field}"
    with pytest.raises(UsageError, match=field):
        prune.run(PruneConfig(**{field: value}), out=out)
    assert not out.exists()


def test_every_field_takes_its_own_type_and_a_path_where_a_path_is_meant(tmp_path):
    for name, annotation in FIELDS.items():
        default = getattr(PruneConfig(), name)
        assert _fits(default, annotation), (name, default)
    config = PruneConfig(data=tmp_path, weights=tmp_path / "w.pt")
    assert config.data == str(tmp_path) and config.weights == str(tmp_path / "w.pt")
    with pytest.raises(TypeError):
        PruneConfig("embedded", None, None, 0.5)  # keyword-only


@pytest.mark.parametrize("kwargs", [
    {"config": {"ratio": 0.5}}, {"out": 3}, {"out": ""}, {"overwrite": "yes"}, {"quiet": 1}, {"export": 1},
])
def test_run_refuses_mistyped_arguments_before_out_exists(tmp_path, kwargs):
    call = {"config": PruneConfig(), "out": tmp_path / "out", **kwargs}
    with pytest.raises(UsageError):
        prune.run(call.pop("config"), **call)
    assert not (tmp_path / "out").exists()


def test_the_issue_sequence_keeps_the_good_run(good_run, capsys):
    """A good run, then twice a command the scorer refuses with --overwrite: the run stays."""
    flags, out = good_run
    before = _snapshot(out)
    capsys.readouterr()
    bad = [*flags, "--scorer", "selectivity", "--classes", "1", "--overwrite", "--out", str(out), "--quiet"]
    for _ in range(2):
        assert main(bad) == 2
        assert "selectivity" in _one_error_line(capsys.readouterr().err)
        assert _snapshot(out) == before
