"""Queries on a run store: contributions, trajectories, hypergradients.

    contributions[j, i] = −∇L(z_j; θ_S)ᵀ · h_S(i)

where S is the checkpoint's step, L is ``loss_fn`` on the single test sample z_j
(model in eval mode), and h_S(i) = dθ_S/dw_i is

    fast:   h_S(i) = Σ_{rows r of sample i, step t_r < S} c_{t_r→S} · u_r     (per parameter block,
            c from ``hypergrad.response_coefficients``, u_r the stored projected gradients)
    exact:  the stored full-dimensional h at that checkpoint.

The log is read chunk by chunk (one chunk of rows and the coefficients in memory at a time).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .hypergrad import response_coefficients
from .params import ParamLayout
from .projection import Projector
from .store import StoreReader


def _default_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


class Store(StoreReader):
    """A tracked run on disk, opened read-only for queries. Create with :func:`open_store`."""

    def __init__(self, path, loss_fn: Callable | None = None):
        super().__init__(path)
        self._custom_loss = bool(self.meta["config"].get("custom_loss"))
        self.loss_fn = loss_fn

    # -- queries ----------------------------------------------------------------------------
    def _loss(self, loss_fn):
        if loss_fn is not None:
            return loss_fn
        if self.loss_fn is not None:
            return self.loss_fn
        if self._custom_loss:
            raise ValueError(
                f"This run was tracked with a custom loss_fn ({self.meta['config'].get('loss_fn')!r}); pass the same "
                "loss_fn=... to the query (a store never holds code).")
        return _default_loss

    def _check_mode(self, mode: str | None) -> str:
        mode = mode or self.mode
        if mode not in ("fast", "exact"):
            raise ValueError(f"mode must be 'fast', 'exact' or None, got {mode!r}.")
        if mode == "exact" and self.mode != "exact":
            raise ValueError("This store was tracked in fast mode; exact contributions need a run with mode='exact'.")
        return mode

    def test_gradients(self, model: nn.Module, inputs, targets, checkpoint: int = -1, loss_fn=None) -> torch.Tensor:
        """∇_θ L(z_j; θ) at a checkpoint's parameters, one flat row per test sample."""
        c = self._checkpoint_index(checkpoint)
        return test_gradients(model, self.layout, self.params_at(c), self._buffers_at(c), self.meta["buffers"],
                              inputs, targets, self._loss(loss_fn))

    def contributions(self, model: nn.Module, inputs, targets, mode: str | None = None, *, loss_fn=None,
                      checkpoint: int = -1) -> np.ndarray:
        """contributions[j, i] = −∂L(z_j; θ_T)/∂w_i for test samples z_j = (inputs[j], targets[j]).

        Columns follow ``tracked_indices``. Positive: training sample i lowered z_j's loss.
        ``mode="fast"`` on an exact store gives the Hessian-free estimate for the same samples.
        """
        mode = self._check_mode(mode)
        c = self._checkpoint_index(checkpoint)
        G = self.test_gradients(model, inputs, targets, c, loss_fn)
        if mode == "exact":
            h = torch.from_numpy(np.asarray(self.group["exact/h"][c])).to(G.dtype)
            return (-(G @ h.T)).numpy()
        return _fast_contributions(self, [G], [int(self.checkpoint_steps[c])], self.tracked_indices)[:, 0, :]

    def trajectory(self, model: nn.Module, inputs, targets, train_indices, mode: str | None = None, *,
                   loss_fn=None) -> tuple[np.ndarray, np.ndarray]:
        """Contributions of ``train_indices`` for training stopped at each checkpoint.

        Returns (steps, values) with steps (n_checkpoints,) and values
        (n_test, n_checkpoints, len(train_indices)).
        """
        mode = self._check_mode(mode)
        train_indices = np.asarray(train_indices, dtype=np.int64).reshape(-1)
        tracked = self.tracked_indices
        pos = _positions(tracked, self.n_train)
        if train_indices.size and (train_indices.min() < 0 or train_indices.max() >= self.n_train
                                   or (pos[train_indices] < 0).any()):
            raise ValueError("train_indices must be dataset indices of tracked samples (see store.tracked_indices).")
        Gs = [self.test_gradients(model, inputs, targets, c, loss_fn) for c in range(self._n_checkpoints)]
        steps = self.checkpoint_steps.copy()
        if mode == "exact":
            slots = pos[train_indices]
            values = np.stack([
                (-(G @ torch.from_numpy(np.asarray(self.group["exact/h"][c])).to(G.dtype)[slots].T)).numpy()
                for c, G in enumerate(Gs)], axis=1)
            return steps, values
        return steps, _fast_contributions(self, Gs, list(steps), train_indices)

    def hypergradients(self, checkpoint: int = -1, train_indices=None, mode: str | None = None) -> np.ndarray:
        """h_S(i) = dθ_S/dw_i at a checkpoint: projected (fast) or full-dimensional (exact), one row per sample."""
        mode = self._check_mode(mode)
        c = self._checkpoint_index(checkpoint)
        tracked = self.tracked_indices
        idx = tracked if train_indices is None else np.asarray(train_indices, dtype=np.int64).reshape(-1)
        pos = _positions(tracked, self.n_train)
        if (pos[idx] < 0).any():
            raise ValueError("train_indices must be tracked samples.")
        if mode == "exact":
            return np.asarray(self.group["exact/h"][c])[pos[idx]]
        S = int(self.checkpoint_steps[c])
        coef = response_coefficients(self.trace(S), [S])[0]
        col = _positions(idx, self.n_train)
        dtype = np.dtype(self.group["log/grad"].dtype)
        out = torch.zeros(len(idx), self.projector.dim, dtype=torch.float64 if dtype == np.float64 else torch.float32)
        for samples, steps, rows in self.log_chunks(S):
            keep = col[samples] >= 0
            if not keep.any():
                continue
            r = _scale_rows(torch.from_numpy(rows[keep]).to(out.dtype), coef[steps[keep]], self.projector)
            out.index_add_(0, torch.from_numpy(col[samples[keep]]), r)
        return out.numpy()


