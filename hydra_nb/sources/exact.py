"""The exact source: the full-dimensional h_S(i) = dθ_S/dw_i an exact run stored in ``exact/h``.

``exact/h`` (checkpoint, sample, parameter) holds h at every checkpoint for the tracked samples
``exact/indices`` (the forward recursion with Hessian-vector products, ``hypergrad.ExactHypergradients``).
The operations are plain products with the full test gradients g = ∇θ L(z; θ_S):

    dot:       out[s, c, r] = Σ_{i: col[i] = c} ⟨g_r, h_S(i)⟩      (blocks of h rows × batches of g)
    self_dot:  out[a] = ⟨∇θ L(z_{ids[a]}), h_S(ids[a])⟩
    rows:      h_S(ids[a]) read as stored

Memory: h is read in blocks of rows of about a quarter of the budget (as float64), test gradients
a batch at a time (or, with weights, the m summed vectors, held in float64).
``engine="dask"`` multiplies ``dask.array.from_zarr(exact/h)`` by each batch of test gradients.
"""

from __future__ import annotations

import numpy as np
import torch

from . import HypergradientSource, Progress, TestPoints, itemsize, positions


class ExactSource(HypergradientSource):
    """Hypergradients read from an exact run's ``exact/h``."""

    mode = "exact"

    @classmethod
    def unavailable(cls, reader) -> str | None:
        if reader.mode != "exact":
            return (f"This store was tracked in {reader.mode} mode; exact hypergradients need a run tracked with "
                    f"mode='exact'. Ask with mode='{reader.mode}' (or None) here.")
        return None

    def __init__(self, reader):
        super().__init__(reader)
        wide = np.dtype(reader.group["checkpoints/params"].dtype) == np.float64
        self.dtype = torch.float64 if wide else torch.float32

    def _h_blocks(self, slots: np.ndarray, budget: int) -> list[np.ndarray]:
        D = self.reader.layout.size
        hrows = max(1, (budget // 4) // max(1, D * 8))
        return [slots[a:a + hrows] for a in range(0, len(slots), hrows)]

    def _read(self, c: int, slots: np.ndarray) -> torch.Tensor:
        """exact/h[c, slots]: one contiguous read when the slots are a run, else an orthogonal selection."""
        h = self.reader.array("exact/h")
        if len(slots) and slots[-1] - slots[0] + 1 == len(slots) and (np.diff(slots) == 1).all():
            return torch.from_numpy(np.asarray(h[c, int(slots[0]):int(slots[-1]) + 1]))
        return torch.from_numpy(take_rows(h, c, slots))

    def _slots(self, ids) -> np.ndarray:
        """Rows of exact/h holding the dataset indices ``ids`` (each must be tracked)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        pos = positions(self.tracked, self.n_train)
        slots = pos[ids]
        if (slots < 0).any():
            raise ValueError(f"dataset indices {ids[slots < 0][:5].tolist()} were not tracked by this exact run "
                             "(see store.tracked_indices).")
        return slots

    # -- the operations ---------------------------------------------------------------------
    def dot(self, tests: TestPoints, checkpoints, col, n_cols: int, *, budget: int,
            progress: Progress | None = None, engine: str = "numpy") -> np.ndarray:
        """Without weights: per batch of test gradients G and per block of h rows, G·hᵀ (``engine="dask"``:
        the whole h at the checkpoint times G, by dask). With weights: the m summed vectors in float64
        first, then each block of h rows against them (the result is float64)."""
        cs = self.checkpoint_indices(checkpoints)
        col = self.check_col(col, n_cols)
        target = col[self.tracked]  # the column of each row of exact/h
        slots = np.flatnonzero(target >= 0)
        blocks = self._h_blocks(slots, budget)
        n, m = len(tests), tests.n_vectors
        summed = tests.weights is not None
        use_dask = engine == "dask" and not summed
        n_batches = self.gradient_batches(n)
        dtype = torch.float64 if summed else self.dtype
        out = torch.zeros(len(cs), n_cols, m, dtype=dtype)
        if progress is not None:
            per = n_batches + len(blocks) if summed else n_batches * (1 if use_dask else len(blocks) + 1)
            progress.plan(len(cs) * per)
        for s, c in enumerate(cs):
            if summed:
                self._dot_summed(out[s], tests, c, target, blocks, progress)
            elif use_dask:
                self._dot_dask(out[s], tests, c, target, slots, progress)
            else:
                start = 0
                for G in self.gradients(tests, c):
                    if progress is not None:
                        progress.update()
                    stop = start + len(G)
                    for blk in blocks:
                        hb = self._read(c, blk).to(G.dtype)
                        out[s, :, start:stop].index_add_(0, torch.from_numpy(target[blk]), (G @ hb.T).T)
                        if progress is not None:
                            progress.update()
                    start = stop
        return out.numpy()

    def _dot_summed(self, out: torch.Tensor, tests: TestPoints, c: int, target: np.ndarray, blocks,
                    progress: Progress | None) -> None:
        g = torch.zeros(tests.n_vectors, self.reader.layout.size, dtype=torch.float64)
        start = 0
        for G in self.gradients(tests, c):
            g += tests.weights[:, start:start + len(G)] @ G.to(torch.float64)
            start += len(G)
            if progress is not None:
                progress.update()
        for blk in blocks:
            hb = self._read(c, blk).to(torch.float64)
            out.index_add_(0, torch.from_numpy(target[blk]), hb @ g.T)
            if progress is not None:
                progress.update()

    def _dot_dask(self, out: torch.Tensor, tests: TestPoints, c: int, target: np.ndarray, slots: np.ndarray,
                  progress: Progress | None) -> None:
        import dask.array as da

        h = self.reader.array("exact/h")
        hd = da.from_zarr(str(self.reader.path), component="exact/h", chunks=(1, h.chunks[1], h.shape[2]))[c]
        index = torch.from_numpy(target[slots])
        start = 0
        for G in self.gradients(tests, c):
            if progress is not None:
                progress.update()
            scores = np.asarray((hd @ G.numpy().T).compute())  # (rows of exact/h, batch)
            out[:, start:start + len(G)].index_add_(0, index, torch.from_numpy(scores[slots]))
            start += len(G)

    def self_dot(self, train: TestPoints, ids, checkpoint: int, *, budget: int,
                 progress: Progress | None = None) -> np.ndarray:
        """Blocks of samples whose h rows and gradients (~3 × block × D) fit half the budget."""
        c = self.reader.checkpoint_index(checkpoint)
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        slots = self._slots(ids)
        D = self.reader.layout.size
        block = max(1, min(len(ids), (budget // 2) // max(1, 3 * D * itemsize(self.dtype))))
        starts = range(0, len(ids), block)
        if progress is not None:
            progress.plan(sum(self.gradient_batches(len(ids[a:a + block])) for a in starts))
        out = np.empty(len(ids), dtype=np.float64 if self.dtype == torch.float64 else np.float32)
        h = self.reader.array("exact/h")
        for a in starts:
            block_ids = ids[a:a + block]
            hrows = torch.from_numpy(take_rows(h, c, slots[a:a + block]))
            start = 0
            for G in self.gradients(train.take(block_ids), c):
                hb = hrows[start:start + len(G)].to(G.dtype)
                out[a + start:a + start + len(G)] = (G * hb).sum(1).numpy()
                start += len(G)
                if progress is not None:
                    progress.update()
        return out

    def rows(self, checkpoint: int, ids, *, budget: int, progress: Progress | None = None) -> np.ndarray:
        c = self.reader.checkpoint_index(checkpoint)
        return take_rows(self.reader.array("exact/h"), c, self._slots(ids))


def take_rows(h, c: int, slots: np.ndarray) -> np.ndarray:
    """exact/h[c, slots] read in sorted order (zarr orthogonal indexing wants sorted, unique indices)."""
    slots = np.asarray(slots, dtype=np.int64)
    if slots.size == 0:
        return np.zeros((0, h.shape[2]), dtype=h.dtype)
    uniq, inverse = np.unique(slots, return_inverse=True)
    rows = np.asarray(h.get_orthogonal_selection((c, uniq, slice(None))))
    return rows[inverse]
