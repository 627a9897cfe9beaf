"""Reverse-mode replay: exact contributions of every training sample, against autograd through the
unrolled, weighted training loop (``reference.unrolled_contributions``), on tiny float64 models.

Both sides are exact derivatives of the same run, computed in different orders (one differentiates
the whole unrolled loop, the other walks it back one vector–Jacobian product at a time), so they
differ by rounding only: ~1e-15 relative is what they show; EXACT_TOL leaves room for the
conditioning of up to ~40 steps of these models, and any wrong term (a missing momentum path, a
sample's weight in the wrong batch) is off by more than 1e-3.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, TensorDataset

import hydra_nb
from hydra_nb.errors import ReplayError, UnsupportedQuery
from hydra_nb.store import read_meta
from reference import (DT, AdamRun, Run, ce_loss, expected_checkpoints, make_data, make_loader, make_mlp, rel_err,
                       tracked_training, train, unrolled_contributions)

EXACT_TOL = 1e-8


def replay_exact(store, model, Xt, Yt, X, Y, **kw):
    return store.contributions(model, Xt, Yt, mode="exact", train_data=(X, Y), progress=False, **kw)


def check(run, store, model, X, Y, Xt, Yt, **kw):
    ref = unrolled_contributions(run, Xt, Yt)["values"][:, -1]
    got = replay_exact(store, model, Xt, Yt, X, Y, **kw)
    assert got.shape == (len(Xt), len(X))
    err = rel_err(got, ref)
    assert err < EXACT_TOL, f"replay vs unrolled autograd: rel err {err:.2e}"
    return got, ref


# -- every SGD feature fast mode supports ----------------------------------------------------------
SGD_CASES = {
    "plain": (dict(lr=0.3), {}),
    "momentum_dampening_wd": (dict(lr=0.2, momentum=0.8, dampening=0.3, weight_decay=0.01), {}),
    "nesterov": (dict(lr=0.2, momentum=0.9, nesterov=True, weight_decay=0.005), {}),
    "accumulation": (dict(lr=0.2, momentum=0.5), {"train_kw": {"accum": 2}}),
    "sum_reduction": (dict(lr=0.02, momentum=0.9), {"reduction": "sum"}),
    "checkpoints_every_3_steps": (dict(lr=0.2, momentum=0.9), {"checkpoint_every": 3}),
}


@pytest.mark.parametrize("case", sorted(SGD_CASES))
def test_sgd_features(tmp_path, case):
    opt_kw, kw = SGD_CASES[case]
    X, Y, Xt, Yt = make_data()
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), **opt_kw)
    run, store = tracked_training(tmp_path, model, opt, make_loader(X, Y), X, Y, epochs=3, projection_dim=16, **kw)
    check(run, store, model, X, Y, Xt, Yt)


def test_sgd_param_groups_scheduler_short_batches_and_replacement(tmp_path):
    """Two groups with their own hyperparameters, a per-step scheduler, sampling with replacement (a sample
    may be twice in one batch) and a short last batch."""
    X, Y, Xt, Yt = make_data(N=27)
    model = make_mlp()
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.2, "momentum": 0.9},
                           {"params": model[2].parameters(), "lr": 0.1, "weight_decay": 0.02}], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.7)
    sampler = RandomSampler(range(len(X)), replacement=True, num_samples=len(X),
                            generator=torch.Generator().manual_seed(5))
    loader = DataLoader(TensorDataset(X, Y), batch_size=8, sampler=sampler)
    run, store = tracked_training(tmp_path, model, opt, loader, X, Y, epochs=2, projection_dim=None,
                                  train_kw={"scheduler": sched})
    assert any(len(set(c[0].tolist())) < len(c[0]) for s in run.steps for c in s.calls), "no repeated sample drawn"
    check(run, store, model, X, Y, Xt, Yt)


def test_a_parameter_without_gradient_for_some_steps(tmp_path):
    X, Y, Xt, Yt = make_data()
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=0.01)

    def drop_bias_grad(t):  # SGD skips a parameter whose .grad is None: momentum and weight decay included
        if t % 3 == 1:
            model[2].bias.grad = None

    run, store = tracked_training(tmp_path, model, opt, make_loader(X, Y), X, Y, epochs=2,
                                  train_kw={"pre_step": drop_bias_grad})
    check(run, store, model, X, Y, Xt, Yt)


# -- Adam and AdamW: exact, the second moment's dependence on w included ---------------------------
ADAM_CASES = {
    "adam": lambda p: torch.optim.Adam(p, lr=0.02),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.02, weight_decay=0.05),
    "adam_coupled_l2": lambda p: torch.optim.Adam(p, lr=0.02, weight_decay=0.05),
    "amsgrad": lambda p: torch.optim.Adam(p, lr=0.02, amsgrad=True, betas=(0.8, 0.95)),
}


@pytest.mark.parametrize("case", sorted(ADAM_CASES))
def test_adam_is_exact(tmp_path, case):
    X, Y, Xt, Yt = make_data()
    model = make_mlp()
    opt = ADAM_CASES[case](model.parameters())
    # coupled L2 cannot be followed by fast mode's projected log: record for replay only
    mode = "replay" if case == "adam_coupled_l2" else "fast"
    run, store = tracked_training(tmp_path, model, opt, make_loader(X, Y), X, Y, epochs=2, run_cls=AdamRun,
                                  mode=mode)
    check(run, store, model, X, Y, Xt, Yt)


def test_adam_with_an_entry_that_never_had_a_gradient(tmp_path):
    """v = 0 where a gradient entry was always exactly zero (a unit whose input is always 0): the derivative of
    √v there is taken as its limit (0), so the answer is finite and equals the unrolled loop's."""
    X, Y, Xt, Yt = make_data()
    X = X.clone()
    X[:, 0] = 0.0  # the first input feature never varies: its weights get exactly zero gradients
    Xt = Xt.clone()
    Xt[:, 0] = 0.0
    model = make_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    run, store = tracked_training(tmp_path, model, opt, make_loader(X, Y), X, Y, epochs=2, run_cls=AdamRun)
    got, _ = check(run, store, model, X, Y, Xt, Yt)
    assert np.isfinite(got).all()


