"""Seeded random projections, one factor-wise block per parameter.

A parameter is seen as a matrix G (rows × cols): its first dimension by the
rest (a conv kernel (out, in, kh, kw) is (out, in·kh·kw)). Its block projects

    P(G) = P_out · G · P_inᵀ          (k_out × k_in values)

with Gaussian P_out (k_out × rows), P_in (k_in × cols) of variance 1/k_out and
1/k_in, so E[⟨P(G), P(H)⟩] = ⟨G, H⟩. Either factor may be the identity (a
block small enough is kept whole). Because P is linear and fixed, it commutes
with the Hessian-free HYDRA recursion: tracking P·h is the same computation as
tracking h and projecting at the end. For a per-sample gradient of a linear
layer, G = Σ_l δ_l a_lᵀ, hence P(G) = Σ_l (P_out δ_l)(P_in a_l)ᵀ: the full
gradient is never formed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .params import ParamLayout


@dataclass
class Block:
    name: str
    rows: int
    cols: int
    offset: int  # first index of this block in the projected vector
    out: torch.Tensor | None  # (k_out, rows), None = identity
    inn: torch.Tensor | None  # (k_in, cols), None = identity
    dtype: torch.dtype = torch.float32  # per-sample gradients are computed in this dtype

    @property
    def k_out(self) -> int:
        return self.rows if self.out is None else self.out.shape[0]

    @property
    def k_in(self) -> int:
        return self.cols if self.inn is None else self.inn.shape[0]

    @property
    def dim(self) -> int:
        return self.k_out * self.k_in

    @property
    def stop(self) -> int:
        return self.offset + self.dim

    def project_matrix(self, g: torch.Tensor) -> torch.Tensor:
        """P_out · G · P_inᵀ for G of shape (..., rows, cols); returns (..., k_out·k_in)."""
        if self.out is not None:
            g = torch.matmul(self.out, g)
        if self.inn is not None:
            g = torch.matmul(g, self.inn.T)
        return g.reshape(*g.shape[:-2], self.dim)

    def project_out(self, x: torch.Tensor) -> torch.Tensor:
        """P_out applied to the last dimension (of size rows)."""
        return x if self.out is None else torch.matmul(x, self.out.T)

    def project_in(self, x: torch.Tensor) -> torch.Tensor:
        """P_in applied to the last dimension (of size cols)."""
        return x if self.inn is None else torch.matmul(x, self.inn.T)


def _allocate(layout: ParamLayout, total: int) -> list[tuple[int, int]]:
    """Split ``total`` projected dimensions over the parameters: (k_out, k_in) per parameter.

    Tiny parameters, and those whose whole size fits in their share, are kept
    unprojected; the rest share what is left in proportion to √numel (a layer's
    share grows with its size, but a huge layer does not starve the small ones).
    """
    slots = layout.slots
    # tiny tensors (biases, norms) are never worth projecting: keep them whole
    small = max(16, total // (8 * max(len(slots), 1)))
    keep = [s.numel <= small for s in slots]
    budget = total - sum(s.numel for s, k in zip(slots, keep) if k)
    if budget <= 0:
        keep = [False] * len(slots)
        budget = total
    order = sorted(range(len(slots)), key=lambda i: slots[i].numel)
    changed = True
    while changed:
        changed = False
        rest = [i for i in order if not keep[i]]
        weight = sum(math.sqrt(slots[i].numel) for i in rest)
        for i in rest:
            share = budget * math.sqrt(slots[i].numel) / weight if weight else 0
            if slots[i].numel <= share:
                keep[i] = True
                budget -= slots[i].numel
                changed = True
                break
    rest = [i for i in order if not keep[i]]
    weight = sum(math.sqrt(slots[i].numel) for i in rest)
    dims: list[tuple[int, int]] = []
    for i, s in enumerate(slots):
        if keep[i]:
            dims.append((s.rows, s.cols))
            continue
        share = max(1, int(budget * math.sqrt(s.numel) / weight))
        if s.cols == 1:
            dims.append((min(s.rows, share), 1))
            continue
        k_out = int(round(math.sqrt(share * s.rows / s.cols)))
        k_out = min(max(k_out, 1), s.rows)
        k_in = min(max(share // k_out, 1), s.cols)
        if k_in == s.cols:
            k_out = min(max(share // s.cols, 1), s.rows)
        dims.append((k_out, k_in))
    return dims


def _gaussian(rows: int, cols: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, cols, generator=g, dtype=torch.float64) / math.sqrt(rows)).to(dtype)


class Projector:
    """One ``Block`` per tracked parameter; ``dim`` is the length of a projected vector."""

    def __init__(self, layout: ParamLayout, blocks: list[Block], requested: int | None, seed: int):
        self.layout = layout
        self.blocks = blocks
        self.requested = requested
        self.seed = seed
        self.dim = blocks[-1].stop if blocks else 0
        self.is_identity = all(b.out is None and b.inn is None for b in blocks)

    @classmethod
    def plan(cls, layout: ParamLayout, projection_dim: int | None, seed: int = 0, dtype=torch.float32) -> "Projector":
        """Blocks for ``projection_dim`` total dimensions (None: the full parameter dimension)."""
        if projection_dim is None or projection_dim >= layout.size:
            dims = [(s.rows, s.cols) for s in layout.slots]
        else:
            dims = _allocate(layout, int(projection_dim))
        blocks, offset = [], 0
        for i, (s, (k_out, k_in)) in enumerate(zip(layout.slots, dims)):
            out = None if k_out == s.rows else _gaussian(k_out, s.rows, seed * 1_000_003 + 2 * i, dtype)
            inn = None if k_in == s.cols else _gaussian(k_in, s.cols, seed * 1_000_003 + 2 * i + 1, dtype)
            block = Block(s.name, s.rows, s.cols, offset, out, inn, dtype)
            offset = block.stop
            blocks.append(block)
        return cls(layout, blocks, projection_dim, seed)

    def to(self, device=None, dtype=None) -> "Projector":
        def move(t):
            return None if t is None else t.to(device=device, dtype=dtype)

        blocks = [Block(b.name, b.rows, b.cols, b.offset, move(b.out), move(b.inn), dtype or b.dtype)
                  for b in self.blocks]
        return Projector(self.layout, blocks, self.requested, self.seed)

    def project_params(self, grads: list[torch.Tensor], batch_dims: int = 1) -> torch.Tensor:
        """Project full per-parameter tensors (each (*batch, *shape)) to (*batch, dim)."""
        parts = []
        for b, g in zip(self.blocks, grads):
            lead = g.shape[:batch_dims]
            parts.append(b.project_matrix(g.reshape(*lead, b.rows, b.cols)))
        return torch.cat(parts, dim=-1)

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
            "requested": self.requested,
            "seed": self.seed,
            "dim": self.dim,
            "blocks": [
                {"name": b.name, "rows": b.rows, "cols": b.cols, "offset": b.offset,
                 "k_out": b.k_out, "k_in": b.k_in, "out": b.out is not None, "in": b.inn is not None}
                for b in self.blocks
            ],
        }

    def arrays(self) -> dict[str, np.ndarray]:
        """The projection matrices by array name (``block{i}_out`` / ``block{i}_in``)."""
        out = {}
        for i, b in enumerate(self.blocks):
            if b.out is not None:
                out[f"block{i}_out"] = b.out.cpu().numpy()
            if b.inn is not None:
                out[f"block{i}_in"] = b.inn.cpu().numpy()
        return out

    @classmethod
    def from_json(cls, layout: ParamLayout, meta: dict, arrays) -> "Projector":
        blocks = []
        for i, d in enumerate(meta["blocks"]):
            out = torch.from_numpy(np.asarray(arrays[f"block{i}_out"][...])) if d["out"] else None
            inn = torch.from_numpy(np.asarray(arrays[f"block{i}_in"][...])) if d["in"] else None
            dtype = (out if out is not None else inn).dtype if (out is not None or inn is not None) else torch.float32
            blocks.append(Block(d["name"], d["rows"], d["cols"], d["offset"], out, inn, dtype))
        return cls(layout, blocks, meta["requested"], meta["seed"])
