"""Fast-mode rows for a run recorded for replay only (``Store.add_rows``).

A ``track(..., mode="replay")`` store holds what replaying the run needs (each backward call's samples,
loss weights c_b and random-number states, the optimizer trace, the checkpoints with the optimizer's
state) and no per-sample rows. This module replays that run **through the tracking pipeline itself**:
``hydra_nb.track(mode="fast")`` wraps a loop that redoes the recorded run —

- a DataLoader whose batch sampler yields each recorded backward call's dataset indices, one
  "epoch" per checkpoint interval (so the new store checkpoints at the recorded steps);
- per call: the recorded random-number state restored, the model called on ``train_data``'s batch
  as replay calls it, and ``loss = Σ_b c_b·loss_fn(out, y)_b`` backpropagated;
- per step: every parameter group's hyperparameters set from the trace (a scheduler's effect included),
  ``.grad`` dropped where the trace says the parameter had none, then ``optimizer.step()`` on a
  ``torch.optim`` optimizer the run's rule rebuilds (``OptimizerRule.make_optimizer``);
- per checkpoint interval [S_c, S_{c+1}): started from checkpoint c's parameters, buffers and optimizer
  state, and on arrival checked against checkpoint c+1's parameters with replay's tolerance
  (‖θ_replayed − θ_stored‖/‖θ_stored‖, ``hydra_nb.replay.DEFAULT_TOLERANCE`` or ``replay_tolerance``;
  otherwise ``ReplayError``), then set to the stored values before the tracker checkpoints them.

So capture, projection, Adam's preconditioning, the writer and tracking's own checks are the code that
fast-mode tracking runs: a row is sample i's gradient as it entered ``.grad`` at step t,
u = c_b·∇θ ℓ(f(x_i; θ_t), y_i) (Adam/AdamW: D_t ⊙ u), projected with the tensor sketch of
(``projection_dim``, ``seed``) — what ``track(mode="fast")`` with those options logged in the original
run, up to the rounding of the replayed θ_t. The new store holds the whole run again (log, trace,
checkpoints equal to the original's, a fresh replay record) and answers every mode. It is written into
a temporary folder beside its path and renamed into place only when complete and verified; the
original store is only read.
"""

from __future__ import annotations

import copy
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch
import zarr
from torch import nn
from torch.utils.data import DataLoader

from ..errors import ReplayError, StoreOccupied, TrackingConfigError
from ..store import StoreReader, lock_holder, read_meta
from .record import model_call, split_batch
from .recording import StoreRecording, TrainingData, replay_problem
from .walk import DEFAULT_TOLERANCE, check_arrival


def default_path(reader: StoreReader) -> Path:
    """``<folder>/<name>-rows.zarr`` beside the store (``runs/a.zarr`` → ``runs/a-rows.zarr``)."""
    if not reader.is_local:
        raise ValueError(f"The store {reader.where!r} is not a local folder: pass path=... (a local folder) for the "
                         "store with rows.")
    p = Path(reader.path)
    stem = p.name[:-len(".zarr")] if p.name.endswith(".zarr") else p.name
    return p.with_name(f"{stem}-rows.zarr")


def refusal(reader: StoreReader) -> str | None:
    """Why rows cannot be added to the run in ``reader`` (saying what to do), or None if they can."""
    if reader.mode in ("fast", "exact"):
        return (f"The run in {reader.where!r} was tracked with mode={reader.mode!r}: it already has its per-sample "
                "rows, so there is nothing to add. Query it directly (mode='fast', self_influence, class_matrix).")
    if int(reader.meta.get("world_size", 1)) > 1:
        return (f"The run in {reader.where!r} is a distributed (DDP) run, which replay does not reproduce: rows cannot "
                "be added to it. Track it with mode='fast' instead.")
    problem = replay_problem(reader)
    if problem is not None:
        return (f"Rows cannot be added to the run in {reader.where!r}: it does not replay ({problem}). Adding rows "
                "replays the run; track it again with mode='fast' to get them.")
    if reader.is_local and reader.writer is not None:
        return (f"The run in {reader.where!r} is still being written: add rows once it has ended (its last "
                "checkpoint is where the rows would stop).")
    return None


