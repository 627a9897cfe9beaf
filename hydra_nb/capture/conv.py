"""Conv1d/2d/3d (groups = 1): per-sample gradients from the input a and output gradient δ.

    weight   G_b = Σ_l δ_bl patch(a_b)_lᵀ      (l: output positions; patch_l: the input window at l,
                                                flattened over in-channels and kernel positions)
    bias     g_b = Σ_l δ_bl

The weight's sketch T(G_b) by either route of ``routes.py``: full, form G_b and project it;
factored, a convolution whose kernel is the CountSketch CS2 gives CS2(patch_l) without unfolding,
then T(G_b) = Σ_l CS1(δ_bl) ⊛ CS2(patch_l). The full route forms G_b in one of two ways
(``weight_grads``): unfold the input to patches and take a batched matmul, or let torch's own
convolution backward compute the weight gradient of a convolution that has the batch as its groups
(input (1, B·C_in, …), output gradient (1, B·C_out, …), B groups): the same sums, in the order the
library kernel chooses. Grouped convolutions go to the fallback.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .routes import cast, prefer_full

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}  # by the number of spatial dimensions
_CONV_WEIGHT = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}
_UNFOLD_BYTES = 256 << 20
_GROUPED_MIN_CHANNELS = 8  # at least this many input channels: the batch-grouped backward (see weight_grads)


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


def weight_grads(module: nn.Module, a: torch.Tensor, d: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """Per-sample weight gradients G_b = Σ_l δ_bl patch(a_b)_lᵀ, (B, C_out, C_in·k…), formed in full.

    ``a``: the input, ``d``: the output gradient (B, C_out, …). ``method``: "unfold" (patches as a strided
    view, one copy, then a batched matmul; Conv1d/Conv2d with numeric padding only, else it takes
    "grouped"), "grouped" (the weight gradient of a convolution with the batch as groups, by torch's
    convolution backward: no patches, and the library kernel's speed; any Conv1d/2d/3d), or "auto":
    grouped from ``_GROUPED_MIN_CHANNELS`` input channels, unfold below (on the CPU, B = 64: unfold +
    matmul 32 ms against 5 ms grouped for a 16→16 3×3 convolution on 32×32, but 0.8 against 1.2 ms
    for LeNet-5's 1→6 5×5).
    """
    B, C_out = d.shape[:2]
    if method == "auto":
        method = "grouped" if a.shape[1] >= _GROUPED_MIN_CHANNELS else "unfold"
    if method == "unfold":
        patches = unfold(module, a)
        if patches is not None:
            return torch.bmm(d.reshape(B, C_out, -1), patches.transpose(1, 2))
    nd = len(module.kernel_size)
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        a = F.pad(a, module._reversed_padding_repeated_twice, mode=mode)
        padding = (0,) * nd
    else:
        padding = module.padding
    grad = _CONV_WEIGHT[nd](a.reshape(1, B * a.shape[1], *a.shape[2:]), (B * C_out, *module.weight.shape[1:]),
                            d.reshape(1, B * C_out, *d.shape[2:]), module.stride, padding, module.dilation,
                            groups=B)
    return grad.reshape(B, C_out, -1)


def per_sample(module: nn.Module, a, d, blocks, route: str):
    """Per-sample T(Σ_l δ_l patch_lᵀ) by one of two routes computing the same map.

    full: form G_b (B, out, cols) by ``weight_grads`` and sketch it; factored: a convolution whose kernel
    is the CountSketch CS2 gives CS2(patch_l) without unfolding, then T = Σ_l CS1(δ_l) ⊛ CS2(patch_l) by FFT
    (used when G would be too large, or the cost model prefers it).
    """
    B = a.shape[0]
    if "weight" in blocks:
        w = blocks["weight"]
        a = cast(a, w)
        dd = cast(d, w).reshape(B, w.rows, -1)  # (B, out, L)
        L = dd.shape[2]
        if route == "auto":
            full = prefer_full(B, L, w, a.element_size(), conv=True)
            if full and a.shape[1] < _GROUPED_MIN_CHANNELS:  # unfolded patches: bounded, like G
                full = B * w.cols * L * a.element_size() <= _UNFOLD_BYTES
        else:
            full = prefer_full(B, L, w, a.element_size(), route=route)
        if full:
            yield w, w.project_matrix(weight_grads(module, a, cast(d, w)))  # (B, out, cols)
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
