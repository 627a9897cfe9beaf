"""The torch.func fallback, and the one per-sample VJP helper (also used by ``batchnorm.py``).

A module with parameters and no layer rule of its own (a custom module, a grouped convolution, and
``nn.MultiheadAttention`` as a unit, whose forward uses its projections' weights functionally) is
differentiated as a whole. Its call is recorded in the forward (inputs x, detached), the cotangents
δ_j of its outputs y_j arrive during the user's backward, and at ``step()``

    g_b = ∂/∂θ Σ_j ⟨δ_bj, y_j(θ; x_b)⟩          (sample b's inputs alone, as a batch of one)

for every sample b at once: ``torch.func.vmap`` over the samples of a ``torch.func.vjp`` of the
module's ``functional_call``. This requires the batch on the first dimension of every batched input
and output, and a forward that treats the samples independently and deterministically.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_flatten, tree_unflatten


def per_sample_vjp(fn: Callable, primals: dict[str, torch.Tensor], args: tuple, kwargs: dict,
                   cotangents: list[torch.Tensor | None], *, coupled: bool = False,
                   chunk: int | None = None) -> dict[str, torch.Tensor]:
    """{name: (B, *shape)}: per sample b, the gradient of Σ_j ⟨c_j, out_j⟩ with respect to ``primals``.

    ``fn(primals, args, kwargs)`` returns the output (a tensor or a pytree of them); ``cotangents``
    holds one entry per flattened output (None: a zero cotangent), each with the batch (B) first.
    Inputs with the batch first are split into samples; other inputs are shared.

        uncoupled (default): g_b = vjp of fn on sample b's inputs alone, with cotangents c_j[b]
                             (samples are independent: the fallback rule; BatchNorm, statistics fixed)
        coupled:             g_b = vjp of fn on the whole batch, with cotangents c_j ⊙ 1[row = b]
                             (samples interact: BatchNorm with the batch statistics)

    Both are ``torch.func.vmap`` over the samples, ``chunk`` lanes per call (default: all B).
    Under vmap, torch's fused attention kernels would loop over the samples one at a time (they have
    no batching rule); the math backend is made of batchable ops and gives the same values to float
    round-off, so it is used throughout.
    """
    B = next(c.shape[0] for c in cotangents if c is not None)
    step = B if chunk is None else max(1, chunk)
    leaves, spec = tree_flatten((args, kwargs))
    leaf_dims = [0 if torch.is_tensor(t) and t.dim() > 0 and t.shape[0] == B else None for t in leaves]
    cot_dims = [0 if c is not None else None for c in cotangents]
    is_tensor: list[bool] = []  # which flattened outputs are tensors (set when fn is traced)

    def tensor_outputs(out) -> tuple:
        flat = tree_flatten(out)[0]
        if len(flat) != len(cotangents):
            raise ValueError(f"{len(cotangents)} cotangents for an output of {len(flat)} leaves")
        is_tensor[:] = [torch.is_tensor(o) for o in flat]
        return tuple(o for o in flat if torch.is_tensor(o))

    def full(outs, cots, scale) -> tuple:
        """A cotangent for every tensor output: zeros where none arrived, else scale(c)."""
        cots = [c for c, t in zip(cots, is_tensor) if t]
        return tuple(torch.zeros_like(o) if c is None else scale(c) for o, c in zip(outs, cots))

    parts = []
    with sdpa_kernel(SDPBackend.MATH):
        if coupled:
            outs, vjp_fn = torch.func.vjp(lambda p: tensor_outputs(fn(p, args, kwargs)), primals)
            ref = next(c for c in cotangents if c is not None)
            eye = torch.eye(B, dtype=ref.dtype, device=ref.device)

            def row(m):  # m: the one-hot mask of row b
                def restrict(c):
                    return c * m.to(c.dtype).reshape((B,) + (1,) * (c.dim() - 1))

                return vjp_fn(full(outs, cotangents, restrict))[0]

            one = torch.func.vmap(row, randomness="error")
            for s in range(0, B, step):
                parts.append(one(eye[s:s + step]))
        else:
            def single(xs, cots):
                xs = [t.unsqueeze(0) if d == 0 else t for t, d in zip(xs, leaf_dims)]
                a, kw = tree_unflatten(xs, spec)
                outs, vjp_fn = torch.func.vjp(lambda p: tensor_outputs(fn(p, tuple(a), kw)), primals)
                return vjp_fn(full(outs, cots, lambda c: c.unsqueeze(0)))[0]

            one = torch.func.vmap(single, in_dims=(leaf_dims, cot_dims), randomness="error")
            for s in range(0, B, step):
                xs = [t[s:s + step] if d == 0 else t for t, d in zip(leaves, leaf_dims)]
                cs = [None if c is None else c[s:s + step] for c in cotangents]
                parts.append(one(xs, cs))
    if len(parts) == 1:
        return parts[0]
    return {n: torch.cat([p[n] for p in parts]) for n in primals}


def module_call(module: nn.Module) -> Callable:
    """fn(params, args, kwargs) = module(*args, **kwargs) with the given parameters (the rest its own)."""
    return lambda params, args, kwargs: torch.func.functional_call(module, params, tuple(args), kwargs)


def per_sample(module: nn.Module, a, d, blocks, route: str):
    """Yield (block, projected rows) for the module's tracked parameters from one recorded call.

    ``a``: the call's (args, kwargs), detached; ``d``: one cotangent per flattened output (None where
    none arrived). One route: the per-sample gradients are formed in full, then projected.
    """
    args, kwargs = a
    named = dict(module.named_parameters())
    primals = {name: named[name].detach() for name in blocks}
    grads = per_sample_vjp(module_call(module), primals, args, kwargs, d)
    for name, block in blocks.items():
        g = grads[name]
        yield block, block.project_matrix(g.to(block.dtype).reshape(g.shape[0], block.rows, block.cols))
