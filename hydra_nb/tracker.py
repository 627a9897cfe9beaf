"""``hydra_nb.track``: record a training run's HYDRA data without changing the training loop.

Data flows one way: the ``LoaderTap`` names the samples of each batch, the
``GradientCapture`` hooks turn the user's backward into per-sample gradients,
the optimizer's step hooks read the optimizer's trace through its rule
(``hydra_nb.optim``: the rule also says whether the per-sample gradients are held
in full and preconditioned before they are logged) and (exact mode) advance the
hypergradients, and the ``StoreWriter`` appends everything to the Zarr store in
a background thread. Queries read the store (``hydra_nb.open_store``). Nothing here
depends on which optimizer trains the model.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .capture.batchnorm import batchnorm_route, replaying
from .batches import LoaderTap
from .capture import GradientCapture
from .data import default_loss
from .errors import TrackingConfigError, TrackingFailure
from .hypergrad import ExactHypergradients, make_batch_loss
from .optim import rule_for
from .options import STORE_DTYPES, TrackOptions
from .params import ParamLayout
from .projection import Projector
from .replay import ReplayRecorder
from .store import StoreWriter, new_run_meta, prepare_path

_LOG_DTYPES = {name: getattr(np, name) for name in STORE_DTYPES}
_EXACT_MEMORY_LIMIT = 16 << 30
_FULL_ROWS_LIMIT = 8 << 30  # full per-sample gradients of one step, held until the rule preconditions them


class TrackingStoppedWarning(UserWarning):
    """Tracking stopped in the middle of training; training went on."""


def _rtol(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-8, torch.float32: 1e-4}.get(dtype, 5e-2)


class Tracker:
    """The context manager returned by :func:`track`. See there."""

    def __init__(self, model: nn.Module, loader, store, optimizer, mode: str = "fast",
                 projection_dim: int | None = 1024, exact_indices=None, loss_fn: Callable | None = None,
                 checkpoint_every: str | int = "epoch", *, seed: int = 0, store_dtype: str | None = None,
                 overwrite: bool = False, strict: bool = False, hvp_batch: int = 32,
                 hvp_method: str = "auto", on_step: Callable[["Tracker"], None] | None = None, resume: bool = False,
                 batch_fn: Callable | None = None, batchnorm: str = "exact", origin: dict | None = None):
        # every option's value is checked here, once (hydra_nb/options.py)
        self.options = options = TrackOptions(
            mode=mode, projection_dim=projection_dim, exact_indices=exact_indices, loss_fn=loss_fn,
            checkpoint_every=checkpoint_every, seed=seed, store_dtype=store_dtype, overwrite=overwrite, strict=strict,
            hvp_batch=hvp_batch, hvp_method=hvp_method, on_step=on_step, resume=resume, batch_fn=batch_fn,
            batchnorm=batchnorm, origin=origin)
        if not isinstance(model, nn.Module):
            raise TrackingConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        self.wrapper, self.rank, self.world_size = None, 0, 1
        if isinstance(model, nn.parallel.DistributedDataParallel):
            # each rank tracks its own samples into its own log part; rank 0 writes the rest
            self.wrapper, model = model, model.module
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        elif dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise TrackingConfigError(
                "torch.distributed is initialized but the model is not wrapped in DistributedDataParallel: "
                "hydra_nb tracks distributed training through DDP. Pass the DDP-wrapped model.")
        self.rule = rule_for(optimizer)
        self.rule.validate(optimizer, options.mode)
        if not isinstance(store, (str, os.PathLike)):
            raise TrackingConfigError(f"store must be a folder path such as 'runs/a.zarr', got {type(store).__name__}.")
        self.tap = LoaderTap(loader, on_epoch_end=self._on_epoch_end)  # validates the loader
        self.model, self.optimizer, self.mode = model, optimizer, options.mode
        self.projection_dim, self.seed = options.projection_dim, options.seed
        self.strict, self.overwrite, self.resume = options.strict, options.overwrite, options.resume
        self.loss_fn = options.loss_fn or default_loss
        self.custom_loss = options.loss_fn is not None
        self.checkpoint_every = options.checkpoint_every
        self.hvp_batch, self.hvp_method = options.hvp_batch, options.hvp_method
        self.on_step, self.batch_fn = options.on_step, options.batch_fn
        self.path = Path(store)
        self.n_train = self.tap.n_samples
        self.layout, self.params = ParamLayout.from_model(model, optimizer)
        self.param_dtype = self.params[0].dtype
        if any(p.dtype != self.param_dtype for p in self.params):
            raise TrackingConfigError("All tracked parameters must have one dtype (e.g. all float32).")
        compute_dtype = self.param_dtype if self.param_dtype in (torch.float32, torch.float64) else torch.float32
        self.compute_dtype = compute_dtype
        default_log = "float64" if compute_dtype == torch.float64 else "float32"
        self.log_dtype = _LOG_DTYPES[options.store_dtype or default_log]
        if self.world_size > 1 and self.mode in ("exact", "replay"):
            raise TrackingConfigError(f"mode={self.mode!r} does not support distributed training (its Hessian-vector "
                                      "products, or replay, need every rank's batch). Use mode='fast'.")
        if self.world_size > 1 and self.resume:
            raise TrackingConfigError("resume=True does not support distributed training yet: start a new run.")
        if self.rule.full_rows and self.mode != "replay":
            # e.g. Adam's preconditioner D_t is known only at the step: per-sample gradients are held in full until then
            batch = getattr(self.tap.loader, "batch_size", None) or 1
            need = batch * self.layout.size * torch.finfo(compute_dtype).bits // 8
            if need > _FULL_ROWS_LIMIT:
                raise TrackingConfigError(
                    f"{self.rule.name} tracking holds each step's per-sample gradients in full until the step "
                    f"({batch} samples × {self.layout.size} parameters = {need / 2**30:.1f} GiB). Use a smaller "
                    "batch, track fewer parameters (optimizer groups), or train with SGD (projected in the hooks).")

        # BatchNorm in training mode couples a batch's samples: None, or how per-sample gradients are defined
        # (a replay-only recording forms no per-sample gradients: replay differentiates the batch loss itself)
        self.batchnorm = None if self.mode == "replay" else batchnorm_route(model, options.batchnorm, self.world_size)
        if self.mode == "exact":
            tracked = options.tracked_indices(self.n_train)
            need = 2 * len(tracked) * self.layout.size * torch.finfo(compute_dtype).bits // 8
            if need > _EXACT_MEMORY_LIMIT:
                raise TrackingConfigError(
                    f"exact mode would hold {need / 2**30:.1f} GiB of hypergradients ({len(tracked)} samples × "
                    f"{self.layout.size} parameters × 2). Track fewer samples with exact_indices=..., or use mode='fast'.")
            dropouts = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]
            if dropouts:
                raise TrackingConfigError(
                    "exact mode recomputes the batch loss for Hessian-vector products, and dropout makes it random. "
                    "Set the dropout probabilities to 0 for the exact run, or use mode='fast'.")
            self.tracked = tracked
        else:
            self.tracked = None

        self.step = 0
        self.active = False
        self.replaced: str | None = None  # what __enter__ replaced without overwrite (store.prepare_path), if anything
        self.failure: BaseException | None = None
        self.stats = {"steps": 0, "rows": 0, "tracking_seconds": 0.0, "started": None, "bytes_written": 0,
                      "writer_backlog": 0, "writer_wait_seconds": 0.0}
        self._last_checkpoint = -1
        self._own_seconds = 0.0  # in step hooks and checkpoints; hook time is in capture.seconds
        self._pending_step = False
        self._consistent = True
        self._handles: list = []
        self._patched: list = []

    # -- context manager --------------------------------------------------------------------
    def __enter__(self) -> "Tracker":
        device = self.params[0].device
        if self.rank == 0:
            try:
                path, self.replaced = prepare_path(self.path, self.overwrite, self.resume, self.options.origin)
            except TrackingConfigError as exc:
                self._share_outcome(str(exc))
                raise
        else:
            path = self.path
        config = self.options.config(store_dtype=np.dtype(self.log_dtype).name, batchnorm=self.batchnorm,
                                     batch_size=getattr(self.tap.loader, "batch_size", None), device=str(device))
        previous = self._check_resumable(path, config) if self.resume else None
        if previous is not None:
            self.log_projector = previous.projector.to(dtype=self.compute_dtype)
        else:
            self.log_projector = Projector.plan(self.layout, self.projection_dim, self.seed, self.compute_dtype)
        if self.mode == "exact" or self.rule.full_rows:
            # full-dimensional capture: exact mode needs the full rows; Adam's rule scales them by D_t before projecting
            capture_projector = Projector.plan(self.layout, None, self.seed, self.compute_dtype).to(device)
        else:
            capture_projector = self.log_projector.to(device)
        if self.mode == "exact":
            self.exact = ExactHypergradients(self.model, self.params, self.layout, self.tracked, self.n_train,
                                             self.loss_fn, self.hvp_batch, self.hvp_method, rule=self.rule)
        else:
            self.exact = None
        self._device_log_projector = self.log_projector.to(device)
        self._buffers = [(n, b) for n, b in self.model.named_buffers() if b.is_floating_point()]
        buffers_meta, offset = [], 0
        for n, b in self._buffers:
            buffers_meta.append({"name": n, "shape": list(b.shape), "offset": offset})
            offset += b.numel()
        # what replaying the run will need (docs/replay.md): every single-process run records it
        self.recorder = ReplayRecorder(self.loss_fn, self.batch_fn, _rtol(self.compute_dtype), self.compute_dtype) \
            if self.world_size == 1 else None
        if previous is not None:
            self.writer = StoreWriter.reopen(path)
            self.step = self._last_checkpoint = previous.steps
            self.recorder.resume(previous.meta.get("replay"), "replay" in previous.group)
            if self.exact is not None:
                last = previous._n_checkpoints - 1
                self.exact.h.copy_(torch.from_numpy(np.asarray(previous.group["exact/h"][last])))
                self.exact.b.copy_(torch.from_numpy(np.asarray(previous.group["exact/b"][last])))
                self.exact.seen |= (self.exact.h != 0).any(1) | (self.exact.b != 0).any(1)
        else:
            meta = new_run_meta(self.mode, self.n_train, self.layout, self.log_projector.to_json(), config,
                                buffers_meta, self.rule.name, self.options.origin)
            if self.rank == 0:
                meta["world_size"] = self.world_size
                try:
                    replay = None if self.recorder is None else {"meta": self.recorder.meta(),
                                                                 "state_fields": self.rule.state_fields}
                    self.writer = StoreWriter.create(path, meta, self.layout, self.log_projector.arrays(),
                                                     self.log_projector.dim, self.log_dtype,
                                                     np.dtype(str(self.compute_dtype).replace("torch.", "")), offset,
                                                     self.tracked, world_size=self.world_size, replay=replay)
                except BaseException as exc:
                    self._share_outcome(f"rank 0 could not create the store: {exc!r}")
                    raise
                self._share_outcome(None)
            else:
                problem = self._share_outcome(None)  # rank 0 creates the store first
                if problem is not None:
                    raise TrackingConfigError(problem)
                self.writer = StoreWriter.attach_rank(path, self.rank)
        self.capture = GradientCapture(self.model, self.params, capture_projector, self.tap,
                                       keep_root_calls=self.mode == "exact" or self.recorder is not None,
                                       batchnorm=self.batchnorm, per_sample=self.mode != "replay")
        if previous is None:
            self._checkpoint()
        try:
            self.tap.attach()
            self.capture.attach()
            self._handles.append(self.optimizer.register_step_pre_hook(self._before_step))
            self._handles.append(self.optimizer.register_step_post_hook(self._after_step))
            self._patch_zero_grad(self.optimizer)
            self._patch_zero_grad(self.model)
            if self.wrapper is not None:
                self._patch_zero_grad(self.wrapper)
        except BaseException:
            self._detach()
            self.writer.close("failed", "could not attach hooks")
            raise
        self._n_groups = len(self.optimizer.param_groups)
        self._first_step = self._last_checked = self.step
        self.active = True
        self.stats["started"] = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None:
            self._stop("complete", "")
        elif self.active:
            self._stop("interrupted", f"{exc_type.__name__} in the training loop at step {self.step}")
        return False

    def _share_outcome(self, problem: str | None) -> str | None:
        """Distributed runs: rank 0 tells every rank whether the store is ready (or why not)."""
        if self.world_size == 1:
            return problem
        box = [problem]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _check_resumable(self, path, config: dict):
        """The interrupted run at ``path``, if this tracker can continue it; else a clear error."""
        from .store import StoreReader

        previous = StoreReader(path)
        current = {"optimizer": self.rule.name, "mode": self.mode, "n_train": self.n_train,
                   "params": self.layout.to_json(), "config": config}
        self.options.check_resume(str(path), previous.meta, current,
                                  previous.tracked_indices if self.mode == "exact" else None, self.tracked)
        stored = torch.from_numpy(previous.params_at(-1))
        live = self.layout.flatten([p.detach().cpu().to(stored.dtype) for p in self.params])
        if not torch.equal(stored, live):
            raise TrackingConfigError(
                f"Cannot resume {str(path)!r}: the model's parameters are not those of the run's last checkpoint "
                f"(step {previous.steps}). Load them first with hydra_nb.open_store(path).load_params(model) "
                "(and restore your optimizer's state), then resume.")
        return previous

    @property
    def store(self):
        """The run's store, opened for queries (with this run's ``loss_fn``)."""
        from .query import Store

        return Store(self.path, loss_fn=self.loss_fn if self.custom_loss else None)

    # -- hooks ------------------------------------------------------------------------------
    def _patch_zero_grad(self, obj) -> None:
        had = "zero_grad" in vars(obj)
        original = obj.zero_grad

        def zero_grad(*args, **kwargs):
            if self.active:
                self.capture.drop()
            return original(*args, **kwargs)

        object.__setattr__(obj, "zero_grad", zero_grad)
        self._patched.append((obj, had, original))

    def _detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for obj, had, original in self._patched:
            if had:
                object.__setattr__(obj, "zero_grad", original)
            else:
                vars(obj).pop("zero_grad", None)
        self._patched.clear()
        self.capture.detach()
        self.tap.detach()
        self.tap.on_epoch_end = None  # break tracker ↔ tap: the loader (and its workers) can then be freed

    _CHECK_FIRST = 3  # steps checked after entering track()
    _CHECK_EVERY = {"cpu": 16}  # then every n-th step; elsewhere every 100th (a check waits for the device)

    def _should_check(self, passes) -> bool:
        """Whether this step verifies that the captured per-sample gradients add up to ``.grad``.

        The first steps, then every n-th (16 on the CPU, 100 on a GPU); and any step whose ``.grad`` was
        changed after the backward that filled it (clipping, a loss scaler, an assignment) or filled by several
        backwards (accumulation, or gradients zeroed by hand in between: the check tells which passes make
        up ``.grad``), as ``capture.grads_changed`` sees it. A change that enters ``.grad`` through autograd (a
        loss term on the parameters, a parameter hook, a parameter used outside its module) is caught at the
        first checked step it is present in: from the start, at the first step, before anything is recorded;
        if it starts later, up to n − 1 steps late (those steps are in the store; tracking then stops and
        says so). Never in replay mode (no per-sample rows to check: replay's arrival check covers the run).
        """
        changed = self.capture.grads_changed()  # read every step: it also clears the notes
        if self.mode == "replay":
            return False
        if self.world_size > 1:  # a collective: only where every rank certainly is (a rank may stop later)
            return self.step == self._first_step
        n = self.step - self._first_step
        every = self._CHECK_EVERY.get(self.params[0].device.type, 100)
        return changed or len(passes) > 1 or n < self._CHECK_FIRST or n % every == 0

    def _before_step(self, optimizer, args, kwargs) -> None:
        if not self.active:
            return
        start = time.perf_counter()
        exact_touched = False
        try:
            if len(args) > 1 and args[1] is not None or kwargs.get("closure") is not None:
                raise TrackingConfigError(
                    "optimizer.step(closure) is not supported while tracking: call loss.backward() in your loop "
                    "and then optimizer.step() without a closure.")
            if self.writer.error is not None:
                raise TrackingFailure(f"writing the store failed: {self.writer.error!r}")
            if len(optimizer.param_groups) != self._n_groups:
                raise TrackingFailure("the optimizer's parameter groups changed during training.")
            if self.tap.failure is not None:
                failure, self.tap.failure = self.tap.failure, None
                raise failure
            if self.capture.failure is not None:
                failure, self.capture.failure = self.capture.failure, None
                raise failure
            passes = self.capture.take()
            if self._should_check(passes):
                try:
                    passes, _ = self.capture.check(passes, _rtol(self.compute_dtype), self.world_size)
                except TrackingFailure as exc:
                    if self.step == 0:  # from the first step on: the loop itself does something untrackable
                        raise TrackingConfigError(str(exc)) from None
                    if self.step - self._last_checked > 1:
                        raise TrackingFailure(
                            f"{exc} Steps {self._last_checked + 1}–{self.step - 1} were recorded without this "
                            "check (it runs at sampled steps); if the change began there, so did wrong rows.") from None
                    raise
                self._last_checked = self.step
            trace_row = self.rule.read_step(optimizer, self.params, self.layout)
            calls = self._record_calls(passes)
            if passes:
                samples = torch.cat([p.indices for p in passes])
                rows = torch.cat([p.buf for p in passes]) if self.mode != "replay" else None  # replay: no rows
                if rows is not None and self.world_size > 1:  # DDP averages the ranks' gradients: each sample enters .grad over W
                    rows = rows / self.world_size
            else:
                samples = torch.zeros(0, dtype=torch.int64)
                rows = None
            if rows is not None and self.rule.full_rows:
                rows = self.rule.precondition(optimizer, self.params, self.layout, rows)
                rows = self._device_log_projector.project_flat(rows)
            if self.exact is not None:
                self.capture.suspended = True
                batch_loss = make_batch_loss(self.model, passes, self.loss_fn, _rtol(self.compute_dtype),
                                             self.batch_fn, replay=_batch_statistics if self.batchnorm else None)
                exact_touched = True
                if rows is not None:
                    self.exact.step(trace_row, samples, rows, batch_loss)
                    keep = (self.exact.slot_of[samples.to(self.exact.slot_of.device)] >= 0).cpu()
                    samples, rows = samples[keep], self._device_log_projector.project_flat(rows[keep.to(rows.device)])
                else:
                    self.exact.step(trace_row, samples, torch.zeros(0, self.layout.size), batch_loss)
            self.writer.put_step(trace_row, samples, None if rows is None else rows.to(_torch_dtype(self.log_dtype)),
                                 calls)
            self.stats["rows"] += len(samples) if rows is not None else 0
            self._pending_step = True
        except Exception as exc:
            # nothing of this step reached the store; exact h may have moved past it
            self._consistent = not exact_touched
            self._fail(exc)
        finally:
            self.capture.suspended = False
            self._own_seconds += time.perf_counter() - start

    def _record_calls(self, passes) -> list | None:
        """This step's backward calls for replay (None: not recorded); tells the store when that changes."""
        if self.recorder is None:
            return None
        before = (self.recorder.supported, self.recorder.fingerprint is not None)
        calls = self.recorder.step(passes)
        if (self.recorder.supported, self.recorder.fingerprint is not None) != before:
            self.writer.put_replay_meta(self.recorder.meta())
        return calls

    def _after_step(self, optimizer, args, kwargs) -> None:
        if not self.active or not self._pending_step:
            return
        self._pending_step = False
        self.step += 1
        self.stats["steps"] = self.step
        self.stats["tracking_seconds"] = self._own_seconds + self.capture.seconds
        self.stats["bytes_written"] = self.writer.bytes_written
        self.stats["writer_backlog"] = self.writer.backlog
        self.stats["writer_wait_seconds"] = self.writer.wait_seconds
        if isinstance(self.checkpoint_every, (int, np.integer)) and self.step % self.checkpoint_every == 0:
            self._checkpoint()
        if self.on_step is not None:
            try:
                self.on_step(self)
            except Exception as exc:  # a broken progress display must not stop training
                warnings.warn(f"hydra_nb: on_step callback failed: {exc!r}", RuntimeWarning, stacklevel=2)
                self.on_step = None

    def _on_epoch_end(self) -> None:
        if self.active and self.checkpoint_every == "epoch" and self.step > self._last_checkpoint:
            try:
                self._checkpoint()
            except Exception as exc:  # never into the user's loop unless strict
                self._fail(exc)

    def _checkpoint(self) -> None:
        start = time.perf_counter()
        if self.rank > 0:  # rank 0 stores the parameters; this rank commits its log part up to here
            self.writer.put_commit(self.step)
            self._last_checkpoint = self.step
            return
        params = self.layout.flatten([p.detach().to(self.compute_dtype) for p in self.params])
        buffers = torch.cat([b.detach().reshape(-1).to(torch.float64) for _, b in self._buffers]) if self._buffers else None
        h = self.exact.h if self.exact is not None else None
        b = self.exact.b if self.exact is not None else None
        self.writer.put_checkpoint(self.step, params, buffers, h, b, state=self._optimizer_state())
        self._last_checkpoint = self.step
        self._own_seconds += time.perf_counter() - start

    def _optimizer_state(self) -> dict | None:
        """The optimizer's state now, flat per field (zeros where torch has none) with a present-per-parameter mask."""
        if self.recorder is None:
            return None
        state = self.rule.read_state(self.optimizer, self.params)
        out = {}
        for f in self.rule.state_fields:
            values = state.get(f, [None] * len(self.params))
            flat = self.layout.flatten([torch.zeros_like(p, dtype=self.compute_dtype) if v is None
                                        else v.detach().to(self.compute_dtype) for p, v in zip(self.params, values)])
            out[f] = (flat, np.asarray([v is not None for v in values], dtype=bool))
        return out

    # -- failures ---------------------------------------------------------------------------
    def _fail(self, exc: Exception) -> None:
        if isinstance(exc, TrackingConfigError) and self.step == 0:
            self._stop("failed", str(exc))
            raise exc
        self.failure = exc
        if self.strict:
            self._stop("stopped", f"tracking failed at step {self.step}: {exc}")
            raise TrackingFailure(f"hydra_nb tracking failed at step {self.step}: {exc}") from exc
        self._stop("stopped", f"tracking failed at step {self.step}: {exc}")
        warnings.warn(
            f"hydra_nb stopped tracking at step {self.step}: {exc}\nTraining goes on untracked. The store "
            f"{str(self.path)!r} keeps steps 0..{self.step} and answers queries for training stopped there. "
            "Pass strict=True to make this an error.", TrackingStoppedWarning, stacklevel=4)

    def _stop(self, status: str, detail: str) -> None:
        if not self.active and status != "failed":
            return
        was_active = self.active
        self.active = False
        self._detach()
        if self._consistent and not self._pending_step and self.step > self._last_checkpoint and \
                self.writer.error is None:
            self._checkpoint()
        elif self._pending_step or not self._consistent:
            detail = (detail + "; " if detail else "") + f"the last checkpoint is at step {self._last_checkpoint}"
        if was_active or status == "failed":
            self.writer.close(status, detail)
        self.stats["steps"] = self.step
        self.stats["tracking_seconds"] = self._own_seconds + self.capture.seconds
        self.stats["bytes_written"] = self.writer.bytes_written
        if self.writer.error is not None and self.failure is None:
            # the writer failed after the last step looked at it: say so now
            self.failure = self.writer.error
            message = (f"hydra_nb could not write the store {str(self.path)!r}: {self.writer.error!r}. "
                       "It keeps what was committed before the failure.")
            if self.strict and status != "interrupted":
                raise TrackingFailure(message) from self.writer.error
            warnings.warn(message, TrackingStoppedWarning, stacklevel=3)


def _batch_statistics(call):
    """Exact mode's batch loss with BatchNorm in training mode: batch statistics as functions of θ, running
    statistics untouched."""
    return replaying(call.bn_records, coupled=True)


def _torch_dtype(np_dtype) -> torch.dtype:
    return {np.float16: torch.float16, np.float32: torch.float32, np.float64: torch.float64}[np_dtype]


def track(model: nn.Module, loader, store, optimizer, mode: str = "fast", projection_dim: int | None = 1024,
          exact_indices=None, loss_fn: Callable | None = None, checkpoint_every: str | int = "epoch",
          **options) -> Tracker:
    """Track HYDRA hypergradients of every training sample while the user's own loop trains ``model``.

    Use as a context manager around an unchanged training loop that iterates ``loader`` and calls
    ``optimizer.step()`` (``torch.optim.SGD``, or ``torch.optim.Adam``/``AdamW`` in fast mode: an
    approximation, see ``docs/optimizers.md``)::

        with hydra_nb.track(model, loader, store="runs/a.zarr", optimizer=opt):
            for epoch in range(3):
                for x, y in loader:
                    opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()

    The store then answers ``contributions[j, i] = −∂L(z_j; θ_T)/∂w_i``: the derivative of test sample
    z_j's loss at the final parameters with respect to the weight (1 + w_i) of training sample i's term
    in every batch loss, at w = 0. Positive means sample i lowered z_j's loss.

    Every option is a field of :class:`hydra_nb.options.TrackOptions` (its default, help text and check);
    a value it refuses raises a ``TrackingConfigError`` saying what to pass instead.

    Args:
        mode: ``"fast"`` (all samples, Hessian terms dropped) or ``"exact"`` (Hessian-vector products
            kept, for ``exact_indices``; also records the fast estimate of the same samples).
        projection_dim: total size of the seeded random projection (a per-layer tensor sketch);
            None = full dimension.
        exact_indices: exact mode only: dataset indices to track (None = all).
        loss_fn: ``(outputs, targets) -> per-sample losses``; used for test losses and exact-mode HVPs.
            Default: cross-entropy.
        checkpoint_every: ``"epoch"`` or a number of optimizer steps between parameter checkpoints.
        seed: projection seed. store_dtype: ``"float16"``, ``"float32"`` or ``"float64"`` for the
            per-sample rows (default: float32, float64 for float64 models). overwrite: replace an
            existing run at ``store``. strict: raise instead of warning if tracking fails mid-training.
            resume: continue the run already at ``store`` (interrupted, or complete and trained further):
            same model, dataset and options, with the model's parameters at the run's last checkpoint
            (``open_store(store).load_params(model)``); steps continue from there.
            batchnorm: how per-sample gradients are defined with BatchNorm layers in training mode (which couple
            a batch's samples through its statistics): ``"exact"`` (default) the derivative of the batch gradient
            with respect to the sample's weight, statistics included (about one backward pass of the batch per
            sample); ``"fixed"`` the gradient of the sample's loss term with the batch statistics held constant,
            the standard approximation, cheaper at large batches but measured far from the true derivative
            (docs/batchnorm.md).
            Ignored when no BatchNorm layer is in training mode at entry.
            hvp_batch, hvp_method: exact mode, how Hessian-vector products are computed: ``"vmap"``
                (forward-over-reverse, vmapped over chunks of ``hvp_batch`` vectors), ``"loop"`` (one
                double-backward per vector) or ``"auto"`` (default: both timed once two full chunks of
                hypergradients need advancing, the faster kept; ``tracker.exact.hvp_method`` says which). Same numbers either way.
            batch_fn: exact mode, for loader batches that are neither (inputs, targets, …) tuples nor dicts
            with a ``labels``/``targets`` entry: ``batch -> (inputs, targets)``.
            origin: where the run comes from, kept in the store (``%%hydra_track`` passes its notebook cell);
            a run whose origin is the same cell is replaced without ``overwrite`` (``store.same_cell``), as is
            a run that failed before its first step (it holds nothing).
            on_step: called with the Tracker after every tracked optimizer step (progress displays);
            ``tracker.stats`` holds steps, rows, tracking_seconds (time inside hydra_nb's hooks),
            bytes_written (per-sample data and checkpoints handed to the store, before compression),
            writer_backlog (steps queued for the writer), writer_wait_seconds (time training waited because
            the writer's queue was full: the disk or compression was the bottleneck).
    """
    return Tracker(model, loader, store, optimizer, mode, projection_dim, exact_indices, loss_fn, checkpoint_every,
                   **options)
