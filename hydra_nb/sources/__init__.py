"""Hypergradient sources: h_S(i) = dθ_S/dw_i, offered as the few operations every query is made of.

A source answers for the training samples its store tracked (``tracked``, dataset indices) at the
store's checkpoints (indices into ``checkpoint_steps``; S_s is the step of checkpoint s). With g_r
the loss gradients of test points (:class:`TestPoints`) at the checkpoint's parameters θ_S,

    dot:       out[s, c, r] = Σ_{i tracked: col[i] = c} ⟨g_r(θ_{S_s}), h_{S_s}(i)⟩
               g_r = ∇θ L(z_r; θ_S), or with weights (m × n): g_r = Σ_j weights[r, j]·∇θ L(z_j; θ_S)
    self_dot:  out[a] = ⟨∇θ L(z_{ids[a]}; θ_S), h_S(ids[a])⟩        (each sample against its own loss)
    rows:      out[a] = h_S(ids[a])                                   (projected or full, as the source holds it)

``col`` maps every dataset index (length N) to an output column, or -1 to leave the sample out:
one column per tracked sample gives contributions, one per training class a class matrix. Queries
(``hydra_nb.query``) are these operations with a sign and a column map.

Sources, chosen by ``Store.source(mode)`` from :data:`SOURCES`:

- ``fast`` (:mod:`.fast`, dask engine in :mod:`.fast_dask`): h from the per-sample gradient log and
  the Hessian-free recursion's response coefficients, streamed block by block;
- ``exact`` (:mod:`.exact`): the full-dimensional h of an exact run, read from ``exact/h``;
- ``replay`` (:mod:`.replay`): exact h of every sample, by walking the recorded run backward (needs
  the training data; ``mode="exact"`` on a store without ``exact/h`` means this source);
- ``curvature`` (:mod:`.curvature`): fast mode's recursion with each step's curvature estimated from
  its logged rows (:mod:`hydra_nb.curvature`); embeddings cached in the store.

A source that has no ``self_dot`` or ``rows`` inherits the methods below, which raise
:class:`~hydra_nb.errors.UnsupportedQuery` naming the modes that have them. Every operation takes
``budget`` (bytes: what block sizes are cut from) and ``progress`` (a :class:`Progress`, or None):
a source announces its chunks of work (``progress.plan(n)``) before it counts them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from ..data import ModelInputs, as_pair, dataset_items, dataset_len
from ..errors import UnsupportedQuery
from ..params import ParamLayout

DEFAULT_MEMORY_BUDGET = 512 << 20
_GRAD_BATCH = 256  # test/training samples differentiated per call (then projected or multiplied, and dropped)
# progress=None: a bar appears only once work has run this long (tqdm's delay=), so a quick query shows nothing;
# %%hydra_track's bar waits as long (hydra_nb/magic.py)
PROGRESS_DELAY_S = 1.0


class Progress:
    """``progress``: None (a tqdm bar once the work has run ``PROGRESS_DELAY_S``), False (silent), True (a bar
    from the start) or callable(done, total).

    The query that owns it names it (``desc``); each source operation it is handed calls ``plan(n)``
    with the chunks of work it is about to do (batches of gradients, blocks of the log or of
    ``exact/h``), then ``update()`` once per chunk done.
    """

    def __init__(self, progress, desc: str):
        self.done = self.total = 0
        self.desc = desc
        self._progress = progress
        self._callback = progress if callable(progress) else None
        self._bar = None

    def plan(self, n: int) -> None:
        self.total += int(n)
        if self._bar is not None:
            self._bar.total = self.total
            self._bar.refresh()
        elif self._callback is None and self._progress in (None, True):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, initial=self.done, desc=self.desc, unit="chunk", leave=False,
                             delay=0.0 if self._progress is True else PROGRESS_DELAY_S)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        if self._callback is not None:
            self._callback(self.done, self.total)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class TestPoints:
    """The points z_j = (x_j, y_j) whose loss gradients meet the hypergradients.

    ``model``: the architecture (parameters come from the store); ``inputs``/``targets``: model inputs
    (see :class:`~hydra_nb.data.ModelInputs`) and one target per point; ``loss_fn(outputs, targets)``:
    per-sample losses. ``weights`` (m × n, optional): the operations use the m vectors
    g_r = Σ_j weights[r, j]·∇θ L(z_j) instead of the n gradients (``class_matrix`` sums the test
    gradients of a class into one vector).

    :meth:`of_dataset` makes the training set's points, indexed by dataset index and read only when
    :meth:`take` asks for some (a training set need not fit in memory).
    """

    __test__ = False  # not a pytest test class, whatever its name says

    def __init__(self, model: nn.Module, inputs, targets, loss_fn: Callable, weights=None, *, dataset=None):
        self.model, self.loss_fn = model, loss_fn
        self._dataset = dataset
        if dataset is not None:  # see of_dataset
            if inputs is not None or targets is not None or weights is not None:
                raise ValueError("TestPoints take inputs and targets, or a dataset, not both.")
            self.inputs = self.targets = self.weights = None
            self._n = dataset_len(dataset)
            return
        self.inputs, self.targets = as_pair(inputs, targets)
        self._n = len(self.inputs)
        if weights is not None:
            weights = torch.as_tensor(weights, dtype=torch.float64)
            if weights.ndim != 2 or weights.shape[1] != self._n:
                raise ValueError(f"weights must be a matrix (m, n) with n = {self._n} test points, got shape "
                                 f"{tuple(weights.shape)}.")
        self.weights = weights

    @classmethod
    def of_dataset(cls, model: nn.Module, dataset, loss_fn: Callable) -> "TestPoints":
        """The samples of ``dataset`` (a pair ``(inputs, targets)`` or a torch Dataset of ``(x, y)``) by dataset index."""
        return cls(model, None, None, loss_fn, dataset=dataset)

    def __len__(self) -> int:
        return self._n

    @property
    def n_vectors(self) -> int:
        """m: how many gradient vectors the operations use (rows of ``weights``, else the points)."""
        return self._n if self.weights is None else int(self.weights.shape[0])

    def take(self, selection) -> "TestPoints":
        """The points ``selection`` (a slice or indices; dataset indices for :meth:`of_dataset` points), in memory."""
        if self._dataset is not None:
            inputs, targets = dataset_items(self._dataset, np.asarray(selection, dtype=np.int64).reshape(-1))
            return TestPoints(self.model, inputs, targets, self.loss_fn)
        if self.weights is not None:
            raise ValueError("weighted test points are taken whole: their weights mix the points.")
        if not isinstance(selection, slice):
            selection = torch.from_numpy(np.asarray(selection, dtype=np.int64).reshape(-1))
        return TestPoints(self.model, self.inputs[selection], self.targets[selection], self.loss_fn)

    def weighted(self, weights) -> "TestPoints":
        """These points with ``weights`` (m × n): m summed gradient vectors."""
        self._need_memory("weighted")
        return TestPoints(self.model, self.inputs, self.targets, self.loss_fn, weights)

    def _need_memory(self, what: str) -> None:
        if self._dataset is not None:
            raise ValueError(f"{what}: these points are read from a dataset by index; take(ids) some first.")


class HypergradientSource(ABC):
    """h_S(i) for the samples a store tracked, as dot products with gradients at its checkpoints.

    A subclass sets ``mode`` (the ``mode=`` of queries that picks it), implements :meth:`dot` and,
    if it can, :meth:`self_dot` and :meth:`rows`; :meth:`unavailable` says why a store cannot give
    it. ``reader`` is the store's :class:`~hydra_nb.store.StoreReader`.
    """

    mode: str = ""
    unavailable_error: type[Exception] = ValueError  # raised with unavailable()'s reason
    needs_training_data = False  # built per query with train_data= (the replay source)
    store_options: tuple[str, ...] = ()  # attributes of the Store passed to unavailable() and __init__ by keyword

    def __init__(self, reader):
        self.reader = reader

    @classmethod
    def unavailable(cls, reader) -> str | None:
        """Why this source cannot answer for the store of ``reader`` (what to do instead), or None if it can."""
        return None

    @classmethod
    def offers(cls, operation: str) -> bool:
        """Whether this source has ``operation`` ("dot", "self_dot", "rows"), i.e. overrides the base's refusal."""
        return getattr(cls, operation) is not getattr(HypergradientSource, operation)

    @property
    def tracked(self) -> np.ndarray:
        """Dataset indices of the samples this source answers for."""
        return self.reader.tracked_indices

    @property
    def n_train(self) -> int:
        return self.reader.n_train

    # -- the operations ---------------------------------------------------------------------
    @abstractmethod
    def dot(self, tests: TestPoints, checkpoints, col: np.ndarray, n_cols: int, *, budget: int,
            progress: Progress | None = None, engine: str = "numpy") -> np.ndarray:
        """out[s, c, r] = Σ_{i tracked: col[i] = c} ⟨g_r(θ_{S_s}), h_{S_s}(i)⟩, s over ``checkpoints``.

        Returns (len(checkpoints), n_cols, tests.n_vectors) in the dtype the source computes in.
        ``engine``: "numpy" (this process) or "dask" (the active dask scheduler), where the source has one.
        """

    def self_dot(self, train: TestPoints, ids: np.ndarray, checkpoint: int, *, budget: int,
                 progress: Progress | None = None) -> np.ndarray:
        """out[a] = ⟨∇θ L(z_{ids[a]}; θ_S), h_S(ids[a])⟩ for tracked dataset indices ``ids``; ``train`` by dataset index."""
        raise self._unsupported("self_dot", "self-influence")

    def rows(self, checkpoint: int, ids: np.ndarray, *, budget: int, progress: Progress | None = None) -> np.ndarray:
        """h_S(ids[a]), one row per tracked dataset index in ``ids`` (projected or full-dimensional)."""
        raise self._unsupported("rows", "hypergradient rows")

    def _unsupported(self, operation: str, what: str) -> UnsupportedQuery:
        able = [m for m, cls in SOURCES.items() if cls.offers(operation) and m != self.mode]
        instead = " or ".join(f"mode={m!r}" for m in able) or "another source"
        return UnsupportedQuery(f"The {self.mode!r} hypergradient source cannot give {what} (it has no {operation} "
                                f"operation). Ask with {instead}.")

    # -- shared by the sources ------------------------------------------------------------
    def check_col(self, col, n_cols: int) -> np.ndarray:
        """``col`` as an int64 array of length N whose entries are -1 or a column below ``n_cols``."""
        col = np.asarray(col, dtype=np.int64).reshape(-1)
        if len(col) != self.n_train:
            raise ValueError(f"col maps dataset indices to columns: it needs {self.n_train} entries, got {len(col)}.")
        if col.size and (col.max() >= n_cols or col.min() < -1):
            raise ValueError(f"col holds columns outside -1..{n_cols - 1}.")
        return col

    def checkpoint_indices(self, checkpoints) -> list[int]:
        return [self.reader.checkpoint_index(c) for c in np.atleast_1d(np.asarray(checkpoints, dtype=np.int64))]

    @property
    def gradient_batch(self) -> int:
        """Test or training samples differentiated at a time: at most 256, and their full gradients
        (with vmap's temporaries, ~3 copies) within half the default memory budget — a 100M-parameter
        model gets one at a time instead of 256 (which would need ~300 GB)."""
        per_sample = 3 * self.reader.layout.size * 4
        return int(max(1, min(_GRAD_BATCH, (DEFAULT_MEMORY_BUDGET // 2) // max(per_sample, 1))))

    def gradient_batches(self, n: int) -> int:
        """How many batches ``gradients`` yields for ``n`` points."""
        return -(-n // self.gradient_batch)

    def gradients(self, points: TestPoints, c: int) -> Iterator[torch.Tensor]:
        """Yield ∇θ L(z_j; θ_c) for the points in batches of ``gradient_batch`` (flat rows, parameters read once)."""
        points._need_memory("gradients")
        reader = self.reader
        params, buffers = reader.params_at(c), reader.buffers_at(c)
        batch = self.gradient_batch
        for start in range(0, len(points), batch):
            yield test_gradients(points.model, reader.layout, params, buffers, reader.meta["buffers"],
                                 points.inputs[start:start + batch], points.targets[start:start + batch],
                                 points.loss_fn)


# -- helpers ------------------------------------------------------------------------------------
def positions(indices: np.ndarray, n: int) -> np.ndarray:
    """pos[indices[a]] = a, -1 elsewhere: dataset index → position (length n)."""
    pos = np.full(n, -1, dtype=np.int64)
    pos[indices] = np.arange(len(indices))
    return pos


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def test_gradients(model: nn.Module, layout: ParamLayout, flat_params: np.ndarray, flat_buffers: np.ndarray | None,
                   buffers_meta: list[dict], inputs, targets, loss_fn, batch_size: int = 64) -> torch.Tensor:
    """∇_θ loss_fn(model(x_j; θ), y_j) for each test sample, with θ (and buffers) from the store.

    The model's architecture is used, never its current weights; it runs in eval mode.
    """
    if (why := layout.matches(model)) is not None:
        raise ValueError(f"The model does not match the store's parameters: {why}. Pass the architecture the run trained.")
    device = next(model.parameters()).device
    dtype = torch.from_numpy(flat_params[:0]).dtype
    theta = {k: v.to(device) for k, v in layout.unflatten(torch.from_numpy(flat_params)).items()}
    fixed = {}
    if flat_buffers is not None:
        named = dict(model.named_buffers())
        for b in buffers_meta:
            n = 1
            for s in b["shape"]:
                n *= s
            fixed[b["name"]] = torch.from_numpy(flat_buffers[b["offset"]: b["offset"] + n]).reshape(b["shape"]).to(
                device=device, dtype=named[b["name"]].dtype)
    inputs = ModelInputs(inputs).map(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None))
    targets = torch.as_tensor(targets).to(device)
    if len(inputs) != targets.shape[0]:
        raise ValueError(f"inputs ({len(inputs)}) and targets ({targets.shape[0]}) differ in length.")
    was_training = model.training
    model.eval()
    try:
        def loss_one(params, leaves, y):
            args, kwargs = inputs.rebuild([t.unsqueeze(0) for t in leaves])
            out = torch.func.functional_call(model, {**params, **fixed}, args, kwargs)
            return loss_fn(out, y.unsqueeze(0)).sum()

        vmapped = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))
        one = torch.func.grad(loss_one)

        def looped(params, leaves, ys):  # for models or losses vmap cannot batch (e.g. F.one_hot)
            gs = [one(params, [t[i] for t in leaves], ys[i]) for i in range(len(ys))]
            return {name: torch.stack([g[name] for g in gs]) for name in params}

        per_sample = vmapped
        rows = []
        for start in range(0, len(inputs), batch_size):
            xs, ys = inputs[start:start + batch_size].leaves(), targets[start:start + batch_size]
            try:
                g = per_sample(theta, xs, ys)
            except RuntimeError:
                if per_sample is looped:
                    raise
                per_sample = looped
                g = per_sample(theta, xs, ys)
            rows.append(layout.flatten([g[s.name] for s in layout.slots], batch_dims=1).detach().cpu())
    finally:
        model.train(was_training)
    if not rows:
        return torch.zeros(0, layout.size, dtype=dtype)
    return torch.cat(rows)


test_gradients.__test__ = False  # a function, not a pytest test, wherever it is imported


# The table Store.source(mode) picks from. Imported last: the sources subclass the classes above.
from .exact import ExactSource  # noqa: E402
from .fast import FastSource  # noqa: E402
from .replay import ReplaySource  # noqa: E402
from .curvature import CurvatureSource  # noqa: E402

SOURCES: dict[str, type[HypergradientSource]] = {"fast": FastSource, "exact": ExactSource, "replay": ReplaySource,
                                                 "curvature": CurvatureSource}

__all__ = ["HypergradientSource", "TestPoints", "Progress", "SOURCES", "FastSource", "ExactSource", "ReplaySource",
           "CurvatureSource", "DEFAULT_MEMORY_BUDGET", "test_gradients", "positions"]
