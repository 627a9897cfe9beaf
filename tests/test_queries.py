"""Queries of the run store: every fast path against a slow, in-memory reference.

Synthetic stores are written with ``hydra_nb.store.StoreWriter`` (the tracker's own writer):
random per-sample rows and a varied SGD trace (two parameter groups, momentum, Nesterov, weight
decay, a learning-rate schedule, steps where a group is inactive), so that the response
coefficients differ between parameter blocks and between steps. The reference reads the
whole log and trace into memory and applies ``hypergrad.response_coefficients`` directly.
Exact-mode queries use a real tracked run.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import hydra_nb
from hydra_nb.hypergrad import response_coefficients
from hydra_nb.optim import AdamRule, SGDRule
from hydra_nb.params import ParamLayout
from hydra_nb.projection import Projector
from hydra_nb.query import ClassMatrix, TopK
from hydra_nb.sources.fast import CoefficientSweep
from hydra_nb.store import StoreWriter, new_run_meta

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------
# synthetic stores through the tracker's writer
# ------------------------------------------------------------------------------------------
def small_model(d_in=6, hidden=10, classes=3, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, classes)).to(dtype)


def _writer(path, meta, layout, projector, log_dtype, param_dtype):
    args = (meta, layout, projector.arrays(), projector.dim, np.dtype(log_dtype), np.dtype(param_dtype), 0, None)
    if hasattr(StoreWriter, "create"):
        return StoreWriter.create(Path(path), *args)
    return StoreWriter(Path(path), *args)


def synthetic_store(path, model, N, *, epochs=2, batch=16, projection_dim=None, log_dtype="float64", seed=0,
                    two_groups=True, row_scale=1.0):
    """A fast-mode store with random rows, written by StoreWriter exactly as the tracker writes it."""
    params = list(model.parameters())
    if two_groups:
        opt = torch.optim.SGD([{"params": params[:2], "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3},
                               {"params": params[2:], "lr": 0.05, "momentum": 0.5, "nesterov": True,
                                "dampening": 0.0}])
    else:
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    layout, tensors = ParamLayout.from_model(model, opt)
    param_dtype = np.float64 if tensors[0].dtype == torch.float64 else np.float32
    projector = Projector.plan(layout, projection_dim, seed=3,
                               dtype=torch.float64 if param_dtype == np.float64 else torch.float32)
    config = {"projection_dim": projection_dim, "seed": 3, "checkpoint_every": "epoch", "store_dtype": log_dtype,
              "loss_fn": "cross_entropy", "custom_loss": False, "batch_size": batch}
    meta = new_run_meta("fast", N, layout, projector.to_json(), config, [])
    writer = _writer(path, meta, layout, projector, log_dtype, param_dtype)
    rng = np.random.default_rng(seed)
    flat = layout.flatten([t.detach() for t in tensors])
    writer.put_checkpoint(0, flat, None, None)
    P = len(layout.slots)
    step = 0
    started = np.zeros(P, dtype=bool)
    for epoch in range(epochs):
        perm = rng.permutation(N)
        for b in range(0, N, batch):
            samples = perm[b:b + batch]
            row = SGDRule().empty_row(P)
            for i, slot in enumerate(layout.slots):
                g = opt.param_groups[slot.group]
                row["lr"][i] = g["lr"] * (0.97 ** step)  # a schedule
                row["momentum"][i] = g["momentum"]
                row["dampening"][i] = g["dampening"]
                row["weight_decay"][i] = g["weight_decay"]
                row["nesterov"][i] = g["nesterov"]
                # the second group skips every 5th step (no gradient): SGD leaves it alone
                row["active"][i] = not (slot.group == 1 and step % 5 == 3)
                row["first"][i] = row["active"][i] and g["momentum"] != 0 and not started[i]
            started |= row["active"]
            rows = rng.standard_normal((len(samples), projector.dim)).astype(log_dtype) * row_scale
            writer.put_step(row, torch.from_numpy(samples.astype(np.int64)), torch.from_numpy(rows))
            step += 1
        flat = flat + torch.from_numpy(rng.standard_normal(flat.shape[0]) * 0.1).to(flat.dtype)
        writer.put_checkpoint(step, flat, None, None)
    writer.close("complete")
    assert writer.error is None, writer.error
    return hydra_nb.open_store(str(path))


def make_test_points(n, d_in=6, classes=3, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g)


# ------------------------------------------------------------------------------------------
# the slow reference: whole log in memory, response_coefficients over the whole trace
# ------------------------------------------------------------------------------------------
def reference_h(store, checkpoint=-1):
    """Projected h_S(i) for every sample (N, k) in float64."""
    c = store.reader.checkpoint_index(checkpoint)
    S = int(store.checkpoint_steps[c])
    H = np.zeros((store.n_train, store.projector.dim))
    if S == 0:
        return H
    coef = response_coefficients(store.trace(S), [S], store.optimizer_rule)[0]  # (S, P)
    end = int(store.group["trace/row_end"][S - 1])
    samples = np.asarray(store.group["log/sample"][:end])
    steps = np.asarray(store.group["log/step"][:end])
    grad = np.asarray(store.group["log/grad"][:end]).astype(np.float64)
    colmap = np.concatenate([np.full(b.dim, p) for p, b in enumerate(store.projector.blocks)])
    np.add.at(H, samples, grad * coef[steps][:, colmap])
    return H


def reference_contributions(store, model, X, Y, checkpoint=-1):
    c = store.reader.checkpoint_index(checkpoint)
    G = store.test_gradients(model, X, Y, c).to(torch.float64)
    PG = store.projector.to(dtype=torch.float64).project_flat(G).numpy()
    return -(PG @ reference_h(store, c).T)


def rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / (np.abs(np.asarray(b)).max() + 1e-300))


@contextlib.contextmanager
def small_chunks():
    """Make the writer use its smallest log chunks (64 rows), so that tiny stores span several chunks."""
    import hydra_nb.store as store_module

    with pytest.MonkeyPatch.context() as mp:
        if hasattr(store_module, "_TARGET_CHUNK_BYTES"):
            mp.setattr(store_module, "_TARGET_CHUNK_BYTES", 1)
        yield


def n_chunks(store):
    grad = store.group["log/grad"]
    return -(-grad.shape[0] // grad.chunks[0])


@pytest.fixture(scope="module")
def fast64(tmp_path_factory):
    model = small_model()
    with small_chunks():
        store = synthetic_store(tmp_path_factory.mktemp("q") / "fast64.zarr", model, N=90, epochs=3, batch=8,
                                projection_dim=40)
    return model, store


@pytest.fixture(scope="module")
def fast32(tmp_path_factory):
    model = small_model(dtype=torch.float32)
    with small_chunks():
        store = synthetic_store(tmp_path_factory.mktemp("q") / "fast32.zarr", model, N=70, epochs=2, batch=7,
                                projection_dim=None, log_dtype="float32", two_groups=False)
    return model, store


def test_stores_span_several_chunks(fast64, fast32):
    assert n_chunks(fast64[1]) >= 4 and n_chunks(fast32[1]) >= 2  # so TINY budgets mean several blocks


TINY = 1 << 12  # a memory budget that forces one-chunk blocks and test-point groups


# ------------------------------------------------------------------------------------------
# coefficients block by block
# ------------------------------------------------------------------------------------------
def random_trace(T, P, seed=0):
    rng = np.random.default_rng(seed)
    mom = rng.choice([0.0, 0.9, 0.5], P)
    trace = {"lr": rng.uniform(0.01, 0.2, (T, P)), "momentum": np.broadcast_to(mom, (T, P)).copy(),
             "dampening": np.broadcast_to(rng.choice([0.0, 0.3], P), (T, P)).copy(),
             "weight_decay": np.broadcast_to(rng.choice([0.0, 0.01], P), (T, P)).copy(),
             "nesterov": np.broadcast_to((rng.random(P) < 0.5) & (mom > 0), (T, P)).copy(),
             "active": rng.random((T, P)) < 0.85}
    started = np.zeros(P, dtype=bool)
    first = np.zeros((T, P), dtype=bool)
    for t in range(T):
        first[t] = trace["active"][t] & ~started & (mom > 0)
        started |= trace["active"][t]
    trace["first"] = first
    return trace


def random_adam_trace(T: int, P: int, seed: int = 1) -> dict:
    """An Adam/AdamW trace: per-step lr and beta1 (a scheduler may cycle it), own step counts, decoupled decay."""
    rng = np.random.default_rng(seed)
    active = rng.random((T, P)) < 0.85
    beta1 = rng.uniform(0.0, 0.95, (T, P))
    counts = np.cumsum(active, axis=0)  # Adam's per-parameter step count t after the step
    return {"lr": rng.uniform(0.001, 0.05, (T, P)), "beta1": beta1,
            "bias_correction1": 1 - beta1 ** np.maximum(counts, 1),
            "weight_decay": np.broadcast_to(rng.choice([0.0, 0.5], P), (T, P)).copy(), "active": active}


def test_adam_response_coefficients_match_a_scalar_simulation():
    """c[S, t] for an Adam trace = h at S after a unit (preconditioned) injection at t, simulated step by step:
    b ← β1·b + (1−β1)·r;  h ← (1−ηλ)·h − η/(1−β1^t)·b (skipped where the parameter is inactive)."""
    T, P = 25, 4
    trace = random_adam_trace(T, P)
    stops = [25, 9, 17]
    got = response_coefficients(trace, stops, AdamRule())
    for j, S in enumerate(stops):
        for t0 in range(S):
            for p in range(P):
                h = b = 0.0
                for t in range(t0, S):
                    if not trace["active"][t, p]:
                        continue
                    b1, lr = trace["beta1"][t, p], trace["lr"][t, p]
                    b = b1 * b + (1 - b1) * (1.0 if t == t0 else 0.0)
                    h = (1 - lr * trace["weight_decay"][t, p]) * h - lr / trace["bias_correction1"][t, p] * b
                assert abs(got[j, t0, p] - h) <= 1e-12 * max(1.0, abs(h)), (S, t0, p)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("trace_block, segment_bytes", [(7, 16 << 20), (4096, 1)])
def test_sweep_matches_response_coefficients(monkeypatch, trace_block, segment_bytes, kind):
    import hydra_nb.sources.fast as q

    monkeypatch.setattr(q, "_TRACE_BLOCK", trace_block)  # several trace reads per request
    monkeypatch.setattr(q, "_SEGMENT_BYTES", segment_bytes)  # segments of one step
    T, P = 60, 3
    trace = random_trace(T, P) if kind == "sgd" else random_adam_trace(T, P)
    rule = SGDRule() if kind == "sgd" else AdamRule()
    stops = np.array([60, 12, 37, 5])
    ref = response_coefficients(trace, stops, rule)  # (4, 60, 3)
    sweep = CoefficientSweep(trace, stops, rule.transitions)
    # descending blocks of distinct steps, adjacent blocks sharing their boundary step (as log blocks do)
    for lo, hi in [(50, 60), (41, 51), (41, 42), (20, 42), (3, 21), (0, 4)]:
        steps = np.unique(np.random.default_rng(lo).integers(lo, hi, 6).tolist() + [lo, hi - 1])
        got = sweep.at(steps)
        np.testing.assert_allclose(got, ref[:, steps], rtol=1e-13, atol=1e-15)
    # out of order: restarts from the top and is still right
    np.testing.assert_allclose(sweep.at(np.array([30, 55])), ref[:, [30, 55]], rtol=1e-13, atol=1e-15)
    # steps at or after every stop are zero
    np.testing.assert_array_equal(CoefficientSweep(trace, [10], rule.transitions).at(np.array([10, 11])), 0.0)


# ------------------------------------------------------------------------------------------
# contributions, trajectory, hypergradients against the reference
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [None, TINY])
@pytest.mark.parametrize("checkpoint", [-1, 1])
def test_contributions_match_reference(fast64, budget, checkpoint):
    model, store = fast64
    X, Y = make_test_points(5)
    got = store.contributions(model, X, Y, checkpoint=checkpoint, memory_budget=budget, progress=False)
    ref = reference_contributions(store, model, X, Y, checkpoint)
    assert got.shape == (5, store.n_train) and got.dtype == np.float64 and got.flags.c_contiguous
    assert rel(got, ref) < 1e-10


def test_contributions_float32_store(fast32):
    model, store = fast32
    X, Y = make_test_points(4, dtype=torch.float32)
    got = store.contributions(model, X, Y, memory_budget=TINY, progress=False)
    assert got.dtype == np.float32
    assert rel(got, reference_contributions(store, model, X, Y)) < 1e-4


def test_contributions_at_step_zero_is_zero(fast64):
    model, store = fast64
    X, Y = make_test_points(2)
    np.testing.assert_array_equal(store.contributions(model, X, Y, checkpoint=0, progress=False), 0.0)


def test_trajectory_matches_reference(fast64):
    model, store = fast64
    X, Y = make_test_points(3)
    idx = np.array([17, 3, 88, 3, 40])  # unsorted, with a repeat
    steps, values = store.trajectory(model, X, Y, idx, memory_budget=TINY, progress=False)
    np.testing.assert_array_equal(steps, store.checkpoint_steps)
    assert values.shape == (3, len(steps), len(idx))
    for c in range(len(steps)):
        ref = reference_contributions(store, model, X, Y, c)[:, idx]
        assert rel(values[:, c], ref) < 1e-10 or np.abs(ref).max() == 0


def test_hypergradients_match_reference(fast64):
    _, store = fast64
    for c in (1, -1):
        H = reference_h(store, c)
        assert rel(store.hypergradients(checkpoint=c, memory_budget=TINY), H) < 1e-10
        assert rel(store.hypergradients(checkpoint=c, train_indices=[5, 2, 5]), H[[5, 2, 5]]) < 1e-10


# ------------------------------------------------------------------------------------------
# top_k, self_influence, class_matrix
# ------------------------------------------------------------------------------------------
def test_top_k(fast64):
    model, store = fast64
    X, Y = make_test_points(6)
    values = store.contributions(model, X, Y, progress=False)
    # a budget that fits two test points' accumulators: three groups, one log pass each
    top = store.top_k(model, X, Y, k=4, memory_budget=2 * 16 * store.n_train * 2, progress=False)
    assert isinstance(top, TopK) and top.helpful_indices.shape == (6, 4)
    for j in range(6):
        order = np.argsort(-values[j], kind="stable")
        np.testing.assert_allclose(top.helpful_scores[j], values[j][order[:4]], rtol=1e-12)
        np.testing.assert_allclose(top.harmful_scores[j], values[j][order[::-1][:4]], rtol=1e-12)
        np.testing.assert_allclose(values[j][top.helpful_indices[j]], top.helpful_scores[j], rtol=1e-12)
        np.testing.assert_allclose(values[j][top.harmful_indices[j]], top.harmful_scores[j], rtol=1e-12)
    assert (np.diff(top.helpful_scores, axis=1) <= 0).all() and (np.diff(top.harmful_scores, axis=1) >= 0).all()
    big = store.top_k(model, X[:1], Y[:1], k=10_000, progress=False)
    assert big.helpful_indices.shape == (1, store.n_train)
    with pytest.raises(ValueError, match="k must be"):
        store.top_k(model, X, Y, k=0)


def train_set(N, seed=5):
    return make_test_points(N, seed=seed)


@pytest.mark.parametrize("as_dataset", [False, True])
def test_self_influence_is_the_diagonal(fast64, as_dataset):
    model, store = fast64
    Xtr, Ytr = train_set(store.n_train)
    data = TensorDataset(Xtr, Ytr) if as_dataset else (Xtr, Ytr)
    # budget: 3 blocks of training samples, each one pass over the log
    k = store.projector.dim
    got = store.self_influence(model, data, memory_budget=2 * 2 * k * 8 * 30, progress=False)
    ref = np.diag(reference_contributions(store, model, Xtr, Ytr))
    assert got.shape == (store.n_train,) and not np.isnan(got).any()
    assert rel(got, ref) < 1e-10
    with pytest.raises(ValueError, match="samples; the run trained on"):
        store.self_influence(model, (Xtr[:5], Ytr[:5]))


def test_class_matrix(fast64):
    model, store = fast64
    X, Y = make_test_points(9)
    train_labels = np.random.default_rng(0).integers(0, 4, store.n_train) * 10  # classes 0, 10, 20, 30
    cm = store.class_matrix(model, train_labels, X, Y, memory_budget=TINY, progress=False)
    assert isinstance(cm, ClassMatrix)
    values = reference_contributions(store, model, X, Y)
    np.testing.assert_array_equal(cm.train_classes, np.unique(train_labels))
    np.testing.assert_array_equal(cm.test_classes, np.unique(Y.numpy()))
    assert cm.mean.shape == (len(cm.train_classes), len(cm.test_classes))
    for a, ca in enumerate(cm.train_classes):
        for b, cb in enumerate(cm.test_classes):
            block = values[np.ix_(Y.numpy() == cb, train_labels == ca)]
            assert cm.counts[a, b] == block.size
            assert abs(cm.mean[a, b] - block.mean()) < 1e-10 * np.abs(values).max()


# ------------------------------------------------------------------------------------------
# exact stores (a real tracked run)
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exact_run(tmp_path_factory):
    torch.manual_seed(0)
    N = 24
    X, Y = make_test_points(N, seed=7)
    model = small_model(seed=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    loader = torch.utils.data.DataLoader(TensorDataset(X, Y), batch_size=6, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("q") / "exact.zarr"
    tracked = [3, 11, 0, 20, 7]
    with hydra_nb.track(model, loader, store=str(path), optimizer=opt, mode="exact", exact_indices=tracked,
                        projection_dim=None, strict=True):
        for _ in range(2):
            for x, y in loader:
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
    return model, hydra_nb.open_store(str(path)), X, Y


def test_exact_queries(exact_run):
    model, store, Xtr, Ytr = exact_run
    X, Y = make_test_points(4)
    tracked = store.tracked_indices
    G = store.test_gradients(model, X, Y)
    ref = -(G @ torch.from_numpy(np.asarray(store.group["exact/h"][-1])).T).numpy()
    got = store.contributions(model, X, Y, memory_budget=TINY, progress=False)
    assert got.shape == (4, len(tracked)) and rel(got, ref) < 1e-12
    # self-influence: NaN for samples the exact run did not track, the diagonal for the others
    si = store.self_influence(model, (Xtr, Ytr), memory_budget=TINY, progress=False)
    assert np.isnan(np.delete(si, tracked)).all()
    diag = np.diag(store.contributions(model, Xtr[tracked], Ytr[tracked], progress=False))
    assert rel(si[tracked], diag) < 1e-12
    si_fast = store.self_influence(model, (Xtr, Ytr), mode="fast", progress=False)
    diag_fast = np.diag(store.contributions(model, Xtr[tracked], Ytr[tracked], mode="fast", progress=False))
    assert rel(si_fast[tracked], diag_fast) < 1e-10 and np.isnan(np.delete(si_fast, tracked)).all()
    # class matrix: only tracked samples count
    labels = np.arange(store.n_train) % 2
    cm = store.class_matrix(model, labels, X, Y, memory_budget=TINY, progress=False)
    for a in range(2):
        for b, cb in enumerate(cm.test_classes):
            block = ref[np.ix_(Y.numpy() == cb, labels[tracked] == a)]
            assert abs(cm.mean[a, b] - block.mean()) < 1e-12 * np.abs(ref).max()
    top = store.top_k(model, X, Y, k=2, progress=False)
    assert np.isin(top.helpful_indices, tracked).all()
    np.testing.assert_allclose(top.helpful_scores[:, 0], ref.max(1), rtol=1e-12)
    steps, traj = store.trajectory(model, X, Y, [20, 3], progress=False)
    slots = [list(tracked).index(20), list(tracked).index(3)]
    assert rel(traj[:, -1], ref[:, slots]) < 1e-12


# ------------------------------------------------------------------------------------------
# the dask engine
# ------------------------------------------------------------------------------------------
import dask  # noqa: E402  (the test extra installs dask and distributed: these tests never skip)


@pytest.mark.parametrize("which", ["fast64", "fast32"])
def test_dask_engine_equals_numpy(request, which):
    model, store = request.getfixturevalue(which)
    dtype = torch.float64 if which == "fast64" else torch.float32
    X, Y = make_test_points(5, dtype=dtype)
    tol = 1e-10 if which == "fast64" else 1e-5
    with dask.config.set(scheduler="threads"):
        for budget in (None, TINY):
            a = store.contributions(model, X, Y, progress=False, memory_budget=budget)
            b = store.contributions(model, X, Y, engine="dask", progress=False, memory_budget=budget)
            assert b.dtype == a.dtype and rel(b, a) < tol
        idx = [1, 30, 2]
        _, ta = store.trajectory(model, X, Y, idx, progress=False)
        _, tb = store.trajectory(model, X, Y, idx, engine="dask", progress=False, memory_budget=TINY)
        assert rel(tb, ta) < tol
        labels = np.arange(store.n_train) % 3
        ca = store.class_matrix(model, labels, X, Y, progress=False)
        cb = store.class_matrix(model, labels, X, Y, engine="dask", progress=False)
        assert rel(cb.mean, ca.mean) < tol


def test_dask_engine_exact_store(exact_run):
    model, store, _, _ = exact_run
    X, Y = make_test_points(3)
    a = store.contributions(model, X, Y, progress=False)
    b = store.contributions(model, X, Y, engine="dask", progress=False)
    assert rel(b, a) < 1e-12


@pytest.mark.parametrize("processes", [False, True])
def test_dask_distributed_cluster(fast64, processes, monkeypatch):
    import distributed
    main = sys.modules["__main__"]
    if processes and not hasattr(main, "__spec__"):  # IPython tests (test_magic) replace __main__; spawn reads it
        monkeypatch.setattr(main, "__spec__", None, raising=False)
    model, store = fast64
    X, Y = make_test_points(4)
    expected = store.contributions(model, X, Y, progress=False)
    calls = []
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=processes, dashboard_address=None,
                                  silence_logs=40) as cluster, distributed.Client(cluster):
        got = store.contributions(model, X, Y, engine="dask", memory_budget=TINY,
                                  progress=lambda d, t: calls.append((d, t)))
    assert rel(got, expected) < 1e-10
    assert calls and calls[-1][0] == calls[-1][1]


# ------------------------------------------------------------------------------------------
# progress, display, arguments
# ------------------------------------------------------------------------------------------
def test_progress_callback_and_bar(fast64, capsys):
    model, store = fast64
    X, Y = make_test_points(2)
    calls = []
    store.contributions(model, X, Y, memory_budget=TINY, progress=lambda d, t: calls.append((d, t)))
    done = [d for d, _ in calls]
    assert done == sorted(done) and calls[-1][0] == calls[-1][1] and len(calls) == 1 + n_chunks(store)
    calls.clear()
    with dask.config.set(scheduler="sync"):
        store.contributions(model, X, Y, engine="dask", memory_budget=TINY, progress=lambda d, t: calls.append((d, t)))
    assert calls[-1][0] == calls[-1][1] and len(calls) == 1 + n_chunks(store)
    store.contributions(model, X, Y, memory_budget=TINY, progress=False)
    assert capsys.readouterr().err == ""
    store.contributions(model, X, Y, memory_budget=TINY, progress=True)  # a tqdm bar, then cleared (leave=False)
    assert "contributions" in capsys.readouterr().err


def test_progress_bar_appears_only_after_a_delay(fast64, capsys, monkeypatch):
    """progress=None: tqdm's delay= keeps the bar away from queries quicker than about a second."""
    import hydra_nb.sources

    model, store = fast64
    X, Y = make_test_points(2)
    assert hydra_nb.sources.PROGRESS_DELAY_S == 1.0
    monkeypatch.setattr(hydra_nb.sources, "PROGRESS_DELAY_S", 1e6)  # a query shorter than the delay, however slow
    store.contributions(model, X, Y, memory_budget=TINY)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(hydra_nb.sources, "PROGRESS_DELAY_S", 0.0)  # work that has already run longer than it
    store.contributions(model, X, Y, memory_budget=TINY)
    assert "contributions" in capsys.readouterr().err


