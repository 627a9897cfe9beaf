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

Differentiating with respect to sample i's loss weight w_i at w = 0, with h = dθ/dw_i and
b = d(buf)/dw_i (docs/optimizers.md):

    dd = H_t·h + λ·h + u_t          u_t: sample i's gradient as it entered .grad at step t
    b  ← dd | μ·b + (1−τ)·dd
    ds = dd + μ·b | b | dd
    h  ← h − η·ds

Exact mode (``exact_update``) keeps H_t·h. Fast mode drops it; (h, b) then evolve by a 2×2 matrix
of scalars per parameter tensor and step (``transitions``), which commutes with a projection.
"""

from __future__ import annotations

import numpy as np
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
    supports_exact = True
    curvature_rows = True

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

    # -- the optimizer itself -------------------------------------------------------------------
    def torch_optimizer(self, spec: list[dict]) -> torch.optim.SGD:
        return torch.optim.SGD(spec, lr=0.0, foreach=False)

    def group_options(self, v: dict) -> dict:
        """lr, momentum, dampening, weight decay and Nesterov."""
        return {"lr": float(v["lr"]), "momentum": float(v["momentum"]), "dampening": float(v["dampening"]),
                "weight_decay": float(v["weight_decay"]), "nesterov": bool(v["nesterov"])}

    def load_state(self, optimizer, params, state: State, row: Row | None) -> None:
        """Each parameter's ``momentum_buffer`` (a copy), or none where ``state`` has None."""
        for p, buf in zip(params, state.get("momentum_buffer", [None] * len(params))):
            if buf is None:
                optimizer.state[p].pop("momentum_buffer", None)
            else:
                optimizer.state[p]["momentum_buffer"] = buf.detach().to(device=p.device, dtype=p.dtype).clone()

    # -- the recursions ------------------------------------------------------------------------
    def transitions(self, trace: Row) -> tuple[np.ndarray, np.ndarray]:
        """(A, e) of SGD's Hessian-free recursion: the module docstring's equations with H_t·h dropped.

        buf' = bh·h + bb·b + bu·u and s = sh·h + sb·b + su·u, then h' = h − η·s, so
        A = [[1 − η·sh, −η·sb], [bh, bb]] and e = [−η·su, bu].
        """
        lr, mom, damp, wd = (trace[k].astype(np.float64) for k in ("lr", "momentum", "dampening", "weight_decay"))
        nest, first, active = trace["nesterov"], trace["first"], trace["active"]
        # buf' = bh·h + bb·b + bu·u
        bh = np.where(first, wd, (1 - damp) * wd)
        bb = np.where(first, 0.0, mom)
        bu = np.where(first, 1.0, 1 - damp)
        # step = sh·h + sb·b + su·u
        sh = np.where(nest, wd + mom * bh, bh)
        sb = np.where(nest, mom * bb, bb)
        su = np.where(nest, 1 + mom * bu, bu)
        no_mom = mom == 0
        bh, bb, bu = (np.where(no_mom, 0.0, x) for x in (bh, bb, bu))
        sh, sb, su = np.where(no_mom, wd, sh), np.where(no_mom, 0.0, sb), np.where(no_mom, 1.0, su)
        A = np.empty(lr.shape + (2, 2))
        A[..., 0, 0] = 1 - lr * sh
        A[..., 0, 1] = -lr * sb
        A[..., 1, 0] = bh
        A[..., 1, 1] = bb
        e = np.stack([-lr * su, bu], axis=-1)
        eye = np.broadcast_to(np.eye(2), A.shape)
        A = np.where(active[..., None, None], A, eye)
        e = np.where(active[..., None], e, 0.0)
        return A, e

    def exact_update(self, h, b, hvp, inj, row: Row, k: int) -> None:
        """dd = H_t·h + λ·h + u;   b ← dd | μ·b + (1−τ)·dd;   ds = dd + μ·b | b | dd;   h ← h − η·ds (in place)."""
        lr, mom, damp, wd = (float(row[f][k]) for f in ("lr", "momentum", "dampening", "weight_decay"))
        dd = hvp + wd * h + inj
        if mom != 0:
            if row["first"][k]:
                b.copy_(dd)
            else:
                b.mul_(mom).add_(dd, alpha=1 - damp)
            ds = dd + mom * b if row["nesterov"][k] else b
        else:
            ds = dd
        h.sub_(lr * ds)

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
