"""`python -m prune`: the command line (prune.cli).

torch-pruning imports timm, if it is installed, for its own op counter
(`torch_pruning.utils.count_ops_and_params`), which this project never uses: it counts FLOPs
with fvcore. timm in turn imports torchvision (which imports torch._dynamo): seconds that a
run without a torchvision or timm model spends for nothing. So the command line imports torch-pruning with timm hidden (its op counter is then
built without its timm attention hooks) and unhides timm at once: a `timm:<name>` model, or
anything else, imports timm normally later. Library users (`import prune`) get torch-pruning
untouched; nothing is hidden when timm or torch-pruning is already imported.
"""

import sys


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


_import_torch_pruning_without_timm()

from prune.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
