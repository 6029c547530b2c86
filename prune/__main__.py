"""`python -m prune`: the command line (prune.cli).

torch-pruning imports timm, if it is installed, for its own op counter
(`torch_pruning.utils.count_ops_and_params`), which this project never uses: it counts FLOPs
with fvcore. timm in turn imports torchvision (which imports torch._dynamo): seconds that a
run without a torchvision or timm model spends for nothing. So the command line imports torch-pruning with timm hidden (its op counter is then
built without its timm attention hooks) and unhides timm at once: a `timm:<name>` model, or
anything else, imports timm normally later. Library users (`import prune`) get torch-pruning
untouched; nothing is hidden when timm or torch-pruning is already imported.
"""

import os
import signal
import sys


def _stopped_while_starting(signum: int, _frame: object) -> None:
    """Ctrl-C or SIGTERM while the libraries import: nothing is written yet, so one line and the
    usual exit code (130, 143) at once, not a traceback from inside an import or torch's C++."""
    os.write(2, b"error: interrupted while starting; nothing was written\n")
    os._exit(128 + signum)


def _handle_while_starting() -> dict[int, object]:
    """Install `_stopped_while_starting` for SIGINT and SIGTERM where they have their default
    handling (a background job may ignore SIGINT: left so); the handlers it replaced."""
    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    return {s: signal.signal(s, _stopped_while_starting) for s, d in defaults.items() if signal.getsignal(s) is d}


def _import_torch_pruning_without_timm() -> None:
    """Import torch_pruning while `import timm` fails (sys.modules['timm'] = None), then unhide timm."""
    if "timm" in sys.modules or "torch_pruning" in sys.modules:
        return
    sys.modules["timm"] = None  # type: ignore[assignment]  # `import timm` raises ImportError
    try:
        import torch_pruning  # noqa: F401
    finally:
        if sys.modules.get("timm", "absent") is None:
            del sys.modules["timm"]


_replaced = _handle_while_starting() if __name__ == "__main__" else {}
_import_torch_pruning_without_timm()

from prune.cli import main  # noqa: E402

for _signal, _handler in _replaced.items():  # the run's own handling (prune.errors) from here on
    signal.signal(_signal, _handler)

if __name__ == "__main__":
    try:
        code = main()
    except KeyboardInterrupt:  # a second Ctrl-C while the first one's line was printed
        code = 130
    raise SystemExit(code)
