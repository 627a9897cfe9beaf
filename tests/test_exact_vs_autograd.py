"""Exact mode vs autograd through the unrolled training loop (reference (a)).

Tiny float64 models: a 2-layer tanh MLP (4 -> 8 -> 3, 67 parameters), 30 samples,
batches of 8 (a last short batch of 6), 2 epochs = 8 optimizer steps.
"""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from reference import (DT, Run, assert_replay_matches, ce_loss, expected_checkpoints, hessian_free_contributions,
                       layout_check, make_data, make_loader, make_mlp, rel_err, replay_sgd, tracked_training, train,
                       unrolled_contributions)

EXACT_TOL = 1e-6
FAST_TOL = 1e-8


def exact_run(tmp_path, opt_fn, *, epochs=2, scheduler_fn=None, train_kw=None, **track_kw):
    X, Y, Xt, Yt = make_data()
    model = make_mlp()
    opt = opt_fn(model)
    loader = make_loader(X, Y)
    train_kw = dict(train_kw or {})
    if scheduler_fn is not None:
        train_kw["scheduler"] = scheduler_fn(opt)
    track_kw.setdefault("projection_dim", None)
    run, store = tracked_training(tmp_path, model, opt, loader, X, Y, epochs=epochs, mode="exact",
                                  train_kw=train_kw, **track_kw)
    layout_check(run, store)
    return model, run, store, Xt, Yt


def check_exact(model, run, store, Xt, Yt):
    ref = unrolled_contributions(run, Xt, Yt)
    assert_replay_matches(run, ref)
    got = store.contributions(model, Xt, Yt)
    cols = store.tracked_indices
    assert got.shape == (len(Xt), len(cols))
    err = rel_err(got, ref["values"][:, 0, cols])
    assert err < EXACT_TOL, f"exact contributions rel err {err:.3e}"
    return ref


# ------------------------------------------------------------------------------------------
# the references themselves
# ------------------------------------------------------------------------------------------
def test_reference_unrolled_matches_finite_differences():
    """Reference (a) against central finite differences of retraining with weights (1 ± eps) on sample i."""
    X, Y, Xt, Yt = make_data()
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, dampening=0.1, weight_decay=0.01)
    run = Run(model, opt, X, Y)
    train(model, make_loader(X, Y), opt, run, 2)
    ref = unrolled_contributions(run, Xt, Yt)
    assert_replay_matches(run, {"theta": {run.T: replay_sgd(run)}})
    eps = 1e-5
    for i in (0, 19):
        fd = []
        for sgn in (1, -1):
            w = torch.zeros(run.N, dtype=DT)
            w[i] = sgn * eps
            flat = replay_sgd(run, w)
            theta = {n: flat[run.offsets[n]: run.offsets[n] + run.theta0[n].numel()].reshape(run.shapes[n])
                     for n in run.names}
            run.model.eval()
            out = torch.func.functional_call(run.model, theta, (Xt,))
            run.model.train()
            fd.append(ce_loss(out, Yt))
        fd = -(fd[0] - fd[1]) / (2 * eps)
        err = rel_err(ref["values"][:, 0, i], fd.numpy())
        assert err < 1e-5, f"sample {i}: unrolled vs finite differences rel err {err:.2e}"


class _RepeatingBatches:
    """Batches with repeated indices (sampling with replacement within a batch)."""

    def __init__(self, n, seed):
        self.n, self.g = n, torch.Generator().manual_seed(seed)

    def __iter__(self):
        for _ in range(5):
            b = torch.randint(0, self.n, (4,), generator=self.g).tolist()
            yield b + b[:2]

    def __len__(self):
        return 5


