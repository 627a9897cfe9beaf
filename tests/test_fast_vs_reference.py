"""Fast mode vs the Hessian-free full-dimensional recursion (reference (b)).

Float64 2-layer tanh MLP (67 parameters), 30 samples, fast mode. Full dimension
(projection_dim=None) must match to 1e-8 relative; with a projection, the store must
equal the projected reference -<P g_test, P h_ref> (the projection is linear and
block-diagonal per parameter, so this is exact up to rounding).
"""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, Sampler, SubsetRandomSampler, TensorDataset

from functional_check import replay_from_store
from reference import (DT, assert_replay_matches, expected_checkpoints, hessian_free_contributions,
                       layout_check, make_data, make_loader, make_mlp, rel_err, replay_tolerance, tracked_training)

FAST_TOL = 1e-8
PROJ_TOL = 1e-10


def fast_case(tmp_path, opt_fn=None, *, loader_fn=None, N=30, epochs=2, reduction="mean", train_kw=None,
              scheduler_fn=None, model=None, run_kw=None, **track_kw):
    X, Y, Xt, Yt = make_data(N)
    model = model if model is not None else make_mlp()
    opt = (opt_fn or (lambda m: torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9)))(model)
    loader = loader_fn(X, Y) if loader_fn is not None else make_loader(X, Y)
    train_kw = dict(train_kw or {})
    if scheduler_fn is not None:
        train_kw["scheduler"] = scheduler_fn(opt)
    track_kw.setdefault("projection_dim", None)
    run, store = tracked_training(tmp_path, model, opt, loader, X, Y, epochs=epochs, reduction=reduction,
                                  mode="fast", train_kw=train_kw, run_kw=run_kw, **track_kw)
    layout_check(run, store)
    np.testing.assert_array_equal(store.tracked_indices, np.arange(N))
    return model, run, store, Xt, Yt


def check_fast(model, run, store, Xt, Yt, tol=FAST_TOL):
    ref = hessian_free_contributions(run, Xt, Yt)
    assert_replay_matches(run, ref)
    got = store.contributions(model, Xt, Yt)
    assert got.shape == (len(Xt), run.N)
    err = rel_err(got, ref["values"][:, 0])
    assert err < tol, f"fast contributions rel err {err:.3e}"
    return ref


def projected_expected(store, ref, step, idx=None):
    P = store.projector
    g = ref["test_grad"][step]
    h = ref["h"][step] if idx is None else ref["h"][step][idx]
    return -(P.project_flat(g)[:, None, :] * P.project_flat(h)[None, :, :]).sum(-1).numpy()


def all_batches(run):
    return [idx for step in run.steps for idx, *_ in step.calls]


# ------------------------------------------------------------------------------------------
# optimizer hyperparameters
# ------------------------------------------------------------------------------------------
OPTIMIZERS = {
    "plain": dict(lr=0.3),
    "weight_decay": dict(lr=0.3, weight_decay=0.05),
    "momentum": dict(lr=0.1, momentum=0.9),
    "dampening": dict(lr=0.1, momentum=0.8, dampening=0.4),
    "dampening_wd": dict(lr=0.1, momentum=0.7, dampening=0.9, weight_decay=0.02),
    "nesterov": dict(lr=0.1, momentum=0.9, nesterov=True),
    "nesterov_wd": dict(lr=0.1, momentum=0.85, nesterov=True, weight_decay=0.03),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_fast_sgd_hyperparameters(tmp_path, name):
    model, run, store, Xt, Yt = fast_case(tmp_path, lambda m: torch.optim.SGD(m.parameters(), **OPTIMIZERS[name]))
    assert any(len(b) == 6 for b in all_batches(run))  # last short batch (30 = 3*8 + 6)
    check_fast(model, run, store, Xt, Yt)


def test_fast_three_param_groups(tmp_path):
    def opt_fn(m):
        return torch.optim.SGD([
            {"params": [m[0].weight], "lr": 0.2, "momentum": 0.9, "nesterov": True, "weight_decay": 0.02},
            {"params": [m[0].bias, m[2].weight], "lr": 0.07, "momentum": 0.5, "dampening": 0.3},
            {"params": [m[2].bias], "lr": 0.4, "weight_decay": 0.1},
        ], lr=1.0)

    model, run, store, Xt, Yt = fast_case(tmp_path, opt_fn)
    assert [s.group for s in store.layout.slots] == [0, 1, 1, 2]
    check_fast(model, run, store, Xt, Yt)


def test_store_trace_replays_training(tmp_path):
    """The store holds everything SGD's step depends on: θ_0 from the store, its trace rows and the recorded batches'
    gradients through ``functional_step`` give every checkpoint (three groups, Nesterov, dampening, a schedule,
    gradient accumulation, a parameter without .grad at some steps)."""
    model = make_mlp()

    def pre_step(t):
        if t in (0, 3):
            model[2].weight.grad = None

    def opt_fn(m):
        return torch.optim.SGD([
            {"params": [m[0].weight], "lr": 0.2, "momentum": 0.9, "nesterov": True, "weight_decay": 0.02},
            {"params": [m[0].bias, m[2].weight], "lr": 0.07, "momentum": 0.5, "dampening": 0.3},
            {"params": [m[2].bias], "lr": 0.4, "weight_decay": 0.1},
        ], lr=1.0)

    _, run, store, _, _ = fast_case(
        tmp_path, opt_fn, model=model, checkpoint_every=2, epochs=3, train_kw={"pre_step": pre_step, "accum": 2},
        scheduler_fn=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5))
    assert not store.trace()["active"][0, 2] and store.trace()["first"][1, 2]
    thetas = replay_from_store(run, store)
    assert sorted(thetas) == list(store.checkpoint_steps)
    for c, s in enumerate(store.checkpoint_steps):
        stored = torch.from_numpy(store.params_at(c))
        assert float((thetas[int(s)] - stored).norm() / stored.norm()) < replay_tolerance(run), s


