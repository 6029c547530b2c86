"""How topoprune fails: `UsageError` for bad input, and the one rule that turns any failure of a
command into one line on stderr and an exit code.

    exit 2    bad input (UsageError, a missing file, a full disk, out of memory): the line names the fix
    exit 1    a bug: the line names the file in the system's temporary folder holding the traceback
    exit 130  interrupted (Ctrl-C): what resume needs is kept, the same command continues
    exit 143  terminated (SIGTERM, e.g. a job scheduler's time limit): the same, as for Ctrl-C
"""

from __future__ import annotations

import errno
import re
import signal
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

EXIT_INPUT = 2
EXIT_BUG = 1
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class UsageError(ValueError):
    """Bad input from the user; the message says what to change."""


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: unwinds like Ctrl-C, so what resume needs is kept."""


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside (main thread, where SIGTERM has its default action): SIGTERM raises `Terminated`."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def terminate(_signum: int, _frame: object) -> None:
        raise Terminated

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextmanager
def usage_errors(fix: str = "") -> Iterator[None]:
    """Inside: a ValueError or TypeError (a library's complaint about a value the user gave)
    becomes a UsageError with `fix` appended (e.g. "; fix --scorer-opt")."""
    try:
        yield
    except UsageError:
        raise
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{one_line(exc)}{fix}") from None


def one_line(text: object) -> str:
    """`text` with every run of whitespace (newlines included) made one space."""
    return " ".join(str(text).split())


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and the exceptions it was raised from or during, innermost last."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _no_space(exc: BaseException) -> bool:
    """True if `exc` comes from a full disk or quota (torch.save wraps the OSError in a RuntimeError)."""
    return any(
        (isinstance(e, OSError) and e.errno in NO_SPACE) or "No space left on device" in str(e) for e in _causes(exc)
    )


OUT_OF_MEMORY = ("DefaultCPUAllocator: can't allocate memory", "CUDA out of memory", "MPS backend out of memory")
"""What torch's allocators say when an allocation fails (a plain RuntimeError on CPU; also in the
message of the RuntimeError a DataLoader worker's failure is re-raised as)."""


_TERMINAL_CODES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
"""ANSI escape sequences (colours, bold), which some libraries put in their messages (torch's
weights_only refusal does)."""


def first_line(exc: BaseException) -> str:
    """The first line of `exc`'s message, without terminal colour codes (its type's name if it has none)."""
    text = _TERMINAL_CODES.sub("", str(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def out_of_memory(exc: BaseException) -> bool:
    """True if `exc` (or what it was raised from) is an allocation failure: MemoryError, torch's
    OutOfMemoryError (CUDA) or a RuntimeError of an allocator (`OUT_OF_MEMORY`), on any device."""
    import torch

    return any(
        isinstance(e, (MemoryError, torch.cuda.OutOfMemoryError))
        or (isinstance(e, RuntimeError) and any(text in str(e) for text in OUT_OF_MEMORY))
        for e in _causes(exc)
    )


def input_message(exc: BaseException) -> str | None:
    """The one-line message of a failure that is the input's or the machine's, not a bug; else None."""
    if isinstance(exc, (UsageError, FileNotFoundError)):
        return one_line(exc)
    if _no_space(exc):
        return "no space left on the device; free space (or choose another --out) and rerun the same command"
    if out_of_memory(exc):
        return ("out of memory; lower --batch-size, --samples-per-class or --input-size, "
                "or use a machine (or device) with more memory")
    return None


def save_traceback(exc: BaseException) -> Path:
    """Write the full traceback of `exc` (and the command line) to a new file in the temporary folder."""
    from prune.version import __version__

    with tempfile.NamedTemporaryFile("w", prefix="topoprune-error-", suffix=".txt", delete=False) as f:
        f.write(f"topoprune {__version__}\ncommand: {' '.join(sys.argv)}\n\n")
        f.write("".join(traceback.format_exception(exc)))
    return Path(f.name)


def exit_code(body: Callable[[], int | None], *, speak: bool = True) -> int:
    """Run a command's `body` and return its exit code (its own, or 0); any failure prints one
    `error: ...` line on stderr (when `speak`; False on the non-zero ranks of a torchrun launch)."""

    def say(message: str) -> None:
        if speak:
            print(f"error: {message}", file=sys.stderr, flush=True)

    try:
        with sigterm_as_interrupt():
            return body() or 0
    except Terminated:
        say("terminated; run the same command again to continue where it stopped")
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        say("interrupted; run the same command again to continue where it stopped")
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the one place every failure is turned into a line
        message = input_message(exc)
        if message is not None:
            say(message)
            return EXIT_INPUT
        if speak:
            try:
                where = f"the traceback is in {save_traceback(exc)}"
            except OSError:
                where = "its traceback could not be saved (the temporary folder is not writable)"
            say(f"internal error, {type(exc).__name__}: {one_line(exc)[:300]}; {where}; please report it")
        return EXIT_BUG
