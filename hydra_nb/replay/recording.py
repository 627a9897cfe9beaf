"""A store's recording of a run, as replay reads it, and the training data replay recomputes batches from.

:class:`StoreRecording` implements :class:`hydra_nb.replay.walk.Recording` over a store's arrays
(``docs/store.md``, "Replay"): checkpoints' parameters and optimizer state, the optimizer trace, and
each step's backward calls. :class:`TrainingData` turns ``train_data`` (an ``(inputs, targets)`` pair
or a torch Dataset, indexed as the tracked loader's dataset) into the model calls of a recorded batch,
and checks it against the fingerprint recorded while tracking.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..data import ModelInputs, dataset_len, is_pair
from ..errors import ReplayError
from .record import checksum, model_call, split_batch
from .walk import Call, LIKELY_CAUSES

REPLAY_ARRAYS = ("replay/sample", "replay/weight", "replay/call_end", "replay/call_rng", "replay/call_cuda_rng",
                 "replay/step_end")


def replay_problem(reader) -> str | None:
    """Why the run in ``reader`` cannot be replayed, or None if it can."""
    info = reader.meta.get("replay")
    if int(reader.meta.get("world_size", 1)) > 1:
        return "it is a distributed (DDP) run, which replay does not reproduce yet"
    if info is None or any(name not in reader.group for name in REPLAY_ARRAYS):
        return ("it was recorded before hydra_nb recorded what replay needs (or by a hydra_nb that did not); "
                "track the run again with this version to get exact answers by replay")
    if not info.get("supported", False):
        return info.get("reason") or "tracking found it could not be replayed"
    return None


class StoreRecording:
    """The recorded run of a store (see :class:`hydra_nb.replay.walk.Recording`)."""

    def __init__(self, reader, model: nn.Module):
        problem = replay_problem(reader)
        if problem is not None:
            raise ReplayError(f"The run in {reader.where!r} cannot be replayed: {problem}. Fast mode still answers "
                              "(mode='fast').")
        self.reader = reader
        self.model = model
        self.layout = reader.layout
        self.checkpoint_steps = np.asarray(reader.checkpoint_steps)
        self.rule = reader.optimizer_rule
        committed = reader.meta["committed"]
        self._n_calls = int(committed.get("replay_call_end", 0))  # calls committed
        step_end = reader.array("replay/step_end")
        if len(self.checkpoint_steps) and self.checkpoint_steps[-1] > 0:
            need = int(np.asarray(step_end[int(self.checkpoint_steps[-1]) - 1]))
            if need > self._n_calls:  # pragma: no cover - the writer commits calls with their steps
                raise ReplayError(f"The store at {reader.where!r} is damaged: its replay record ends before its "
                                  "last checkpoint.")

    # -- Recording ---------------------------------------------------------------------------------
    def params_at(self, c: int) -> np.ndarray:
        return self.reader.params_at(c)

    def buffers_at(self, c: int) -> dict[str, torch.Tensor]:
        """The model's buffers with the floating-point ones of checkpoint c (others, e.g. BatchNorm's
        num_batches_tracked, as the model has them: a training-mode forward does not read them)."""
        out = {n: b.detach().clone() for n, b in self.model.named_buffers()}
        flat = self.reader.buffers_at(c)
        if flat is not None:
            for b in self.reader.meta["buffers"]:
                n = int(np.prod(b["shape"], dtype=np.int64))
                out[b["name"]] = torch.from_numpy(np.array(flat[b["offset"]:b["offset"] + n])).reshape(b["shape"]) \
                    .to(out[b["name"]].dtype)
        return out

    def optimizer_state_at(self, c: int) -> dict[str, list[torch.Tensor | None]]:
        return self.reader.optimizer_state_at(c)

    def trace_rows(self, lo: int, hi: int) -> list[dict[str, np.ndarray]]:
        trace = {f: np.asarray(self.reader.array(f"trace/{f}")[lo:hi]) for f in self.rule.trace_fields}
        return [{f: v[t] for f, v in trace.items()} for t in range(hi - lo)]

    def calls(self, lo: int, hi: int) -> list[list[Call]]:
        a = self.reader.array
        step_end = np.asarray(a("replay/step_end")[max(lo - 1, 0):hi])
        first_call = int(step_end[0]) if lo > 0 else 0
        ends = step_end if lo == 0 else step_end[1:]
        last_call = int(ends[-1])
        if last_call == first_call:  # no backward call in these steps
            return [[] for _ in range(hi - lo)]
        call_end = np.asarray(a("replay/call_end")[max(first_call - 1, 0):last_call])
        first_row = int(call_end[0]) if first_call > 0 else 0
        row_ends = call_end if first_call == 0 else call_end[1:]
        last_row = int(row_ends[-1]) if len(row_ends) else first_row
        samples = np.asarray(a("replay/sample")[first_row:last_row])
        weights = np.asarray(a("replay/weight")[first_row:last_row])
        rng_of = np.asarray(a("replay/call_rng")[first_call:last_call])
        cuda_of = np.asarray(a("replay/call_cuda_rng")[first_call:last_call])
        rng = self._states("replay/rng_cpu", rng_of)
        cuda = self._states("replay/rng_cuda", cuda_of)
        out, k, row = [], first_call, first_row
        for end in ends:
            step_calls = []
            while k < int(end):
                stop = int(row_ends[k - first_call])
                i = k - first_call
                step_calls.append(Call(samples[row - first_row:stop - first_row],
                                       weights[row - first_row:stop - first_row],
                                       rng.get(int(rng_of[i])), cuda.get(int(cuda_of[i]))))
                row, k = stop, k + 1
            out.append(step_calls)
        return out

    def _states(self, name: str, index: np.ndarray) -> dict[int, torch.Tensor]:
        wanted = np.unique(index[index >= 0])
        if not len(wanted):
            return {}
        arr = self.reader.array(name)
        rows = np.asarray(arr.get_orthogonal_selection((wanted, slice(None))))
        return {int(i): torch.from_numpy(r.copy()) for i, r in zip(wanted, rows)}


class TrainingData:
    """``train_data`` as replay reads it: the model call and targets of any recorded batch.

    ``data``: an ``(inputs, targets)`` pair indexed by dataset index (inputs a tensor, a tuple or a dict of
    tensors), or a torch Dataset whose items the tracked loader collated (``collate_fn``, default torch's
    ``default_collate``). ``batch_fn`` splits a batch into (inputs, targets) as for ``track``.
    """

    def __init__(self, data, n_train: int, *, device: torch.device, dtype: torch.dtype, collate_fn=None,
                 batch_fn=None):
        if data is None:
            raise ValueError("mode='exact' on a fast-mode store replays the run and needs the training data: pass "
                             "train_data=(inputs, targets) or the tracked loader's dataset (train_data=loader.dataset).")
        self.pair = is_pair(data)
        n = dataset_len(data)
        if n != n_train:
            raise ValueError(f"The run trained on {n_train} samples; train_data has {n}. Pass the training set as the "
                             "tracked DataLoader's dataset indexes it.")
        self.data, self.device, self.dtype = data, device, dtype
        self.collate_fn, self.batch_fn = collate_fn, batch_fn

    def batch(self, samples: np.ndarray):
        """The loader batch of these dataset indices (before it reaches the model)."""
        if self.pair:
            idx = torch.from_numpy(np.asarray(samples, dtype=np.int64))
            return (ModelInputs(self.data[0])[idx].value, torch.as_tensor(self.data[1])[idx])
        from torch.utils.data import default_collate

        items = [self.data[int(i)] for i in samples]
        return (self.collate_fn or default_collate)(items)

    def __call__(self, samples: np.ndarray):
        """(args, kwargs, targets) of the model call replay makes for these samples."""
        inputs, targets = split_batch(self.batch(samples), self.batch_fn)
        args, kwargs = model_call(inputs, self.device, self.dtype)
        targets = targets.to(self.device) if torch.is_tensor(targets) else targets
        return args, kwargs, targets

    def check(self, fingerprint: dict | None) -> None:
        """Refuse train_data whose first recorded batch differs from what training saw."""
        if not fingerprint:
            return
        samples = np.asarray(fingerprint["samples"], dtype=np.int64)
        inputs, targets = split_batch(self.batch(samples), self.batch_fn)
        got = np.asarray(checksum(inputs, targets))
        want = np.asarray(fingerprint["checksum"])
        tol = 1e-6 if self.dtype == torch.float64 else 1e-3  # float32 inputs summed in another order
        if got.shape != want.shape or not np.allclose(got, want, rtol=tol, atol=tol):
            raise ReplayError(
                f"train_data does not match the training run: the first batch training saw (samples "
                f"{samples.tolist()}) had other inputs or targets than train_data holds for those indices, so no "
                f"exact answer is returned. Likely causes: {LIKELY_CAUSES}.")
