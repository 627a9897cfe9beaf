"""The dask engine of the fast source: the same dot products, computed by the active dask scheduler.

The log is opened with ``dask.array.from_zarr`` (``log/grad``, ``log/sample``, ``log/step`` in
chunks of whole zarr chunks or shards), one task per block of rows: the block's contribution
(:func:`.fast.contribution_block`), sparse over the training samples it holds, so what travels
back to the client is the size of a block, not of the result. Partials are summed as a tree
(local schedulers) or as they arrive (a ``dask.distributed.Client``: a cluster runs it). The
response coefficients of every block are computed on the client (the size of the trace) by the
same backward sweep as the numpy engine, and travel with the graph.
"""

from __future__ import annotations

import numpy as np
import torch

from . import Progress
from .fast import FastSource, contribution_block


def _dask_partial(rows, samples, steps, coef, coef_steps, tg, col, spans, stops):
    """One dask task: the contribution of one block of the log, sparse over training samples.

    Returns (columns, values (n_stops, len(columns), m)) for the columns the block's rows touch
    only: a block holds at most ``block_rows`` samples, so what travels back to the client is
    that big, not the whole (n_stops, n_cols, m) result.
    """
    samples = np.asarray(samples)
    target = col[samples]
    keep = target >= 0
    columns, position = _columns_of(target[keep], len(col))
    local = np.full(len(samples), len(columns), dtype=np.int64)  # rows of untracked samples -> the -1 entry
    local[keep] = position[target[keep]]
    local_col = np.append(np.arange(len(columns), dtype=np.int64), -1)
    tg_t = torch.from_numpy(tg)
    acc = torch.zeros(len(stops), len(columns), tg.shape[1], dtype=tg_t.dtype)
    contribution_block(acc, np.asarray(rows), local, np.asarray(steps), coef, coef_steps, tg_t, local_col,
                       spans, stops)
    return columns, acc.numpy()


def _columns_of(targets: np.ndarray, n_cols: int) -> tuple[np.ndarray, np.ndarray]:
    """The distinct columns among ``targets`` (sorted) and each column's position among them.

    A mask over all columns: O(n_cols) and several times faster than ``np.unique`` on a block's rows.
    """
    present = np.zeros(n_cols, dtype=bool)
    present[targets] = True
    columns = np.flatnonzero(present)
    position = np.full(n_cols, -1, dtype=np.int64)
    position[columns] = np.arange(len(columns))
    return columns, position


def _merge_partials(n_cols: int, *parts):
    """Sum sparse partials (columns, values) into one over the union of their columns."""
    columns, position = _columns_of(np.concatenate([c for c, _ in parts]), n_cols)
    out = np.zeros((parts[0][1].shape[0], len(columns), parts[0][1].shape[2]), dtype=parts[0][1].dtype)
    for c, v in parts:
        out[:, position[c], :] += v
    return columns, out


def _distributed_client():
    """The dask.distributed Client that ``dask.compute`` would use now, or None."""
    try:
        from dask.base import get_scheduler
        from distributed import Client
    except ImportError:
        return None
    sched = get_scheduler()
    owner = getattr(sched, "__self__", None)
    return owner if isinstance(owner, Client) else None


def dask_pass(source: FastSource, tg: torch.Tensor, stops: np.ndarray, col: np.ndarray, n_cols: int,
              block_rows: int, progress: Progress | None) -> np.ndarray:
    """values[s, c, r] = Σ_{rows: col[sample] = c, t < stops[s]} c_{t→stops[s]} ⊙ u · tg[s, r]: (n_stops, n_cols, m)."""
    import dask
    import dask.array as da
    from dask.base import tokenize

    reader = source.reader
    n_stops, m = tg.shape[0], tg.shape[1]
    np_dtype = np.float64 if tg.dtype == torch.float64 else np.float32
    top = int(stops.max()) if stops.size else 0
    ends = source.rows_before(top)
    if sum(ends) <= 0:
        return np.zeros((n_stops, n_cols, m), dtype=np_dtype)
    loc = str(reader.path)  # a local folder or the fsspec URL the store was opened with
    spans = source.spans
    tg_d = dask.delayed(tg.numpy(), pure=True)
    col_d = dask.delayed(col, pure=True)
    token = tokenize(loc, ends, block_rows, tg.numpy(), col, stops)
    tasks = []
    for p, (part, end) in enumerate(zip(reader.log_parts, ends)):
        if end <= 0:
            continue
        for name in ("sample", "step"):
            reader.array(part[name])  # committed chunks present (zarr would read missing ones as zeros)
        k = reader.array(part["grad"]).shape[1]
        grad = da.from_zarr(loc, component=part["grad"], chunks=(block_rows, k))[:end]
        sample = da.from_zarr(loc, component=part["sample"], chunks=(block_rows,))[:end]
        step = da.from_zarr(loc, component=part["step"], chunks=(block_rows,))[:end]
        g_blocks, s_blocks, t_blocks = grad.to_delayed().ravel(), sample.to_delayed().ravel(), step.to_delayed().ravel()
        # step range of each block, from row_end (rows of step t are row_end[t-1]:row_end[t])
        row_end = np.asarray(reader.array(part["row_end"])[:top])
        bounds = np.cumsum((0,) + grad.chunks[0])
        sweep = source.sweep(stops)
        part_tasks = [None] * len(g_blocks)
        for b in range(len(g_blocks) - 1, -1, -1):  # last block first: the sweep runs backwards
            lo = int(np.searchsorted(row_end, bounds[b], side="right"))
            hi = int(np.searchsorted(row_end, bounds[b + 1] - 1, side="right")) + 1
            coef_steps = np.arange(lo, hi, dtype=np.int64)
            coef = sweep.at(coef_steps)
            part_tasks[b] = dask.delayed(_dask_partial, pure=True)(
                g_blocks[b], s_blocks[b], t_blocks[b], coef, coef_steps, tg_d, col_d, spans, stops,
                dask_key_name=f"hydra_nb-block-{token}-{p}-{b}")
        tasks += part_tasks
    client = _distributed_client()
    if client is not None:  # sum partials as they arrive: memory 2 × result on the client
        from distributed import as_completed

        total = np.zeros((n_stops, n_cols, m), dtype=np_dtype)
        for fut in as_completed(client.compute(tasks)):
            columns, values = fut.result()
            total[:, columns, :] += values
            fut.release()
            if progress is not None:
                progress.update()
        return total
    level = tasks  # a tree of sums, four partials at a time (at most ~5 partials in memory per worker)
    while len(level) > 1:
        level = [dask.delayed(_merge_partials, pure=True)(n_cols, *level[i:i + 4]) for i in range(0, len(level), 4)]
    from dask.callbacks import Callback

    prefix = f"hydra_nb-block-{token}-"
    done_before = progress.done if progress is not None else 0

    class _Count(Callback):  # local schedulers only (distributed is handled above)
        def _posttask(self, key, result, dsk, state, worker_id):
            if progress is not None and isinstance(key, str) and key.startswith(prefix):
                progress.update()

    with _Count():
        ((columns, values),) = dask.compute(level[0], optimize_graph=False)
    if progress is not None and progress.done < done_before + len(tasks):
        progress.update(done_before + len(tasks) - progress.done)
    total = np.zeros((n_stops, n_cols, m), dtype=np_dtype)
    total[:, columns, :] = values
    return total
