"""The output folder: claim it for a run, resume a matching run, refuse a different one.

`--out` is only ever replaced (`overwrite`) when it is empty or holds a topoprune run (its
marker file run.json) of other settings or inputs; the same run is resumed, with or without
`overwrite`. A folder with anything else in it is refused, and so is a symbolic link in a run
folder (a run writes only files of its own, inside `--out`). A claim can be undone: a run that
fails after claiming its folder calls `Claim.rollback()`, which leaves the folder as it found
it (absent, empty, or the earlier run that `--overwrite` was about to replace). `Claim.commit()`
drops that earlier run. One run at a time uses a folder: `locked(out)` holds an OS file lock in
it, which dies with its process (a killed run leaves no stale lock).

A kill at any moment leaves a folder the next claim understands. Besides the run a folder may
hold files of our own (`_is_ours`): the lock, temporary files of atomic writes, and
`.replaced-*`, the earlier run being replaced. That one is moved aside run.json first and moved
back run.json last, and the new run.json is written only once it is all aside; so a folder
without run.json whose `.replaced-*` holds one is a replacement cut short, and the next claim
puts the earlier run back. A replacement killed later, before its commit, stays until a claim:
its own command resumes it, the earlier run's command gets the earlier run back, a third command
with `overwrite` drops it and keeps the earlier run aside as its own backup. A commit first
renames `.replaced-*` to `.dropped-*` (atomic: that run is gone from then on, the next claim
finishes deleting it). Every OSError from the file system becomes a one-line UsageError.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from prune.core.files import is_temp, write_json
from prune.errors import UsageError

try:
    import fcntl
except ImportError:  # not POSIX: no lock, a single run per folder is the user's care
    fcntl = None  # type: ignore[assignment]

RUN_FILE = "run.json"
RUN_FORMAT = "topoprune/run/v1"
LOCK_FILE = ".topoprune.lock"
BACKUP_PREFIX = ".replaced-"
DROPPED_PREFIX = ".dropped-"
ASIDE_NAME = re.compile(r"\.(replaced|dropped)-[a-z0-9_]{8}")  # as tempfile.mkdtemp(prefix=BACKUP_PREFIX) names one
INPUT_NAMES = {"version": "topoprune version", "weights_digest": "--weights file", "data_digest": "--data images"}


def out_error(out: Path, exc: OSError) -> UsageError:
    """A one-line UsageError for an OSError met while creating or claiming `out`."""
    fixes = {
        errno.ENAMETOOLONG: "a name in the path is too long for the file system; choose a shorter --out",
        errno.EACCES: "permission denied; choose a folder you can write to",
        errno.EPERM: "operation not permitted; choose a folder you can write to",
        errno.EROFS: "the file system is read-only; choose a writable --out",
        errno.ENOTDIR: "a part of the path is a file, not a folder; choose a path inside a folder",
        errno.EEXIST: "it exists but is not a folder (a broken symbolic link?); remove it or choose another --out",
        errno.ELOOP: "the path has a symbolic link loop; choose another --out",
        errno.ENOSPC: "no space left on the device; free space or choose another --out",
        errno.EDQUOT: "disk quota exceeded; free space or choose another --out",
    }
    fix = fixes.get(exc.errno, f"{exc.strerror or type(exc).__name__}; choose another --out")
    return UsageError(f"cannot use --out {out}: {fix}")


def _is_ours(path: Path) -> bool:
    """True for a file of our own beside a run: the lock, a temporary file, a `.replaced-*` (or
    `.dropped-*`) folder that is a run moved aside (named as `tempfile.mkdtemp` names them; empty,
    or holding a run.json marker: it is moved first); never a link, never a folder of the user's
    that happens to have such a name."""
    if path.is_symlink():
        return False
    if path.name.startswith((BACKUP_PREFIX, DROPPED_PREFIX)):
        return bool(ASIDE_NAME.fullmatch(path.name)) and path.is_dir() and (read_marker(path) is not None or not any(path.iterdir()))
    return (path.name == LOCK_FILE and path.is_file()) or is_temp(path)


def _entries(out: Path) -> list[Path]:
    """What `out` holds besides files of our own (`_is_ours`)."""
    return [p for p in out.iterdir() if not _is_ours(p)]


def _backups(out: Path, prefix: str = BACKUP_PREFIX) -> list[Path]:
    """The `.replaced-*` folders of `out`: earlier runs a replacing run moved aside (with
    `prefix=DROPPED_PREFIX`: the `.dropped-*` ones, earlier runs being deleted)."""
    return [p for p in out.iterdir() if p.name.startswith(prefix) and _is_ours(p)]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _remove_temps(out: Path) -> None:
    """Delete the temporary files unfinished atomic writes left anywhere in `out`."""
    for path in list(out.rglob(".*.tmp")):
        if is_temp(path):
            path.unlink(missing_ok=True)


def _run_json_last(paths: list[Path]) -> list[Path]:
    return sorted(paths, key=lambda p: p.name == RUN_FILE)


def _drop_backup(backup: Path) -> None:
    """Delete a `.replaced-*` folder: first renamed `.dropped-*` (atomic: from then on it is never
    put back, and the next claim finishes deleting it), then emptied run.json last, so a kill
    meanwhile leaves a folder still ours (`_is_ours`)."""
    if backup.name.startswith(BACKUP_PREFIX):
        backup = backup.rename(backup.with_name(DROPPED_PREFIX + backup.name.removeprefix(BACKUP_PREFIX)))
    for path in _run_json_last(list(backup.iterdir())):
        _remove(path)
    shutil.rmtree(backup, ignore_errors=True)


def _cut_short(out: Path) -> Path | None:
    """The `.replaced-*` folder of a replacement a kill cut short (`out` has no run.json, it has
    one): the earlier run, partly or wholly moved aside. None if there is none."""
    if read_marker(out) is not None:
        return None
    return next((b for b in _backups(out) if read_marker(b) is not None), None)


def _put_back(out: Path, backup: Path) -> None:
    """Move the earlier run in `backup` back into `out`, run.json last (a kill in between leaves
    a replacement cut short, finished by the next claim), then drop `backup`."""
    for path in _run_json_last(list(backup.iterdir())):
        path.rename(out / path.name)
    backup.rmdir()
    _remove_temps(out)


def _discard_run(out: Path) -> None:
    """Delete the run in `out` (not the files of our own), run.json last: a kill meanwhile leaves
    this run, or with a `.replaced-*` beside it a replacement cut short."""
    for path in _run_json_last(_entries(out)):
        _remove(path)
    _remove_temps(out)


def _first_link(out: Path) -> Path | None:
    """A symbolic link anywhere inside `out` (links are not followed), or None."""
    for folder, dirs, files in os.walk(out):
        for name in (*dirs, *files):
            if os.path.islink(os.path.join(folder, name)):
                return Path(folder, name)
    return None


def _link_error(out: Path, link: Path) -> UsageError:
    return UsageError(f"--out {out} holds a symbolic link {link}; a run writes only files of its own there: "
                      "remove the link or choose another --out")


@dataclass(frozen=True)
class Claim:
    """A claimed output folder. `resume`: it holds a matching earlier run to continue.

    `existed`: the folder was there before the claim; `backup`: the subfolder of `out` the
    replaced earlier run was moved into (deleted by `commit`, moved back by `rollback`).
    """

    out: Path
    resume: bool
    existed: bool = False
    backup: Path | None = None

    def commit(self) -> None:
        """The run succeeded: delete the earlier run(s) it replaced, if any."""
        for backup in _backups(self.out):
            _drop_backup(backup)

    def rollback(self) -> None:
        """The run failed: put the folder back as it was before the claim.

        A resumed run keeps its folder (its cache lets the next attempt continue). run.json is
        removed last, so a kill meanwhile leaves this run or a replacement cut short.
        """
        if self.resume:
            return
        _discard_run(self.out)
        if self.backup is not None:
            _put_back(self.out, self.backup)
        if not self.existed:
            shutil.rmtree(self.out, ignore_errors=True)


def read_marker(out: Path) -> dict | None:
    """The run.json of `out` if it is a topoprune run marker, else None."""
    try:
        earlier = json.loads((Path(out) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return earlier if isinstance(earlier, dict) and earlier.get("format") == RUN_FORMAT else None


def _check_creatable(out: Path) -> None:
    """UsageError if `out` (absent) obviously cannot be created: a file, an unwritable folder
    or an over-long name on the way. Anything subtler is caught when it is created."""
    parent = out.parent
    missing = [out.name]
    while not parent.exists() and parent != parent.parent:
        if parent.is_symlink():
            raise UsageError(f"cannot use --out {out}: {parent} is a broken symbolic link; choose another --out")
        missing.append(parent.name)
        parent = parent.parent
    if not parent.is_dir():
        raise out_error(out, OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)))
    try:
        limit = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        limit = 255
    if any(len(os.fsencode(name)) > limit for name in missing):
        raise out_error(out, OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG)))
    _check_writable(out, parent)


def _check_writable(out: Path, folder: Path) -> None:
    if not os.access(folder, os.W_OK | os.X_OK):
        raise out_error(out, OSError(errno.EACCES, os.strerror(errno.EACCES)))


def _open_lock(path: Path, *, create: bool):
    """The lock file at `path` opened for reading and writing, never through a symbolic link
    (OSError ELOOP for one; FileNotFoundError if it is absent and not `create`)."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    return os.fdopen(os.open(path, flags, 0o666), "r+")


