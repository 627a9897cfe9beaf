"""``AdamRule``: its functional step against ``torch.optim.Adam``/``AdamW`` (bitwise), its derivatives, its trace."""

import math

import numpy as np
import pytest
import torch

from functional_check import compare_with_torch
from hydra_nb.optim import AdamRule
from hydra_nb.optim.adam import sqrt0
from hydra_nb.params import ParamLayout

DTYPES = [torch.float64, torch.float32]


def groups(m, cls=torch.optim.AdamW, **defaults):
    """Three parameter groups with their own betas, eps, amsgrad and weight decay."""
    return cls([
        {"params": [m[0].weight], "lr": 0.05, "betas": (0.8, 0.99), "weight_decay": 0.1},
        {"params": [m[0].bias, m[2].weight], "lr": 0.02, "amsgrad": True, "weight_decay": 0.0},
        {"params": [m[2].bias], "lr": 0.1, "betas": (0.0, 0.9), "eps": 1e-2},
    ], lr=1.0, **defaults)


CASES = {
    "adam": (lambda m: torch.optim.Adam(m.parameters(), lr=0.05), None),
    "adam_betas_eps": (lambda m: torch.optim.Adam(m.parameters(), lr=0.03, betas=(0.5, 0.9), eps=1e-3), None),
    "adam_coupled_l2": (lambda m: torch.optim.Adam(m.parameters(), lr=0.05, weight_decay=0.1), None),
    "adam_amsgrad_coupled": (lambda m: torch.optim.Adam(m.parameters(), lr=0.05, weight_decay=0.1, amsgrad=True),
                             None),
    "adamw": (lambda m: torch.optim.AdamW(m.parameters(), lr=0.05, weight_decay=0.2), None),
    "adamw_amsgrad": (lambda m: torch.optim.AdamW(m.parameters(), lr=0.05, weight_decay=0.1, amsgrad=True), None),
    "adam_decoupled_flag": (lambda m: torch.optim.Adam(m.parameters(), lr=0.05, weight_decay=0.1,
                                                       decoupled_weight_decay=True), None),
    "adam_group_decoupled": (lambda m: torch.optim.Adam([
        {"params": m[0].parameters(), "weight_decay": 0.2, "decoupled_weight_decay": True},
        {"params": m[2].parameters(), "weight_decay": 0.05}], lr=0.05), None),
    "groups_steplr": (groups, lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)),
    "foreach": (lambda m: groups(m, foreach=True), None),
    # a float64 tensor lr: torch's hyperparameter arithmetic in float64, as the trace's (see below for float32)
    "tensor_lr": (lambda m: torch.optim.AdamW(m.parameters(), lr=torch.tensor(0.05, dtype=torch.float64),
                                              weight_decay=0.1), None),
    # OneCycleLR cycles beta1 (Adam's momentum) and lr every step
    "one_cycle": (lambda m: torch.optim.Adam(m.parameters(), lr=0.05),
                  lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=10, cycle_momentum=True)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_functional_step_is_torch_adam_bitwise(case, dtype):
    opt_fn, scheduler_fn = CASES[case]
    ran = compare_with_torch(opt_fn, dtype=dtype, scheduler_fn=scheduler_fn)
    rule, opt, params = ran["rule"], ran["opt"], ran["params"]
    assert rule.name == ("AdamW" if case.startswith("adamw") or case in ("adam_decoupled_flag", "tensor_lr")
                         or case in ("groups_steplr", "foreach") else "Adam")
    # the trace's step count is torch's
    assert [float(opt.state[p]["step"]) for p in params] == ran["rows"][-1]["step"].tolist()
    if case == "one_cycle":
        assert len({float(r["beta1"][0]) for r in ran["rows"]}) >= 3


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_functional_step_skips_params_without_grad(dtype):
    """A parameter with .grad None is skipped: no moment update, no step count (its bias correction waits)."""
    ran = compare_with_torch(groups, dtype=dtype,
                             drop_grad=lambda t: [2, 3] if t < 3 or t == 5 else [0] if t == 4 else [])
    rows = ran["rows"]
    assert [bool(r["active"][2]) for r in rows] == [False] * 3 + [True, True, False, True]
    assert [float(r["step"][2]) for r in rows] == [0, 0, 0, 1, 2, 2, 3]
    assert [float(r["step"][0]) for r in rows] == [1, 2, 3, 4, 4, 5, 6]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_functional_step_with_exactly_zero_gradient_entries(dtype, amsgrad):
    """Entries whose gradient is exactly 0 at every step keep v = 0: still bitwise (√0 = 0 in both)."""
    ran = compare_with_torch(lambda m: torch.optim.AdamW(m.parameters(), lr=0.05, amsgrad=amsgrad), dtype=dtype,
                             zero_entries=True)
    v = ran["opt"].state[ran["params"][0]]["exp_avg_sq"]
    assert (v[0] == 0).all() and (v[1:] > 0).all()