def test_bad_arguments(fast64):
    model, store = fast64
    X, Y = make_test_points(2)
    with pytest.raises(ValueError, match="engine must be"):
        store.contributions(model, X, Y, engine="spark")
    with pytest.raises(ValueError, match="memory_budget"):
        store.contributions(model, X, Y, memory_budget=0)
    with pytest.raises(ValueError, match="differ in length"):
        store.contributions(model, X, Y[:1])
    with pytest.raises(ValueError, match="train_labels"):
        store.class_matrix(model, [0, 1], X, Y)


def test_repr_html(tmp_path):
    model = small_model()
    store = synthetic_store(tmp_path / "a<b>&c.zarr", model, N=20, epochs=2, batch=5, projection_dim=30)
    out = store._repr_html_()
    assert "<table>" in out and "a&lt;b&gt;&amp;c.zarr" in out and "a<b>" not in out
    for text in ("samples", "20 (all tracked)", "steps", "8", "epochs", "fast", "projection", "tensor_sketch",
                 "size on disk", "iB", "complete"):
        assert text in out, text
    assert ">2<" in out.replace("</td>", "<")  # two epochs, from the per-epoch checkpoints
    assert store.size_on_disk() > 20 * 2 * 30 * 8


# ------------------------------------------------------------------------------------------
# bounded memory: peak RSS of a query in a fresh process, for a store 4x larger
# ------------------------------------------------------------------------------------------
_PEAK_SCRIPT = textwrap.dedent("""
    import json, sys, numpy as np, torch
    from torch import nn
    import hydra_nb

    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    path, what = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    store = hydra_nb.open_store(path)
    x, y = torch.randn(2, 64), torch.tensor([1, 2])
    store.contributions(model, x[:1], y[:1], checkpoint=0, progress=False)  # warm up torch, zarr, threads
    base = rss("VmRSS")
    if what == "query":
        out = store.contributions(model, x, y, memory_budget=8 << 20, progress=False)
        assert out.shape == (2, store.n_train)
    else:  # what a naive query does: the whole log at once
        out = np.asarray(store.group["log/grad"][:])
    print(json.dumps({"growth": rss("VmHWM") - base}))
""")


