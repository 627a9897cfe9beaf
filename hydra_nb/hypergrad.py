"""The HYDRA recursion for ``torch.optim.SGD`` (both modes) and ``torch.optim.Adam``/``AdamW`` (fast mode).

PyTorch's SGD, per parameter tensor and step t (group hyperparameters η, μ, τ
(dampening), λ (weight decay), Nesterov):

    d = g + λθ;   buf = d (first step) | μ·buf + (1−τ)·d;   s = d + μ·buf (Nesterov) | buf | d (μ = 0);   θ ← θ − η·s

Differentiating with respect to sample i's loss weight w_i at w = 0, with
h = dθ/dw_i and b = d(buf)/dw_i:

    dd = H_t·h + λ·h + u_t          u_t: sample i's gradient as it entered .grad at step t
    b  ← dd | μ·b + (1−τ)·dd
    ds = dd + μ·b | b | dd
    h  ← h − η·ds

Exact mode keeps H_t·h (Hessian-vector products of the batch loss at θ_t).
Fast mode drops it; (h, b) then evolve by a 2×2 matrix per parameter tensor
and step, (h, b) ← A_t·(h, b) + e_t·u_t, so h_S = Σ_{t<S} c_{t→S}·u_t with
scalar response coefficients c_{t→S} = [1 0]·A_{S−1}···A_{t+1}·e_t. A fixed
linear projection commutes with all of it.

Adam and AdamW (fast mode only; ``docs/optimizers.md`` derives this). Per tensor at Adam step t:
m ← β1·m + (1−β1)·g, v ← β2·v + (1−β2)·g², D_t = 1/(√(v̂_t/(1−β2^t)) + ε) (v̂ = v, or the running
max with amsgrad), θ ← θ(1 − ηλ) (AdamW) then θ ← θ − η/(1−β1^t)·D_t ⊙ m. Approximation (1):
v (hence D_t) is held fixed with respect to w_i and H_t·h is dropped, so with b = dm/dw_i

    b ← β1·b + (1−β1)·u_t;   h ← (1−ηλ)·h − η/(1−β1^t)·D_t ⊙ b.

Approximation (2): the response to an injection at step s uses D_s at every later step; then the
log row is r_s = D_s ⊙ u_s (projected), and with b now in preconditioned units the recursion is
scalar per tensor again: b ← β1·b + (1−β1)·r, h ← (1−ηλ)·h − η/(1−β1^t)·b.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from .errors import TrackingConfigError
from .params import ParamLayout

HVP_METHODS = ("auto", "vmap", "loop")
TRACE_FIELDS = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "first", "active")
# Adam/AdamW: weight_decay here is the decoupled (AdamW) decay λ; Adam's coupled L2 is refused
ADAM_TRACE_FIELDS = ("lr", "beta1", "bias_correction1", "weight_decay", "active")
_BOOL_FIELDS = {"nesterov", "first", "active"}


def optimizer_kind(optimizer) -> str:
    """``"SGD"``, ``"Adam"`` or ``"AdamW"``: the name a store records (``attrs["hydra_nb"]["optimizer"]``)."""
    if isinstance(optimizer, torch.optim.SGD):
        return "SGD"
    if isinstance(optimizer, torch.optim.Adam):  # AdamW subclasses Adam in torch >= 2.6
        return "AdamW" if isinstance(optimizer, torch.optim.AdamW) or optimizer.defaults.get(
            "decoupled_weight_decay", False) else "Adam"
    if isinstance(optimizer, torch.optim.AdamW):  # older torch: AdamW is its own class
        return "AdamW"
    raise ValueError(type(optimizer).__name__)


def trace_fields(kind: str) -> tuple[str, ...]:
    """The per-step trace fields a store of optimizer ``kind`` holds."""
    return ADAM_TRACE_FIELDS if kind in ("Adam", "AdamW") else TRACE_FIELDS


def trace_dtype(field: str) -> str:
    return "bool" if field in _BOOL_FIELDS else "float64"


def validate_optimizer(optimizer, mode: str = "fast") -> None:
    """Raise unless ``optimizer`` is one whose recursion hydra_nb describes (SGD; Adam/AdamW in fast mode)."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TrackingConfigError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}.")
    if not isinstance(optimizer, (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)):
        raise TrackingConfigError(
            f"hydra_nb tracks torch.optim.SGD (with any momentum, dampening, Nesterov, weight decay and "
            f"learning-rate schedule) and torch.optim.Adam/AdamW (fast mode); {type(optimizer).__name__} is not "
            "supported yet. Train with one of these to use hydra_nb.")
    kind = optimizer_kind(optimizer)
    for g in optimizer.param_groups:
        if g.get("maximize", False):
            raise TrackingConfigError(f"{kind} with maximize=True is not supported: minimise the negated loss instead.")
    if kind == "SGD":
        return
    if mode == "exact":
        raise TrackingConfigError(
            f"mode='exact' supports torch.optim.SGD only: hydra_nb's {kind} recursion is an approximation "
            "(the second moment held fixed, Hessian terms dropped; see docs/optimizers.md), so there is no "
            f"exact {kind} mode. Use mode='fast' with {kind}, or train with SGD for exact hypergradients.")
    if any(float(g["weight_decay"]) != 0 and not _decoupled(optimizer, g) for g in optimizer.param_groups):
        raise TrackingConfigError(
            "torch.optim.Adam with weight_decay > 0 (L2 added to the gradient before the adaptive scaling) is not "
            "supported: its decay feeds back through the elementwise preconditioner, which a projected gradient log "
            "cannot follow. Use torch.optim.AdamW (decoupled weight decay), or Adam with weight_decay=0.")


