"""benchmarks.memory: the layer clock ends a selection early (its spill goes with it), a failed scorer
process is recorded with its exit code, and a tiny end-to-end run writes one file per scorer
(weight-only: every layer; needs data: `--layers`; tp-bnscale refused) that a restart skips."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import scoring
from benchmarks import memory
from prune import write_json
from prune.pipeline.selection import select_and_prune
from prune.pipeline.surgery import Surgeon
from prune.zoo.embedded_model import EmbeddedVGG

TINY = ["--input-size", "32", "--classes", "2", "--samples-per-class", "2", "--layers", "1"]


def test_the_clock_stops_selection_after_its_layers_and_the_spill_folder_goes(tmp_path: Path, one_thread) -> None:
    s = memory.Settings(classes=2, per_class=4, input_size=16)
    model = EmbeddedVGG(num_classes=2, cfg=(8, 12, "M", 16, 16), batch_norm=False).eval()
    surgeon = Surgeon(model, torch.zeros(1, 3, 16, 16))
    layers, spilled = [], []

    def on_layer(layer: dict) -> None:
        layers.append(layer)
        spilled.append(any(tmp_path.iterdir()))

    clock = memory.LayerClock(on_layer, stop_after=2)
    with pytest.raises(memory._Stop):
        select_and_prune(surgeon, scoring.create("entropy"), memory.source_of(s), ratio=0.5, store=clock,
                         refit=clock.end_layer, quiet=True, cache_bytes=0, spill_bytes=1 << 30, spill_dir=tmp_path)
    assert [(r["name"], r["channels"]) for r in layers] == [(g.name, c) for g, c in zip(surgeon.groups, (8, 12))]
    assert all(r["layer_s"] >= r["scoring_s"] > 0 and r["peak_rss_bytes"] > 0 for r in layers)
    assert spilled[-1] and not any(tmp_path.iterdir())  # the cache spilled, and was closed by the stop
    assert [c.out_channels for c in model.modules() if isinstance(c, torch.nn.Conv2d)] == [4, 6, 16, 16]


def test_the_deepest_protocol_prunes_the_earlier_layers_on_placeholders_and_clocks_the_last(tmp_path: Path,
                                                                                          one_thread) -> None:
    """`--deepest 1` on a 4-conv chain: the first three groups are pruned on placeholder scores (the
    first half of their channels removed, not recorded), only the last is scored and recorded,
    and its files go under memory-deepest."""
    s = memory.Settings(classes=2, per_class=2, input_size=16, deepest=1)
    model = EmbeddedVGG(num_classes=2, cfg=(8, 12, "M", 16, 16), batch_norm=False).eval()
    surgeon = Surgeon(model, torch.zeros(1, 3, 16, 16))
    convs = [c for c in model.modules() if isinstance(c, torch.nn.Conv2d)]
    first = convs[0].weight[4:].clone()
    layers: list[dict] = []
    clock = memory.LayerClock(layers.append, stop_after=1, skip=3)
    select_and_prune(surgeon, scoring.create("entropy"), memory.source_of(s), ratio=0.5, store=clock,
                     refit=clock.end_layer, quiet=True)
    with pytest.raises(memory._Stop):
        clock.end_layer()  # after the last group, as `measure` calls it
    assert [r["name"] for r in layers] == [surgeon.groups[3].name]
    assert [c.out_channels for c in convs] == [4, 6, 8, 8] and torch.equal(convs[0].weight, first)
    assert memory.folder_of(tmp_path, False, s.deepest).name == "memory-deepest"
    assert "deepest" not in memory.recorded(memory.Settings()) and memory.recorded(s)["deepest"] == 1


def test_the_summary_counts_the_last_layers_measured_under_the_same_settings(tmp_path: Path) -> None:
    """memory.json lists the --deepest rows made under the same settings (not others), and one of
    them over the goal makes `all_within_goal` false."""
    s = memory.Settings(classes=2, per_class=2, input_size=32, layers=1)
    first = {"scorer": "entropy", "settings": memory.recorded(s), "outcome": "complete", "layers_total": 13,
             "baseline_rss_bytes": memory.GIB, "peak_rss_bytes": memory.GIB, "layers": []}
    write_json(memory.folder_of(tmp_path, False) / "entropy.json", first)
    deep = memory.folder_of(tmp_path, False, deepest=1)
    for name, settings, peak in (("entropy", replace(s, layers=None, deepest=1), 3),
                                 ("nisp", replace(s, input_size=64, deepest=1), 1)):
        write_json(deep / f"{name}.json", {**first, "scorer": name, "settings": memory.recorded(settings),
                                           "peak_rss_bytes": peak * memory.GIB})
    result = memory.summary(s, ["entropy", "nisp"], memory.folder_of(tmp_path, False), deep)
    assert [(r["scorer"], r["peak_rss_gib"]) for r in result["deepest"]] == [("entropy", 3.0)]
    assert memory.summary(s, ["entropy"], memory.folder_of(tmp_path, False))["all_within_goal"] is True
    assert memory.summary(s, ["entropy"], memory.folder_of(tmp_path, False), deep)["all_within_goal"] is False
    assert "on the last layers" in memory.markdown(result) and "entropy 3.00 GiB" in memory.markdown(result)


def test_a_failed_process_is_recorded_with_its_exit_code_and_its_peak_so_far(tmp_path: Path, monkeypatch) -> None:
    s = memory.Settings(classes=2, per_class=2, input_size=32, layers=1)
    path = memory.folder_of(tmp_path, False) / "entropy.json"
    layer = {"name": "features.0", "channels": 64, "scoring_s": 1.0, "layer_s": 2.0, "peak_rss_bytes": 3 * memory.GIB}
    write_json(path, {"scorer": "entropy", "settings": memory.recorded(s), "outcome": "incomplete",
                             "layers_total": 13, "baseline_rss_bytes": memory.GIB, "peak_rss_bytes": 3 * memory.GIB,
                             "layers": [layer]})
    monkeypatch.setattr(memory, "child_argv", lambda *_: [sys.executable, "-c",
                                                          "import sys; sys.stderr.write('boom\\n'); sys.exit(3)"])
    entry = memory.run_scorer("entropy", s, tmp_path, False)
    assert (entry["outcome"], entry["exit"], entry["error"], entry["layers"]) == ("failed", 3, "boom", [layer])
    assert not memory.finished(path, memory.recorded(s))

    argv = ["--scorers", "entropy", *TINY, "--results", str(tmp_path), "--report-only"]
    assert memory.main(argv) == 0
    (row,) = json.loads((tmp_path / "memory.json").read_text())["scorers"]
    assert (row["outcome"], row["exit"], row["peak_rss_gib"], row["within_goal"]) == ("failed", 3, 3.0, False)
    assert row["seconds_per_layer"] == {"features.0": 2.0}
    assert "entropy: failed (exit 3): boom" in (tmp_path / "memory.md").read_text()
    assert memory.main([*argv[:1], "entropy", "l1", *argv[2:]]) == 0  # l1 never ran: a missing row, not left out
    summary = json.loads((tmp_path / "memory.json").read_text())
    assert [(r["scorer"], r["outcome"]) for r in summary["scorers"]] == [("entropy", "failed"), ("l1", "missing")]
    assert summary["all_within_goal"] is False


@pytest.mark.slow
def test_every_scorer_gets_a_file_and_a_restart_skips_the_finished_ones(tmp_path: Path) -> None:
    argv = ["--scorers", "l1", "entropy", "tp-bnscale", *TINY, "--results", str(tmp_path)]
    assert memory.main(argv) == 0
    folder = tmp_path / "memory"
    l1, entropy, bnscale = (json.loads((folder / f"{n}.json").read_text()) for n in ("l1", "entropy", "tp-bnscale"))
    assert (l1["outcome"], len(l1["layers"]), l1["settings"]["layers"]) == ("complete", 13, None)  # weight-only: all
    assert (entropy["outcome"], len(entropy["layers"]), entropy["settings"]["layers"]) == ("complete", 1, 1)
    for run in (l1, entropy):
        assert run["peak_rss_bytes"] >= run["layers"][-1]["peak_rss_bytes"] >= run["baseline_rss_bytes"] > 0
    assert entropy["peak_rss_bytes"] > entropy["baseline_rss_bytes"]  # scoring a layer from images costs memory
    assert bnscale["outcome"] == "refused" and "BatchNorm" in bnscale["reason"] and bnscale["layers"] == []

    summary = json.loads((tmp_path / "memory.json").read_text())
    rows = {r["scorer"]: r for r in summary["scorers"]}
    assert (rows["l1"]["layers_covered"], rows["entropy"]["layers_covered"]) == ("13 of 13", "1 of 13")
    assert list(rows["entropy"]["seconds_per_layer"]) == ["features.0"]
    assert rows["entropy"]["peak_rss_gib"] == round(entropy["peak_rss_bytes"] / memory.GIB, 3)
    assert rows["tp-bnscale"]["outcome"] == "refused" and "peak_rss_gib" not in rows["tp-bnscale"]
    assert summary["chunking_exact"]["equal"] is True and summary["settings"]["cache_bytes"] > 0
    text = (tmp_path / "memory.md").read_text()
    assert "| entropy | complete | 1 of 13 |" in text and "tp-bnscale: refused: " in text

    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert memory.main(argv) == 0
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
