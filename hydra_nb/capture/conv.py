"""Conv1d/2d/3d (groups = 1): per-sample gradients from the input a and output gradient δ.

    weight   G_b = Σ_l δ_bl patch(a_b)_lᵀ      (l: output positions; patch_l: the input window at l,
                                                flattened over in-channels and kernel positions)
    bias     g_b = Σ_l δ_bl

The weight's sketch T(G_b) by either route of ``routes.py``: full, unfold the input to patches and
form G_b; factored, a convolution whose kernel is the CountSketch CS2 gives CS2(patch_l) without
unfolding, then T(G_b) = Σ_l CS1(δ_bl) ⊛ CS2(patch_l). Grouped convolutions go to the fallback.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .routes import cast, prefer_full

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}  # by the number of spatial dimensions
_UNFOLD_BYTES = 256 << 20


def check(module: nn.Module) -> bool:
    """The rule follows ungrouped convolutions; a grouped one is captured by the fallback."""
    return module.groups == 1


def unfold(module: nn.Module, a: torch.Tensor) -> torch.Tensor | None:
    """Input patches (B, C_in·k…, L) of a Conv1d/Conv2d with numeric padding, or None if not possible.

    Built as a strided view of the padded input (then one copy): several times faster than
    ``F.unfold`` on the CPU.
    """
    if not isinstance(module, (nn.Conv1d, nn.Conv2d)) or isinstance(module.padding, str):
        return None
    nd = len(module.kernel_size)
    if module.padding_mode != "zeros":
        a = F.pad(a, module._reversed_padding_repeated_twice, mode=module.padding_mode)
    elif any(module.padding):
        a = F.pad(a, [p for p in reversed(module.padding) for _ in range(2)])
    a = a.contiguous()
    B, C = a.shape[:2]
    sizes, strides = [], []
    for i in range(nd):
        extent = module.dilation[i] * (module.kernel_size[i] - 1) + 1
        sizes.append((a.shape[2 + i] - extent) // module.stride[i] + 1)
        strides.append(a.stride(2 + i))
    view = a.as_strided(
        (B, C, *module.kernel_size, *sizes),
        (a.stride(0), a.stride(1), *(d * s for d, s in zip(module.dilation, strides)),
         *(st * s for st, s in zip(module.stride, strides))),
    )
    L = 1
    for n in sizes:
        L *= n
    return view.reshape(B, -1, L)


def per_sample(module: nn.Module, a, d, blocks, route: str):
    """Per-sample T(Σ_l δ_l patch_lᵀ) by one of two routes computing the same map.

    full: unfold the input to patches (B, cols, L), form G_b = δ_b·patchesᵀ (B, out, cols), sketch it;
    factored: a convolution whose kernel is the CountSketch CS2 gives CS2(patch_l) without unfolding,
    then T = Σ_l CS1(δ_l) ⊛ CS2(patch_l) by FFT (used when the patches or G would be too large,
    or for Conv3d and string padding, which unfold cannot do, whatever the route).
    """
    B = a.shape[0]
    if "weight" in blocks:
        w = blocks["weight"]
        a = cast(a, w)
        dd = cast(d, w).reshape(B, w.rows, -1)  # (B, out, L)
        L = dd.shape[2]
        patch_bytes = B * w.cols * L * a.element_size()
        if route == "auto":
            full = patch_bytes <= _UNFOLD_BYTES and prefer_full(B, L, w, a.element_size(), patch_bytes, conv=True)
        else:
            full = prefer_full(B, L, w, a.element_size(), route=route)
        patches = unfold(module, a) if full else None
        if patches is not None:
            yield w, w.project_matrix(torch.bmm(dd, patches.transpose(1, 2)))
        else:
            kernel_shape = module.weight.shape[1:]
            if w.sketch:  # CS2 as a dense (dim, cols) matrix, used as a convolution kernel
                kernel = torch.zeros(w.dim, w.cols, dtype=a.dtype, device=a.device)
                kernel[w.h2, torch.arange(w.cols, device=a.device)] = w.s2.to(a.dtype)
            else:
                kernel = torch.eye(w.cols, dtype=a.dtype, device=a.device)
            padding = module.padding
            if module.padding_mode != "zeros":
                a = F.pad(a, module._reversed_padding_repeated_twice, mode=module.padding_mode)
                padding = 0
            conv = _CONV[len(module.kernel_size)]
            cols = conv(a, kernel.reshape(-1, *kernel_shape), None, module.stride, padding,
                        module.dilation).reshape(B, kernel.shape[0], -1)  # (B, dim|cols, L)
            if w.sketch:
                yield w, w.combine(w.sketch_rows(dd.transpose(1, 2)), cols.transpose(1, 2))
            else:
                yield w, torch.bmm(dd, cols.transpose(1, 2)).reshape(B, w.dim)
    if "bias" in blocks:
        b = blocks["bias"]
        yield b, b.project_matrix(cast(d.reshape(B, d.shape[1], -1).sum(2), b).unsqueeze(-1))
