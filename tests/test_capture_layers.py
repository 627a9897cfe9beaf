"""Per-layer capture of per-sample gradients, through the public API.

Each tiny float64 model trains for 2 epochs (16 samples, batches of 5 with a last batch of
a single sample, SGD with momentum and weight decay). Fast mode at full dimension must match
the Hessian-free reference (b) to 1e-8; with a projection, the projected reference to
1e-10; exact mode must match autograd through the unrolled loop (reference (a)) to 1e-6.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from reference import (DT, assert_replay_matches, hessian_free_contributions, layout_check, rel_err,
                       tracked_training, unrolled_contributions)

N, N_TEST, BATCH, VOCAB, SEQ = 16, 3, 5, 7, 5


# ------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------
class Affine(nn.Module):
    """A custom module with its own raw parameters (captured by hydra_nb's torch.func fallback)."""

    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(1 + 0.1 * torch.randn(d, dtype=DT))
        self.shift = nn.Parameter(0.1 * torch.randn(d, dtype=DT))

    def forward(self, x):
        return x * self.scale + self.shift


class Tied(nn.Module):
    """Two Linear modules sharing one weight (each keeps its own bias)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(4, 4)
        self.dec = nn.Linear(4, 4)
        self.dec.weight = self.enc.weight
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.dec(torch.tanh(self.enc(x)))))


class Twice(nn.Module):
    """A submodule called twice in one forward."""

    def __init__(self):
        super().__init__()
        self.block = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.block(torch.tanh(self.block(x)))))


class SeqPool(nn.Module):
    """(B, L, d) -> Linear on every position -> tanh -> mean over L -> head."""

    def __init__(self, pre=None, d=4, hidden=6, norm=None):
        super().__init__()
        self.pre = pre
        self.proj = nn.Linear(d, hidden)
        self.norm = norm
        self.head = nn.Linear(hidden, 3)

    def forward(self, x):
        if self.pre is not None:
            x = self.pre(x)
        z = self.proj(x)
        if self.norm is not None:
            z = self.norm(z)
        return self.head(torch.tanh(z).mean(1))


class EmbedPool(nn.Module):
    """Token ids (B, L) -> Embedding(padding_idx=0) -> mean over L -> head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 4, padding_idx=0)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens):
        return self.head(torch.tanh(self.emb(tokens)).mean(1))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        y, _ = self.mha(x, x, x, need_weights=False)
        return self.head(torch.tanh(y).mean(1))


def conv2d_model(**conv_kw):
    def build():
        conv = nn.Conv2d(2, 3, **conv_kw)
        with torch.no_grad():
            n_out = conv(torch.zeros(1, 2, 6, 6)).numel()
        return nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(n_out, 3))
    return build


def conv1d_model(**conv_kw):
    def build():
        conv = nn.Conv1d(2, 3, **conv_kw)
        with torch.no_grad():
            n_out = conv(torch.zeros(1, 2, 9)).numel()
        return nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(n_out, 3))
    return build


def float_inputs(*shape):
    def make(g, n):
        return torch.randn(n, *shape, generator=g, dtype=DT)
    return make


def token_inputs(g, n):
    return torch.randint(0, VOCAB, (n, SEQ), generator=g)


MODELS = {
    "conv1d_stride_pad": (conv1d_model(kernel_size=3, stride=2, padding=1), float_inputs(2, 9)),
    "conv1d_dilation_reflect": (conv1d_model(kernel_size=3, dilation=2, padding=2, padding_mode="reflect"),
                                float_inputs(2, 9)),
    "conv2d_stride_pad": (conv2d_model(kernel_size=3, stride=2, padding=1), float_inputs(2, 6, 6)),
    "conv2d_dilation_reflect": (conv2d_model(kernel_size=3, dilation=2, padding=2, padding_mode="reflect"),
                                float_inputs(2, 6, 6)),
    "conv2d_same_even_kernel": (conv2d_model(kernel_size=(3, 2), padding="same"), float_inputs(2, 6, 6)),
    "conv2d_same_dilated_reflect": (conv2d_model(kernel_size=3, padding="same", dilation=2, padding_mode="reflect"),
                                    float_inputs(2, 6, 6)),
    "conv2d_rect_stride_nobias": (conv2d_model(kernel_size=(2, 3), stride=(2, 1), padding=(1, 0), bias=False),
                                  float_inputs(2, 6, 6)),
    "conv2d_groups": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, stride=2, groups=2), nn.Tanh(),
                                            nn.Flatten(), nn.Linear(36, 3)), float_inputs(2, 6, 6)),
    "embedding_padding_idx": (EmbedPool, token_inputs),
    "embedding_then_seq_linear": (lambda: SeqPool(pre=nn.Embedding(VOCAB, 4, padding_idx=0)), token_inputs),
    "seq_linear": (lambda: SeqPool(), float_inputs(SEQ, 4)),
    "layernorm": (lambda: nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)),
                  float_inputs(4)),
    "layernorm_on_sequences": (lambda: SeqPool(norm=nn.LayerNorm(6)), float_inputs(SEQ, 4)),
    "layernorm_2d_shape": (lambda: nn.Sequential(nn.LayerNorm((SEQ, 4)), nn.Flatten(), nn.Linear(SEQ * 4, 3)),
                           float_inputs(SEQ, 4)),
    "inplace_relu": (lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 3)),
                     float_inputs(4)),
    "tied_weights": (Tied, float_inputs(4)),
    "submodule_called_twice": (Twice, float_inputs(4)),
    "custom_raw_parameters": (lambda: nn.Sequential(nn.Linear(4, 5), Affine(5), nn.Tanh(), nn.Linear(5, 3)),
                              float_inputs(4)),
    "multihead_attention": (Attention, float_inputs(SEQ, 4)),
}


