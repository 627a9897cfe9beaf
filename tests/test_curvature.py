"""hydra_nb.curvature: the curvature-aware walk against references, float64, tiny models.

* exactness: where the curvature is exactly what an estimator assumes and k = D (``projection_dim=None``),
  the estimate equals the exact derivative (autograd through the unrolled loop) to float error —
  ``fisher`` for a negative-log-linear likelihood, ``ggn`` for two-class softmax regression;
  and the same estimators are *not* exact where their assumption fails (least squares, a tanh MLP);
* each estimator against a slow, obviously-correct reference of its own definition (dense D×D
  curvature, a forward recursion of one (h, b) per sample: ``reference.curvature_contributions``);
* the walk without curvature is fast mode; steps straddling log blocks; test side = train side
  (embeddings); projection: commutes with a rotation, not with a sketch.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hydra_nb import curvature as cv
from reference import (DT, curvature_contributions, make_data, make_loader, make_mlp, rel_err,
                       tracked_training, unrolled_contributions)

# Float64 sums of ≤ a few hundred terms per entry over ≤ 20 steps whose maps have norm ≤ ~2: rounding
# stays far below 1e-12 relative; 1e-9 leaves room for the ill-conditioned entries of small contributions.
EXACT_TOL = 1e-9


# -- models whose curvature is exactly an estimator's ------------------------------------------
class NegLogLinear(nn.Module):
    """s = xᵀθ > 0 with loss −log s: ∇²ℓ = xxᵀ/s² = ∇ℓ∇ℓᵀ, the per-sample Hessian *is* the gradient's outer product."""

    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, 1, bias=False)

    def forward(self, x):
        return self.lin(x)


def neg_log(out, y):
    return -torch.log(out[:, 0])


def neglog_data(N=24, d=5, n_test=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = 0.5 + torch.rand(N, d, generator=g, dtype=DT)
    Xt = 0.5 + torch.rand(n_test, d, generator=g, dtype=DT)
    return X, torch.zeros(N, dtype=torch.int64), Xt, torch.zeros(n_test, dtype=torch.int64)


def neglog_model(d=5, seed=1):
    torch.manual_seed(seed)
    m = NegLogLinear(d).to(DT)
    with torch.no_grad():
        m.lin.weight.uniform_(0.5, 1.0)
    return m


def squared(out, y):
    return 0.5 * (out[:, 0] - y.to(out.dtype)) ** 2


def walk_store(store, model, Xt, Yt, spec, *, block_rows=10 ** 6, checkpoint=-1, loss_fn=None):
    """Contributions (n_test, N) of ``spec`` from a store's log, by the walk (test side)."""
    c = store.reader.checkpoint_index(checkpoint)
    S = int(store.checkpoint_steps[c])
    G = store.test_gradients(model, Xt, Yt, checkpoint=c, loss_fn=loss_fn)
    pg = store.projector.to(dtype=DT).project_flat(G.to(DT))
    spans = [(b.offset, b.stop) for b in store.projector.blocks]
    N = store.n_train
    out = cv.walk(-pg[None], [S], cv.store_blocks(store, S, block_rows), store.trace(S), spans, spec,
                  np.arange(N), N)
    return out[0].T.numpy()


def train_case(tmp_path, model, opt, X, Y, *, epochs=2, loss_fn=None, batch_size=8, reduction="mean",
               train_kw=None, **track_kw):
    loader = make_loader(X, Y, batch_size=batch_size)
    track_kw.setdefault("projection_dim", None)
    return tracked_training(tmp_path, model, opt, loader, X, Y, epochs=epochs, loss_fn=loss_fn, reduction=reduction,
                            mode="fast", train_kw=train_kw, **track_kw)


SGD_VARIANTS = {
    "plain": dict(lr=0.2),
    "momentum_wd": dict(lr=0.05, momentum=0.9, weight_decay=0.01),
    "nesterov_dampening": dict(lr=0.05, momentum=0.8, dampening=0.3, nesterov=False, weight_decay=0.02),
    "nesterov": dict(lr=0.05, momentum=0.85, nesterov=True),
}


# -- exactness where the assumption holds ---------------------------------------------------------
@pytest.mark.parametrize("name", list(SGD_VARIANTS))
def test_fisher_is_exact_for_negative_log_linear_likelihood(tmp_path, name):
    X, Y, Xt, Yt = neglog_data()
    model = neglog_model()
    opt = torch.optim.SGD(model.parameters(), **SGD_VARIANTS[name])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
    run, store = train_case(tmp_path, model, opt, X, Y, loss_fn=neg_log, epochs=3, train_kw={"scheduler": sched})
    exact = unrolled_contributions(run, Xt, Yt)["values"][:, 0]
    got = walk_store(store, model, Xt, Yt, cv.CurvatureSpec("fisher"), loss_fn=neg_log)
    assert rel_err(got, exact) < EXACT_TOL
    fast = walk_store(store, model, Xt, Yt, cv.CurvatureSpec("none"), loss_fn=neg_log)
    assert rel_err(fast, exact) > 1e-3  # the case has curvature to get right


def test_fisher_is_exact_with_sum_reduction(tmp_path):
    X, Y, Xt, Yt = neglog_data()
    model = neglog_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.5)
    run, store = train_case(tmp_path, model, opt, X, Y, loss_fn=neg_log, reduction="sum")
    exact = unrolled_contributions(run, Xt, Yt)["values"][:, 0]
    got = walk_store(store, model, Xt, Yt, cv.CurvatureSpec("fisher", batch_reduction="sum"), loss_fn=neg_log)
    assert rel_err(got, exact) < EXACT_TOL
    wrong = walk_store(store, model, Xt, Yt, cv.CurvatureSpec("fisher", batch_reduction="mean"), loss_fn=neg_log)
    assert rel_err(wrong, exact) > 1e-3


