"""Per-layer capture of per-sample gradients, through the public API.

Each tiny float64 model trains for 2 epochs (16 samples, batches of 5 with a last batch of
a single sample, SGD with momentum and weight decay). Fast mode at full dimension must match
the Hessian-free reference (b) to 1e-8; with a projection, the projected reference to
1e-10; exact mode must match autograd through the unrolled loop (reference (a)) to 1e-6.

``MODELS`` exercises every entry of ``hydra_nb.capture.LAYER_RULES`` and the fallback (checked
below), so a layer rule added to the table without a model here fails.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hydra_nb.batches import LoaderTap
from hydra_nb.capture import LAYER_RULES, GradientCapture, rule_for
from hydra_nb.capture.fallback import per_sample_vjp
from hydra_nb.capture.rules import FALLBACK, owners
from hydra_nb.errors import TrackingConfigError
from hydra_nb.params import ParamLayout
from hydra_nb.projection import Projector
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
    """MultiheadAttention on (B, SEQ, 4) inputs, in the configurations its rule must follow.

    ``kv``: "self" (query, key and value the same tensor: one packed in-projection), "shared" (key is value,
    not the query: the q | kv row blocks), "separate" (three tensors: q | k | v), "kdim_vdim" (key and value
    of other widths: separate projection weights); ``padding_mask``: a key_padding_mask that depends on the
    sample; ``weights_loss``: the attention weights enter the loss too (their cotangent reaches the
    projections); ``batch_first=False`` transposes around the module.
    """

    def __init__(self, kv="self", batch_first=True, need_weights=False, padding_mask=False, weights_loss=False,
                 **mha_kw):
        super().__init__()
        kdim, vdim = (3, 5) if kv == "kdim_vdim" else (None, None)
        self.mha = nn.MultiheadAttention(4, 2, batch_first=batch_first, kdim=kdim, vdim=vdim, **mha_kw)
        self.head = nn.Linear(4, 3)
        self.kv, self.batch_first, self.need_weights = kv, batch_first, need_weights
        self.padding_mask, self.weights_loss = padding_mask, weights_loss

    def forward(self, x):
        if self.kv == "self":
            q = k = v = x
        elif self.kv == "shared":
            q, k = x, torch.tanh(x[:, 1:])
            v = k
        elif self.kv == "separate":
            q, k, v = x, torch.tanh(x), x.flip(1)
        else:
            q, k, v = x, x[..., :3] * 2, torch.cat([x, x[..., :1]], -1)
        mask = None
        if self.padding_mask:
            mask = k[..., 0] > 0.5
            mask[:, 0] = False  # every sample keeps a key
        if not self.batch_first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
            v = k if self.kv == "shared" else v
            if self.kv == "self":
                k = v = q
        y, w = self.mha(q, k, v, key_padding_mask=mask, need_weights=self.need_weights)
        if not self.batch_first:
            y = y.transpose(0, 1)
        out = self.head(torch.tanh(y).mean(1))
        if self.weights_loss:
            out = out + (w[:, 0] * torch.arange(w.shape[-1], dtype=w.dtype)).sum(-1, keepdim=True)
        return out


def conv2d_model(**conv_kw):
    def build():
        conv = nn.Conv2d(2, 3, **conv_kw)
        with torch.no_grad():
            n_out = conv(torch.zeros(1, 2, 6, 6)).numel()
        return nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(n_out, 3))
    return build


class SubclassedConv(nn.Conv2d):
    """A subclass that keeps Conv2d's forward: the conv rule follows it."""


class DoubledLinear(nn.Linear):
    """A subclass with its own forward: the linear rule would be wrong, the fallback captures it."""

    def forward(self, x):
        return 2 * super().forward(x) + 0.1 * x.sum(-1, keepdim=True)


