"""Queries on a run store: contributions, top-k, self-influence, class matrices, trajectories.

    contributions[j, i] = −∇L(z_j; θ_S)ᵀ · h_S(i)

where S is the checkpoint's step, L is ``loss_fn`` on the single test sample z_j (model in eval
mode) and h_S(i) = dθ_S/dw_i comes from a hypergradient source (:mod:`hydra_nb.sources`):

    fast:   h_S(i) = Σ_{rows r of sample i, step t_r < S} c_{t_r→S} ⊙ u_r     (per parameter block,
            c from the Hessian-free recursion, u_r the stored projected gradients)
    exact:  the stored full-dimensional h at that checkpoint, or by replaying the run (every sample);
    curvature: the fast recursion with each step's curvature estimated from its rows (docs/curvature.md).

Each query is one function over a source's operations (``dot``, ``self_dot``, ``rows``), with a
sign and a column map from dataset index to output column:

    contributions   = −dot at one checkpoint, one column per tracked sample
    trajectory      = −dot at every checkpoint, one column per asked training sample
    top_k           = the k largest and smallest contributions, test points in groups within the budget
    class_matrix    = −dot with the test gradients summed per test class and one column per training
                      class, divided by the pair counts
    self_influence  = −self_dot
    hypergradients  = rows

:class:`Store` opens a store (a :class:`~hydra_nb.store.StoreReader`), picks the source from
``mode`` (:meth:`Store.source`) and calls these functions. Memory: every operation streams the store
in blocks cut from ``memory_budget`` (bytes, default 512 MiB; the sources' docstrings say what it
bounds); what grows is the result itself. ``engine="dask"`` computes the same numbers with dask
(any active scheduler or ``dask.distributed`` cluster) where the source has a dask engine.
"""

from __future__ import annotations

import copy
import html
import math
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from .data import as_pair, check_points, default_loss
from .errors import UnsupportedQuery
from .replay import replay_problem
from .sources import (DEFAULT_MEMORY_BUDGET, SOURCES, HypergradientSource, Progress, TestPoints, positions,
                      test_gradients)
from .store import StoreReader
from .units import format_bytes

ENGINES = ("numpy", "dask")


@dataclass
class TopK:
    """Most helpful and most harmful training samples for each test point (``Store.top_k``).

    ``helpful_indices[j]``: dataset indices of the ``k`` largest contributions to test point j,
    largest first, with ``helpful_scores[j]`` their contributions. ``harmful_*``: the ``k``
    smallest (most negative: raised the test loss the most), smallest first. Arrays (n_test, k).
    """

    helpful_indices: np.ndarray
    helpful_scores: np.ndarray
    harmful_indices: np.ndarray
    harmful_scores: np.ndarray


@dataclass
class ClassMatrix:
    """Mean contribution of each training class to each test class (``Store.class_matrix``).

    ``mean[a, b]`` = mean over tracked training samples i of class ``train_classes[a]`` and test
    points j of class ``test_classes[b]`` of contributions[j, i]; rows are training classes,
    columns test classes. ``counts[a, b]`` = the number of (i, j) pairs averaged
    (``train_counts[a] · test_counts[b]``); NaN means where a count is 0.
    """

    train_classes: np.ndarray
    test_classes: np.ndarray
    mean: np.ndarray
    counts: np.ndarray
    train_counts: np.ndarray
    test_counts: np.ndarray


# -- the queries: one function each over a source --------------------------------------------------
def contributions(source: HypergradientSource, tests: TestPoints, checkpoint: int = -1, *,
                  budget: int = DEFAULT_MEMORY_BUDGET, engine: str = "numpy",
                  progress: Progress | None = None) -> np.ndarray:
    """(n_test, n_tracked): −dot at one checkpoint, column i the tracked sample ``source.tracked[i]``."""
    tracked = source.tracked
    values = source.dot(tests, [checkpoint], positions(tracked, source.n_train), len(tracked), budget=budget,
                        progress=progress, engine=engine)
    out = np.ascontiguousarray(values[0].T)
    return np.negative(out, out=out)


