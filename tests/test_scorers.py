"""Baseline scorers (l1, fpgm, apoz, selectivity, nisp, random) against independent computations,
and the contract every registered scorer keeps (parametrised over `list_scorers()`).

Every expected value is computed here by explicit loops or hand-written numpy algebra on tiny
hand-made models, never by calling the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from scoring import ClassBatch, LayerSpec, create, hooks, list_scorers, nisp, scorer_info
from scoring.nisp import average_ranks, inf_fs_scores, propagate_scores

OWNED = ["apoz", "fpgm", "l1", "nisp", "random", "selectivity"]


# ---------------------------------------------------------------- helpers


def tiny_net(seed: int = 0, *, batchnorm: bool = False) -> nn.Sequential:
    """Conv(3→4), [BatchNorm(4) with γ = 0.5, 1, 1.5, 2,] ReLU, MaxPool(2), Flatten,
    Linear(64→6), ReLU, Linear(6→3); 8×8 input."""
    torch.manual_seed(seed)
    bn = [nn.BatchNorm2d(4)] if batchnorm else []
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), *bn, nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(4 * 4 * 4, 6), nn.ReLU(), nn.Linear(6, 3),
    ).eval()  # fmt: skip
    if batchnorm:
        with torch.no_grad():
            net[1].weight.copy_(torch.tensor([0.5, 1.0, 1.5, 2.0]))
    return net


def units(net: nn.Sequential, images: torch.Tensor) -> torch.Tensor:
    """The units of net[0]: the net's output up to its first ReLU."""
    first_relu = next(i for i, m in enumerate(net) if isinstance(m, nn.ReLU))
    with torch.no_grad():
        return net[: first_relu + 1](images)


