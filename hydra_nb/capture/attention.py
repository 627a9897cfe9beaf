"""MultiheadAttention: per-sample gradients of its projections, followed through its own forward.

``nn.MultiheadAttention`` never calls its ``out_proj`` module: its forward hands the projection weights
to ``F.multi_head_attention_forward``, which applies them with ``F.linear`` (the packed in-projection
once for self-attention, or its row blocks q | k v or q | k | v, or separate q/k/v weights when
kdim/vdim differ; then the out-projection). Each such call is a linear layer y = x Wᵀ + b on the
rows W[r0:r1] of one parameter, so, with δ = ∂loss/∂y from the user's backward and l over positions,

    in_proj_weight[r0:r1]   G_b = Σ_l δ_bl x_blᵀ          in_proj_bias[r0:r1]   g_b = Σ_l δ_bl
    out_proj.weight         G_b = Σ_l δ_bl o_blᵀ          out_proj.bias         g_b = Σ_l δ_bl

(o: the attention output before the out-projection), projected by ``linear.per_sample`` on the rows
r0..r1 of the parameter's block (T is linear, so the row blocks' sketches add up to the parameter's).
While the module's forward runs, ``F.linear`` is replaced by a wrapper that calls the original with the
same arguments (the forward computes exactly what it computes untracked) and, for calls on the
module's tracked parameters, keeps x and hooks y's gradient. A forward in which a tracked parameter
was not seen in such a call (a future torch computing the projections otherwise) is reported as a
failure rather than captured wrongly. ``add_bias_kv`` (bias_k, bias_v enter through a concatenation,
not ``F.linear``) goes to the ``torch.func`` fallback.
"""

from __future__ import annotations

import threading
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TrackingFailure
from ..projection import Block
from . import linear

_PARAMS = ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight",
           "out_proj.weight", "out_proj.bias")


def check(module: nn.MultiheadAttention) -> bool:
    """The rule follows every configuration except ``add_bias_kv`` (the fallback captures that one)."""
    return module.bias_k is None and module.bias_v is None


# -- F.linear, followed while a MultiheadAttention's forward runs ---------------------------------
_original_linear = F.linear
_following = threading.local()  # .calls: the function told about each F.linear call in this thread, or None
_installed = 0
_install_lock = threading.Lock()


def _linear(input, weight, bias=None):
    out = _original_linear(input, weight, bias)
    calls = getattr(_following, "calls", None)
    if calls is not None:
        calls(input, weight, bias, out)
    return out


def _install() -> None:
    global _installed
    with _install_lock:
        _installed += 1
        F.linear = _linear


def _uninstall() -> None:
    global _installed
    with _install_lock:
        _installed -= 1
        if _installed == 0:
            F.linear = _original_linear


def _rows_of(t: torch.Tensor | None, params: dict[str, torch.Tensor]) -> tuple[str, int, int] | None:
    """(parameter name, first row, end row) if ``t`` is one of ``params`` or a block of its rows."""
    if t is None:
        return None
    for name, p in params.items():
        if t is p:
            return name, 0, p.shape[0]
        if t._base is p:
            first = (t.storage_offset() - p.storage_offset()) // p.stride(0)
            return name, first, first + t.shape[0]
    return None


class _RowBlocks:
    """Blocks of a parameter's rows r0..r1 (``Block.row_block``), made once per (parameter, r0, r1)."""

    def __init__(self, blocks: dict[str, Block]):
        self.blocks = blocks
        self._cache: dict[tuple[str, int, int], Block] = {}

    def get(self, name: str, first: int, end: int) -> Block:
        key = (name, first, end)
        block = self._cache.get(key)
        if block is None:
            block = self._cache[key] = self.blocks[name].row_block(first, end)
        return block


def follow(module: nn.MultiheadAttention, blocks: dict[str, Block], capture) -> list:
    """Hooks on ``module`` that capture its projections' per-sample gradients into ``capture`` (see the module
    docstring); returns their handles. ``blocks``: {tracked parameter name: its ``Block``}."""
    tracked = {name: p for name, p in module.named_parameters() if name in blocks}
    rows = _RowBlocks(blocks)

    def pre_hook(mod, args, kwargs):
        query = args[0] if args else kwargs.get("query")
        if not torch.is_tensor(query) or query.dim() != 3:
            return  # unbatched input: nothing to capture per sample (the .grad check would say so)
        B = query.shape[0 if mod.batch_first else 1]
        emit = capture.sink(B)
        if emit is None:
            return
        seen: set[str] = set()

        def calls(x, weight, bias, y):
            w = _rows_of(weight, tracked)
            b = _rows_of(bias, tracked)
            if (w is None and b is None) or not y.requires_grad:
                return
            for part in (w, b):
                if part is not None:
                    seen.add(part[0])
            x = x.detach()
            y.register_hook(_on_grad(emit, x, w, b, B, rows, capture.route))

        _following.calls = calls
        _following.seen = seen
        _install()

    def post_hook(mod, args, kwargs, output):
        calls = getattr(_following, "calls", None)
        if calls is None:
            return
        seen = _following.seen
        _following.calls = _following.seen = None
        _uninstall()
        missing = sorted(set(tracked) - seen)
        if missing:
            capture.fail(TrackingFailure(
                f"hydra_nb could not follow {', '.join(missing)} of a MultiheadAttention through F.linear in this "
                f"torch version ({torch.__version__}); their per-sample gradients were not captured."))

    return [module.register_forward_pre_hook(pre_hook, with_kwargs=True),
            module.register_forward_hook(post_hook, with_kwargs=True, always_call=True)]


def _on_grad(emit: Callable, x: torch.Tensor, w, b, B: int, rows: _RowBlocks, route: str):
    """The backward hook of one F.linear output: its per-sample rows, batch first (the functional forward
    works on (positions, batch, features), or (positions · batch, features) for the out-projection)."""

    def hook(d):
        def per_sample():
            a, dd = _batch_first(x, B), _batch_first(d.detach(), B)
            parts = {}
            if w is not None:
                parts["weight"] = rows.get(*w)
            if b is not None:
                parts["bias"] = rows.get(*b)
            return linear.per_sample(None, a, dd, parts, route)

        emit(per_sample)

    return hook


def _batch_first(t: torch.Tensor, B: int) -> torch.Tensor:
    if t.dim() == 2:  # (positions · batch, features), positions first
        t = t.reshape(-1, B, t.shape[-1])
    return t.transpose(0, 1)
