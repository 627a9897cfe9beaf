"""Slow, independent references for hydra_nb's correctness tests.

Written from the definition of HYDRA, not from hydra_nb's code:

    contributions[j, i] = -dL(z_j; theta_T)/dw_i  at w = 0,

where training minimised, at every optimizer step, the user's own batch loss with
sample i's per-sample term scaled by (1 + w_i), and theta follows torch.optim.SGD:

    d = g + wd*theta
    buf = d (a param's first momentum step) | mom*buf + (1 - damp)*d
    s = d + mom*buf (Nesterov) | buf | d (mom == 0)
    theta <- theta - lr*s

Two references:

* ``unrolled_contributions``: autograd through the whole unrolled training loop
  (functional_call, create_graph=True), with a leaf w of shape (N,) inside the
  batch losses. Exact ground truth (Hessian terms included).
* ``hessian_free_contributions``: explicit per-sample, full-dimensional recursion
  for h = dtheta/dw_i with the Hessian terms dropped, per-sample gradients from a
  plain per-sample autograd loop. Ground truth for fast mode.

Both replay the exact batch sequence recorded by ``Run`` while the test's own
training loop runs. ``Run`` learns the dataset index of every row of a batch by
matching its contents against the dataset (rows are unique by construction), so
it is independent of samplers, workers and of hydra_nb's loader tap.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

DT = torch.float64
RNG = "__rng_state__"  # key of a call's recorded random-number state (Run(record_rng=True))


def ce_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy (hydra_nb's default loss_fn)."""
    return F.cross_entropy(outputs, targets, reduction="none")


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| (Frobenius), both taken as float64 arrays."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    den = np.linalg.norm(b)
    assert den > 0, "reference is all zeros: the comparison would be meaningless"
    return float(np.linalg.norm(a - b) / den)


@dataclass
class StepRecord:
    """One optimizer step: every backward call since the last zero_grad, and SGD's hyperparameters."""

    calls: list  # [(LongTensor dataset indices (may repeat), float scale of the batch loss, model state)]
    hyper: list  # per param group: dict(lr, momentum, dampening, weight_decay, nesterov)
    active: dict  # param name -> whether .grad was not None at the step (SGD skips the others)