# -- randomness and batch coupling -------------------------------------------------------------------
def test_dropout_masks_are_replayed(tmp_path):
    X, Y, Xt, Yt = make_data()
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 3)).to(DT)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    run, store = tracked_training(tmp_path, model, opt, make_loader(X, Y), X, Y, epochs=2,
                                  run_kw={"record_rng": True})
    check(run, store, model, X, Y, Xt, Yt)


def test_batchnorm_in_training_mode(tmp_path):
    X, Y, Xt, Yt = make_data()
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    run, store = tracked_training(tmp_path, model, opt, make_loader(X, Y, drop_last=True), X, Y, epochs=2)
    run.test_buffers = {n: b.detach().clone() for n, b in model.named_buffers()}  # as the store's last checkpoint
    check(run, store, model, X, Y, Xt, Yt)


# -- the same answer whatever the recording ---------------------------------------------------------
@pytest.mark.parametrize("projection_dim", [None, 16])
def test_projection_does_not_matter_and_equals_forward_exact_mode(tmp_path, projection_dim):
    X, Y, Xt, Yt = make_data()
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=0.01)
    run, store = tracked_training(tmp_path, model, opt, make_loader(X, Y), X, Y, epochs=2, mode="exact",
                                  projection_dim=projection_dim)
    forward = store.contributions(model, Xt, Yt, mode="exact", progress=False)  # exact/h, recorded forward
    backward = store.contributions(model, Xt, Yt, mode="replay", train_data=(X, Y), progress=False)
    assert rel_err(backward, forward) < EXACT_TOL
    check(run, store, model, X, Y, Xt, Yt)


