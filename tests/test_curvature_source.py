"""mode="curvature": the curvature source (hydra_nb/sources/curvature.py) through the Store API.

* exactness: where the curvature is exactly what the picked estimate assumes and k = D, every query
  (contributions, top_k, trajectory, class_matrix, self_influence, hypergradients) equals the exact
  derivative (autograd through the unrolled loop) to float error — test_curvature.py's cases, asked as a
  user asks: ``ggn`` picked for two-class softmax regression, ``fisher`` for a negative-log-linear
  likelihood (picked without momentum, asked for with it), the batch reduction read off the run
  (mean, sum, gradient accumulation);
* the two routes (the test-side walk, the embeddings) agree, and with ``curvature="none"`` both are fast
  mode, on a sketched store too;
* the cache: written once, read back bit-identically by another Store; never written while the writer
  lock is held; a half-written or damaged cache is ignored; several passes (a small budget) give the
  same embeddings and a complete cache;
* the refusals, each saying why and what to use; the explorer offers the mode and keeps its default.
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import hydra_nb
from hydra_nb import curvature as cv
from hydra_nb.sources import SOURCES, TestPoints, positions
from hydra_nb.sources.curvature import CACHE_GROUP, CurvatureSource, _store_refusal, choose_spec
from hydra_nb.store import WriterLock
from reference import DT, make_data, make_loader, make_mlp, rel_err, tracked_training, unrolled_contributions
from test_curvature import SGD_VARIANTS, neg_log, neglog_data, neglog_model, squared_onehot, train_case

EXACT_TOL = 1e-9  # as test_curvature.py: float64 sums over ≤ 20 steps of tiny models


def two_class_data(N=30):
    X, _, Xt, _ = make_data(N=N)
    g = torch.Generator().manual_seed(5)
    return X, torch.randint(0, 2, (N,), generator=g), Xt, torch.randint(0, 2, (len(Xt),), generator=g)


def softmax_regression(tmp_path, variant="momentum_wd", name="run.zarr", **kw):
    X, Y, Xt, Yt = two_class_data()
    torch.manual_seed(2)
    model = nn.Linear(4, 2).to(DT)
    opt = torch.optim.SGD(model.parameters(), **SGD_VARIANTS[variant])
    run, store = train_case(tmp_path, model, opt, X, Y, epochs=3, name=name, checkpoint_every=4, **kw)
    return run, store, model, (X, Y, Xt, Yt)


def cache_dirs(store):
    root = store.path / CACHE_GROUP
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.exists() else []


# -- exactness through every query -----------------------------------------------------------------
def check_every_query_exact(run, store, model, X, Y, Xt, Yt, loss_fn=None, labels=None):
    """Each query in mode="curvature" against the unrolled loop's exact derivative."""
    ref = unrolled_contributions(run, Xt, Yt, stops=store.checkpoint_steps)["values"]  # (n, C, N)
    exact = ref[:, -1]
    kw = dict(mode="curvature", loss_fn=loss_fn, progress=False)
    got = store.contributions(model, Xt, Yt, **kw)
    assert rel_err(got, exact) < EXACT_TOL
    steps, traj = store.trajectory(model, Xt, Yt, [3, 0, 7], **kw)
    np.testing.assert_array_equal(steps, store.checkpoint_steps)
    assert rel_err(traj, ref[:, :, [3, 0, 7]]) < EXACT_TOL
    top = store.top_k(model, Xt, Yt, k=4, **kw)
    np.testing.assert_array_equal(top.helpful_indices, np.argsort(-exact, 1, kind="stable")[:, :4])
    assert rel_err(top.helpful_scores, np.take_along_axis(exact, top.helpful_indices, 1)) < EXACT_TOL
    labels = np.arange(store.n_train) % 3 if labels is None else labels
    cm = store.class_matrix(model, labels, Xt, Yt, **kw)
    want = np.array([[exact[np.ix_(Yt.numpy() == b, labels == a)].mean() for b in cm.test_classes]
                     for a in cm.train_classes])
    assert rel_err(cm.mean, want) < EXACT_TOL
    si = store.self_influence(model, (X, Y), mode="curvature", loss_fn=loss_fn, progress=False)
    own = unrolled_contributions(run, X, Y)["values"][:, 0]  # the training points as test points
    assert rel_err(si, np.diag(own)) < EXACT_TOL
    h = store.hypergradients(mode="curvature", train_indices=[5, 2])
    ref_h = unrolled_contributions(run, Xt[:1], Yt[:1], return_h=[5, 2])["h"][store.steps][[5, 2]]
    assert rel_err(h, ref_h.numpy()) < EXACT_TOL  # projection_dim=None: the identity projection