def add_rows(reader: StoreReader, model: nn.Module, train_data, projection_dim: int | None = 1024, *,
             loss_fn, custom_loss: bool, path=None, seed: int | None = None, progress=None,
             tolerance: float | None = None, overwrite: bool = False) -> Path:
    """Write a fast-mode store of the run in ``reader`` (a ``mode="replay"`` recording) at ``path``; return it.

    ``model``: the architecture (copied; the user's model and its random state are left alone).
    ``train_data``: the training set as the tracked loader's dataset indexes it (checked against the
    run's fingerprint before anything is written). ``loss_fn``: per-sample loss (the run's);
    ``custom_loss``: whether the run was tracked with one (the new store says so too).
    ``projection_dim``, ``seed`` as for ``track`` (seed None: the one the run was tracked with).
    ``progress``: a ``Progress`` (one unit per replayed step) or None. ``tolerance``: the relative drift
    allowed at each checkpoint (None: replay's default for the run's dtype). Refusals: ``refusal``;
    an existing ``path`` without ``overwrite`` (``StoreOccupied``).
    """
    if (why := refusal(reader)) is not None:
        raise ReplayError(why)
    target = Path(path) if path is not None else default_path(reader)
    _check_target(reader, target, overwrite)
    if (why := reader.layout.matches(model)) is not None:
        raise ValueError(f"The model does not match the store's parameters: {why}. Pass the tracked architecture.")
    rule = reader.optimizer_rule
    missing = [f for f in rule.trace_fields if f not in reader.trace_fields]
    if missing:
        raise ReplayError(f"The store at {reader.where!r} lacks the trace fields {', '.join(missing)} that replaying "
                          f"its {rule.name} steps needs (written by an older hydra_nb): track the run again.")
    work = copy.deepcopy(model)
    params = [dict(work.named_parameters())[s.name] for s in reader.layout.slots]
    device = params[0].device if params else torch.device("cpu")
    dtype = torch.float64 if np.dtype(reader.group["checkpoints/params"].dtype) == np.float64 else torch.float32
    data = TrainingData(train_data, reader.n_train, device=device, dtype=dtype)
    data.check(reader.meta.get("replay", {}).get("fingerprint"))
    recording = StoreRecording(reader, work)
    steps = np.asarray(reader.checkpoint_steps)
    first_row = recording.trace_rows(0, 1)[0] if reader.steps > 0 else rule.empty_row(len(params))
    groups = [[] for _ in range(1 + max((s.group for s in reader.layout.slots), default=0))]
    for p, s in zip(params, reader.layout.slots):
        groups[s.group].append(p)
    optimizer = rule.make_optimizer(groups, first_row, reader.layout)
    try:
        rule.validate(optimizer, "fast")
    except TrackingConfigError as exc:
        raise TrackingConfigError(f"Rows cannot be added to the run in {reader.where!r}: {exc}") from None
    config = reader.meta.get("config", {})
    seed = int(config.get("seed", 0)) if seed is None else int(seed)
    tolerance = DEFAULT_TOLERANCE.get(dtype, 1e-3) if tolerance is None else float(tolerance)
    if progress is not None:
        progress.plan(int(steps[-1]))

    temp = target.with_name(f".{target.name}.add_rows-{uuid.uuid4().hex[:8]}")
    try:
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            work.train()
            _retrack(reader, recording, work, params, optimizer, data, temp, projection_dim, seed, loss_fn,
                     custom_loss, tolerance, progress)
        _finish(reader, temp, target)
        if target.exists():  # overwrite=True, checked above
            shutil.rmtree(target)
        os.replace(temp, target)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return target


def _check_target(reader: StoreReader, target: Path, overwrite: bool) -> None:
    if reader.is_local and target.resolve() == Path(reader.path).resolve():
        raise ValueError("path is the store itself: add_rows never writes into the store it reads. Pass another path.")
    if not target.exists():
        return
    if target.is_file() or (read_meta(target) is None and any(target.iterdir())):
        raise TrackingConfigError(f"{str(target)!r} exists and is not a hydra_nb store; add_rows will not write into "
                                  "or delete it. Pass another path=....")
    if not overwrite:
        raise StoreOccupied(f"{str(target)!r} already exists. Pass overwrite=True to replace it, or path=... to write "
                            "the store with rows elsewhere.")
    if lock_holder(target) is not None:
        raise TrackingConfigError(f"{str(target)!r} is being written by a hydra_nb run right now; it cannot be replaced.")


