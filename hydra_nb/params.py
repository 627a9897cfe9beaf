"""Which parameters are tracked, and how they lie in one flat vector.

The hypergradient h = dθ/dw_i lives in the space of the trainable parameters
that the optimizer updates. ``ParamLayout`` fixes their order, names, shapes
and offsets, so that a flat vector (a checkpoint, a full-dimensional
hypergradient) can be stored as a plain array and read back without pickle.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import TrackingConfigError


@dataclass(frozen=True)
class ParamSlot:
    name: str
    shape: tuple[int, ...]
    offset: int
    group: int  # index of the optimizer's param group

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def rows(self) -> int:
        """Rows of the parameter seen as a matrix: its first dimension (1 for a scalar)."""
        return self.shape[0] if self.shape else 1

    @property
    def cols(self) -> int:
        """Columns of the matrix view: the product of the remaining dimensions."""
        return self.numel // self.rows if self.numel else 0


class ParamLayout:
    """Ordered trainable parameters of a model, as the optimizer groups them."""

    def __init__(self, slots: list[ParamSlot]):
        self.slots = slots
        self.size = sum(s.numel for s in slots)
        self.index = {s.name: i for i, s in enumerate(slots)}

    @classmethod
    def from_model(cls, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple["ParamLayout", list[nn.Parameter]]:
        """Parameters that the optimizer updates, in the model's order.

        Raises if the optimizer holds a parameter the model does not have.
        """
        group_of: dict[int, int] = {}
        for g, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                group_of[id(p)] = g
        slots, tensors, seen = [], [], set()
        offset = 0
        for name, p in model.named_parameters():
            if id(p) in seen or id(p) not in group_of or not p.requires_grad:
                continue
            seen.add(id(p))
            slot = ParamSlot(name, tuple(p.shape), offset, group_of[id(p)])
            offset += slot.numel
            slots.append(slot)
            tensors.append(p)
        missing = [i for i in group_of if i not in seen]
        if missing:
            frozen = sum(1 for p in model.parameters() if id(p) in group_of and not p.requires_grad)
            if frozen == len(missing):
                pass  # frozen parameters in the optimizer never move: nothing to track
            else:
                raise TrackingConfigError(
                    f"The optimizer holds {len(missing)} parameter(s) that are not parameters of the model "
                    "passed to hydra_nb.track. Pass the model whose parameters the optimizer updates."
                )
        if not slots:
            raise TrackingConfigError(
                "The model has no trainable parameter that the optimizer updates: nothing to track."
            )
        return cls(slots), tensors

    def to_json(self) -> list[dict]:
        return [{"name": s.name, "shape": list(s.shape), "offset": s.offset, "group": s.group} for s in self.slots]

    @classmethod
    def from_json(cls, items: list[dict]) -> "ParamLayout":
        return cls([ParamSlot(d["name"], tuple(d["shape"]), int(d["offset"]), int(d["group"])) for d in items])

    def flatten(self, tensors: list[torch.Tensor], batch_dims: int = 0) -> torch.Tensor:
        """Concatenate per-parameter tensors (each with ``batch_dims`` leading dims) into one flat vector."""
        parts = [t.reshape(*t.shape[:batch_dims], -1) for t in tensors]
        return torch.cat(parts, dim=batch_dims)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat (..., size) tensor into named (..., *shape) views."""
        lead = flat.shape[:-1]
        return {
            s.name: flat[..., s.offset : s.offset + s.numel].reshape(*lead, *s.shape) for s in self.slots
        }

    def matches(self, model: nn.Module) -> str | None:
        """None if ``model`` has every parameter of this layout with the same shape, else why not."""
        named = dict(model.named_parameters())
        for s in self.slots:
            if s.name not in named:
                return f"the model has no parameter named {s.name!r}"
            if tuple(named[s.name].shape) != s.shape:
                return f"parameter {s.name!r} has shape {tuple(named[s.name].shape)}, the store has {s.shape}"
        return None
