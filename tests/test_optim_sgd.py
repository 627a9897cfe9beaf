"""``SGDRule``: its functional step against ``torch.optim.SGD`` (bitwise), its derivatives, its trace."""

import numpy as np
import pytest
import torch

from functional_check import compare_with_torch
from hydra_nb.optim import SGDRule

DTYPES = [torch.float64, torch.float32]


def groups(m, **defaults):
    """Three parameter groups with every SGD option between them."""
    return torch.optim.SGD([
        {"params": [m[0].weight], "momentum": 0.9, "nesterov": True, "weight_decay": 0.05},
        {"params": [m[0].bias, m[2].weight], "momentum": 0.5, "dampening": 0.3, "weight_decay": 0.0, "lr": 0.2},
        {"params": [m[2].bias], "momentum": 0.0, "weight_decay": 0.1},
    ], lr=0.1, **defaults)


CASES = {
    "plain": (lambda m: torch.optim.SGD(m.parameters(), lr=0.1), None),
    "momentum": (lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), None),
    "dampening_wd": (lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.8, dampening=0.4,
                                               weight_decay=0.01), None),
    "nesterov": (lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                                           weight_decay=1e-3), None),
    "groups_steplr": (groups, lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)),
    "foreach": (lambda m: groups(m, foreach=True), None),
    "tensor_lr": (lambda m: torch.optim.SGD(m.parameters(), lr=torch.tensor(0.1), momentum=0.9), None),
    # OneCycleLR also cycles the momentum every step
    "one_cycle": (lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
                  lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.3, total_steps=10)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_functional_step_is_torch_sgd_bitwise(case, dtype):
    opt_fn, scheduler_fn = CASES[case]
    ran = compare_with_torch(opt_fn, dtype=dtype, scheduler_fn=scheduler_fn)
    if case == "groups_steplr":
        assert len({float(r["lr"][0]) for r in ran["rows"]}) >= 3  # the schedule moved
    if case == "one_cycle":
        assert len({float(r["momentum"][0]) for r in ran["rows"]}) >= 3


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_functional_step_skips_params_without_grad(dtype):
    """A parameter with .grad None is skipped, its buffer kept; its first momentum step comes later."""
    ran = compare_with_torch(groups, dtype=dtype, drop_grad=lambda t: [0, 3] if t < 2 or t == 4 else [1] if t == 5 else [])
    rows = ran["rows"]
    assert [bool(r["active"][0]) for r in rows] == [False, False, True, True, False, True, True]
    assert [bool(r["first"][0]) for r in rows[:4]] == [True, True, True, False]


def test_read_state_and_read_step():
    model = torch.nn.Linear(3, 2).double()
    opt = torch.optim.SGD([{"params": [model.weight], "momentum": 0.9}, {"params": [model.bias]}], lr=0.1)
    rule = SGDRule()
    from hydra_nb.params import ParamLayout

    layout, params = ParamLayout.from_model(model, opt)
    assert rule.read_state(opt, params) == {"momentum_buffer": [None, None]}
    model(torch.ones(4, 3, dtype=torch.float64)).sum().backward()
    row = rule.read_step(opt, params, layout)
    assert set(row) == set(rule.trace_fields)
    assert row["first"].tolist() == [True, False] and row["active"].tolist() == [True, True]
    assert all(row[f].dtype == (bool if f in rule.bool_fields else np.float64) for f in row)
    opt.step()
    state = rule.read_state(opt, params)
    assert state["momentum_buffer"][1] is None
    assert torch.equal(state["momentum_buffer"][0], opt.state[model.weight]["momentum_buffer"])
    assert state["momentum_buffer"][0] is not opt.state[model.weight]["momentum_buffer"]  # a copy


def _row(**values):
    row = SGDRule().empty_row(1)
    for k, v in values.items():
        row[k][0] = v
    return row


@pytest.mark.parametrize("first,nesterov,damp,mom", [(False, True, 0.0, 0.9), (False, False, 0.3, 0.7),
                                                     (True, False, 0.0, 0.9), (False, False, 0.0, 0.0)])
def test_functional_step_derivatives_match_finite_differences(first, nesterov, damp, mom):
    """Autograd through one step (θ, g, buf) → (θ', buf') equals central finite differences (float64)."""
    g = torch.Generator().manual_seed(0)
    theta, grad, buf = (torch.randn(3, 2, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    row = _row(lr=0.1, momentum=mom, dampening=damp, weight_decay=0.05, nesterov=nesterov, first=first, active=True)
    rule = SGDRule()

    def step(theta, grad, buf):
        new, state = rule.functional_step([theta], [grad], {"momentum_buffer": [buf]}, row)
        return new[0], state["momentum_buffer"][0]

    assert torch.autograd.gradcheck(step, (theta, grad, buf))


def test_inactive_parameter_passes_through():
    rule = SGDRule()
    theta, buf = torch.randn(4), torch.randn(4)
    row = _row(lr=0.1, momentum=0.9, active=False)
    new, state = rule.functional_step([theta], [None], {"momentum_buffer": [buf]}, row)
    assert new[0] is theta and state["momentum_buffer"][0] is buf


def test_missing_buffer_after_the_first_step_is_an_error():
    with pytest.raises(ValueError, match="no momentum buffer"):
        SGDRule().functional_step([torch.zeros(2)], [torch.ones(2)], {"momentum_buffer": [None]},
                                  _row(lr=0.1, momentum=0.9, active=True))
    with pytest.raises(ValueError, match="one entry per tracked parameter"):
        SGDRule().functional_step([torch.zeros(2)], [], {"momentum_buffer": [None]}, _row(active=True))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kw", [dict(momentum=0.9, weight_decay=0.01, nesterov=True), dict(momentum=0.9, dampening=0.3)],
                         ids=["nesterov_wd", "dampening"])
def test_fused_sgd_is_within_a_few_roundings(kw, dtype):
    """fused=True runs torch's fused CPU kernel (the same formulas, its own association and vectorisation):
    not bitwise, each step within a few roundings of its terms."""
    opt_fn = lambda m: torch.optim.SGD(m.parameters(), lr=0.05, fused=True, **kw)  # noqa: E731
    compare_with_torch(opt_fn, dtype=dtype, steps=10, ulps=4)