class Run:
    """A training run as the references replay it; also the recorder used by the test's training loop.

    Construct it *before* training (it snapshots theta_0). In the loop call ``backward(x, y, scale)``
    after each ``loss.backward()`` (with the batch loss = scale * reduction(loss_fn(model(x), y))),
    ``zero_grad()`` whenever gradients are zeroed, ``before_step()`` right before ``optimizer.step()``
    and ``end_epoch()`` at the end of each pass over the loader.

    ``state_attrs``: plain attributes of the model that change its forward during training (e.g. a
    switch that leaves a branch unused); their values are recorded at each backward call and
    replayed; test losses use their values at the time of the reference call. ``record_rng``: also
    record the random-number state each training forward started from (models with dropout; only
    the whole-batch references replay it faithfully).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, X: torch.Tensor, Y: torch.Tensor,
                 loss_fn=ce_loss, reduction: str = "mean", state_attrs=(), record_rng: bool = False):
        assert reduction in ("mean", "sum")
        # record_rng: note the random-number state before each training forward (dropout), so that the
        # whole-batch references (unrolled_contributions, replay_sgd) draw the same masks
        self.record_rng = record_rng
        self.model = copy.deepcopy(model)  # architecture for functional_call (keeps tied weights tied)
        if record_rng:
            model.register_forward_pre_hook(self._note_rng)
        self.live_model = model
        self.optimizer = optimizer
        self.X, self.Y = X, Y
        self.N = len(X)
        self.loss_fn = loss_fn
        self.reduction = reduction
        self.state_attrs = tuple(state_attrs)
        flat = X.reshape(self.N, -1)
        assert len(torch.unique(flat, dim=0)) == self.N, "dataset rows must be unique to recover indices"
        self._flat_X = flat
        group_of = {}
        for g, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                group_of[id(p)] = g
        self.names, self.group_of_name, self.theta0, self.shapes = [], {}, {}, {}
        self._live_params = {}
        for n, p in model.named_parameters():  # deduplicated: a tied weight appears once
            if id(p) not in group_of or not p.requires_grad:
                continue
            self.names.append(n)
            self.group_of_name[n] = group_of[id(p)]
            self.theta0[n] = p.detach().clone().to(DT)
            self.shapes[n] = tuple(p.shape)
            self._live_params[n] = p
        self.offsets = {}
        off = 0
        for n in self.names:
            self.offsets[n] = off
            off += self.theta0[n].numel()
        self.D = off
        self.steps: list[StepRecord] = []
        self.grad_scales: list[float] = []  # largest |.grad| entry at each step (replay_tolerance)
        self.epoch_ends: list[int] = []
        self._pending: list = []

    # -- recording (called from the test's training loop) ----------------------------------
    def indices_of(self, xb: torch.Tensor, yb: torch.Tensor | None = None) -> torch.Tensor:
        fb = xb.reshape(len(xb), -1).to(self._flat_X.dtype)
        eq = (fb[:, None, :] == self._flat_X[None, :, :]).all(-1)
        counts = eq.sum(1)
        assert bool((counts == 1).all()), "could not identify the batch rows in the dataset"
        idx = eq.to(torch.int64).argmax(1)
        if yb is not None:
            assert torch.equal(self.Y[idx], yb), "targets do not match the identified rows"
        return idx

    def backward(self, xb, yb=None, scale: float = 1.0) -> None:
        state = {a: getattr(self.live_model, a) for a in self.state_attrs}
        if self.record_rng:
            state[RNG] = self._rng_before_forward
        self._pending.append((self.indices_of(xb, yb), float(scale), state))

    def _note_rng(self, module, args) -> None:
        if module.training and torch.is_grad_enabled():
            self._rng_before_forward = torch.get_rng_state()

    def set_state(self, state: dict) -> None:
        for a, v in state.items():
            if a == RNG:  # the forward draws the dropout masks the training forward drew
                torch.set_rng_state(v)
            else:
                setattr(self.model, a, v)

    def zero_grad(self) -> None:
        self._pending = []

    def before_step(self) -> None:
        hyper = []
        for group in self.optimizer.param_groups:
            lr = group["lr"]
            hyper.append({"lr": float(lr.item() if torch.is_tensor(lr) else lr),
                          "momentum": float(group["momentum"]), "dampening": float(group["dampening"]),
                          "weight_decay": float(group["weight_decay"]), "nesterov": bool(group["nesterov"])})
            assert not group.get("maximize", False)
        self._record_step(hyper)

    def _record_step(self, hyper: list) -> None:
        active = {n: p.grad is not None for n, p in self._live_params.items()}
        self.steps.append(StepRecord(self._pending, hyper, active))
        self.grad_scales.append(max((float(p.grad.abs().max()) for p in self._live_params.values()
                                     if p.grad is not None), default=0.0))
        self._pending = []

    def end_epoch(self) -> None:
        self.epoch_ends.append(len(self.steps))

    # -- helpers ---------------------------------------------------------------------------
    @property
    def T(self) -> int:
        return len(self.steps)

    def flatten(self, tensors: dict, batch_dims: int = 0) -> torch.Tensor:
        return torch.cat([tensors[n].reshape(*tensors[n].shape[:batch_dims], -1) for n in self.names], dim=batch_dims)

    def live_params_flat(self) -> torch.Tensor:
        return self.flatten({n: p.detach().to(DT) for n, p in self._live_params.items()})

    def batch_loss(self, theta: dict, idx: torch.Tensor, scale: float, w: torch.Tensor | None = None):
        out = functional_call(self.model, theta, (self.X[idx],))
        per = self.loss_fn(out, self.Y[idx])
        assert per.shape == (len(idx),)
        if w is not None:
            per = per * (1 + w[idx])
        red = per.mean() if self.reduction == "mean" else per.sum()
        return red * scale

    def update(self, theta: dict, grads: dict, state: dict, step: StepRecord):
        """One optimizer step by hand (SGD here; ``AdamRun`` overrides it); graph-preserving."""
        return self.sgd_update(theta, grads, state, step)

    def sgd_update(self, theta: dict, grads: dict, state: dict, step: StepRecord):
        """One SGD step by hand; returns the new theta dict (graph-preserving). ``state``: momentum buffers."""
        new = {}
        for n in self.names:
            if not step.active[n]:
                # skipped by the optimizer: a new graph node, not the same tensor, so that the next step's
                # gradient with respect to it is the partial derivative (the same tensor is an ancestor of the
                # other parameters' updates, and autograd.grad would add those paths)
                new[n] = theta[n].clone()
                continue
            hp = step.hyper[self.group_of_name[n]]
            lr, mom, damp, wd, nest = hp["lr"], hp["momentum"], hp["dampening"], hp["weight_decay"], hp["nesterov"]
            d = grads[n] + wd * theta[n]
            if mom != 0:
                if n not in state:
                    buf = d
                else:
                    buf = mom * state[n] + (1 - damp) * d
                state[n] = buf
                s = d + mom * buf if nest else buf
            else:
                s = d
            new[n] = theta[n] - lr * s
        return new


def _test_loss(run: Run, theta: dict, x: torch.Tensor, y: torch.Tensor, loss_fn) -> torch.Tensor:
    run.set_state({a: getattr(run.live_model, a) for a in run.state_attrs})
    run.model.eval()
    buffers = getattr(run, "test_buffers", None)  # e.g. BatchNorm running statistics as training left them
    try:
        out = functional_call(run.model, {**theta, **buffers} if buffers else theta, (x.unsqueeze(0),))
    finally:
        run.model.train()
    return loss_fn(out, y.unsqueeze(0)).sum()


def _stops(run: Run, stops):
    stops = [run.T] if stops is None else [int(s) for s in stops]
    assert all(0 <= s <= run.T for s in stops)
    return stops


# ==========================================================================================
# (a) autograd through the unrolled training loop: exact ground truth
# ==========================================================================================
def unrolled_contributions(run: Run, test_x, test_y, stops=None, loss_fn=None, return_h=False):
    """Exact contributions by differentiating the unrolled SGD loop with respect to w.

    Returns dict with ``values`` (n_test, len(stops), N) = -dL(z_j; theta_s)/dw for each stop s
    (number of completed steps), ``theta`` {s: flat theta_s} and, if ``return_h`` (True, or a list of
    sample indices), ``h`` {s: (N, D)} with rows h_i = dtheta_s/dw_i for those samples (others zero).
    """
    loss_fn = loss_fn or run.loss_fn
    stops = _stops(run, stops)
    test_x, test_y = torch.as_tensor(test_x), torch.as_tensor(test_y)
    if test_x.is_floating_point():
        test_x = test_x.to(DT)
    w = torch.zeros(run.N, dtype=DT, requires_grad=True)
    theta = {n: run.theta0[n].clone().requires_grad_(True) for n in run.names}
    state: dict = {}
    snaps = {}
    run.model.train()
    for t in range(run.T + 1):
        if t in stops:
            snaps[t] = dict(theta)
        if t == run.T:
            break
        step = run.steps[t]
        grads = {n: torch.zeros_like(run.theta0[n]) for n in run.names}
        for idx, scale, model_state in step.calls:
            run.set_state(model_state)
            loss = run.batch_loss(theta, idx, scale, w)
            gs = torch.autograd.grad(loss, [theta[n] for n in run.names], create_graph=True, allow_unused=True)
            for n, g in zip(run.names, gs):
                if g is not None:
                    grads[n] = grads[n] + g
        theta = run.update(theta, grads, state, step)
    values = torch.zeros(len(test_x), len(stops), run.N, dtype=DT)
    out = {"steps": np.asarray(stops), "theta": {}, "h": {}}
    for c, s in enumerate(stops):
        th = snaps[s]
        out["theta"][s] = run.flatten({n: v.detach() for n, v in th.items()})
        for j in range(len(test_x)):
            L = _test_loss(run, th, test_x[j], test_y[j], loss_fn)
            (g,) = torch.autograd.grad(L, w, retain_graph=True, allow_unused=True)
            if g is not None:
                values[j, c] = -g
        if return_h:
            flat = run.flatten(th)
            h = torch.zeros(run.N, run.D, dtype=DT)
            if flat.requires_grad:
                # double-vjp: v(u) = J^T u with J = dflat/dw (D, N); then dv_i/du = J[:, i] = h_i
                u = torch.zeros(run.D, dtype=DT, requires_grad=True)
                (v,) = torch.autograd.grad(flat, w, grad_outputs=u, retain_graph=True, create_graph=True)
                for i in (range(run.N) if return_h is True else return_h):
                    (g,) = torch.autograd.grad(v[i], u, retain_graph=True, allow_unused=True)
                    if g is not None:
                        h[i] = g
            out["h"][s] = h
    out["values"] = values.numpy()
    return out


# ==========================================================================================
# (b) Hessian-free recursion with explicit per-sample gradients: ground truth for fast mode
# ==========================================================================================
def _step_injections(run: Run, step: StepRecord, theta: dict, per_sample=None) -> tuple[dict, dict]:
    """(U, G) of one optimizer step at parameters ``theta``: U[n] (N, *shape) each sample's injection as it
    entered .grad (summed over its occurrences and backward calls), G[n] the batch gradient that trains θ.

    Without ``per_sample``, one sample at a time through its own forward; with it (coupled samples, e.g.
    BatchNorm in training mode), ``per_sample(params, idx, coef)`` gives both for each backward call.
    """
    U = {n: torch.zeros(run.N, *run.shapes[n], dtype=DT) for n in run.names}
    G = {n: torch.zeros(run.shapes[n], dtype=DT) for n in run.names}
    params = {n: theta[n].clone().requires_grad_(True) for n in run.names}
    plist = [params[n] for n in run.names]
    for idx, scale, model_state in step.calls:
        run.set_state(model_state)
        coef = scale / len(idx) if run.reduction == "mean" else scale
        if per_sample is not None:
            gs, total = per_sample(params, idx, coef)
            for n in run.names:
                U[n].index_add_(0, idx, gs[n])
                G[n] += total[n]
            continue
        for i in idx.tolist():  # one occurrence at a time: repeats contribute twice
            out = functional_call(run.model, params, (run.X[i : i + 1],))
            li = coef * run.loss_fn(out, run.Y[i : i + 1]).sum()
            gs = torch.autograd.grad(li, plist, allow_unused=True)
            for n, g in zip(run.names, gs):
                if g is not None:
                    U[n][i] += g
                    G[n] += g
    return U, G


def _contributions_at_stops(run: Run, stops, hs: dict, thetas: dict, test_x, test_y, loss_fn) -> dict:
    """contribution[j, c, i] = −∇L(z_j; θ_s)ᵀ·h_s[i] at each stop s, with θ_s, h_s and test gradients."""
    values = np.zeros((len(test_x), len(stops), run.N))
    out = {"steps": np.asarray(stops), "h": hs, "theta": {}, "test_grad": {}}
    for c, s in enumerate(stops):
        out["theta"][s] = run.flatten(thetas[s])
        G_test = test_gradients(run, thetas[s], test_x, test_y, loss_fn)
        out["test_grad"][s] = G_test
        values[:, c, :] = (-(G_test @ hs[s].T)).numpy()
    out["values"] = values
    return out


def hessian_free_contributions(run: Run, test_x, test_y, stops=None, loss_fn=None, per_sample=None):
    """Fast-mode ground truth: h recursion with every Hessian term dropped, full dimension.

    ``per_sample(params, idx, coef)``, if given, returns ({name: (len(idx), *shape)}, {name: shape}): the
    per-sample gradients (injections) of the batch ``idx`` (each term scaled by ``coef``) and the batch
    gradient that trains θ, in place of the one-sample-at-a-time forward (models whose samples are
    coupled, e.g. BatchNorm in training mode, where the two need not add up).

    Returns dict with ``values`` (n_test, len(stops), N), ``h`` {s: (N, D) flat dtheta_s/dw},
    ``theta`` {s: flat theta_s}, ``test_grad`` {s: (n_test, D)} for each stop s.
    """
    loss_fn = loss_fn or run.loss_fn
    stops = _stops(run, stops)
    test_x, test_y = torch.as_tensor(test_x), torch.as_tensor(test_y)
    if test_x.is_floating_point():
        test_x = test_x.to(DT)
    N = run.N
    theta = {n: run.theta0[n].clone() for n in run.names}
    H = {n: torch.zeros(N, *run.shapes[n], dtype=DT) for n in run.names}  # h = dtheta/dw_i per sample i
    Bm = {n: torch.zeros(N, *run.shapes[n], dtype=DT) for n in run.names}  # b = dbuf/dw_i
    buf: dict = {}
    hs, thetas = {}, {}
    run.model.train()
    for t in range(run.T + 1):
        if t in stops:
            hs[t] = run.flatten(H, batch_dims=1).clone()
            thetas[t] = {n: v.clone() for n, v in theta.items()}
        if t == run.T:
            break
        step = run.steps[t]
        U, G = _step_injections(run, step, theta, per_sample)
        for n in run.names:
            if not step.active[n]:
                continue
            hp = step.hyper[run.group_of_name[n]]
            lr, mom, damp, wd, nest = hp["lr"], hp["momentum"], hp["dampening"], hp["weight_decay"], hp["nesterov"]
            d = G[n] + wd * theta[n]
            dd = U[n] + wd * H[n]
            if mom != 0:
                if n not in buf:
                    buf[n], Bm[n] = d.clone(), dd.clone()
                else:
                    buf[n] = mom * buf[n] + (1 - damp) * d
                    Bm[n] = mom * Bm[n] + (1 - damp) * dd
                s = d + mom * buf[n] if nest else buf[n]
                ds = dd + mom * Bm[n] if nest else Bm[n]
            else:
                s, ds = d, dd
            theta[n] = theta[n] - lr * s
            H[n] = H[n] - lr * ds
    return _contributions_at_stops(run, stops, hs, thetas, test_x, test_y, loss_fn)


def test_gradients(run: Run, theta: dict, test_x, test_y, loss_fn=None) -> torch.Tensor:
    """(n_test, D): flat grad of loss_fn on each single test sample (model in eval mode) at theta."""
    loss_fn = loss_fn or run.loss_fn
    rows = []
    for j in range(len(test_x)):
        params = {n: theta[n].detach().clone().requires_grad_(True) for n in run.names}
        L = _test_loss(run, params, test_x[j], test_y[j], loss_fn)
        gs = torch.autograd.grad(L, [params[n] for n in run.names], allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(params[n])).reshape(-1)
                               for n, g in zip(run.names, gs)]))
    return torch.stack(rows)


test_gradients.__test__ = False  # not a pytest test


def replay_sgd(run: Run, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Plain replay of training (no w), or with fixed per-sample weights (1 + weights); returns flat theta_T."""
    theta = {n: run.theta0[n].clone() for n in run.names}
    state: dict = {}
    for step in run.steps:
        params = {n: theta[n].clone().requires_grad_(True) for n in run.names}
        grads = {n: torch.zeros_like(run.theta0[n]) for n in run.names}
        for idx, scale, model_state in step.calls:
            run.set_state(model_state)
            loss = run.batch_loss(params, idx, scale, weights)
            gs = torch.autograd.grad(loss, [params[n] for n in run.names], allow_unused=True)
            for n, g in zip(run.names, gs):
                if g is not None:
                    grads[n] = grads[n] + g
        theta = run.update(theta, grads, state, step)
        theta = {n: v.detach() for n, v in theta.items()}
    return run.flatten(theta)