def _decoupled(optimizer, group: dict) -> bool:
    """Whether this Adam group's weight decay is decoupled (AdamW's), as torch's Adam step reads it."""
    return bool(group.get("decoupled_weight_decay", optimizer_kind(optimizer) == "AdamW"))


def adam_preconditioner(optimizer, params: list[nn.Parameter]) -> list[torch.Tensor | None]:
    """D_t = 1/(√(v̂_t/(1−β2^t)) + ε) per parameter, as Adam is about to apply it (call before ``step``).

    Computed from Adam's state and ``.grad`` exactly as torch's Adam does: v_t = β2·v + (1−β2)·g²
    (v = 0 before the first step), v̂_t = max(v̂, v_t) with amsgrad, t = the step about to be taken.
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


def read_sgd_step(optimizer: torch.optim.SGD, params: list[nn.Parameter], layout: ParamLayout) -> dict[str, np.ndarray]:
    """The hyperparameters each tracked parameter is about to be updated with (call before ``step``)."""
    n = len(params)
    row = {f: np.zeros(n, dtype=np.float64) for f in TRACE_FIELDS[:4]}
    row.update({f: np.zeros(n, dtype=bool) for f in TRACE_FIELDS[4:]})
    for i, (p, slot) in enumerate(zip(params, layout.slots)):
        group = optimizer.param_groups[slot.group]
        lr = group["lr"]
        row["lr"][i] = float(lr.item() if torch.is_tensor(lr) else lr)
        row["momentum"][i] = float(group["momentum"])
        row["dampening"][i] = float(group["dampening"])
        row["weight_decay"][i] = float(group["weight_decay"])
        row["nesterov"][i] = bool(group["nesterov"])
        row["active"][i] = p.grad is not None
        row["first"][i] = group["momentum"] != 0 and optimizer.state.get(p, {}).get("momentum_buffer") is None
    return row


def read_adam_step(optimizer, params: list[nn.Parameter], layout: ParamLayout) -> dict[str, np.ndarray]:
    """Adam/AdamW's trace row for the step about to be taken (call before ``step``)."""
    n = len(params)
    row = {f: np.zeros(n, dtype=np.float64) for f in ADAM_TRACE_FIELDS[:4]}
    row["active"] = np.zeros(n, dtype=bool)
    for i, (p, slot) in enumerate(zip(params, layout.slots)):
        group = optimizer.param_groups[slot.group]
        decoupled = _decoupled(optimizer, group)
        lr, beta1 = group["lr"], group["betas"][0]
        lr = float(lr.item() if torch.is_tensor(lr) else lr)
        beta1 = float(beta1.item() if torch.is_tensor(beta1) else beta1)
        state = optimizer.state.get(p, {})
        t = float(state["step"]) + 1 if "step" in state else 1.0
        row["lr"][i] = lr
        row["beta1"][i] = beta1
        row["bias_correction1"][i] = 1 - beta1 ** t
        row["weight_decay"][i] = float(group["weight_decay"]) if decoupled else 0.0
        row["active"][i] = p.grad is not None
    return row


def read_step(optimizer, params: list[nn.Parameter], layout: ParamLayout) -> dict[str, np.ndarray]:
    """The trace row of the step about to be taken, for SGD or Adam/AdamW."""
    if optimizer_kind(optimizer) == "SGD":
        return read_sgd_step(optimizer, params, layout)
    return read_adam_step(optimizer, params, layout)


