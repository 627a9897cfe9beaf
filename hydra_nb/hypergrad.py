"""The recursions of the hypergradients h = dθ/dw_i, generic over the optimizer rules (``hydra_nb.optim``).

Fast mode: per parameter tensor, each rule's Hessian-free recursion is linear with scalar
coefficients from the trace, (h, b) ← A_t·(h, b) + e_t·u_t (``OptimizerRule.transitions``), so

    h_S = Σ_{t<S} c_{t→S}·u_t,     c_{t→S} = [1 0]·A_{S−1}···A_{t+1}·e_t

with one scalar response coefficient per tensor and step (``response_coefficients``). A fixed
linear projection of the u_t commutes with all of it.

Exact mode (rules with ``supports_exact``): the full-dimensional h and b of the tracked samples,
advanced by the rule's ``exact_update`` with the Hessian term H_t·h kept, from Hessian-vector
products of the batch loss L_t(θ) = Σ_b c_b·loss_fn(model(x; θ)_b, y_b) (``ExactHypergradients``,
``make_batch_loss``, ``loss_weights``).

The optimizers' own equations (SGD; Adam/AdamW and their approximations) are in
``hydra_nb/optim/sgd.py`` and ``adam.py``, derived in docs/optimizers.md.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from .errors import TrackingConfigError
from .optim import OptimizerRule
from .params import ParamLayout

HVP_METHODS = ("auto", "vmap", "loop")


def response_coefficients(trace: dict[str, np.ndarray], stops, rule: OptimizerRule) -> np.ndarray:
    """c[j, t, p] = response of parameter p's h at step ``stops[j]`` to a unit injection at step t.

    h_S = Σ_{t<S} c[S, t]·u_t per parameter tensor (zero for t ≥ S), for the recursion
    ``rule.transitions(trace)``. ``stops`` are numbers of completed steps; the result has shape
    (len(stops), max(stops), P).
    """
    stops = np.asarray(stops, dtype=np.int64)
    T = int(stops.max()) if stops.size else 0
    any_field = next(iter(trace.values()))
    P = any_field.shape[1] if any_field.ndim == 2 else 0
    out = np.zeros((len(stops), T, P))
    if T == 0:
        return out
    A, e = rule.transitions({k: v[:T] for k, v in trace.items()})
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

    For every tracked i and parameter tensor p updated at step t, the rule's ``exact_update`` with
    dg/dw_i = (H_t·h)_p + u_p; for SGD (``SGDRule.exact_update``)

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
                 tracked: np.ndarray, n_train: int, loss_fn, hvp_batch: int = 32, hvp_method: str = "auto", *,
                 rule: OptimizerRule):
        if not rule.supports_exact:
            raise TrackingConfigError(rule.exact_refusal())
        if hvp_method not in HVP_METHODS:
            raise TrackingConfigError(f"hvp_method must be one of {HVP_METHODS}, got {hvp_method!r}.")
        self.rule = rule
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
            if not trace_row["active"][k]:  # every optimizer skips a parameter without a gradient
                continue
            sl = slice(s.offset, s.offset + s.numel)
            self.rule.exact_update(self.h[:, sl], self.b[:, sl], hh[:, sl], inj[:, sl], trace_row, k)

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


def loss_gradient_rows(output: torch.Tensor, targets, loss_fn) -> torch.Tensor:
    """g_b = ∂loss_fn(output_b, y_b)/∂output_b, one flat row per sample.

    For the default loss (cross-entropy on class indices) in closed form, softmax(output_b) − onehot(y_b)
    (zero where y_b is ignore_index −100); otherwise by autograd through ``loss_fn``.
    """
    from .data import default_loss

    if loss_fn is default_loss and output.dim() == 2 and torch.is_tensor(targets) and targets.dim() == 1 \
            and not targets.is_floating_point():
        g = torch.softmax(output.detach(), dim=1)
        keep = (targets != -100).to(g.dtype)[:, None]
        g.scatter_add_(1, targets.clamp(min=0)[:, None], -keep)  # − onehot(y), without boolean indexing (no sync)
        return g.mul_(keep)
    out = output.detach().requires_grad_(True)
    with torch.enable_grad():
        per_sample = loss_fn(out, targets)
    if per_sample.shape != (out.shape[0],):
        raise TrackingConfigError(
            f"loss_fn must return one loss per sample (shape ({out.shape[0]},)), got shape "
            f"{tuple(per_sample.shape)}. Use reduction='none', e.g. "
            "loss_fn=lambda out, y: F.cross_entropy(out, y, reduction='none').")
    (g,) = torch.autograd.grad(per_sample.sum(), out)
    return g.reshape(g.shape[0], -1)


def loss_weights(output: torch.Tensor, output_grad: torch.Tensor, targets: torch.Tensor, loss_fn,
                 rtol: float, check: bool = True) -> torch.Tensor:
    """c_b such that ∂(user's loss)/∂output_b = c_b·∂loss_fn(output_b, y_b)/∂output_b (on the output's device).

    With a mean-reduced loss c_b = 1/|B|, with a sum c_b = 1. With ``check``, raises if no such c exists, i.e.
    the loop's loss is not a weighted sum of ``loss_fn`` terms (then the HVPs, or a replay, would be wrong);
    that check reads a number off the device (a synchronisation on a GPU).
    """
    g = loss_gradient_rows(output, targets, loss_fn)
    d = output_grad.reshape(output_grad.shape[0], -1).to(g.dtype)
    den = (g * g).sum(1)
    ok = den > 1e-30 * den.max().clamp_min(1e-300)
    c = (d * g).sum(1) / den.clamp_min(1e-300)
    # a sample whose loss has no gradient here (ignored, or fit to rounding) takes the others' mean weight
    c = torch.where(ok, c, (c * ok).sum() / ok.sum().clamp_min(1))
    if check:
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