# ==========================================================================================
# training loop helper (the "user's loop"), recording into a Run
# ==========================================================================================
def train(model, loader, opt, run: Run, epochs: int, *, scheduler=None, scheduler_per: str = "step",
          accum: int = 1, zero: str = "optimizer", pre_step=None):
    """A plain user loop: forward, reduction(loss_fn), backward (accumulating ``accum`` batches), step.

    A leftover partial accumulation at the end of an epoch is zeroed without a step (dropped).
    ``pre_step(t)``, if given, runs right before optimizer step t (e.g. to set some .grad to None).
    """
    def zero_grad():
        (opt if zero == "optimizer" else model).zero_grad()
        run.zero_grad()

    for _ in range(epochs):
        zero_grad()
        k = 0
        for x, y in loader:
            per = run.loss_fn(model(x), y)
            loss = per.mean() if run.reduction == "mean" else per.sum()
            scale = 1.0 / accum
            if accum != 1:
                loss = loss * scale
            loss.backward()
            run.backward(x, y, scale)
            k += 1
            if k % accum == 0:
                if pre_step is not None:
                    pre_step(run.T)
                run.before_step()
                opt.step()
                if scheduler is not None and scheduler_per == "step":
                    scheduler.step()
                zero_grad()
        if k % accum:
            zero_grad()  # leftover batches: gradients dropped without a step
        if scheduler is not None and scheduler_per == "epoch":
            scheduler.step()
        run.end_epoch()


