"""The curvature source: fast mode's recursion with an estimated Hessian term, from the log alone (issue 16).

Fast mode drops the Hessian term of the HYDRA recursion. This source puts back an estimate C̃_t of each
step's curvature built from that step's logged rows (:mod:`hydra_nb.curvature`: the equations, the
estimates, what each is exact for) and answers the same operations:

    dot:       out[s, c, r] = Σ_{i: col[i] = c} ⟨P·g_r(θ_{S_s}), h̃_{S_s}(i)⟩
    self_dot:  out[a] = ⟨P·∇θ L(z_{ids[a]}; θ_S), h̃_S(ids[a])⟩
    rows:      h̃_S(ids[a]), the sample's embedding E_i (projected, k values)

**Which estimate** (:func:`choose_spec`). ``curvature=None`` (the default): ``"ggn"`` where the log shows a
softmax cross-entropy output layer with a bias (``curvature.find_output_bias``), else ``"fisher"`` for a
run without momentum, else the source is unavailable (the Fisher diverged with momentum in every
measured run; docs/curvature.md). ``curvature="fisher"``/``"ggn"``/… or a ``CurvatureSpec`` asks for one
explicitly (``open_store(path, curvature=...)``). The loss's batch reduction (s_b = rows of the step for a
mean, 1 for a sum) is read off the replay record's loss weights; a store without it is taken as a mean.

**Two ways to the same numbers.** ``dot`` walks the log backward from the test side
(``curvature.walk``: about 3× a fast query's arithmetic, state 3·m·k for m test vectors) — unless the
embeddings E (N × k, ``curvature.embeddings``: the walk with the k basis vectors, about k/m walks' worth
of arithmetic once) are at hand for that checkpoint, or m ≥ k/2 makes computing them no dearer than the
walk; then it is E·P·g. Both give the same numbers to float rounding (tested), not to the bit.
``self_dot`` and ``rows`` always use E.

**The cache.** E of a checkpoint is kept in memory (when N·k numbers fit half the budget) and written
to the store as ``curvature/<name>/E`` (docs/store.md, "Curvature cache") when the store is a local
folder whose writer lock is free: the lock is taken, without waiting, for the write itself, which goes
to a temporary folder renamed into place, so a half-written cache is never seen and a run can never
start writing while it is written. A query on a cached checkpoint reads E (bit-identical to what was
computed) instead of walking the log. E of a checkpoint depends only on the log and trace before its
step, which a run never rewrites (a resume continues after its last checkpoint), so a cache stays valid
while the run grows; its name and attributes key it by run, step, log rows before it, spec and k.

Refused (``unavailable`` says why and what to use): stores without per-sample rows (``mode="replay"``),
distributed runs (a step's rows are in several log parts), optimizers whose rows are not the raw
injections (Adam/AdamW: ``OptimizerRule.curvature_rows``), exact stores that logged only a subset of
the samples (the curvature of a step needs every row of its batch), loss weights that are neither a
mean nor a sum, and ``"ggn"`` without an output bias.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
import weakref
from dataclasses import asdict
from typing import Iterator

import numpy as np
import torch

from .. import curvature as cv
from ..store import WriterLock, _create, missing_chunk, read_meta
from . import Progress, TestPoints, itemsize, positions
from .fast import FastSource

CACHE_GROUP = "curvature"
CACHE_VERSION = 1
_SAMPLE_ROWS = 4096  # log rows read (from each end of the log) to find the output bias
_REDUCTION_STEPS = 32  # steps (from each end of the run) whose loss weights say mean or sum
_STALE_TMP_S = 3600.0  # a temporary cache folder this old was left by a process that died while writing
_MEMORY_ENTRIES = 2  # checkpoints whose embeddings are kept in memory

# reader → {curvature option key: (spec, reason)}: unavailable() is asked often (the explorer's mode_for)
_SPECS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


# -- which estimate --------------------------------------------------------------------------------
def choose_spec(reader, curvature=None) -> tuple[cv.CurvatureSpec | None, str | None]:
    """(the estimate ``mode="curvature"`` uses on this store, None) or (None, why it has none and what to use).

    ``curvature``: None (pick: ``"ggn"`` where the log shows softmax cross-entropy with an output bias,
    else ``"fisher"`` without momentum), a kind of ``hydra_nb.curvature.CURVATURES``, or a ``CurvatureSpec``
    (used as given).
    """
    key = curvature if isinstance(curvature, (str, type(None))) else repr(curvature)
    cache = _SPECS.setdefault(reader, {})
    if key not in cache:
        cache[key] = _choose(reader, curvature)
    return cache[key]


def _choose(reader, curvature):
    refusal = _store_refusal(reader)
    if refusal is not None:
        return None, refusal
    if isinstance(curvature, cv.CurvatureSpec):
        return curvature, None
    if curvature is not None and curvature not in cv.CURVATURES:
        raise ValueError(f"curvature must be None (pick), one of {cv.CURVATURES} or a CurvatureSpec, got {curvature!r}.")
    reduction = batch_reduction(reader)
    if reduction is None:
        return None, ("the run's loss weights (its replay record) are neither a batch mean (1/|B|) nor a sum (1), "
                      "and the curvature estimate weighs each row by one of them. Ask with mode='fast', or for "
                      "exact answers with mode='exact' and train_data=...")
    bias = None
    if curvature in (None, "ggn"):
        bias = cv.find_output_bias(reader.meta["projection"], _sample_rows(reader))
    if curvature is None:
        if bias is not None:
            return cv.CurvatureSpec("ggn", batch_reduction=reduction, logit_bias=bias), None
        if not has_momentum(reader):
            return cv.CurvatureSpec("fisher", batch_reduction=reduction), None
        return None, ("mode='curvature' uses the 'ggn' estimate, which needs a softmax cross-entropy output layer "
                      "with a bias (its rows show p − y), and none was found in this log (another loss, label "
                      "smoothing, soft targets, or no output bias). Its alternative, the empirical Fisher, diverged "
                      "with momentum in every measured run (docs/curvature.md), and this run used momentum, so it "
                      "is not picked; ask for it with open_store(path, curvature='fisher'), or use mode='fast' (or "
                      "exact answers with mode='exact' and train_data=...).")
    if curvature == "ggn":
        if bias is None:
            return None, ("curvature='ggn' needs a softmax cross-entropy output layer with a bias whose rows show "
                          "p − y, and none was found in this log. Use curvature='fisher' (exact for −log of an "
                          "affine likelihood; it diverged with momentum in measured runs) or mode='fast'.")
        return cv.CurvatureSpec("ggn", batch_reduction=reduction, logit_bias=bias), None
    return cv.CurvatureSpec(curvature, batch_reduction=reduction), None


def _store_refusal(reader) -> str | None:
    """Why no curvature estimate can be made from this store's log whatever the estimate, or None."""
    if reader.mode == "replay":
        return ("This run was recorded with mode='replay': it holds no per-sample rows, so there is no curvature "
                "estimate. Ask for exact answers with mode='exact' and train_data=... (replaying the run), "
                "or add the rows: store.add_rows(model, train_data) replays the run once into a new fast-mode store.")
    if len(reader.log_parts) != 1:
        return (f"This is a distributed run whose log is in {len(reader.log_parts)} parts (one per rank); the "
                "curvature estimate needs every row of each step together, which hydra_nb does not merge yet. "
                "Ask with mode='fast'.")
    rule = reader.optimizer_rule
    if not rule.curvature_rows:
        return (f"The curvature estimate models SGD's recursion; this run used {rule.name}, whose logged rows are "
                "preconditioned by its D_t, which the store does not hold (docs/curvature.md, 'Adam/AdamW'). Ask "
                "with mode='fast', or for exact answers with mode='exact' and train_data=... (replay is exact for "
                f"{rule.name}).")
    if len(reader.tracked_indices) != reader.n_train:
        return (f"This exact-mode store logged rows only for its {len(reader.tracked_indices)} tracked samples of "
                f"{reader.n_train}; the curvature of each step needs every row of its batch. Ask with mode='exact' "
                "(its recorded exact answers) or mode='fast'.")
    if int(reader.meta["committed"]["rows"]) == 0 or reader.steps == 0:
        return "The store has no committed log rows yet, so there is no curvature to estimate. Ask with mode='fast'."
    return None


