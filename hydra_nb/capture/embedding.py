"""Embedding: per-sample gradients from the token ids and the output gradient δ.

    weight   G_b = Σ_l e_{idx_bl} δ_blᵀ        (e_i: the i-th unit vector; positions at padding_idx left out)

Sketched, CS1(e_idx) is a signed one-hot at bucket h1[idx], so T(G_b) = Σ_l CS1(e_idx_bl) ⊛ CS2(δ_bl)
never forms G_b (one route: ``route`` is ignored). Unsketched, G_b is scattered in full.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import TrackingConfigError
from .routes import cast


def check(module: nn.Embedding) -> bool:
    """Refuse options that couple the samples of a batch or that the optimizer step cannot follow."""
    if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
        raise TrackingConfigError(
            f"Embedding {module} uses max_norm, scale_grad_by_freq or sparse gradients, which make a "
            "sample's gradient depend on the rest of the batch (or are not SGD-compatible). "
            "Build it without these options to track it."
        )
    return True


def per_sample(module: nn.Embedding, idx, d, blocks, route: str):
    """G_b = Σ_l e_{idx_l} δ_lᵀ; sketched, CS1(e_idx) is a signed one-hot at bucket h1[idx]."""
    w = blocks["weight"]
    B = idx.shape[0]
    idx = idx.reshape(B, -1)
    d = cast(d, w).reshape(B, idx.shape[1], -1)
    if module.padding_idx is not None:
        d = d * (idx != module.padding_idx).unsqueeze(-1).to(d.dtype)
    if not w.sketch:
        g = torch.zeros(B, w.rows, w.cols, dtype=d.dtype, device=d.device)
        g.scatter_add_(1, idx.unsqueeze(-1).expand(-1, -1, w.cols), d)
        yield w, g.reshape(B, w.dim)
        return
    cu = torch.zeros(B, idx.shape[1], w.dim, dtype=d.dtype, device=d.device)
    cu.scatter_(-1, w.h1[idx].unsqueeze(-1), w.s1[idx].unsqueeze(-1).to(d.dtype))
    yield w, w.combine(cu, w.sketch_cols(d))