@pytest.mark.parametrize("name", ["plain", "momentum_wd", "nesterov"])
def test_ggn_is_exact_for_two_class_softmax_regression(tmp_path, name):
    X, _, Xt, _ = make_data(N=30)
    g = torch.Generator().manual_seed(5)
    Y, Yt = torch.randint(0, 2, (30,), generator=g), torch.randint(0, 2, (len(Xt),), generator=g)
    torch.manual_seed(2)
    model = nn.Linear(4, 2).to(DT)
    opt = torch.optim.SGD(model.parameters(), **SGD_VARIANTS[name])
    run, store = train_case(tmp_path, model, opt, X, Y, epochs=3)
    exact = unrolled_contributions(run, Xt, Yt)["values"][:, 0]
    bias = cv.output_bias_span(store.meta["projection"], "bias")
    got = walk_store(store, model, Xt, Yt, cv.CurvatureSpec("ggn", logit_bias=bias))
    assert rel_err(got, exact) < EXACT_TOL
    fisher = walk_store(store, model, Xt, Yt, cv.CurvatureSpec("fisher"))
    assert rel_err(fisher, exact) > 1e-3  # the empirical Fisher is not cross-entropy's Hessian


def test_fisher_is_not_the_least_squares_hessian(tmp_path):
    """Rows r·x give r²·xxᵀ; the Hessian of ½(xᵀθ − y)² is xxᵀ: documented as not exact."""
    X, _, Xt, _ = make_data(N=24)
    g = torch.Generator().manual_seed(4)
    Y, Yt = torch.randint(0, 3, (24,), generator=g), torch.randint(0, 3, (len(Xt),), generator=g)
    torch.manual_seed(3)
    model = nn.Linear(4, 1, bias=False).to(DT)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run, store = train_case(tmp_path, model, opt, X, Y, loss_fn=squared)
    exact = unrolled_contributions(run, Xt, Yt)["values"][:, 0]
    got = walk_store(store, model, Xt, Yt, cv.CurvatureSpec("fisher"), loss_fn=squared)
    assert rel_err(got, exact) > 1e-3


# -- each estimator against the reference of its own definition ----------------------------------
CASES = {
    "fisher": dict(kind="fisher"),
    "fisher_clip": dict(kind="fisher", clip=0.05),
    "ggn": dict(kind="ggn"),
    "scalar": dict(kind="scalar"),
    "scalar_clip": dict(kind="scalar", clip=0.01),
    "diagonal": dict(kind="diagonal"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("opt_name", ["plain", "nesterov_dampening"])
def test_estimator_matches_its_reference(tmp_path, case, opt_name):
    X, Y, Xt, Yt = make_data(N=30)
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), **SGD_VARIANTS[opt_name])
    run, store = train_case(tmp_path, model, opt, X, Y, epochs=2)
    kw = dict(CASES[case])
    bias = None
    if kw["kind"] == "ggn":
        bias = cv.output_bias_span(store.meta["projection"], "2.bias")
        kw["logit_bias"] = bias
    ref = curvature_contributions(run, Xt, Yt, kw["kind"], bias=bias, clip=kw.get("clip"))
    # blocks of 5 rows: batches of 8 straddle block boundaries
    got = walk_store(store, model, Xt, Yt, cv.CurvatureSpec(**kw), block_rows=5)
    assert rel_err(got, ref["values"]) < EXACT_TOL
    if case.endswith("clip"):  # the cap binds somewhere, or the case would test nothing
        unclipped = walk_store(store, model, Xt, Yt, cv.CurvatureSpec(kw["kind"], logit_bias=bias))
        assert rel_err(unclipped, ref["values"]) > 1e-6