@pytest.mark.parametrize("variant", ["basic", "repeats_accum_sum", "grad_none"])
def test_references_agree_when_hessian_vanishes(variant):
    """With a model linear in theta and a loss linear in its outputs, H = 0: (a) and (b) must coincide.
    Also checks (a) against finite differences in the same setting."""
    X, Y, Xt, Yt = make_data()
    torch.manual_seed(5)
    model = nn.Linear(4, 3).to(DT)
    opt = torch.optim.SGD([{"params": [model.weight], "momentum": 0.7, "nesterov": True, "weight_decay": 0.05},
                           {"params": [model.bias], "momentum": 0.5, "dampening": 0.3}], lr=0.1)

    def linear_loss(out, y):
        return -out.gather(1, y[:, None]).squeeze(1) + 0.3 * out.sum(1)

    kw, loader, reduction = {}, make_loader(X, Y), "mean"
    if variant == "repeats_accum_sum":
        loader = DataLoader(TensorDataset(X, Y), batch_sampler=_RepeatingBatches(len(X), 4))
        kw, reduction = {"accum": 2}, "sum"
    if variant == "grad_none":
        def pre_step(t):
            if t in (0, 1, 4):
                model.bias.grad = None
        kw = {"pre_step": pre_step}
    run = Run(model, opt, X, Y, linear_loss, reduction)
    train(model, loader, opt, run, 2, **kw)
    if variant == "repeats_accum_sum":
        assert all(len(s.calls) == 2 for s in run.steps)
    if variant == "grad_none":
        assert [s.active["bias"] for s in run.steps][:6] == [False, False, True, True, False, True]
    a = unrolled_contributions(run, Xt, Yt, stops=[3, run.T])
    b = hessian_free_contributions(run, Xt, Yt, stops=[3, run.T])
    assert_replay_matches(run, a)
    assert_replay_matches(run, b)
    assert rel_err(b["values"], a["values"]) < 1e-12
    eps = 1e-6
    i = int(run.steps[0].calls[0][0][0])  # a sample of the first batch
    losses = []
    for sgn in (1, -1):
        w = torch.zeros(run.N, dtype=DT)
        w[i] = sgn * eps
        flat = replay_sgd(run, w)
        losses.append(linear_loss(Xt @ flat[:12].reshape(3, 4).T + flat[12:], Yt))
    fd = -(losses[0] - losses[1]) / (2 * eps)
    assert rel_err(a["values"][:, 1, i], fd.numpy()) < 1e-6


def test_hessian_terms_matter_for_this_setup():
    """Guard: on the MLP runs used below, exact and Hessian-free differ, so the exact tests discriminate."""
    X, Y, Xt, Yt = make_data()
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    run = Run(model, opt, X, Y)
    train(model, make_loader(X, Y), opt, run, 2)
    a = unrolled_contributions(run, Xt, Yt)
    b = hessian_free_contributions(run, Xt, Yt)
    assert rel_err(b["values"], a["values"]) > 1e-3


# ------------------------------------------------------------------------------------------
# exact mode
# ------------------------------------------------------------------------------------------
def test_exact_plain_sgd(tmp_path):
    model, run, store, Xt, Yt = exact_run(tmp_path, lambda m: torch.optim.SGD(m.parameters(), lr=0.3))
    np.testing.assert_array_equal(store.tracked_indices, np.arange(run.N))
    check_exact(model, run, store, Xt, Yt)


@pytest.mark.parametrize("hvp_method", ["auto", "vmap", "loop"])
def test_exact_momentum_nesterov_weight_decay(tmp_path, hvp_method):
    model, run, store, Xt, Yt = exact_run(
        tmp_path, lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.02),
        hvp_method=hvp_method, hvp_batch=4)
    check_exact(model, run, store, Xt, Yt)


def test_hvp_method_auto_times_both_and_keeps_the_faster(tmp_path):
    import hydra_nb

    X, Y, _, _ = make_data()
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = make_loader(X, Y)
    run = Run(model, opt, X, Y)
    with hydra_nb.track(model, loader, store=str(tmp_path / "a.zarr"), optimizer=opt, mode="exact",
                        projection_dim=None, strict=True, hvp_batch=4) as tracker:
        assert tracker.exact.hvp_method == "auto"
        train(model, loader, opt, run, 1)
    timed = tracker.exact.hvp_seconds
    assert set(timed) == {"vmap", "loop"} and all(t > 0 for t in timed.values())
    assert tracker.exact.hvp_method == min(timed, key=timed.get)
    with pytest.raises(hydra_nb.TrackingConfigError, match="hvp_method must be one of"):
        hydra_nb.track(model, loader, store=str(tmp_path / "b.zarr"), optimizer=opt, mode="exact", hvp_method="fast")