def test_float32_tensor_lr_is_within_the_rounding_of_torchs_scalars():
    """Not bitwise, by design: with lr a float32 tensor, torch's Adam computes 1 − ηλ and η/(1 − β1^t) as float32
    tensors (``_to_scalar`` keeps 0-dim tensors), while the trace holds η in float64 and the functional step does
    that arithmetic in Python floats. 1 − ηλ (near 1) is then off by at most 2⁻²⁴ absolute and η/(1 − β1^t) by
    2⁻²⁴ relative, so θ' differs by at most 2⁻²⁴·(|θ| + |η/(1−β1^t)·m/denom|) plus float64 ulps of θ'."""
    model_fn = lambda m: torch.optim.AdamW(m.parameters(), lr=torch.tensor(0.05), weight_decay=0.1)  # noqa: E731
    with pytest.raises(AssertionError, match="functional_step differs"):
        compare_with_torch(model_fn, dtype=torch.float64)
    from functional_check import make_model

    model = make_model(torch.float64)
    opt = model_fn(model)
    rule = AdamRule("AdamW")
    layout, params = ParamLayout.from_model(model, opt)
    x = torch.randn(8, 5, dtype=torch.float64)
    for _ in range(4):
        opt.zero_grad()
        model(x).square().sum().backward()
        row, state = rule.read_step(opt, params, layout), rule.read_state(opt, params)
        before = [p.detach().clone() for p in params]
        grads = [p.grad.clone() for p in params]
        opt.step()
        new, new_state = rule.functional_step(before, grads, state, row)
        for k, (a, p) in enumerate(zip(new, params)):
            lr, b1, t = (float(row[f][k]) for f in ("lr", "beta1", "step"))
            b2, eps = float(row["beta2"][k]), float(row["eps"][k])
            denom = new_state["exp_avg_sq"][k].sqrt() / math.sqrt(1 - b2 ** t) + eps
            move = before[k].abs() + (lr / (1 - b1 ** t) * new_state["exp_avg"][k] / denom).abs()
            bound = 2.0 ** -24 * move + torch.finfo(torch.float64).eps * p.detach().abs() * 2
            assert ((a - p.detach()).abs() <= bound).all()
            for f in rule.state_fields:  # the moments do not involve lr: bitwise
                assert (new_state[f][k] is None) == (opt.state[p].get(f) is None)
                if new_state[f][k] is not None:
                    assert torch.equal(new_state[f][k], opt.state[p][f])


def test_read_step_and_read_state():
    model = torch.nn.Linear(3, 2).double()
    opt = torch.optim.Adam([{"params": [model.weight], "amsgrad": True, "weight_decay": 0.1,
                             "decoupled_weight_decay": True},
                            {"params": [model.bias], "betas": (0.7, 0.95), "eps": 1e-4}], lr=0.01)
    rule = AdamRule("Adam")
    layout, params = ParamLayout.from_model(model, opt)
    assert rule.read_state(opt, params) == {f: [None, None] for f in rule.state_fields}
    model(torch.ones(4, 3, dtype=torch.float64)).sum().backward()
    row = rule.read_step(opt, params, layout)
    assert set(row) == set(rule.trace_fields) and set(rule.fast_fields) < set(rule.trace_fields)
    assert all(row[f].dtype == (bool if f in rule.bool_fields else np.float64) for f in row)
    assert row["beta1"].tolist() == [0.9, 0.7] and row["beta2"].tolist() == [0.999, 0.95]
    assert row["eps"].tolist() == [1e-8, 1e-4] and row["amsgrad"].tolist() == [True, False]
    assert row["decoupled"].tolist() == [True, False] and row["weight_decay"].tolist() == [0.1, 0.0]
    assert row["step"].tolist() == [1, 1] and row["bias_correction1"].tolist() == [1 - 0.9, 1 - 0.7]
    opt.step()
    state = rule.read_state(opt, params)
    assert state["max_exp_avg_sq"][1] is None and state["max_exp_avg_sq"][0] is not None
    assert torch.equal(state["exp_avg"][0], opt.state[model.weight]["exp_avg"])
    assert state["exp_avg"][0] is not opt.state[model.weight]["exp_avg"]  # a copy


# -- derivatives ---------------------------------------------------------------------------------
def _row(**values):
    row = AdamRule().empty_row(1)
    defaults = dict(lr=0.05, beta1=0.9, beta2=0.99, eps=1e-3, step=3, active=True)
    for k, v in {**defaults, **values}.items():
        row[k][0] = v
    row["bias_correction1"][0] = 1 - row["beta1"][0] ** row["step"][0]
    return row


@pytest.mark.parametrize("amsgrad,wd,decoupled", [(False, 0.0, True), (True, 0.1, True), (False, 0.1, False),
                                                  (True, 0.2, False)])
