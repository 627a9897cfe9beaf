"""The factor-wise projection: its plan, its unbiasedness, and that every capture route computes it."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hydra_nb import capture
from hydra_nb.examples import LeNet5, SmallCNN
from hydra_nb.params import ParamLayout
from hydra_nb.projection import Projector


def layout_of(model):
    return ParamLayout.from_model(model, torch.optim.SGD(model.parameters(), lr=0.1))[0]


@pytest.mark.parametrize("k", [64, 256, 1024, 4096])
def test_plan_respects_budget(k):
    layout = layout_of(LeNet5())
    p = Projector.plan(layout, k)
    assert k * 0.9 <= p.dim <= k
    for b, s in zip(p.blocks, layout.slots):
        assert 1 <= b.k_out <= s.rows and 1 <= b.k_in <= s.cols
        assert (b.out is None) == (b.k_out == s.rows) and (b.inn is None) == (b.k_in == s.cols)


def test_full_dimension_is_identity():
    layout = layout_of(SmallCNN())
    for k in (None, layout.size, 10 * layout.size):
        p = Projector.plan(layout, k)
        assert p.is_identity and p.dim == layout.size
        v = torch.randn(3, layout.size)
        assert torch.equal(p.project_flat(v), v)


def test_projection_is_seeded():
    layout = layout_of(SmallCNN())
    a, b, c = (Projector.plan(layout, 256, seed=s) for s in (0, 0, 1))
    v = torch.randn(2, layout.size)
    assert torch.equal(a.project_flat(v), b.project_flat(v))
    assert not torch.allclose(a.project_flat(v), c.project_flat(v))


def test_inner_products_are_preserved_on_average():
    layout = layout_of(SmallCNN())
    g, h = torch.randn(layout.size, dtype=torch.float64), torch.randn(layout.size, dtype=torch.float64)
    h = 0.6 * g + 0.8 * h  # correlated, like a test and a training gradient
    estimates = []
    for seed in range(200):
        p = Projector.plan(layout, 256, seed=seed, dtype=torch.float64)
        estimates.append(float(p.project_flat(g) @ p.project_flat(h)))
    exact = float(g @ h)
    sem = np.std(estimates) / np.sqrt(len(estimates))
    assert abs(np.mean(estimates) - exact) < 4 * sem
    assert np.std(estimates) < 0.5 * abs(exact)  # and a single projection is informative


def _full_conv_grads(module, a, d):
    """Per-sample weight gradients of a conv, one autograd call per sample (the slow reference)."""
    out = []
    for i in range(a.shape[0]):
        w = module.weight.detach().clone().requires_grad_(True)
        y = module._conv_forward(a[i : i + 1], w, None)
        (g,) = torch.autograd.grad(y, w, d[i : i + 1])
        out.append(g)
    return torch.stack(out)


@pytest.mark.parametrize("route", ["unfold", "conv"])
@pytest.mark.parametrize("conv", [
    nn.Conv2d(3, 5, 3, stride=2, padding=1),
    nn.Conv2d(3, 4, (3, 2), dilation=(2, 1), padding=(1, 2), padding_mode="reflect"),
    nn.Conv1d(2, 6, 5, stride=2, padding=2, padding_mode="circular"),
    nn.Conv2d(2, 3, 3, padding="same"),
    nn.Conv3d(2, 3, 2),
])
@pytest.mark.parametrize("k", [None, 12])
def test_conv_routes_equal_projected_full_gradient(route, conv, k, monkeypatch):
    conv = conv.double()
    layout = ParamLayout.from_model(conv, torch.optim.SGD(conv.parameters(), lr=0.1))[0]
    proj = Projector.plan(layout, k if k is None else k + conv.out_channels, dtype=torch.float64)
    spatial = {nn.Conv1d: (11,), nn.Conv2d: (9, 8), nn.Conv3d: (5, 6, 4)}[type(conv)]
    a = torch.randn(4, conv.in_channels, *spatial, dtype=torch.float64)
    d = torch.randn_like(conv(a))
    monkeypatch.setattr(capture, "_FORCE_CONV_ROUTE", route)
    unfolded = []
    real_unfold = capture._unfold
    monkeypatch.setattr(capture, "_unfold", lambda m, x: unfolded.append(r := real_unfold(m, x)) or r)
    blocks = {"weight": proj.blocks[0], "bias": proj.blocks[1]}
    got = dict((b.name, v) for b, v in capture._conv(conv, a, d, blocks))
    full = _full_conv_grads(conv, a, d)
    want = proj.blocks[0].project_matrix(full.reshape(4, conv.out_channels, -1))
    assert torch.allclose(got["weight"], want, rtol=1e-10, atol=1e-12)
    bias = d.reshape(4, conv.out_channels, -1).sum(-1)
    assert torch.allclose(got["bias"], proj.blocks[1].project_matrix(bias[..., None]), rtol=1e-10, atol=1e-12)
    can_unfold = isinstance(conv, (nn.Conv1d, nn.Conv2d)) and not isinstance(conv.padding, str)
    assert bool(unfolded and unfolded[0] is not None) == (route == "unfold" and can_unfold)
