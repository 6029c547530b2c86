"""Structures users' CNNs have that plain chains do not: grouped convolutions, groups whose
members have other widths (concatenations), channel splits by constant sizes, a LayerNorm
whose traced shape must follow surgery, and channel shuffles torch-pruning cannot trace."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import small_data
from torch import nn

import scoring
from benchmarks import coverage
from prune.errors import UsageError
from prune.pipeline.selection import ScoringData, lowest, score_group, select_and_prune
from prune.pipeline.surgery import Surgeon, channels_to_remove

EXAMPLE = torch.zeros(1, 3, 32, 32)


def _head(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 5))


class GroupedNet(nn.Module):
    """conv → grouped conv (4 groups of 2 input channels) → GroupNorm(2 groups) → conv → head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.grouped = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.GroupNorm(2, 8), nn.ReLU())
        self.last = nn.Sequential(nn.Conv2d(8, 6, 1), nn.ReLU())
        self.head = _head(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.last(self.grouped(self.stem(x))))


def test_grouped_conv_loses_the_same_offsets_in_every_group_and_still_runs():
    torch.manual_seed(0)
    model = GroupedNet().eval()
    surgeon = Surgeon(model, EXAMPLE)
    blocks = {g.name: g.blocks for g in surgeon.groups}
    assert blocks == {"stem.0": 4, "grouped.0": 4, "last.0": 1}  # the grouped conv's 4 groups; GroupNorm's 2 divide them
    decisions = select_and_prune(surgeon, scoring.create("l1"), source=None, ratio=0.5, quiet=True)
    for d in decisions[:2]:
        assert len(d.removed) == 4  # round(0.5 · 8) = 4 = one of the 2 channels of each of the 4 blocks
        offsets = [[i % 2 for i in d.removed if i // 2 == b] for b in range(4)]
        assert all(o == offsets[0] and len(o) == 1 for o in offsets), d.removed
    conv = model.grouped[0]
    assert (conv.in_channels, conv.out_channels, conv.groups, conv.weight.shape[1]) == (4, 4, 4, 1)
    assert model.grouped[1].num_channels == 4 and model.grouped[1].num_groups == 2
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_block_selection_averages_each_offset_over_the_blocks():
    scores = torch.tensor([5.0, 1.0, 0.0, 9.0, 4.0, 2.0])  # 2 blocks of 3: offset means 7.0, 2.5, 1.0
    assert lowest(scores, 2, blocks=2) == (2, 5)
    assert lowest(scores, 4, blocks=2) == (1, 2, 4, 5)


@pytest.mark.parametrize("n,channels,blocks,expected", [(5, 16, 4, 4), (6, 16, 4, 8), (15, 16, 4, 12), (3, 8, 8, 0)])
def test_removed_counts_are_whole_blocks_keeping_one_channel_per_block(n, channels, blocks, expected):
    assert channels_to_remove(channels, n / channels, blocks=blocks) == expected


def test_a_conv_feeding_one_input_channel_per_group_is_left_unpruned():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3, groups=4), nn.ReLU(),
                          nn.Conv2d(8, 8, 1), nn.ReLU(), _head(8)).eval()
    surgeon = Surgeon(model, EXAMPLE)
    names = [g.name for g in surgeon.groups]
    assert "0" not in names and names == ["2", "4"]  # conv 0's 4 channels are 4 groups of one channel
    select_and_prune(surgeon, scoring.create("l1"), source=None, ratio=0.5, quiet=True)
    assert model[2].weight.shape[:2] == (4, 1) and model(torch.randn(1, 3, 32, 32)).shape == (1, 5)


class GhostNet(nn.Module):
    """A ghost module (primary conv, depthwise 'cheap' conv, concatenated) added to a shortcut conv
    twice as wide: the shortcut's channels i and i + 4 are both tied to the primary's channel i."""

    def __init__(self) -> None:
        super().__init__()
        self.primary = nn.Conv2d(3, 4, 3, padding=1)
        self.cheap = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.shortcut = nn.Conv2d(3, 8, 1)
        self.head = _head(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.primary(x))
        return self.head(F.relu(torch.cat([a, self.cheap(a)], dim=1) + self.shortcut(x)))