def test_trajectory_top_k_and_class_matrix_by_replay(tmp_path):
    X, Y, Xt, Yt = make_data()
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    run, store = tracked_training(tmp_path, model, opt, make_loader(X, Y), X, Y, epochs=3)
    stops = expected_checkpoints(run, "epoch")
    ref = unrolled_contributions(run, Xt, Yt, stops=stops)["values"]  # (n_test, C, N)
    idx = [3, 0, 17]
    steps, traj = store.trajectory(model, Xt, Yt, idx, mode="exact", train_data=(X, Y), progress=False)
    np.testing.assert_array_equal(steps, stops)
    assert rel_err(traj, ref[:, :, idx]) < EXACT_TOL
    values = ref[:, -1]
    top = store.top_k(model, Xt, Yt, k=4, mode="exact", train_data=(X, Y), progress=False)
    for j in range(len(Xt)):
        assert set(top.helpful_indices[j]) == set(np.argsort(-values[j])[:4])
        np.testing.assert_allclose(top.helpful_scores[j], np.sort(values[j])[::-1][:4], rtol=EXACT_TOL, atol=0)
    cm = store.class_matrix(model, Y.numpy(), Xt, Yt, mode="exact", train_data=(X, Y), progress=False)
    for a, ca in enumerate(cm.train_classes):
        for b, cb in enumerate(cm.test_classes):
            block = values[np.ix_(Yt.numpy() == cb, Y.numpy() == ca)]
            assert abs(cm.mean[a, b] - block.mean()) <= EXACT_TOL * np.abs(values).max()


def test_a_small_memory_budget_replays_in_pieces(tmp_path):
    X, Y, Xt, Yt = make_data()
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    run, store = tracked_training(tmp_path, model, opt, make_loader(X, Y), X, Y, epochs=3)
    whole = replay_exact(store, model, Xt, Yt, X, Y)
    pieces = replay_exact(store, model, Xt, Yt, X, Y, memory_budget=4096)  # two states of θ and momentum at a time
    np.testing.assert_allclose(pieces, whole, rtol=1e-12, atol=1e-15)  # the same replayed states
    check(run, store, model, X, Y, Xt, Yt)


def test_the_budget_bounds_how_many_test_vectors_share_a_product(tmp_path, monkeypatch):
    """Each test vector in a vmapped product costs about one step graph G: a quarter of the budget bounds how many
    go through it together (⌊budget/4 / G⌋, at least 1); the numbers do not depend on it."""
    from hydra_nb.replay.walk import Replayer

    X, Y, Xt, Yt = make_data()
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    run, store = tracked_training(tmp_path, model, opt, make_loader(X, Y), X, Y, epochs=2)
    seen = []
    original = Replayer._batched_vjp

    def spy(self, outputs, inputs, cots):
        seen.append((cots[0].shape[0], self.graph_bytes))
        return original(self, outputs, inputs, cots)

    monkeypatch.setattr(Replayer, "_batched_vjp", spy)
    whole = replay_exact(store, model, Xt, Yt, X, Y)
    assert max(n for n, _ in seen) == len(Xt) > 1  # the default budget holds every vector at once here
    graph = seen[0][1]
    assert graph > 0
    seen.clear()
    budget = 4 * 2 * graph + 3  # a quarter: room for two vectors in the product (states: at least 2, as always)
    small = replay_exact(store, model, Xt, Yt, X, Y, memory_budget=budget)
    assert max(n for n, _ in seen) == 2 and len(Xt) > 2
    np.testing.assert_allclose(small, whole, rtol=1e-12, atol=1e-15)


def test_a_dataset_of_items_and_a_custom_loss(tmp_path):
    X, Y, Xt, Yt = make_data()
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)

    def smooth_ce(out, y):
        return F.cross_entropy(out, y, reduction="none", label_smoothing=0.1)

    run, store = tracked_training(tmp_path, model, opt, make_loader(X, Y), X, Y, epochs=2, loss_fn=smooth_ce)
    got = store.contributions(model, Xt, Yt, mode="exact", train_data=TensorDataset(X, Y), progress=False)
    ref = unrolled_contributions(run, Xt, Yt)["values"][:, -1]
    assert rel_err(got, ref) < EXACT_TOL


# -- refusing what did not replay --------------------------------------------------------------------
class Augmented(Dataset):
    """A dataset that adds random noise to each sample it serves (random augmentation)."""

    def __init__(self, X, Y, on: bool = True):
        self.X, self.Y, self.on = X, Y, on

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        return (self.X[i] + 0.1 * torch.randn_like(self.X[i]) if self.on else self.X[i]), self.Y[i]


