"""``torch.optim.SGD`` with any momentum, dampening, Nesterov, weight decay, parameter groups and schedule.

PyTorch's SGD, per parameter tensor at step t, with its group's η (lr), μ (momentum), τ
(dampening), λ (weight decay) and Nesterov flag at that step:

    d = g + λθ
    buf = d (the parameter's first momentum step) | μ·buf + (1−τ)·d
    s = d + μ·buf (Nesterov) | buf | d (μ = 0)
    θ ← θ − η·s

The trace records, per step and parameter: lr, momentum, dampening, weight_decay, nesterov,
first (the momentum buffer is initialised to d at this step) and active (the parameter had a
gradient; SGD skips it otherwise).
"""

from __future__ import annotations

import torch
from torch import nn

from ..params import ParamLayout
from .base import OptimizerRule, Row, State, copy_or_none, scalar


class SGDRule(OptimizerRule):
    """``torch.optim.SGD``: fast mode (exact recursion, Hessian dropped) and exact mode."""

    name = "SGD"
    names = ("SGD",)
    summary = ("torch.optim.SGD (with any momentum, dampening, Nesterov, weight decay and learning-rate "
               "schedule)")
    trace_fields = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "first", "active")
    fast_fields = trace_fields
    bool_fields = frozenset({"nesterov", "first", "active"})
    state_fields = ("momentum_buffer",)

    @classmethod
    def claims(cls, optimizer) -> "SGDRule | None":
        return cls() if isinstance(optimizer, torch.optim.SGD) else None

    @classmethod
    def from_name(cls, name: str) -> "SGDRule":
        if name not in cls.names:
            raise KeyError(name)
        return cls()

    # -- what a store records --------------------------------------------------------------
    def read_step(self, optimizer, params: list[nn.Parameter], layout: ParamLayout) -> Row:
        """The hyperparameters each tracked parameter is about to be updated with (call before ``step``)."""
        row = self.empty_row(len(params))
        for i, (p, slot) in enumerate(zip(params, layout.slots)):
            group = optimizer.param_groups[slot.group]
            row["lr"][i] = scalar(group["lr"])
            row["momentum"][i] = float(group["momentum"])
            row["dampening"][i] = float(group["dampening"])
            row["weight_decay"][i] = float(group["weight_decay"])
            row["nesterov"][i] = bool(group["nesterov"])
            row["active"][i] = p.grad is not None
            row["first"][i] = group["momentum"] != 0 and optimizer.state.get(p, {}).get("momentum_buffer") is None
        return row

    def read_state(self, optimizer, params: list[nn.Parameter]) -> State:
        """``momentum_buffer`` per parameter (None before its first momentum step), detached copies."""
        return {"momentum_buffer": [copy_or_none(optimizer.state.get(p, {}).get("momentum_buffer"))
                                    for p in params]}

    # -- the step as a function --------------------------------------------------------------
    def functional_step(self, params, grads, state: State, row: Row) -> tuple[list[torch.Tensor], State]:
        """θ_{t+1} = θ − η·s with d = g + λθ, buf' = d (first) | μ·buf + (1−τ)·d, s = d + μ·buf' | buf' | d.

        The operations of torch's ``_single_tensor_sgd`` in its order, out of place:
        ``g.add(θ, alpha=λ)`` (only where λ ≠ 0), ``buf.mul(μ).add(d, alpha=1 − τ)``,
        ``d.add(buf', alpha=μ)`` (Nesterov), ``θ.add(s, alpha=−η)``. A parameter's buffer is
        untouched at a step where μ = 0 (torch neither reads nor writes it then).
        """
        self._check_lengths(params, grads, state, self.state_fields)
        bufs = list(state.get("momentum_buffer", [None] * len(params)))
        out = []
        for k, (p, g) in enumerate(zip(params, grads)):
            if not row["active"][k]:
                out.append(p)
                continue
            if g is None:
                raise ValueError(f"functional_step: parameter {k} is active at this step but its gradient is None.")
            lr, mom, damp, wd = (float(row[f][k]) for f in ("lr", "momentum", "dampening", "weight_decay"))
            d = g.add(p, alpha=wd) if wd != 0 else g
            if mom != 0:
                if row["first"][k]:
                    buf = d.clone()  # torch: grad.detach().clone(); here the buffer keeps d's derivative
                elif bufs[k] is None:
                    raise ValueError(f"functional_step: parameter {k} has no momentum buffer but the trace says "
                                     "this is not its first momentum step; pass the state read before the step.")
                else:
                    buf = bufs[k].mul(mom).add(d, alpha=1 - damp)
                bufs[k] = buf
                s = d.add(buf, alpha=mom) if row["nesterov"][k] else buf
            else:
                s = d
            out.append(p.add(s, alpha=-lr))
        return out, {"momentum_buffer": bufs}
