"""The seam between queries and hypergradient sources.

Every query is one source operation with a sign and a column map, so: each query equals the
operation called directly; a third source plugged into the ``SOURCES`` table answers
contributions, top-k, trajectories and class matrices through the same query functions; a source
without an operation says which modes have it. Also the helpers queries, widgets and plots share.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import hydra_nb
from hydra_nb.data import default_loss
from hydra_nb.errors import ReplayError, UnsupportedQuery
from hydra_nb.query import smallest_k
from hydra_nb.sources import SOURCES, HypergradientSource, TestPoints, positions
from hydra_nb.sources.fast import FastSource
from hydra_nb.store import StoreReader
from hydra_nb.units import format_bytes
from test_queries import (TINY, exact_run, fast64, make_test_points, reference_h, rel,  # noqa: F401
                          train_set)


def points_of(model, X, Y, weights=None):
    return TestPoints(model, X, Y, default_loss, weights)


# ------------------------------------------------------------------------------------------
# each query is one source operation
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["fast64", "exact_run"])
def test_every_query_is_one_source_operation(request, which):
    got = request.getfixturevalue(which)
    model, store = got[:2]
    source = store.source()
    assert source.mode == store.mode
    X, Y = make_test_points(5)
    Xtr, Ytr = train_set(store.n_train) if which == "fast64" else got[2:]
    tests = points_of(model, X, Y)
    tracked, N = store.tracked_indices, store.n_train
    C = len(store.checkpoint_steps)

    values = store.contributions(model, X, Y, memory_budget=TINY, progress=False)
    dot = source.dot(tests, [C - 1], positions(tracked, N), len(tracked), budget=TINY)
    np.testing.assert_array_equal(values, -dot[0].T)

    idx = tracked[[2, 0]]
    steps, traj = store.trajectory(model, X, Y, idx, memory_budget=TINY, progress=False)
    dot = source.dot(tests, np.arange(C), positions(idx, N), len(idx), budget=TINY)
    np.testing.assert_array_equal(steps, store.checkpoint_steps)
    np.testing.assert_array_equal(traj, -dot.transpose(2, 0, 1))

    labels = np.arange(N) % 2
    cm = store.class_matrix(model, labels, X, Y, memory_budget=TINY, progress=False)
    onehot = torch.from_numpy((Y.numpy()[None, :] == cm.test_classes[:, None]).astype(np.float64))
    col = np.full(N, -1)
    col[tracked] = labels[tracked]
    sums = -source.dot(tests.weighted(onehot), [-1], col, 2, budget=TINY)[0].astype(np.float64)
    np.testing.assert_array_equal(cm.mean, sums / cm.counts)

    si = store.self_influence(model, (Xtr, Ytr), memory_budget=TINY, progress=False)
    ids = np.sort(tracked)
    train = TestPoints.of_dataset(model, TensorDataset(Xtr, Ytr), tests.loss_fn)
    np.testing.assert_array_equal(si[ids], -source.self_dot(train, ids, -1, budget=TINY))

    h = store.hypergradients(train_indices=idx, memory_budget=TINY)
    np.testing.assert_array_equal(h, source.rows(-1, idx, budget=TINY))


def test_fast_source_on_an_exact_store(exact_run):
    model, store, _, _ = exact_run
    X, Y = make_test_points(3)
    fast = store.source("fast")
    assert isinstance(fast, FastSource) and store.source("fast") is fast  # one per mode, kept
    np.testing.assert_array_equal(fast.tracked, store.tracked_indices)
    got = store.contributions(model, X, Y, mode="fast", progress=False)
    assert got.shape == (3, len(store.tracked_indices))


def test_the_sweep_runs_the_transitions_its_source_gives(fast64):
    model, store = fast64
    calls = []

    def spy(trace):
        calls.append(len(next(iter(trace.values()))))
        return store.reader.optimizer_rule.transitions(trace)

    X, Y = make_test_points(2)
    tests = points_of(model, X, Y)
    col = positions(store.tracked_indices, store.n_train)
    default = FastSource(store.reader).dot(tests, [-1], col, store.n_train, budget=TINY)
    spied = FastSource(store.reader, transitions=spy).dot(tests, [-1], col, store.n_train, budget=TINY)
    assert calls and sum(calls) >= store.steps  # every step's transition came from the spy
    np.testing.assert_array_equal(spied, default)


# ------------------------------------------------------------------------------------------
# a third source
# ------------------------------------------------------------------------------------------
class InMemorySource(HypergradientSource):
    """A source that only has ``dot``: projected h of every sample, computed by the test's reference."""

    mode = "memory"
    refuse = None

    @classmethod
    def unavailable(cls, reader):
        return cls.refuse

    def dot(self, tests, checkpoints, col, n_cols, *, budget, progress=None, engine="numpy"):
        col = self.check_col(col, n_cols)
        projector = self.reader.projector.to(dtype=torch.float64)
        cs = self.checkpoint_indices(checkpoints)
        out = np.zeros((len(cs), n_cols, tests.n_vectors))
        keep = col >= 0
        for s, c in enumerate(cs):
            G = torch.cat(list(self.gradients(tests, c))).to(torch.float64)
            pg = projector.project_flat(G)
            if tests.weights is not None:
                pg = tests.weights @ pg
            scores = reference_h(_StoreView(self.reader), c) @ pg.numpy().T  # (N, m)
            np.add.at(out[s], col[keep], scores[keep])
        return out


