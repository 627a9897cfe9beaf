"""The replay source: exact h for every training sample, by walking the recorded run backward.

    dot:  out[s, c, r] = Σ_{i: col[i] = c} ⟨g_r(θ_{S_s}), dθ_{S_s}/dw_i⟩

computed without ever forming h: for each test vector g_r (at each asked checkpoint s) the adjoint of
the run is walked back from step S_s (``hydra_nb.replay.walk``), one vector–Jacobian product per
optimizer step, and each step's product gives the derivative for the samples of its batch. Every
vector goes through one walk together, whatever N; the walk replays training from the stored
checkpoints and refuses (``ReplayError``) a run that does not arrive at them. ``docs/replay.md`` has
the method, what is exact, and what replay cannot cover.

It has no ``self_dot`` (one walk per training sample) and no ``rows`` (one per parameter): those
stay with the fast source.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import numpy as np
import torch

from ..capture import paused
from ..errors import ReplayError
from ..replay import Replayer, StoreRecording, TrainingData, replay_problem
from . import HypergradientSource, Progress, TestPoints


class ReplaySource(HypergradientSource):
    """Exact contributions of every training sample of a recorded run (any tracking mode), given ``train_data``.

    ``train_data``: the training set as the tracked loader's dataset indexes it (an ``(inputs, targets)``
    pair, or a torch Dataset whose items ``collate_fn``, default torch's ``default_collate``, turns into
    the loader's batches); ``batch_fn(batch) -> (inputs, targets)`` as for ``track``. ``tolerance``: the
    relative drift allowed when the replay arrives at a checkpoint (default by dtype,
    ``hydra_nb.replay.DEFAULT_TOLERANCE``).
    """

    mode = "replay"
    unavailable_error = ReplayError
    needs_training_data = True

    def __init__(self, reader, train_data=None, *, tolerance: float | None = None, collate_fn=None, batch_fn=None):
        super().__init__(reader)
        self.train_data, self.tolerance = train_data, tolerance
        self.collate_fn, self.batch_fn = collate_fn, batch_fn
        self.drift: dict[int, float] = {}  # checkpoint index → relative drift measured on arrival there
        self.verified: set[int] = set()  # checkpoints a replay reached within the tolerance

    @classmethod
    def unavailable(cls, reader) -> str | None:
        problem = replay_problem(reader)
        if problem is None:
            return None
        return (f"The run in {reader.where!r} cannot be replayed: {problem}. Fast mode still answers "
                "(mode='fast').")

    @property
    def tracked(self) -> np.ndarray:
        return np.arange(self.reader.n_train, dtype=np.int64)  # every training sample

    def _replayer(self, model, loss_fn, budget: int, progress) -> Replayer:
        """A replayer of this run for ``model`` (its architecture), after checking train_data's fingerprint."""
        params = list(model.parameters())
        device = params[0].device if params else torch.device("cpu")
        dtype = torch.float64 if np.dtype(self.reader.group["checkpoints/params"].dtype) == np.float64 \
            else torch.float32
        data = TrainingData(self.train_data, self.reader.n_train, device=device, dtype=dtype,
                            collate_fn=self.collate_fn, batch_fn=self.batch_fn)
        data.check(self.reader.meta.get("replay", {}).get("fingerprint"))
        return Replayer(StoreRecording(self.reader, model), model, self.reader.optimizer_rule, data, loss_fn,
                        device=device, dtype=dtype, tolerance=self.tolerance, state_memory=budget // 2,
                        vjp_memory=budget // 4, progress=progress)

    @contextmanager
    def _replaying(self, model, replayer: Replayer):
        """Replayed dropout leaves the user's generators alone, a run of this model being tracked does not see the
        replay's forwards, the model is in training mode meanwhile, and what was verified is remembered."""
        devices = [replayer.device] if replayer.device.type == "cuda" else []
        was_training = model.training
        try:
            with torch.random.fork_rng(devices=devices), paused():
                model.train()
                yield
        finally:
            model.train(was_training)
            self.drift.update(replayer.drift)
            self.verified.update(c for c, d in replayer.drift.items() if d <= replayer.tolerance)

    def _warn_if_running(self) -> None:
        if self.reader.status.startswith("running"):
            warnings.warn(f"The run in {self.reader.where!r} is still being written: replay answers for training "
                          f"stopped at its last committed checkpoint (step {self.reader.steps}).", RuntimeWarning,
                          stacklevel=5)

    def dot(self, tests: TestPoints, checkpoints, col: np.ndarray, n_cols: int, *, budget: int,
            progress: Progress | None = None, engine: str = "numpy") -> np.ndarray:
        col = self.check_col(col, n_cols)
        stops = self.checkpoint_indices(checkpoints)
        self._warn_if_running()
        distinct = sorted(set(stops))
        steps = int(self.reader.checkpoint_steps[distinct[-1]])
        if progress is not None:
            progress.plan(len(distinct) * self.gradient_batches(len(tests)) + 2 * steps)
        replayer = self._replayer(tests.model, tests.loss_fn, budget, progress)
        vectors = {c: self._vectors(tests, c, progress) for c in distinct}
        with self._replaying(tests.model, replayer):
            walked = replayer.walk(vectors, col, n_cols)
        m = tests.n_vectors
        rows = {c: walked[i * m:(i + 1) * m] for i, c in enumerate(distinct)}
        out = torch.stack([rows[c].T for c in stops]).numpy()  # (len(checkpoints), n_cols, m)
        return out.astype(np.float64 if replayer.dtype == torch.float64 else np.float32, copy=False)

    def counterfactual(self, model, loss_fn, weights: np.ndarray, *, budget: int,
                       progress: Progress | None = None) -> tuple[torch.Tensor, dict]:
        """(flat θ, buffers) at the last checkpoint had training weighted sample i's loss term by (1 + w_i),
        same batches, same order (``Replayer.counterfactual``)."""
        self._warn_if_running()
        weights = np.asarray(weights, dtype=np.float64).reshape(-1)
        if len(weights) != self.reader.n_train:
            raise ValueError(f"weights: one per training sample ({self.reader.n_train}), got {len(weights)}.")
        steps = int(self.reader.checkpoint_steps[-1])
        unverified = sum(int(self.reader.checkpoint_steps[c] - self.reader.checkpoint_steps[c - 1])
                         for c in range(1, len(self.reader.checkpoint_steps)) if c not in self.verified)
        if progress is not None:
            progress.plan(steps + unverified)
        replayer = self._replayer(model, loss_fn, budget, progress)
        with self._replaying(model, replayer):
            state, buffers = replayer.counterfactual(weights, self.verified)
        flat = torch.cat([p.reshape(-1) for p in state.params])
        return flat, buffers

    def _vectors(self, tests: TestPoints, c: int, progress: Progress | None) -> torch.Tensor:
        """g_r(θ_c): the test gradients at checkpoint c, summed by ``tests.weights`` if it has them."""
        parts = []
        for G in self.gradients(tests, c):
            parts.append(G)
            if progress is not None:
                progress.update()
        G = torch.cat(parts) if parts else torch.zeros(0, self.reader.layout.size)
        if tests.weights is not None:
            G = (tests.weights.to(torch.float64) @ G.to(torch.float64)).to(G.dtype)
        return G