def transitions(trace: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(A, e) of the Hessian-free recursion (h, b) ← A·(h, b) + e·u, for trace arrays of shape (..., P).

    Returns A of shape (..., P, 2, 2) and e of shape (..., P, 2). An SGD trace gives SGD's
    recursion; an Adam trace (``beta1`` present) the recursion of approximations (1)+(2), where u
    is the preconditioned row D_s ⊙ u_s: with c = η/(1−β1^t),

        A = [[1−ηλ, −c·β1], [0, β1]],   e = [−c·(1−β1), 1−β1].
    """
    if "beta1" in trace:
        return _adam_transitions(trace)
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


def _adam_transitions(trace: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
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


def response_coefficients(trace: dict[str, np.ndarray], stops) -> np.ndarray:
    """c[j, t, p] = response of parameter p's h at step ``stops[j]`` to a unit injection at step t.

    h_S = Σ_{t<S} c[S, t]·u_t per parameter tensor (zero for t ≥ S). ``stops`` are numbers of
    completed steps; the result has shape (len(stops), max(stops), P).
    """
    stops = np.asarray(stops, dtype=np.int64)
    T = int(stops.max()) if stops.size else 0
    P = trace["lr"].shape[1] if trace["lr"].ndim == 2 else 0
    out = np.zeros((len(stops), T, P))
    if T == 0:
        return out
    A, e = transitions({k: v[:T] for k, v in trace.items()})
    order = np.argsort(stops)
    sorted_stops = stops[order]
    rho = np.zeros((len(stops), P, 2))
    rho[..., 0] = 1.0
    res = np.zeros((len(stops), T, P))
    first_live = len(stops)
    for t in range(T - 1, -1, -1):
        while first_live > 0 and sorted_stops[first_live - 1] > t:
            first_live -= 1
        live = slice(first_live, None)
        res[live, t] = np.einsum("cpk,pk->cp", rho[live], e[t])
        rho[live] = np.einsum("cpk,pkl->cpl", rho[live], A[t])
    out[order] = res
    return out


class ExactHypergradients:
    """Full-dimensional h and b for the tracked samples, Hessian term included.

    Implements, for every tracked i and parameter tensor p updated at step t,

        dd = (H_t·h)_p + λ·h_p + u_p;   b_p ← dd | μ·b_p + (1−τ)·dd;   ds = dd + μ·b_p | b_p | dd;   h_p ← h_p − η·ds

    with H_t·h from Hessian-vector products of the batch loss L_t(θ) = Σ_b c_b·loss_fn(model(x; θ)_b, y_b),
    where c_b is read off the user's backward. Two ways to compute them give the same numbers:
    ``"vmap"``, forward-over-reverse ``jvp(grad(L_t))`` vmapped over chunks of ``hvp_batch`` vectors, and
    ``"loop"``, one double-backward ``autograd.grad(∇L_t·v)`` per vector with the gradient graph built once
    per step. Which is faster depends on the model and device (benchmarks/field_speed.py: vmap 5.9× faster
    for an MLP on the CPU, 2.2× slower for a ResNet-8); ``"auto"`` times both on the first step with at
    least two full chunks of hypergradients to advance (or all of them) and keeps the faster.
    """

    def __init__(self, model: nn.Module, params: list[nn.Parameter], layout: ParamLayout,
                 tracked: np.ndarray, n_train: int, loss_fn, hvp_batch: int = 32, hvp_method: str = "auto"):
        if hvp_method not in HVP_METHODS:
            raise TrackingConfigError(f"hvp_method must be one of {HVP_METHODS}, got {hvp_method!r}.")
        self.hvp_method = hvp_method
        self.hvp_seconds: dict[str, float] = {}  # per HVP, measured when hvp_method="auto" resolves
        self.model = model
        self.params = params
        self.layout = layout
        self.tracked = np.asarray(tracked, dtype=np.int64)
        self.loss_fn = loss_fn
        self.hvp_batch = hvp_batch
        dtype, device = params[0].dtype, params[0].device
        m, D = len(self.tracked), layout.size
        self.h = torch.zeros(m, D, dtype=dtype, device=device)
        self.b = torch.zeros(m, D, dtype=dtype, device=device)
        self.seen = torch.zeros(m, dtype=torch.bool, device=device)
        slot = torch.full((n_train,), -1, dtype=torch.int64)
        slot[torch.from_numpy(self.tracked)] = torch.arange(m)
        self.slot_of = slot.to(device)

    def step(self, trace_row: dict[str, np.ndarray], samples: torch.Tensor, full_rows: torch.Tensor,
             batch_loss) -> None:
        """Advance h, b over one optimizer step (call before the parameters change).

        ``samples`` (R,) dataset indices and ``full_rows`` (R, D) their full per-sample gradients;
        ``batch_loss(params_by_name)`` evaluates L_t for the HVPs.
        """
        slots = self.slot_of[samples.to(self.slot_of.device)]
        keep = slots >= 0
        inj = torch.zeros_like(self.h)
        inj.index_add_(0, slots[keep], full_rows[keep].to(self.h.dtype))
        hh = self._hvp(batch_loss)
        self.seen[slots[keep]] = True
        for k, s in enumerate(self.layout.slots):
            if not trace_row["active"][k]:
                continue
            sl = slice(s.offset, s.offset + s.numel)
            lr, mom, damp, wd = (float(trace_row[f][k]) for f in ("lr", "momentum", "dampening", "weight_decay"))
            h, b = self.h[:, sl], self.b[:, sl]
            dd = hh[:, sl] + wd * h + inj[:, sl]
            if mom != 0:
                if trace_row["first"][k]:
                    b.copy_(dd)
                else:
                    b.mul_(mom).add_(dd, alpha=1 - damp)
                ds = dd + mom * b if trace_row["nesterov"][k] else b
            else:
                ds = dd
            h.sub_(lr * ds)

    def _hvp(self, batch_loss) -> torch.Tensor:
        """H_t·h for every tracked sample already seen (zeros for the others)."""
        out = torch.zeros_like(self.h)
        rows = torch.nonzero(self.seen).flatten()
        if rows.numel() == 0:
            return out
        primals = {s.name: p.detach() for s, p in zip(self.layout.slots, self.params)}
        if self.hvp_method == "auto":
            enough = rows.numel() >= 2 * self.hvp_batch or rows.numel() == len(self.tracked)
            if rows.numel() < 2 or not enough:  # time both on full chunks, once there are two of them
                self._hvp_vmap(batch_loss, primals, rows, out)
                return out
            n = min(self.hvp_batch, max(rows.numel() // 2, 1))
            timed = {}
            for method, chunk in (("vmap", rows[:n]), ("loop", rows[n : 2 * n])):
                _synchronize(self.h.device)
                t0 = time.perf_counter()
                getattr(self, f"_hvp_{method}")(batch_loss, primals, chunk, out)
                _synchronize(self.h.device)
                timed[method] = (time.perf_counter() - t0) / chunk.numel()
            self.hvp_seconds = timed
            self.hvp_method = min(timed, key=timed.get)
            rest = rows[2 * n :]
            if rest.numel():
                getattr(self, f"_hvp_{self.hvp_method}")(batch_loss, primals, rest, out)
            return out
        getattr(self, f"_hvp_{self.hvp_method}")(batch_loss, primals, rows, out)
        return out

    def _hvp_vmap(self, batch_loss, primals: dict, rows: torch.Tensor, out: torch.Tensor) -> None:
        """out[rows] = H_t·h[rows] by forward-over-reverse jvp(grad(L_t)), vmapped over chunks of hvp_batch."""
        grad_fn = torch.func.grad(batch_loss)

        def hvp(tangent):
            return torch.func.jvp(grad_fn, (primals,), (tangent,))[1]

        batched = torch.func.vmap(hvp)
        for start in range(0, rows.numel(), self.hvp_batch):
            chunk = rows[start : start + self.hvp_batch]
            result = batched(self.layout.unflatten(self.h[chunk]))
            out[chunk] = self.layout.flatten([result[s.name] for s in self.layout.slots], batch_dims=1)

    def _hvp_loop(self, batch_loss, primals: dict, rows: torch.Tensor, out: torch.Tensor) -> None:
        """out[rows] = H_t·h[rows], one double-backward ∂(∇L_t·h)/∂θ per row, the graph of ∇L_t built once."""
        leaves = {name: t.detach().requires_grad_(True) for name, t in primals.items()}
        inputs = list(leaves.values())
        with torch.enable_grad():
            grads = torch.autograd.grad(batch_loss(leaves), inputs, create_graph=True, allow_unused=True)
        live = [(g, s) for g, s in zip(grads, self.layout.slots) if g is not None and g.requires_grad]
        if not live:  # the loss is linear in θ: no curvature
            out[rows] = 0
            return
        for r in rows.tolist():
            tangent = self.layout.unflatten(self.h[r])
            with torch.enable_grad():
                dot = sum((g * tangent[s.name]).sum() for g, s in live)
            hv = torch.autograd.grad(dot, inputs, retain_graph=True, allow_unused=True)
            out[r] = self.layout.flatten([torch.zeros_like(x) if t is None else t for t, x in zip(hv, inputs)])


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batch_targets(batch):
    """The targets of a loader batch: its second element, or a ``labels``/``targets``/``y`` entry."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    if isinstance(batch, dict):
        for key in ("labels", "label", "targets", "target", "y"):
            if key in batch:
                return batch[key]
    raise TrackingConfigError(
        "exact mode needs the targets of each batch to compute Hessian-vector products: the loader must "
        "yield (inputs, targets, ...) tuples or dicts with a 'labels' or 'targets' entry, or pass "
        "batch_fn=lambda batch: (inputs, targets) to hydra_nb.track.")


def loss_weights(output: torch.Tensor, output_grad: torch.Tensor, targets: torch.Tensor, loss_fn,
                 rtol: float) -> torch.Tensor:
    """c_b such that ∂(user's loss)/∂output_b = c_b·∂loss_fn(output_b, y_b)/∂output_b.

    With a mean-reduced loss c_b = 1/|B|, with a sum c_b = 1. Raises if no such c exists, i.e.
    the loop's loss is not a weighted sum of ``loss_fn`` terms (then the HVPs would be wrong).
    """
    out = output.detach().requires_grad_(True)
    with torch.enable_grad():
        per_sample = loss_fn(out, targets)
    if per_sample.shape != (out.shape[0],):
        raise TrackingConfigError(
            f"loss_fn must return one loss per sample (shape ({out.shape[0]},)), got shape "
            f"{tuple(per_sample.shape)}. Use reduction='none', e.g. "
            "loss_fn=lambda out, y: F.cross_entropy(out, y, reduction='none').")
    (g,) = torch.autograd.grad(per_sample.sum(), out)
    g = g.reshape(g.shape[0], -1)
    d = output_grad.reshape(output_grad.shape[0], -1).to(g.dtype)
    den = (g * g).sum(1)
    ok = den > 1e-30 * den.max().clamp_min(1e-300)
    c = torch.where(ok, (d * g).sum(1) / den.clamp_min(1e-300), torch.zeros_like(den))
    if ok.any():
        c = torch.where(ok, c, c[ok].median())
    residual = float((d - c[:, None] * g).norm()) / (float(d.norm()) + 1e-30)
    if residual > rtol:
        raise TrackingConfigError(
            "exact mode: the loss your loop backpropagates is not a per-sample weighted sum of loss_fn "
            f"(relative mismatch {residual:.1e}). Pass loss_fn=... computing your loss per sample "
            "(reduction='none'); the default is cross-entropy.")
    return c.detach()


def make_batch_loss(model: nn.Module, passes, loss_fn, rtol: float, batch_fn=None, replay=None):
    """L_t(θ) = Σ_passes Σ_b c_b·loss_fn(model(x; θ)_b, y_b), a function of {name: tensor}.

    The targets y come from each loader batch: ``batch_fn(batch)[1]`` if given, else ``batch_targets``.
    ``replay(call)``, if given, is a context manager each root call's forward runs in (BatchNorm).
    """
    terms = []
    for p in passes:
        targets = batch_fn(p.batch)[1] if batch_fn is not None else batch_targets(p.batch)
        for call in p.root_calls:
            if call.output_grad is None:
                continue
            y = targets.to(call.output.device) if torch.is_tensor(targets) else targets
            try:
                c = loss_weights(call.output, call.output_grad, y, loss_fn, rtol)
            except TrackingConfigError:
                raise
            except Exception as exc:
                raise TrackingConfigError(
                    f"exact mode: loss_fn failed on the model's outputs and the batch's targets ({exc}). The targets "
                    "are taken as the second element of each batch (or its 'labels'/'targets' entry); if that is "
                    "not so, pass batch_fn=lambda batch: (inputs, targets).") from exc
            terms.append((call, y, c))
    if any(p.root_calls == [] for p in passes):
        raise TrackingConfigError(
            "exact mode needs the model passed to hydra_nb.track to be the one called on each batch "
            "(model(x)), so that the Hessian of the batch loss can be recomputed.")

    def batch_loss(params):
        total = 0.0
        for call, y, c in terms:
            if replay is None:
                out = torch.func.functional_call(model, params, call.args, call.kwargs)
            else:
                with replay(call) as r:
                    r.reset()
                    out = torch.func.functional_call(model, params, call.args, call.kwargs)
            total = total + (c * loss_fn(out, y)).sum()
        return total

    return batch_loss