def test_exact_momentum_dampening_weight_decay(tmp_path):
    model, run, store, Xt, Yt = exact_run(
        tmp_path, lambda m: torch.optim.SGD(m.parameters(), lr=0.15, momentum=0.8, dampening=0.35, weight_decay=0.01))
    check_exact(model, run, store, Xt, Yt)


def test_exact_step_lr_scheduler(tmp_path):
    model, run, store, Xt, Yt = exact_run(
        tmp_path, lambda m: torch.optim.SGD(m.parameters(), lr=0.3, momentum=0.5),
        scheduler_fn=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.4))
    lrs = [s.hyper[0]["lr"] for s in run.steps]
    assert len(set(lrs)) >= 3  # the schedule really changed the lr
    check_exact(model, run, store, Xt, Yt)


def test_exact_lambda_lr_scheduler(tmp_path):
    model, run, store, Xt, Yt = exact_run(
        tmp_path, lambda m: torch.optim.SGD(m.parameters(), lr=0.25, momentum=0.9, weight_decay=0.01),
        scheduler_fn=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1.0 / (1.0 + 0.5 * t)))
    check_exact(model, run, store, Xt, Yt)


def test_exact_two_param_groups(tmp_path):
    def opt_fn(m):
        return torch.optim.SGD([
            {"params": m[0].parameters(), "lr": 0.2, "momentum": 0.9, "nesterov": True, "weight_decay": 0.03},
            {"params": m[2].parameters(), "lr": 0.05, "momentum": 0.6, "dampening": 0.2},
        ], lr=1.0)

    model, run, store, Xt, Yt = exact_run(tmp_path, opt_fn)
    assert [s.group for s in store.layout.slots] == [0, 0, 1, 1]
    check_exact(model, run, store, Xt, Yt)


def test_exact_subset_of_indices(tmp_path):
    subset = [17, 3, 0, 29, 11]
    model, run, store, Xt, Yt = exact_run(
        tmp_path, lambda m: torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9, weight_decay=0.01),
        exact_indices=subset)
    assert sorted(store.tracked_indices.tolist()) == sorted(subset)
    got = store.contributions(model, Xt, Yt)
    assert got.shape == (len(Xt), len(subset))
    check_exact(model, run, store, Xt, Yt)


def test_exact_gradient_accumulation_sum_reduction(tmp_path):
    """Accumulate 3 backward calls per step; the leftover batch of each epoch is zeroed without a step."""
    X, Y, Xt, Yt = make_data()
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9)
    loader = make_loader(X, Y, batch_size=6)  # 5 batches per epoch: one step of 3, 2 batches dropped
    run, store = tracked_training(tmp_path, model, opt, loader, X, Y, epochs=3, reduction="sum", mode="exact",
                                  projection_dim=None, train_kw={"accum": 3})
    assert run.T == 3
    check_exact(model, run, store, Xt, Yt)


def test_exact_custom_loss(tmp_path):
    """A custom per-sample loss (squared error on one-hot targets) passed as loss_fn."""
    X, Y, Xt, Yt = make_data()

    def sq_loss(out, y):  # = ||out - onehot(y)||^2, written without F.one_hot (not vmap-able)
        return (out ** 2).sum(1) - 2 * out.gather(1, y[:, None]).squeeze(1) + 1

    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    run, store = tracked_training(tmp_path, model, opt, make_loader(X, Y), X, Y, loss_fn=sq_loss, mode="exact",
                                  projection_dim=None)
    check_exact(model, run, store, Xt, Yt)


