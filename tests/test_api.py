"""The library API: prune.run → a typed PruneReport whose as_dict() is report.json; list_models; load_pruned."""

from __future__ import annotations

import fnmatch
import json
import subprocess
import sys
from pathlib import Path

import pytest

import prune
from finetune.metrics import Evaluation
from prune.core.files import write_json

ROOT = Path(__file__).resolve().parents[1]
CONFIG = prune.PruneConfig(ratio=0.3, scorer="l1", finetune=False, classes=3, samples_per_class=5)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[prune.PruneReport, Path]:
    out = tmp_path_factory.mktemp("api") / "out"
    return prune.run(CONFIG, out=out, quiet=True), out


def test_run_returns_a_typed_report(run):
    report, _ = run
    assert isinstance(report, prune.PruneReport)
    assert isinstance(report.before, prune.Measurement) and isinstance(report.after, prune.Measurement)
    assert isinstance(report.pruned_before_finetune, Evaluation)
    assert report.layers and all(isinstance(layer, prune.LayerResult) for layer in report.layers)
    assert report.settings == CONFIG and len(report.classes_used) == 3
    with pytest.raises(AttributeError):  # frozen
        report.after.top1 = 1.0  # type: ignore[misc]


def test_as_dict_is_the_report_json_written(run, tmp_path):
    report, out = run
    written = out / "report.json"
    assert report.as_dict() == json.loads(written.read_text())
    write_json(tmp_path / "again.json", report.as_dict())  # same serialiser, same bytes
    assert (tmp_path / "again.json").read_bytes() == written.read_bytes()
    assert prune.PruneReport.from_dict(json.loads(written.read_text())) == report


def test_typed_fields_match_the_pruned_model(run):
    report, out = run
    model = prune.load_pruned(out / "model.pt")
    assert report.after.params == sum(p.numel() for p in model.parameters()) < report.before.params
    for side in (report.before, report.after):
        assert side.flops == 2 * side.macs > 0
        assert 0.0 <= side.balanced_accuracy <= 1.0 and 0.0 <= side.top1 <= side.top5 <= 1.0
        assert side.img_per_s > 0 and side.throughput.img_per_s == side.img_per_s
    scores = json.loads((out / "scores.json").read_text())
    assert [layer.name for layer in report.layers] == list(scores)
    for layer in report.layers:
        assert model.get_submodule(layer.name).out_channels == layer.channels_after
        assert len(layer.removed) == round(0.3 * layer.channels_before) == layer.channels_before - layer.channels_after
        assert layer.map_size > 0 and layer.scoring_top1 is None  # l1 reads only weights: no forward for it
    # without fine-tuning nothing changes the network between these two evaluations
    assert report.after.top1 == report.pruned_before_finetune.top1
    assert report.finetune_losses == () and "finetune" not in report.timings


def test_list_models_takes_an_fnmatch_pattern():
    names = prune.list_models()
    assert {"embedded", "embedded-plain", "vgg16"} <= set(names) and names == sorted(names)
    assert prune.list_models("embedded*") == ["embedded", "embedded-plain"]
    vggs = prune.list_models("vgg1?")
    assert vggs and all(fnmatch.fnmatch(n, "vgg1?") for n in vggs) and "vgg16" in vggs
    assert prune.list_models("no-such-model*") == []


def test_import_prune_is_light():
    code = "import sys, prune; print(sorted(m for m in ('torch', 'timm', 'prune.pipeline.run') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr
    with pytest.raises(AttributeError):
        prune.no_such_name  # noqa: B018


def test_run_refuses_bad_input_before_touching_out(tmp_path):
    with pytest.raises(prune.UsageError, match="ratio"):
        prune.run(prune.PruneConfig(ratio=1.5), out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_all_lists_exactly_the_lazy_exports():
    import prune

    assert set(prune.__all__) == {"__version__", *prune._EXPORTS}
    assert all(getattr(prune, name) is not None for name in prune.__all__)