def holder(out: Path) -> str | None:
    """Who holds the lock of `out` ('process PID on HOST'), or None if no live run does."""
    path = Path(out) / LOCK_FILE
    if fcntl is None or not _is_ours(path):
        return None
    try:
        with _open_lock(path, create=False) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return f.read().strip() or "another process"
            fcntl.flock(f, fcntl.LOCK_UN)
    except OSError:
        return None
    return None


def _in_use(out: Path, who: str) -> UsageError:
    return UsageError(
        f"--out {out} is in use by {who}; wait for that run to end or choose another --out "
        f"(a run that was killed holds no lock: then delete {Path(out) / LOCK_FILE})"
    )


def check(out: Path, fingerprint: str, *, overwrite: bool, processes: int = 1, inputs: dict | None = None) -> bool:
    """Decide without changing anything: True to resume, False to start afresh.

    True when `out` holds this run (settings `fingerprint`, `inputs` when given: version and
    digests of weights and data, and `processes`), with or without `overwrite`. UsageError if
    `out` cannot be a folder, holds anything but a topoprune run (even with `overwrite`), a
    symbolic link, a different run and `overwrite` is False, or is in use. A replacement a kill
    cut short counts as the earlier run it was replacing (the claim puts that back), and so does
    a killed replacement for the command of the run it moved aside.
    """
    out = Path(out)
    try:
        return _decide(out, fingerprint, overwrite, processes, inputs, locked_here=False)
    except OSError as exc:
        raise out_error(out, exc) from None


