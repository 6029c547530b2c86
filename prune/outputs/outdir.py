"""The output folder: claim it for a run, resume a matching run, refuse a different one.

A claim can be undone: a run that fails with bad input after claiming its folder calls
`Claim.rollback()`, which leaves the folder as it found it (absent, empty, or the earlier
run that `--overwrite` was about to replace). `Claim.commit()` drops that earlier run.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from prune.errors import UsageError
from prune.outputs.files import write_json

RUN_FILE = "run.json"
RUN_FORMAT = "topoprune/run/v1"


@dataclass(frozen=True)
class Claim:
    """A claimed output folder. `resume`: it holds a matching earlier run to continue."""

    out: Path
    resume: bool
    existed: bool = False
    backup: Path | None = None

    def commit(self) -> None:
        """The run succeeded: delete the replaced earlier run, if any."""
        if self.backup is not None:
            shutil.rmtree(self.backup, ignore_errors=True)

    def rollback(self) -> None:
        """The run failed on bad input: put the folder back as it was before the claim.

        A resumed run keeps its folder (its cache lets the next attempt continue).
        """
        if self.resume:
            return
        shutil.rmtree(self.out, ignore_errors=True)
        if self.backup is not None:
            self.backup.rename(self.out)
        elif self.existed:
            self.out.mkdir(parents=True, exist_ok=True)


def read_marker(out: Path) -> dict | None:
    """The run.json of `out` if it is a topoprune run marker, else None."""
    try:
        earlier = json.loads((Path(out) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return earlier if isinstance(earlier, dict) and earlier.get("format") == RUN_FORMAT else None


def check(out: Path, fingerprint: str, *, overwrite: bool, processes: int = 1) -> bool:
    """Decide without changing anything: True to resume, False to start afresh; UsageError
    if `out` is a file or holds a different run and `overwrite` is False."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; pass a folder path")
    if not out.is_dir() or not any(out.iterdir()) or overwrite:
        return False
    earlier = read_marker(out)
    if earlier is None or earlier.get("settings") != fingerprint:
        raise UsageError(f"--out {out} holds a different run; pass --overwrite to replace it or choose another --out")
    if int(earlier.get("processes", 1)) != processes:
        raise UsageError(
            f"--out {out} holds this run started with {earlier.get('processes', 1)} process(es), not {processes}; "
            "rerun with the same number of processes, or pass --overwrite"
        )
    return True


def claim(out: Path, fingerprint: str, *, overwrite: bool, processes: int = 1) -> Claim:
    """Make `out` this run's folder (see `check`); an overwritten run is moved aside until commit."""
    out = Path(out)
    if check(out, fingerprint, overwrite=overwrite, processes=processes):
        return Claim(out, resume=True, existed=True)
    existed, backup = out.is_dir(), None
    if existed and any(out.iterdir()):
        backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.replaced-", dir=out.parent))
        backup.rmdir()
        out.rename(backup)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / RUN_FILE, {"format": RUN_FORMAT, "settings": fingerprint, "processes": processes})
    return Claim(out, resume=False, existed=existed, backup=backup)