def test_random_augmentation_is_refused(tmp_path):
    X, Y, Xt, Yt = make_data()
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    path = tmp_path / "aug.zarr"
    loader = DataLoader(Augmented(X, Y), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    with hydra_nb.track(model, loader, store=path, optimizer=opt, strict=True):
        for _ in range(2):
            for x, y in loader:
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
    store = hydra_nb.open_store(path)
    # caught by the fingerprint of the first batch recorded while tracking, before any replay work
    with pytest.raises(ReplayError, match=r"random augmentation"):
        store.contributions(model, Xt, Yt, mode="exact", train_data=(X, Y), progress=False)
    fast = store.contributions(model, Xt, Yt, progress=False)  # fast mode is unaffected
    assert np.isfinite(fast).all()


def test_augmentation_from_the_second_epoch_on_is_caught_by_the_drift_check(tmp_path):
    """The first batch matches train_data (no augmentation yet), so only replaying shows the difference."""
    X, Y, Xt, Yt = make_data()
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    data = Augmented(X, Y, on=False)
    loader = DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "aug2.zarr"
    with hydra_nb.track(model, loader, store=path, optimizer=opt, strict=True):
        for epoch in range(2):
            data.on = epoch > 0
            for x, y in loader:
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
    store = hydra_nb.open_store(path)
    with pytest.raises(ReplayError, match=r"from checkpoint 1 \(step 4\) to checkpoint 2 \(step 8\).*random augmentation"):
        store.contributions(model, Xt, Yt, mode="exact", train_data=(X, Y), progress=False)


def test_a_tampered_checkpoint_is_refused(tmp_path):
    import zarr

    X, Y, Xt, Yt = make_data()
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    run, store = tracked_training(tmp_path, model, opt, make_loader(X, Y), X, Y, epochs=3)
    arr = zarr.open_array(str(tmp_path / "run.zarr" / "checkpoints" / "params"), mode="r+")
    arr[2] = arr[2] * 1.01
    store = hydra_nb.open_store(tmp_path / "run.zarr")
    with pytest.raises(ReplayError, match=r"from checkpoint 2 \(step 8\) to checkpoint 3 \(step 12\)"):
        replay_exact(store, model, Xt, Yt, X, Y)


def test_wrong_train_data_is_refused(tmp_path):
    X, Y, Xt, Yt = make_data()
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    run, store = tracked_training(tmp_path, model, opt, make_loader(X, Y), X, Y, epochs=2)
    with pytest.raises(ValueError, match="30 samples.*train_data has 29"):
        replay_exact(store, model, Xt, Yt, X[:29], Y[:29])
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ReplayError, match="train_data"):
        replay_exact(store, model, Xt, Yt, X[perm], Y[perm])
    with pytest.raises(ValueError, match="train_data"):
        store.contributions(model, Xt, Yt, mode="exact", progress=False)  # a fast store needs train_data


def test_a_loop_that_reshapes_the_batch_is_recorded_as_not_replayable(tmp_path):
    """The model is called on x.view(...), not on the batch: replay (which calls model(inputs) on train_data's
    items) cannot reproduce that, says why, and fast mode still answers."""
    X, Y, Xt, Yt = make_data()
    X2 = X.reshape(len(X), 2, 2)
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    path = tmp_path / "reshaped.zarr"
    loader = make_loader(X2, Y)
    with hydra_nb.track(model, loader, store=path, optimizer=opt, strict=True):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x.reshape(len(x), 4)), y).backward()
            opt.step()
    store = hydra_nb.open_store(path)
    assert not store.replays and "called" in store.replay_status
    with pytest.raises(ReplayError, match="cannot be replayed"):
        store.contributions(model, Xt, Yt, mode="exact", train_data=(X2, Y), progress=False)
    assert np.isfinite(store.contributions(model, Xt, Yt, progress=False)).all()


def test_an_interrupted_run_replays_up_to_its_last_checkpoint(tmp_path):
    X, Y, Xt, Yt = make_data()
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    loader = make_loader(X, Y)
    run = Run(model, opt, X, Y)
    path = tmp_path / "cut.zarr"
    with pytest.raises(KeyboardInterrupt):
        with hydra_nb.track(model, loader, store=path, optimizer=opt, checkpoint_every=3):
            for x, y in loader:
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                run.backward(x, y)
                run.before_step()
                opt.step()
                if run.T == 4:
                    raise KeyboardInterrupt
    store = hydra_nb.open_store(path)
    assert store.steps == 4 and "interrupted" in store.status  # the stop at step 4 is checkpointed
    ref = unrolled_contributions(run, Xt, Yt)["values"][:, -1]
    assert rel_err(replay_exact(store, model, Xt, Yt, X, Y), ref) < EXACT_TOL


