"""benchmarks.scale on a tiny setting: one result file per run, skipped when present, ratios from them."""

from __future__ import annotations

import json

from benchmarks import scale

ARGS = ["--models", "resnet18", "--scorers", "l1", "--classes", "2", "--samples-per-class", "4", "--input-size", "32",
        "--threads", "1"]


def test_scale_writes_one_file_per_run_and_skips_finished_runs(tmp_path, capsys):
    assert scale.main([*ARGS, "--results", str(tmp_path)]) == 0
    settings = scale.Settings(models=("resnet18",), scorers=("l1",), classes=2, samples_per_class=4, input_size=32,
                              threads=1)
    run_file = scale.run_file(tmp_path, "resnet18", "l1", settings)
    cpu = scale.machine()["cpu"]
    unit_file = scale.forward_file(tmp_path, "resnet18", settings, cpu)
    run, unit = json.loads(run_file.read_text()), json.loads(unit_file.read_text())
    assert run["exit"] == 0 and set(run["timings"]) >= {"load", "select_and_prune", "evaluate_before"}
    assert run["threads"] == 1 and unit["forward_s"] > 0 and scale.tag(settings) == "k2-n4-32-t1"
    summary = json.loads((tmp_path / f"scale-{scale.tag(settings)}.json").read_text())
    (row,) = summary["runs"]
    assert row["wall_over_forward"] == run["wall_s"] / unit["forward_s"]
    assert row["stages_over_forward"]["load"] == run["timings"]["load"] / unit["forward_s"]
    assert "resnet18" in (tmp_path / f"scale-{scale.tag(settings)}.md").read_text()

    unit_file.rename(scale.forward_file(tmp_path, "resnet18", settings, "Another CPU"))  # no unit on this run's CPU
    assert scale.main([*ARGS, "--results", str(tmp_path), "--report"]) == 0
    (row,) = json.loads((tmp_path / f"scale-{scale.tag(settings)}.json").read_text())["runs"]
    assert row["forward_s"] is None and "wall_over_forward" not in row
    assert "no forward on this CPU" in (tmp_path / f"scale-{scale.tag(settings)}.md").read_text()
    unit_file.write_text(json.dumps(unit))

    other = scale.run_file(tmp_path, "vgg11", "l1", settings)  # a run another call made: kept in the summary
    other.write_text(json.dumps({**run, "model": "vgg11"}))
    assert scale.main([*ARGS, "--results", str(tmp_path), "--report"]) == 0
    rows = json.loads((tmp_path / f"scale-{scale.tag(settings)}.json").read_text())["runs"]
    assert [(r["model"], r["scorer"]) for r in rows] == [("resnet18", "l1"), ("vgg11", "l1")]
    other.unlink()

    unit_file.unlink()  # no run to do: no unit measured
    assert scale.main([*ARGS, "--results", str(tmp_path)]) == 0
    assert not unit_file.exists()
    unit_file.write_text(json.dumps(unit))

    before = run_file.stat().st_mtime_ns
    assert scale.main([*ARGS, "--results", str(tmp_path)]) == 0
    assert run_file.stat().st_mtime_ns == before
