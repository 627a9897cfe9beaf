"""``torch.optim.Adam`` and ``torch.optim.AdamW`` (amsgrad, decoupled weight decay, any schedule of lr and betas).

PyTorch's Adam, per parameter tensor at its own step count t (a step where the tensor has no
``.grad`` is skipped entirely and does not count), with its group's η, β1, β2, ε, λ:

    θ ← θ·(1 − ηλ)                           (decoupled weight decay: AdamW)
    g ← g + λθ                               (coupled L2: Adam with weight_decay > 0)
    m ← β1·m + (1−β1)·g                      (torch: m.lerp(g, 1 − β1))
    v ← β2·v + (1−β2)·g²                     v̂ = v, or v̂ ← max(v̂, v) with amsgrad
    θ ← θ − η/(1−β1^t) · m / (√v̂ / √(1−β2^t) + ε)

The trace records, per step and parameter: lr, beta1, bias_correction1 = 1 − β1^t, weight_decay
(the group's λ), active (the fields the fast recursion reads; stores written before the others
existed hold only these), and beta2, eps, amsgrad, decoupled (whether λ is AdamW's decoupled
decay) and step (the parameter's step count t after this step), which the functional step needs.

Fast mode only, with two approximations (docs/optimizers.md derives them). (1) v, hence
D_t = 1/(√(v̂_t/(1−β2^t)) + ε), is held fixed with respect to w_i and H_t·h is dropped, so with
b = dm/dw_i: b ← β1·b + (1−β1)·u_t, h ← (1−ηλ)·h − η/(1−β1^t)·D_t ⊙ b. (2) The response to an
injection at step s uses D_s at every later step; then the log row is r_s = D_s ⊙ u_s
(``precondition``, projected afterwards) and with b in preconditioned units the recursion is scalar
per tensor again: b ← β1·b + (1−β1)·r, h ← (1−ηλ)·h − η/(1−β1^t)·b (``transitions``). Coupled L2
(Adam with weight_decay > 0) is refused in fast mode and taken by ``mode="replay"``; forward exact mode is
refused (``validate``): exact answers come from replaying the real update (``functional_step``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..errors import TrackingConfigError
from ..params import ParamLayout
from .base import OptimizerRule, Row, State, copy_or_none, scalar


def sqrt0(v: torch.Tensor) -> torch.Tensor:
    """√v (v ≥ 0) with derivative 0 instead of ∞ where v == 0; the same values as ``v.sqrt()``.

    An entry whose gradient has been exactly zero so far has v = 0; d√v/dv = ∞ there, and
    autograd would multiply it by the zero derivative of v and return NaN. The inner ``where``
    keeps the root's argument positive, the outer one puts the exact 0 back.
    """
    pos = v > 0
    return torch.where(pos, torch.where(pos, v, 1.0).sqrt(), 0.0)


class AdamRule(OptimizerRule):
    """``torch.optim.Adam``/``AdamW``, named "Adam" or "AdamW" as a store records it."""

    names = ("Adam", "AdamW")
    summary = "torch.optim.Adam/AdamW (fast mode)"
    trace_fields = ("lr", "beta1", "bias_correction1", "weight_decay", "active",
                    "beta2", "eps", "amsgrad", "decoupled", "step")
    fast_fields = ("lr", "beta1", "bias_correction1", "weight_decay", "active")
    bool_fields = frozenset({"active", "amsgrad", "decoupled"})
    state_fields = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    full_rows = True

    def __init__(self, name: str = "Adam"):
        if name not in self.names:
            raise KeyError(name)
        self.name = name

    @classmethod
    def claims(cls, optimizer) -> "AdamRule | None":
        if isinstance(optimizer, torch.optim.Adam):  # AdamW subclasses Adam in torch >= 2.6
            decoupled = isinstance(optimizer, torch.optim.AdamW) or optimizer.defaults.get(
                "decoupled_weight_decay", False)
            return cls("AdamW" if decoupled else "Adam")
        if isinstance(optimizer, torch.optim.AdamW):  # older torch: AdamW is its own class
            return cls("AdamW")
        return None

    @classmethod
    def from_name(cls, name: str) -> "AdamRule":
        return cls(name)

    def decoupled(self, group: dict) -> bool:
        """Whether this group's weight decay is decoupled (AdamW's), as torch's Adam step reads it."""
        return bool(group.get("decoupled_weight_decay", self.name == "AdamW"))

    # -- checks ----------------------------------------------------------------------------
    def validate(self, optimizer, mode: str) -> None:
        """Refuse maximize, exact mode and coupled L2 (Adam with weight_decay > 0), each saying what to do."""
        super().validate(optimizer, mode)
        if mode != "replay" and any(float(g["weight_decay"]) != 0 and not self.decoupled(g)
                                    for g in optimizer.param_groups):
            raise TrackingConfigError(
                "torch.optim.Adam with weight_decay > 0 (L2 added to the gradient before the adaptive scaling) is not "
                "supported in fast mode: its decay feeds back through the elementwise preconditioner, which a projected "
                "gradient log cannot follow. Use torch.optim.AdamW (decoupled weight decay), Adam with weight_decay=0, "
                "or mode='replay' (exact answers by replaying the run; no fast-mode rows).")

    def exact_refusal(self) -> str:
        kind = self.name
        return (f"mode='exact' supports torch.optim.SGD only: hydra_nb's forward {kind} recursion is an approximation "
                "(the second moment held fixed, Hessian terms dropped; see docs/optimizers.md), so there is no "
                f"forward exact {kind} mode. Use mode='fast' (or mode='replay') with {kind}: exact answers for every "
                "sample then come from replay, store.contributions(..., mode='exact', train_data=...).")

    # -- what a store records --------------------------------------------------------------
    def read_step(self, optimizer, params: list[nn.Parameter], layout: ParamLayout) -> Row:
        """Adam/AdamW's trace row for the step about to be taken (call before ``step``)."""
        row = self.empty_row(len(params))
        for i, (p, slot) in enumerate(zip(params, layout.slots)):
            group = optimizer.param_groups[slot.group]
            beta1, beta2 = (scalar(b) for b in group["betas"])
            state = optimizer.state.get(p, {})
            t = float(state["step"]) + 1 if "step" in state else 1.0  # the count torch's step is about to reach
            active = p.grad is not None
            row["lr"][i] = scalar(group["lr"])
            row["beta1"][i] = beta1
            row["bias_correction1"][i] = 1 - beta1 ** t
            row["weight_decay"][i] = float(group["weight_decay"])
            row["active"][i] = active
            row["beta2"][i] = beta2
            row["eps"][i] = float(group["eps"])
            row["amsgrad"][i] = bool(group["amsgrad"])
            row["decoupled"][i] = self.decoupled(group)
            row["step"][i] = t if active else t - 1
        return row

    def read_state(self, optimizer, params: list[nn.Parameter]) -> State:
        """exp_avg (m), exp_avg_sq (v), max_exp_avg_sq (amsgrad's v̂) per parameter, detached copies.

        None where torch has none yet (before the parameter's first step; max_exp_avg_sq without
        amsgrad). The step count is in the trace (``step``), not here.
        """
        states = [optimizer.state.get(p, {}) for p in params]
        return {f: [copy_or_none(s.get(f)) for s in states] for f in self.state_fields}

    # -- the optimizer itself -------------------------------------------------------------------
    def torch_optimizer(self, spec: list[dict]) -> torch.optim.Adam:
        """``torch.optim.AdamW`` for a store named "AdamW", else ``torch.optim.Adam``."""
        cls = torch.optim.AdamW if self.name == "AdamW" else torch.optim.Adam
        return cls([{k: x for k, x in g.items() if k != "decoupled_weight_decay"} for g in spec], foreach=False)

    def group_options(self, v: dict) -> dict:
        """lr, betas, eps, weight decay, amsgrad, and whether the decay is decoupled (set by ``apply_row`` where this
        torch's Adam holds that option)."""
        return {"lr": float(v["lr"]), "betas": (float(v["beta1"]), float(v["beta2"])), "eps": float(v["eps"]),
                "weight_decay": float(v["weight_decay"]), "amsgrad": bool(v["amsgrad"]),
                "decoupled_weight_decay": bool(v["decoupled"])}

    def load_state(self, optimizer, params, state: State, row: Row | None) -> None:
        """m, v (and v̂) per parameter, copies, with torch's step count t before the step of ``row``: the row's count
        after it, less one where the parameter is active then (``row`` None: the count torch holds is kept).
        A parameter without m has no state (its first step is still to come)."""
        for k, p in enumerate(params):
            values = {f: state.get(f, [None] * len(params))[k] for f in self.state_fields}
            if values["exp_avg"] is None:
                optimizer.state.pop(p, None)
                continue
            old = optimizer.state.get(p, {})
            if row is not None:
                t = float(row["step"][k]) - (1.0 if row["active"][k] else 0.0)
            else:
                t = float(old["step"]) if "step" in old else 0.0
            new = {"step": torch.tensor(t, dtype=torch.float32)}
            for f, v in values.items():
                if v is not None:
                    new[f] = v.detach().to(device=p.device, dtype=p.dtype).clone()
            optimizer.state[p] = new

    # -- the log and the recursion -------------------------------------------------------------
    def preconditioner(self, optimizer, params: list[nn.Parameter]) -> list[torch.Tensor | None]:
        """D_t = 1/(√(v̂_t/(1−β2^t)) + ε) per parameter, as Adam is about to apply it (call before ``step``).

        Computed from Adam's state and ``.grad`` as torch's Adam does: v_t = β2·v + (1−β2)·g² (v = 0
        before the first step), v̂_t = max(v̂, v_t) with amsgrad, t = the step about to be taken.
        None for a parameter without a gradient (Adam skips it).
        """
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        out = []
        for p in params:
            if p.grad is None:
                out.append(None)
                continue
            group = group_of[id(p)]
            beta2 = float(group["betas"][1])
            eps = float(group["eps"])
            state = optimizer.state.get(p, {})
            grad = p.grad.detach()
            t = float(state["step"]) + 1 if "step" in state else 1.0
            v = state.get("exp_avg_sq")
            v = (1 - beta2) * grad * grad if v is None else v * beta2 + (1 - beta2) * grad * grad
            if group["amsgrad"] and "max_exp_avg_sq" in state:
                v = torch.maximum(state["max_exp_avg_sq"], v)
            out.append(1.0 / (v.sqrt() / (1 - beta2 ** t) ** 0.5 + eps))
        return out

    def precondition(self, optimizer, params: list[nn.Parameter], layout: ParamLayout,
                     rows: torch.Tensor) -> torch.Tensor:
        """r = D_t ⊙ u for every full row u (R, D) of the step about to be taken (0 where a parameter has no .grad)."""
        parts = [torch.zeros(s.numel, dtype=rows.dtype, device=rows.device) if d is None
                 else d.reshape(-1).to(device=rows.device, dtype=rows.dtype)
                 for d, s in zip(self.preconditioner(optimizer, params), layout.slots)]
        return rows * torch.cat(parts)

    def transitions(self, trace: Row) -> tuple[np.ndarray, np.ndarray]:
        """(A, e) of approximations (1)+(2), u the preconditioned row: with c = η/(1−β1^t),

            A = [[1−ηλ, −c·β1], [0, β1]],   e = [−c·(1−β1), 1−β1].

        λ is AdamW's decoupled decay (``validate`` refuses coupled L2, so a store's λ is always that).
        """
        lr, beta1, bc1, wd = (trace[k].astype(np.float64) for k in ("lr", "beta1", "bias_correction1", "weight_decay"))
        active = trace["active"]
        c = lr / np.where(bc1 > 0, bc1, 1.0)
        A = np.empty(lr.shape + (2, 2))
        A[..., 0, 0] = 1 - lr * wd
        A[..., 0, 1] = -c * beta1
        A[..., 1, 0] = 0.0
        A[..., 1, 1] = beta1
        e = np.stack([-c * (1 - beta1), 1 - beta1], axis=-1)
        eye = np.broadcast_to(np.eye(2), A.shape)
        A = np.where(active[..., None, None], A, eye)
        e = np.where(active[..., None], e, 0.0)
        return A, e

    # -- the step as a function --------------------------------------------------------------
    def functional_step(self, params, grads, state: State, row: Row) -> tuple[list[torch.Tensor], State]:
        """One Adam step (the module docstring's equations), out of place and differentiable.

        The operations of torch's ``_single_tensor_adam`` in its order: ``θ.mul(1 − ηλ)``
        (decoupled) or ``g.add(θ, alpha=λ)`` (coupled), ``torch.lerp(m, g, 1 − β1)``,
        ``v.mul(β2).addcmul(g, g, value=1 − β2)``, ``torch.maximum(v̂, v)`` (amsgrad),
        ``(√v̂ / √(1 − β2^t)).add(ε)``, ``θ.addcdiv(m, denom, value=−η/(1 − β1^t))``, with the
        scalars computed in Python floats as torch does. √ is ``sqrt0``: derivative 0 where v̂ = 0.
        Missing state (the parameter's first step) starts from zeros, as torch's does.
        """
        self._check_lengths(params, grads, state, self.state_fields)
        n = len(params)
        exp_avg, exp_avg_sq, max_sq = (list(state.get(f, [None] * n)) for f in self.state_fields)
        out = []
        for k, (p, g) in enumerate(zip(params, grads)):
            if not row["active"][k]:
                out.append(p)
                continue
            if g is None:
                raise ValueError(f"functional_step: parameter {k} is active at this step but its gradient is None.")
            lr, beta1, beta2, eps, wd, step = (float(row[f][k]) for f in
                                               ("lr", "beta1", "beta2", "eps", "weight_decay", "step"))
            if wd != 0:
                if row["decoupled"][k]:
                    p = p.mul(1 - lr * wd)
                else:
                    g = g.add(p, alpha=wd)
            m = exp_avg[k] if exp_avg[k] is not None else torch.zeros_like(p)
            v = exp_avg_sq[k] if exp_avg_sq[k] is not None else torch.zeros_like(p)
            m = torch.lerp(m, g, 1 - beta1)
            v = v.mul(beta2).addcmul(g, g, value=1 - beta2)
            exp_avg[k], exp_avg_sq[k] = m, v
            bias_correction1 = 1 - beta1 ** step
            bias_correction2 = 1 - beta2 ** step
            step_size = lr / bias_correction1
            bias_correction2_sqrt = bias_correction2 ** 0.5
            if row["amsgrad"][k]:
                vhat = torch.maximum(max_sq[k] if max_sq[k] is not None else torch.zeros_like(p), v)
                max_sq[k] = vhat
            else:
                vhat = v
            denom = (sqrt0(vhat) / bias_correction2_sqrt).add(eps)
            out.append(p.addcdiv(m, denom, value=-step_size))
        return out, {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "max_exp_avg_sq": max_sq}