def _decide(out: Path, fingerprint: str, overwrite: bool, processes: int, inputs: dict | None, *,
            locked_here: bool) -> bool:
    if out.is_symlink() and not out.exists():
        raise UsageError(f"--out {out} is a broken symbolic link; remove it or choose another --out")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; pass a folder path")
    if not out.exists():
        _check_creatable(out)
        return False
    _check_writable(out, out)
    if (out / LOCK_FILE).is_symlink():
        raise _link_error(out, out / LOCK_FILE)
    who = None if locked_here else holder(out)
    if who is not None:
        raise _in_use(out, who)
    cut_short = _cut_short(out)
    earlier = read_marker(out if cut_short is None else cut_short)
    if earlier is None and not _entries(out):
        return False
    if earlier is None:
        raise UsageError(
            f"--out {out} holds files that are not a topoprune run (no {RUN_FILE}); --overwrite replaces only "
            "topoprune runs and empty folders: choose another --out"
        )
    if (link := _first_link(out)) is not None:
        raise _link_error(out, link)
    problem = _difference(out, earlier, fingerprint, processes, inputs)
    if problem is None or _replaced_this_run(out, fingerprint, processes, inputs) is not None:
        return True
    if overwrite:
        return False
    raise UsageError(problem)


def _difference(out: Path, earlier: dict, fingerprint: str, processes: int, inputs: dict | None) -> str | None:
    """Why the run in `out` (its marker `earlier`) is not this one, naming the fix; None if it is."""
    if earlier.get("settings") != fingerprint:
        return f"--out {out} holds a different run; pass --overwrite to replace it or choose another --out"
    if inputs is not None and earlier.get("inputs") != inputs:
        before = earlier.get("inputs")
        changed = ([INPUT_NAMES.get(k, k) for k in inputs if before.get(k) != inputs[k]]
                   if isinstance(before, dict) else []) or [INPUT_NAMES["version"]]  # e.g. an older marker
        return (f"--out {out} holds this command's run made with another {' and '.join(changed)}; "
                "pass --overwrite to start again or choose another --out")
    if earlier.get("processes", 1) != processes:
        return (f"--out {out} holds this run started with {earlier.get('processes', 1)} process(es), not {processes}; "
                "rerun with the same number of processes, or pass --overwrite")
    return None


def _replaced_this_run(out: Path, fingerprint: str, processes: int, inputs: dict | None) -> Path | None:
    """The `.replaced-*` folder holding this very run, moved aside by a replacing run of other
    settings that was killed (or whose clean-up was): this run is whole there. None if there is none."""
    own = read_marker(out)
    if own is None or _difference(out, own, fingerprint, processes, inputs) is None:
        return None
    return next((b for b in _backups(out) if (marker := read_marker(b)) is not None
                 and _difference(out, marker, fingerprint, processes, inputs) is None), None)