@pytest.mark.parametrize("variant", ["plain", "momentum_wd", "nesterov"])
def test_ggn_is_picked_and_exact_for_two_class_softmax_regression(tmp_path, variant):
    run, store, model, (X, Y, Xt, Yt) = softmax_regression(tmp_path, variant)
    source = store.source("curvature")
    assert source.spec == cv.CurvatureSpec("ggn", logit_bias=cv.output_bias_span(store.meta["projection"], "bias"))
    check_every_query_exact(run, store, model, X, Y, Xt, Yt, labels=Y.numpy())
    fast = store.contributions(model, Xt, Yt, mode="fast", progress=False)
    assert rel_err(fast, store.contributions(model, Xt, Yt, mode="curvature", progress=False)) > 1e-3


def test_fisher_is_picked_without_momentum_and_exact(tmp_path):
    X, Y, Xt, Yt = neglog_data()
    model = neglog_model()
    opt = torch.optim.SGD(model.parameters(), **SGD_VARIANTS["plain"])
    run, store = train_case(tmp_path, model, opt, X, Y, loss_fn=neg_log, epochs=3, checkpoint_every=4)
    assert store.source("curvature").spec == cv.CurvatureSpec("fisher")
    check_every_query_exact(run, store, model, X, Y, Xt, Yt, loss_fn=neg_log)


