"""The optimizers hydra_nb follows: one ``OptimizerRule`` per family, found through ``RULES``.

``rule_for(optimizer)`` gives the rule that tracks a live optimizer (or a ``TrackingConfigError``
listing what is supported); ``rule_named(name)`` the rule a store recorded as
``attrs["hydra_nb"]["optimizer"]``. To add an optimizer: write ``optim/<name>.py`` with its rule
and add the class to ``RULES`` (docs/architecture.md, "An optimizer").
"""

from __future__ import annotations

import torch

from ..errors import TrackingConfigError
from .adam import AdamRule
from .base import OptimizerRule
from .sgd import SGDRule

RULES: tuple[type[OptimizerRule], ...] = (SGDRule, AdamRule)


def rule_for(optimizer) -> OptimizerRule:
    """The rule of ``optimizer``: the first class in ``RULES`` that claims it."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TrackingConfigError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}.")
    for cls in RULES:
        rule = cls.claims(optimizer)
        if rule is not None:
            return rule
    supported = " and ".join(cls.summary for cls in RULES)
    raise TrackingConfigError(
        f"hydra_nb tracks {supported}; {type(optimizer).__name__} is not supported yet. "
        "Train with one of these to use hydra_nb.")


def rule_named(name: str) -> OptimizerRule:
    """The rule a store recorded as ``name``; ``KeyError`` naming the known ones if there is none."""
    for cls in RULES:
        if name in cls.names:
            return cls.from_name(name)
    known = ", ".join(n for cls in RULES for n in cls.names)
    raise KeyError(f"unknown optimizer {name!r} (this hydra_nb knows {known})")


__all__ = ["RULES", "OptimizerRule", "SGDRule", "AdamRule", "rule_for", "rule_named"]
