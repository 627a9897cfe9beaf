"""BatchNorm in training mode: per-sample gradients of a layer that couples the samples of a batch.

With batch statistics, sample j's output depends on every sample of the batch through the
batch mean μ_B(θ) and (biased) variance σ²_B(θ) of each BatchNorm input:

    BN(x_j) = γ ⊙ (x_j − μ_B) / sqrt(σ²_B + ε) + β

Training minimises Σ_j (1 + w_j)·ℓ_j(θ; B), so the injection of sample i (its gradient as it
enters the step, the u_t of the HYDRA recursion) is

    exact:  u_i = d/dw_i ∇_θ Σ_j (1 + w_j)·ℓ_j = ∇_θ ℓ_i(θ; B)

the gradient of sample i's own loss term *including* its dependence on θ through the batch
statistics (which carry the other samples' activations). Σ_i u_i is the batch gradient, ``.grad``.
hydra_nb computes it as one vector-Jacobian product of the batch forward per sample, with the
cotangent of the model's output restricted to row i (vmapped over the rows: about B backward
passes per step).

    fixed:  u_i = ∇_θ ℓ_i(θ; μ_B, σ²_B held constant)

the standard approximation: the statistics are computed from the batch, then treated as
constants, which makes BatchNorm a per-sample affine map. Σ_i u_i is then *not* ``.grad`` (the
terms through the statistics are missing), so the ``.grad`` check
compares ``.grad`` with the batch-coupled sum instead (one extra backward per checked step).
Computed by ``torch.func.vmap`` over samples of the model's vjp (``fallback.per_sample_vjp``, the
helper the fallback rule uses), each BatchNorm normalising with the recorded batch statistics.

Both recompute the batch forward from what the user's forward recorded, with every BatchNorm
module's forward replaced (``replaying``) so that running statistics are never touched: the
user's run, running statistics included, is the same with and without tracking.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import TrackingConfigError
from .fallback import per_sample_vjp

CHOICES = ("fixed", "exact")
_CHUNK_BYTES = 64 << 20  # per-sample gradients held at once while vmapping


def uses_batch_stats(m: nn.Module) -> bool:
    """Whether a BatchNorm module normalises with the statistics of its input batch (as it is now)."""
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and (
        m.training or m.running_mean is None or m.running_var is None)


def batchnorm_route(model: nn.Module, choice, world_size: int) -> str | None:
    """The BatchNorm choice that applies to ``model`` (None: no BatchNorm uses batch statistics), or raise."""
    if choice not in CHOICES:
        raise TrackingConfigError(
            f"batchnorm must be 'fixed' (per-sample gradients with the batch statistics held constant, the "
            f"default) or 'exact' (batch-coupled per-sample gradients, about B backward passes per step), got {choice!r}.")
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return None
    untracked = [m for m in bns if not m.track_running_stats]
    if untracked:
        raise TrackingConfigError(
            f"{type(untracked[0]).__name__} with track_running_stats=False normalises with batch statistics also "
            "in eval mode, so the test-loss gradients of queries (one test sample at a time) are not defined. "
            "Build it with track_running_stats=True (the default).")
    training = [m for m in bns if m.training]
    if not training:
        return None  # eval-mode BatchNorm is a per-sample affine map: the per-layer hooks handle it
    if any(isinstance(m, nn.SyncBatchNorm) for m in training):
        raise TrackingConfigError(
            "SyncBatchNorm in training mode computes its statistics over every rank's batch; hydra_nb does not "
            "support it. Convert it to BatchNorm (or put it in eval mode) to track the run.")
    if world_size > 1:
        raise TrackingConfigError(
            "BatchNorm in training mode is not supported under DistributedDataParallel yet. Put the BatchNorm "
            "layers in eval mode, or track a single-process run.")
    dropouts = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 and m.training]
    if dropouts:
        raise TrackingConfigError(
            "With BatchNorm in training mode hydra_nb recomputes the batch forward to get per-sample gradients, and "
            "dropout makes that forward random. Set the dropout probabilities to 0, or put BatchNorm in eval mode.")
    return choice


@dataclass
class BNRecord:
    """One call of one BatchNorm module during a training forward: how it normalised."""

    module: nn.Module
    batch: bool  # with its input's batch statistics (else with its running statistics)
    mean: torch.Tensor  # (C,) detached: the batch mean, or the running mean at the call
    var: torch.Tensor  # (C,) detached: the biased batch variance, or the running variance
    numel: int = 0  # elements of its input (sizes the chunks of the replays)


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def record(module: nn.Module, x: torch.Tensor) -> BNRecord:
    """What a BatchNorm call about to run on input ``x`` will normalise with."""
    if uses_batch_stats(module):
        x = x.detach()
        dims = _reduce_dims(x)
        return BNRecord(module, True, x.mean(dims), x.var(dims, unbiased=False), x.numel())
    return BNRecord(module, False, module.running_mean.detach().clone(), module.running_var.detach().clone(),
                    x.numel())


def _normalise(module: nn.Module, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = (x - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + module.eps)
    if module.weight is not None:
        y = y * module.weight.reshape(shape)
    if module.bias is not None:
        y = y + module.bias.reshape(shape)
    return y


class _Replay:
    def __init__(self, records: list[BNRecord], coupled: bool):
        self.coupled = coupled
        self.by_module: dict[int, list[BNRecord]] = {}
        for r in records:
            self.by_module.setdefault(id(r.module), []).append(r)
        self.calls: dict[int, int] = {}

    def reset(self) -> None:
        self.calls = {}

    def forward(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        recs = self.by_module[id(module)]
        k = self.calls.get(id(module), 0)
        self.calls[id(module)] = k + 1
        if k >= len(recs):
            raise RuntimeError(f"{type(module).__name__} was called more often than in the recorded forward")
        rec = recs[k]
        if rec.batch and self.coupled:  # the batch statistics as functions of θ, not constants
            dims = _reduce_dims(x)
            return _normalise(module, x, x.mean(dims), x.var(dims, unbiased=False))
        return _normalise(module, x, rec.mean.to(x.dtype), rec.var.to(x.dtype))


@contextmanager
def replaying(records: list[BNRecord], coupled: bool):
    """Inside, each recorded BatchNorm module normalises as in its recorded call(s), in call order.

    ``coupled``: with batch statistics recomputed differentiably from its input (the true batch-coupled
    function); else with the recorded statistics as constants. Running statistics are never updated.
    Yields the replay; call ``reset()`` before each forward.
    """
    replay = _Replay(records, coupled)
    patched = []
    try:
        for r in records:
            m = r.module
            if any(m is p for p, _ in patched):
                continue
            had = vars(m).get("forward")
            object.__setattr__(m, "forward", lambda x, _m=m: replay.forward(_m, x))
            patched.append((m, had))
        yield replay
    finally:
        for m, had in patched:
            if had is None:
                vars(m).pop("forward", None)
            else:
                object.__setattr__(m, "forward", had)


def _with_buffer_copies(model: nn.Module, params: dict) -> dict:
    """Parameters plus copies of every buffer: a layer that updates its buffers in place (other than the
    BatchNorm layers ``replaying`` handles) updates the copies, never the model's own."""
    return {**{n: b.clone() for n, b in model.named_buffers()}, **params}