SCHEDULERS = {
    "step_lr": (lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5), "step"),
    "lambda_lr": (lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1.0 / (1.0 + t)), "step"),
    "cosine": (lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=8), "step"),
    "exponential_per_epoch": (lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.3), "epoch"),
    # OneCycleLR also cycles the momentum every step
    "one_cycle": (lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.4, total_steps=8), "step"),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_fast_lr_schedulers(tmp_path, name):
    sched_fn, per = SCHEDULERS[name]

    def opt_fn(m):
        return torch.optim.SGD([
            {"params": m[0].parameters(), "lr": 0.2, "momentum": 0.9, "weight_decay": 0.01},
            {"params": m[2].parameters(), "lr": 0.1, "momentum": 0.8, "nesterov": True},
        ], lr=0.1)

    model, run, store, Xt, Yt = fast_case(tmp_path, opt_fn, scheduler_fn=sched_fn, train_kw={"scheduler_per": per})
    lrs = {s.hyper[0]["lr"] for s in run.steps}
    assert len(lrs) >= 2  # the lr really changed during training
    if name == "one_cycle":
        assert len({s.hyper[0]["momentum"] for s in run.steps}) >= 2
    check_fast(model, run, store, Xt, Yt)


class SwitchMLP(nn.Module):
    """An MLP with a second head that the loop switches on for some steps only (unused: .grad None)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.body = nn.Linear(4, 8).to(DT)
        self.head_a = nn.Linear(8, 3).to(DT)
        self.head_b = nn.Linear(8, 3).to(DT)
        self.use_b = False

    def forward(self, x):
        z = torch.tanh(self.body(x))
        out = self.head_a(z)
        return out + self.head_b(z) if self.use_b else out


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_fast_unused_branch_grad_none_is_skipped(tmp_path, momentum):
    """head_b is used on steps 3, 4 and 6 only: at the other steps its .grad is None and SGD skips it
    (no weight decay, no momentum update); its first momentum step is step 3."""
    model = SwitchMLP()

    def pre_step(t):  # choose the forward of the next step
        model.use_b = (t + 1) in (3, 4, 6)

    model, run, store, Xt, Yt = fast_case(
        tmp_path, lambda m: torch.optim.SGD(m.parameters(), lr=0.2, momentum=momentum, weight_decay=0.05),
        model=model, train_kw={"pre_step": pre_step}, run_kw={"state_attrs": ("use_b",)})
    assert [s.active["head_b.weight"] for s in run.steps] == [t in (3, 4, 6) for t in range(8)]
    model.use_b = True  # query with both heads
    ref = check_fast(model, run, store, Xt, Yt)
    assert np.abs(ref["h"][run.T][:, -15:]).max() > 0  # head_b's h is non-zero and matters


def test_fast_param_with_grad_none_is_skipped(tmp_path):
    """The loop sets the head's .grad to None on some steps (gradual unfreezing): SGD skips it then,
    and its first momentum step comes later."""
    def pre_step(t):
        if t < 3 or t == 5:
            model[2].weight.grad = None
            model[2].bias.grad = None

    model = make_mlp()
    model, run, store, Xt, Yt = fast_case(
        tmp_path, lambda m: torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9, weight_decay=0.01),
        model=model, train_kw={"pre_step": pre_step})
    assert [s.active["2.weight"] for s in run.steps] == [False] * 3 + [True] * 2 + [False] + [True] * 2
    check_fast(model, run, store, Xt, Yt)


# ------------------------------------------------------------------------------------------
# batching: reductions, short batches, replacement, samplers, workers, accumulation
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fast_reduction(tmp_path, reduction):
    lr = 0.2 if reduction == "mean" else 0.03
    model, run, store, Xt, Yt = fast_case(
        tmp_path, lambda m: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, dampening=0.2), reduction=reduction)
    check_fast(model, run, store, Xt, Yt)


def test_fast_drop_last(tmp_path):
    model, run, store, Xt, Yt = fast_case(
        tmp_path, loader_fn=lambda X, Y: make_loader(X, Y, drop_last=True))
    assert run.T == 6 and all(len(b) == 8 for b in all_batches(run))
    for epoch_steps in (run.steps[:3], run.steps[3:]):  # 6 samples of each epoch are never used
        seen = torch.cat([idx for st in epoch_steps for idx, *_ in st.calls])
        assert len(set(seen.tolist())) == 24
    check_fast(model, run, store, Xt, Yt)


def test_fast_no_shuffle(tmp_path):
    model, run, store, Xt, Yt = fast_case(
        tmp_path, loader_fn=lambda X, Y: DataLoader(TensorDataset(X, Y), batch_size=7, shuffle=False))
    assert all_batches(run)[0].tolist() == list(range(7))
    check_fast(model, run, store, Xt, Yt)


class RepeatingBatchSampler:
    """A batch sampler whose batches contain repeated indices (sampling with replacement)."""

    def __init__(self, n, batch_size, n_batches, seed):
        self.n, self.batch_size, self.n_batches = n, batch_size, n_batches
        self.g = torch.Generator().manual_seed(seed)

    def __iter__(self):
        for _ in range(self.n_batches):
            b = torch.randint(0, self.n, (self.batch_size - 2,), generator=self.g).tolist()
            yield b + b[:2]  # the first two indices appear (at least) twice

    def __len__(self):
        return self.n_batches


def test_fast_batches_with_repeated_samples(tmp_path):
    model, run, store, Xt, Yt = fast_case(
        tmp_path, loader_fn=lambda X, Y: DataLoader(TensorDataset(X, Y),
                                                    batch_sampler=RepeatingBatchSampler(30, 7, 4, seed=11)))
    assert all(len(set(b.tolist())) < len(b) for b in all_batches(run))
    check_fast(model, run, store, Xt, Yt)


def test_fast_random_sampler_with_replacement(tmp_path):
    model, run, store, Xt, Yt = fast_case(
        tmp_path, N=12, loader_fn=lambda X, Y: DataLoader(
            TensorDataset(X, Y), batch_size=6, sampler=RandomSampler(
                range(12), replacement=True, num_samples=20, generator=torch.Generator().manual_seed(4))))
    assert any(len(set(b.tolist())) < len(b) for b in all_batches(run))
    check_fast(model, run, store, Xt, Yt)


class ReversedPermutationSampler(Sampler):
    """A custom sampler: a fixed seeded permutation, reversed on odd epochs."""

    def __init__(self, n, seed):
        self.perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        self.epoch = 0

    def __iter__(self):
        order = self.perm if self.epoch % 2 == 0 else self.perm[::-1]
        self.epoch += 1
        return iter(order)

    def __len__(self):
        return len(self.perm)


def test_fast_custom_sampler(tmp_path):
    sampler = ReversedPermutationSampler(30, seed=8)
    model, run, store, Xt, Yt = fast_case(
        tmp_path, loader_fn=lambda X, Y: DataLoader(TensorDataset(X, Y), batch_size=8, sampler=sampler))
    assert all_batches(run)[0].tolist() == sampler.perm[:8]
    check_fast(model, run, store, Xt, Yt)


def test_fast_subset_sampler_leaves_unseen_samples_at_zero(tmp_path):
    subset = list(range(0, 30, 2))
    model, run, store, Xt, Yt = fast_case(
        tmp_path, loader_fn=lambda X, Y: DataLoader(
            TensorDataset(X, Y), batch_size=4,
            sampler=SubsetRandomSampler(subset, generator=torch.Generator().manual_seed(2))))
    check_fast(model, run, store, Xt, Yt)
    got = store.contributions(model, Xt, Yt)
    assert np.abs(got[:, 1::2]).max() == 0.0
    assert np.abs(got[:, 0::2]).min() > 0.0


@pytest.mark.parametrize("persistent", [False, True])
def test_fast_num_workers(tmp_path, persistent):
    loaders = []

    def loader_fn(X, Y):
        loaders.append(make_loader(X, Y, num_workers=2, persistent_workers=persistent))
        return loaders[0]

    try:
        model, run, store, Xt, Yt = fast_case(tmp_path, loader_fn=loader_fn)
        check_fast(model, run, store, Xt, Yt)
    finally:
        # shut persistent workers down now: if the loader were finalised later by the cycle collector
        # (hydra_nb's tracker and loader tap reference each other), PyTorch waits 2 x 5 s for the workers
        it = getattr(loaders[0], "_iterator", None) if loaders else None
        if it is not None:
            it._shutdown_workers()


@pytest.mark.parametrize("accum,zero,batch_size", [(2, "optimizer", 8), (3, "model", 6), (2, "model", 4)])
def test_fast_gradient_accumulation(tmp_path, accum, zero, batch_size):
    """Several backward calls per step; a leftover accumulation is zeroed without a step (dropped)."""
    model, run, store, Xt, Yt = fast_case(
        tmp_path, lambda m: torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9, weight_decay=0.01),
        loader_fn=lambda X, Y: make_loader(X, Y, batch_size=batch_size), epochs=3,
        train_kw={"accum": accum, "zero": zero})
    n_batches = -(-30 // batch_size)
    assert all(len(s.calls) == accum for s in run.steps)
    assert run.T == 3 * (n_batches // accum)
    # batches backpropagated and then zeroed without a step must not count
    assert len(all_batches(run)) == 3 * n_batches - 3 * (n_batches % accum)
    check_fast(model, run, store, Xt, Yt)


def test_fast_gradient_accumulation_sum_reduction(tmp_path):
    model, run, store, Xt, Yt = fast_case(
        tmp_path, lambda m: torch.optim.SGD(m.parameters(), lr=0.02, momentum=0.5, nesterov=True),
        loader_fn=lambda X, Y: make_loader(X, Y, batch_size=7), reduction="sum", train_kw={"accum": 2})
    check_fast(model, run, store, Xt, Yt)


def test_fast_custom_loss(tmp_path):
    def sq_loss(out, y):  # ||out - onehot(y)||^2 per sample
        return (out ** 2).sum(1) - 2 * out.gather(1, y[:, None]).squeeze(1) + 1

    model, run, store, Xt, Yt = fast_case(
        tmp_path, lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), loss_fn=sq_loss)
    check_fast(model, run, store, Xt, Yt)


def test_fast_store_dtype_float32(tmp_path):
    model, run, store, Xt, Yt = fast_case(tmp_path, store_dtype="float32")
    check_fast(model, run, store, Xt, Yt, tol=1e-5)


# ------------------------------------------------------------------------------------------
# projection
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k,seed", [(16, 0), (40, 0), (40, 5)])
def test_fast_projected_equals_projected_reference(tmp_path, k, seed):
    def opt_fn(m):
        return torch.optim.SGD([
            {"params": m[0].parameters(), "lr": 0.2, "momentum": 0.9, "nesterov": True, "weight_decay": 0.02},
            {"params": m[2].parameters(), "lr": 0.1, "momentum": 0.6, "dampening": 0.3},
        ], lr=0.1)

    model, run, store, Xt, Yt = fast_case(tmp_path, opt_fn, projection_dim=k, seed=seed,
                                          scheduler_fn=lambda o: torch.optim.lr_scheduler.StepLR(o, 3, 0.5))
    P = store.projector
    assert P.dim < run.D  # a real projection
    ref = hessian_free_contributions(run, Xt, Yt)
    assert_replay_matches(run, ref)
    expected = projected_expected(store, ref, run.T)
    got = store.contributions(model, Xt, Yt)
    assert got.shape == (len(Xt), run.N)
    err = rel_err(got, expected)
    assert err < PROJ_TOL, f"projected contributions rel err {err:.3e}"
    assert rel_err(expected, ref["values"][:, 0]) > 1e-6  # the projection really changes the values
    h = store.hypergradients()
    assert h.shape == (run.N, P.dim)
    assert rel_err(h, P.project_flat(ref["h"][run.T]).numpy()) < PROJ_TOL


def test_fast_projection_is_seeded(tmp_path):
    """Same seed, same projection: two identical runs give identical stores."""
    outs = []
    for r in range(2):
        sub = tmp_path / f"r{r}"
        sub.mkdir()
        model, run, store, Xt, Yt = fast_case(sub, projection_dim=20, seed=3)
        outs.append(store.contributions(model, Xt, Yt))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------------
# trajectories and hypergradients at checkpoints
# ------------------------------------------------------------------------------------------
def check_trajectory(model, run, store, Xt, Yt, every, projected):
    expected_steps = expected_checkpoints(run, every)
    np.testing.assert_array_equal(store.checkpoint_steps, expected_steps)
    ref = hessian_free_contributions(run, Xt, Yt, stops=expected_steps)
    assert_replay_matches(run, ref)
    train_idx = np.array([5, 0, 29, 17, 17 - 4])
    steps, values = store.trajectory(model, Xt, Yt, train_idx)
    np.testing.assert_array_equal(steps, expected_steps)
    assert values.shape == (len(Xt), len(expected_steps), len(train_idx))
    assert np.abs(values[:, 0]).max() < 1e-14  # step 0: nothing trained yet
    tol = PROJ_TOL if projected else FAST_TOL
    for c in range(1, len(expected_steps)):
        s = int(expected_steps[c])
        exp = projected_expected(store, ref, s, train_idx) if projected else ref["values"][:, c, train_idx]
        err = rel_err(values[:, c], exp)
        assert err < tol, f"trajectory at checkpoint {c} (step {s}): rel err {err:.3e}"
        # hypergradients() at the same checkpoint: projected h
        h = store.hypergradients(checkpoint=c, train_indices=train_idx)
        h_exp = store.projector.project_flat(ref["h"][s][train_idx]).numpy()
        err = rel_err(h, h_exp)
        assert err < tol, f"hypergradients at checkpoint {c} (step {s}): rel err {err:.3e}"
        # contributions(checkpoint=c) agrees too
        full = store.contributions(model, Xt, Yt, checkpoint=c)
        assert rel_err(full[:, train_idx], exp) < tol


@pytest.mark.parametrize("every,projection_dim", [(3, None), (3, 24), ("epoch", None), ("epoch", 24)])
def test_fast_trajectory(tmp_path, every, projection_dim):
    model, run, store, Xt, Yt = fast_case(
        tmp_path, lambda m: torch.optim.SGD(m.parameters(), lr=0.15, momentum=0.9, dampening=0.1, weight_decay=0.01),
        epochs=3, checkpoint_every=every, projection_dim=projection_dim,
        scheduler_fn=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: 0.9 ** t))
    if every == "epoch":
        assert list(store.checkpoint_steps) == [0, 4, 8, 12]
    else:
        assert list(store.checkpoint_steps) == [0, 3, 6, 9, 12]
    check_trajectory(model, run, store, Xt, Yt, every, projection_dim is not None)


def test_fast_trajectory_epoch_with_accumulation(tmp_path):
    """Epoch checkpoints when the dropped leftover makes epochs of 2 steps (7 batches, accum 3)."""
    model, run, store, Xt, Yt = fast_case(
        tmp_path, loader_fn=lambda X, Y: make_loader(X, Y, batch_size=5), epochs=2, checkpoint_every="epoch",
        train_kw={"accum": 3})
    assert list(store.checkpoint_steps) == [0, 2, 4]
    check_trajectory(model, run, store, Xt, Yt, "epoch", False)


def test_fast_hypergradients_full_dimension(tmp_path):
    model, run, store, Xt, Yt = fast_case(
        tmp_path, lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01))
    ref = hessian_free_contributions(run, Xt, Yt)
    h = store.hypergradients()
    assert h.shape == (run.N, run.D)
    assert rel_err(h, ref["h"][run.T].numpy()) < FAST_TOL
    h_sub = store.hypergradients(train_indices=[7, 3])
    assert rel_err(h_sub, ref["h"][run.T][[7, 3]].numpy()) < FAST_TOL


def test_fast_dtype_is_float64_by_default(tmp_path):
    """float64 models log float64 rows by default (else 1e-8 agreement would be impossible)."""
    model, run, store, Xt, Yt = fast_case(tmp_path)
    assert store.hypergradients().dtype == np.float64
    check_fast(model, run, store, Xt, Yt, tol=1e-10)