# -- the walk's own structure ----------------------------------------------------------------
@pytest.mark.parametrize("block_rows", [3, 8, 1000])
def test_walk_without_curvature_is_fast_mode(tmp_path, block_rows):
    X, Y, Xt, Yt = make_data(N=30)
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    run, store = train_case(tmp_path, model, opt, X, Y, projection_dim=32, checkpoint_every=5)
    for c in (2, -1):
        fast = store.contributions(model, Xt, Yt, mode="fast", checkpoint=c, progress=False)
        got = walk_store(store, model, Xt, Yt, cv.CurvatureSpec("none"), block_rows=block_rows, checkpoint=c)
        assert rel_err(got, fast) < 1e-12


def test_walk_many_stops_equals_one_walk_per_stop(tmp_path):
    X, Y, Xt, Yt = make_data(N=30)
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    run, store = train_case(tmp_path, model, opt, X, Y, projection_dim=32, checkpoint_every=4)
    spec = cv.CurvatureSpec("fisher")
    spans = [(b.offset, b.stop) for b in store.projector.blocks]
    P = store.projector.to(dtype=DT)
    stops = store.checkpoint_steps[1:]
    tests = torch.stack([P.project_flat(store.test_gradients(model, Xt, Yt, checkpoint=c).to(DT))
                         for c in range(1, len(store.checkpoint_steps))])
    N = store.n_train
    together = cv.walk(tests, stops, cv.store_blocks(store, int(stops.max()), 7), store.trace(), spans, spec,
                       np.arange(N), N)
    for s, S in enumerate(stops):
        alone = cv.walk(tests[s:s + 1], [S], cv.store_blocks(store, int(S), 7), store.trace(), spans, spec,
                        np.arange(N), N)
        assert rel_err(together[s].numpy(), alone[0].numpy()) < 1e-12


def test_embeddings_equal_the_test_side_walk(tmp_path):
    """Train side (the k basis vectors walk: E_i) and test side (each test vector walks) give the same numbers."""
    X, Y, Xt, Yt = make_data(N=30)
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    run, store = train_case(tmp_path, model, opt, X, Y, projection_dim=40)
    spec = cv.CurvatureSpec("fisher")
    S = store.steps
    spans = [(b.offset, b.stop) for b in store.projector.blocks]
    N = store.n_train
    E = cv.embeddings(S, cv.store_blocks(store, S, 6), store.trace(), spans, spec, np.arange(N), N, dtype=DT)
    pg = store.projector.to(dtype=DT).project_flat(store.test_gradients(model, Xt, Yt).to(DT))
    walked = walk_store(store, model, Xt, Yt, spec)
    assert rel_err((-(pg @ E.T)).numpy(), walked) < 1e-12
    # a column map: only some samples accumulated, into their own columns; the rest still shape C_t
    pick = np.array([3, 17, 8])
    col = np.full(N, -1)
    col[pick] = np.arange(3)
    E3 = cv.embeddings(S, cv.store_blocks(store, S, 6), store.trace(), spans, spec, col, 3, dtype=DT)
    np.testing.assert_allclose(E3.numpy(), E[pick].numpy(), rtol=0, atol=1e-14 * float(E.abs().max()))


def _log_arrays(store):
    part = store.log_parts[0]
    return tuple(np.asarray(store.array(part[k])[:]) for k in ("grad", "sample", "step"))


@pytest.mark.parametrize("kind", ["none", "fisher", "scalar"])
def test_projection_commutes_with_a_rotation(tmp_path, kind):
    """E(Q·rows) = Q·E(rows) for an orthogonal Q (k = D): these estimates see only inner products of rows."""
    X, Y, Xt, Yt = make_data(N=30)
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    run, store = train_case(tmp_path, model, opt, X, Y)
    rows, samples, steps = _log_arrays(store)
    D = rows.shape[1]
    Q, _ = torch.linalg.qr(torch.randn(D, D, dtype=DT, generator=torch.Generator().manual_seed(0)))
    spans = [(0, D)]  # one SGD group: the coefficients are the same for every coordinate
    trace = {f: v[:, :1] for f, v in store.trace().items()}
    S, N = store.steps, store.n_train
    spec = cv.CurvatureSpec(kind)
    E = cv.embeddings(S, cv.array_blocks(rows, samples, steps, S, 7), trace, spans, spec, np.arange(N), N, dtype=DT)
    ER = cv.embeddings(S, cv.array_blocks(rows @ Q.numpy().T, samples, steps, S, 7), trace, spans, spec,
                       np.arange(N), N, dtype=DT)
    assert rel_err(ER.numpy(), (E @ Q.T).numpy()) < 1e-12