def expected_checkpoints(run: Run, every) -> np.ndarray:
    """Checkpoint steps hydra_nb should record: 0, every k steps (or each epoch end), and the final step."""
    T = run.T
    if every == "epoch":
        steps = [0] + list(run.epoch_ends)
    else:
        steps = list(range(0, T + 1, every))
    steps.append(T)
    return np.asarray(sorted(set(steps)), dtype=np.int64)


# ==========================================================================================
# toy data and model shared by the tests
# ==========================================================================================
def make_data(N=30, n_test=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, 4, generator=g, dtype=DT)
    Y = torch.randint(0, 3, (N,), generator=g)
    Xt = torch.randn(n_test, 4, generator=g, dtype=DT)
    Yt = torch.randint(0, 3, (n_test,), generator=g)
    return X, Y, Xt, Yt


def make_mlp(seed=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)


def make_loader(X, Y, seed=3, batch_size=8, **kw):
    return DataLoader(TensorDataset(X, Y), batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(seed), **kw)



# ==========================================================================================
# harness: one tracked training run through hydra_nb's public API
# ==========================================================================================
def tracked_training(tmp_path, model, opt, loader, X, Y, *, epochs: int = 2, loss_fn=None, reduction: str = "mean",
                     name: str = "run.zarr", train_kw=None, run_kw=None, run_cls=None, **track_kw):
    """Train with the test loop under ``hydra_nb.track``; return (Run, opened Store).

    ``loss_fn`` None: cross-entropy, and hydra_nb gets its default; otherwise it is passed to track/open_store.
    """
    import hydra_nb

    run = (run_cls or Run)(model, opt, X, Y, loss_fn or ce_loss, reduction, **(run_kw or {}))
    path = tmp_path / name
    track_kw.setdefault("strict", True)
    with hydra_nb.track(model, loader, store=str(path), optimizer=opt, loss_fn=loss_fn, **track_kw):
        train(model, loader, opt, run, epochs, **(train_kw or {}))
    store = hydra_nb.open_store(str(path), loss_fn=loss_fn)
    assert store.status == "complete", store.status
    assert run.T > 0
    return run, store