@pytest.mark.parametrize("case", ["momentum_wd_steplr", "sum", "accumulation"])
def test_fisher_asked_for_is_exact_and_reads_the_batch_reduction(tmp_path, case):
    """With momentum the Fisher is not picked (it diverged in measured runs): asked for, it is exact here; the loss
    weights (mean, sum, a mean over accumulated batches) come from the run's replay record."""
    X, Y, Xt, Yt = neglog_data()
    model = neglog_model()
    variant = {"momentum_wd_steplr": "momentum_wd", "sum": "nesterov_dampening", "accumulation": "nesterov"}[case]
    lr = {"sum": 0.01}.get(case)
    opt = torch.optim.SGD(model.parameters(), **{**SGD_VARIANTS[variant], **({"lr": lr} if lr else {})})
    train_kw = {"scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)} \
        if case == "momentum_wd_steplr" else {"accum": 2} if case == "accumulation" else {}
    run, store = train_case(tmp_path, model, opt, X, Y, loss_fn=neg_log, epochs=3, checkpoint_every=4,
                            reduction="sum" if case == "sum" else "mean", train_kw=train_kw)
    with pytest.raises(ValueError, match="none was found in this log.*used momentum.*curvature='fisher'"):
        store.contributions(model, Xt, Yt, mode="curvature")
    store.curvature = "fisher"
    assert store.source("curvature").spec == cv.CurvatureSpec("fisher", batch_reduction="sum" if case == "sum"
                                                              else "mean")
    check_every_query_exact(run, store, model, X, Y, Xt, Yt, loss_fn=neg_log)
    reopened = hydra_nb.open_store(store.path, loss_fn=neg_log, curvature="fisher")  # the same, from open_store
    np.testing.assert_array_equal(reopened.contributions(model, Xt, Yt, mode="curvature", progress=False),
                                  store.contributions(model, Xt, Yt, mode="curvature", progress=False))


def test_the_picked_estimate_is_not_exact_where_its_assumption_fails(tmp_path):
    """Three classes through a tanh MLP: the ggn estimate is a heuristic there (documented), not the derivative."""
    X, Y, Xt, Yt = make_data(N=30)
    model = make_mlp()
    run, store = train_case(tmp_path, model, torch.optim.SGD(model.parameters(), lr=0.3), X, Y, epochs=3)
    exact = unrolled_contributions(run, Xt, Yt)["values"][:, 0]
    got = store.contributions(model, Xt, Yt, mode="curvature", progress=False)
    assert store.source("curvature").spec.kind == "ggn"
    assert rel_err(got, exact) > 1e-3


# -- the two routes, and fast mode ------------------------------------------------------------------
def test_walk_and_embeddings_agree_and_none_is_fast_mode_on_a_sketch(tmp_path):
    X, Y, Xt, Yt = make_data(N=40, n_test=5)
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    run, store = train_case(tmp_path, model, opt, X, Y, projection_dim=24, checkpoint_every=5)
    assert store.projector.dim < store.layout.size  # a sketch
    for kind in ("none", "ggn"):
        store.curvature = kind
        source = store.source("curvature")
        walked = store.contributions(model, Xt, Yt, mode="curvature", progress=False)  # m = 5 < k/2: the walk
        assert not source._memory
        E = store.hypergradients(mode="curvature")  # the embeddings, now at hand
        pg = store.projector.project_flat(store.test_gradients(model, Xt, Yt).to(DT)).numpy()
        assert rel_err(-(pg @ E.T), walked) < 1e-12
        by_e = store.contributions(model, Xt, Yt, mode="curvature", progress=False)
        assert rel_err(by_e, walked) < 1e-12
        if kind == "none":
            for c in (1, -1):
                fast = store.contributions(model, Xt, Yt, mode="fast", checkpoint=c, progress=False)
                assert rel_err(store.contributions(model, Xt, Yt, mode="curvature", checkpoint=c, progress=False),
                               fast) < 1e-12
            np.testing.assert_allclose(E, store.hypergradients(mode="fast"), rtol=0, atol=1e-12 * np.abs(E).max())
            si = store.self_influence(model, (X, Y), mode="curvature", progress=False)
            assert rel_err(si, store.self_influence(model, (X, Y), mode="fast", progress=False)) < 1e-12
        shutil.rmtree(store.path / CACHE_GROUP)


def test_every_query_is_one_source_operation(tmp_path):
    run, store, model, (X, Y, Xt, Yt) = softmax_regression(tmp_path)
    source = store.source("curvature")
    tests = TestPoints(model, Xt, Yt, store._loss(None))
    N, C = store.n_train, len(store.checkpoint_steps)
    tiny = 1 << 12
    got = store.contributions(model, Xt, Yt, mode="curvature", memory_budget=tiny, progress=False)
    np.testing.assert_array_equal(got, -source.dot(tests, [C - 1], positions(np.arange(N), N), N, budget=tiny)[0].T)
    idx = np.array([4, 1])
    _, traj = store.trajectory(model, Xt, Yt, idx, mode="curvature", memory_budget=tiny, progress=False)
    np.testing.assert_array_equal(traj, -source.dot(tests, np.arange(C), positions(idx, N), 2,
                                                    budget=tiny).transpose(2, 0, 1))
    train = TestPoints.of_dataset(model, TensorDataset(X, Y), tests.loss_fn)
    si = store.self_influence(model, (X, Y), mode="curvature", memory_budget=tiny, progress=False)
    np.testing.assert_array_equal(si, -source.self_dot(train, np.arange(N), -1, budget=tiny))
    np.testing.assert_array_equal(store.hypergradients(mode="curvature", train_indices=idx),
                                  source.rows(-1, idx, budget=tiny))


def test_progress_counts_what_the_source_plans(tmp_path):
    run, store, model, (X, Y, Xt, Yt) = softmax_regression(tmp_path)
    for query, args in (("trajectory", (Xt, Yt, [1, 2])), ("contributions", (Xt, Yt)),
                        ("self_influence", ((X, Y),)), ("contributions", (Xt, Yt))):  # the last: cached E
        calls = []
        getattr(store, query)(model, *args, mode="curvature", memory_budget=1 << 12,
                              progress=lambda d, t: calls.append((d, t)))
        assert calls and all(t == calls[0][1] for _, t in calls) and calls[-1][0] == calls[-1][1], (query, calls)


# -- the cache ---------------------------------------------------------------------------------
def test_cache_is_written_once_and_read_back_bit_identically(tmp_path):
    run, store, model, (X, Y, Xt, Yt) = softmax_regression(tmp_path)
    si = store.self_influence(model, (X, Y), mode="curvature", progress=False)
    source = store.source("curvature")
    names = cache_dirs(store)
    c = len(store.checkpoint_steps) - 1
    assert names == [source.cache_name(c)] and names[0].startswith(f"v1-ggn-step{store.steps}-")
    group = store.path / CACHE_GROUP / names[0]
    ident = json.loads((group / "zarr.json").read_text())["attributes"]["hydra_nb_curvature"]
    assert ident == source.cache_identity(c) and ident["run_id"] == store.meta["run_id"]
    assert ident["log_rows"] == int(store.meta["committed"]["rows"]) and ident["spec"]["kind"] == "ggn"
    rows = store.hypergradients(mode="curvature")
    by_e = store.contributions(model, Xt, Yt, mode="curvature", progress=False)
    other = hydra_nb.open_store(store.path)  # another reader: E from the store's cache, not computed
    assert other.source("curvature")._plan(c, np.arange(30), 1 << 29)[0] == "cache"
    np.testing.assert_array_equal(other.hypergradients(mode="curvature"), rows)
    np.testing.assert_array_equal(other.self_influence(model, (X, Y), mode="curvature", progress=False), si)
    np.testing.assert_array_equal(other.contributions(model, Xt, Yt, mode="curvature", progress=False), by_e)
    np.testing.assert_array_equal(np.asarray(other.group[f"{CACHE_GROUP}/{names[0]}/E"][:]), rows)
    assert cache_dirs(store) == names  # nothing written again
    # another estimate has its own entry; an earlier checkpoint too
    other.curvature = "fisher"
    other.hypergradients(mode="curvature", checkpoint=1)
    assert len(cache_dirs(store)) == 2 and any(n.startswith("v1-fisher-step4-") for n in cache_dirs(store))
    # the store itself reads as before
    assert hydra_nb.open_store(store.path).status == "complete"


def test_no_cache_is_written_while_the_writer_lock_is_held(tmp_path):
    run, store, model, (X, Y, Xt, Yt) = softmax_regression(tmp_path)
    lock = WriterLock(store.path)
    lock.acquire("someone-else")
    try:
        rows = store.hypergradients(mode="curvature")
        assert cache_dirs(store) == [] and not (store.path / CACHE_GROUP).exists()
        np.testing.assert_array_equal(store.hypergradients(mode="curvature"), rows)  # kept in memory
        small = hydra_nb.open_store(store.path)  # several passes, nothing written
        np.testing.assert_allclose(small.hypergradients(mode="curvature", memory_budget=1 << 12), rows, rtol=0,
                                   atol=1e-12 * np.abs(rows).max())
        assert not (store.path / CACHE_GROUP).exists()
    finally:
        lock.release()
    fresh = hydra_nb.open_store(store.path)
    np.testing.assert_array_equal(fresh.hypergradients(mode="curvature"), rows)
    assert len(cache_dirs(store)) == 1


def test_half_written_or_damaged_caches_are_ignored(tmp_path):
    run, store, model, (X, Y, Xt, Yt) = softmax_regression(tmp_path)
    rows = store.hypergradients(mode="curvature")
    (name,) = cache_dirs(store)
    group = store.path / CACHE_GROUP / name
    # a temporary folder a dead process left, and a cache with a missing chunk
    shutil.copytree(group, store.path / CACHE_GROUP / ".tmp-deadbeef")
    for chunk in (group / "E" / "c").rglob("*"):
        if chunk.is_file():
            chunk.unlink()
            break
    damaged = hydra_nb.open_store(store.path)
    assert damaged.source("curvature")._cached(len(store.checkpoint_steps) - 1) is None
    np.testing.assert_array_equal(damaged.hypergradients(mode="curvature"), rows)  # computed again
    # a cache whose identity does not match (e.g. another run's) is not used either
    meta = json.loads((group / "zarr.json").read_text())
    meta["attributes"]["hydra_nb_curvature"]["run_id"] = "another"
    (group / "zarr.json").write_text(json.dumps(meta))
    assert hydra_nb.open_store(store.path).source("curvature")._cached(len(store.checkpoint_steps) - 1) is None


def test_several_passes_give_the_same_embeddings_and_a_complete_cache(tmp_path):
    run, store, model, (X, Y, Xt, Yt) = softmax_regression(tmp_path)
    one = hydra_nb.open_store(store.path)
    lock = WriterLock(store.path)
    lock.acquire("hold")
    try:
        rows = one.hypergradients(mode="curvature")  # one pass, in memory only
    finally:
        lock.release()
    small = 8 * 4 * 10 * 8  # 8 samples × k = 10 float64 numbers per quarter: four groups
    source = store.source("curvature")
    assert source.embedding_block(small) == 8
    ids = np.array([29, 3, 17, 3])
    got = store.hypergradients(mode="curvature", train_indices=ids, memory_budget=small)
    np.testing.assert_allclose(got, rows[ids], rtol=0, atol=1e-12 * np.abs(rows).max())
    (name,) = cache_dirs(store)  # the groups filled the whole cache
    cached = np.asarray(store.group[f"{CACHE_GROUP}/{name}/E"][:])
    np.testing.assert_allclose(cached, rows, rtol=0, atol=1e-12 * np.abs(rows).max())
    np.testing.assert_array_equal(hydra_nb.open_store(store.path).hypergradients(mode="curvature"), cached)


# -- refusals --------------------------------------------------------------------------------
def test_refusals_say_why_and_what_to_use(tmp_path):
    # Adam: the rows are preconditioned by D_t, which the store does not hold
    X, Y, Xt, Yt = make_data(N=24)
    model = make_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    loader = make_loader(X, Y)
    with hydra_nb.track(model, loader, store=str(tmp_path / "adam.zarr"), optimizer=opt, projection_dim=None):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    adam = hydra_nb.open_store(tmp_path / "adam.zarr")
    with pytest.raises(ValueError, match="models SGD's recursion; this run used Adam.*mode='fast'"):
        adam.contributions(model, Xt, Yt, mode="curvature")
    assert "Adam" in SOURCES["curvature"].unavailable(adam.reader)
    # no softmax output bias (a squared error): 'ggn' asked for is refused; the Fisher is picked without momentum
    model = make_mlp()
    run, mse = train_case(tmp_path, model, torch.optim.SGD(model.parameters(), lr=0.1), X, Y, loss_fn=squared_onehot,
                          name="mse.zarr")
    assert mse.source("curvature").spec.kind == "fisher"
    mse.curvature = "ggn"
    with pytest.raises(ValueError, match="curvature='ggn' needs a softmax cross-entropy output layer"):
        mse.contributions(model, Xt, Yt, mode="curvature", loss_fn=squared_onehot)
    mse.curvature = "hessian"
    with pytest.raises(ValueError, match="curvature must be None"):
        mse.source("curvature")
    # an exact store that tracked a subset: the other samples' rows are not in the log
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run, ex = tracked_training(tmp_path, model, opt, make_loader(X, Y), X, Y, mode="exact", projection_dim=None,
                               exact_indices=[0, 3, 5], name="exact.zarr")
    with pytest.raises(ValueError, match="logged rows only for its 3 tracked samples.*mode='exact'"):
        ex.contributions(model, Xt, Yt, mode="curvature")
    # a replay-only store has no rows; a distributed run's rows are in parts
    fake = SimpleNamespace(mode="replay")
    assert "mode='exact' and train_data" in _store_refusal(fake)
    fake = SimpleNamespace(mode="fast", log_parts=[{}, {}])
    assert "distributed run whose log is in 2 parts" in _store_refusal(fake)


def test_choose_spec_is_remembered_per_reader(tmp_path):
    run, store, model, _ = softmax_regression(tmp_path)
    first = choose_spec(store.reader)
    assert choose_spec(store.reader) is first
    assert choose_spec(store.reader, "fisher")[0].kind == "fisher"


# -- the explorer ------------------------------------------------------------------------------
def test_explorer_offers_the_mode_and_keeps_its_default(tmp_path):
    from hydra_nb.widgets.explorer import MODE_LABELS, MODE_PREFERENCE

    assert "curvature" in MODE_LABELS and "curvature" not in MODE_PREFERENCE
    label = MODE_LABELS["curvature"]
    assert "Spearman" in label["figure"] and "RESULTS.md" in label["source"]
    run, store, model, (X, Y, Xt, Yt) = softmax_regression(tmp_path)
    default = hydra_nb.explore(store, model, (Xt, Yt), (X, Y))
    assert default.mode_for() in ("replay", "fast") and default.mode_for("self_dot") == "fast"
    ex = hydra_nb.explore(store, model, (Xt, Yt), (X, Y), mode="curvature")
    assert ex.mode_for() == ex.mode_for("self_dot") == "curvature" and ex.preview_mode() is None
    groups, n = ex.rank(0, k=3)
    want = store.contributions(model, Xt[:1], Yt[:1], mode="curvature", progress=False)[0]
    np.testing.assert_array_equal(groups["helpful"][0], np.argsort(-want, kind="stable")[:3])
    si = ex.self_influence()
    np.testing.assert_array_equal(si, store.self_influence(model, (X, Y), mode="curvature", progress=False))
    assert ex.class_matrix().mean.shape == (2, 2)
