"""The fast source: h from the per-sample gradient log and the Hessian-free recursion.

At a checkpoint with S completed steps, the hypergradient of sample i is

    h_S(i) = Σ_{rows r of sample i, step t_r < S} c_{t_r→S} ⊙ u_r

per parameter block: u_r are the stored projected gradients (``log/grad``) and c_{t→S} the
response, at step S, of the recursion (h, b) ← A_t·(h, b) + e_t·u to a unit injection at step t
(A_t, e_t from the optimizer trace by ``transitions``, see docs/optimizers.md). So with P·g the
projected test gradient,

    dot:       ⟨P·g_r(θ_S), h_S(i)⟩ = Σ_{rows r of i} c_{t_r→S} · ⟨u_r, P·g_r⟩   (per block)
    self_dot:  the same with sample i's own projected gradient
    rows:      h_S(i) itself (projected, k values)

Bounded memory. An operation never holds the log, the trace or the coefficients of the whole run.
It streams the log in blocks of whole zarr chunks, **last block first**, so that the response
coefficients can be computed by the backward recursion in the same order, one block's steps at a
time (:class:`CoefficientSweep`; the recursion state is one 2-vector per stop and parameter). Per
block it holds the rows (twice: one block is read ahead in a thread while the other is
multiplied), the scores (rows × test vectors) and the block's coefficients. Block sizes follow the
budget (:meth:`FastSource.block_rows`: about three copies of a block's rows and its per-row extras
within half the budget, at most 32 MiB of rows). What does grow: the result itself, the test side
(m projected gradients per checkpoint) and index maps of 8 bytes per training sample.

Engines. ``engine="numpy"`` runs in this process with torch matrix products; ``engine="dask"``
builds the same computation on ``dask.array.from_zarr`` views of the log (:mod:`.fast_dask`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch

from . import HypergradientSource, Progress, TestPoints, itemsize, positions

_MAX_BLOCK_BYTES = 32 << 20  # rows per log block: big enough to amortise, small enough to overlap reads
_TRACE_BLOCK = 4096  # steps of the trace read at a time by the coefficient sweep
_SEGMENT_BYTES = 16 << 20  # the sweep's temporaries (stops × steps × parameters) stay below this


class FastSource(HypergradientSource):
    """Hypergradients from the gradient log (any store: on an exact store, the estimate for its tracked samples).

    ``transitions(trace) -> (A, e)``: the optimizer's fast-recursion transitions, which the
    coefficient sweep runs backwards (default: the store's optimizer rule's, ``OptimizerRule.transitions``).
    """

    mode = "fast"

    @classmethod
    def unavailable(cls, reader) -> str | None:
        if reader.mode == "replay":
            return ("This run was recorded with mode='replay': it holds no per-sample rows, so there is no fast estimate. "
                    "Ask for exact answers with mode='exact' and train_data=... (replaying the run), "
                    "or add the rows: store.add_rows(model, train_data) replays the run once into a new fast-mode store.")
        return None

    def __init__(self, reader, transitions: Callable | None = None):
        super().__init__(reader)
        self.transitions = reader.optimizer_rule.transitions if transitions is None else transitions
        wide = np.dtype(reader.group[reader.log_parts[0]["grad"]].dtype) == np.float64 or \
            np.dtype(reader.group["checkpoints/params"].dtype) == np.float64
        self.dtype = torch.float64 if wide else torch.float32  # compute dtype: float64 if the log or θ is

    # -- sizes ------------------------------------------------------------------------------
    @property
    def spans(self) -> list[tuple[int, int]]:
        """(start, stop) of each parameter block in a projected row."""
        return [(b.offset, b.stop) for b in self.reader.projector.blocks]

    def block_rows(self, budget: int, extra_per_row: int) -> int:
        """Log rows per block: whole chunks (or shards), ~3 row copies + ``extra_per_row`` bytes within half ``budget``."""
        grad = self.reader.group[self.reader.log_parts[0]["grad"]]
        unit = int((getattr(grad, "shards", None) or grad.chunks)[0])
        row_bytes = grad.shape[1] * np.dtype(grad.dtype).itemsize
        rows = min((budget // 2) // (3 * row_bytes + extra_per_row), _MAX_BLOCK_BYTES // max(row_bytes, 1))
        return max(unit, (rows // unit) * unit)

    def rows_before(self, step: int) -> list[int]:
        """Number of log rows of steps < ``step``, per log part (one per rank of a distributed run)."""
        return [int(self.reader.array(part["row_end"])[step - 1]) if step > 0 else 0 for part in self.reader.log_parts]

    def log_blocks(self, step: int, block_rows: int) -> int:
        """Blocks of ``block_rows`` a pass over the log of steps < ``step`` reads."""
        return sum(-(-end // block_rows) if end > 0 else 0 for end in self.rows_before(step))

    def sweep(self, stops) -> "CoefficientSweep":
        """Response coefficients to the ``stops`` (steps), for steps asked in descending order."""
        return CoefficientSweep(self.reader.trace_arrays(), stops, self.transitions)

    # -- the test side ----------------------------------------------------------------------
    def projected(self, points: TestPoints, c: int, dtype: torch.dtype, progress: Progress | None) -> torch.Tensor:
        """P·∇θ L(z_j; θ_c), (n, k) in ``dtype``; full gradients exist one batch at a time."""
        projector = self.reader.projector.to(dtype=dtype)
        out = torch.empty(len(points), projector.dim, dtype=dtype)
        start = 0
        for G in self.gradients(points, c):
            out[start:start + len(G)] = projector.project_flat(G.to(dtype))
            start += len(G)
            if progress is not None:
                progress.update()
        return out

    def _test_side(self, tests: TestPoints, c: int, progress: Progress | None) -> torch.Tensor:
        """The m projected test vectors at checkpoint c: P·g_r (weights are applied in float64, then rounded)."""
        if tests.weights is None:
            return self.projected(tests, c, self.dtype, progress)
        return (tests.weights @ self.projected(tests, c, torch.float64, progress)).to(self.dtype)

    # -- the operations ---------------------------------------------------------------------
    def dot(self, tests: TestPoints, checkpoints, col, n_cols: int, *, budget: int,
            progress: Progress | None = None, engine: str = "numpy") -> np.ndarray:
        cs = self.checkpoint_indices(checkpoints)
        col = self.check_col(col, n_cols)
        stops = np.asarray(self.reader.checkpoint_steps[cs], dtype=np.int64)
        block_rows = self.block_rows(budget, 2 * tests.n_vectors * itemsize(self.dtype) + 64 * len(cs))
        if progress is not None:
            progress.plan(len(cs) * self.gradient_batches(len(tests)) + self.log_blocks(int(stops.max()), block_rows))
        tg = torch.stack([self._test_side(tests, c, progress) for c in cs])
        if engine == "dask":
            from .fast_dask import dask_pass

            return dask_pass(self, tg, stops, col, n_cols, block_rows, progress)
        acc = torch.zeros(len(stops), n_cols, tg.shape[1], dtype=tg.dtype)
        spans = self.spans

        def kernel(rows, samples, steps, coef, coef_steps):
            contribution_block(acc, rows, samples, steps, coef, coef_steps, tg, col, spans, stops)

        self.log_pass(stops, block_rows, kernel, progress)
        return acc.numpy()

    def self_dot(self, train: TestPoints, ids, checkpoint: int, *, budget: int,
                 progress: Progress | None = None) -> np.ndarray:
        """Blocks of samples whose projected gradients (block × k) fit a quarter of the budget, one pass
        over the log per block (⌈N·k·4 / (budget/2)⌉ passes, one for N·k·4 ≤ budget/2)."""
        c = self.reader.checkpoint_index(checkpoint)
        uniq, inverse = np.unique(np.asarray(ids, dtype=np.int64).reshape(-1), return_inverse=True)
        k, size = self.reader.projector.dim, itemsize(self.dtype)
        S = int(self.reader.checkpoint_steps[c])
        block = max(1, min(len(uniq), (budget // 2) // max(1, 2 * k * size)))
        starts = range(0, len(uniq), block)
        block_rows = self.block_rows(budget // 2, 2 * k * size + 64)
        if progress is not None:
            progress.plan(sum(self.gradient_batches(len(uniq[a:a + block])) for a in starts)
                          + len(starts) * self.log_blocks(S, block_rows))
        spans = self.spans
        out = np.empty(len(uniq), dtype=np.float64 if self.dtype == torch.float64 else np.float32)
        for a in starts:
            block_ids = uniq[a:a + block]
            pg = self.projected(train.take(block_ids), c, self.dtype, progress)
            acc = torch.zeros(len(block_ids), dtype=self.dtype)

            def kernel(rows, samples, steps, coef, coef_steps):
                self_block(acc, rows, samples, steps, coef, coef_steps, block_ids, pg, spans)

            self.log_pass(np.asarray([S]), block_rows, kernel, progress)
            out[a:a + len(block_ids)] = acc.numpy()
        return out[inverse.reshape(-1)]

    def rows(self, checkpoint: int, ids, *, budget: int, progress: Progress | None = None) -> np.ndarray:
        c = self.reader.checkpoint_index(checkpoint)
        idx = np.asarray(ids, dtype=np.int64).reshape(-1)
        uniq, inverse = np.unique(idx, return_inverse=True)
        S = int(self.reader.checkpoint_steps[c])
        col = positions(uniq, self.n_train)
        out = torch.zeros(len(uniq), self.reader.projector.dim, dtype=self.dtype)
        spans = self.spans
        block_rows = self.block_rows(budget, 64)

        def kernel(rows, samples, steps, coef, coef_steps):
            hypergradient_block(out, rows, samples, steps, coef, coef_steps, col, spans)

        if progress is not None:
            progress.plan(self.log_blocks(S, block_rows))
        self.log_pass(np.asarray([S]), block_rows, kernel, progress)
        same = len(uniq) == len(idx) and bool((uniq == idx).all())
        return out.numpy() if same else out.numpy()[inverse.reshape(-1)]

    # -- the log pass -----------------------------------------------------------------------
    def log_pass(self, stops: np.ndarray, block_rows: int, kernel, progress: Progress | None) -> None:
        """kernel(rows, samples, steps, coef, coef_steps) for each block of log rows of steps < max(stops).

        Each log part (one per rank of a distributed run; one otherwise) is read last block first, so
        that the response coefficients are computed by one backward sweep per part; ``coef``
        (n_stops, len(coef_steps), P) are those at the block's distinct steps. The next block is read
        in a background thread (into the other of two buffers) while the kernel runs; ``rows`` is
        only valid during the kernel call.
        """
        stops = np.asarray(stops, dtype=np.int64).reshape(-1)
        top = int(stops.max()) if stops.size else 0
        for part, end in zip(self.reader.log_parts, self.rows_before(top)):
            if end > 0:
                self._log_pass_part(part, stops, end, block_rows, kernel, progress)

    def _log_pass_part(self, part: dict, stops: np.ndarray, end: int, block_rows: int, kernel,
                       progress: Progress | None) -> None:
        arrays = (self.reader.array(part["sample"]), self.reader.array(part["step"]), self.reader.array(part["grad"]))
        grad = arrays[2]
        files = ChunkFiles.of(grad)
        sweep = self.sweep(stops)
        starts = list(range(0, end, block_rows))[::-1]
        n = min(block_rows, end)
        buffers = [np.empty((n, grad.shape[1]), dtype=np.dtype(grad.dtype)) for _ in range(min(2, len(starts)))]
        with ThreadPoolExecutor(1, thread_name_prefix="hydra_nb-read") as pool:
            pending = pool.submit(_read_block, arrays, starts[0], min(starts[0] + block_rows, end), buffers[0], files)
            for i, start in enumerate(starts):
                samples, steps, rows = pending.result()
                if i + 1 < len(starts):
                    nxt = starts[i + 1]
                    pending = pool.submit(_read_block, arrays, nxt, min(nxt + block_rows, end), buffers[(i + 1) % 2],
                                          files)
                if len(steps):
                    coef_steps = np.unique(steps)
                    kernel(rows, samples, steps, sweep.at(coef_steps), coef_steps)
                if progress is not None:
                    progress.update()


def _read_block(arrays, start: int, stop: int, buffer: np.ndarray | None, files: "ChunkFiles | None" = None):
    """Log rows [start, stop): samples, steps, and the gradient rows (read into ``buffer`` if given).

    Reading into a reused buffer instead of a fresh array spares the page faults and zero-filling
    of a new 32 MB allocation per block, a sizeable share of a read from the page cache; with
    ``files`` (uncompressed chunks in a local folder) the rows are read straight from the chunk
    files into it. Should that fail for any reason, the store's checked read runs instead (a
    damaged chunk is then a ``StoreError`` naming the store).
    """
    sample, step, grad = arrays
    samples, steps = np.asarray(sample[start:stop]), np.asarray(step[start:stop])
    if buffer is not None:
        rows = buffer[: stop - start]
        if files is not None and files.read(start, stop, rows):
            return samples, steps, rows
        try:
            from zarr.core.buffer import default_buffer_prototype

            grad.get_basic_selection(slice(start, stop), out=default_buffer_prototype().nd_buffer.from_numpy_array(rows))
            return samples, steps, rows
        except Exception:
            pass
    return samples, steps, np.asarray(grad[start:stop])


class ChunkFiles:
    """Rows of an uncompressed 2-D log array, read straight from its chunk files into the caller's buffer.

    The gradient log is stored without compression (``StoreWriter.create``): each chunk file of a
    local store holds its rows as raw little-endian values, so reading rows is one ``readinto``
    per chunk, without zarr's per-chunk codec pipeline and its copy (measured on a 1.1 GiB log
    from the page cache: 0.2 s instead of 1.1 s; the raw zarr read the query benchmark compares
    with is the latter). Used only where the array's metadata says exactly that layout (zarr v3,
    a bytes codec alone, native byte order, one chunk across the columns, a local folder); and a
    chunk that cannot be read whole falls back to the zarr read (whose errors name the store).
    """

    def __init__(self, root, arr):
        self.root = root
        self.arr = arr
        self.chunk_rows = int(arr.chunks[0])
        self.row_bytes = int(arr.shape[1]) * np.dtype(arr.dtype).itemsize

    @classmethod
    def of(cls, arr) -> "ChunkFiles | None":
        """The reader of ``arr`` (a zarr array, or one wrapped by the store's checked reads), or None."""
        try:
            import sys

            from zarr.codecs import BytesCodec
            from zarr.storage import LocalStore

            md = arr.metadata
            codecs = md.codecs
            ok = (isinstance(arr.store, LocalStore) and md.zarr_format == 3 and len(codecs) == 1
                  and isinstance(codecs[0], BytesCodec)
                  and (codecs[0].endian is None or codecs[0].endian.value == sys.byteorder)
                  and len(arr.shape) == 2 and int(arr.chunks[1]) == int(arr.shape[1])
                  and np.dtype(arr.dtype).isnative and np.dtype(arr.dtype).kind == "f")
            return cls(arr.store.root, arr) if ok else None
        except Exception:
            return None

    def read(self, start: int, stop: int, out: np.ndarray) -> bool:
        """Rows [start, stop) into ``out`` (C-contiguous, stop − start rows); False if any chunk fell short."""
        view = memoryview(out).cast("B")
        R, width = self.chunk_rows, self.row_bytes
        path = self.arr.path
        try:
            for c in range(start // R, (stop - 1) // R + 1):
                lo, hi = max(start, c * R), min(stop, (c + 1) * R)
                key = self.arr.metadata.encode_chunk_key((c, 0))
                with open(self.root / path / key, "rb", buffering=0) as f:
                    f.seek((lo - c * R) * width)
                    target = view[(lo - start) * width:(hi - start) * width]
                    got = 0
                    while got < len(target):
                        n = f.readinto(target[got:])
                        if not n:
                            return False
                        got += n
        except OSError:
            return False
        return True


# -- response coefficients, block by block ------------------------------------------------------
class CoefficientSweep:
    """c[s, t, p] = response of parameter p's h at step ``stops[s]`` to a unit injection at step t.

    The same numbers as ``hypergrad.response_coefficients(trace, stops, rule)``, computed by the
    backward recursion ρ_t = ρ_{t+1}·A_t, c_t = ρ_{t+1}·e_t (ρ_S = [1, 0]) for the steps asked
    for, in descending order, reading the trace ``_TRACE_BLOCK`` steps at a time: memory is the
    state ρ (n_stops × P × 2), one segment's temporaries (< ``_SEGMENT_BYTES``) and the answer,
    never the whole trace. Asking for steps above the last ones asked for (other than the last
    step itself) restarts from the top.
    """

    def __init__(self, arrays, stops, transitions: Callable):
        """``arrays``: field name → the trace array (anything sliceable: zarr, checked store arrays, numpy).
        ``transitions(trace window) -> (A (T, P, 2, 2), e (T, P, 2))``: the optimizer's recursion."""
        self.arrays = dict(arrays)
        self.transitions = transitions
        stops = np.asarray(stops, dtype=np.int64).reshape(-1)
        self.order = np.argsort(stops, kind="stable")
        self.sorted = stops[self.order]
        self.P = int(next(iter(self.arrays.values())).shape[1])
        self._reset()

    def _reset(self) -> None:
        n = len(self.sorted)
        self.top = int(self.sorted[-1]) if n else 0
        self.pos = self.top  # ρ describes steps ≥ pos
        self.rho = np.zeros((n, self.P, 2))
        self.rho[..., 0] = 1.0
        self.kept_step, self.kept = None, None  # coefficients at step ``pos`` (shared by adjacent blocks)
        self._window = None

    def _trace(self, lo: int, hi: int) -> dict[str, np.ndarray]:
        """Trace rows [lo, hi), from a cached window of ``_TRACE_BLOCK`` steps ending at ``hi``.

        Adjacent log blocks share most of a window, so the trace is read once per window, not
        once per block (each zarr read waits behind the read-ahead of log rows).
        """
        w = self._window
        if w is None or not (w[0] <= lo and hi <= w[1]):
            wlo = max(0, min(lo, hi - _TRACE_BLOCK))
            w = self._window = (wlo, hi, {f: np.asarray(a[wlo:hi]) for f, a in self.arrays.items()})
        return {f: v[lo - w[0]:hi - w[0]] for f, v in w[2].items()}

    def _segment(self, lo: int, hi: int, f: int) -> np.ndarray:
        """Coefficients of live stops ``sorted[f:]`` at steps hi-1 … lo (that order), advancing ρ to step lo.

        With B_j = A_{hi-1-j}, ρ_{hi-1-j} = ρ_hi·B_0···B_j: the prefix products come from a
        doubling (Hillis–Steele) scan, log2(hi - lo) batched 2×2 products instead of a loop
        over steps.
        """
        A, e = self.transitions(self._trace(lo, hi))
        Q, e = A[::-1].copy(), e[::-1]  # index j ↔ step hi-1-j
        d = 1
        while d < len(Q):
            Q[d:] = np.matmul(Q[:-d], Q[d:])
            d *= 2
        rho = self.rho[f:]  # (m, P, 2): ρ_hi of the live stops
        before = np.empty((len(rho), len(Q)) + rho.shape[1:])  # ρ_{t+1} for each step t
        before[:, 0] = rho
        before[:, 1:] = np.einsum("mpk,jpkl->mjpl", rho, Q[:-1])
        self.rho[f:] = np.einsum("mpk,pkl->mpl", rho, Q[-1])
        return np.einsum("mjpk,jpk->mjp", before, e)

    def at(self, steps: np.ndarray) -> np.ndarray:
        """Coefficients (n_stops, len(steps), P) at ``steps`` (ascending, unique), in the caller's stop order."""
        steps = np.asarray(steps, dtype=np.int64)
        n = len(self.sorted)
        out = np.zeros((n, len(steps), self.P))
        valid = steps < self.top
        if not valid.any():
            return out
        want = steps[valid]
        if want[-1] >= self.pos and not (want[-1] == self.kept_step and (len(want) == 1 or want[-2] < self.pos)):
            self._reset()
        res = np.zeros((n, len(want), self.P))
        j = len(want) - 1
        if self.kept_step is not None and want[j] == self.kept_step:
            res[:, j] = self.kept
            j -= 1
        lo = int(want[0])
        cur = self.pos
        while cur > lo:
            f = int(np.searchsorted(self.sorted, cur - 1, side="right"))  # stops ≥ cur are live below cur
            span = max(1, min(_TRACE_BLOCK, _SEGMENT_BYTES // (32 * (n - f) * max(self.P, 1))))
            seg_lo = max(lo, cur - span, int(self.sorted[f - 1]) if f > 0 else lo)
            coef = self._segment(seg_lo, cur, f)  # (n - f, cur - seg_lo, P), step cur-1 first
            sel = (want >= seg_lo) & (want < cur)
            res[f:, sel] = coef[:, cur - 1 - want[sel]]
            cur = seg_lo
        self.pos = lo
        self.kept_step, self.kept = lo, res[:, 0].copy()
        out[:, valid] = res
        result = np.empty_like(out)
        result[self.order] = out
        return result


def coefficient_groups(coef: np.ndarray, spans: list[tuple[int, int]]) -> list[tuple[int, list[slice]]]:
    """Parameter blocks whose coefficients are identical on this block of rows, merged.

    Returns [(a parameter index of the group, [slices of the projected vector])]: one matrix
    product per group instead of one per parameter (usually a single group: all parameters share
    their optimizer hyperparameters).
    """
    P = coef.shape[-1]
    flat = np.ascontiguousarray(coef.reshape(-1, P).T)
    _, first, inverse = np.unique(flat, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    groups = []
    for g in range(len(first)):
        members = np.nonzero(inverse == g)[0]
        slices: list[slice] = []
        for p in members:
            a, b = spans[p]
            if b <= a:
                continue
            if slices and slices[-1].stop == a:
                slices[-1] = slice(slices[-1].start, b)
            else:
                slices.append(slice(a, b))
        if slices:
            groups.append((int(members[0]), slices))
    return groups


# -- block kernels (shared by the numpy and dask engines) ---------------------------------------
def _rows_tensor(rows: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    t = torch.from_numpy(rows)
    return t if t.dtype == dtype else t.to(dtype)


def contribution_block(acc: torch.Tensor, rows, samples, steps, coef, coef_steps, tg: torch.Tensor,
                       col: np.ndarray, spans, stops) -> None:
    """acc[s, col[sample_r]] += c_{t_r→stops[s]}(u_r) · tg[s] for the block's rows (rows of steps < stops[s]).

    ``tg`` (n_stops, m, k): the projected test vectors at each stop; ``acc`` (n_stops, n_cols, m).
    """
    target = col[samples]
    keep = target >= 0
    if not keep.all():
        rows, steps, target = rows[keep], steps[keep], target[keep]
    if len(target) == 0:
        return
    u = _rows_tensor(rows, tg.dtype)
    which = np.searchsorted(coef_steps, steps)
    groups = coefficient_groups(coef, spans)
    for s in range(len(stops)):
        live = steps < stops[s]
        if not live.any():
            continue
        if live.all():
            us, ws, ts = u, which, target
        else:
            lt = torch.from_numpy(live)
            us, ws, ts = u[lt], which[live], target[live]
        scores = None
        for p, slices in groups:
            m = None
            for sl in slices:
                part = us[:, sl] @ tg[s][:, sl].T
                m = part if m is None else m.add_(part)
            m.mul_(torch.from_numpy(coef[s, ws, p]).to(m.dtype)[:, None])
            scores = m if scores is None else scores.add_(m)
        acc[s].index_add_(0, torch.from_numpy(ts), scores)


def self_block(acc: torch.Tensor, rows, samples, steps, coef, coef_steps, ids: np.ndarray, pg: torch.Tensor,
               spans) -> None:
    """acc[a] += Σ_{rows r of ids[a]} c_{t_r→S}(u_r) · pg[a]: each sample's rows against its own gradient (ids sorted)."""
    local = np.searchsorted(ids, samples)
    local_c = np.minimum(local, len(ids) - 1)
    keep = ids[local_c] == samples
    if not keep.any():
        return
    rows, steps, local = rows[keep], steps[keep], local_c[keep]
    u = _rows_tensor(rows, pg.dtype)
    lt = torch.from_numpy(local)
    g = pg[lt]
    which = np.searchsorted(coef_steps, steps)
    score = torch.zeros(len(local), dtype=pg.dtype)
    for p, slices in coefficient_groups(coef, spans):
        d = sum((u[:, sl] * g[:, sl]).sum(1) for sl in slices)
        score += d * torch.from_numpy(coef[0, which, p]).to(pg.dtype)
    acc.index_add_(0, lt, score)


def hypergradient_block(out: torch.Tensor, rows, samples, steps, coef, coef_steps, col: np.ndarray, spans) -> None:
    """out[col[sample_r]] += c_{t_r→S} ⊙ u_r."""
    target = col[samples]
    keep = target >= 0
    if not keep.any():
        return
    u = torch.from_numpy(rows[keep]).to(out.dtype)  # a copy: scaled in place below
    which = np.searchsorted(coef_steps, steps[keep])
    for p, slices in coefficient_groups(coef, spans):
        scale = torch.from_numpy(coef[0, which, p]).to(out.dtype)[:, None]
        for sl in slices:
            u[:, sl] *= scale
    out.index_add_(0, torch.from_numpy(target[keep]), u)