class _Indices(torch.utils.data.Dataset):
    """Dataset index i → i: the loader's collate turns a batch of indices into ``train_data``'s batch."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        return int(i)


class _RecordedBatches:
    """The batch sampler: the dataset indices of each recorded backward call of the current interval."""

    def __init__(self):
        self.batches: list[list[int]] = []

    def __iter__(self):
        return iter(list(self.batches))

    def __len__(self) -> int:
        return len(self.batches)


def _retrack(reader, recording, model, params, optimizer, data, temp: Path, projection_dim, seed, loss_fn,
             custom_loss, tolerance, progress) -> None:
    """The recorded run again, under ``track(mode="fast")`` into ``temp`` (the module docstring's loop)."""
    from ..tracker import track

    rule, layout = reader.optimizer_rule, reader.layout
    steps = [int(s) for s in reader.checkpoint_steps]
    sampler = _RecordedBatches()
    loader = DataLoader(_Indices(reader.n_train), batch_sampler=sampler,
                        collate_fn=lambda items: data.batch(np.asarray(items, dtype=np.int64)),
                        generator=torch.Generator())
    _load(reader, recording, model, params, optimizer, 0, _next_row(recording, reader, 0))
    with track(model, loader, str(temp), optimizer, mode="fast", projection_dim=projection_dim,
               loss_fn=loss_fn if custom_loss else None, checkpoint_every="epoch", seed=seed, strict=True):
        for c in range(len(steps) - 1):
            lo, hi = steps[c], steps[c + 1]
            if hi == lo:
                continue
            calls, rows = recording.calls(lo, hi), recording.trace_rows(lo, hi)
            sampler.batches = [k.samples.tolist() for step in calls for k in step]
            batches = iter(loader)
            for t in range(lo, hi):
                for call in calls[t - lo]:
                    _backward(model, next(batches), call, data, loss_fn)
                row = rows[t - lo]
                rule.apply_row(optimizer, params, layout, row)
                for k, p in enumerate(params):  # torch skips a parameter without .grad, as the recorded step did
                    if not row["active"][k]:
                        p.grad = None
                    elif p.grad is None:
                        p.grad = torch.zeros_like(p)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if progress is not None:
                    progress.update()
            _check_arrival(reader, params, c + 1, tolerance)
            _load(reader, recording, model, params, optimizer, c + 1, _next_row(recording, reader, hi))
            for _ in batches:  # the interval's end: the tracker checkpoints the stored values just loaded
                raise RuntimeError("hydra_nb lost track of the recorded batches")  # pragma: no cover


def _backward(model, batch, call, data: TrainingData, loss_fn) -> None:
    """One recorded backward call: loss = Σ_b c_b·loss_fn(model(x), y)_b from the recorded random state."""
    inputs, targets = split_batch(batch, data.batch_fn)
    args, kwargs = model_call(inputs, data.device, data.dtype)
    targets = targets.to(data.device) if torch.is_tensor(targets) else targets
    if call.rng is not None:
        torch.set_rng_state(call.rng)
    if call.cuda_rng is not None:
        torch.cuda.set_rng_state(call.cuda_rng, data.device)
    weights = torch.as_tensor(call.weights, dtype=data.dtype, device=data.device)
    (weights * loss_fn(model(*args, **kwargs), targets)).sum().backward()


def _next_row(recording, reader, step: int):
    """The trace row of ``step`` (the next step to take), or None after the last."""
    return recording.trace_rows(step, step + 1)[0] if step < int(reader.meta["committed"]["steps"]) else None


def _load(reader, recording, model, params, optimizer, c: int, row) -> None:
    """Checkpoint c's parameters, buffers and optimizer state into the model and the optimizer."""
    reader.load_params(model, c)
    reader.optimizer_rule.load_state(optimizer, params, recording.optimizer_state_at(c), row)


def _check_arrival(reader, params, c: int, tolerance: float) -> None:
    """The replayed θ at checkpoint c must be the stored one within ``tolerance`` (relative), as replay queries
    require (``hydra_nb.replay.walk.check_arrival``)."""
    check_arrival(params, reader.params_at(c), reader.checkpoint_steps, c, tolerance, "no rows are written")


def _finish(reader: StoreReader, temp: Path, target: Path) -> None:
    """Check the new store against the original (the same checkpoints, one row per recorded sample) and give it
    the original's description of the run: its config (with the new projection), origin and status."""
    new = StoreReader(temp)
    problems = []
    if not np.array_equal(new.checkpoint_steps, reader.checkpoint_steps):
        problems.append(f"checkpoints at steps {new.checkpoint_steps.tolist()}, not "
                        f"{reader.checkpoint_steps.tolist()}")
    else:
        for c in range(len(reader.checkpoint_steps)):
            if not np.array_equal(new.params_at(c), reader.params_at(c)):
                problems.append(f"checkpoint {c}'s parameters differ")
                break
    n_calls = int(np.asarray(reader.array("replay/step_end")[reader.steps - 1])) if reader.steps else 0
    expected_rows = int(np.asarray(reader.array("replay/call_end")[n_calls - 1])) if n_calls else 0
    if int(new.meta["committed"]["rows"]) != expected_rows:
        problems.append(f"{new.meta['committed']['rows']} rows for the {expected_rows} recorded samples")
    if problems:
        raise ReplayError(f"Adding rows to {reader.where!r} did not reproduce the run ({'; '.join(problems)}): "
                          "nothing was written.")
    group = zarr.open_group(str(temp), mode="r+")
    meta = group.attrs.asdict()["hydra_nb"]
    old = reader.meta
    fresh = meta.get("config", {})
    meta["config"] = {**old.get("config", {}), **{k: fresh[k] for k in (
        "projection_dim", "seed", "store_dtype", "batchnorm", "torch_version", "device") if k in fresh}}
    if old.get("origin") is not None:
        meta["origin"] = old["origin"]
    status = old.get("status", "running")
    if status != "complete":
        meta["status"] = "interrupted" if status == "running" else status
        meta["status_detail"] = old.get("status_detail") or ""
    meta["rows_added"] = {"from": str(reader.where), "run_id": old.get("run_id"), "mode": old.get("mode"),
                          "hydra_nb_version": meta.get("hydra_nb_version"), "created": meta.get("created")}
    group.attrs["hydra_nb"] = meta