def trajectory(source: HypergradientSource, tests: TestPoints, train_indices, *,
               budget: int = DEFAULT_MEMORY_BUDGET, engine: str = "numpy",
               progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(steps (C,), values (n_test, C, len(train_indices))): −dot at every checkpoint, one pass for all."""
    train_indices = _tracked_indices(source, train_indices)
    uniq, inverse = np.unique(train_indices, return_inverse=True)  # each sample once, whatever the repeats
    steps = np.array(source.reader.checkpoint_steps, copy=True)
    values = source.dot(tests, np.arange(len(steps)), positions(uniq, source.n_train), len(uniq), budget=budget,
                        progress=progress, engine=engine)
    values = -values.transpose(2, 0, 1)
    return steps, np.ascontiguousarray(values[:, :, inverse.reshape(-1)])


def top_k(source: HypergradientSource, tests: TestPoints, k: int, checkpoint: int = -1, *,
          budget: int = DEFAULT_MEMORY_BUDGET, engine: str = "numpy", progress: Progress | None = None) -> TopK:
    """The k largest and smallest contributions per test point, test points in groups whose
    (group × n_tracked) contributions fit half the budget (one ``contributions`` per group)."""
    tracked = source.tracked
    n, N = len(tests), len(tracked)
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be a positive integer, got {k}.")
    k = min(k, N)
    group = max(1, min(n, (budget // 2) // max(1, 16 * N)))
    out = TopK(np.empty((n, k), np.int64), np.empty((n, k)), np.empty((n, k), np.int64), np.empty((n, k)))
    if n == 0:
        return out
    starts = range(0, n, group)
    if progress is not None:
        progress.plan(len(starts))
    for start in starts:
        sl = slice(start, start + group)
        values = contributions(source, tests.take(sl), checkpoint, budget=budget // 2, engine=engine)
        for name, sign in (("helpful", -1.0), ("harmful", 1.0)):
            order = smallest_k(sign * values, k)
            getattr(out, f"{name}_indices")[sl] = tracked[order]
            getattr(out, f"{name}_scores")[sl] = np.take_along_axis(values, order, axis=1)
        if progress is not None:
            progress.update()
    return out


def self_influence(source: HypergradientSource, train: TestPoints, checkpoint: int = -1, *,
                   budget: int = DEFAULT_MEMORY_BUDGET, progress: Progress | None = None) -> np.ndarray:
    """(N,) by dataset index: −self_dot for the tracked samples, NaN for the others."""
    N = source.n_train
    if len(train) != N:
        raise ValueError(f"dataset has {len(train)} samples; the run trained on {N}. Pass the training set.")
    ids = np.sort(source.tracked)
    out = np.full(N, np.nan)
    out[ids] = -source.self_dot(train, ids, checkpoint, budget=budget, progress=progress)
    return out


def class_matrix(source: HypergradientSource, tests: TestPoints, train_labels, checkpoint: int = -1, *,
                 budget: int = DEFAULT_MEMORY_BUDGET, engine: str = "numpy",
                 progress: Progress | None = None) -> ClassMatrix:
    """Mean contribution per (training class, test class): −dot with the test gradients summed per test
    class (weights) and one column per training class (col), then divided by the pair counts."""
    N = source.n_train
    train_labels = np.asarray(train_labels).reshape(-1)
    if len(train_labels) != N:
        raise ValueError(f"train_labels has {len(train_labels)} entries; the run trained on {N} samples.")
    test_labels = np.asarray(tests.targets.cpu()).reshape(-1)
    if len(test_labels) != len(tests):
        raise ValueError("class_matrix needs one class label per test point (test_targets of shape (n,)).")
    tracked = source.tracked
    train_classes, train_code = np.unique(train_labels[tracked], return_inverse=True)
    test_classes, test_code = np.unique(test_labels, return_inverse=True)
    Ctr, Cte = len(train_classes), len(test_classes)
    col = np.full(N, -1, dtype=np.int64)
    col[tracked] = train_code.reshape(-1)
    onehot = torch.zeros(Cte, len(tests), dtype=torch.float64)
    onehot[torch.from_numpy(test_code.reshape(-1)), torch.arange(len(tests))] = 1.0
    sums = -source.dot(tests.weighted(onehot), [checkpoint], col, Ctr, budget=budget, progress=progress,
                       engine=engine)[0].astype(np.float64)
    train_counts = np.bincount(train_code.reshape(-1), minlength=Ctr)
    test_counts = np.bincount(test_code.reshape(-1), minlength=Cte)
    counts = train_counts[:, None] * test_counts[None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return ClassMatrix(train_classes, test_classes, mean, counts, train_counts, test_counts)


def hypergradients(source: HypergradientSource, checkpoint: int = -1, train_indices=None, *,
                   budget: int = DEFAULT_MEMORY_BUDGET, progress: Progress | None = None) -> np.ndarray:
    """rows: h_S(i) for ``train_indices`` (default: every tracked sample), one row each."""
    idx = source.tracked if train_indices is None else _tracked_indices(source, train_indices)
    return source.rows(checkpoint, idx, budget=budget, progress=progress)


def smallest_k(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k smallest entries along the last axis, smallest first (ties in index order)."""
    values = np.asarray(values)
    n = values.shape[-1]
    k = min(int(k), n)
    if k <= 0:
        return np.zeros(values.shape[:-1] + (0,), dtype=np.int64)
    if k < n:
        part = np.argpartition(values, k - 1, axis=-1)[..., :k]
    else:
        part = np.broadcast_to(np.arange(n), values.shape).copy()
    order = np.argsort(np.take_along_axis(values, part, axis=-1), axis=-1, kind="stable")
    return np.take_along_axis(part, order, axis=-1)


def _tracked_indices(source: HypergradientSource, train_indices) -> np.ndarray:
    """``train_indices`` as int64, each a dataset index the source tracked (else a ValueError saying so)."""
    idx = np.asarray(train_indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= source.n_train
                     or (positions(source.tracked, source.n_train)[idx] < 0).any()):
        raise ValueError("train_indices must be dataset indices of tracked samples (see store.tracked_indices).")
    return idx


# -- the store ----------------------------------------------------------------------------------
class Store:
    """A tracked run on disk, opened read-only for queries. Create with :func:`open_store`.

    It holds a :class:`~hydra_nb.store.StoreReader` (``reader``: metadata and raw arrays, up to what
    was committed) and one hypergradient source per mode asked for (:meth:`source`). Every query
    takes ``mode`` (None: the store's own), ``progress`` (None: a tqdm bar once the work has run about a
    second; False: silent; True: a bar from the start; a callable ``progress(done, total)``
    counted in chunks of work: batches of gradients and blocks of the log or of ``exact/h``) and
    ``memory_budget`` (bytes; default 512 MiB) which sets the block sizes.
    """

    def __init__(self, path, loss_fn: Callable | None = None, curvature=None):
        self.reader = StoreReader(path)
        self.loss_fn = loss_fn
        self._curvature = curvature
        self._custom_loss = bool(self.meta["config"].get("custom_loss"))
        self._sources: dict[str, HypergradientSource] = {}
        self._replay_source: tuple | None = None  # (key, the last replay source asked for)

    # -- the run, as its reader sees it ---------------------------------------------------------
    @property
    def meta(self) -> dict:
        """The store's ``attrs["hydra_nb"]`` (docs/store.md)."""
        return self.reader.meta

    @property
    def path(self):
        """The store's folder (a Path), or its URL for a remote store."""
        return self.reader.path

    @property
    def where(self) -> str:
        """The path or URL the store was opened with."""
        return self.reader.where

    @property
    def is_local(self) -> bool:
        return self.reader.is_local

    @property
    def group(self):
        """The store's zarr group (raw, unchecked access; ``array(name)`` checks for damage)."""
        return self.reader.group

    @property
    def layout(self):
        """The flat parameter layout (names, shapes, offsets, optimizer groups)."""
        return self.reader.layout

    @property
    def mode(self) -> str:
        """How the run was tracked: ``"fast"``, ``"exact"`` or ``"replay"`` (no per-sample rows: :meth:`add_rows`)."""
        return self.reader.mode

    @property
    def optimizer(self) -> str:
        return self.reader.optimizer

    @property
    def optimizer_rule(self):
        """The run's :class:`~hydra_nb.optim.OptimizerRule` (its trace fields, recursions and functional step)."""
        return self.reader.optimizer_rule

    @property
    def trace_fields(self) -> tuple[str, ...]:
        """The optimizer trace fields this store holds (see :meth:`trace`)."""
        return self.reader.trace_fields

    @property
    def world_size(self) -> int:
        return self.reader.world_size

    @property
    def log_parts(self) -> list[dict]:
        """Array names of the per-sample log, one part per rank of a distributed run (docs/store.md)."""
        return self.reader.log_parts

    @property
    def n_train(self) -> int:
        return self.reader.n_train

    @property
    def steps(self) -> int:
        """Optimizer steps at the last committed checkpoint."""
        return self.reader.steps

    @property
    def checkpoint_steps(self) -> np.ndarray:
        """Completed optimizer steps at each committed checkpoint (the first is 0)."""
        return self.reader.checkpoint_steps

    @property
    def status(self) -> str:
        return self.reader.status

    @property
    def writer(self) -> dict | None:
        return self.reader.writer

    @property
    def tracked_indices(self) -> np.ndarray:
        """Dataset indices of the tracked training samples (all of them in fast mode)."""
        return self.reader.tracked_indices

    @property
    def projector(self):
        return self.reader.projector

    def trace(self, steps: int | None = None) -> dict[str, np.ndarray]:
        """The optimizer trace: arrays (steps, parameters) by field (see ``StoreReader.trace``)."""
        return self.reader.trace(steps)

    def params_at(self, checkpoint: int = -1) -> np.ndarray:
        """Flat trainable parameters θ at a checkpoint (index into ``checkpoint_steps``)."""
        return self.reader.params_at(checkpoint)

    def load_params(self, model: nn.Module, checkpoint: int = -1) -> None:
        """Copy the parameters (and floating-point buffers) of a checkpoint into ``model``, in place."""
        self.reader.load_params(model, checkpoint)

    def array(self, name: str):
        """A store array for direct slicing: its committed chunks verified present, read errors as StoreError."""
        return self.reader.array(name)

    def log_chunks(self, before_step: int):
        """Yield (samples, steps, rows) of the per-sample log for steps < ``before_step``, block by block."""
        return self.reader.log_chunks(before_step)

    def epoch_boundaries(self) -> np.ndarray:
        """Optimizer steps at which an epoch ended: the checkpoint steps of a ``checkpoint_every="epoch"``
        run; otherwise every ⌈N / batch_size⌉ steps (an estimate: it assumes no ``drop_last``)."""
        cfg = self.meta.get("config", {})
        steps = np.asarray(self.checkpoint_steps, dtype=np.float64)
        if cfg.get("checkpoint_every") == "epoch":
            return steps[steps > 0]
        bs = cfg.get("batch_size")
        if not bs:
            return np.zeros(0)
        per_epoch = math.ceil(self.n_train / int(bs))
        return np.arange(per_epoch, self.steps + 1, per_epoch, dtype=np.float64)

    # -- sources and arguments ------------------------------------------------------------------
    @property
    def curvature(self):
        """Which estimate ``mode="curvature"`` uses: None (picked from the log: ``"ggn"`` for a softmax cross-entropy
        output layer with a bias, else ``"fisher"`` for a run without momentum), a kind of
        ``hydra_nb.curvature.CURVATURES`` or a ``CurvatureSpec``. Setting it drops the curvature source in use."""
        return self._curvature

    @curvature.setter
    def curvature(self, value) -> None:
        self._curvature = value
        self._sources.pop("curvature", None)

    def source(self, mode: str | None = None, *, train_data=None,
               replay_tolerance: float | None = None) -> HypergradientSource:
        """The hypergradient source queries with this ``mode`` use.

        None: the store's own mode. ``"exact"``: the recorded ``exact/h`` of an exact-mode store, else the
        replay of the run (all training samples; needs ``train_data``). ``"replay"``: the replay, whatever
        the store. ``"fast"``: the Hessian-free estimate from the log. ``"curvature"``: the fast recursion with
        each step's curvature estimated from its logged rows (:attr:`curvature` says which estimate;
        docs/curvature.md).
        """
        mode = self._resolve_mode(mode)
        if mode not in SOURCES:
            raise ValueError(f"mode must be {', '.join(map(repr, SOURCES))} or None, got {mode!r}.")
        cls = SOURCES[mode]
        if cls.needs_training_data:
            if (why := cls.unavailable(self.reader)) is not None:
                raise cls.unavailable_error(why)
            if train_data is None:
                raise ValueError(
                    "Exact answers for this store come from replaying the run, which needs the training data: pass "
                    "train_data=(inputs, targets) or the tracked loader's dataset (train_data=loader.dataset).")
            key = (mode, id(train_data), replay_tolerance)  # the last one is kept: its .drift says how it replayed
            if self._replay_source is None or self._replay_source[0] != key:
                self._replay_source = (key, cls(self.reader, train_data, tolerance=replay_tolerance))
            return self._replay_source[1]
        if mode not in self._sources:
            options = self._options_of(cls)
            if (why := cls.unavailable(self.reader, **options)) is not None:
                raise cls.unavailable_error(why)
            self._sources[mode] = cls(self.reader, **options)
        return self._sources[mode]

    def _resolve_mode(self, mode: str | None) -> str:
        """The source a query's ``mode`` names: None is the store's own mode; ``"exact"`` on a store that did not
        record exact hypergradients is the replay."""
        mode = self.mode if mode is None else mode
        return "replay" if mode == "exact" and self.mode != "exact" else mode

    def _options_of(self, cls) -> dict:
        """The Store attributes a source class takes (``store_options``), by keyword."""
        return {name: getattr(self, name) for name in cls.store_options}

    def _check_operation(self, mode: str | None, operation: str, what: str) -> None:
        """Raise :class:`UnsupportedQuery` before any work (and before asking for ``train_data``) if ``mode`` is
        answered by replay and replay has no ``operation`` (it walks the run once per test vector, so it has no
        self-influence), naming the modes this store can answer it in, or why it has none (a replay-only
        recording holds no per-sample rows)."""
        resolved = self._resolve_mode(mode)
        cls = SOURCES.get(resolved)
        if cls is None or not cls.needs_training_data or cls.offers(operation):
            return  # an unknown mode gets source()'s message, a store-only source its own refusal when asked
        having = [name for name, other in SOURCES.items() if other.offers(operation)]
        able = [name for name in having
                if SOURCES[name].unavailable(self.reader, **self._options_of(SOURCES[name])) is None]
        if able:
            instead = "Ask with " + " or ".join(f"mode={m!r}" for m in able) + "."
        else:
            instead = (f"Only {', '.join(map(repr, having))} can give it, from per-sample rows or recorded "
                       f"hypergradients, and this run (recorded with mode={self.mode!r}) holds neither: track with "
                       "mode='fast' (the default), or add the rows: store.add_rows(model, train_data) replays the "
                       "run once into a new fast-mode store.")
        reason = f"a replay walks the run once per test vector, and {what} would need a walk per training sample"
        raise UnsupportedQuery(f"{what.capitalize()} cannot come from mode={resolved!r}: {reason}. {instead}".strip())

    @property
    def replays(self) -> bool:
        """Whether exact answers by replay are available for this run (see :attr:`replay_status`)."""
        return replay_problem(self.reader) is None

    @property
    def replay_status(self) -> str:
        """``"replays"``, or why the run cannot be replayed."""
        problem = replay_problem(self.reader)
        return "replays" if problem is None else f"does not replay: {problem}"

    def _loss(self, loss_fn):
        if loss_fn is not None:
            return loss_fn
        if self.loss_fn is not None:
            return self.loss_fn
        if self._custom_loss:
            raise ValueError(
                f"This run was tracked with a custom loss_fn ({self.meta['config'].get('loss_fn')!r}); pass the same "
                "loss_fn=... to the query (a store never holds code).")
        return default_loss

    def _tests(self, model, inputs, targets, loss_fn, what: str = "test points") -> TestPoints:
        """The test points of a query, checked before any work (``check_points``: one dry forward and loss)."""
        inputs, targets = as_pair(inputs, targets)
        loss = self._loss(loss_fn)
        check_points(model, inputs, targets, loss, what)
        return TestPoints(model, inputs, targets, loss)

    # -- queries ----------------------------------------------------------------------------------
    def test_gradients(self, model: nn.Module, inputs, targets, checkpoint: int = -1, loss_fn=None) -> torch.Tensor:
        """∇_θ L(z_j; θ) at a checkpoint's parameters, one flat row per test sample."""
        c = self.reader.checkpoint_index(checkpoint)
        tests = self._tests(model, inputs, targets, loss_fn)
        return test_gradients(model, self.layout, self.params_at(c), self.reader.buffers_at(c), self.meta["buffers"],
                              tests.inputs, tests.targets, tests.loss_fn)

    def contributions(self, model: nn.Module, inputs, targets, mode: str | None = None, *, loss_fn=None,
                      checkpoint: int = -1, engine: str = "numpy", progress=None,
                      memory_budget: int | None = None, train_data=None,
                      replay_tolerance: float | None = None) -> np.ndarray:
        """contributions[j, i] = −∂L(z_j; θ_T)/∂w_i for test samples z_j = (inputs[j], targets[j]).

        Columns follow ``tracked_indices``. Positive: training sample i lowered z_j's loss.
        ``mode="fast"`` on an exact store gives the Hessian-free estimate for the same samples.
        Computed block by block (see :mod:`hydra_nb.sources.fast`); ``engine="dask"`` computes the
        same numbers with dask from ``dask.array.from_zarr`` (any active scheduler or cluster).
        """
        source = self.source(mode, train_data=train_data, replay_tolerance=replay_tolerance)
        engine, budget = _check_engine(engine), _budget(memory_budget)
        c = self.reader.checkpoint_index(checkpoint)
        tests = self._tests(model, inputs, targets, loss_fn)
        with Progress(progress, "contributions") as bar:
            return contributions(source, tests, c, budget=budget, engine=engine, progress=bar)

    def trajectory(self, model: nn.Module, inputs, targets, train_indices, mode: str | None = None, *,
                   loss_fn=None, engine: str = "numpy", progress=None,
                   memory_budget: int | None = None, train_data=None,
                   replay_tolerance: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Contributions of ``train_indices`` for training stopped at each checkpoint.

        Returns (steps, values) with steps (n_checkpoints,) and values
        (n_test, n_checkpoints, len(train_indices)). One pass over the log for all checkpoints.
        """
        source = self.source(mode, train_data=train_data, replay_tolerance=replay_tolerance)
        engine, budget = _check_engine(engine), _budget(memory_budget)
        tests = self._tests(model, inputs, targets, loss_fn)
        with Progress(progress, "trajectory") as bar:
            return trajectory(source, tests, train_indices, budget=budget, engine=engine, progress=bar)

    def top_k(self, model: nn.Module, inputs, targets, k: int = 10, mode: str | None = None, *, loss_fn=None,
              checkpoint: int = -1, engine: str = "numpy", progress=None,
              memory_budget: int | None = None, train_data=None,
              replay_tolerance: float | None = None) -> TopK:
        """The ``k`` most helpful and most harmful tracked training samples for each test point.

        Returns a :class:`TopK` of (n_test, k) arrays: dataset indices and their contributions,
        helpful sorted from the largest contribution down, harmful from the most negative up.
        Test points are processed in groups whose (group × N) accumulator fits half the budget
        (at least one test point), one pass over the log per group.
        """
        source = self.source(mode, train_data=train_data, replay_tolerance=replay_tolerance)
        engine, budget = _check_engine(engine), _budget(memory_budget)
        c = self.reader.checkpoint_index(checkpoint)
        tests = self._tests(model, inputs, targets, loss_fn)
        with Progress(progress, "top_k") as bar:
            return top_k(source, tests, k, c, budget=budget, engine=engine, progress=bar)

    def self_influence(self, model: nn.Module, dataset, mode: str | None = None, *, loss_fn=None,
                       checkpoint: int = -1, progress=None, memory_budget: int | None = None) -> np.ndarray:
        """Each training sample's contribution to its own loss: −⟨∇L(z_i; θ_S), h_S(i)⟩ (the mislabel detector).

        ``dataset``: the training set, a torch Dataset of (x, y) items or a pair of tensors
        (inputs, targets), indexed like the run's dataset (length N). Returns an array (N,) by
        dataset index; samples an exact store did not track are NaN. Large positive values mean
        a sample's loss was pushed down mostly by itself (memorised, often mislabelled).

        Cost and memory: one gradient per training sample at θ_S, projected and kept for a block
        of samples (block × k floats, from the budget), and one pass over the log per block
        (fast mode; ⌈N·k·4 / (budget/2)⌉ passes, one for N·k·4 ≤ budget/2). Exact mode reads
        ``exact/h`` for each block instead of the log.
        """
        self._check_operation(mode, "self_dot", "self-influence")
        source, budget = self.source(mode), _budget(memory_budget)
        c = self.reader.checkpoint_index(checkpoint)
        train = TestPoints.of_dataset(model, dataset, self._loss(loss_fn))
        if len(train):
            first = train.take([0])  # the training set's first sample, checked as test points are
            check_points(model, first.inputs, first.targets, first.loss_fn, "training samples")
        with Progress(progress, "self_influence") as bar:
            return self_influence(source, train, c, budget=budget, progress=bar)

    def class_matrix(self, model: nn.Module, train_labels, test_inputs, test_targets, mode: str | None = None, *,
                     loss_fn=None, checkpoint: int = -1, engine: str = "numpy", progress=None,
                     memory_budget: int | None = None, train_data=None,
                     replay_tolerance: float | None = None) -> ClassMatrix:
        """Mean contribution of each training class to each test class (the paper's label analysis).

        ``train_labels``: (N,) class of every training sample by dataset index (only tracked
        samples count); ``test_targets`` are the test points' classes (and their loss targets).
        Returns a :class:`ClassMatrix` with ``mean`` of shape (C_train, C_test): rows training
        classes, columns test classes. Contributions are linear in the test gradient and in h, so
        this sums test gradients per test class and rows per training class: one pass over the
        log, memory independent of N and of the number of test points.
        """
        source = self.source(mode, train_data=train_data, replay_tolerance=replay_tolerance)
        engine, budget = _check_engine(engine), _budget(memory_budget)
        c = self.reader.checkpoint_index(checkpoint)
        tests = self._tests(model, test_inputs, test_targets, loss_fn)
        with Progress(progress, "class_matrix") as bar:
            return class_matrix(source, tests, train_labels, c, budget=budget, engine=engine, progress=bar)

    def replay_without(self, model: nn.Module, remove, *, train_data, loss_fn=None, progress=None,
                       memory_budget: int | None = None, replay_tolerance: float | None = None) -> nn.Module:
        """What if training had not seen ``remove``? A copy of ``model`` (eval mode) holding the parameters and
        floating-point buffers at the last checkpoint of this run replayed with the loss terms of the dataset
        indices ``remove`` weighted 0 in every batch they were in — the same batches in the same order, a mean
        keeping its denominator: the counterfactual the contributions describe, to first order,

            L(z; θ_without) − L(z; θ_T) ≈ Σ_{i ∈ remove} contributions[z, i].

        One replay of the run (plus a check of every interval not yet verified by an earlier replay query);
        needs a run that replays (``replays``) and its ``train_data``, as ``mode="exact"`` does.
        """
        source = self.source("replay", train_data=train_data, replay_tolerance=replay_tolerance)
        remove = np.asarray(remove, dtype=np.int64).reshape(-1)
        if remove.size and (remove.min() < 0 or remove.max() >= self.n_train):
            raise ValueError(f"remove: dataset indices in [0, {self.n_train}), got {remove.tolist()[:8]}.")
        weights = np.zeros(self.n_train)
        weights[remove] = -1.0
        with Progress(progress, "replay_without") as bar:
            flat, buffers = source.counterfactual(model, self._loss(loss_fn), weights, budget=_budget(memory_budget),
                                                  progress=bar)
        out = copy.deepcopy(model)
        named, named_buffers = dict(out.named_parameters()), dict(out.named_buffers())
        with torch.no_grad():
            for name, value in self.layout.unflatten(flat.detach().cpu()).items():
                named[name].copy_(value)
            for name, value in buffers.items():
                if name in named_buffers and value.is_floating_point():
                    named_buffers[name].copy_(value)
        return out.eval()

    def add_rows(self, model: nn.Module, train_data, projection_dim: int | None = 1024, *, path=None,
                 seed: int | None = None, loss_fn=None, progress=None, replay_tolerance: float | None = None,
                 overwrite: bool = False) -> "Store":
        """Fast-mode rows for a run tracked with ``mode="replay"``: a new store holding the same run with the
        per-sample log that ``track(mode="fast", projection_dim=..., seed=...)`` would have written, opened.

        The run is replayed forward from its checkpoints (each interval checked on arrival against the stored
        parameters, as ``mode="exact"`` queries check it: ``ReplayError`` otherwise) under ``hydra_nb.track``
        itself, so each row is what fast-mode tracking logs: sample i's gradient as it entered ``.grad`` at step
        t, u = c_b·∇θ ℓ(z_i; θ_t) (the loss weight c_b included; Adam/AdamW: D_t ⊙ u), projected with the
        tensor sketch of (``projection_dim``, ``seed``; None: the seed the run was tracked with; full dimension
        for ``projection_dim=None``). The new store also holds the trace, the checkpoints (equal to this
        store's) and a replay record: it answers every mode (fast, curvature, exact by replay) and the views
        that need rows (self-influence, the class matrix, the explorer's fast preview).

        ``path``: where (default ``<store>-rows.zarr`` beside this one); an existing path is refused unless
        ``overwrite=True``. This store is only read; the new one is written into a temporary folder and renamed
        into place once complete and checked. ``model``: the tracked architecture (a copy trains; ``model`` is
        left alone). ``train_data``: the training set as the tracked loader's dataset indexes it, checked
        against the run's fingerprint before anything is written. Refused, saying what to do: a store with
        rows already (fast or exact mode), a run that does not replay (``replay_status``), a distributed run.
        Cost: about one training run plus fast-mode tracking's overhead; ``progress`` counts replayed steps.
        """
        from .replay.rows import add_rows

        loss = self._loss(loss_fn)
        with Progress(progress, "add_rows") as bar:
            target = add_rows(self.reader, model, train_data, projection_dim, loss_fn=loss,
                              custom_loss=self._custom_loss, path=path, seed=seed, progress=bar,
                              tolerance=replay_tolerance, overwrite=overwrite)
        return Store(target, loss_fn=self.loss_fn, curvature=self._curvature)

    def hypergradients(self, checkpoint: int = -1, train_indices=None, mode: str | None = None, *,
                       progress=None, memory_budget: int | None = None) -> np.ndarray:
        """h_S(i) = dθ_S/dw_i at a checkpoint: projected (fast) or full-dimensional (exact), one row per sample."""
        source, budget = self.source(mode), _budget(memory_budget)
        c = self.reader.checkpoint_index(checkpoint)
        with Progress(progress, "hypergradients") as bar:
            return hypergradients(source, c, train_indices, budget=budget, progress=bar)

    # -- notebook display -------------------------------------------------------------------------
    def __repr__(self) -> str:
        return (f"<hydra_nb.Store {str(self.path)!r}: {self.mode} mode, {len(self.tracked_indices)} tracked of "
                f"{self.n_train} samples, {self.steps} steps, {len(self.checkpoint_steps)} checkpoints, "
                f"{self.status}, {'replays' if self.replays else 'no replay'}>")

    def _epochs(self) -> str:
        every = self.meta.get("config", {}).get("checkpoint_every")
        if every != "epoch":
            return "unknown (checkpoints every %s steps)" % html.escape(str(every))
        n = len(self.checkpoint_steps) - 1
        return str(n) if self.meta.get("status") == "complete" else f"{n} (the last may be partial)"

    def size_on_disk(self) -> int | None:
        """Bytes of the store's files (local folder walk, or fsspec's ``du`` for a URL); None if unknown."""
        try:
            if not self.is_local:
                import fsspec

                fs, path = fsspec.core.url_to_fs(str(self.path))
                return int(fs.du(path))
            total = 0
            for base, _, files in os.walk(self.path):
                for f in files:
                    try:
                        total += os.path.getsize(os.path.join(base, f))
                    except OSError:
                        pass
            return total
        except Exception:
            return None

    def _repr_html_(self) -> str:
        """A small table summarising the run, for notebooks."""
        meta, cfg = self.meta, self.meta.get("config", {})
        proj = meta.get("projection", {})
        n_tracked = len(self.tracked_indices)
        samples = f"{self.n_train:,}" + (" (all tracked)" if n_tracked == self.n_train else f" ({n_tracked:,} tracked)")
        if not any(block.get("sketch") for block in proj.get("blocks", [{"sketch": True}])):
            asked = proj.get("requested")
            projection = f"none (full dimension, {self.layout.size:,} parameters" + (
                "" if asked is None else f"; projection_dim={asked} asked for most of them") + ")"
        else:
            projection = (f"{proj.get('kind', '?')}, k = {int(proj.get('dim', 0)):,} of {self.layout.size:,} "
                          f"parameters (seed {proj.get('seed')})")
        size = self.size_on_disk()
        ckpt = self.checkpoint_steps
        rows = [
            ("samples", samples),
            ("steps", f"{self.steps:,}"),
            ("epochs", self._epochs()),
            ("checkpoints", f"{len(ckpt)} at steps " + (", ".join(map(str, ckpt)) if len(ckpt) <= 8 else
                                                       ", ".join(map(str, ckpt[:3])) + ", …, " +
                                                       ", ".join(map(str, ckpt[-2:])))),
            ("mode", self.mode),
            ("projection", projection),
            ("log rows", f"{int(meta.get('committed', {}).get('rows', 0)):,} ({cfg.get('store_dtype', '?')})"),
            ("size on disk", "unknown" if size is None else format_bytes(size)),
            ("status", self.status),
            ("exact answers", "by replay, for every sample (mode='exact', train_data=...)" if self.replays
             else self.replay_status),
        ]
        body = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th>"
                       f"<td style='text-align:left'>{html.escape(str(v))}</td></tr>" for k, v in rows)
        loc = html.escape(str(self.where))
        return (f"<div class='hydra-nb-store'><b>hydra_nb store</b> <code>{loc}</code>"
                f"<table>{body}</table></div>")


def open_store(path, loss_fn: Callable | None = None, curvature=None) -> Store:
    """Open a hydra_nb store for queries. ``loss_fn`` is needed only if the run used a custom one. ``curvature``:
    which estimate ``mode="curvature"`` uses (None: picked from the log; see :attr:`Store.curvature`)."""
    return Store(path, loss_fn=loss_fn, curvature=curvature)


# -- small helpers ------------------------------------------------------------------------------
def _check_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}.")
    if engine == "dask":
        try:
            import dask.array  # noqa: F401
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("engine='dask' needs dask: pip install 'hydra_nb[dask]'.") from exc
    return engine


def _budget(memory_budget) -> int:
    if memory_budget is None:
        return DEFAULT_MEMORY_BUDGET
    b = int(memory_budget)
    if b <= 0:
        raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}.")
    return b
