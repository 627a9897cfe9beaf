"""Reverse-mode replay: exact contributions of every training sample, for the test points asked about.

``record`` is the tracker's side (what each step's backward calls were), ``walk`` the engine (replay
training forward from the checkpoints, walk it backward with one vector–Jacobian product per step),
``recording`` reads a store's record and the training data. ``hydra_nb.sources.replay`` offers it to
queries as ``mode="exact"`` (with ``train_data=``) on stores tracked in fast mode. The method, what is
exact and what replay cannot cover: ``docs/replay.md``.
"""

from .record import RecordedCall, ReplayRecorder
from .recording import StoreRecording, TrainingData, replay_problem
from .walk import DEFAULT_TOLERANCE, Call, Replayer

__all__ = ["Call", "DEFAULT_TOLERANCE", "RecordedCall", "Replayer", "ReplayRecorder", "StoreRecording",
           "TrainingData", "replay_problem"]