def test_members_of_other_widths_are_scored_on_the_root_channels_they_are_tied_to():
    torch.manual_seed(0)
    model = GhostNet().eval()
    surgeon = Surgeon(model, EXAMPLE)
    (group,) = surgeon.groups
    assert group.names == ("primary", "shortcut") and group.num_channels == 4
    scores = score_group(model, group, scoring.create("l1"), None)
    l1_primary = model.primary.weight.abs().sum(dim=(1, 2, 3))
    l1_shortcut = model.shortcut.weight.abs().sum(dim=(1, 2, 3))
    expected = (l1_primary + l1_shortcut[:4] + l1_shortcut[4:]) / 3  # hand: the mean of the 3 channels each root channel is
    torch.testing.assert_close(scores, expected.float())
    select_and_prune(surgeon, scoring.create("l1"), source=None, ratio=0.5, quiet=True)
    assert (model.primary.out_channels, model.shortcut.out_channels) == (2, 4)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)


class ConcatIntoGroupedNet(nn.Module):
    """A root added to a concatenation of narrower convs (2 + 2 + 4 channels), feeding a grouped conv:
    the group has 2 blocks and members narrower than a block."""

    def __init__(self) -> None:
        super().__init__()
        self.root = nn.Conv2d(3, 8, 3, padding=1)
        self.a, self.b, self.c = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 2, 1), nn.Conv2d(3, 4, 1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.head = _head(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.root(x) + torch.cat([self.a(x), self.b(x), self.c(x)], dim=1))
        return self.head(F.relu(self.grouped(y)))


def test_a_narrow_member_keeps_a_channel_at_the_same_offset_in_every_block():
    torch.manual_seed(0)
    model = ConcatIntoGroupedNet().eval()
    surgeon = Surgeon(model, EXAMPLE)
    assert [(g.name, g.blocks) for g in surgeon.groups] == [("root", 2), ("grouped", 2)]
    with torch.no_grad():  # the lowest l1: root channels 0, 1 (a's two) and 4, 5 (c's first two)
        model.root.weight[[0, 1, 4, 5]] *= 1e-3
        model.a.weight.mul_(1e-3)
    decisions = select_and_prune(surgeon, scoring.create("l1"), source=None, ratio=0.5, quiet=True)
    # removing offsets 0 and 1 of both blocks would empty conv a: offset 0 (its best channel) stays in both blocks
    assert decisions[0].removed == (1, 5) and model.a.out_channels == 1
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)


class SplitNet(nn.Module):
    """A CSP-style split of one conv's output by constant sizes, which torch-pruning cannot rewrite."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(3, 8, 3, padding=1)
        self.left, self.right = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.head = _head(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = F.relu(self.expand(x)).split((4, 4), dim=1)
        return self.head(torch.cat([F.relu(self.left(a)), F.relu(self.right(b))], dim=1))


def test_a_group_whose_surgery_breaks_the_forward_is_left_out():
    model = SplitNet().eval()
    with pytest.warns(UserWarning, match="left unpruned: 1 conv group.*expand"):
        surgeon = Surgeon(model, EXAMPLE)
    assert [g.name for g in surgeon.groups] == ["left", "right"]  # 'expand' would leave split((4, 4)) on 6 channels
    select_and_prune(surgeon, scoring.create("l1"), source=None, ratio=0.5, quiet=True)
    assert model.expand.out_channels == 8 and model(torch.randn(1, 3, 32, 32)).shape == (1, 5)


class GatedNet(nn.Module):
    """A gated linear unit: the first conv's two halves multiply (a * sigmoid(b)), so torch-pruning
    ties its channel i to channel i + 16."""

    def __init__(self) -> None:
        super().__init__()
        self.gated, self.after = nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(16, 12, 3, padding=1)
        self.head = _head(12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.gated(x).chunk(2, dim=1)
        return self.head(F.relu(self.after(a * torch.sigmoid(b))))


def test_a_conv_whose_channels_torch_pruning_ties_to_each_other_is_left_out(monkeypatch):
    with pytest.warns(UserWarning, match=r"left unpruned: 1 conv group.*gated \(torch-pruning ties its channels"):
        surgeon = Surgeon(GatedNet().eval(), EXAMPLE)
    assert [g.name for g in surgeon.groups] == ["after"]
    monkeypatch.setattr(Surgeon, "_ties_own_channels", lambda self, conv: False)  # without the probe:
    surgeon = Surgeon(GatedNet().eval(), EXAMPLE)
    assert surgeon.groups[0].name == "gated"
    with pytest.raises(RuntimeError, match="left gated with .* channels instead of 16"):  # loud, never misreported
        surgeon.prune(surgeon.groups[0], [0, 4, 5, 6, 7, 8, 9, 10, 11, 15, 19, 25, 27, 29, 30, 31])


class AttentionPooled(nn.Module):
    """Attention pooling written as an einsum over channels and positions: torch-pruning's walk of the
    conv's channels cycles through the reshapes without end."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.attend = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 1, 1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = F.relu(self.conv(x))
        weights = torch.softmax(self.attend(maps).flatten(2), -1).view(maps.shape[0], 1, *maps.shape[2:])
        return self.fc(torch.einsum("nchw,nkhw->nc", maps, weights))


