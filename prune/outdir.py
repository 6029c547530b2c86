"""The output folder: claim it for a run, resume a matching run, refuse a different one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from prune.errors import UsageError
from prune.files import write_json

RUN_FILE = "run.json"
RUN_FORMAT = "topoprune/run/v1"


def claim(out: Path, fingerprint: str, *, overwrite: bool) -> bool:
    """Make `out` this run's folder; True if it holds a matching earlier run to resume.

    A folder from a different run (or not from topoprune) is refused unless `overwrite`,
    which empties it first.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; pass a folder path")
    if out.is_dir() and any(out.iterdir()):
        marker = out / RUN_FILE
        try:
            earlier = json.loads(marker.read_text())
        except (OSError, ValueError):
            earlier = None
        same = isinstance(earlier, dict) and earlier.get("format") == RUN_FORMAT and earlier.get("settings") == fingerprint
        if same and not overwrite:
            return True
        if not overwrite:
            raise UsageError(
                f"--out {out} holds a different run; pass --overwrite to replace it or choose another --out"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / RUN_FILE, {"format": RUN_FORMAT, "settings": fingerprint})
    return False