class _StoreView:
    """What ``reference_h`` reads of a store, from a reader."""

    def __init__(self, reader):
        self.reader, self.group, self.projector, self.n_train = reader, reader.group, reader.projector, reader.n_train
        self.checkpoint_steps, self.trace = reader.checkpoint_steps, reader.trace
        self.optimizer_rule = reader.optimizer_rule


def test_a_third_source_answers_queries_through_the_same_functions(fast64, monkeypatch):
    model, store = fast64
    monkeypatch.setitem(SOURCES, "memory", InMemorySource)
    X, Y = make_test_points(4)
    fast = store.contributions(model, X, Y, progress=False)
    memory = store.contributions(model, X, Y, mode="memory", progress=False)
    assert memory.shape == fast.shape and rel(memory, fast) < 1e-10

    top = store.top_k(model, X, Y, k=3, mode="memory", progress=False)
    np.testing.assert_array_equal(top.helpful_indices, store.top_k(model, X, Y, k=3, progress=False).helpful_indices)

    _, traj = store.trajectory(model, X, Y, [5, 1, 5], mode="memory", progress=False)
    _, traj_fast = store.trajectory(model, X, Y, [5, 1, 5], progress=False)
    assert rel(traj, traj_fast) < 1e-10

    labels = np.arange(store.n_train) % 3
    cm = store.class_matrix(model, labels, X, Y, mode="memory", progress=False)
    assert rel(cm.mean, store.class_matrix(model, labels, X, Y, progress=False).mean) < 1e-10

    Xtr, Ytr = train_set(store.n_train)
    with pytest.raises(UnsupportedQuery, match=r"'memory' hypergradient source cannot give self-influence "
                                               r"\(it has no self_dot.*mode='fast' or mode='exact'"):
        store.self_influence(model, (Xtr, Ytr), mode="memory")
    with pytest.raises(UnsupportedQuery, match="no rows operation.*mode='fast'"):
        store.hypergradients(mode="memory")

    monkeypatch.setattr(InMemorySource, "refuse", "This store has no memory; track it again.")
    fresh = hydra_nb.open_store(store.path)
    with pytest.raises(ValueError, match="This store has no memory; track it again."):
        fresh.contributions(model, X, Y, mode="memory")


def test_modes_a_store_cannot_give(fast64):
    model, store = fast64
    X, Y = make_test_points(2)
    with pytest.raises(ValueError, match=r"mode must be 'fast', 'exact', 'replay', 'curvature' or None, got 'replayed'"):
        store.contributions(model, X, Y, mode="replayed")
    # exact answers on a fast store come from replaying the run (issue 14); this store (written by hand, as
    # stores were before replay) has no record of what replay needs: the error says so and what to do
    with pytest.raises(ReplayError, match="cannot be replayed: it was recorded before .* track the run again"):
        store.contributions(model, X, Y, mode="exact", train_data=(X, Y))
    assert "tracked in fast mode" in SOURCES["exact"].unavailable(store.reader)  # exact/h: exact-mode stores only
    with pytest.raises(ValueError, match="tracked samples"):
        store.trajectory(model, X, Y, [store.n_train])
    with pytest.raises(ValueError, match="col maps dataset indices"):
        store.source().dot(points_of(model, X, Y), [-1], np.zeros(3, dtype=np.int64), 1, budget=TINY)


def test_exact_source_refuses_untracked_samples(exact_run):
    model, store, Xtr, Ytr = exact_run
    untracked = int(np.setdiff1d(np.arange(store.n_train), store.tracked_indices)[0])
    with pytest.raises(ValueError, match="tracked samples"):
        store.hypergradients(train_indices=[untracked])
    with pytest.raises(ValueError, match=f"{untracked}.* not tracked by this exact run"):
        store.source().rows(-1, [untracked], budget=TINY)