def test_a_walk_that_does_not_end_is_refused_in_one_line_not_a_hang():
    with pytest.raises(UsageError, match=r"conv \(torch-pruning's walk of its channels passed a reshape \d+ times in a "
                                         r"graph of \d+ nodes: it cycles without end"):
        Surgeon(AttentionPooled().eval(), torch.zeros(1, 3, 8, 8))


class Recurrent(nn.Module):
    """A CRNN: the second conv's map averaged over height, read as a sequence by a GRU."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 12, 3, stride=(4, 1), padding=1)
        self.rnn, self.fc = nn.GRU(12, 8, batch_first=True), nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sequence = F.relu(self.second(F.relu(self.first(x)))).mean(2).permute(0, 2, 1)
        return self.fc(self.rnn(sequence)[0][:, -1])


def test_a_conv_torch_pruning_cannot_follow_is_left_out_and_the_rest_prunes():
    model = Recurrent().eval()
    with pytest.warns(UserWarning, match=r"second \(torch-pruning cannot follow its channels: IndexError"):
        surgeon = Surgeon(model, EXAMPLE)
    assert [g.name for g in surgeon.groups] == ["first"]
    select_and_prune(surgeon, scoring.create("l1"), source=None, ratio=0.5, quiet=True)
    assert model.first.out_channels == 8 and model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


class LayerNorm2d(nn.LayerNorm):
    """timm's channels-first LayerNorm: reads `normalized_shape` in forward (a constant in a traced graph)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


def test_units_behind_a_layernorm_are_read_after_an_earlier_layer_is_pruned():
    torch.manual_seed(0)
    # no activation after the norms: each unit is the norm's functional output, read by running the traced graph
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), LayerNorm2d(8),
                          nn.Conv2d(8, 8, 3, padding=1), LayerNorm2d(8), _head(8)).eval()
    data = small_data(classes=2, per_class=4)
    source = ScoringData(data=data, classes=[0, 1], per_class=3, seed=0)
    decisions = select_and_prune(Surgeon(model, EXAMPLE), scoring.create("entropy"), source, ratio=0.5,
                                 quiet=True)
    assert [d.channels_after for d in decisions] == [4, 4] and model[3].normalized_shape == (4,)


def test_a_model_torch_pruning_cannot_trace_is_refused_in_one_line():
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=5).eval()
    with pytest.raises(UsageError, match="torch-pruning cannot trace ShuffleNetV2") as err:
        Surgeon(model, EXAMPLE)
    assert "\n" not in str(err.value)