UNIT_ROUNDOFF = float(torch.finfo(DT).eps) / 2  # u = 2^-53 for float64
SUM_TERMS = 64 * 8  # terms per floating-point sum of a gradient entry here: batch (≤ 8) × widest fan-in (≤ 64)


def replay_tolerance(run: Run) -> float:
    """How far a correct reference replay may sit from the real run, relative to ‖θ_T‖ (float64).

    The reference computes each step from the same numbers as PyTorch, summed in another order, so a
    gradient entry differs by at most γ·G, with γ = SUM_TERMS·u and G the largest gradient entry of
    the step (a sum of n terms is off by at most n·u·Σ|terms|).

    * SGD: that difference enters θ as η_t·γ·G_t (÷(1−μ) with momentum). Over these runs (T ≤ 40 steps,
      η ≤ 0.3, ‖g‖_∞ ≤ 10) that is below 1e-11; the training map may grow a difference by
      ‖I − η·H‖ ≤ 1 + η·‖H‖ per step, for which 1e-10 leaves a factor 10 of room on these tiny models.
    * Adam: D = 1/(√v̂/√(1−β2^t) + ε) ≤ 1/ε, so a rounding difference δ in a gradient entry whose
      true value is ~0 (e.g. the bias of a Linear feeding BatchNorm: exactly zero in exact
      arithmetic, rounding noise in practice) becomes a step difference up to η_t/(1−β1^t)·δ/ε —
      amplified by η/ε ~ 1e6. Summed over steps and over the √D entries that can carry it:
      Σ_t η_t/(1−β1^t)·γ·G_t/ε·√D. A replay that applies a wrong update is off by ≥ 1e-4.
    """
    sgd_bound = 1e-10
    if not isinstance(run, AdamRun):
        return sgd_bound
    total = 0.0
    steps_taken = {n: 0 for n in run.names}
    for step, scale in zip(run.steps, run.grad_scales):
        worst = 0.0  # the largest η_t/((1−β1^t)·ε) of the tensors this step updates
        for n in run.names:
            if not step.active[n]:
                continue
            steps_taken[n] += 1
            hp = step.hyper[run.group_of_name[n]]
            worst = max(worst, hp["lr"] / (1 - hp["beta1"] ** steps_taken[n]) / hp["eps"])
        total += worst * SUM_TERMS * UNIT_ROUNDOFF * scale
    return max(sgd_bound, total * run.D ** 0.5 / float(run.live_params_flat().norm()))


def assert_replay_matches(run: Run, ref: dict) -> None:
    """The reference's replayed theta_T must be the trained model's parameters (validates the replay)."""
    theta_T = ref["theta"][run.T]
    live = run.live_params_flat()
    err = float((theta_T - live).norm() / live.norm())
    bound = replay_tolerance(run)
    assert err < bound, f"reference replay diverges from the real training run (rel err {err:.2e} > {bound:.2e})"


def layout_check(run: Run, store) -> None:
    """The store's flat layout must be the model's named_parameters order (as the reference flattens)."""
    slots = store.layout.slots
    assert [s.name for s in slots] == run.names
    assert [tuple(s.shape) for s in slots] == [run.shapes[n] for n in run.names]
    assert [s.offset for s in slots] == [run.offsets[n] for n in run.names]


# ==========================================================================================
# Adam / AdamW: the optimizer by hand, and the reference of hydra_nb's approximation
# ==========================================================================================
# torch.optim.Adam per tensor at its step t (t counts the tensor's own steps):
#     g = grad (+ wd*theta, Adam's coupled L2);   theta <- theta*(1 - lr*wd) first (AdamW)
#     m <- b1*m + (1-b1)*g;   v <- b2*v + (1-b2)*g^2;   vhat = v | max(vhat, v) (amsgrad)
#     D = 1 / (sqrt(vhat) / sqrt(1 - b2^t) + eps);   theta <- theta - lr/(1 - b1^t) * m * D
def _sqrt0(v: torch.Tensor) -> torch.Tensor:
    """sqrt with derivative 0 instead of inf where v == 0 (a gradient entry that is exactly zero)."""
    pos = v > 0
    return torch.where(pos, torch.where(pos, v, torch.ones_like(v)).sqrt(), torch.zeros_like(v))


