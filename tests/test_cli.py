"""The main job end to end on the embedded default (small settings), in-process."""

import json
import os
import subprocess
import sys
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


PLUGIN = '''
import torch
from torch import nn
import scoring
from prune.zoo.registry import register_model

@register_model("plugnet", input_size=16, num_classes=2, mean=(0.5,) * 3, std=(0.25,) * 3)
def plugnet(num_classes):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))

@scoring.register("plug-l2", needs_data=False, description="L2 norm of each filter")
class L2(scoring.Scorer):
    def compute(self):
        return self.layer.conv.weight.detach().flatten(1).norm(dim=1).float().cpu()
'''


def test_a_module_of_the_users_registers_a_model_and_a_scorer_for_the_cli(tmp_path):
    """`python -m prune --import plug` from the folder of plug.py: its model and scorer are names."""
    from helpers import ROOT, image_folder

    (tmp_path / "plug.py").write_text(PLUGIN)
    data = image_folder(tmp_path / "data", classes=2, train=2, val=2, size=16)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "prune", "--model", "plugnet", "--scorer", "plug-l2", "--data", str(data),
               "--classes", "2", "--samples-per-class", "2", "--no-finetune", "--quiet", "--out", "out"]
    refused = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "--import" in refused.stderr and len(refused.stderr.splitlines()) == 1
    done = subprocess.run([*command, "--import", "plug"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["settings"]["model"] == "plugnet" and report["settings"]["scorer"] == "plug-l2"
    assert [layer["channels_after"] for layer in report["layers"]] == [4, 4]


@pytest.mark.parametrize(("source", "expected"), [("x = (\n", "plug.py:1: SyntaxError"),
                                                   ("\n\nraise RuntimeError('no\\nGPU')\n", "plug.py:3: RuntimeError: no GPU"),
                                                   ("import not_installed_here\n", "plug.py:1: ModuleNotFoundError"),
                                                   ("import torch\ntorch.load('absent.pt')\n", "plug.py:2: FileNotFoundError"),
                                                   ("import sys\n\nsys.exit(3)\n", "plug.py:3 (exit code 3)"),
                                                   ("import argparse\nargparse.ArgumentParser().parse_args(['--lr'])\n",
                                                    "error: unrecognized arguments: --lr): a script's own")])
def test_a_module_that_fails_to_import_is_one_line(tmp_path, monkeypatch, capsys, source, expected):
    (tmp_path / "plug.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["--import", "plug", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --import plug") and expected in err and "\n" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["not_a_module_here", "not_a_package_here.sub", ".relative", ""])
def test_a_module_that_is_not_there_is_one_line(tmp_path, capsys, name):
    assert main(["--import", name, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --import {name}: no such module") and "\n" not in err