def test_a_pruned_copy_of_a_grouped_network_removes_whole_blocks():
    surgeon = Surgeon(GroupedNet().eval(), EXAMPLE)
    twin = surgeon.pruned_copy([5, 6, 3])  # what a FLOPs budget counts: 5 and 6 are not multiples of the 4 blocks
    assert (twin.stem[0].out_channels, twin.grouped[0].out_channels, twin.last[0].out_channels) == (4, 4, 3)
    assert twin(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    assert surgeon.model.stem[0].out_channels == 8  # the original is untouched


def test_no_speed_skips_the_throughput_and_says_so(tmp_path, capsys):
    import json

    from helpers import quick_run

    from prune.cli import main

    out = tmp_path / "out"
    flags = [*quick_run(tmp_path), "--classes", "2", "--samples-per-class", "2", "--no-finetune", "--quiet"]
    assert main([*flags, "--no-speed", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["before"]["img_per_s"] is None and report["after"]["throughput"] is None
    assert "Throughput not measured" in (out / "report.md").read_text()
    capsys.readouterr()
    assert main([*flags, "--no-speed", "--target-speedup", "2", "--out", str(tmp_path / "other")]) == 2
    assert "leave out --no-speed" in capsys.readouterr().err and not (tmp_path / "other").exists()


def test_a_model_that_checks_its_state_dict_version_reloads(tmp_path):
    """torchvision's MNASNet refuses a state_dict without its version metadata: load_pruned gives it."""
    result = coverage.one("mnasnet0_5", "l1", coverage.make_folder(tmp_path / "data"))
    assert result["outcome"] == "pruned", result


@pytest.mark.slow
@pytest.mark.parametrize("model", coverage.all_models())
def test_every_zoo_model_prunes_or_is_refused_in_one_line(model, tmp_path):
    """The coverage benchmark's runs (hours in all): no model ends in a failure with any scorer kind."""
    data = coverage.make_folder(tmp_path / "data")
    for scorer in coverage.SCORERS:
        result = coverage.one(model, scorer, data)
        assert result["outcome"] in ("pruned", "refused"), result
        if result["outcome"] == "refused":
            assert result["lines"] == 1 and "internal error" not in result["why"]


def test_a_vision_transformer_is_refused_saying_its_patch_embedding_cannot_be_pruned():
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=8,
                                               mlp_dim=16, num_classes=5).eval()
    with pytest.raises(UsageError, match="none of the model's 1 conv group.*patch embedding") as err:
        Surgeon(vit, EXAMPLE)
    assert "\n" not in str(err.value)


def test_a_model_that_asserts_its_input_size_is_refused_naming_the_size(tmp_path, capsys):
    from helpers import image_folder

    from prune.cli import main

    data = image_folder(tmp_path / "data", classes=2, train=3, val=1, size=8)
    argv = ["--model", "timm:vit_tiny_patch16_224", "--data", str(data), "--input-size", "32", "--classes", "2",
            "--samples-per-class", "2", "--no-finetune", "--quiet", "--out", str(tmp_path / "out")]
    assert main(argv) == 2  # timm's patch embedding asserts the input side (an AssertionError, not a RuntimeError)
    err = capsys.readouterr().err.strip()
    assert "cannot run on 32x32 images" in err and "\n" not in err and not (tmp_path / "out").exists()


class FlattenNet(nn.Module):
    """conv → conv → flatten into a Linear: the second conv's indices are flattened with its 32² positions."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 32 * 32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.second(F.relu(self.first(x)))).flatten(1))


def test_a_root_whose_flattened_indices_pass_the_limit_is_left_out_and_the_library_restored(monkeypatch):
    import torch_pruning as tp

    from prune.pipeline import surgery

    flatten_call = tp.dependency.index_mapping._FlattenIndexMapping.__call__
    assert [g.name for g in Surgeon(FlattenNet().eval(), EXAMPLE).groups] == ["first", "second"]  # 16 × 1,024 indices
    monkeypatch.setattr(surgery, "INDEX_LIMIT", 16 * 1024 - 1)
    with pytest.warns(UserWarning, match=r"left unpruned: 1 conv group.*second \(a flatten would make torch-pruning carry more than 16,383"):
        surgeon = Surgeon(FlattenNet().eval(), EXAMPLE)
    assert [g.name for g in surgeon.groups] == ["first"]
    assert tp.dependency.index_mapping._FlattenIndexMapping.__call__ is flatten_call
    monkeypatch.setattr(surgery, "INDEX_LIMIT", 8 * 1024 - 1)  # no conv left: refused in one line
    only_flattened = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 32 * 32, 5)).eval()
    with pytest.raises(UsageError, match="none of the model's 1 conv group.*more than 8,191 channel indices") as err:
        Surgeon(only_flattened, EXAMPLE)
    assert "\n" not in str(err.value)
