"""The sketch projection: its plan, its unbiasedness, and that every capture route computes the same map."""

import numpy as np
import pytest
import torch
from torch import nn

from hydra_nb.capture import rule_for
from hydra_nb.examples import LeNet5, SmallCNN
from hydra_nb.params import ParamLayout
from hydra_nb.projection import Projector


def layout_of(model):
    return ParamLayout.from_model(model, torch.optim.SGD(model.parameters(), lr=0.1))[0]


@pytest.mark.parametrize("k", [64, 256, 1024, 4096])
def test_plan_respects_budget(k):
    layout = layout_of(LeNet5())
    p = Projector.plan(layout, k)
    assert k * 0.95 <= p.dim <= k
    for b, s in zip(p.blocks, layout.slots):
        assert 1 <= b.dim <= s.numel
        assert b.sketch == (b.dim < s.numel)
        if b.sketch:
            assert int(b.h1.max()) < b.dim and int(b.h2.max()) < b.dim
            assert set(b.s1.tolist()) <= {-1.0, 1.0} and set(b.s2.tolist()) <= {-1.0, 1.0}


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
    h = 0.3 * g + h  # correlated, like a test and a training gradient
    estimates = []
    for seed in range(300):
        p = Projector.plan(layout, 256, seed=seed, dtype=torch.float64)
        estimates.append(float(p.project_flat(g) @ p.project_flat(h)))
    exact = float(g @ h)
    sem = np.std(estimates) / np.sqrt(len(estimates))
    assert abs(np.mean(estimates) - exact) < 4 * sem
    # a single sketch is informative: its spread is close to a dense Gaussian projection's
    gaussian_sd = np.sqrt((float(g @ g) * float(h @ h) + exact ** 2) / 249)
    assert np.std(estimates) < 1.5 * gaussian_sd


def _per_sample_grads(module, inputs, d, names):
    """Per-sample gradients by one autograd call per sample (the slow reference)."""
    params = dict(module.named_parameters())
    out = {n: [] for n in names}
    for i in range(inputs.shape[0]):
        y = module(inputs[i : i + 1])
        grads = torch.autograd.grad(y, [params[n] for n in names], d[i : i + 1])
        for n, g in zip(names, grads):
            out[n].append(g)
    return {n: torch.stack(v) for n, v in out.items()}


def _check_routes(module, inputs, k, expect_routes=("full", "factored")):
    """Each route of the module's layer rule (chosen explicitly) gives T(G_b) of the autograd gradients."""
    module = module.double()
    rule = rule_for(module)
    assert not rule.deferred  # a layer rule, not the fallback
    layout = layout_of(module)
    proj = Projector.plan(layout, k, dtype=torch.float64)
    assert proj.blocks[0].sketch  # the weight is sketched: the interesting case
    d = torch.randn_like(module(inputs))
    names = [s.name for s in layout.slots]
    full = _per_sample_grads(module, inputs, d, names)
    blocks = dict(zip(names, proj.blocks))
    for route in expect_routes:
        got = {b.name: v for b, v in rule.per_sample(module, inputs, d, blocks, route)}
        for n in names:
            b = blocks[n]
            want = b.project_matrix(full[n].reshape(inputs.shape[0], b.rows, b.cols))
            assert torch.allclose(got[n], want, rtol=1e-10, atol=1e-12), (route, n)


@pytest.mark.parametrize("conv", [
    nn.Conv2d(3, 5, 3, stride=2, padding=1),
    nn.Conv2d(3, 4, (3, 2), dilation=(2, 1), padding=(1, 2), padding_mode="reflect"),
    nn.Conv1d(2, 6, 5, stride=2, padding=2, padding_mode="circular"),
    nn.Conv2d(2, 3, 4, padding="same"),
    nn.Conv3d(2, 3, 2),
])
def test_conv_routes_equal_sketched_full_gradient(conv):
    spatial = {nn.Conv1d: (11,), nn.Conv2d: (9, 8), nn.Conv3d: (5, 6, 4)}[type(conv)]
    x = torch.randn(4, conv.in_channels, *spatial, dtype=torch.float64)
    unfoldable = isinstance(conv, (nn.Conv1d, nn.Conv2d)) and not isinstance(conv.padding, str)
    k = conv.weight.numel() // 3 + conv.out_channels  # weight sketched, bias whole
    _check_routes(conv, x, k, ("full", "factored") if unfoldable else ("factored",))


@pytest.mark.parametrize("shape", [(5, 7), (5, 3, 7)])
def test_linear_routes_equal_sketched_full_gradient(shape):
    lin = nn.Linear(7, 6)
    _check_routes(lin, torch.randn(*shape, dtype=torch.float64), 20)


def test_embedding_sketch_equals_sketched_full_gradient():
    emb = nn.Embedding(11, 6, padding_idx=0)
    idx = torch.randint(0, 11, (5, 7))
    idx[0, :3] = 0
    emb = emb.double()
    layout = layout_of(emb)
    proj = Projector.plan(layout, 20, dtype=torch.float64)
    d = torch.randn(5, 7, 6, dtype=torch.float64)
    (block, got), = list(rule_for(emb).per_sample(emb, idx, d, {"weight": proj.blocks[0]}, "auto"))
    full = torch.zeros(5, 11, 6, dtype=torch.float64)
    for b in range(5):
        for l in range(7):
            if idx[b, l] != 0:
                full[b, idx[b, l]] += d[b, l]
    assert torch.allclose(got, block.project_matrix(full), rtol=1e-10, atol=1e-12)