def test_a_store_still_being_written_answers_for_its_committed_part(tmp_path):
    X, Y, Xt, Yt = make_data()
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    loader = make_loader(X, Y)
    run = Run(model, opt, X, Y)
    path = tmp_path / "live.zarr"
    with hydra_nb.track(model, loader, store=path, optimizer=opt, strict=True):
        train(model, loader, opt, run, 2)
        deadline = time.time() + 60
        while read_meta(path)["committed"]["checkpoints"] < 3 and time.time() < deadline:
            time.sleep(0.01)  # the writer thread commits the epoch's checkpoint in the background
        store = hydra_nb.open_store(path)  # opened while the writer still holds the store
        assert store.status.startswith("running")
        S = int(store.steps)
        with pytest.warns(RuntimeWarning, match=f"still being written.*step {S}"):
            got = replay_exact(store, model, Xt, Yt, X, Y)
        train(model, loader, opt, run, 1)  # training goes on
    ref = unrolled_contributions(run, Xt, Yt, stops=[S])["values"][:, 0]
    assert S == 8 and rel_err(got, ref) < EXACT_TOL


def test_replay_without_retrains_with_the_samples_weighted_zero(tmp_path):
    """store.replay_without: the run again, same batches, the removed samples' loss terms weighted 0; and the
    contributions predict the change of a test loss it causes, to first order."""
    from reference import replay_sgd

    X, Y, Xt, Yt = make_data()
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=0.01)
    run, store = tracked_training(tmp_path, model, opt, make_loader(X, Y), X, Y, epochs=2)
    remove = [3, 11]
    w = torch.zeros(len(X), dtype=DT)
    w[remove] = -1.0
    expected = replay_sgd(run, w)  # the reference's loop, with those terms weighted (1 + w) = 0
    without = store.replay_without(model, remove, train_data=(X, Y), progress=False)
    got = torch.cat([p.detach().reshape(-1) for p in without.parameters()])
    assert float((got - expected).norm() / expected.norm()) < EXACT_TOL
    assert not without.training and without is not model
    # first order: ΔL(z) ≈ Σ_{i removed} contributions[z, i]
    c = replay_exact(store, model, Xt, Yt, X, Y)
    with torch.no_grad():
        before = F.cross_entropy(model.eval()(Xt), Yt, reduction="none")
        after = F.cross_entropy(without(Xt), Yt, reduction="none")
    predicted = c[:, remove].sum(1)
    actual = (after - before).numpy()
    assert np.corrcoef(predicted, actual)[0, 1] > 0.9
    with pytest.raises(ValueError, match="dataset indices"):
        store.replay_without(model, [len(X)], train_data=(X, Y))


def test_replay_leaves_the_users_model_and_random_state_alone(tmp_path):
    X, Y, Xt, Yt = make_data()
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.2), nn.Linear(6, 3)).to(DT)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    # BatchNorm with dropout: fast mode's per-sample capture refuses it; a replay-only recording does not need it
    run, store = tracked_training(tmp_path, model, opt, make_loader(X, Y, drop_last=True), X, Y, epochs=1,
                                  run_kw={"record_rng": True}, mode="replay")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    model.eval()
    replay_exact(store, model, Xt, Yt, X, Y)
    assert not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_replay_only_store_refuses_self_influence_before_any_work(tmp_path):
    """Self-influence needs a walk per training sample by replay: asked of a replay-only recording (no rows), it is
    refused at once, saying which modes could give it and why this store has none of them; its exact answers work."""
    X, Y, Xt, Yt = make_data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    run, store = tracked_training(tmp_path, model, opt, make_loader(X, Y), X, Y, epochs=1, mode="replay")
    for mode in (None, "exact", "replay"):
        with pytest.raises(UnsupportedQuery, match=r"Self-influence cannot come from mode='replay'.*'fast'.*"
                                                   r"recorded with mode='replay'.*mode='fast'.*store.add_rows"):
            store.self_influence(model, (X, Y), mode=mode, progress=lambda done, total: pytest.fail("work began"))
    assert np.isfinite(replay_exact(store, model, Xt, Yt, X, Y)).all()