def test_functional_step_derivatives_match_finite_differences(amsgrad, wd, decoupled):
    """Autograd through one step (θ, g, m, v, v̂) → (θ', m', v', v̂') equals central finite differences (float64)
    at a generic point (v̂ ≠ v, so that the max is differentiable)."""
    g = torch.Generator().manual_seed(0)
    shape = (3, 2)
    theta, grad, m = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    v = torch.rand(shape, generator=g, dtype=torch.float64) + 0.1
    vmax = v + torch.where(torch.rand(shape, generator=g) > 0.5, 0.3, -0.05).double()
    inputs = tuple(x.requires_grad_() for x in (theta, grad, m, v, vmax))
    row = _row(amsgrad=amsgrad, weight_decay=wd, decoupled=decoupled)

    def step(theta, grad, m, v, vmax):
        new, state = AdamRule().functional_step([theta], [grad], {"exp_avg": [m], "exp_avg_sq": [v],
                                                                 "max_exp_avg_sq": [vmax]}, row)
        return (new[0],) + tuple(state[f][0] for f in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"))

    assert torch.autograd.gradcheck(step, inputs)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_derivative_is_finite_where_the_gradient_was_always_zero(amsgrad):
    """v = 0 where the gradient has been exactly 0: d√v/dv would be ∞ (and ∞·0 = NaN). With sqrt0 the derivative
    is finite and is the true one: at g = 0, m = (1−β1)g, v = (1−β2)g², so θ' = θ − s·(1−β1)g/(√(1−β2)|g|/c2 + ε)
    and dθ'/dg = −s·(1−β1)/ε (s = η/(1−β1^t), c2 = √(1−β2^t))."""
    theta = torch.randn(4, dtype=torch.float64, requires_grad=True)
    grad = torch.tensor([0.0, 0.5, 0.0, -1.0], dtype=torch.float64, requires_grad=True)
    row = _row(step=1, amsgrad=amsgrad)
    new, state = AdamRule().functional_step([theta], [grad], {f: [None] for f in AdamRule.state_fields}, row)
    assert torch.equal(state["exp_avg_sq"][0] == 0, torch.tensor([True, False, True, False]))
    d_grad, d_theta = torch.autograd.grad(new[0].sum() + state["exp_avg_sq"][0].sum(), (grad, theta))
    assert torch.isfinite(d_grad).all() and torch.isfinite(d_theta).all()
    s = 0.05 / (1 - 0.9)
    assert torch.allclose(d_grad[[0, 2]], torch.full((2,), -s * (1 - 0.9) / 1e-3, dtype=torch.float64), rtol=1e-14)
    # a later step with zero state and a zero gradient entry: still finite (m, v, v̂ all 0 there)
    zeros = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    state = {"exp_avg": [zeros], "exp_avg_sq": [zeros], "max_exp_avg_sq": [zeros]}
    new, _ = AdamRule().functional_step([theta], [grad], state, _row(step=4, amsgrad=amsgrad))
    for d in torch.autograd.grad(new[0].sum(), (grad, theta, zeros)):
        assert torch.isfinite(d).all()


def test_sqrt0_is_sqrt_with_a_zero_derivative_at_zero():
    v = torch.tensor([0.0, 1e-300, 2.0, 9.0], dtype=torch.float64, requires_grad=True)
    assert torch.equal(sqrt0(v), v.sqrt())
    (d,) = torch.autograd.grad(sqrt0(v).sum(), v)
    assert d[0] == 0 and torch.allclose(d[2:], 0.5 / v[2:].sqrt())


def test_inactive_parameter_passes_through():
    theta, m = torch.randn(4), torch.randn(4)
    state = {"exp_avg": [m], "exp_avg_sq": [m.abs()], "max_exp_avg_sq": [None]}
    new, out = AdamRule().functional_step([theta], [None], state, _row(active=False))
    assert new[0] is theta and out["exp_avg"][0] is m and out["max_exp_avg_sq"][0] is None


NEAR_CASES = {
    # fused=True runs torch's fused CPU kernel: the same formulas in one loop, with its own association and
    # vectorisation of the operations, so not the single-tensor path's roundings
    "fused_adamw_amsgrad": lambda m: torch.optim.AdamW(m.parameters(), lr=0.05, weight_decay=0.1, amsgrad=True,
                                                       fused=True),
    "fused_adam_coupled": lambda m: torch.optim.Adam(m.parameters(), lr=0.05, weight_decay=0.1, fused=True),
    # betas as (float64) tensors: torch computes 1 − β1 (lerp with a tensor weight) and β^t (tensor pow, which
    # multiplies out small integer powers) with tensor ops instead of Python floats
    "tensor_betas": lambda m: torch.optim.Adam(m.parameters(), lr=0.05, betas=(
        torch.tensor(0.9, dtype=torch.float64), torch.tensor(0.999, dtype=torch.float64))),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(NEAR_CASES))
def test_functional_step_is_within_a_few_roundings_where_torch_takes_another_path(case, dtype):
    compare_with_torch(NEAR_CASES[case], dtype=dtype, steps=10, ulps=4)
