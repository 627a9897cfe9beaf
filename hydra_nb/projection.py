"""Seeded random projections, one block per parameter: identity or a tensor sketch.

A parameter is seen as a matrix G (rows × cols): its first dimension by the
rest (a conv kernel (out, in, kh, kw) is (out, in·kh·kw), a vector is (n, 1)).
Its block is either kept whole or mapped to k values by a TensorSketch-structured
CountSketch (Pham & Pagh 2013):

    T(G)[m] = Σ_{i,j : (h1_i + h2_j) mod k = m}  s1_i · s2_j · G_ij

with seeded hashes h1 (rows → 0..k−1), h2 (cols → 0..k−1) and random signs s1, s2.
T is linear and unbiased for inner products, E⟨T(G), T(H)⟩ = ⟨G, H⟩, with a
variance close to a dense Gaussian projection's, and it is *factor-wise*: for a
per-sample gradient G = Σ_l u_l v_lᵀ (a linear layer: u = δ, v = input),

    T(G) = Σ_l CS1(u_l) ⊛ CS2(v_l)          (⊛: circular convolution, done with FFTs)

where CS1(u)[m] = Σ_{i: h1_i = m} s1_i u_i (a CountSketch), so G is never formed.
Because T is fixed and linear, it commutes with the Hessian-free HYDRA recursion:
tracking T(h) is the same computation as tracking h and projecting at the end.
(Dense-Gaussian factor-wise projections, P_out·G·P_inᵀ, were measured and rejected:
on LeNet-5 they correlate 0.70 with full-dimensional contributions at k = 1024,
this sketch 0.87 — see benchmarks/projection_fidelity.py.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .params import ParamLayout


@dataclass
class Block:
    """How one parameter is projected: kept whole (``sketch is False``) or sketched to ``dim`` values."""

    name: str
    rows: int
    cols: int
    offset: int  # first index of this block in the projected vector
    dim: int
    h1: torch.Tensor | None = None  # (rows,) int64 buckets
    s1: torch.Tensor | None = None  # (rows,) ±1 signs, in ``dtype``
    h2: torch.Tensor | None = None  # (cols,)
    s2: torch.Tensor | None = None  # (cols,)
    dtype: torch.dtype = torch.float32  # per-sample gradients are computed in this dtype

    def __post_init__(self):
        self._index = None
        self._sign = None

    @property
    def sketch(self) -> bool:
        return self.h1 is not None

    @property
    def stop(self) -> int:
        return self.offset + self.dim

    def _flat_map(self):
        """Bucket and sign of every entry of G (row-major), for projecting full matrices."""
        if self._index is None:
            self._index = ((self.h1[:, None] + self.h2[None, :]) % self.dim).reshape(-1)
            self._sign = (self.s1[:, None] * self.s2[None, :]).reshape(-1)
        return self._index, self._sign

    def project_matrix(self, g: torch.Tensor) -> torch.Tensor:
        """T(G) for G of shape (..., rows, cols); returns (..., dim)."""
        lead = g.shape[:-2]
        flat = g.reshape(*lead, self.rows * self.cols)
        if not self.sketch:
            return flat
        index, sign = self._flat_map()
        out = torch.zeros(*lead, self.dim, dtype=flat.dtype, device=flat.device)
        return out.index_add_(-1, index, flat * sign.to(flat.dtype))

    def row_block(self, first: int, end: int) -> "Block":
        """The block of rows first..end−1 of this parameter's matrix: projecting a matrix H of those rows with it gives
        the projection of the full matrix whose other rows are zero, at the positions ``offset``..``stop`` of the
        returned block (so the row blocks of a matrix, projected and added, give its projection)."""
        if first == 0 and end == self.rows:
            return self
        n = end - first
        if not self.sketch:
            return Block(self.name, n, self.cols, self.offset + first * self.cols, n * self.cols, dtype=self.dtype)
        return Block(self.name, n, self.cols, self.offset, self.dim, self.h1[first:end], self.s1[first:end], self.h2,
                     self.s2, self.dtype)

    def project_signed(self, g: torch.Tensor) -> torch.Tensor:
        """T(G) for G of shape (..., rows, cols) given as G ⊙ s1 s2ᵀ (a sketched block: the signs already applied,
        e.g. folded into the factors of an outer product); returns (..., dim)."""
        lead = g.shape[:-2]
        index, _ = self._flat_map()
        out = torch.zeros(*lead, self.dim, dtype=g.dtype, device=g.device)
        return out.index_add_(-1, index, g.reshape(*lead, self.rows * self.cols))

    def sketch_rows(self, u: torch.Tensor) -> torch.Tensor:
        """CS1(u) over the last dimension (of size rows) → (..., dim)."""
        return _count_sketch(u, self.h1, self.s1, self.dim)

    def sketch_cols(self, v: torch.Tensor) -> torch.Tensor:
        """CS2(v) over the last dimension (of size cols) → (..., dim)."""
        return _count_sketch(v, self.h2, self.s2, self.dim)

    def project_outer(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """T(Σ_l u_l v_lᵀ) for u (B, L, rows), v (B, L, cols) → (B, dim), without forming the sum."""
        if not self.sketch:
            return torch.bmm(u.transpose(1, 2), v).reshape(u.shape[0], -1)
        return self.combine(self.sketch_rows(u), self.sketch_cols(v))

    def combine(self, cu: torch.Tensor, cv: torch.Tensor) -> torch.Tensor:
        """Σ_l CS1(u_l) ⊛ CS2(v_l) from sketched factors (B, L, dim) → (B, dim)."""
        spectrum = (torch.fft.rfft(cu, dim=-1) * torch.fft.rfft(cv, dim=-1)).sum(1)
        return torch.fft.irfft(spectrum, n=self.dim, dim=-1)


def _count_sketch(x: torch.Tensor, h: torch.Tensor, s: torch.Tensor, k: int) -> torch.Tensor:
    out = torch.zeros(*x.shape[:-1], k, dtype=x.dtype, device=x.device)
    return out.index_add_(-1, h, x * s.to(x.dtype))


def _allocate(layout: ParamLayout, total: int) -> list[int]:
    """Split ``total`` projected dimensions over the parameters.

    Tiny parameters, and those whose whole size fits in their share, are kept
    unprojected; the rest share what is left in proportion to √numel (measured on
    LeNet-5 against numel^0.25…numel^1 and equal shares: √numel was among the best,
    numel clearly worse).
    """
    slots = layout.slots
    small = max(16, total // (8 * max(len(slots), 1)))
    keep = [s.numel <= small for s in slots]
    budget = total - sum(s.numel for s, k in zip(slots, keep) if k)
    if budget <= 0:
        keep = [False] * len(slots)
        budget = total
    changed = True
    while changed:
        changed = False
        rest = [i for i in range(len(slots)) if not keep[i]]
        weight = sum(math.sqrt(slots[i].numel) for i in rest)
        for i in sorted(rest, key=lambda i: slots[i].numel):
            if slots[i].numel <= budget * math.sqrt(slots[i].numel) / weight:
                keep[i] = True
                budget -= slots[i].numel
                changed = True
                break
    rest = [i for i in range(len(slots)) if not keep[i]]
    weight = sum(math.sqrt(slots[i].numel) for i in rest)
    return [s.numel if keep[i] else _smooth_below(max(1, int(budget * math.sqrt(s.numel) / weight)))
            for i, s in enumerate(slots)]


def _smooth_below(n: int) -> int:
    """The largest 2·3·5-smooth number ≤ n: sketch sizes whose FFTs are fast (a prime size is several times slower)."""
    for m in range(n, 0, -1):
        r = m
        for p in (2, 3, 5):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
    return 1


FULL_FRACTION = 0.75


def keeps_full(n_params: int, projection_dim: int | None) -> bool:
    """Whether ``Projector.plan`` keeps the full parameter dimension for ``projection_dim`` (None: always)."""
    return projection_dim is None or projection_dim >= FULL_FRACTION * n_params


class Projector:
    """One ``Block`` per tracked parameter; ``dim`` is the length of a projected vector."""

    def __init__(self, layout: ParamLayout, blocks: list[Block], requested: int | None, seed: int):
        self.layout = layout
        self.blocks = blocks
        self.requested = requested
        self.seed = seed
        self.dim = blocks[-1].stop if blocks else 0
        self.is_identity = not any(b.sketch for b in blocks)

    @classmethod
    def plan(cls, layout: ParamLayout, projection_dim: int | None, seed: int = 0, dtype=torch.float32) -> "Projector":
        """Blocks for ``projection_dim`` total dimensions (None: the full parameter dimension).

        A ``projection_dim`` of at least ``FULL_FRACTION`` of the parameter count also gives the full dimension
        (``keeps_full``): such a sketch would save at most a quarter of the store (its blocks are rounded down to
        FFT-friendly sizes, so 1,024 of 1,058 parameters gave k = 998) and make every score approximate.
        """
        if keeps_full(layout.size, projection_dim):
            dims = [s.numel for s in layout.slots]
        else:
            dims = _allocate(layout, int(projection_dim))
        blocks, offset = [], 0
        for i, (s, k) in enumerate(zip(layout.slots, dims)):
            if k >= s.numel:
                block = Block(s.name, s.rows, s.cols, offset, s.numel, dtype=dtype)
            else:
                g = torch.Generator().manual_seed(seed * 1_000_003 + i)
                h1 = torch.randint(0, k, (s.rows,), generator=g)
                h2 = torch.randint(0, k, (s.cols,), generator=g)
                s1 = (torch.randint(0, 2, (s.rows,), generator=g) * 2 - 1).to(dtype)
                s2 = (torch.randint(0, 2, (s.cols,), generator=g) * 2 - 1).to(dtype)
                block = Block(s.name, s.rows, s.cols, offset, k, h1, s1, h2, s2, dtype)
            offset = block.stop
            blocks.append(block)
        return cls(layout, blocks, projection_dim, seed)

    def to(self, device=None, dtype=None) -> "Projector":
        def move(t, cast):
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if cast else None)

        blocks = [Block(b.name, b.rows, b.cols, b.offset, b.dim, move(b.h1, False), move(b.s1, True),
                        move(b.h2, False), move(b.s2, True), dtype or b.dtype) for b in self.blocks]
        return Projector(self.layout, blocks, self.requested, self.seed)

    def project_flat(self, flat: torch.Tensor) -> torch.Tensor:
        """Project full flat vectors (..., layout.size) to (..., dim)."""
        lead = flat.shape[:-1]
        parts = []
        for b, s in zip(self.blocks, self.layout.slots):
            g = flat[..., s.offset : s.offset + s.numel].reshape(*lead, b.rows, b.cols)
            parts.append(b.project_matrix(g))
        return torch.cat(parts, dim=-1)

    # -- storage: plain arrays and JSON, never pickle ---------------------------------
    def to_json(self) -> dict:
        return {
            "kind": "tensor_sketch",
            "requested": self.requested,
            "seed": self.seed,
            "dim": self.dim,
            "blocks": [{"name": b.name, "rows": b.rows, "cols": b.cols, "offset": b.offset, "dim": b.dim,
                        "sketch": b.sketch} for b in self.blocks],
        }

    def arrays(self) -> dict[str, np.ndarray]:
        """Hashes (int64) and signs (int8) by array name ``block{i}_h1`` … ``block{i}_s2``."""
        out = {}
        for i, b in enumerate(self.blocks):
            if b.sketch:
                out[f"block{i}_h1"] = b.h1.cpu().numpy().astype(np.int64)
                out[f"block{i}_h2"] = b.h2.cpu().numpy().astype(np.int64)
                out[f"block{i}_s1"] = b.s1.cpu().numpy().astype(np.int8)
                out[f"block{i}_s2"] = b.s2.cpu().numpy().astype(np.int8)
        return out

    @classmethod
    def from_json(cls, layout: ParamLayout, meta: dict, arrays, dtype=torch.float32) -> "Projector":
        blocks = []
        for i, d in enumerate(meta["blocks"]):
            if d["sketch"]:
                get = lambda part: torch.from_numpy(np.asarray(arrays[f"block{i}_{part}"][...]).astype(np.int64))
                blocks.append(Block(d["name"], d["rows"], d["cols"], d["offset"], d["dim"], get("h1"),
                                    get("s1").to(dtype), get("h2"), get("s2").to(dtype), dtype))
            else:
                blocks.append(Block(d["name"], d["rows"], d["cols"], d["offset"], d["dim"], dtype=dtype))
        return cls(layout, blocks, meta["requested"], meta["seed"])