def batch_reduction(reader) -> str | None:
    """"mean" or "sum": how the loop weighed each row in its batch loss, from the replay record's weights c_b.

    A step is a mean when c_b·m_t = 1 for all its rows (m_t: its log rows; gradient accumulation over a
    mean included), a sum when every c_b = 1; the first and last ``_REDUCTION_STEPS`` steps are read.
    A store without the record (written before replay existed) is taken as a mean (the usual loop);
    None where the weights are neither.
    """
    if not all(f"replay/{n}" in reader.group for n in ("weight", "call_end", "step_end")):
        return "mean"
    committed = reader.meta["committed"]
    n_steps = min(reader.steps, int(committed.get("replay_step_end", 0)))
    if n_steps == 0:
        return "mean"
    step_end = reader.array("replay/step_end")
    call_end = reader.array("replay/call_end")
    weight = reader.array("replay/weight")
    row_end = reader.array(reader.log_parts[0]["row_end"])
    steps = sorted(set(range(min(_REDUCTION_STEPS, n_steps))) | set(range(max(0, n_steps - _REDUCTION_STEPS), n_steps)))
    found = set()
    for t in steps:
        c_lo = int(step_end[t - 1]) if t else 0
        c_hi = int(step_end[t])
        if c_hi == c_lo:
            continue
        r_lo = int(call_end[c_lo - 1]) if c_lo else 0
        r_hi = int(call_end[c_hi - 1])
        w = np.asarray(weight[r_lo:r_hi], dtype=np.float64)
        m = int(row_end[t]) - (int(row_end[t - 1]) if t else 0)
        if w.size == 0 or m == 0:
            continue
        mean = bool(np.all(np.abs(w * m - 1.0) <= 1e-6))
        total = bool(np.all(np.abs(w - 1.0) <= 1e-6))
        if mean and not total:
            found.add("mean")
        elif total and not mean:
            found.add("sum")
        elif not (mean or total):
            return None
    if len(found) > 1:
        return None
    return found.pop() if found else "mean"