class AdamRun(Run):
    """A ``Run`` of torch.optim.Adam/AdamW: records each group's Adam hyperparameters and replays Adam."""

    def before_step(self) -> None:
        hyper = []
        for group in self.optimizer.param_groups:
            lr = group["lr"]
            decoupled = bool(group.get("decoupled_weight_decay", isinstance(self.optimizer, torch.optim.AdamW)))
            hyper.append({"lr": float(lr.item() if torch.is_tensor(lr) else lr), "beta1": float(group["betas"][0]),
                          "beta2": float(group["betas"][1]), "eps": float(group["eps"]),
                          "weight_decay": float(group["weight_decay"]), "amsgrad": bool(group["amsgrad"]),
                          "decoupled": decoupled})
            assert not group.get("maximize", False)
        self._record_step(hyper)

    def update(self, theta: dict, grads: dict, state: dict, step: StepRecord):
        """One Adam step by hand, differentiable through m, v and D (``state[n]``: t, m, v, vmax)."""
        new = {}
        for n in self.names:
            if not step.active[n]:
                # skipped by the optimizer: a new graph node, not the same tensor, so that the next step's
                # gradient with respect to it is the partial derivative (the same tensor is an ancestor of the
                # other parameters' updates, and autograd.grad would add those paths)
                new[n] = theta[n].clone()
                continue
            hp = step.hyper[self.group_of_name[n]]
            lr, b1, b2, eps, wd = hp["lr"], hp["beta1"], hp["beta2"], hp["eps"], hp["weight_decay"]
            st = state.setdefault(n, {"t": 0, "m": 0.0, "v": 0.0, "vmax": None})
            th, g = theta[n], grads[n]
            if wd != 0 and hp["decoupled"]:
                th = th * (1 - lr * wd)
            elif wd != 0:
                g = g + wd * th
            st["t"] += 1
            st["m"] = b1 * st["m"] + (1 - b1) * g
            st["v"] = b2 * st["v"] + (1 - b2) * g * g
            vhat = st["v"]
            if hp["amsgrad"]:
                vhat = vhat if st["vmax"] is None else torch.maximum(st["vmax"], vhat)
                st["vmax"] = vhat
            D = 1.0 / (_sqrt0(vhat) / (1 - b2 ** st["t"]) ** 0.5 + eps)
            new[n] = th - lr / (1 - b1 ** st["t"]) * st["m"] * D
        return new