def _chunk(batch: int, numel: int, itemsize: int) -> int:
    """Lanes per vmap call, each holding about ``numel`` elements (its gradients or activations)."""
    return max(1, min(batch, _CHUNK_BYTES // max(1, numel * itemsize)))


def per_sample_gradients(model: nn.Module, primals: dict[str, torch.Tensor], call, coupled: bool) -> dict[str, torch.Tensor]:
    """{name: (B, *shape)} per-sample gradients of one root call ``model(*args)`` with output cotangent g.

    Sample b's loss term reaches θ only through output row b, so its gradient is the vjp of the
    batch forward with cotangent g restricted to row b (``coupled``), or, with the statistics held
    fixed, the vjp of the single-sample forward with cotangent g_b: ``fallback.per_sample_vjp``
    either way, each BatchNorm normalising as ``replaying`` says.
    """
    g = call.output_grad
    B = g.shape[0]
    numel = sum(p.numel() for p in primals.values())
    itemsize = next(iter(primals.values())).element_size()
    # a lane holds one sample's gradients and backpropagates through the whole batch ("exact") or one
    # sample ("fixed"); BatchNorm inputs, a few times over, stand in for the activations
    acts = 4 * sum(r.numel for r in call.bn_records)
    step = _chunk(B, max(numel, acts if coupled else acts // B), itemsize)
    with replaying(call.bn_records, coupled) as replay:
        def forward(p, args, kwargs):
            replay.reset()
            return torch.func.functional_call(model, _with_buffer_copies(model, p), args, kwargs)

        return per_sample_vjp(forward, primals, call.args, call.kwargs, [g], coupled=coupled, chunk=step)


def coupled_total(model: nn.Module, primals: dict[str, torch.Tensor], call) -> dict[str, torch.Tensor]:
    """The batch gradient of one root call: the vjp of the batch forward (batch statistics as functions
    of θ) with the output cotangent; what the user's backward put into ``.grad``."""
    with replaying(call.bn_records, True) as replay:
        def f(p):
            replay.reset()
            return torch.func.functional_call(model, _with_buffer_copies(model, p), call.args, call.kwargs)

        _, vjp_fn = torch.func.vjp(f, primals)
        return vjp_fn(call.output_grad)[0]