def claim(out: Path, fingerprint: str, *, overwrite: bool, processes: int = 1, inputs: dict | None = None) -> Claim:
    """Make `out` this run's folder (see `check`); an overwritten run is moved aside until commit.

    run.json records `fingerprint` (the settings), `inputs` and `processes`.
    """
    out = Path(out)
    try:
        return _claim(out, fingerprint, overwrite, processes, inputs)
    except OSError as exc:
        raise out_error(out, exc) from None


def _claim(out: Path, fingerprint: str, overwrite: bool, processes: int, inputs: dict | None) -> Claim:
    resume = _decide(out, fingerprint, overwrite, processes, inputs, locked_here=True)
    if out.is_dir():  # finish what a killed run left: a deletion, a replacement cut short, temporary files
        for dropped in _backups(out, DROPPED_PREFIX):
            _drop_backup(dropped)
        if (cut_short := _cut_short(out)) is not None:
            _put_back(out, cut_short)
        elif (replaced := _replaced_this_run(out, fingerprint, processes, inputs)) is not None:
            _discard_run(out)  # the unfinished run that was replacing this one
            _put_back(out, replaced)
        _remove_temps(out)
    if resume:
        return Claim(out, resume=True, existed=True)
    existed = out.is_dir()
    aside = _backups(out) if existed else []
    backup = next((b for b in aside if read_marker(b) is not None), None)
    for other in aside:
        if other != backup:
            _drop_backup(other)  # an empty one: a kill between its making and the first move
    if backup is not None:  # `out` holds a replacement that never committed: it goes, the run it replaced stays aside
        _discard_run(out)
    elif existed and (entries := _entries(out)):
        backup = Path(tempfile.mkdtemp(prefix=BACKUP_PREFIX, dir=out))
        try:
            for path in reversed(_run_json_last(entries)):  # run.json first: from then on no run is here
                path.rename(backup / path.name)
        except BaseException:  # a file that will not move (immutable, another owner): all back, as found
            _put_back(out, backup)
            raise
    claimed = Claim(out, resume=False, existed=existed, backup=backup)
    try:
        out.mkdir(parents=True, exist_ok=True)
        marker = {"format": RUN_FORMAT, "settings": fingerprint, "processes": processes}
        write_json(out / RUN_FILE, marker if inputs is None else {**marker, "inputs": inputs})
    except BaseException:
        claimed.rollback()
        raise
    return claimed


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold `out`'s lock inside (UsageError if a live run holds it, or the lock's name is a
    symbolic link); creates `out` if needed and removes it again on exit if it is then empty
    and was not there before."""
    out = Path(out)
    if fcntl is None:
        yield
        return
    created: list[Path] = []
    had_lock = os.path.lexists(out / LOCK_FILE)
    try:
        _make_folders(out, created)
        f = _take_lock(out)
    except OSError as exc:  # e.g. a full disk while the lock's text is written
        if not had_lock:
            with suppress(OSError):
                (out / LOCK_FILE).unlink(missing_ok=True)
        _remove_empty(created)
        raise out_error(out, exc) from None
    try:
        yield
    finally:
        (out / LOCK_FILE).unlink(missing_ok=True)
        f.close()
        _remove_empty(created)


def _make_folders(out: Path, made: list[Path]) -> None:
    """Create `out` and its missing parents one at a time, as `mkdir -p` (`a/../b` makes a and b),
    adding each folder made to the front of `made`: only those, never one that was there."""
    path = Path(out.anchor)
    for part in out.parts[1 if out.anchor else 0:]:
        path = path / part
        if part in (".", ".."):
            continue
        try:
            path.mkdir()
        except FileExistsError:
            continue
        made.insert(0, path)


def _remove_empty(folders: list[Path]) -> None:
    """Remove those of `folders` (folders this run made, last made first) that are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            continue


def _take_lock(out: Path):
    """The open, flock-ed lock file of `out` (its text says who holds it); UsageError if its name is a link."""
    path = out / LOCK_FILE
    while True:
        try:
            f = _open_lock(path, create=True)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _link_error(out, path) from None
            raise
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = f.read().strip() or "another process"
            f.close()
            raise _in_use(out, who) from None
        try:
            same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a file its last holder unlinked while we waited for it
            try:
                f.seek(0)
                f.truncate()
                f.write(f"process {os.getpid()} on {os.uname().nodename}\n")
                f.flush()
            except OSError:
                f.close()
                raise
            return f
        f.close()