def test_projection_does_not_commute_with_a_sketch(tmp_path):
    """Fast mode commutes with any linear P; the Fisher estimate, built from inner products of projected rows,
    does not (documented): E(P·rows) = P·E(rows) holds for 'none' and fails for 'fisher' when P is not an isometry."""
    X, Y, Xt, Yt = make_data(N=30)
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    run, store = train_case(tmp_path, model, opt, X, Y)
    rows, samples, steps = _log_arrays(store)
    D = rows.shape[1]
    P = torch.randn(24, D, dtype=DT, generator=torch.Generator().manual_seed(1)) / 24 ** 0.5
    trace = {f: v[:, :1] for f, v in store.trace().items()}
    S, N = store.steps, store.n_train
    errors = {}
    for kind in ("none", "fisher"):
        spec = cv.CurvatureSpec(kind)
        E = cv.embeddings(S, cv.array_blocks(rows, samples, steps, S, 8), trace, [(0, D)], spec, np.arange(N), N,
                          dtype=DT)
        EP = cv.embeddings(S, cv.array_blocks(rows @ P.numpy().T, samples, steps, S, 8), trace, [(0, 24)], spec,
                           np.arange(N), N, dtype=DT)
        errors[kind] = rel_err(EP.numpy(), (E @ P.T).numpy())
    assert errors["none"] < 1e-12
    assert errors["fisher"] > 1e-4


def test_clip_caps_the_spectrum():
    """_LowRank.clip: C̃ = Vᵀ diag(w) V with its eigenvalues above the cap set to the cap, the rest unchanged."""
    g = torch.Generator().manual_seed(0)
    V = torch.randn(5, 12, dtype=DT, generator=g)
    w = torch.rand(5, dtype=DT, generator=g) * 3
    dense = V.T @ torch.diag(w) @ V
    lam, Q = torch.linalg.eigh(dense)
    cap = float(lam[-3])  # two eigenvalues above it
    op = cv.step_operator(cv.CurvatureSpec("fisher", batch_reduction="sum", clip=cap), V * w.sqrt()[:, None], 1.0)
    got = op.apply(torch.eye(12, dtype=DT))
    want = Q @ torch.diag(lam.clamp_max(cap)) @ Q.T
    assert rel_err(got.numpy(), want.numpy()) < 1e-12


def test_bad_specs():
    with pytest.raises(ValueError, match="curvature must be one of"):
        cv.CurvatureSpec("hessian")
    with pytest.raises(ValueError, match="logit_bias"):
        cv.CurvatureSpec("ggn")
    with pytest.raises(ValueError, match="batch_reduction"):
        cv.CurvatureSpec("fisher", batch_reduction="max")
    with pytest.raises(ValueError, match="clip"):
        cv.CurvatureSpec("fisher", clip=0)


def test_find_output_bias(tmp_path):
    """Cross-entropy rows: the output bias's rows sum to zero with one negative entry; other losses: None."""
    X, Y, Xt, Yt = make_data(N=30)
    model = make_mlp()
    run, store = train_case(tmp_path, model, torch.optim.SGD(model.parameters(), lr=0.1), X, Y,
                            projection_dim=32, store_dtype="float16", name="ce.zarr")
    rows, _, _ = _log_arrays(store)
    assert cv.find_output_bias(store.meta["projection"], rows) == cv.output_bias_span(store.meta["projection"], "2.bias")
    model = make_mlp()  # the same network under a squared error on one-hot targets: no softmax rows
    run, store = train_case(tmp_path, model, torch.optim.SGD(model.parameters(), lr=0.1), X, Y,
                            loss_fn=squared_onehot, name="mse.zarr")
    rows, _, _ = _log_arrays(store)
    assert cv.find_output_bias(store.meta["projection"], rows) is None


def squared_onehot(out, y):
    return 0.5 * ((out - F.one_hot(y, out.shape[1]).to(out.dtype)) ** 2).sum(1)
