"""Per-sample gradients, captured from the user's own backward pass.

For every training forward (root model in training mode, autograd enabled) a
forward hook keeps the layer's input a, and a hook on its output tensor
receives δ = ∂(loss)/∂(output) during the user's ``backward()``. The gradient
that sample b puts into ``.grad`` is then, per layer type (one rule per file, found through the
table ``rules.LAYER_RULES``),

    Linear      G_b = Σ_l δ_bl a_blᵀ                    (l: positions, if any)       linear.py
    Conv        G_b = Σ_l δ_bl patch(a_b)_lᵀ             (patches of the input)       conv.py
    Embedding   G_b = Σ_l e_{idx_bl} δ_blᵀ                                            embedding.py
    LayerNorm   g_b = Σ_l δ_bl ⊙ â_bl  (weight),  Σ_l δ_bl  (bias)                   layernorm.py
    other       torch.func: vmap over samples of the module's vjp, at step()         fallback.py

and each is projected by the parameter's block of the ``Projector`` (a sketch T), either
from G_b or factor-wise, T(G_b) = Σ_l CS1(δ_bl) ⊛ CS2(a_bl), whichever is cheaper (``routes.py``;
``GradientCapture(route=...)`` forces one). Since δ is what the backward really propagated, the
reduction (mean or sum) and any loss the user wrote are accounted for: Σ_b G_b equals ``.grad``,
which ``check`` verifies.

With BatchNorm in training mode the samples of a batch are coupled and these per-layer
formulas do not apply: the whole model's per-sample gradients are computed from its root calls
instead, by the choice ``batchnorm`` ("fixed" or "exact", see ``batchnorm.py``).

Rows of a batch are matched to dataset indices through the ``LoaderTap``.
Nothing here raises into the user's backward: a failure is kept in
``failure`` and handled by the tracker at the next optimizer step.
"""

from __future__ import annotations

import math
import time
import weakref
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..batches import LoaderTap
from ..errors import TrackingConfigError, TrackingFailure
from ..projection import Block, Projector
from . import batchnorm as bn
from .routes import ROUTES
from .rules import LAYER_RULES, LayerRule, Owner, owners, rule_for

__all__ = ["GradientCapture", "LAYER_RULES", "LayerRule", "Owner", "Pass", "ROUTES", "RootCall", "rule_for"]

_BATCHNORM = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)


@dataclass
class RootCall:
    """One call of the root model during a training forward (exact mode's HVPs, BatchNorm, replay's record)."""

    args: tuple
    kwargs: dict
    output: torch.Tensor
    output_grad: torch.Tensor | None = None
    bn_records: list = field(default_factory=list)  # BatchNorm calls inside it, in order (batchnorm.BNRecord)
    rng: torch.Tensor | None = None  # CPU generator state before the forward, if the forward drew random numbers
    cuda_rng: torch.Tensor | None = None  # the output device's CUDA generator state, likewise


@dataclass
class Pass:
    """Everything captured for one batch from the loader, between two optimizer steps."""

    generation: int
    indices: torch.Tensor  # (B,) dataset indices (CPU)
    batch: Any  # the batch as the loader yielded it (targets for exact mode)
    buf: torch.Tensor | None = None  # (B, dim) projected per-sample gradients (once ``gather`` has run)
    root_calls: list[RootCall] = field(default_factory=list)
    parts: list = field(default_factory=list)  # (offset, stop, values) added since, in the order they came
    dim: int = 0  # length of a row

    def add(self, block: Block, values: torch.Tensor, dim: int) -> None:
        """Add ``values`` (B, block.dim) at the block's columns of a (B, dim) row (kept until ``gather``)."""
        self.dim = dim
        self.parts.append((block.offset, block.stop, values))

    def gather(self) -> None:
        """Sum what was added into ``buf``: one concatenation when the parts tile the row once each (the usual
        case, one part per parameter block), else zeros and additions in arrival order (as ``buf +=`` would)."""
        if not self.parts:
            return
        parts, self.parts = self.parts, []
        order = sorted(parts, key=lambda part: part[0])
        values = [v for _, _, v in order]
        tiles = all(a == b for (_, a, _), (b, _, _) in zip(order, order[1:])) and order[0][0] == 0 \
            and order[-1][1] == self.dim and len({(v.dtype, v.device) for v in values}) == 1
        if self.buf is None and tiles:
            self.buf = torch.cat(values, dim=1)
            return
        if self.buf is None:
            v = parts[0][2]
            self.buf = torch.zeros(v.shape[0], self.dim, dtype=v.dtype, device=v.device)
        for a, b, v in parts:
            self.buf[:, a:b] += v

    @property
    def backpropagated(self) -> bool:
        return self.buf is not None or bool(self.parts) or any(c.output_grad is not None for c in self.root_calls)


