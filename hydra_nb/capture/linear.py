"""Linear: per-sample gradients from the layer's input a and output gradient δ.

    weight   G_b = Σ_l δ_bl a_blᵀ          (l: positions, for inputs (B, ..., in); none for (B, in))
    bias     g_b = Σ_l δ_bl

The weight's sketch T(G_b) is formed by either route of ``routes.py``: in full, then projected, or
factor-wise, T(G_b) = Σ_l CS1(δ_bl) ⊛ CS2(a_bl), without forming G_b.
"""

from __future__ import annotations

import torch
from torch import nn

from .routes import cast, prefer_full


def per_sample(module: nn.Linear, a, d, blocks, route: str):
    """Yield (block, (B, block.dim) projected per-sample gradient) for the module's tracked parameters."""
    B = a.shape[0]
    a = a.reshape(B, -1, a.shape[-1])
    d = d.reshape(B, -1, d.shape[-1])
    if "weight" in blocks:
        w = blocks["weight"]
        a_, d_ = cast(a, w), cast(d, w)
        L = a.shape[1]
        if prefer_full(B, L, w, a_.element_size(), route=route):
            if not w.sketch:
                yield w, w.project_matrix(torch.bmm(d_.transpose(1, 2), a_))  # G_b = Σ_l δ_l a_lᵀ
            else:  # the sketch's signs folded into the factors: (s1 ⊙ δ)(s2 ⊙ a)ᵀ = G ⊙ s1 s2ᵀ
                u, v = d_ * w.s1, a_ * w.s2
                # one position: a broadcast outer product (a matmul with inner size 1 is several times slower)
                g = u.transpose(1, 2) * v if L == 1 else torch.bmm(u.transpose(1, 2), v)
                yield w, w.project_signed(g)
        else:
            yield w, w.project_outer(d_, a_)
    if "bias" in blocks:
        b = blocks["bias"]
        yield b, b.project_matrix(cast(d.sum(1), b).unsqueeze(-1))
