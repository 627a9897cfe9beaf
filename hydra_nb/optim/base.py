"""``OptimizerRule``: everything hydra_nb knows about one family of ``torch.optim`` optimizers.

A rule says which configurations it can follow (``validate``), which per-step hyperparameters of
the optimizer a store records (its *trace*) and how to read them right before ``step()``, how
per-sample gradients enter the log (``precondition``), the fast recursion's per-step transition
(``transitions``), forward exact mode's update (``exact_update``), how to read the optimizer's
state, and how one step maps (θ_t, state_t, g_t) to (θ_{t+1}, state_{t+1}) as a differentiable
function (``functional_step``) doing the same floating-point operations as torch's own step on
the CPU.

The fast recursion, for every rule: with h = dθ/dw_i and b the derivative of the rule's one
auxiliary state (SGD's momentum buffer, Adam's first moment in preconditioned units), the
Hessian-free response to sample i is (h, b) ← A_t·(h, b) + e_t·u_t per parameter tensor, u_t the
sample's logged (projected) row at step t and A_t (2×2), e_t (2) scalars from the trace. Queries
turn this into response coefficients (``hydra_nb.hypergrad.response_coefficients``).

Every rule's trace has the boolean field ``active``: whether the parameter had a ``.grad`` at
that step. torch's optimizers skip a parameter without one (its value and its state, step
counts included, stay as they were), and so does every rule.

Rules are found through the registry in ``hydra_nb/optim/__init__.py`` (``rule_for``,
``rule_named``); nothing else in hydra_nb branches on optimizer names or trace fields.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from ..errors import TrackingConfigError
from ..params import ParamLayout

Row = dict[str, np.ndarray]  # one trace row: field -> (P,) array, one entry per tracked parameter
State = dict[str, list]  # state field -> one tensor (or None: torch has none yet) per tracked parameter


class OptimizerRule(ABC):
    """One optimizer family: its trace, its state and its step as a function.

    Class attributes (``name`` may be set per instance when one class covers several optimizers):

    - ``name``: what a store records in ``attrs["hydra_nb"]["optimizer"]``.
    - ``names``: every name this class answers to (``rule_named``).
    - ``summary``: how refusals list it among the supported optimizers.
    - ``trace_fields``: the per-step, per-parameter arrays a store holds (``trace/<field>``).
    - ``fast_fields``: the subset the fast recursion reads; stores written by older hydra_nb
      versions may hold only these, so a reader requires only them.
    - ``bool_fields``: trace fields stored as booleans (the others are float64).
    - ``state_fields``: the per-parameter optimizer state ``read_state`` returns and
      ``functional_step`` takes and returns.
    - ``supports_exact``: whether forward exact mode (``exact_update``) follows this optimizer.
    - ``full_rows``: whether each step's per-sample gradients must be held in full until the step
      (``precondition`` needs them) instead of being projected in the capture hooks.
    - ``curvature_rows``: whether the logged rows are the raw injections u = c·∇ℓ and the exact recursion's
      Hessian term enters where they do (``e_t·(H_t·h + u)``), so that a curvature estimate built from a
      step's rows (``hydra_nb.curvature``; ``mode="curvature"``) models it. SGD: yes. Adam/AdamW: no (the
      rows are preconditioned by D_t, which the store does not hold).
    """

    name: str
    names: ClassVar[tuple[str, ...]]
    summary: ClassVar[str]
    trace_fields: ClassVar[tuple[str, ...]]
    fast_fields: ClassVar[tuple[str, ...]]
    bool_fields: ClassVar[frozenset[str]]
    state_fields: ClassVar[tuple[str, ...]]
    supports_exact: ClassVar[bool] = False
    full_rows: ClassVar[bool] = False
    curvature_rows: ClassVar[bool] = False

    # -- identity --------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def claims(cls, optimizer: torch.optim.Optimizer) -> "OptimizerRule | None":
        """The rule for ``optimizer`` if this class follows it, else None (the registry asks each class)."""

    @classmethod
    @abstractmethod
    def from_name(cls, name: str) -> "OptimizerRule":
        """The rule recorded as ``name`` (one of ``cls.names``) in a store."""

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other.name == self.name

    def __hash__(self) -> int:
        return hash((type(self), self.name))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def field_dtype(self, field: str) -> str:
        """The numpy dtype name of trace array ``field`` in a store."""
        return "bool" if field in self.bool_fields else "float64"

    def empty_row(self, n: int) -> Row:
        """A trace row of zeros (False) for ``n`` parameters, each field with its dtype."""
        return {f: np.zeros(n, dtype=self.field_dtype(f)) for f in self.trace_fields}

    # -- checks ----------------------------------------------------------------------------
    def validate(self, optimizer: torch.optim.Optimizer, mode: str) -> None:
        """Raise a ``TrackingConfigError`` saying what to do if hydra_nb cannot track ``optimizer`` in ``mode``.

        The base check refuses ``maximize=True`` and, for a rule without ``supports_exact``,
        ``mode="exact"`` (``exact_refusal``); rules add their own refusals after these.
        """
        for g in optimizer.param_groups:
            if g.get("maximize", False):
                raise TrackingConfigError(
                    f"{self.name} with maximize=True is not supported: minimise the negated loss instead.")
        if mode == "exact" and not self.supports_exact:
            raise TrackingConfigError(self.exact_refusal())

    def exact_refusal(self) -> str:
        """Why ``mode="exact"`` is refused for this optimizer, and what to do instead."""
        return (f"mode='exact' is not available for {self.name}: hydra_nb has no exact recursion for it. "
                "Use mode='fast'.")

    # -- what a store records --------------------------------------------------------------
    @abstractmethod
    def read_step(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter], layout: ParamLayout) -> Row:
        """The trace row of the step about to be taken (call right before ``optimizer.step()``)."""

    @abstractmethod
    def read_state(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> State:
        """The optimizer's state as ``functional_step`` takes it: ``{field: [detached copy or None per param]}``."""

    # -- the optimizer itself (``Store.add_rows`` drives a real one through a recorded run) ----------
    def torch_optimizer(self, spec: list[dict]) -> torch.optim.Optimizer:
        """This rule's ``torch.optim`` optimizer over the parameter-group dicts ``spec``."""
        raise NotImplementedError(f"hydra_nb cannot rebuild a {self.name} optimizer from a store")

    def group_options(self, values: dict) -> dict:
        """A parameter group's hyperparameters as torch names them, from one group's trace values
        (``group_values``): the inverse of ``read_step`` for the fields a group holds."""
        raise NotImplementedError(f"hydra_nb cannot rebuild a {self.name} optimizer from a store")

    def make_optimizer(self, groups: list[list[nn.Parameter]], row: Row, layout: ParamLayout) -> torch.optim.Optimizer:
        """A ``torch.optim`` optimizer of this rule's kind over ``groups`` (one list per recorded parameter group,
        in the layout's group order), with the hyperparameters of trace ``row`` (``apply_row``)."""
        values = group_values([p for g in groups for p in g], layout, row, len(groups))
        return self.torch_optimizer([{"params": g, **self.group_options(v)} if v is not None else {"params": g}
                                     for g, v in zip(groups, values)])

    def apply_row(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter], layout: ParamLayout,
                  row: Row) -> None:
        """Set every parameter group's hyperparameters to those trace ``row`` recorded (call before ``step``).
        A scheduler's effect is in the row; an option this torch's optimizer does not hold is left out."""
        for group, v in zip(optimizer.param_groups, group_values(params, layout, row, len(optimizer.param_groups))):
            if v is not None:
                group.update({k: x for k, x in self.group_options(v).items() if k in group})

    def load_state(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter], state: State,
                   row: Row | None) -> None:
        """Put ``state`` (as ``read_state`` returns it; None: torch holds none for that parameter) into
        ``optimizer``, for the step whose trace row is ``row`` (None: no step follows). The inverse of
        ``read_state``; a rule whose state has a step count takes it from ``row``."""
        raise NotImplementedError(f"hydra_nb cannot rebuild a {self.name} optimizer from a store")

    # -- the log and the recursions ------------------------------------------------------------
    def precondition(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter], layout: ParamLayout,
                     rows: torch.Tensor) -> torch.Tensor:
        """The full per-sample gradient rows (R, D) of the step about to be taken, as they enter the log.

        Called before ``step()`` with every row in full when ``full_rows`` is set (they are projected
        afterwards); the base rule logs gradients as they are.
        """
        return rows

    @abstractmethod
    def transitions(self, trace: Row) -> tuple[np.ndarray, np.ndarray]:
        """(A, e) of the fast recursion (h, b) ← A·(h, b) + e·u for trace arrays of shape (..., P).

        Reads only ``fast_fields``. Returns A of shape (..., P, 2, 2) and e of shape (..., P, 2);
        identity and zero where the parameter is not ``active``.
        """

    def exact_update(self, h: torch.Tensor, b: torch.Tensor, hvp: torch.Tensor, inj: torch.Tensor, row: Row,
                     k: int) -> None:
        """Forward exact mode: advance (h, b) of active parameter ``k`` in place over one step.

        ``h``, ``b`` (tracked samples × the parameter's entries) are dθ/dw_i and the derivative of
        the optimizer's state; ``hvp`` = H_t·h (the batch loss's Hessian) and ``inj`` = u_t (the
        sample's gradient as it entered ``.grad``), so that dg/dw_i = hvp + inj.
        Only for rules with ``supports_exact``.
        """
        raise NotImplementedError(f"{self.name} has no exact mode")

    # -- the step as a function --------------------------------------------------------------
    @abstractmethod
    def functional_step(self, params: list[torch.Tensor], grads: list[torch.Tensor | None], state: State,
                        row: Row) -> tuple[list[torch.Tensor], State]:
        """(θ_{t+1}, state_{t+1}) from (θ_t, g_t, state_t) and the step's trace row, out of place.

        ``params`` and ``grads`` in the layout's order, ``state`` as ``read_state`` returns it,
        ``row`` as ``read_step`` records it. A parameter with ``row["active"][k]`` False passes
        through unchanged with its state. Differentiable with respect to params, grads and state
        (finite derivatives everywhere the step is used), and on the CPU bitwise equal to what
        ``optimizer.step()`` computes from the same values.
        """

    @staticmethod
    def _check_lengths(params, grads, state: State, fields) -> None:
        n = len(params)
        if len(grads) != n or any(len(state.get(f, [None] * n)) != n for f in fields):
            raise ValueError(f"functional_step: params ({n}), grads ({len(grads)}) and every state list "
                             "must have one entry per tracked parameter, in the layout's order.")


def scalar(x) -> float:
    """A hyperparameter as a Python float (torch allows 0-dim tensors for lr and betas)."""
    return float(x.item() if torch.is_tensor(x) else x)


def copy_or_none(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().clone()


def group_values(params: list[nn.Parameter], layout: ParamLayout, row: Row, n_groups: int) -> list[dict | None]:
    """Per parameter group, the trace row's values of its first tracked parameter (every parameter of a group
    shares them), by field; None for a group without tracked parameters."""
    out: list[dict | None] = [None] * n_groups
    for k, slot in enumerate(layout.slots):
        if out[slot.group] is None:
            out[slot.group] = {f: v[k] for f, v in row.items()}
    return out