def test_exact_trajectory_at_checkpoints(tmp_path):
    model, run, store, Xt, Yt = exact_run(
        tmp_path, lambda m: torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9, dampening=0.1),
        checkpoint_every=3)
    expected = expected_checkpoints(run, 3)
    np.testing.assert_array_equal(store.checkpoint_steps, expected)
    np.testing.assert_array_equal(expected, [0, 3, 6, 8])
    ref = unrolled_contributions(run, Xt, Yt, stops=expected)
    assert_replay_matches(run, ref)
    train_idx = np.array([4, 0, 25, 13])
    steps, values = store.trajectory(model, Xt, Yt, train_idx)
    np.testing.assert_array_equal(steps, expected)
    assert values.shape == (len(Xt), len(expected), len(train_idx))
    assert np.abs(values[:, 0]).max() < 1e-12  # nothing trained yet at step 0
    for c in range(1, len(expected)):
        err = rel_err(values[:, c], ref["values"][:, c, train_idx])
        assert err < EXACT_TOL, f"checkpoint {c} (step {expected[c]}): rel err {err:.3e}"
    # the checkpoint= argument of contributions agrees with the trajectory
    mid = store.contributions(model, Xt, Yt, checkpoint=2)
    assert rel_err(mid[:, train_idx], ref["values"][:, 2, train_idx]) < EXACT_TOL


def test_exact_hypergradients_are_dtheta_dw(tmp_path):
    model, run, store, Xt, Yt = exact_run(
        tmp_path, lambda m: torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9, weight_decay=0.02),
        exact_indices=[2, 9, 21], checkpoint_every=4)
    ref = unrolled_contributions(run, Xt, Yt, stops=[4, run.T], return_h=[2, 9, 21])
    tracked = store.tracked_indices
    for c, s in ((1, 4), (-1, run.T)):
        h = store.hypergradients(checkpoint=c)
        assert h.shape == (3, run.D)
        err = rel_err(h, ref["h"][s][tracked].numpy())
        assert err < EXACT_TOL, f"h at step {s}: rel err {err:.3e}"
    h = store.hypergradients(checkpoint=-1, train_indices=[21, 2])
    assert rel_err(h, ref["h"][run.T][[21, 2]].numpy()) < EXACT_TOL


# ------------------------------------------------------------------------------------------
# the fast estimate recorded by an exact run
# ------------------------------------------------------------------------------------------
def test_exact_store_fast_mode_equals_hessian_free_reference(tmp_path):
    model, run, store, Xt, Yt = exact_run(
        tmp_path, lambda m: torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9, nesterov=True, weight_decay=0.01),
        exact_indices=[1, 5, 8, 22, 27])
    ref_b = hessian_free_contributions(run, Xt, Yt)
    assert_replay_matches(run, ref_b)
    cols = store.tracked_indices
    fast = store.contributions(model, Xt, Yt, mode="fast")
    assert fast.shape == (len(Xt), len(cols))
    err = rel_err(fast, ref_b["values"][:, 0, cols])
    assert err < FAST_TOL, f"fast estimate on exact store: rel err {err:.3e}"
    exact = store.contributions(model, Xt, Yt, mode="exact")
    assert rel_err(fast, exact) > 1e-4  # they are different quantities
    check_exact(model, run, store, Xt, Yt)


def test_exact_store_fast_mode_projected(tmp_path):
    model, run, store, Xt, Yt = exact_run(
        tmp_path, lambda m: torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.8, dampening=0.25),
        projection_dim=24, exact_indices=[0, 4, 12, 19])
    assert store.projector.dim <= 24
    ref_b = hessian_free_contributions(run, Xt, Yt)
    cols = store.tracked_indices
    P = store.projector
    g = ref_b["test_grad"][run.T]
    h = ref_b["h"][run.T][cols]
    expected = -(P.project_flat(g)[:, None, :] * P.project_flat(h)[None, :, :]).sum(-1).numpy()
    fast = store.contributions(model, Xt, Yt, mode="fast")
    err = rel_err(fast, expected)
    assert err < 1e-10, f"projected fast estimate on exact store: rel err {err:.3e}"
    check_exact(model, run, store, Xt, Yt)  # projection does not touch the exact h
