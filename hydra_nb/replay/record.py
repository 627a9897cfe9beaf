"""What replay needs, recorded while tracking: the tracker's side of reverse-mode replay.

For every backward call of every optimizer step:

- the dataset index of each row of its batch (from the loader tap; repeats allowed),
- the weight c_b the loop's loss gave each row, ∂(the loop's loss)/∂ℓ_b (1/|B| for a mean, 1 for a
  sum; gradient accumulation's scaling included), read off the model's output gradient exactly as
  forward exact mode reads it (``hypergrad.loss_weights``),
- the random-number state its forward started from, when the forward drew random numbers (dropout).

With the optimizer trace (every hyperparameter of every step) and the checkpoints' parameters and
optimizer state, that describes the run completely: replay = these batches, this loss, this update.

A run that replay cannot reproduce is recorded as such, with the reason (``problem``), and tracking
goes on — fast mode needs none of this. Found while tracking:

- the loss is not a per-sample weighted sum of ``loss_fn`` (a regulariser on the outputs, an auxiliary
  head, another loss than the one given): no c_b exists;
- the model was called on something other than the batch's inputs (the loop reshaped or transformed
  x before ``model(x)``), so replay, which calls the model on ``train_data``'s items, would differ;
- a batch's targets cannot be found (a dict batch without a labels/targets entry and no ``batch_fn``).

The first backward call's samples and a checksum of their inputs and targets are kept as a
fingerprint: a query checks ``train_data`` against it before replaying anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..data import ModelInputs
from ..errors import TrackingConfigError
from ..hypergrad import batch_targets, loss_weights
from ..store import to_host

CHECKED_STEPS = 3  # steps whose model calls are compared with what replay would build from the batch
CHECK_EVERY = 16  # after those, the loss's decomposition into Σ c_b·loss_fn is checked at every 16th step
_FINGERPRINT_ROWS = 8


@dataclass
class RecordedCall:
    """One backward call as replay will redo it."""

    samples: np.ndarray  # (B,) int64 dataset indices
    weights: object  # (B,) float64 c_b: an array, or store.to_host's (host tensor, CUDA event) while it copies
    rng: torch.Tensor | None = None  # CPU generator state before the forward (uint8), if it drew random numbers
    cuda_rng: torch.Tensor | None = None  # the model device's CUDA generator state, likewise


def split_batch(batch, batch_fn=None):
    """(model inputs, targets) of a loader batch, as replay calls the model: ``model(inputs)`` for a tensor,
    ``model(*inputs)`` for a tuple of tensors, ``model(**inputs)`` for a dict.

    A tuple/list batch is (inputs, targets, …); a dict batch gives its targets under labels/targets/y and
    the other entries as keyword inputs; ``batch_fn(batch) -> (inputs, targets)`` overrides both.
    """
    if batch_fn is not None:
        inputs, targets = batch_fn(batch)
    elif isinstance(batch, dict):
        targets = batch_targets(batch)
        inputs = {k: v for k, v in batch.items() if v is not targets}
    else:
        targets = batch_targets(batch)
        inputs = batch[0]
    return inputs, targets


def model_call(inputs, device: torch.device, dtype: torch.dtype) -> tuple[tuple, dict]:
    """(args, kwargs) of the model call replay makes: floating-point tensors in the run's dtype, on its device."""
    mi = ModelInputs(inputs).map(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None))
    return mi.rebuild(mi.leaves())


def _same_call(expected: tuple[tuple, dict], call) -> bool:
    args, kwargs = expected
    if len(args) != len(call.args) or set(kwargs) != set(call.kwargs):
        return False
    pairs = list(zip(args, call.args)) + [(kwargs[k], call.kwargs[k]) for k in kwargs]
    for mine, theirs in pairs:
        if not (torch.is_tensor(mine) and torch.is_tensor(theirs)):
            if mine is not theirs and mine != theirs:
                return False
            continue
        if mine.shape != theirs.shape or not torch.equal(mine.to(theirs.device, theirs.dtype), theirs):
            return False
    return True


def checksum(inputs, targets) -> list[float]:
    """Sum and sum of squares (float64) of every input tensor and of the targets: the fingerprint's values."""
    out = []
    for t in ModelInputs(inputs).leaves() + [torch.as_tensor(targets)]:
        v = t.detach().to("cpu", torch.float64)
        out += [float(v.sum()), float((v * v).sum())]
    return out