def class_batches(net: nn.Sequential, classes: int = 3, n: int = 6, seed: int = 1) -> list:
    """One ClassBatch per class, activations = the units of net[0]."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for k in range(classes):
        images = torch.randn(n, 3, 8, 8, generator=gen) + 0.3 * k
        batches.append(ClassBatch(class_index=k, images=images, activations=units(net, images)))
    return batches


def layer_of(net: nn.Sequential) -> LayerSpec:
    return LayerSpec(model=net, conv=net[0], name="0")


def acts_batch(k: int, acts: torch.Tensor) -> ClassBatch:
    return ClassBatch(class_index=k, images=torch.zeros(acts.shape[0], 3, 4, 4), activations=acts)


# ---------------------------------------------------------------- weight scorers


def test_l1_on_hand_made_weights() -> None:
    conv = nn.Conv2d(2, 3, 2)
    values = [
        [[[1, -2], [0, 3]], [[-1, 0], [0, 0]]],  # 7
        [[[0, 0], [0, 0]], [[0, 0], [0, 0]]],  # 0
        [[[0.5, 0.5], [-0.5, 0.5]], [[1, 1], [1, -1]]],  # 6
    ]
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(values, dtype=torch.float32))
        conv.bias.fill_(100.0)  # the bias never counts
    scores = create("l1")(LayerSpec(model=conv, conv=conv, name="conv"))
    assert scores.tolist() == [7.0, 0.0, 6.0]


def test_fpgm_matches_pairwise_distance_loops() -> None:
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 5, 3)
    w = conv.weight.detach().double().reshape(5, -1).tolist()
    expected = []
    for i in range(5):
        total = 0.0
        for j in range(5):
            total += math.sqrt(sum((a - b) ** 2 for a, b in zip(w[i], w[j])))
        expected.append(total)
    scores = create("fpgm")(LayerSpec(model=conv, conv=conv, name="conv"))
    torch.testing.assert_close(scores, torch.tensor(expected, dtype=torch.float32))


# ---------------------------------------------------------------- activation scorers


def test_apoz_matches_counting_loops() -> None:
    gen = torch.Generator().manual_seed(5)
    batches = [torch.relu(torch.randn(n, 3, 4, 4, generator=gen)) for n in (2, 3)]
    batches[1][:, 2] = 0.0  # a dead unit in one class
    batches[0][0, 1, 0, 0] = -1.0  # negatives count as zeros too
    zeros, total = [0, 0, 0], 0
    for acts in batches:
        n, c, h, w = acts.shape
        total += n * h * w
        for i in range(n):
            for ch in range(c):
                for y in range(h):
                    for x in range(w):
                        zeros[ch] += float(acts[i, ch, y, x]) <= 0.0
    conv = nn.Conv2d(3, 3, 1)
    layer = LayerSpec(model=conv, conv=conv, name="c")
    scores = create("apoz")(layer, [acts_batch(k, a) for k, a in enumerate(batches)])
    torch.testing.assert_close(scores, torch.tensor([1 - z / total for z in zeros]))


def test_selectivity_matches_per_class_means() -> None:
    gen = torch.Generator().manual_seed(7)
    per_class = [torch.relu(torch.randn(4, 3, 2, 2, generator=gen)) for _ in range(3)]
    per_class[1][:, 0] += 5.0  # unit 0 prefers class 1
    for acts in per_class:
        acts[:, 2] = 0.0  # unit 2 silent everywhere: 0/0 → 0
    expected = []
    for ch in range(3):
        means = []
        for acts in per_class:
            image_means = [float(acts[i, ch].sum()) / 4 for i in range(acts.shape[0])]
            means.append(sum(image_means) / len(image_means))
        top = max(means)
        rest = (sum(means) - top) / 2
        expected.append(0.0 if top + rest == 0 else (top - rest) / (top + rest))
    # class 1 arrives in two batches; they are pooled
    batches = [acts_batch(0, per_class[0]), acts_batch(1, per_class[1][:1])]
    batches += [acts_batch(2, per_class[2]), acts_batch(1, per_class[1][1:])]
    conv = nn.Conv2d(3, 3, 1)
    scores = create("selectivity")(LayerSpec(model=conv, conv=conv, name="c"), batches)
    torch.testing.assert_close(scores, torch.tensor(expected, dtype=torch.float32))
    assert scores[2] == 0.0 and scores[0] == scores.max()


def test_selectivity_needs_two_classes() -> None:
    conv = nn.Conv2d(3, 3, 1)
    with pytest.raises(ValueError, match="at least 2 classes"):
        create("selectivity")(
            LayerSpec(model=conv, conv=conv, name="c"), [acts_batch(0, torch.ones(2, 3, 2, 2))]
        )


def test_activation_scorers_reject_wrong_shape_and_nan() -> None:
    conv = nn.Conv2d(3, 4, 1)
    layer = LayerSpec(model=conv, conv=conv, name="c")
    for name in ("apoz", "selectivity"):
        with pytest.raises(ValueError, match="activations must be"):
            create(name)(layer, [acts_batch(0, torch.ones(2, 3, 2, 2))])
        with pytest.raises(ValueError, match="NaN"):
            create(name)(layer, [acts_batch(0, torch.full((2, 4, 2, 2), float("nan")))])


# ---------------------------------------------------------------- Inf-FS


def numpy_inf_fs(x: np.ndarray, alpha: float, spearman: bool) -> tuple[np.ndarray, np.ndarray]:
    """Roffo et al. 2015 by hand: (scores by matrix inverse, scores by the power series)."""
    f = x.shape[1]
    data = np.argsort(np.argsort(x, axis=0), axis=0).astype(float) if spearman else x
    with np.errstate(invalid="ignore"):
        corr = np.nan_to_num(np.corrcoef(data, rowvar=False))  # constant feature: corr 0
    std = x.std(axis=0, ddof=1)
    sigma = np.array([[max(std[i], std[j]) for j in range(f)] for i in range(f)])
    sigma = (sigma - sigma.min()) / (sigma.max() - sigma.min())
    a = alpha * sigma + (1 - alpha) * (1 - np.abs(corr))
    r = 0.9 / np.max(np.abs(np.linalg.eigvals(a)))
    by_inverse = (np.linalg.inv(np.eye(f) - r * a) - np.eye(f)).sum(axis=1)
    series, term = np.zeros((f, f)), np.eye(f)
    for _ in range(600):  # 0.9**600 ≈ 1e-28
        term = term @ (r * a)
        series += term
    return by_inverse, series.sum(axis=1)


@pytest.mark.parametrize("correlation", ["spearman", "pearson"])
def test_inf_fs_three_features_by_hand(correlation: str) -> None:
    x = np.array(
        [[0.1, 2.0, -1.0], [0.4, 1.0, 0.5], [0.2, 3.5, 0.0], [0.9, 0.5, 2.0], [0.3, 2.2, 1.1]]
    )
    by_inverse, by_series = numpy_inf_fs(x, alpha=0.5, spearman=correlation == "spearman")
    np.testing.assert_allclose(by_inverse, by_series, rtol=1e-9)
    got = inf_fs_scores(torch.tensor(x), alpha=0.5, correlation=correlation)
    np.testing.assert_allclose(got.numpy(), by_series, rtol=1e-9)


def test_average_ranks_ties() -> None:
    x = torch.tensor([[3.0, 0.0], [1.0, 0.0], [3.0, 0.0], [2.0, 5.0]])
    expected = torch.tensor([[3.5, 2.0], [1.0, 2.0], [3.5, 2.0], [2.0, 4.0]], dtype=torch.float64)
    torch.testing.assert_close(average_ranks(x), expected)


# ---------------------------------------------------------------- NISP propagation


FLOAT32_RTOL = 1e-6
"""NISP propagates in float32 (float64 where float32 overflows): its relative error allowed."""


def linear_back(weight: torch.Tensor, s: list[float]) -> list[float]:
    """s_in[j] = Σ_i |W[i, j]| s_out[i] by loops."""
    w = weight.detach().double()
    return [sum(abs(float(w[i, j])) * s[i] for i in range(w.shape[0])) for j in range(w.shape[1])]


def pool_back(s: list, channels: int, size: int, k: int, stride: int, pad: int, out: int) -> list:
    """Each input position of a max-pool window receives the window's score (sum pooling)."""
    grid = [[[0.0] * size for _ in range(size)] for _ in range(channels)]
    for c in range(channels):
        for oy in range(out):
            for ox in range(out):
                for dy in range(k):
                    for dx in range(k):
                        y, x = oy * stride - pad + dy, ox * stride - pad + dx
                        if 0 <= y < size and 0 <= x < size:
                            grid[c][y][x] += s[c][oy][ox]
    return grid