def setup_case(name, seed=0):
    build, make_x = MODELS[name]
    g = torch.Generator().manual_seed(seed)
    X, Xt = make_x(g, N), make_x(g, N_TEST)
    Y = torch.randint(0, 3, (N,), generator=g)
    Yt = torch.randint(0, 3, (N_TEST,), generator=g)
    torch.manual_seed(seed + 1)
    model = build().to(DT)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=0.01)
    loader = DataLoader(TensorDataset(X, Y), batch_size=BATCH, shuffle=True,
                        generator=torch.Generator().manual_seed(seed + 2))
    return model, opt, loader, X, Y, Xt, Yt


def train_case(tmp_path, name, **track_kw):
    model, opt, loader, X, Y, Xt, Yt = setup_case(name)
    run, store = tracked_training(tmp_path, model, opt, loader, X, Y, epochs=2, **track_kw)
    layout_check(run, store)
    return model, run, store, Xt, Yt


@pytest.mark.parametrize("name", list(MODELS))
def test_layer_fast_full_dimension(tmp_path, name):
    model, run, store, Xt, Yt = train_case(tmp_path, name, mode="fast", projection_dim=None)
    ref = hessian_free_contributions(run, Xt, Yt)
    assert_replay_matches(run, ref)
    got = store.contributions(model, Xt, Yt)
    assert got.shape == (N_TEST, N)
    err = rel_err(got, ref["values"][:, 0])
    assert err < 1e-8, f"{name}: fast contributions rel err {err:.3e}"
    # every parameter block individually (a wrong layer would hide behind a right total otherwise)
    h = store.hypergradients()
    h_ref = ref["h"][run.T].numpy()
    for s in store.layout.slots:
        sl = slice(s.offset, s.offset + int(np.prod(s.shape)))
        if np.abs(h_ref[:, sl]).max() == 0:
            assert np.abs(h[:, sl]).max() == 0, f"{name}: {s.name} should have zero h"
            continue
        err = rel_err(h[:, sl], h_ref[:, sl])
        assert err < 1e-8, f"{name}: h of {s.name} rel err {err:.3e}"


@pytest.mark.parametrize("name", list(MODELS))
def test_layer_fast_projected(tmp_path, name):
    model, run, store, Xt, Yt = train_case(tmp_path, name, mode="fast", projection_dim=24, seed=1)
    P = store.projector
    assert P.dim < run.D
    ref = hessian_free_contributions(run, Xt, Yt)
    g = P.project_flat(ref["test_grad"][run.T])
    h = P.project_flat(ref["h"][run.T])
    expected = -(g[:, None, :] * h[None, :, :]).sum(-1).numpy()
    got = store.contributions(model, Xt, Yt)
    err = rel_err(got, expected)
    assert err < 1e-10, f"{name}: projected contributions rel err {err:.3e}"
    err = rel_err(store.hypergradients(), h.numpy())
    assert err < 1e-10, f"{name}: projected hypergradients rel err {err:.3e}"


EXACT_MODELS = ["conv2d_dilation_reflect", "conv2d_same_even_kernel", "embedding_then_seq_linear", "layernorm",
                "inplace_relu", "tied_weights", "submodule_called_twice", "custom_raw_parameters"]


@pytest.mark.parametrize("name", EXACT_MODELS)
def test_layer_exact(tmp_path, name):
    model, run, store, Xt, Yt = train_case(tmp_path, name, mode="exact", projection_dim=None,
                                           exact_indices=[0, 3, 11, 15])
    ref = unrolled_contributions(run, Xt, Yt)
    assert_replay_matches(run, ref)
    got = store.contributions(model, Xt, Yt)
    err = rel_err(got, ref["values"][:, 0, store.tracked_indices])
    assert err < 1e-6, f"{name}: exact contributions rel err {err:.3e}"


def test_embedding_padding_row_never_moves(tmp_path):
    """Sanity of the token model: padding_idx's row gets no gradient, so its h is exactly zero."""
    model, run, store, Xt, Yt = train_case(tmp_path, "embedding_padding_idx", mode="fast", projection_dim=None)
    assert (run.X == 0).any()  # padding tokens do occur
    slot = store.layout.slots[store.layout.index["emb.weight"]]
    h = store.hypergradients()
    assert np.abs(h[:, slot.offset: slot.offset + 4]).max() == 0  # row 0 of the embedding
    assert np.abs(h[:, slot.offset + 4: slot.offset + 8]).max() > 0  # row 1 does move


def test_inplace_relu_is_active(tmp_path):
    """Guard: in the in-place ReLU model some pre-activations are negative (the ReLU matters)."""
    model, opt, loader, X, Y, Xt, Yt = setup_case("inplace_relu")
    with torch.no_grad():
        pre = model[0](X)
    assert (pre < 0).any() and (pre > 0).any()
    assert F.relu(pre).ne(pre).any()