def conv3d_model():
    conv = nn.Conv3d(2, 3, 2, stride=(1, 2, 1))
    n_out = conv(torch.zeros(1, 2, 3, 4, 3)).numel()
    return nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(n_out, 3))


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
    "conv3d_stride": (conv3d_model, float_inputs(2, 3, 4, 3)),
    "conv2d_subclass": (lambda: nn.Sequential(SubclassedConv(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
                                              nn.Linear(108, 3)), float_inputs(2, 6, 6)),
    "linear_subclass_own_forward": (lambda: nn.Sequential(DoubledLinear(4, 5), nn.Tanh(), nn.Linear(5, 3)),
                                    float_inputs(4)),
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
    "mha_seq_first_weights": (lambda: Attention(batch_first=False, need_weights=True, weights_loss=True),
                              float_inputs(SEQ, 4)),
    "mha_no_bias_padding_mask": (lambda: Attention(bias=False, padding_mask=True), float_inputs(SEQ, 4)),
    "mha_kdim_vdim_padding_mask": (lambda: Attention(kv="kdim_vdim", padding_mask=True, need_weights=True,
                                                     weights_loss=True), float_inputs(SEQ, 4)),
    "mha_key_is_value": (lambda: Attention(kv="shared", batch_first=False), float_inputs(SEQ, 4)),
    "mha_separate_kv_per_head_weights": (lambda: Attention(kv="separate", need_weights=True, weights_loss=True),
                                         float_inputs(SEQ, 4)),
    "mha_add_bias_kv": (lambda: Attention(add_bias_kv=True), float_inputs(SEQ, 4)),
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


# ------------------------------------------------------------------------------------------
# the table of layer rules
# ------------------------------------------------------------------------------------------
def _capture_owners(model):
    tracked = {id(p): i for i, p in enumerate(p for p in model.parameters() if p.requires_grad)}
    return owners(model, tracked)


def test_every_layer_rule_is_exercised_by_the_models_here():
    """Each type in LAYER_RULES, with its rule, and the fallback, occur among MODELS (which are all checked above)."""
    seen = set()  # (registered type, rule name) as the capture chose them
    for name, (build, _) in MODELS.items():
        torch.manual_seed(0)
        for owner in _capture_owners(build()):
            registered = next((c for c in type(owner.module).__mro__ if c in LAYER_RULES), None)
            seen.add((registered, owner.rule.name))
    missing = [(t.__name__, r.name) for t, r in LAYER_RULES.items() if (t, r.name) not in seen]
    assert not missing, f"layer rules no model in MODELS exercises: {missing}"
    assert (None, FALLBACK.name) in seen  # a module with parameters and no rule


def test_rule_for_walks_the_mro():
    class PlainSubclass(nn.Linear):
        pass

    assert rule_for(nn.Linear(2, 3)) is LAYER_RULES[nn.Linear]
    assert rule_for(PlainSubclass(2, 3)) is LAYER_RULES[nn.Linear]
    # the linear layer inside MultiheadAttention is a subclass too
    assert rule_for(nn.MultiheadAttention(4, 2).out_proj) is LAYER_RULES[nn.Linear]
    assert rule_for(SubclassedConv(2, 3, 3)) is LAYER_RULES[nn.Conv2d]
    assert rule_for(nn.Conv3d(2, 3, 2)) is LAYER_RULES[nn.Conv3d]
    # a subclass with its own forward, a grouped convolution, a module without a rule: the fallback
    assert rule_for(DoubledLinear(2, 3)) is FALLBACK
    assert rule_for(nn.Conv2d(2, 4, 3, groups=2)) is FALLBACK
    assert rule_for(Affine(3)) is FALLBACK
    assert rule_for(nn.BatchNorm1d(3)) is FALLBACK  # eval-mode BatchNorm: a per-sample affine map


def test_a_module_with_parameters_and_no_rule_goes_to_the_fallback():
    model = nn.Sequential(nn.Linear(4, 5), Affine(5), nn.Linear(5, 3))
    got = [(type(o.module).__name__, [n for n, _ in o.owned], o.rule) for o in _capture_owners(model)]
    assert got == [("Linear", ["weight", "bias"], LAYER_RULES[nn.Linear]), ("Affine", ["scale", "shift"], FALLBACK),
                   ("Linear", ["weight", "bias"], LAYER_RULES[nn.Linear])]


def test_multihead_attention_is_captured_as_one_unit():
    """Its forward uses out_proj's weights functionally: one owner holds all four, out_proj has none of its own;
    its rule follows the F.linear calls of its forward (with add_bias_kv, which that does not reach, the unit goes
    to the fallback)."""
    (owner,) = _capture_owners(nn.MultiheadAttention(4, 2, batch_first=True))
    assert owner.rule is LAYER_RULES[nn.MultiheadAttention] and owner.rule.follow is not None and owner.rule.whole
    assert [n for n, _ in owner.owned] == ["in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"]
    (owner,) = _capture_owners(nn.MultiheadAttention(4, 2, kdim=3, vdim=5))
    assert owner.rule is LAYER_RULES[nn.MultiheadAttention]
    assert [n for n, _ in owner.owned] == ["q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
                                           "out_proj.weight", "out_proj.bias"]
    (owner,) = _capture_owners(nn.MultiheadAttention(4, 2, add_bias_kv=True))
    assert owner.rule.deferred and owner.rule.whole and owner.rule.name == FALLBACK.name
    assert {n for n, _ in owner.owned} >= {"bias_k", "bias_v", "out_proj.weight"}


def test_multihead_attention_leaves_f_linear_as_it_was():
    """The rule replaces F.linear only while a tracked attention forward runs, also when that forward raises."""
    model = nn.Sequential(Attention(), nn.Linear(3, 3))
    params = list(model.parameters())
    layout = ParamLayout.from_model(model, torch.optim.SGD(params, lr=0.1))[0]
    loader = DataLoader(TensorDataset(torch.randn(4, SEQ, 4), torch.randint(0, 3, (4,))), batch_size=4)
    tap = LoaderTap(loader)
    capture = GradientCapture(model, params, Projector.plan(layout, None), tap)
    tap.attach()
    capture.attach()
    try:
        x, y = next(iter(loader))
        F.cross_entropy(model(x), y).backward()
        assert F.linear is torch._C._nn.linear
        with pytest.raises(AssertionError):
            model[0].mha(x, x[..., :3], x)  # a key of the wrong width: the functional forward refuses it
        assert F.linear is torch._C._nn.linear
    finally:
        capture.detach()
        tap.detach()


@pytest.mark.parametrize("option", [dict(max_norm=1.0), dict(scale_grad_by_freq=True), dict(sparse=True)])
def test_embedding_rule_refuses_batch_coupling_options(option):
    with pytest.raises(TrackingConfigError, match="Build it without these options"):
        _capture_owners(nn.Sequential(nn.Embedding(VOCAB, 4, **option), nn.Linear(4, 3)))
    frozen = nn.Embedding(VOCAB, 4, **option)  # untracked (frozen): nothing to refuse
    frozen.weight.requires_grad_(False)
    assert _capture_owners(nn.Sequential(frozen, nn.Linear(4, 3)))[0].rule is LAYER_RULES[nn.Linear]


# ------------------------------------------------------------------------------------------
# routes: GradientCapture(route=...) reaches the rules
# ------------------------------------------------------------------------------------------
class ConvSeq(nn.Module):
    """A conv layer and a linear layer on positions: both have a full and a factored route."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.proj = nn.Linear(6, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        z = torch.tanh(self.conv(x)).reshape(x.shape[0], 3 * 6, 6)  # (B, positions, 6)
        return self.head(torch.tanh(self.proj(z)).mean(1))


def _captured_rows(model, loader, route, projector, params):
    tap = LoaderTap(loader)
    capture = GradientCapture(model, params, projector, tap, route=route)
    tap.attach()
    capture.attach()
    try:
        x, y = next(iter(loader))
        F.cross_entropy(model(x), y, reduction="sum").backward()
        (p,) = capture.take()
        assert capture.failure is None
        return p.indices, p.buf
    finally:
        capture.detach()
        tap.detach()


@pytest.mark.parametrize("route", ["auto", "full", "factored"])
def test_every_route_gives_the_sketched_per_sample_gradients(route, monkeypatch):
    from hydra_nb.capture import conv
    from hydra_nb.projection import Block

    taken = {"unfold": 0, "outer": 0}  # which route the conv and linear rules took
    for owner, name, key in ((conv, "unfold", "unfold"), (Block, "project_outer", "outer")):
        def spy(*args, _real=getattr(owner, name), _key=key, **kwargs):
            taken[_key] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(owner, name, spy)
    torch.manual_seed(0)
    model = ConvSeq().to(DT)
    X, Y = torch.randn(6, 2, 6, 6, dtype=DT), torch.randint(0, 3, (6,))
    loader = DataLoader(TensorDataset(X, Y), batch_size=6)
    params = list(model.parameters())
    layout = ParamLayout.from_model(model, torch.optim.SGD(params, lr=0.1))[0]
    projector = Projector.plan(layout, 40, dtype=DT)
    assert {b.name for b in projector.blocks if b.sketch} >= {"conv.weight", "proj.weight"}  # the two-route case
    indices, rows = _captured_rows(model, loader, route, projector, params)
    want = []
    for i in indices.tolist():  # one autograd call per sample: the slow reference
        grads = torch.autograd.grad(F.cross_entropy(model(X[i:i + 1]), Y[i:i + 1], reduction="sum"), params)
        want.append(projector.project_flat(torch.cat([g.reshape(-1) for g in grads])))
    assert torch.allclose(rows, torch.stack(want), rtol=1e-10, atol=1e-12), route
    if route == "full":
        assert taken == {"unfold": 1, "outer": 0}
    elif route == "factored":
        assert taken == {"unfold": 0, "outer": 2}  # proj and head


CONV_CASES = {  # (convolution, input shape of one sample)
    "1d_stride_pad": (lambda: nn.Conv1d(2, 3, 3, stride=2, padding=1), (2, 9)),
    "1d_dilation_reflect": (lambda: nn.Conv1d(2, 3, 3, dilation=2, padding=2, padding_mode="reflect"), (2, 9)),
    "2d_same_even_kernel": (lambda: nn.Conv2d(2, 3, (3, 2), padding="same"), (2, 6, 6)),
    "2d_same_dilated_circular": (lambda: nn.Conv2d(2, 3, 3, padding="same", dilation=2, padding_mode="circular"),
                                 (2, 6, 6)),
    "2d_wide_rect_nobias": (lambda: nn.Conv2d(9, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2),
                                              bias=False), (9, 7, 6)),
    "3d_stride_pad": (lambda: nn.Conv3d(2, 3, 2, stride=(1, 2, 1), padding=1), (2, 3, 4, 3)),
}


@pytest.mark.parametrize("method", ["unfold", "grouped", "auto"])
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_weight_grads_by_each_method_equal_per_sample_autograd(case, method):
    """The conv rule's two ways of forming per-sample weight gradients (patches and a batched matmul, or the
    backward of a convolution grouped by sample) against one autograd call per sample."""
    from hydra_nb.capture.conv import weight_grads

    build, shape = CONV_CASES[case]
    torch.manual_seed(0)
    conv = build().to(DT)
    x = torch.randn(4, *shape, dtype=DT)
    d = torch.randn_like(conv(x))
    got = weight_grads(conv, x, d, method)
    for b in range(4):
        (want,) = torch.autograd.grad((conv(x[b:b + 1]) * d[b:b + 1]).sum(), [conv.weight])
        assert torch.allclose(got[b], want.reshape(want.shape[0], -1), rtol=1e-12, atol=1e-13), b


def test_unknown_route_is_refused():
    model = nn.Linear(2, 2)
    layout = ParamLayout.from_model(model, torch.optim.SGD(model.parameters(), lr=0.1))[0]
    loader = DataLoader(TensorDataset(torch.zeros(2, 2)), batch_size=2)
    with pytest.raises(TrackingConfigError, match="route must be one of 'auto', 'full', 'factored'.*got 'fast'"):
        GradientCapture(model, list(model.parameters()), Projector.plan(layout, None), LoaderTap(loader), route="fast")


# ------------------------------------------------------------------------------------------
# the per-sample VJP helper (the fallback's, also BatchNorm's)
# ------------------------------------------------------------------------------------------
class TwoOutputs(nn.Module):
    """Outputs (tensor, None, tensor, int): exercises cotangents for some outputs only."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4, dtype=DT))
        self.v = nn.Parameter(torch.randn(4, dtype=DT))

    def forward(self, x, shift=None):
        y = torch.tanh(x @ self.w.T)
        if shift is not None:
            y = y + shift
        return y, None, (x * self.v).sum(-1), 7


