"""LayerNorm: per-sample gradients from the input x and the output gradient δ.

    â_bl = (x_bl − mean(x_bl)) / sqrt(var(x_bl) + ε)     (over the normalized_shape dimensions)
    weight   g_b = Σ_l δ_bl ⊙ â_bl
    bias     g_b = Σ_l δ_bl

(l: the leading positions, if any). The vectors are short: they are projected in full (one route:
``route`` is ignored).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .routes import cast


def per_sample(module: nn.LayerNorm, x, d, blocks, route: str):
    B = x.shape[0]
    ref = next(iter(blocks.values()))
    x = cast(x, ref)
    d = cast(d, ref)
    shape = tuple(module.normalized_shape)
    if "weight" in blocks:
        w = blocks["weight"]
        xhat = F.layer_norm(x, shape, eps=module.eps)  # â, by the forward's own kernel (no affine part)
        g = (d * xhat).reshape(B, -1, *shape).sum(1)
        yield w, w.project_matrix(g.reshape(B, w.rows, w.cols))
    if "bias" in blocks:
        b = blocks["bias"]
        g = d.reshape(B, -1, *shape).sum(1)
        yield b, b.project_matrix(g.reshape(B, b.rows, b.cols))
