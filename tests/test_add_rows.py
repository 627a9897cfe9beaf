"""``Store.add_rows``: a replay-only recording given the fast-mode rows that tracking in fast mode writes.

Each test trains one run twice from the same initialisation and the same shuffled loader, once under
``track(mode="fast")`` and once under ``track(mode="replay")`` (tracking does not change training: the
two runs are the same floating-point computation), then adds rows to the replay store and compares.

The bound (ROWS_TOL). add_rows replays the run with loss Σ_b c_b·ℓ_b where training backpropagated
mean(ℓ) (or a sum, scaled for accumulation): the same terms summed in another order, a few units of
rounding u = 2^-53 ≈ 1.1e-16 apart per step. Each checkpoint interval starts from the stored checkpoint,
so a difference grows over at most one interval (≤ 12 steps here) by the training map's Lipschitz
constant per step, ≤ 1 + η‖H‖ ≈ 1.5 on these MLPs at η ≤ 0.3, i.e. ≤ 1.5^12 ≈ 130; rows and queries are
smooth functions of θ_t with condition numbers of order 10–100. So a relative difference of ~1e-16 ·
130 · 100 ≈ 1e-12 at worst; ROWS_TOL = 1e-10 leaves two orders of margin, and any wrong term (a missing
loss weight, a row at the wrong step, another projection) is off by more than 1e-3.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import hydra_nb
from hydra_nb.errors import ReplayError, StoreOccupied
from reference import DT, AdamRun, make_data, make_loader, make_mlp, rel_err, tracked_training

ROWS_TOL = 1e-10


def tree_hash(path) -> str:
    """SHA-256 over every file's relative path and bytes under ``path``."""
    h = hashlib.sha256()
    for base, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for f in sorted(files):
            p = Path(base) / f
            h.update(str(p.relative_to(path)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def twin_runs(tmp_path, make_opt, *, projection_dim, epochs=2, train_kw=None, reduction="mean", model_fn=make_mlp,
              **track_kw):
    """The same run tracked twice: (fast store, replay store, model, data). ``model_fn`` seeds torch's generator,
    so both runs draw the same dropout masks."""
    X, Y, Xt, Yt = make_data()
    stores = {}
    for mode in ("fast", "replay"):
        model = model_fn()
        opt, sched = make_opt(model)
        kw = dict(train_kw or {})
        if sched is not None:
            kw["scheduler"] = sched
        _, stores[mode] = tracked_training(tmp_path, model, opt, make_loader(X, Y), X, Y, epochs=epochs,
                                           name=f"{mode}.zarr", mode=mode, projection_dim=projection_dim,
                                           reduction=reduction, train_kw=kw, **track_kw)
    assert stores["replay"].meta["committed"]["rows"] == 0  # a replay-only recording: no rows
    return stores["fast"], stores["replay"], model, (X, Y, Xt, Yt)


def sgd_scheduled(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=0.01)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)


def sgd_summed(model):  # a summed loss takes steps |B| times larger than a mean: a smaller lr
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, nesterov=True, weight_decay=0.01)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)


def dropout_mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 3)).to(DT)


def sgd_two_groups(model):
    return torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.2, "momentum": 0.9, "dampening": 0.2},
                            {"params": model[3].parameters(), "lr": 0.1, "weight_decay": 0.02}], lr=0.1), None


def adam(model):
    return torch.optim.Adam(model.parameters(), lr=0.02), None


def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.05), None


def compare_fast_views(fast, rows, model, X, Y, Xt, Yt) -> None:
    np.testing.assert_array_equal(rows.checkpoint_steps, fast.checkpoint_steps)
    for c in range(len(fast.checkpoint_steps)):
        np.testing.assert_allclose(rows.params_at(c), fast.params_at(c), rtol=ROWS_TOL, atol=0)
    assert rows.mode == "fast" and rows.meta["committed"]["rows"] == fast.meta["committed"]["rows"]
    np.testing.assert_array_equal(np.asarray(rows.array("log/sample")[:]), np.asarray(fast.array("log/sample")[:]))
    assert rel_err(rows.array("log/grad")[:], fast.array("log/grad")[:]) < ROWS_TOL
    got = rows.contributions(model, Xt, Yt, mode="fast", progress=False)
    want = fast.contributions(model, Xt, Yt, mode="fast", progress=False)
    assert rel_err(got, want) < ROWS_TOL
    got = rows.self_influence(model, (X, Y), progress=False)
    want = fast.self_influence(model, (X, Y), progress=False)
    assert rel_err(got, want) < ROWS_TOL
    got = rows.class_matrix(model, Y.numpy(), Xt, Yt, progress=False)
    want = fast.class_matrix(model, Y.numpy(), Xt, Yt, progress=False)
    np.testing.assert_array_equal(got.counts, want.counts)
    assert rel_err(np.nan_to_num(got.mean), np.nan_to_num(want.mean)) < ROWS_TOL
    if rows.optimizer_rule.curvature_rows:  # the curvature estimate is built from the rows (and the replay record)
        try:
            want = fast.contributions(model, Xt, Yt, mode="curvature", progress=False)
        except ValueError as exc:  # e.g. accumulation's weights: refused alike
            with pytest.raises(ValueError, match=re.escape(str(exc)[:60])):
                rows.contributions(model, Xt, Yt, mode="curvature", progress=False)
        else:
            got = rows.contributions(model, Xt, Yt, mode="curvature", progress=False)
            assert rel_err(got, want) < ROWS_TOL