@pytest.mark.parametrize("chunk", [None, 2])
def test_per_sample_vjp_uncoupled_equals_one_sample_at_a_time(chunk):
    torch.manual_seed(0)
    module = TwoOutputs()
    x, shift = torch.randn(5, 4, dtype=DT), torch.randn(3, dtype=DT)  # shift: shared, not batched
    c0, c2 = torch.randn(5, 3, dtype=DT), torch.randn(5, dtype=DT)
    primals = {n: p.detach() for n, p in module.named_parameters()}

    def fn(p, args, kwargs):
        return torch.func.functional_call(module, p, args, kwargs)

    for cots in ([c0, None, c2, None], [c0, None, None, None]):
        got = per_sample_vjp(fn, primals, (x,), {"shift": shift}, cots, chunk=chunk)
        for b in range(5):
            y, _, z, _ = module(x[b:b + 1], shift=shift)
            total = (y * c0[b:b + 1]).sum() + ((z * c2[b:b + 1]).sum() if cots[2] is not None else 0)
            want = torch.autograd.grad(total, [module.w, module.v], allow_unused=True)
            for n, g in zip(["w", "v"], want):
                g = torch.zeros_like(primals[n]) if g is None else g
                assert torch.allclose(got[n][b], g, rtol=1e-12, atol=1e-14), (n, b)


@pytest.mark.parametrize("chunk", [None, 2])
def test_per_sample_vjp_coupled_restricts_the_cotangent_to_each_row(chunk):
    """Samples interact (each output row sees the batch mean): g_b = vjp of the batch forward with row b's cotangent."""
    torch.manual_seed(0)
    w = torch.randn(3, 4, dtype=DT, requires_grad=True)
    x, c = torch.randn(5, 4, dtype=DT), torch.randn(5, 3, dtype=DT)

    def fn(p, args, kwargs):
        (x,) = args
        return torch.tanh((x - x.mean(0)) @ p["w"].T)

    got = per_sample_vjp(fn, {"w": w.detach()}, (x,), {}, [c], coupled=True, chunk=chunk)["w"]
    for b in range(5):
        (want,) = torch.autograd.grad((fn({"w": w}, (x,), {})[b] * c[b]).sum(), [w])
        assert torch.allclose(got[b], want, rtol=1e-12, atol=1e-14), b