def open_store(path, loss_fn: Callable | None = None) -> Store:
    """Open a hydra_nb store for queries. ``loss_fn`` is needed only if the run used a custom one."""
    return Store(path, loss_fn=loss_fn)


def _positions(indices: np.ndarray, n: int) -> np.ndarray:
    pos = np.full(n, -1, dtype=np.int64)
    pos[indices] = np.arange(len(indices))
    return pos


def _scale_rows(rows: torch.Tensor, coef: np.ndarray, projector: Projector) -> torch.Tensor:
    """rows[r, block p] *= coef[r, p]: each row's gradient times its step's response coefficient."""
    scale = torch.from_numpy(coef).to(rows.dtype)
    out = torch.empty_like(rows)
    for p, b in enumerate(projector.blocks):
        out[:, b.offset : b.stop] = rows[:, b.offset : b.stop] * scale[:, p : p + 1]
    return out


def _fast_contributions(store: Store, Gs: list[torch.Tensor], stops: list[int], columns: np.ndarray) -> np.ndarray:
    """values[j, c, i] = −Σ_{rows r of columns[i], t_r < stops[c]} ⟨P·G_c[j], c_{t_r→stops[c]} ∘ u_r⟩."""
    projector = store.projector
    col = _positions(columns, store.n_train)
    n = Gs[0].shape[0]
    log_dtype = np.dtype(store.group["log/grad"].dtype)
    dtype = torch.float64 if (log_dtype == np.float64 or Gs[0].dtype == torch.float64) else torch.float32
    Ps = [projector.to(dtype=dtype).project_flat(G.to(dtype)) for G in Gs]  # (n, k) each
    stops = np.asarray(stops, dtype=np.int64)
    last = int(stops.max()) if stops.size else 0
    coefs = response_coefficients(store.trace(last), stops) if last else np.zeros((len(stops), 0, len(projector.blocks)))
    values = torch.zeros(n, len(stops), len(columns), dtype=dtype)
    for samples, steps, rows in store.log_chunks(last):
        keep = col[samples] >= 0
        if not keep.all():
            samples, steps, rows = samples[keep], steps[keep], rows[keep]
        if len(samples) == 0:
            continue
        rows_t = torch.from_numpy(rows).to(dtype)
        target = torch.from_numpy(col[samples])
        for ci in range(len(stops)):
            live = steps < stops[ci]
            if not live.any():
                continue
            r = _scale_rows(rows_t[torch.from_numpy(live)], coefs[ci, steps[live]], projector)
            values[:, ci, :].index_add_(1, target[torch.from_numpy(live)], -(Ps[ci] @ r.T))
    return values.numpy()


def test_gradients(model: nn.Module, layout: ParamLayout, flat_params: np.ndarray, flat_buffers: np.ndarray | None,
                   buffers_meta: list[dict], inputs, targets, loss_fn, batch_size: int = 64) -> torch.Tensor:
    """∇_θ loss_fn(model(x_j; θ), y_j) for each test sample, with θ (and buffers) from the store.

    The model's architecture is used, never its current weights; it runs in eval mode.
    """
    if (why := layout.matches(model)) is not None:
        raise ValueError(f"The model does not match the store's parameters: {why}. Pass the architecture the run trained.")
    device = next(model.parameters()).device
    dtype = torch.from_numpy(flat_params[:0]).dtype
    theta = {k: v.to(device) for k, v in layout.unflatten(torch.from_numpy(flat_params)).items()}
    fixed = {}
    if flat_buffers is not None:
        named = dict(model.named_buffers())
        for b in buffers_meta:
            n = 1
            for s in b["shape"]:
                n *= s
            fixed[b["name"]] = torch.from_numpy(flat_buffers[b["offset"]: b["offset"] + n]).reshape(b["shape"]).to(
                device=device, dtype=named[b["name"]].dtype)
    inputs = torch.as_tensor(inputs).to(device)
    targets = torch.as_tensor(targets).to(device)
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(f"inputs ({inputs.shape[0]}) and targets ({targets.shape[0]}) differ in length.")
    if inputs.is_floating_point():
        inputs = inputs.to(dtype)
    was_training = model.training
    model.eval()
    try:
        def loss_one(params, x, y):
            out = torch.func.functional_call(model, {**params, **fixed}, (x.unsqueeze(0),))
            return loss_fn(out, y.unsqueeze(0)).sum()

        vmapped = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))
        one = torch.func.grad(loss_one)

        def looped(params, xs, ys):  # for models or losses vmap cannot batch (e.g. F.one_hot)
            gs = [one(params, x, y) for x, y in zip(xs, ys)]
            return {name: torch.stack([g[name] for g in gs]) for name in params}

        per_sample = vmapped
        rows = []
        for start in range(0, inputs.shape[0], batch_size):
            xs, ys = inputs[start:start + batch_size], targets[start:start + batch_size]
            try:
                g = per_sample(theta, xs, ys)
            except RuntimeError:
                if per_sample is looped:
                    raise
                per_sample = looped
                g = per_sample(theta, xs, ys)
            rows.append(layout.flatten([g[s.name] for s in layout.slots], batch_dims=1).detach().cpu())
    finally:
        model.train(was_training)
    if not rows:
        return torch.zeros(0, layout.size, dtype=dtype)
    return torch.cat(rows)
