"""Shared harness of the optimizer-rule tests: torch's own ``optimizer.step()`` against ``rule.functional_step``.

``compare_with_torch`` trains a small MLP with a real ``torch.optim`` optimizer. Before every step
it reads the rule's trace row (``read_step``) and state (``read_state``) and copies θ and the
gradients; after the step it checks, with ``torch.equal``, that ``functional_step`` fed those
gives torch's new parameters and state. A second copy of θ and the state is advanced by
``functional_step`` alone from the start (fed the same gradients): it must stay equal to torch's too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hydra_nb.optim import rule_for
from hydra_nb.params import ParamLayout

N, D_IN, HIDDEN, C = 24, 5, 7, 3


def make_model(dtype: torch.dtype, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, C)).to(dtype)


def _close(x: torch.Tensor, y: torch.Tensor, ulps: int, old: torch.Tensor | None = None) -> bool:
    """x == y bitwise (ulps = 0), or |x − y| ≤ ulps·ε·(|old| + |y|) elementwise: a few roundings of the terms
    of one step's update old → y (|old| + |y| bounds each of them, e.g. |θ − θ'| for θ' = θ − step)."""
    if ulps == 0:
        return torch.equal(x, y)
    scale = y.abs() + (0 if old is None else old.abs())
    return bool(((x - y).abs() <= ulps * torch.finfo(y.dtype).eps * scale).all())


def _states_equal(a: dict, b: dict, fields, ulps: int = 0, old: dict | None = None) -> list[str]:
    bad = []
    for f in fields:
        for k, (x, y) in enumerate(zip(a[f], b[f])):
            before = None if old is None else old[f][k]
            if (x is None) != (y is None) or (x is not None and not _close(x, y, ulps, before)):
                bad.append(f"{f}[{k}]")
    return bad


def compare_with_torch(opt_fn, *, dtype=torch.float64, steps: int = 7, scheduler_fn=None, drop_grad=None,
                       zero_entries: bool = False, seed: int = 0, ulps: int = 0) -> dict:
    """Run ``steps`` optimizer steps and assert ``functional_step`` reproduces each bitwise; returns what ran.

    ``drop_grad(t) -> [parameter index]``: parameters whose ``.grad`` is set to None before step t.
    ``zero_entries``: the first row of the first weight gets an exactly-zero gradient at every step
    (Adam's v stays 0 there). ``ulps`` > 0: for torch code paths that are not bitwise reproducible, each
    step (from torch's state) must agree within ``ulps`` roundings of its terms (``_close``), and there is
    no chained replay (its differences would compound).
    """
    model = make_model(dtype, seed)
    opt = opt_fn(model)
    rule = rule_for(opt)
    layout, params = ParamLayout.from_model(model, opt)
    scheduler = scheduler_fn(opt) if scheduler_fn is not None else None
    g = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(N, D_IN, generator=g, dtype=dtype)
    Y = torch.randint(0, C, (N,), generator=g)
    chained = [p.detach().clone() for p in params]
    chained_state = rule.read_state(opt, params)
    rows = []
    for t in range(steps):
        idx = torch.randperm(N, generator=g)[:8]
        opt.zero_grad()
        F.cross_entropy(model(X[idx]), Y[idx]).backward()
        if zero_entries:
            params[0].grad[0] = 0.0
        for k in (drop_grad(t) if drop_grad is not None else []):
            params[k].grad = None
        row = rule.read_step(opt, params, layout)
        state = rule.read_state(opt, params)
        before = [p.detach().clone() for p in params]
        grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
        opt.step()
        new, new_state = rule.functional_step(before, grads, state, row)
        torch_state = rule.read_state(opt, params)
        for k, (a, p) in enumerate(zip(new, params)):
            assert _close(a, p.detach(), ulps, before[k]), (
                f"step {t}, parameter {k}: functional_step differs from {type(opt).__name__}.step() by "
                f"{float((a - p.detach()).abs().max()):.3e}")
        bad = _states_equal(new_state, torch_state, rule.state_fields, ulps, state)
        assert not bad, f"step {t}: state {bad} differs from torch's"
        rows.append(row)
        if scheduler is not None:
            scheduler.step()
        if ulps:
            continue
        chained, chained_state = rule.functional_step(chained, grads, chained_state, row)
        assert all(torch.equal(a, p.detach()) for a, p in zip(chained, params)), f"step {t}: the chained replay drifted"
        assert not _states_equal(chained_state, torch_state, rule.state_fields), f"step {t}: chained state drifted"
    return {"rule": rule, "opt": opt, "params": params, "rows": rows}


def replay_from_store(run, store) -> dict[int, torch.Tensor]:
    """Training replayed from the store alone: θ_0 from its first checkpoint, each step's trace row, and
    gradients of the batch losses that ``run`` (a ``reference.Run``) recorded, through ``functional_step``.

    Returns the flat θ at every checkpoint step. Equal to the store's checkpoints (up to the order of the
    gradient sums) when the trace holds everything the optimizer's step depends on.
    """
    rule = store.optimizer_rule
    assert store.trace_fields == rule.trace_fields, "the store holds only the fast fields"
    layout = store.layout
    names = [s.name for s in layout.slots]
    theta = [t.clone() for t in layout.unflatten(torch.from_numpy(store.params_at(0))).values()]
    state = {f: [None] * len(names) for f in rule.state_fields}
    trace = store.trace()
    out = {0: layout.flatten(theta)}
    for t, step in enumerate(run.steps):
        leaves = {n: v.clone().requires_grad_(True) for n, v in zip(names, theta)}
        grads = [torch.zeros_like(v) for v in theta]
        for idx, scale, model_state in step.calls:
            run.set_state(model_state)
            gs = torch.autograd.grad(run.batch_loss(leaves, idx, scale), list(leaves.values()), allow_unused=True)
            grads = [a if g is None else a + g for a, g in zip(grads, gs)]
        row = {f: trace[f][t] for f in rule.trace_fields}
        grads = [g if row["active"][k] else None for k, g in enumerate(grads)]
        theta, state = rule.functional_step(theta, grads, state, row)
        if t + 1 in set(store.checkpoint_steps.tolist()):
            out[t + 1] = layout.flatten(theta)
    return out