CASES = {
    "sgd_scheduler_projected": (sgd_scheduled, dict(projection_dim=64)),
    "sgd_scheduler_full_dimension": (sgd_scheduled, dict(projection_dim=None)),
    "sgd_accumulation_sum": (sgd_summed, dict(projection_dim=64, reduction="sum",
                                                 train_kw={"accum": 2}, checkpoint_every=3)),
    "sgd_two_groups_dropout": (sgd_two_groups, dict(projection_dim=64, model_fn=dropout_mlp,
                                                    run_kw={"record_rng": True})),
    "adam": (adam, dict(projection_dim=64, run_cls=AdamRun)),
    "adamw_accumulation": (adamw, dict(projection_dim=64, train_kw={"accum": 2}, run_cls=AdamRun)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_added_rows_equal_fast_tracking(tmp_path, case):
    make_opt, kw = CASES[case]
    fast, replay, model, (X, Y, Xt, Yt) = twin_runs(tmp_path, make_opt, **kw)
    if kw.get("model_fn") is dropout_mlp:  # the forwards drew masks: add_rows must replay them
        assert (np.asarray(replay.array("replay/call_rng")[:]) >= 0).all()
    before = tree_hash(replay.path)
    rows = replay.add_rows(model, (X, Y), kw["projection_dim"], progress=False)
    assert tree_hash(replay.path) == before  # the original store is only read
    assert Path(rows.path) == tmp_path / "replay-rows.zarr"
    assert rows.meta["rows_added"]["run_id"] == replay.meta["run_id"]
    assert rows.meta["config"]["checkpoint_every"] == replay.meta["config"]["checkpoint_every"]
    compare_fast_views(fast, rows, model, X, Y, Xt, Yt)
    # the new store replays too, to the original's exact answers
    got = rows.contributions(model, Xt, Yt, mode="exact", train_data=(X, Y), progress=False)
    want = replay.contributions(model, Xt, Yt, mode="exact", train_data=(X, Y), progress=False)
    assert rel_err(got, want) < ROWS_TOL


def test_a_dataset_of_items_and_another_path(tmp_path):
    fast, replay, model, (X, Y, Xt, Yt) = twin_runs(tmp_path, sgd_scheduled, projection_dim=64)
    target = tmp_path / "elsewhere" / "rows.zarr"
    target.parent.mkdir()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    model.eval()
    rows = replay.add_rows(model, TensorDataset(X, Y), 64, path=target, progress=False)
    assert not model.training and torch.equal(torch.get_rng_state(), rng)  # a copy trained, from a forked generator
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert Path(rows.path) == target and not [p for p in target.parent.iterdir() if p.name != "rows.zarr"]
    compare_fast_views(fast, rows, model, X, Y, Xt, Yt)


def test_refusals_write_nothing(tmp_path):
    fast, replay, model, (X, Y, Xt, Yt) = twin_runs(tmp_path, sgd_scheduled, projection_dim=16)
    listing = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ReplayError, match="already has its per-sample rows"):
        fast.add_rows(model, (X, Y), 16, progress=False)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ReplayError, match="train_data does not match"):
        replay.add_rows(model, (X[perm], Y[perm]), 16, progress=False)
    with pytest.raises(ValueError, match="30 samples.*train_data has 29"):
        replay.add_rows(model, (X[:29], Y[:29]), 16, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == listing  # no new folder, no temporary left behind

    first = replay.add_rows(model, (X, Y), 16, progress=False)
    written = tree_hash(first.path)
    with pytest.raises(StoreOccupied, match="overwrite=True"):
        replay.add_rows(model, (X, Y), 16, progress=False)
    assert tree_hash(first.path) == written
    with pytest.raises(ValueError, match="the store itself"):
        replay.add_rows(model, (X, Y), 16, path=replay.path, overwrite=True, progress=False)
    again = replay.add_rows(model, (X, Y), 32, overwrite=True, progress=False)
    assert again.meta["projection"]["dim"] <= 32 and again.meta["config"]["projection_dim"] == 32


def test_a_run_that_does_not_replay_is_refused(tmp_path):
    X, Y, Xt, Yt = make_data()
    X2 = X.reshape(len(X), 2, 2)
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    path = tmp_path / "reshaped.zarr"
    loader = make_loader(X2, Y)
    with hydra_nb.track(model, loader, store=path, optimizer=opt, mode="replay", strict=True):
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x.reshape(len(x), 4)), y).backward()
            opt.step()
    store = hydra_nb.open_store(path)
    assert not store.replays
    with pytest.raises(ReplayError, match="does not replay.*called"):
        store.add_rows(model, (X2, Y), 16, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reshaped.zarr"]


def test_a_tampered_checkpoint_stops_it_and_leaves_nothing(tmp_path):
    import zarr

    X, Y, Xt, Yt = make_data()
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    _, store = tracked_training(tmp_path, model, opt, make_loader(X, Y), X, Y, epochs=3, mode="replay")
    arr = zarr.open_array(str(tmp_path / "run.zarr" / "checkpoints" / "params"), mode="r+")
    arr[2] = arr[2] * 1.01
    store = hydra_nb.open_store(tmp_path / "run.zarr")
    # replayed forward, the interval that arrives at the changed checkpoint is the first to differ
    with pytest.raises(ReplayError, match=r"from checkpoint 1 \(step 4\) to checkpoint 2 \(step 8\)"):
        store.add_rows(model, (X, Y), 16, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.zarr"]