class ReplayRecorder:
    """Builds each step's :class:`RecordedCall` list from the captured passes, or records why the run
    cannot be replayed (``problem``; from then on it records nothing)."""

    def __init__(self, loss_fn, batch_fn, rtol: float, dtype: torch.dtype):
        self.loss_fn, self.batch_fn, self.rtol, self.dtype = loss_fn, batch_fn, rtol, dtype
        self.problem: str | None = None
        self.fingerprint: dict | None = None
        self.steps_checked = 0

    def resume(self, stored: dict | None, has_record: bool) -> None:
        """Continue the record of a resumed run: its fingerprint, or why it does not replay."""
        if stored is None or not has_record:
            self.problem = ("it was resumed from a store recorded before hydra_nb recorded what replay needs, so its "
                            "first steps have no record")
            return
        self.fingerprint = stored.get("fingerprint")
        if not stored.get("supported", False):
            self.problem = stored.get("reason") or "tracking found it could not be replayed"

    @property
    def supported(self) -> bool:
        return self.problem is None

    def meta(self) -> dict:
        """What the store's attributes say about replay (``attrs["hydra_nb"]["replay"]``)."""
        return {"version": 1, "supported": self.problem is None, "reason": self.problem,
                "fingerprint": self.fingerprint}

    def step(self, passes) -> list[RecordedCall] | None:
        """The step's backward calls, in order; None once the run is known not to replay."""
        if self.problem is not None:
            return None
        calls = []
        try:
            for p in passes:
                calls += self._calls_of(p)
        except _NotReplayable as exc:
            self.problem = str(exc)
            return None
        except Exception as exc:  # anything else replay could not follow: say so, never stop training
            self.problem = f"recording what replay needs failed ({type(exc).__name__}: {exc})"
            return None
        if passes and not calls:
            self.problem = ("the parameters' gradients did not come from calls of the tracked model on the "
                            "loader's batches")
            return None
        self.steps_checked += 1
        return calls

    def _calls_of(self, p) -> list[RecordedCall]:
        try:
            inputs, targets = split_batch(p.batch, self.batch_fn)
        except TrackingConfigError:
            raise _NotReplayable(
                "the targets of each batch could not be found (replay needs them to recompute the loss): the loader "
                "must yield (inputs, targets, …) or dicts with a 'labels'/'targets' entry, or pass "
                "batch_fn=lambda batch: (inputs, targets) to track") from None
        out = []
        for call in p.root_calls:
            if call.output_grad is None:
                continue
            if self.steps_checked < CHECKED_STEPS:
                self._check_call(inputs, call)
            y = targets.to(call.output.device) if torch.is_tensor(targets) else targets
            # that the loop's loss is Σ c_b·loss_fn: checked on the first steps, then every CHECK_EVERY-th (the check
            # reads a number off the device); a loss whose scaling changes between checks does not replay, which a
            # query's arrival check at the next checkpoint refuses
            check = self.steps_checked < CHECKED_STEPS or self.steps_checked % CHECK_EVERY == 0
            try:
                c = loss_weights(call.output, call.output_grad, y, self.loss_fn, self.rtol, check=check)
            except TrackingConfigError as exc:
                raise _NotReplayable(
                    "the loss the loop backpropagates is not a per-sample weighted sum of loss_fn, which replay "
                    f"recomputes ({exc}). Pass loss_fn=... giving your loss per sample (reduction='none'), and keep "
                    "terms on the parameters in the optimizer's weight_decay") from None
            samples = p.indices.numpy().astype(np.int64, copy=True)
            if self.fingerprint is None:
                self.fingerprint = {"samples": samples[:_FINGERPRINT_ROWS].tolist(),
                                    "checksum": checksum(ModelInputs(inputs)[:_FINGERPRINT_ROWS].value,
                                                         targets[:_FINGERPRINT_ROWS])}
            # copied to the host without waiting; the store's writer thread reads it
            out.append(RecordedCall(samples, to_host(c.detach().to(torch.float64), copy=False),
                                    getattr(call, "rng", None), getattr(call, "cuda_rng", None)))
        return out

    def _check_call(self, inputs, call) -> None:
        device = call.output.device
        if not _same_call(model_call(inputs, device, self.dtype), call):
            raise _NotReplayable(
                "the model was called on something other than the batch's inputs (the loop transformed or "
                "reshaped them before model(...)), and replay calls the model on the training data's items as "
                "the loader yields them. Move that transformation into the model or the dataset to make the run "
                "replayable.")


class _NotReplayable(Exception):
    """Why this run cannot be replayed (becomes ``ReplayRecorder.problem``)."""