def conv_back(weight: torch.Tensor, s: list, size: int, pad: int) -> list:
    """Transposed |W| conv (stride 1): loop over output positions and kernel taps."""
    w = weight.detach().double().abs()
    c_out, c_in, k, _ = w.shape
    grid = [[[0.0] * size for _ in range(size)] for _ in range(c_in)]
    for co in range(c_out):
        for oy in range(size):
            for ox in range(size):
                for ci in range(c_in):
                    for ky in range(k):
                        for kx in range(k):
                            y, x = oy - pad + ky, ox - pad + kx
                            if 0 <= y < size and 0 <= x < size:
                                grid[ci][y][x] += float(w[co, ci, ky, kx]) * s[co][oy][ox]
    return grid


def reshape(flat: list[float], c: int, h: int) -> list:
    return [[[flat[(ch * h + y) * h + x] for x in range(h)] for y in range(h)] for ch in range(c)]


def channel_sums(grid: list) -> torch.Tensor:
    return torch.tensor([sum(map(sum, g)) for g in grid], dtype=torch.float64)


def test_nisp_propagates_through_maxpool_and_linear() -> None:
    net = tiny_net(seed=11)
    s = torch.rand(6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    flat = linear_back(net[4].weight, s.tolist())  # [64] = 4 × 4 × 4 after pooling
    grid = pool_back(reshape(flat, 4, 4), channels=4, size=8, k=2, stride=2, pad=0, out=4)
    got = propagate_scores(layer_of(net), s, torch.Size([1, 3, 8, 8]))
    torch.testing.assert_close(got, channel_sums(grid), rtol=FLOAT32_RTOL, atol=0)


def test_nisp_propagates_through_conv_bn_and_overlapping_pool() -> None:
    torch.manual_seed(12)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1), nn.Flatten(),
        nn.Linear(4 * 3 * 3, 5), nn.ReLU(), nn.Dropout(), nn.Linear(5, 2),
    ).eval()  # fmt: skip
    bn = net[3]
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0]))
        bn.running_var.copy_(torch.tensor([1.0, 4.0, 0.25, 2.0]))
        bn.running_mean.copy_(torch.tensor([5.0, -1.0, 0.0, 2.0]))  # ignored: no shift
    s = torch.rand(5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    flat = linear_back(net[7].weight, s.tolist())
    grid = pool_back(reshape(flat, 4, 3), channels=4, size=5, k=3, stride=2, pad=1, out=3)
    for c in range(4):
        scale = abs(float(bn.weight[c].detach())) / math.sqrt(float(bn.running_var[c]) + bn.eps)
        grid[c] = [[v * scale for v in row] for row in grid[c]]
    grid = conv_back(net[2].weight, grid, size=5, pad=1)
    layer = LayerSpec(model=net, conv=net[0], name="0")
    got = propagate_scores(layer, s, torch.Size([1, 2, 5, 5]))
    torch.testing.assert_close(got, channel_sums(grid), rtol=FLOAT32_RTOL, atol=0)


class _Residual(nn.Module):
    """conv0 → ReLU → (identity + conv1) → global avg pool → Linear → ReLU → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 4, 1)
        self.relu = nn.ReLU()
        self.conv1 = nn.Conv2d(4, 4, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(4, 5)
        self.fc2 = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.conv0(x))
        h = torch.relu(y + self.conv1(y))  # functional ReLU passes scores (positive input)
        return self.fc2(self.relu(self.fc1(torch.flatten(self.pool(h), 1))))


def test_nisp_residual_addition_feeds_both_branches() -> None:
    torch.manual_seed(13)
    net = _Residual().eval()
    s = torch.rand(5, dtype=torch.float64)
    s_h = net.fc1.weight.detach().double().abs().T @ s  # per channel of h (mean pool: /HW·HW)
    w1 = net.conv1.weight.detach().double().abs().reshape(4, 4)
    expected = s_h + w1.T @ s_h
    got = propagate_scores(LayerSpec(model=net, conv=net.conv0, name="conv0"), s, (1, 3, 3, 3))
    torch.testing.assert_close(got, expected, rtol=FLOAT32_RTOL, atol=0)


def test_nisp_overflowing_float32_propagates_in_float64() -> None:
    net = tiny_net(seed=14)
    with torch.no_grad():
        net[4].weight.mul_(2.0**100)  # s_in ~ 2^100 |W| s: fine in float64, inf in float32
    s = torch.rand(6, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2.0**60
    flat = linear_back(net[4].weight, s.tolist())
    grid = pool_back(reshape(flat, 4, 4), channels=4, size=8, k=2, stride=2, pad=0, out=4)
    got = propagate_scores(layer_of(net), s, torch.Size([1, 3, 8, 8]))
    assert torch.isfinite(got).all() and got.max() > torch.finfo(torch.float32).max
    torch.testing.assert_close(got, channel_sums(grid))  # float64: default tolerance


def test_nisp_float32_near_underflow_propagates_in_float64() -> None:
    net = tiny_net(seed=14)
    with torch.no_grad():
        net[4].weight.mul_(2.0**-146)  # float32 scores would be subnormal: precision lost
    s = torch.rand(6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    flat = linear_back(net[4].weight, s.tolist())
    grid = pool_back(reshape(flat, 4, 4), channels=4, size=8, k=2, stride=2, pad=0, out=4)
    got = propagate_scores(layer_of(net), s, torch.Size([1, 3, 8, 8]))
    expected = channel_sums(grid)
    assert expected.max() < torch.finfo(torch.float32).tiny
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


class _Aliased(nn.Module):
    """tiny_net's layers with the classifier's first Linear also registered as `alias`; the
    forward calls it through the alias or (`functional`) reads its weight and bias itself."""

    def __init__(self, net: nn.Sequential, *, functional: bool) -> None:
        super().__init__()
        self.net, self.alias, self.functional = net, net[4], functional

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.net[:4](x)
        x = nn.functional.linear(x, self.alias.weight, self.alias.bias) if self.functional else self.alias(x)
        return self.net[6](self.net[5](x))


@pytest.mark.parametrize("functional, block_bytes", [(False, None), (False, 8), (True, None)])
def test_nisp_aliased_and_functionally_read_linears(monkeypatch: pytest.MonkeyPatch, functional: bool,
                                                    block_bytes: int | None) -> None:
    """A Linear under two names, called through either, or its weight read by the forward itself
    (the linearised copy's own |W|; BLOCK_BYTES = 8: every Linear read in place)."""
    net = tiny_net(seed=18)
    s = torch.rand(6, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    flat = linear_back(net[4].weight, s.tolist())
    expected = channel_sums(pool_back(reshape(flat, 4, 4), channels=4, size=8, k=2, stride=2, pad=0, out=4))
    if block_bytes is not None:
        monkeypatch.setattr(nisp, "BLOCK_BYTES", block_bytes)
    model = _Aliased(net, functional=functional)
    got = propagate_scores(LayerSpec(model=model, conv=net[0], name="net.0"), s, torch.Size([1, 3, 8, 8]))
    torch.testing.assert_close(got, expected, rtol=FLOAT32_RTOL, atol=0)


def test_nisp_empty_class_has_no_features() -> None:
    with torch.no_grad():
        assert nisp._classifier_inputs(tiny_net().eval(), torch.zeros(0, 3, 8, 8)).shape == (0, 6)


def test_nisp_linear_blocks_equal_one_product(monkeypatch: pytest.MonkeyPatch) -> None:
    weight = torch.randn(37, 11, generator=torch.Generator().manual_seed(4))
    x = torch.rand(2, 11, dtype=torch.float64, requires_grad=True)
    monkeypatch.setattr(nisp, "BLOCK_BYTES", 5 * 11 * 8)  # blocks of 5 rows, the last of 2
    assert [len(range(37)[rows]) for rows in nisp._row_slices(*weight.shape)] == [5] * 7 + [2]
    y = nisp._AbsMatmul.apply(x, weight)
    torch.testing.assert_close(y, x @ weight.double().abs().T)
    g = torch.rand(2, 37, dtype=torch.float64)
    (grad,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(grad, g @ weight.double().abs())


def test_nisp_copy_reads_the_linear_weights_without_changing_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    net = tiny_net(seed=15)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    monkeypatch.setattr(nisp, "BLOCK_BYTES", 8)  # every Linear read in place
    copy = nisp.linearised_copy(net, torch.float64)
    shared = [m.weight_of_model for m in copy.modules() if isinstance(m, nisp._AbsLinear)]
    assert [w.data_ptr() for w in shared] == [net[4].weight.data_ptr(), net[6].weight.data_ptr()]
    assert not any(p.requires_grad for p in copy.parameters())
    propagate_scores(layer_of(net), torch.rand(6, dtype=torch.float64), torch.Size([1, 3, 8, 8]))
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)


def test_nisp_forward_passes_do_not_change_the_features(monkeypatch: pytest.MonkeyPatch) -> None:
    net = tiny_net(seed=16).eval()
    images = torch.rand(7, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        whole = net[:6](images)
        monkeypatch.setattr(hooks, "PASS_BYTES", 3 * 4 * 8 * 8 * 4)  # 3 images of the conv's output
        parts = nisp._classifier_inputs(net, images)
    torch.testing.assert_close(parts, whole)


def test_average_ranks_by_blocks_of_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randint(4, (9, 13), generator=torch.Generator().manual_seed(6)).float()  # many ties
    whole = average_ranks(x)
    monkeypatch.setattr(nisp, "BLOCK_BYTES", 8 * 8 * 9 * 4)  # 4 columns per block
    assert torch.equal(average_ranks(x), whole)
    below_and_tied = [[((x[:, j] < v).sum(), (x[:, j] == v).sum()) for j, v in enumerate(row)] for row in x]
    expected = torch.tensor([[float(b + (t + 1) / 2) for b, t in row] for row in below_and_tied], dtype=torch.float64)
    torch.testing.assert_close(whole, expected)


def test_nisp_scorer_end_to_end() -> None:
    net = tiny_net(seed=21)
    batches = class_batches(net, classes=3, n=5)
    images = torch.cat([b.images for b in batches])
    with torch.no_grad():
        features = net[:6](images).double().numpy()  # input of the last Linear, [15, 6]
    _, s = numpy_inf_fs(features, alpha=0.3, spearman=False)
    flat = linear_back(net[4].weight, s.tolist())
    expected = channel_sums(pool_back(reshape(flat, 4, 4), 4, 8, 2, 2, 0, 4))
    got = create("nisp", alpha=0.3, correlation="pearson")(layer_of(net), batches)
    torch.testing.assert_close(got, (expected / expected.max()).float())
    raw = create("nisp", alpha=0.3, correlation="pearson", normalize=False)(layer_of(net), batches)
    torch.testing.assert_close(raw, expected.float())


def test_nisp_reservoir_keeps_a_bounded_sample() -> None:
    net = tiny_net()
    scorer = create("nisp", max_samples=4)
    scores = scorer(layer_of(net), class_batches(net, classes=3, n=5))
    assert scorer._sample.shape == (4, 6) and scorer._seen == 15
    assert torch.isfinite(scores).all()


def test_nisp_feature_cap_raises_with_fix() -> None:
    net = tiny_net()
    with pytest.raises(ValueError, match="max_features"):
        create("nisp", max_features=5)(layer_of(net), class_batches(net))


# ---------------------------------------------------------------- paper Table 1 property


@pytest.mark.parametrize("c", [0.5, 4.0])  # powers of two scale exactly in floating point
def test_rescaling_a_unit_keeps_apoz_and_scales_l1(c: float) -> None:
    torch.manual_seed(17)
    conv = nn.Conv2d(3, 5, 3)
    images = torch.randn(8, 3, 9, 9)

    def scores(module: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor]:
        layer = LayerSpec(model=module, conv=module, name="conv")
        with torch.no_grad():
            acts = torch.relu(module(images))
        halves = [ClassBatch(0, images[:4], acts[:4]), ClassBatch(1, images[4:], acts[4:])]
        return create("apoz")(layer, halves), create("l1")(layer)

    apoz, l1 = scores(conv)
    with torch.no_grad():
        conv.weight[2] *= c
        conv.bias[2] *= c
    apoz_scaled, l1_scaled = scores(conv)
    assert torch.equal(apoz_scaled, apoz)
    factor = torch.ones(5)
    factor[2] = c
    torch.testing.assert_close(l1_scaled, l1 * factor)


# ---------------------------------------------------------------- contract


def test_owned_scorers_are_registered() -> None:
    assert set(OWNED) <= set(list_scorers())
    needs = {name: scorer_info(name).needs_data for name in OWNED}
    assert needs == {
        "apoz": True, "fpgm": False, "l1": False, "nisp": True, "random": False,
        "selectivity": True,
    }  # fmt: skip


ALL = list_scorers()
"""Every registered scorer: the contract tests below cover a new one the day it is registered."""

DEAD_UNIT_NOT_LOWEST = {
    "fpgm": "scores a filter by its distance to the other filters; a zero filter can be far from all",
    "nisp": "scores a unit by the weights its output feeds, not by the output itself",
    "random": "the control ignores the unit",
    "tp-bnscale": "scores a channel by its BatchNorm γ alone, which a zero filter leaves unchanged",
    "tp-fpgm": "as fpgm: a zero filter can be far from all the others",
    "tp-lamp": "group magnitude (below), normalised within the layer",
    "tp-magnitude": "adds the next layer's input weights of the channel, which a zero filter leaves unchanged",
}
"""Scorers for which a unit whose output is always 0 need not score lowest, and why."""


def test_contract_exemptions_name_registered_scorers() -> None:
    assert set(DEAD_UNIT_NOT_LOWEST) <= set(ALL)


def contract_net(name: str) -> nn.Sequential:
    """tiny_net(), or its BatchNorm variant for a scorer whose `check` refuses a net without one."""
    net = tiny_net()
    try:
        create(name).check(net, classes=3, samples_per_class=6)
    except ValueError:
        return tiny_net(batchnorm=True)
    return net


@pytest.mark.parametrize("name", ALL)
def test_contract_shape_dtype_finite_deterministic(name: str) -> None:
    net = contract_net(name)
    batches = class_batches(net)
    first = create(name)(layer_of(net), batches)
    second = create(name)(layer_of(net), batches)
    assert first.shape == (net[0].out_channels,)
    assert first.dtype == torch.float32 and first.device.type == "cpu"
    assert torch.isfinite(first).all()
    assert torch.equal(first, second)


def chunked(batches: list[ClassBatch], size: int) -> list[ClassBatch]:
    """Each class batch cut into consecutive chunks of `size` images (the last one shorter)."""
    return [
        ClassBatch(b.class_index, b.images[i : i + size], b.activations[i : i + size])
        for b in batches
        for i in range(0, len(b.images), size)
    ]


@pytest.mark.parametrize("size", [1, 4, 5])  # 4 and 5 do not divide N = 6
@pytest.mark.parametrize("name", ALL)
def test_contract_chunks_of_a_class_give_bit_identical_scores(name: str, size: int) -> None:
    """A class given as consecutive chunks scores exactly as the class given whole."""
    net = contract_net(name)
    batches = class_batches(net)
    whole = create(name)(layer_of(net), batches)
    assert torch.equal(create(name)(layer_of(net), chunked(batches, size)), whole)


@pytest.mark.parametrize("name", [n for n in ALL if create(n).shardable()])
def test_contract_chunked_class_states_merge_to_the_whole_scores(name: str) -> None:
    """Exact class sharding holds when each class's state comes from chunks."""
    net = contract_net(name)
    batches = class_batches(net)
    whole = create(name)(layer_of(net), batches)
    scorer = create(name)
    states = []
    for batch in batches:
        scorer.reset(layer_of(net))
        for chunk in chunked([batch], 4):
            scorer.update(chunk)
        states.append(scorer.state())
    scorer.reset(layer_of(net))
    scorer.merge(states)
    assert torch.equal(scorer.compute(), whole)


@pytest.mark.parametrize("name", [n for n in ALL if n not in DEAD_UNIT_NOT_LOWEST])
def test_contract_a_dead_unit_never_scores_above_a_live_one(name: str) -> None:
    """Direction (higher = keep): a unit whose filter and bias are 0 (its output is 0 on every
    image) is at most as important as any live unit (scorers exempt, with the reason, above)."""
    net = contract_net(name)
    with torch.no_grad():
        net[0].weight[1] = 0.0
        net[0].bias[1] = 0.0
    batches = class_batches(net)
    live = [0, 2, 3]
    assert (torch.cat([b.activations for b in batches])[:, live].amax(dim=(0, 2, 3)) > 0).all()  # the others are live
    scores = create(name)(layer_of(net), batches)
    assert scores[1] <= scores[live].min()


@pytest.mark.parametrize("name", [n for n in ALL if scorer_info(n).needs_data])
def test_data_scorers_refuse_compute_without_data(name: str) -> None:
    scorer = create(name)
    scorer.reset(layer_of(tiny_net()))
    with pytest.raises(ValueError):
        scorer.compute()


@pytest.mark.parametrize("name", ["apoz", "l1", "tp-taylor", "tp-hessian"])
def test_all_zero_unit_scores_lowest(name: str) -> None:
    net = tiny_net()
    with torch.no_grad():
        net[0].weight[1] = 0.0
        net[0].bias[1] = 0.0
    scores = create(name)(layer_of(net), class_batches(net))
    assert scores[1] == 0.0
    assert (scores[[0, 2, 3]] > scores[1]).all()


def test_nisp_unit_without_outgoing_weights_scores_lowest() -> None:
    net = tiny_net()
    with torch.no_grad():
        net[4].weight[:, 16:32] = 0.0  # the 4×4 pooled map of channel 1
    scores = create("nisp")(layer_of(net), class_batches(net))
    assert scores[1] == 0.0 and (scores[[0, 2, 3]] > 0).all()


def test_selectivity_prefers_a_one_class_unit() -> None:
    acts = [torch.ones(3, 2, 2, 2) for _ in range(3)]
    acts[0][:, 0] = 4.0
    acts[1][:, 0] = 0.0
    acts[2][:, 0] = 0.0  # unit 0 fires for class 0 only; unit 1 is uniform
    conv = nn.Conv2d(3, 2, 1)
    scores = create("selectivity")(
        LayerSpec(model=conv, conv=conv, name="c"), [acts_batch(k, a) for k, a in enumerate(acts)]
    )
    assert scores.tolist() == [1.0, 0.0]


def test_random_is_seeded_per_layer_and_run() -> None:
    net = tiny_net()
    a = create("random")(layer_of(net))
    other_name = create("random")(LayerSpec(model=net, conv=net[0], name="features.0"))
    other_seed = create("random", seed=1)(layer_of(net))
    torch.manual_seed(999)  # the global RNG plays no part
    assert torch.equal(create("random", seed=0)(layer_of(net)), a)
    assert not torch.equal(a, other_name) and not torch.equal(a, other_seed)
    assert ((a >= 0) & (a < 1)).all()