def has_momentum(reader) -> bool:
    """Whether any step carries state from one step to the next (A_t's b → b entry nonzero: momentum)."""
    trace = reader.trace_arrays()
    rule = reader.optimizer_rule
    for lo in range(0, reader.steps, 4096):
        A, _ = rule.transitions({f: np.asarray(a[lo:min(lo + 4096, reader.steps)]) for f, a in trace.items()})
        if np.any(A[..., 1, 1] != 0):
            return True
    return False


def _sample_rows(reader) -> np.ndarray:
    """The first and last ``_SAMPLE_ROWS`` committed log rows (where find_output_bias looks for p − y)."""
    grad = reader.array(reader.log_parts[0]["grad"])
    n = int(reader.meta["committed"]["rows"])
    head = np.asarray(grad[:min(n, _SAMPLE_ROWS)])
    if n <= 2 * _SAMPLE_ROWS:
        return np.asarray(grad[:n])
    return np.concatenate([head, np.asarray(grad[n - _SAMPLE_ROWS:n])])


# -- the source ------------------------------------------------------------------------------------
class CurvatureSource(FastSource):
    """Hypergradients with an estimated curvature term, from the gradient log (see the module docstring).

    ``curvature``: which estimate (None: pick; ``choose_spec``). The spec in use is ``self.spec``.
    """

    mode = "curvature"
    store_options = ("curvature",)

    @classmethod
    def unavailable(cls, reader, curvature=None) -> str | None:
        return choose_spec(reader, curvature)[1]

    def __init__(self, reader, curvature=None):
        super().__init__(reader)
        spec, why = choose_spec(reader, curvature)
        if spec is None:
            raise ValueError(why)
        self.spec = spec
        self._memory: dict[int, torch.Tensor] = {}  # checkpoint index → E (n_tracked, k)

    # -- sizes ------------------------------------------------------------------------------
    @property
    def k(self) -> int:
        return self.reader.projector.dim

    def embedding_block(self, budget: int) -> int:
        """Samples whose embeddings are computed in one pass (and read or multiplied at a time): (block × k)
        numbers within a quarter of the budget."""
        return max(1, (budget // 4) // max(1, self.k * itemsize(self.dtype)))

    # -- the operations ---------------------------------------------------------------------
    def dot(self, tests: TestPoints, checkpoints, col, n_cols: int, *, budget: int,
            progress: Progress | None = None, engine: str = "numpy") -> np.ndarray:
        """The walk from the test side, or E·P·g where E is at hand or m ≥ k/2 · passes (``engine`` is ignored)."""
        cs = self.checkpoint_indices(checkpoints)
        col = self.check_col(col, n_cols)
        m = tests.n_vectors
        distinct = sorted(set(cs))
        passes = -(-len(self.tracked) // self.embedding_block(budget))
        by_e = [c for c in distinct if self._has_embeddings(c) or m >= max(1, self.k // 2) * passes]
        by_walk = [c for c in distinct if c not in by_e]
        steps = self.reader.checkpoint_steps
        tracked = self.tracked
        wanted = np.flatnonzero(col[tracked] >= 0)  # positions in tracked with a column
        walk_rows = self.block_rows(budget, (len(by_walk) * m + 1) * itemsize(self.dtype) + 64)
        top = int(max(steps[c] for c in by_walk)) if by_walk else 0
        plans = {c: self._plan(c, wanted, budget) for c in by_e}
        if progress is not None:
            progress.plan(len(distinct) * self.gradient_batches(len(tests)) + (self.log_blocks(top, walk_rows) if by_walk
                          else 0) + sum(self._embedding_work(c, wanted, budget, plans[c]) for c in by_e))
        tg = {c: self._test_side(tests, c, progress) for c in distinct}
        result: dict[int, np.ndarray] = {}
        if by_walk:
            walked = self._walk(torch.stack([tg[c] for c in by_walk]), [int(steps[c]) for c in by_walk], col, n_cols,
                                walk_rows, progress)
            for s, c in enumerate(by_walk):
                result[c] = walked[s].numpy()
        for c in by_e:
            acc = torch.zeros(n_cols, m, dtype=self.dtype)
            for sel, E in self._embeddings(c, wanted, budget, progress, plans[c]):
                acc.index_add_(0, torch.from_numpy(col[tracked[wanted[sel]]]), E @ tg[c].T)
            result[c] = acc.numpy()
        return np.stack([result[c] for c in cs])

    def self_dot(self, train: TestPoints, ids, checkpoint: int, *, budget: int,
                 progress: Progress | None = None) -> np.ndarray:
        """⟨E_i, P·∇ℓ_i(θ_S)⟩ for each sample, a block of embeddings and its samples' gradients at a time."""
        c = self.reader.checkpoint_index(checkpoint)
        uniq, inverse = np.unique(np.asarray(ids, dtype=np.int64).reshape(-1), return_inverse=True)
        pos = self._positions(uniq)
        plan = self._plan(c, pos, budget)
        if progress is not None:
            progress.plan(self._embedding_work(c, pos, budget, plan)
                          + sum(self.gradient_batches(len(sel)) for sel in plan[1] if len(sel)))
        out = np.empty(len(uniq), dtype=np.float64 if self.dtype == torch.float64 else np.float32)
        for sel, E in self._embeddings(c, pos, budget, progress, plan):
            pg = self.projected(train.take(uniq[sel]), c, self.dtype, progress)
            out[sel] = (E * pg).sum(1).numpy()
        return out[inverse.reshape(-1)]

    def rows(self, checkpoint: int, ids, *, budget: int, progress: Progress | None = None) -> np.ndarray:
        """E_i = h̃_S(i) (projected, k values) for each of ``ids``."""
        c = self.reader.checkpoint_index(checkpoint)
        idx = np.asarray(ids, dtype=np.int64).reshape(-1)
        uniq, inverse = np.unique(idx, return_inverse=True)
        pos = self._positions(uniq)
        plan = self._plan(c, pos, budget)
        if progress is not None:
            progress.plan(self._embedding_work(c, pos, budget, plan))
        out = torch.empty(len(uniq), self.k, dtype=self.dtype)
        for sel, E in self._embeddings(c, pos, budget, progress, plan):
            out[torch.from_numpy(sel)] = E
        return out.numpy()[inverse.reshape(-1)]

    # -- the walk (test side) ---------------------------------------------------------------
    def _walk(self, tests: torch.Tensor, stops, col, n_cols: int, block_rows: int, progress) -> torch.Tensor:
        """``curvature.walk`` over this store's log: (len(stops), n_cols, m)."""
        top = int(max(stops))
        planned = self.log_blocks(top, block_rows)
        done = [0]

        def tick():
            done[0] += 1
            if progress is not None:
                progress.update()

        out = cv.walk(tests, stops, cv.store_blocks(self.reader, top, block_rows), self.reader.trace_arrays(),
                      self.spans, self.spec, col, n_cols, transitions=self.transitions, progress=tick)
        if progress is not None and done[0] < planned:  # empty blocks are skipped without a tick
            progress.update(planned - done[0])
        return out

    def _positions(self, ids: np.ndarray) -> np.ndarray:
        """Positions in ``tracked`` of dataset indices ``ids`` (each must be tracked)."""
        pos = positions(self.tracked, self.n_train)[ids] if len(ids) else np.zeros(0, dtype=np.int64)
        if (pos < 0).any():
            raise ValueError(f"dataset indices {ids[pos < 0][:5].tolist()} were not tracked by this store.")
        return pos

    # -- embeddings: memory, the store's cache, or computed ---------------------------------
    def _has_embeddings(self, c: int) -> bool:
        return c in self._memory or self._cached(c) is not None

    def _plan(self, c: int, pos: np.ndarray, budget: int) -> tuple[str, list[np.ndarray], object]:
        """How ``_embeddings`` gets E of checkpoint c for the tracked positions ``pos``, the blocks (index arrays
        into ``pos``) it yields, in order, and E where it is at hand (held by the plan: computing another
        checkpoint's may drop it from memory meanwhile):

        * "memory", "cache": at hand; blocks of ``embedding_block`` samples;
        * "one": every tracked sample fits one pass: computed, kept in memory and cached; the same blocks;
        * "groups": one pass per group of ``embedding_block`` tracked samples, each written to the cache as it
          comes (the store allows writing); a block is ``pos`` ∩ the group;
        * "only": the cache cannot be written: one pass per block of ``pos`` alone, nothing kept.
        """
        B = self.embedding_block(budget)
        runs = [np.arange(a, min(a + B, len(pos))) for a in range(0, len(pos), B)]
        if c in self._memory:
            return "memory", runs, self._memory[c]
        if (cached := self._cached(c)) is not None:
            return "cache", runs, cached
        if len(self.tracked) <= B:
            return "one", runs, None
        if self._can_write():
            groups = [np.flatnonzero((pos >= a) & (pos < a + B)) for a in range(0, len(self.tracked), B)]
            return "groups", groups, None
        return "only", runs, None

    def _embedding_work(self, c: int, pos: np.ndarray, budget: int, plan=None) -> int:
        """Chunks of work (log blocks of the k-vector walks) ``_embeddings`` does for this plan: 0 if at hand."""
        how, blocks, _ = plan or self._plan(c, pos, budget)
        S = int(self.reader.checkpoint_steps[c])
        per_pass = self.log_blocks(S, self._embedding_rows(budget))
        passes = {"memory": 0, "cache": 0, "one": 1, "only": len(blocks),
                  "groups": -(-len(self.tracked) // self.embedding_block(budget))}[how]
        return passes * per_pass

    def _embedding_rows(self, budget: int) -> int:
        return self.block_rows(budget // 2, (self.k + 1) * itemsize(self.dtype) + 64)

    def _embeddings(self, c: int, pos: np.ndarray, budget: int, progress, plan=None
                    ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Yield (sel, E[pos[sel]]) for each block of ``plan`` (default ``_plan(c, pos, budget)``)."""
        how, blocks, E = plan or self._plan(c, pos, budget)
        S = int(self.reader.checkpoint_steps[c])
        block_rows = self._embedding_rows(budget)
        if how == "one":
            E = self._compute(S, np.arange(len(self.tracked)), block_rows, progress)
            self._remember(c, E)
            self._write_cache(c, [(0, E)])
            how = "memory"
        if how == "memory":
            for sel in blocks:
                yield sel, E[torch.from_numpy(pos[sel])]
        elif how == "cache":
            for sel in blocks:
                yield sel, self._read_cached(E, pos[sel])
        elif how == "only":
            for sel in blocks:
                yield sel, self._compute(S, pos[sel], block_rows, progress)
        else:  # "groups": every tracked sample, group by group, into the cache
            B = self.embedding_block(budget)
            writer = self._cache_writer(c)
            try:
                for a, sel in zip(range(0, len(self.tracked), B), blocks):
                    E = self._compute(S, np.arange(a, min(a + B, len(self.tracked))), block_rows, progress)
                    if writer is not None:
                        writer.write(a, E)
                    if len(sel):
                        yield sel, E[torch.from_numpy(pos[sel] - a)]
                if writer is not None:
                    writer.commit()
            finally:
                if writer is not None:
                    writer.close()

    def _compute(self, S: int, members: np.ndarray, block_rows: int, progress) -> torch.Tensor:
        """E (len(members), k) of the tracked positions ``members`` at step S: one walk with the k basis vectors
        (``curvature.embeddings``; every row still shapes each step's curvature)."""
        col = np.full(self.n_train, -1, dtype=np.int64)
        col[self.tracked[members]] = np.arange(len(members))
        eye = torch.eye(self.k, dtype=self.dtype)[None]
        return self._walk(eye, [S], col, len(members), block_rows, progress)[0]

    def _remember(self, c: int, E: torch.Tensor) -> None:
        self._memory[c] = E
        while len(self._memory) > _MEMORY_ENTRIES:
            self._memory.pop(next(iter(self._memory)))

    # -- the store's cache ------------------------------------------------------------------
    def cache_identity(self, c: int) -> dict:
        """What a cached E of checkpoint c must have been computed from (its group's attributes)."""
        S = int(self.reader.checkpoint_steps[c])
        spec = asdict(self.spec)
        spec["logit_bias"] = None if spec["logit_bias"] is None else [int(v) for v in spec["logit_bias"]]
        return {"version": CACHE_VERSION, "run_id": self.reader.meta["run_id"], "step": S,
                "log_rows": self.rows_before(S)[0], "n_train": int(self.n_train), "tracked": int(len(self.tracked)),
                "k": int(self.k), "dtype": str(np.dtype(np.float64 if self.dtype == torch.float64 else np.float32)),
                "spec": spec}

    def cache_name(self, c: int) -> str:
        """``v1-<kind>-step<S>-<16 hex digits of the identity's SHA-256>``: the cache group of checkpoint c."""
        import hashlib

        ident = self.cache_identity(c)
        digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
        return f"v{CACHE_VERSION}-{self.spec.kind}-step{ident['step']}-{digest}"

    def _cache_dir(self):
        return self.reader.path / CACHE_GROUP if self.reader.is_local else None

    def _cached(self, c: int):
        """The cached E array of checkpoint c (checked: identity, shape, dtype, every chunk present), or None."""
        root = self._cache_dir()
        if root is None:
            return None
        path = root / self.cache_name(c)
        if not (path / "zarr.json").is_file():
            return None
        try:
            import zarr

            g = zarr.open_group(str(path), mode="r")
            ident = g.attrs.asdict().get("hydra_nb_curvature")
            want = self.cache_identity(c)
            if json.dumps(ident, sort_keys=True) != json.dumps(want, sort_keys=True):
                return None
            E = g["E"]
            if tuple(E.shape) != (want["tracked"], want["k"]) or str(E.dtype) != want["dtype"]:
                return None
            if missing_chunk(E, E.shape[0]) is not None:
                return None
            return E
        except Exception:  # unreadable: computed again (and not overwritten)
            return None

    def _read_cached(self, E, pos: np.ndarray) -> torch.Tensor:
        if len(pos) and pos[-1] - pos[0] + 1 == len(pos) and (np.diff(pos) == 1).all():
            return torch.from_numpy(np.asarray(E[int(pos[0]):int(pos[-1]) + 1]))
        lo, hi = int(pos.min()), int(pos.max()) + 1
        return torch.from_numpy(np.asarray(E[lo:hi])[pos - lo])

    def _can_write(self) -> bool:
        """Whether a cache may be written: a local store folder nobody is writing (checked again under the lock)."""
        root = self._cache_dir()
        if root is None or not os.access(self.reader.path, os.W_OK):
            return False
        from ..store import lock_holder

        return lock_holder(self.reader.path) is None

    def _write_cache(self, c: int, parts) -> bool:
        """Write E of checkpoint c (given as [(first row, rows)]) to the store's cache; False if not allowed now."""
        if not self._can_write():
            return False
        writer = self._cache_writer(c)
        if writer is None:
            return False
        try:
            for start, E in parts:
                writer.write(start, E)
            return writer.commit()
        finally:
            writer.close()

    def _cache_writer(self, c: int) -> "_CacheWriter | None":
        return _CacheWriter.open(self, c) if self._can_write() else None


class _CacheWriter:
    """Writes one cached E into a temporary folder of ``curvature/`` and renames it into place.

    Every write (and the rename) holds the store's writer lock, taken without waiting: if a run holds
    it, or the store was replaced meanwhile, the write is abandoned and the temporary folder removed.
    """

    def __init__(self, source: CurvatureSource, c: int, tmp, final, ident: dict, arr):
        self.source, self.c, self.tmp, self.final, self.ident, self.arr = source, c, tmp, final, ident, arr
        self.ok = True

    @classmethod
    def open(cls, source: CurvatureSource, c: int) -> "_CacheWriter | None":
        import zarr

        root = source._cache_dir()
        ident = source.cache_identity(c)
        tmp = root / f".tmp-{uuid.uuid4().hex}"
        with _locked(source) as held:
            if not held:
                return None
            try:
                if not (root / "zarr.json").is_file():
                    g = zarr.open_group(str(root), mode="a")
                    g.attrs["hydra_nb_curvature"] = {"version": CACHE_VERSION,
                                                     "about": "cached curvature-aware embeddings; docs/store.md"}
                _remove_stale_tmp(root)
                g = zarr.open_group(str(tmp), mode="w")
                g.attrs["hydra_nb_curvature"] = ident
                n, k = ident["tracked"], ident["k"]
                rows = max(1, min(n, (1 << 20) // max(1, k * np.dtype(ident["dtype"]).itemsize)))
                arr = _create(g, "E", shape=(n, k), chunks=(rows, k), dtype=ident["dtype"],
                              dimension_names=["sample", "projected"], compressors=None)
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
                return None
        return cls(source, c, tmp, root / source.cache_name(c), ident, arr)

    def write(self, start: int, E: torch.Tensor) -> None:
        if not self.ok:
            return
        with _locked(self.source) as held:
            if not held or not self.tmp.is_dir():
                self.ok = False
                return
            try:
                self.arr[start:start + len(E)] = E.numpy()
            except OSError:
                self.ok = False

    def commit(self) -> bool:
        if not self.ok:
            return False
        with _locked(self.source) as held:
            if not held or not self.tmp.is_dir():
                self.ok = False
                return False
            try:
                os.rename(self.tmp, self.final)
            except OSError:  # another process cached the same embeddings first: theirs stays
                self.ok = False
                return False
        return True

    def close(self) -> None:
        """Remove the temporary folder if it was not renamed into place."""
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)


class _locked:
    """Hold the store's writer lock (taken without waiting) while it is still the store the source reads."""

    def __init__(self, source: CurvatureSource):
        self.source = source
        self.lock = WriterLock(source.reader.path)

    def __enter__(self) -> bool:
        if not self.lock.try_acquire(self.source.reader.meta["run_id"], "writing the curvature cache (a query)"):
            return False
        meta = read_meta(self.source.reader.path)
        if meta is None or meta.get("run_id") != self.source.reader.meta["run_id"]:
            return False  # replaced by another run since it was opened
        return True

    def __exit__(self, *exc):
        self.lock.release()
        return False


def _remove_stale_tmp(root) -> None:
    """Remove temporary cache folders left by processes that died while writing (older than an hour)."""
    now = time.time()
    for p in root.glob(".tmp-*"):
        try:
            if now - p.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass
