"""No path, lock or kill costs data: --out never overlaps --data in any form, a run writes only
files of its own, and a run killed at any point (SIGKILL, or a torchrun peer killed) leaves a
folder the same command resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import quick_run
from test_bad_input import main_error, snapshot
from test_fashion import idx_folder

from prune import PruneConfig, UsageError
from prune.cli import main
from prune.outputs.outdir import LOCK_FILE, locked
from prune.pipeline.run import validate
from prune.zoo import fashion

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--classes", "2", "--samples-per-class", "2", "--no-finetune", "--quiet"]

PAUSE = """
import fnmatch, os, sys, time
sys.path.insert(0, os.getcwd())
def pausing(real):
    def rename(src, dst, *args, **kwargs):
        if fnmatch.fnmatch(os.fspath(dst), sys.argv[1]):
            print("paused", flush=True)
            time.sleep(600)
        return real(src, dst, *args, **kwargs)
    return rename
os.replace, os.rename = pausing(os.replace), pausing(os.rename)
from prune.cli import main
sys.exit(main(sys.argv[2:]))
"""
"""`python -c PAUSE PATTERN ARGS...`: the CLI, pausing before any rename onto a path matching PATTERN."""


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> list[str]:
    """Flags of a fast run: a 3-class folder of 8×8 images, random embedded weights, the l1 scorer."""
    return [*quick_run(tmp_path_factory.mktemp("quick")), *FAST]


def kill_paused(pattern: str, args: list[str]) -> None:
    """Run the CLI with `args` in a subprocess, SIGKILL it once it is about to rename onto `pattern`."""
    proc = subprocess.Popen([sys.executable, "-c", PAUSE, pattern, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        assert line == "paused", f"ended before {pattern}: {proc.communicate(timeout=60)[1][-2000:]}"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)


def report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


# --- case 1: one path rule for every --data form


@pytest.mark.parametrize("where", ["out-contains-data", "out-inside-data"])
def test_out_overlapping_fashion_mnist_data_is_refused(tmp_path, capsys, quick, where):
    """`--data fashion-mnist:<dir>` is a data folder like any other: --out may not hold, be or lie in it."""
    run = tmp_path / "run"
    if where == "out-contains-data":  # a finished run that also holds the IDX files
        assert main([*quick, "--out", str(run)]) == 0
        data, out = run / "idx", run
    else:
        data, out = tmp_path / "idx", tmp_path / "idx" / "run"
    idx_folder(data)
    before = snapshot(tmp_path)
    line = main_error(capsys, "--data", f"fashion-mnist:{data}", "--scorer", "l1", "--input-size", "16", *FAST,
                      "--overwrite", "--out", str(out))
    assert "--data" in line and "choose an --out outside" in line and str(data.resolve()) in line
    assert snapshot(tmp_path) == before


def test_the_default_fashion_mnist_folder_is_data_too():
    """`--data fashion-mnist` and a model whose default data it is read the Debian folder."""
    for config in (PruneConfig(data="fashion-mnist"), PruneConfig(model="fashion-plain")):
        for out in (fashion.DEBIAN_DIR, fashion.DEBIAN_DIR / "run", fashion.DEBIAN_DIR.parent):
            with pytest.raises(UsageError, match="choose an --out outside"):
                validate(config, out)


# --- case 2: files of its own only


@pytest.mark.parametrize("target", ["a file", "nothing"])
def test_a_lock_link_is_never_followed(tmp_path, capsys, quick, target):
    victim = tmp_path / "victim.txt"
    if target == "a file":
        victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_FILE).symlink_to(victim)
    for extra in ([], ["--overwrite"]):
        line = main_error(capsys, *quick, *extra, "--out", str(out))
        assert "symbolic link" in line and LOCK_FILE in line
    with pytest.raises(UsageError, match="symbolic link"):  # the lock itself, taken when the check is past
        with locked(out):
            pass
    assert (victim.read_text() == "precious") if target == "a file" else not os.path.lexists(victim)
    assert [p.name for p in out.iterdir()] == [LOCK_FILE] and (out / LOCK_FILE).is_symlink()


@pytest.mark.parametrize("path", ["new/../fresh", "new/../old/../fresh", "new/../link/inner/../fresh",
                                  "new/../old/fresh", "./new/./fresh"])
def test_a_path_through_a_missing_folder_leaves_no_folder_behind(tmp_path, monkeypatch, path):
    """`--out new/../fresh` makes `new` and `fresh` (as mkdir -p); a run that leaves nothing removes
    those and only those, never an empty folder that was there (`old`, `inner` behind a link)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "old").mkdir()
    (tmp_path / "elsewhere" / "inner").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    with locked(Path(path)):
        assert Path(path).is_dir()
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_a_lock_under_a_file_is_one_usage_error(tmp_path):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(UsageError, match="a part of the path is a file"):
        with locked(tmp_path / "file" / "out"):
            pass
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_a_link_in_a_run_folder_is_refused(tmp_path, capsys, quick):
    """A resumed run would write its score cache through a linked cache folder: refused."""
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    assert main([*quick, "--out", str(out)]) == 0
    (out / "cache").rename(elsewhere)
    (out / "cache").symlink_to(elsewhere)
    next(elsewhere.glob("scores-*.pt")).unlink()
    before = snapshot(elsewhere)
    line = main_error(capsys, *quick, "--out", str(out))
    assert "symbolic link" in line and "cache" in line
    assert snapshot(elsewhere) == before


# --- case 3: a kill while the claim is written or the earlier run is moved aside


def test_killed_while_run_json_is_written_into_a_new_folder_reruns(tmp_path, quick):
    out = tmp_path / "out"
    kill_paused(str(out / "run.json"), [*quick, "--out", str(out)])
    assert [p for p in out.iterdir() if p.name.startswith(".run.json.")]  # its temporary file
    assert main([*quick, "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("pattern", ["run.json", ".replaced-*/report.json"])
def test_killed_while_replacing_a_run_puts_it_back(tmp_path, quick, pattern):
    """Killed while the new run.json is written, or while the earlier run is moved aside: the
    earlier run is whole again (its own command resumes it), and the killed command reruns."""
    out = tmp_path / "out"
    assert main([*quick, "--out", str(out)]) == 0
    earlier = report(out)
    kill_paused(str(out / pattern), [*quick, "--ratio", "0.3", "--overwrite", "--out", str(out)])
    assert main([*quick, "--out", str(out)]) == 0
    assert report(out)["layers"] == earlier["layers"] and report(out)["settings"]["ratio"] == 0.5
    assert main([*quick, "--ratio", "0.3", "--overwrite", "--out", str(out)]) == 0
    assert report(out)["settings"]["ratio"] == 0.3
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("name", [".replaced-notes", ".dropped-notes", ".replaced-notes12"])
def test_an_empty_folder_of_the_users_named_like_ours_is_kept(tmp_path, capsys, quick, name):
    """Only names shaped as the run makes them (`.replaced-` and 8 characters) are taken for ours."""
    out = tmp_path / "out"
    (out / name).mkdir(parents=True)
    for overwrite in ([], ["--overwrite"]):
        assert "holds files that are not a topoprune run" in main_error(capsys, *quick, *overwrite, "--out", str(out))
        assert [p.name for p in out.iterdir()] == [name]


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_users_folder_named_like_a_moved_aside_run_is_never_taken_for_one(tmp_path, capsys, quick, overwrite):
    out = tmp_path / "out"
    (out / ".replaced-2024").mkdir(parents=True)
    (out / ".replaced-2024" / "thesis.tex").write_text("precious")
    before = snapshot(out)
    line = main_error(capsys, *quick, *overwrite, "--out", str(out))
    assert "holds files that are not a topoprune run" in line and snapshot(out) == before


def test_a_run_that_cannot_be_moved_aside_whole_is_left_as_it_was(tmp_path, capsys, quick, monkeypatch):
    """A file that will not move (immutable, another owner's) while --overwrite moves the earlier run
    aside: one line, and every file back where it was, not hidden in .replaced-*."""
    out = tmp_path / "out"
    assert main([*quick, "--out", str(out)]) == 0
    before = snapshot(out)
    real = Path.rename

    def refuse_the_report(self: Path, target: Path) -> Path:
        if self.name == "report.json" and ".replaced-" in str(target):
            raise PermissionError(1, "Operation not permitted", str(self))
        return real(self, target)

    monkeypatch.setattr(Path, "rename", refuse_the_report)
    line = main_error(capsys, *quick, "--ratio", "0.3", "--overwrite", "--out", str(out))
    assert "operation not permitted" in line and snapshot(out) == before
    assert not [p for p in out.iterdir() if p.name.startswith(".replaced-")]


# --- case 4: --overwrite resumes its own interrupted run


def test_overwrite_resumes_its_own_killed_run(tmp_path, quick):
    out = tmp_path / "out"
    command = [*quick, "--overwrite", "--out", str(out)]
    kill_paused(str(out / "cache" / "scores-001.pt"), command)
    first = (out / "cache" / "scores-000.pt").stat()
    assert not (out / "report.json").exists()
    assert main(command) == 0
    again = (out / "cache" / "scores-000.pt").stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)  # kept, not scored again
    assert not [p for p in out.iterdir() if p.name.startswith(".replaced-")]


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_killed_replacement_gives_the_earlier_command_its_run_back(tmp_path, quick, overwrite):
    """--overwrite with other settings killed mid-scoring (its run.json written, the earlier run
    aside): the earlier command, with or without --overwrite, gets its run back as it was, not
    recomputed; the killed command then starts again."""
    out = tmp_path / "out"
    assert main([*quick, "--out", str(out)]) == 0
    before, report_before, scores = snapshot(out), report(out), (out / "cache" / "scores-000.pt").stat()
    kill_paused(str(out / "cache" / "scores-001.pt"), [*quick, "--ratio", "0.3", "--overwrite", "--out", str(out)])
    assert json.loads((out / "run.json").read_text()) != json.loads(before["run.json"])  # taken over
    assert main([*quick, *overwrite, "--out", str(out)]) == 0
    after = snapshot(out)
    assert after.keys() == before.keys() and json.loads(after["report.json"])["layers"] == report_before["layers"]
    assert {k: v for k, v in after.items() if not k.startswith("report.")} == {  # its cache kept: not recomputed
        k: v for k, v in before.items() if not k.startswith("report.")}
    assert (out / "cache" / "scores-000.pt").stat().st_ino == scores.st_ino  # put back, not scored again
    assert main([*quick, "--ratio", "0.3", "--overwrite", "--out", str(out)]) == 0
    assert report(out)["settings"]["ratio"] == 0.3
    assert not [p for p in out.iterdir() if p.name.startswith(".replaced-")]


def test_two_killed_replacements_leave_the_finished_run_to_its_command(tmp_path, quick):
    """--overwrite killed mid-scoring, then another --overwrite killed the same way: the first
    replacement never committed, so the finished run is still aside and its command gets it back."""
    out = tmp_path / "out"
    assert main([*quick, "--out", str(out)]) == 0
    layers = report(out)["layers"]
    for ratio in ("0.3", "0.2"):
        kill_paused(str(out / "cache" / "scores-001.pt"), [*quick, "--ratio", ratio, "--overwrite", "--out", str(out)])
    assert main([*quick, "--out", str(out)]) == 0
    assert report(out)["settings"]["ratio"] == 0.5 and report(out)["layers"] == layers


def test_a_replacement_killed_while_it_drops_the_earlier_run_keeps_its_own(tmp_path, capsys, quick):
    """A commit renames .replaced-* to .dropped-* before deleting it: a kill in that deletion leaves
    the replacement the folder's run (the earlier command is refused, not given the remains)."""
    out = tmp_path / "out"
    assert main([*quick, "--out", str(out)]) == 0
    earlier_marker = (out / "run.json").read_bytes()
    assert main([*quick, "--ratio", "0.3", "--overwrite", "--out", str(out)]) == 0
    (out / ".dropped-x1y2z3w4").mkdir()  # the earlier run's last file, as a kill in its deletion leaves it
    (out / ".dropped-x1y2z3w4" / "run.json").write_bytes(earlier_marker)
    replacement = {k: v for k, v in snapshot(out).items() if not k.startswith(".")}
    line = main_error(capsys, *quick, "--out", str(out))
    assert "holds a different run" in line
    assert main([*quick, "--ratio", "0.3", "--out", str(out)]) == 0  # its own command: resumed, the rest dropped
    assert {k: v for k, v in snapshot(out).items() if not k.startswith((".", "report."))} == {
        k: v for k, v in replacement.items() if not k.startswith("report.")}
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_commit_renames_the_earlier_run_before_deleting_it(tmp_path, quick):
    """Killed as the commit starts (before the rename): the replacement is not finished, the
    earlier run is whole and its command gets it back."""
    out = tmp_path / "out"
    assert main([*quick, "--out", str(out)]) == 0
    layers = report(out)["layers"]
    kill_paused(str(out / ".dropped-*"), [*quick, "--ratio", "0.3", "--overwrite", "--out", str(out)])
    assert report(out)["settings"]["ratio"] == 0.3  # every output of the replacement written
    assert main([*quick, "--out", str(out)]) == 0
    assert report(out)["settings"]["ratio"] == 0.5 and report(out)["layers"] == layers


# --- case 5: a torchrun peer killed mid-scoring


PAUSE_RANK_1 = """
import os, sys, time
sys.path.insert(0, os.getcwd())
from prune.pipeline import selection
real, calls = selection.class_states, []
def paused(*args, **kwargs):
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 2:  # rank 0 is then at, or on its way to, the gather
        open(os.environ["PAUSED"], "w").write(str(os.getpid()))
        time.sleep(600)
    return real(*args, **kwargs)
selection.class_states = paused
from prune.cli import main
sys.exit(main(sys.argv[1:]))
"""
"""A torchrun script: the CLI, whose rank 1 pauses (writing its pid) before scoring its second layer."""


def torchrun(program: list[str], **env: str) -> subprocess.Popen:
    """torchrun with 2 processes on `program` (a script and its arguments, or -m prune ...)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--monitor-interval", "5", *program]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **env})


@pytest.mark.ddp
def test_a_killed_torchrun_peer_is_one_line_and_keeps_the_cache(tmp_path, quick):
    """Rank 1 SIGKILLed mid-scoring: rank 0 says so in one line and keeps --out; the rerun resumes."""
    out, paused, script = tmp_path / "out", tmp_path / "rank1.pid", tmp_path / "pause_rank_1.py"
    command = [*quick, "--scorer", "entropy", "--out", str(out)]
    script.write_text(PAUSE_RANK_1)
    proc = torchrun([str(script), *command], PAUSED=str(paused))
    try:
        end = time.monotonic() + 300
        while not (paused.exists() and paused.read_text()):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < end, "rank 1 never reached its second layer"
            time.sleep(0.05)
        os.kill(int(paused.read_text()), signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    ours = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1 and "another process of this torchrun job ended" in ours[0], err[-3000:]
    assert "rerun the same command" in ours[0] and "internal error" not in err
    assert (out / "run.json").exists() and not (out / "report.json").exists()
    cached = (out / "cache" / "scores-000.pt").stat()
    rerun = torchrun(["-m", "prune", *command])
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-3000:]
    again = (out / "cache" / "scores-000.pt").stat()
    assert (again.st_ino, again.st_mtime_ns) == (cached.st_ino, cached.st_mtime_ns)  # resumed, not scored again
    assert report(out)["processes"] == 2
