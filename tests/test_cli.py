"""The main job end to end on the embedded default (small settings), in-process."""

import json
from pathlib import Path

import pytest
import torch

import prune
from prune.cli import main
from prune.zoo.data import load_data

SMALL = ["--classes", "3", "--samples-per-class", "12", "--epochs", "1", "--quiet"]


@pytest.fixture(scope="module")
def entropy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    assert main(["--ratio", "0.5", "--scorer", "entropy", "--out", str(out), *SMALL]) == 0
    return out


def test_report_has_every_field(entropy_run):
    report = json.loads((entropy_run / "report.json").read_text())
    for side in ("before", "after"):
        for key in ("params", "macs", "flops", "top1", "top5", "balanced_accuracy", "img_per_s", "device"):
            assert key in report[side], (side, key)
        assert report[side]["flops"] == 2 * report[side]["macs"]
    assert report["after"]["params"] < report["before"]["params"]
    assert 0.0 <= report["after"]["top1"] <= 1.0
    assert report["settings"]["scorer"] == "entropy" and report["settings"]["ratio"] == 0.5
    assert report["finetune_losses"] and len(report["finetune_losses"]) == 1
    assert set(report["timings"]) >= {"select_and_prune", "finetune", "evaluate_after"}
    assert (entropy_run / "report.md").read_text().startswith("# Pruning report")


def test_pruned_model_has_the_reported_channels_and_reloads(entropy_run):
    report = json.loads((entropy_run / "report.json").read_text())
    model = prune.load_pruned(entropy_run / "model.pt")
    for layer in report["layers"]:
        conv = model.get_submodule(layer["name"])
        assert conv.out_channels == layer["channels_after"] == layer["channels_before"] - len(layer["removed"])
        assert layer["channels_after"] == layer["channels_before"] - round(0.5 * layer["channels_before"])
    scores = json.loads((entropy_run / "scores.json").read_text())
    assert [len(v) for v in scores.values()] == [layer["channels_before"] for layer in report["layers"]]
    data = load_data(None)
    x = torch.stack([data.val[i][0] for i in range(64)])
    labels = torch.stack([data.val[i][1] for i in range(64)])
    with torch.no_grad():
        first, second = model(x), prune.load_pruned(entropy_run / "model.pt")(x)
    assert torch.equal(first, second)
    assert report["after"]["params"] == sum(p.numel() for p in model.parameters())
    # the saved model is the one evaluated: its accuracy on a slice is consistent with the report
    assert (first.argmax(1) == labels).float().mean() > 0.2


def test_removed_channels_are_the_lowest_scores(entropy_run):
    report = json.loads((entropy_run / "report.json").read_text())
    scores = json.loads((entropy_run / "scores.json").read_text())
    for layer in report["layers"]:
        s = torch.tensor(scores[layer["name"]])
        kept = sorted(set(range(len(s))) - set(layer["removed"]))
        assert s[list(layer["removed"])].max() <= s[kept].min()


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--weights", "--data", "--ratio", "--scorer", "--classes", "--samples-per-class",
                 "--schedule", "--epochs", "--lr", "--no-finetune", "--batch-size", "--input-size", "--device",
                 "--seed", "--out", "--overwrite", "--quiet"):
        assert flag in text


def test_not_a_topoprune_checkpoint_is_refused(tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="not a topoprune checkpoint"):
        prune.load_pruned(path)


def test_a_leading_tilde_in_out_is_the_home_folder_even_unexpanded_by_the_shell():
    from prune.cli import build_parser

    assert build_parser().parse_args(["--out=~/runs/x"]).out == Path.home() / "runs" / "x"
    assert build_parser().parse_args(["--out", "a/~b"]).out == Path("a/~b")  # only a leading one
