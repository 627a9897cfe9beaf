"""The two routes of a sketched layer rule, and the cost model that chooses between them.

A layer whose per-sample gradient is a sum of outer products, G_b = Σ_l δ_bl a_blᵀ (Linear, Conv),
can be sketched by T (the parameter's block of the ``Projector``) in two ways that compute the same map:

    full:      form G_b (B, rows, cols), then T(G_b)              (a batched matmul, then a scatter)
    factored:  T(G_b) = Σ_l CS1(δ_bl) ⊛ CS2(a_bl)                 (sketch the factors, then an FFT)

``route`` is "auto" (the cost model below picks one per layer and batch) or "full"/"factored"
(forced: lets a test exercise both routes of a rule on the same input). The capture passes it to
every rule; rules with a single route ignore it.
"""

from __future__ import annotations

import math

import torch

from ..projection import Block

ROUTES = ("auto", "full", "factored")

_FULL_BYTES = 256 << 20  # never form per-sample gradients larger than this at once


def check_route(route: str) -> str:
    if route not in ROUTES:
        raise ValueError(f"route must be one of {', '.join(map(repr, ROUTES))}, got {route!r}.")
    return route


def prefer_full(B: int, L: int, block: Block, itemsize: int, extra_bytes: int = 0, conv: bool = False,
                route: str = "auto") -> bool:
    """Form the (B, rows, cols) per-sample gradients and scatter them, or sketch the factors and FFT?

    A cost model in nanoseconds for the whole batch, fitted on the CPU (one thread, B = 64, float32) to
    both routes of linear layers of 10–256 × 32–400 at L = 1–16 positions and k = 64–675: forming G
    ≈ 0.026 ns per multiply-add, scattering it ≈ 1.06 ns per element, plus ≈ 15 µs of fixed cost;
    count sketches ≈ 0.82 ns per element, an FFT of length k ≈ 0.17 ns·k·log2 k (0.46 for odd k:
    pocketfft's real transforms of odd length are about 3× slower), 2L + 1 of them per sample, plus
    ≈ 34 µs of fixed cost (more, smaller kernels); a convolution's factored route adds its CS2-kernel
    convolution (≈ 0.05 ns per multiply-add). On the fitted set it chose within 20% of the faster
    route in 82 of 84 cases (the previous model, without fixed costs or the odd-k penalty: 67). The
    full route wins for convolutions, long sequences and small layers, the factored one for wide
    linear layers. A forced ``route`` overrides it.
    """
    if check_route(route) != "auto":
        return route == "full"
    if not block.sketch:
        return True
    R, C, k = block.rows, block.cols, block.dim
    if B * R * C * itemsize + extra_bytes > _FULL_BYTES:
        return False
    fft = (0.46 if k % 2 else 0.17) * k * max(math.log2(k), 1.0)
    full = B * (0.026 * L * R * C + 1.06 * R * C) + 15_000
    factored = B * (L * (0.82 * (R + C) + 2 * fft + (0.05 * C * k if conv else 0.0)) + fft) + 34_000
    return full <= factored


def cast(x: torch.Tensor, block: Block) -> torch.Tensor:
    """x in the block's dtype (the projector's compute dtype)."""
    return x if x.dtype == block.dtype else x.to(block.dtype)