@dataclass
class _DeferredCall:
    """One recorded call of a module whose rule runs at step() (the fallback)."""

    owner: Owner
    blocks: dict[str, Block]
    inputs: tuple  # (args, kwargs), detached
    cotangents: list  # one per flattened output, filled by the user's backward (None until then)
    generation: int


def _guarded(method):
    """Run a hook body; an exception becomes ``self.failure`` instead of reaching the user's forward."""

    def wrapper(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            if self.failure is None:
                self.failure = TrackingFailure(f"a hydra_nb hook failed: {exc!r}")
            return None
        finally:
            self.seconds += time.perf_counter() - start

    wrapper.__name__ = method.__name__
    wrapper.__doc__ = method.__doc__
    return wrapper


class GradientCapture:
    """Hooks that turn the user's backward into projected per-sample gradients, one ``Pass`` per batch."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter], projector: Projector, tap: LoaderTap,
                 keep_root_calls: bool = False, batchnorm: str | None = None, route: str = "auto",
                 per_sample: bool = True):
        if route not in ROUTES:
            raise TrackingConfigError(f"route must be one of {', '.join(map(repr, ROUTES))} (which way the layer rules "
                                      f"sketch per-sample gradients; 'auto' chooses by cost), got {route!r}.")
        self.route = route
        self.model = model
        self.params = params
        self.projector = projector
        self.tap = tap
        self.batchnorm = batchnorm  # None, or the choice for BatchNorm in training mode ("fixed" | "exact")
        # per_sample False: no per-sample gradients at all, only the root calls (replay's record)
        self.per_sample = per_sample
        self.keep_root_calls = keep_root_calls or batchnorm is not None or not per_sample
        self._bn_records: list | None = None
        self._rng_before: tuple | None = None
        self.passes: dict[int, Pass] = {}
        self.fallback_calls: list[_DeferredCall] = []
        self.failure: BaseException | None = None
        self.suspended = False
        self.seconds = 0.0  # time spent in hooks (forward and backward)
        self._handles: list = []
        self._accumulated: dict[int, tuple] = {}  # param index → (weakref to .grad, its version, backwards so far)
        tracked = {id(p): i for i, p in enumerate(params)}
        self.owners: list[Owner] = owners(model, tracked)
        covered = {b for owner in self.owners for _, b in owner.owned}
        uncovered = [projector.layout.slots[i].name for i in range(len(params)) if i not in covered]
        if uncovered:  # pragma: no cover - every parameter belongs to some module
            raise TrackingConfigError(f"hydra_nb found no module owning parameter(s) {uncovered}.")

    # -- lifecycle -----------------------------------------------------------------------
    def attach(self) -> None:
        for i, p in enumerate(self.params):  # what .grad is after each backward (the check's sampling reads it)
            self._handles.append(p.register_post_accumulate_grad_hook(self._grad_accumulated(i)))
        if self.keep_root_calls:
            # the root model's calls: exact mode's HVPs, BatchNorm's per-sample gradients, replay's record.
            # Hooks are closures, not bound methods: a copy.deepcopy of the model (a notebook taking a snapshot)
            # then shares them instead of deep-copying this capture, its loader tap and the loader
            self._handles.append(self.model.register_forward_pre_hook(
                lambda module, args: self._root_pre_hook(module, args)))
            if self.batchnorm is not None:
                for module in self.model.modules():
                    if isinstance(module, _BATCHNORM):
                        self._handles.append(module.register_forward_pre_hook(
                            lambda m, args: self._bn_record_hook(m, args)))
            self._handles.append(self.model.register_forward_hook(
                lambda module, args, kwargs, output: self._root_hook(module, args, kwargs, output), with_kwargs=True))
        if self.batchnorm is not None or not self.per_sample:
            return  # BatchNorm: the whole model's per-sample gradients come from its root calls
        for owner in self.owners:
            blocks = {name: self.projector.blocks[b] for name, b in owner.owned}
            if owner.rule.follow is not None:
                self._handles.extend(owner.rule.follow(owner.module, blocks, self))
                continue
            if owner.rule.deferred:
                hook = self._deferred_hook(owner, blocks)
            else:
                hook = self._layer_hook(owner.rule, blocks)
            self._handles.append(owner.module.register_forward_hook(hook, with_kwargs=owner.rule.deferred))
        for module in self.model.modules():
            if isinstance(module, _BATCHNORM):
                self._handles.append(module.register_forward_pre_hook(lambda m, args: self._batchnorm_guard(m, args)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.passes.clear()
        self.fallback_calls.clear()
        self._accumulated.clear()

    def _grad_accumulated(self, i: int):
        """A post-accumulate-grad hook: note which tensor ``.grad`` is, and its version, after each backward."""

        def hook(param):
            before = self._accumulated.get(i)
            self._accumulated[i] = (weakref.ref(param.grad), param.grad._version, 1 + (before[2] if before else 0))

        return hook

    def grads_changed(self) -> bool:
        """Whether ``check`` must run to trust ``.grad``, as far as the post-accumulate-grad hooks can tell: some
        ``.grad`` was modified in place or replaced after the backward that last accumulated into it (gradient
        clipping, a loss scaler's unscale, an assignment), holds a value no backward put there, or was
        accumulated into by several backwards since the last step (which of their passes make it up is for
        the check to say).

        Reads the hooks' notes and clears them (call once per step, before ``step()``); a ``.grad`` of None
        counts as unchanged (the check leaves such parameters out too). A change that flows through autograd
        itself (a loss term on the parameters, a parameter hook) is not seen here: only ``check`` sees those.
        """
        notes, self._accumulated = self._accumulated, {}
        for i, p in enumerate(self.params):
            g = p.grad
            if g is None:
                continue
            note = notes.get(i)
            if note is None or note[0]() is not g or note[1] != g._version or note[2] > 1:
                return True
        return False

    # -- for rules that follow a module with hooks of their own (LayerRule.follow) ----------
    def sink(self, batch_size: int):
        """During a training forward: a function ``emit(per_sample)`` that adds the (block, rows) pairs the callable
        ``per_sample()`` yields to the pass of the current batch (of ``batch_size`` samples), timed, a failure kept
        instead of raised into the user's backward; None when nothing is captured (not training, no autograd,
        suspended, an earlier failure, a batch that is not the loader's)."""
        if not self._capturing():
            return None
        p = self._pass_for(batch_size)
        if p is None:
            return None
        dim = self.projector.dim

        def emit(per_sample):
            start = time.perf_counter()
            try:
                for block, values in per_sample():
                    p.add(block, values, dim)
            except Exception as exc:  # never raise into the user's backward
                self.fail(TrackingFailure(f"capturing per-sample gradients failed: {exc!r}"))
            finally:
                self.seconds += time.perf_counter() - start

        return emit

    def fail(self, exc: BaseException) -> None:
        """Keep the first failure; the tracker raises it at the next optimizer step."""
        if self.failure is None:
            self.failure = exc

    # -- hooks ---------------------------------------------------------------------------
    def _capturing(self) -> bool:
        return (not self.suspended and not _PAUSED.get() and self.failure is None and self.model.training
                and torch.is_grad_enabled())

    def _pass_for(self, batch_size: int) -> Pass | None:
        if self.tap.failure is not None:
            return None
        current = self.tap.current
        if current is None:
            self.failure = TrackingConfigError(
                "The model ran a training forward before the tracked DataLoader yielded any batch. "
                "hydra_nb.track must be given the DataLoader that your loop iterates."
            )
            return None
        if len(current.indices) != batch_size:
            self.failure = TrackingConfigError(
                f"The model was called on a batch of {batch_size} samples, but the last batch of the tracked "
                f"DataLoader holds {len(current.indices)}. hydra_nb matches batch rows to the loader's samples, "
                "so the model must be trained on the batches of the DataLoader given to hydra_nb.track "
                "(same order, not split or merged)."
            )
            return None
        p = self.passes.get(current.generation)
        if p is None:
            p = Pass(current.generation, current.indices, current.batch)
            self.passes[current.generation] = p
        return p

    @_guarded
    def _batchnorm_guard(self, module, args):
        if self._capturing() and bn.uses_batch_stats(module):
            self.failure = TrackingConfigError(
                f"{type(module).__name__} was switched to training mode after hydra_nb.track started with every "
                "BatchNorm layer in eval mode, so hydra_nb set up per-layer capture, which cannot follow batch "
                "statistics. Put the model in training mode before entering hydra_nb.track (BatchNorm support: "
                "track(..., batchnorm='fixed' or 'exact')), or keep BatchNorm in eval mode throughout."
            )

    @_guarded
    def _root_pre_hook(self, module, args):
        capturing = self._capturing()
        self._bn_records = [] if capturing else None
        # the generators' states before the forward: kept if the forward draws random numbers (dropout)
        self._rng_before = _rng_states(self.params[0].device) if capturing else None

    @_guarded
    def _bn_record_hook(self, module, args):
        if self._capturing() and self._bn_records is not None and args and torch.is_tensor(args[0]):
            self._bn_records.append(bn.record(module, args[0]))

    def _layer_hook(self, rule: LayerRule, blocks: dict[str, Block]):
        """A forward hook keeping the input a; the output's hook applies the rule to (a, δ) in the backward."""
        dim = self.projector.dim

        @_guarded
        def hook(self, module, args, output):
            if not self._capturing() or not torch.is_tensor(output) or not output.requires_grad:
                return
            a = args[0].detach()
            p = self._pass_for(a.shape[0])
            if p is None:
                return

            def on_grad(grad):
                start = time.perf_counter()
                try:
                    for block, values in rule.per_sample(module, a, grad.detach(), blocks, self.route):
                        p.add(block, values, dim)
                except Exception as exc:  # never raise into the user's backward
                    self.failure = TrackingFailure(
                        f"capturing per-sample gradients of {type(module).__name__} failed: {exc!r}")
                finally:
                    self.seconds += time.perf_counter() - start

            output.register_hook(on_grad)

        return lambda module, args, output: hook(self, module, args, output)

    def _deferred_hook(self, owner: Owner, blocks: dict[str, Block]):
        """A forward hook recording the call (inputs, and its outputs' cotangents as the backward delivers them)."""

        @_guarded
        def hook(self, mod, args, kwargs, output):
            if not self._capturing():
                return
            leaves, spec = tree_flatten((args, kwargs))
            batched = [t for t in leaves if torch.is_tensor(t) and t.dim() > 0]
            if not batched:
                return
            if getattr(mod, "batch_first", True) is False:
                self.failure = TrackingConfigError(
                    f"{type(mod).__name__} has batch_first=False; hydra_nb's per-sample fallback needs the "
                    "batch on the first dimension. Build it with batch_first=True."
                )
                return
            outs, _ = tree_flatten(output)
            if not any(torch.is_tensor(o) and o.requires_grad for o in outs):
                return
            p = self._pass_for(batched[0].shape[0])
            if p is None:
                return
            inputs = tree_unflatten([t.detach() if torch.is_tensor(t) else t for t in leaves], spec)
            call = _DeferredCall(owner, blocks, inputs, [None] * len(outs), p.generation)
            for j, o in enumerate(outs):
                if torch.is_tensor(o) and o.requires_grad:
                    o.register_hook(_store_cotangent(call, j))
            self.fallback_calls.append(call)

        return lambda mod, args, kwargs, output: hook(self, mod, args, kwargs, output)

    @_guarded
    def _root_hook(self, module, args, kwargs, output):
        records, self._bn_records = self._bn_records, None
        if self.batchnorm is not None and self._capturing() and not torch.is_tensor(output):
            self.failure = TrackingConfigError(
                f"With BatchNorm in training mode hydra_nb computes per-sample gradients from the model's output, "
                f"which must be one tensor with the batch first; the model returned {type(output).__name__}.")
            return
        if not self._capturing() or not torch.is_tensor(output) or not output.requires_grad:
            return
        leaves = [t for t in tree_flatten((args, kwargs))[0] if torch.is_tensor(t) and t.dim() > 0]
        p = self._pass_for(leaves[0].shape[0] if leaves else output.shape[0])
        if p is None:
            return
        before, self._rng_before = self._rng_before, None
        call = RootCall(
            tuple(a.detach() if torch.is_tensor(a) else a for a in args),
            {k: v.detach() if torch.is_tensor(v) else v for k, v in kwargs.items()},
            output.detach(),
            bn_records=records or [],
        )
        if before is not None:
            after = _rng_states(self.params[0].device)
            call.rng = None if torch.equal(before[0], after[0]) else before[0]
            if before[1] is not None and not torch.equal(before[1], after[1]):
                call.cuda_rng = before[1]

        def on_grad(grad):
            call.output_grad = grad.detach() if call.output_grad is None else call.output_grad + grad.detach()

        output.register_hook(on_grad)
        p.root_calls.append(call)

    # -- per step --------------------------------------------------------------------------
    def take(self) -> list[Pass]:
        """The passes since the last step (or zero_grad), with every fallback gradient computed."""
        try:
            if self.per_sample:
                self._run_fallbacks()
                self._run_batchnorm()
        finally:
            self.fallback_calls.clear()
        for p in self.passes.values():
            p.gather()
        passes = [p for _, p in sorted(self.passes.items())
                  if p.buf is not None or (not self.per_sample and p.backpropagated)]
        self.passes.clear()
        return passes

    def drop(self) -> None:
        """Gradients were zeroed: what was already backpropagated will never reach a step.

        Passes whose backward has not run yet are kept (``zero_grad`` may come between the
        forward and the backward).
        """
        self.passes = {g: p for g, p in self.passes.items() if not p.backpropagated}
        self.fallback_calls = [c for c in self.fallback_calls if all(x is None for x in c.cotangents)]
        self._accumulated.clear()

    def _run_fallbacks(self) -> None:
        """Apply the deferred rules (the fallback) to the calls recorded since the last step."""
        dim = self.projector.dim
        for call in self.fallback_calls:
            if all(c is None for c in call.cotangents):
                continue
            p = self.passes.get(call.generation)
            if p is None:
                continue
            module = call.owner.module
            self.suspended = True
            try:
                rows = list(call.owner.rule.per_sample(module, call.inputs, call.cotangents, call.blocks, self.route))
            except Exception as exc:
                raise TrackingFailure(
                    f"the torch.func fallback could not compute per-sample gradients of "
                    f"{type(module).__name__}: {exc!r}. If the module uses randomness (dropout) or mixes "
                    "samples of a batch, it cannot be tracked per sample."
                ) from exc
            finally:
                self.suspended = False
            for block, values in rows:
                p.add(block, values, dim)

    def _primals(self) -> dict[str, torch.Tensor]:
        return {s.name: p.detach() for s, p in zip(self.projector.layout.slots, self.params)}

    def _project_named(self, grads: dict[str, torch.Tensor]) -> list[tuple[Block, torch.Tensor]]:
        out = []
        for s, block in zip(self.projector.layout.slots, self.projector.blocks):
            g = grads[s.name]
            out.append((block, block.project_matrix(g.to(block.dtype).reshape(g.shape[0], block.rows, block.cols))))
        return out

    def _run_batchnorm(self) -> None:
        """BatchNorm in training mode: per-sample gradients of the whole model for every backpropagated root call."""
        if self.batchnorm is None:
            return
        dim = self.projector.dim
        primals = None
        for p in self.passes.values():
            for call in p.root_calls:
                if call.output_grad is None:
                    continue
                primals = primals or self._primals()
                self.suspended = True
                try:
                    grads = bn.per_sample_gradients(self.model, primals, call, coupled=self.batchnorm == "exact")
                except Exception as exc:
                    raise TrackingFailure(
                        f"computing per-sample gradients through BatchNorm (batchnorm={self.batchnorm!r}) failed: "
                        f"{exc!r}. The model's forward must be a deterministic function of its inputs and "
                        "parameters, and its output must have the batch first.") from exc
                finally:
                    self.suspended = False
                for block, values in self._project_named(grads):
                    p.add(block, values, dim)

    def _pass_sum(self, p: Pass) -> torch.Tensor:
        """What pass p put into .grad, projected: Σ_b u_b, or, for batchnorm='fixed' (whose u_b do not add up
        to .grad), the batch-coupled gradient of its root calls (one extra vjp of the batch forward)."""
        if self.batchnorm != "fixed":
            return p.buf.sum(0)
        total = torch.zeros(self.projector.dim, dtype=p.buf.dtype, device=p.buf.device)
        primals = self._primals()
        self.suspended = True
        try:
            for call in p.root_calls:
                if call.output_grad is not None:
                    grads = bn.coupled_total(self.model, primals, call)
                    for block, values in self._project_named({n: g.unsqueeze(0) for n, g in grads.items()}):
                        total[block.offset:block.stop] += values[0].to(total.dtype)
        finally:
            self.suspended = False
        return total

    _PROBES = 4
    _PROBE_BYTES = 64 << 20

    def _probes(self):
        """Random probes r (4 × dim) in projected space and q = r·P (4 × D) in parameter space.

        ⟨r, P(g)⟩ = ⟨q, g⟩, so comparing Σ_b ⟨r, u_b⟩ with ⟨q, .grad⟩ checks Σ_b u_b = P(.grad)
        at the cost of one dot product per step instead of projecting every gradient.
        """
        if not hasattr(self, "_probe"):
            blocks, layout = self.projector.blocks, self.projector.layout
            dtype, device = blocks[0].dtype, self.params[0].device
            if layout.size * self._PROBES * torch.finfo(dtype).bits // 8 > self._PROBE_BYTES:
                self._probe = None  # too large to keep: project .grad instead
                return None
            g = torch.Generator().manual_seed(12345)
            r = torch.randn(self.projector.dim, self._PROBES, generator=g, dtype=torch.float64).to(dtype)
            parts = []
            for b in blocks:
                rb = r[b.offset : b.stop]
                if b.sketch:
                    index, sign = b._flat_map()
                    parts.append(rb[index.cpu()] * sign.cpu().to(dtype)[:, None])
                else:
                    parts.append(rb)
            # kept as (4, D) and (4, dim): a short-wide matrix-vector product is ~25x faster than tall-skinny
            self._probe = (r.T.contiguous().to(device), torch.cat(parts).T.contiguous().to(device))
        return self._probe

    def check(self, passes: list[Pass], rtol: float, world_size: int = 1) -> tuple[list[Pass], float]:
        """Verify Σ_b u_b = P(.grad) (captured per-sample gradients add up to what the optimizer sees).

        Compares 4 random linear functionals of both sides (a mismatch e shows as ⟨r, e⟩ ~ ‖e‖·N(0,1)).
        Returns the passes that make up ``.grad`` (a suffix: earlier ones were zeroed by other means
        than ``zero_grad``) and the relative error. Raises TrackingFailure if no suffix matches.
        Parameters whose ``.grad`` is None are left out: SGD skips them, so what was captured for
        them never enters a step.
        """
        blocks, layout = self.projector.blocks, self.projector.layout
        active = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not active:
            return [], 0.0
        if self.batchnorm is not None and not passes:
            raise TrackingFailure(
                "the parameters have gradients but the model passed to hydra_nb.track ran no training forward with "
                "a backward since the last step. With BatchNorm in training mode hydra_nb computes per-sample "
                "gradients from the calls model(x): call that model on each batch of the tracked DataLoader.")
        probe = self._probes()
        sums = [self._pass_sum(p) for p in passes]
        if probe is not None:
            r, q = probe
            if len(active) == len(self.params):
                grad = torch.cat([p.grad.reshape(-1) for p in self.params]).to(q.dtype)
                ref = q @ grad
                cols = None
            else:
                ref = sum(q[:, layout.slots[i].offset : layout.slots[i].offset + layout.slots[i].numel]
                          @ self.params[i].grad.reshape(-1).to(q.dtype) for i in active)
                cols = torch.cat([torch.arange(blocks[i].offset, blocks[i].stop) for i in active]).to(r.device)
            project = (lambda v: r @ v) if cols is None else (lambda v: r[:, cols] @ v[cols])
            measure = (lambda v: v.norm()) if cols is None else (lambda v: v[cols].norm())
        else:
            ref = torch.cat([blocks[i].project_matrix(self.params[i].grad.detach().to(blocks[i].dtype)
                                                       .reshape(blocks[i].rows, blocks[i].cols)) for i in active])
            cols = torch.cat([torch.arange(blocks[i].offset, blocks[i].stop) for i in active]).to(ref.device)
            project = lambda v: v[cols]
            measure = lambda v: v[cols].norm()
        if world_size > 1:
            # DDP: .grad is the mean over ranks of their local gradients; compare the ranks' summed
            # probes (scaled by 1/W) with it, all-reducing 4 probe values and a squared norm
            import torch.distributed as dist

            local = sum(sums) if sums else torch.zeros(self.projector.dim, dtype=ref.dtype, device=ref.device)
            packed = torch.cat([project(local).to(ref.dtype), measure(local).to(ref.dtype).reshape(1) ** 2])
            packed = packed.cpu() if dist.get_backend() == "gloo" else packed
            dist.all_reduce(packed)
            lhs, norm = packed[:-1].to(ref.device) / world_size, packed[-1].sqrt() / world_size
            err = float((lhs - ref).abs().max()) / (float(norm) + 1e-30)
            if err <= rtol:
                return passes, err
            passes, best = [], err
        best = math.inf if world_size == 1 else best
        for start in range(len(passes)):
            part = sum(sums[start:])
            err = float((project(part).to(ref.dtype) - ref).abs().max()) / (float(measure(part)) + 1e-30)
            best = min(best, err)
            if err <= rtol:
                return passes[start:], err
        if not passes and best == math.inf:
            best = 1.0
        names = [blocks[i].name for i in active]
        raise TrackingFailure(
            f"the per-sample gradients hydra_nb captured do not add up to the parameters' .grad "
            f"(relative error {best:.2e}). Something changed .grad outside the model's layers (gradient "
            "clipping, a gradient scaler, an extra loss term on the parameters such as a manual L2 penalty: "
            "use the optimizer's weight_decay instead), or a parameter is used outside the module that owns it. "
            f"Parameters with gradients: {', '.join(names[:8])}{'…' if len(names) > 8 else ''}."
        )


_PAUSED: ContextVar[bool] = ContextVar("hydra_nb_capture_paused", default=False)


@contextmanager
def paused():
    """Forwards inside are hydra_nb's own (a replay query's training-mode forwards of the user's model, say),
    not training: no capture sees them, even while a run of that model is being tracked."""
    token = _PAUSED.set(True)
    try:
        yield
    finally:
        _PAUSED.reset(token)


def _rng_states(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(CPU generator state, the CUDA generator state of the model's device or None), as a forward sees them."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _store_cotangent(call: _DeferredCall, j: int):
    def hook(grad):
        call.cotangents[j] = grad.detach() if call.cotangents[j] is None else call.cotangents[j] + grad.detach()

    return hook