def adam_hessian_free_contributions(run: AdamRun, test_x, test_y, stops=None, loss_fn=None, freeze_D=False,
                                    per_sample=None):
    """Reference of hydra_nb's Adam approximation, full dimension, one (h, dm/dw_i) per sample.

    Approximation (1): v (hence D_t) does not depend on w, Hessian terms dropped. With
    U = dm/dw_i and H = dtheta/dw_i, per tensor at each step:

        U <- b1*U + (1-b1)*(u_t + wd*H [coupled L2]);   H <- H*(1 - lr*wd [AdamW]) - lr/(1-b1^t) * D_t * U

    ``freeze_D`` adds approximation (2): each injection is preconditioned by D of the step it entered
    and keeps it, U <- b1*U + (1-b1)*D_t*u_t and H <- H*(1 - lr*wd) - lr/(1-b1^t) * U (U is then
    in preconditioned units). ``per_sample`` as in ``hessian_free_contributions`` (coupled samples, e.g.
    BatchNorm in training mode). Returns the same dict as ``hessian_free_contributions``.
    """
    loss_fn = loss_fn or run.loss_fn
    stops = _stops(run, stops)
    test_x, test_y = torch.as_tensor(test_x), torch.as_tensor(test_y)
    if test_x.is_floating_point():
        test_x = test_x.to(DT)
    N = run.N
    theta = {n: run.theta0[n].clone() for n in run.names}
    H = {n: torch.zeros(N, *run.shapes[n], dtype=DT) for n in run.names}
    M = {n: torch.zeros(N, *run.shapes[n], dtype=DT) for n in run.names}
    adam: dict = {}
    hs, thetas = {}, {}
    run.model.train()
    for t in range(run.T + 1):
        if t in stops:
            hs[t] = run.flatten(H, batch_dims=1).clone()
            thetas[t] = {n: v.clone() for n, v in theta.items()}
        if t == run.T:
            break
        step = run.steps[t]
        U, G = _step_injections(run, step, theta, per_sample)
        for n in run.names:
            if not step.active[n]:
                continue
            hp = step.hyper[run.group_of_name[n]]
            lr, b1, b2, eps, wd = hp["lr"], hp["beta1"], hp["beta2"], hp["eps"], hp["weight_decay"]
            coupled = wd != 0 and not hp["decoupled"]
            assert not (coupled and freeze_D), "approximation (2) is not defined with Adam's coupled L2"
            st = adam.setdefault(n, {"t": 0, "m": torch.zeros_like(theta[n]), "v": torch.zeros_like(theta[n]),
                                     "vmax": None})
            g = G[n] + wd * theta[n] if coupled else G[n]
            st["t"] += 1
            st["m"] = b1 * st["m"] + (1 - b1) * g
            st["v"] = b2 * st["v"] + (1 - b2) * g * g
            vhat = st["v"] if not hp["amsgrad"] or st["vmax"] is None else torch.maximum(st["vmax"], st["v"])
            if hp["amsgrad"]:
                st["vmax"] = vhat
            D = 1.0 / (vhat.sqrt() / (1 - b2 ** st["t"]) ** 0.5 + eps)
            c = lr / (1 - b1 ** st["t"])
            decay = 1 - lr * wd if hp["decoupled"] else 1.0
            if freeze_D:
                M[n] = b1 * M[n] + (1 - b1) * D * U[n]
                H[n] = decay * H[n] - c * M[n]
            else:
                M[n] = b1 * M[n] + (1 - b1) * (U[n] + (wd * H[n] if coupled else 0.0))
                H[n] = decay * H[n] - c * D * M[n]
            theta[n] = decay * theta[n] - c * st["m"] * D
    return _contributions_at_stops(run, stops, hs, thetas, test_x, test_y, loss_fn)
