"""The layer rules: one table from module type to the rule that forms its per-sample gradients.

A ``LayerRule`` holds

- ``per_sample(module, a, δ, blocks, route)``: yields ``(block, rows)``, the (B, block.dim) projected
  per-sample gradients of each of the module's tracked parameters (``blocks``: {parameter name
  relative to the module: its ``Block`` of the projector}; ``route``: see ``routes.py``). For a layer
  rule, a is the module's first input and δ = ∂loss/∂output, and it runs in the backward hook of the
  output; for the fallback (``deferred``), a is the call's (args, kwargs) and δ the cotangents of its
  flattened outputs, and it runs at ``step()``;
- ``check(module)``: True if the rule follows this module, False to capture it with the fallback
  instead, or a ``TrackingConfigError`` saying what to change for a configuration nothing can follow.

Each rule lives in its own file, which states its equation: ``linear.py``, ``conv.py``,
``embedding.py``, ``layernorm.py``, ``attention.py`` (which follows the module's functional
projections with hooks of its own: ``follow``), ``fallback.py``. ``rule_for(module)`` walks the module's MRO, so a
subclass gets its base's rule as long as it keeps the base's ``forward``.

To add a layer: write ``capture/<layer>.py`` with ``per_sample`` (and ``check`` if it refuses some
configurations), add its entry to ``LAYER_RULES`` below, and add a model using it to
``tests/test_capture_layers.py`` (a test there checks that every entry is exercised).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterable, NamedTuple

import torch
from torch import nn

from ..projection import Block
from . import attention, conv, embedding, fallback, layernorm, linear

PerSample = Callable[..., Iterable[tuple[Block, torch.Tensor]]]  # (module, a, δ, blocks, route)


def _follows_any(module: nn.Module) -> bool:
    return True


@dataclass(frozen=True)
class LayerRule:
    """How the per-sample gradients of one module type are formed (see the module docstring)."""

    name: str  # what ``GradientCapture.owners`` reports (tests, benchmarks)
    per_sample: PerSample | None
    check: Callable[[nn.Module], bool] = _follows_any
    deferred: bool = False  # the call is recorded whole and differentiated at step() (the fallback)
    whole: bool = False  # the rule also owns the parameters of the module's submodules (captured as a unit)
    # (module, blocks, capture) → hook handles: a rule that follows the module's internal calls with its own
    # hooks (``per_sample`` unused), emitting rows through ``capture.sink``
    follow: Callable | None = None


FALLBACK = LayerRule("fallback", fallback.per_sample, deferred=True)
_WHOLE_FALLBACK = replace(FALLBACK, whole=True)  # for a unit (MultiheadAttention) its own rule does not follow
_CONV_RULE = LayerRule("conv", conv.per_sample, conv.check)

LAYER_RULES: dict[type[nn.Module], LayerRule] = {
    nn.Linear: LayerRule("linear", linear.per_sample),
    nn.Conv1d: _CONV_RULE,
    nn.Conv2d: _CONV_RULE,
    nn.Conv3d: _CONV_RULE,
    nn.Embedding: LayerRule("embedding", embedding.per_sample, embedding.check),
    nn.LayerNorm: LayerRule("layernorm", layernorm.per_sample),
    # its forward uses out_proj's weights functionally (out_proj's own hooks never see them): one unit, whose
    # F.linear calls the rule follows
    nn.MultiheadAttention: LayerRule("attention", None, attention.check, whole=True, follow=attention.follow),
}


def rule_for(module: nn.Module) -> LayerRule:
    """The rule of the nearest type in ``module``'s MRO that has one, if it follows the module; else ``FALLBACK``.

    A subclass that overrides ``forward`` computes something its base's rule does not know: it gets
    the fallback, unless its own type is in ``LAYER_RULES``. Raises ``TrackingConfigError`` for a
    configuration the rule refuses.
    """
    for cls in type(module).__mro__:
        rule = LAYER_RULES.get(cls)
        if rule is None:
            continue
        if not rule.check(module):
            return _WHOLE_FALLBACK if rule.whole else FALLBACK
        if not rule.deferred and type(module).forward is not cls.forward:
            return FALLBACK
        return rule
    return FALLBACK


class Owner(NamedTuple):
    """A module that captures tracked parameters, and the rule it captures them by."""

    module: nn.Module
    owned: list[tuple[str, int]]  # (parameter name relative to the module, index among the tracked parameters)
    rule: LayerRule


def owners(model: nn.Module, tracked: dict[int, int]) -> list[Owner]:
    """Every module of ``model`` that owns some tracked parameter (``tracked``: id(parameter) → index)."""
    result = []
    claimed: set[int] = set()  # submodules of a module captured as a unit
    for module in model.modules():
        if id(module) in claimed or not any(id(p) in tracked for p in module.parameters()):
            continue
        rule = rule_for(module)
        if rule.whole:
            claimed.update(id(sub) for sub in module.modules())
        owned = [(n, tracked[id(p)]) for n, p in module.named_parameters(recurse=rule.whole) if id(p) in tracked]
        if owned:
            result.append(Owner(module, owned, rule))
    return result