# ------------------------------------------------------------------------------------------
# the Store composes a reader and keeps its public surface
# ------------------------------------------------------------------------------------------
PUBLIC = ["meta", "layout", "mode", "n_train", "steps", "checkpoint_steps", "status", "tracked_indices", "projector",
          "writer", "where", "path", "is_local", "world_size", "optimizer", "group", "log_parts", "loss_fn", "reader"]
METHODS = ["trace", "params_at", "load_params", "array", "log_chunks", "size_on_disk", "_repr_html_", "contributions",
           "trajectory", "top_k", "self_influence", "class_matrix", "hypergradients", "test_gradients",
           "epoch_boundaries", "source"]


def test_store_holds_a_reader_and_keeps_its_surface(fast64):
    model, store = fast64
    assert not isinstance(store, StoreReader) and isinstance(store.reader, StoreReader)
    assert not hasattr(type(store), "__getattr__")
    for name in PUBLIC:
        getattr(store, name)
    for name in METHODS:
        assert callable(getattr(store, name)), name
    assert store.trace()["lr"].shape == (store.steps, len(store.layout.slots))
    np.testing.assert_array_equal(store.params_at(-1), store.reader.params_at(-1))
    assert repr(store).startswith(f"<hydra_nb.Store {str(store.path)!r}: fast mode, 90 tracked of 90 samples")
    np.testing.assert_array_equal(store.epoch_boundaries(), store.checkpoint_steps[1:])


def test_progress_counts_what_the_source_plans(fast64, exact_run):
    for model, store in (fast64, exact_run[:2]):
        X, Y = make_test_points(3)
        calls = []
        store.trajectory(model, X, Y, store.tracked_indices[:2], memory_budget=TINY,
                         progress=lambda d, t: calls.append((d, t)))
        assert calls and all(t == calls[-1][1] for _, t in calls) and calls[-1][0] == calls[-1][1]
        calls.clear()
        store.self_influence(model, train_set(store.n_train) if store.mode == "fast" else exact_run[2:],
                             memory_budget=TINY, progress=lambda d, t: calls.append((d, t)))
        assert calls and calls[-1][0] == calls[-1][1] == calls[0][1]


# ------------------------------------------------------------------------------------------
# test points
# ------------------------------------------------------------------------------------------
def test_test_points(fast64):
    model, _ = fast64
    X, Y = make_test_points(4)
    loss = default_loss
    with pytest.raises(ValueError, match=r"weights must be a matrix \(m, n\) with n = 4"):
        TestPoints(model, X, Y, loss, weights=torch.ones(2, 3))
    with pytest.raises(ValueError, match="differ in length"):
        TestPoints(model, X, Y[:3], loss)
    weighted = TestPoints(model, X, Y, loss, weights=torch.ones(2, 4))
    assert len(weighted) == 4 and weighted.n_vectors == 2
    with pytest.raises(ValueError, match="weighted test points are taken whole"):
        weighted.take([0])
    sub = TestPoints(model, X, Y, loss).take([3, 1])
    assert torch.equal(sub.inputs.value, X[[3, 1]]) and torch.equal(sub.targets, Y[[3, 1]])
    lazy = TestPoints.of_dataset(model, TensorDataset(X, Y), loss)
    assert len(lazy) == 4 and torch.equal(lazy.take([2]).inputs.value, X[[2]])
    with pytest.raises(ValueError, match="take"):
        lazy.weighted(torch.ones(1, 4))


# ------------------------------------------------------------------------------------------
# shared helpers
# ------------------------------------------------------------------------------------------
def test_smallest_k():
    v = np.array([3.0, -1.0, 2.0, -1.0, 0.0])
    np.testing.assert_array_equal(smallest_k(v, 3), [1, 3, 4])  # ties in index order
    np.testing.assert_array_equal(smallest_k(v, 99), [1, 3, 4, 2, 0])
    assert smallest_k(v, 0).shape == (0,)
    m = np.stack([v, -v])
    np.testing.assert_array_equal(smallest_k(m, 2), [[1, 3], [0, 2]])


def test_format_bytes():
    assert format_bytes(512) == "512 B" and format_bytes(1536) == "1.5 KiB" and format_bytes(3 << 30) == "3.0 GiB"
    assert format_bytes(999, binary=False) == "999 B" and format_bytes(12_300, binary=False) == "12.3 kB"
    assert format_bytes(5 << 50) == "5120.0 TiB"


def test_plots_and_queries_import_without_anywidget():
    code = "import sys, hydra_nb.plot, hydra_nb.query, hydra_nb.data; assert 'anywidget' not in sys.modules"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