def _peak_growth(path, what):
    r = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(path), what], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])["growth"]


def test_peak_memory_independent_of_store_size(tmp_path):
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    small = synthetic_store(tmp_path / "small.zarr", model, N=4000, epochs=2, batch=100, projection_dim=1024,
                            log_dtype="float32", two_groups=False)
    big = synthetic_store(tmp_path / "big.zarr", model, N=8000, epochs=4, batch=100, projection_dim=1024,
                          log_dtype="float32", two_groups=False)
    log_bytes = [s.group["log/grad"].nbytes for s in (small, big)]
    assert log_bytes[1] >= 4 * log_bytes[0] > 30 << 20  # 4x the rows: 2x the samples and 2x the steps
    growth_small, growth_big = _peak_growth(small.path, "query"), _peak_growth(big.path, "query")
    naive_big = _peak_growth(big.path, "naive")
    assert naive_big > 0.9 * log_bytes[1]  # the measurement sees a whole-log read
    store_growth = log_bytes[1] - log_bytes[0]
    assert growth_big - growth_small < 0.1 * store_growth, (growth_small, growth_big, store_growth)
    assert growth_big < 0.25 * log_bytes[1], (growth_big, log_bytes[1])


def test_chunk_files_read_log_rows_as_zarr_does(tmp_path):
    """The fast source reads uncompressed log chunks straight from their files: the same rows as zarr's read
    for blocks that start and end inside chunks; a truncated chunk reports a short read (the zarr read then
    runs and names the damage); compressed or in-memory arrays are left to zarr."""
    import zarr

    from hydra_nb.sources.fast import ChunkFiles

    g = zarr.open_group(str(tmp_path / "a.zarr"), mode="w")
    arr = g.create_array("log/grad", shape=(40, 5), chunks=(7, 5), dtype="float32", compressors=None)
    data = np.random.default_rng(0).standard_normal((40, 5)).astype(np.float32)
    arr[:] = data
    files = ChunkFiles.of(arr)
    assert files is not None
    for start, stop in [(0, 40), (0, 7), (3, 4), (6, 15), (13, 40), (35, 40)]:
        out = np.full((stop - start, 5), np.nan, dtype=np.float32)
        assert files.read(start, stop, out)
        np.testing.assert_array_equal(out, data[start:stop])
    chunk = tmp_path / "a.zarr" / "log" / "grad" / "c" / "2" / "0"
    chunk.write_bytes(chunk.read_bytes()[:37])
    assert not files.read(10, 20, np.empty((10, 5), dtype=np.float32))
    assert files.read(0, 14, np.empty((14, 5), dtype=np.float32))  # chunks 0 and 1 are whole
    packed = g.create_array("log/packed", shape=(40, 5), chunks=(7, 5), dtype="float32")  # compressed by default
    assert ChunkFiles.of(packed) is None
    assert ChunkFiles.of(zarr.create_array(zarr.storage.MemoryStore(), shape=(4, 5), chunks=(2, 5), dtype="float32",
                                           compressors=None)) is None
