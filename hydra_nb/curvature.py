"""Curvature-aware hypergradients from the stored projected rows alone (no retraining, no training data).

Fast mode drops the Hessian term of the HYDRA recursion. Written for any optimizer rule whose fast
recursion is ``(h, b) ← A_t·(h, b) + e_t·u`` (``OptimizerRule.transitions``: SGD with momentum, dampening,
Nesterov, weight decay; Adam/AdamW's approximation), the exact recursion puts the Hessian term where
the injection enters:

    (h, b) ← A_t·(h, b) + e_t·(C_t·h + u_t)                                                       (1)

with C_t = H_t, the Hessian of the step's batch loss L_t = Σ_b c_b·ℓ_b at θ_t (SGD; weight decay is
already in A_t), and u_t = c_i·∇ℓ_i the injection of sample i as it entered ``.grad``. This module
replaces C_t by an estimate C̃_t built from the log rows of step t alone (the projected injections
ũ_b = P·u_b of the samples in that batch) and evaluates the projected recursion

    (h̃, b̃) ← A_t·(h̃, b̃) + e_t·(C̃_t·h̃ + ũ_t)                                                   (2)

A_t and e_t act per coordinate (one 2×2 block per parameter, expanded over the parameter's span of
the projected vector). Fast mode is C̃ = 0. The estimates below assume SGD's recursion, where
C_t = H_t and the rows are u = c·∇ℓ; for Adam/AdamW the term is D_t·H_t·h and the rows are
preconditioned (r = P·(D_t ⊙ u)), which these estimates do not model (``docs/curvature.md``).

**The walk (adjoint form).** The recursion is linear in the injections, so for a test vector g
(a projected test gradient at θ_S) the score of every row is one backward walk from S:

    ρ_S = (g, 0);   for t = S−1 … 0:   a_t = e_t,0 ⊙ ρ^h + e_t,1 ⊙ ρ^b
                                         score(r) = ⟨a_t, ũ_r⟩   for every row r of step t
                                         ρ^h ← A_t,00 ⊙ ρ^h + A_t,10 ⊙ ρ^b + C̃_t·a_t
                                         ρ^b ← A_t,01 ⊙ ρ^h + A_t,11 ⊙ ρ^b                        (3)

and ⟨g, h̃_S(i)⟩ = Σ_{rows r of i} score(r) (C̃_t symmetric). With C̃ = 0 this is fast mode's
response coefficients; the curvature term is what damps an old injection along the directions the
later batches curve. Many test vectors walk together (ρ is a matrix, one row per test vector).

**Embeddings (the train side).** Walking with the k basis vectors as test vectors (ρ is k×k) gives
every row the embedding ε_r = W_tᵀ·ũ_r, W_t the k×k matrix of (3)'s a_t; their sum per sample,
E_i = Σ_r ε_r, is the curvature-aware h̃_S(i), so ⟨g, E_i⟩ answers any test vector g. This is the
data value embedding of Wang et al. (ICLR 2025, "Capturing the Temporal Dependence of Training
Data Influence"), extended here to momentum, dampening, Nesterov, weight decay and parameter groups
through A_t, e_t. Both forms give the same numbers (a test checks it).

**Cost.** Per step with m rows and M test vectors (M = k for embeddings): scores m·k·M, the
curvature term 2·m·k·M (low rank: C̃·a = Σ_b s_b·ũ_b·⟨ũ_b, a⟩, never a k×k product), so about 3×
fast mode's m·k·M. Memory: ρ^h, ρ^b, a (3·M·k numbers: 12 MB for k = M = 1024 in float32) and the
rows of one block of the log; the log is read once, last block first, like the fast pass.

Curvature estimates C̃_t (``CURVATURES``), each from the rows of step t only; s_b = 1/c_b is the
inverse weight of sample b in the batch loss (``batch_reduction="mean"``: the number of rows of
the step, which also covers gradient accumulation; ``"sum"``: 1):

* ``"fisher"``  C̃_t = Σ_b s_b·ũ_b ũ_bᵀ, the empirical Fisher of the batch loss (DVEmb's
  Gauss–Newton choice). Equals H_t when every per-sample Hessian is the outer product of the
  per-sample gradient, ∇²ℓ_b = ∇ℓ_b ∇ℓ_bᵀ: losses ℓ = −log f(θ) with f affine in θ (e.g. a linear
  likelihood −log(xᵀθ)), because ∇²(−log f) = ∇f∇fᵀ/f² − ∇²f/f. It is **not** the Hessian of least
  squares (rows r·x give r²·xxᵀ, the Hessian is xxᵀ) nor of cross-entropy, where it is the
  Fisher with the observed label in place of the model's: too small for samples the model fits
  (ε² against ε, ε = 1 − p_y), too large for samples it confidently gets wrong.
* ``"ggn"``  C̃_t = Σ_b s_b·ω_b·ũ_b ũ_bᵀ with ω_b = tr(Λ_b)/‖δ_b‖² = (1 − ‖p_b‖²)/‖δ_b‖²: the Fisher
  reweighted per sample towards the generalized Gauss–Newton matrix of softmax cross-entropy,
  J_bᵀΛ_bJ_b (Λ = diag p − ppᵀ), whose output-space weight Λ_b has that trace where the Fisher's
  δ_bδ_bᵀ has ‖δ_b‖² (the gradient is J_bᵀδ_b, δ_b = p_b − y_b). δ_b is read off the row itself: the
  output layer's bias gradient is c_b·δ_b, kept unprojected in the log (``logit_bias``: its
  coordinates); y_b is δ_b's one negative entry and p_b = δ_b + y_b. It raises the curvature of fitted
  samples (ω ≈ 1/ε) and lowers that of confidently wrong ones. Exact (= H_t) for two-class softmax
  regression: a linear model's Hessian is its GGN, and with two classes Λ_b and δ_bδ_bᵀ are both
  multiples of (1, −1)(1, −1)ᵀ, so J_bᵀΛ_bJ_b = ω_b·g_b g_bᵀ. For C > 2 classes it is a heuristic: the row
  shows one output direction of the C − 1 that each sample's GGN spans. (The Rayleigh quotient along
  δ_b, ω = δᵀΛδ/‖δ‖⁴, is equally exact for two classes and measured far worse for ten: it keeps only
  the curvature along δ_b, about 1/9 of the trace at initialisation.)
* ``"scalar"``  C̃_t = κ_t·I with κ_t = Σ_b ũ_bᵀ C̃^F_t ũ_b / Σ_b ‖ũ_b‖², the mean curvature of the
  empirical Fisher C̃^F_t along the step's own rows: a damped fast mode (each old injection decays by
  a scalar per step). Exact only when H_t is a multiple of I equal to that quotient.
* ``"diagonal"``  C̃_t = diag(Σ_b s_b·ũ_b²): the empirical Fisher's diagonal in the projected
  coordinates. Exact only when the per-sample gradients of a step are each on coordinates of their
  own (a diagonal Fisher) and the Fisher is the Hessian.

Stability: the backward product of (I − η·C̃_t) grows without bound once η·λ_max(C̃_t) exceeds the
stability threshold (2 without momentum, 2(1 + μ) with heavy-ball momentum μ) — which training itself
avoids for H_t, but a Fisher estimate can overshoot. ``clip`` (a number) caps η_max·λ(C̃_t) at ``clip``
by shrinking the offending eigenvalues of the low-rank C̃_t (an eigendecomposition of its m×m Gram
matrix, m²·k per step); None leaves C̃_t as estimated. Measured (``docs/curvature.md``): the cap does
not stop the Fisher's divergence with heavy-ball momentum, which comes from a curvature that changes
every step (a parametrically driven oscillator), not from one unstable step; ``"ggn"`` stayed bounded.

**Projection.** Fast mode commutes with any fixed linear P. The curvature estimate does not: its
C̃_t = Σ s_b·Pu_b(Pu_b)ᵀ, and running (2) in k dimensions computes ⟨Pg, h̃⟩ = ⟨g, h⟩ of the full recursion
with C = Σ s_b·u_b u_bᵀ only when PᵀP acts as the identity on the span of the gradients (P orthogonal,
k = D: a rotation; the identity projection of a store tracked with ``projection_dim=None``; a sketch
without collisions). Otherwise inner products ⟨Pu, Pv⟩ ≈ ⟨u, v⟩ hold only to the sketch's accuracy
(unbiased, variance ~‖u‖²‖v‖²/k), and the error of the estimate shrinks as k grows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np
import torch

from .optim.sgd import SGDRule

_default_transitions = SGDRule().transitions  # SGD's (A, e); a store's own rule is passed as transitions=

CURVATURES = ("none", "fisher", "ggn", "scalar", "diagonal")
BATCH_REDUCTIONS = ("mean", "sum")
_TRACE_WINDOW = 1024  # trace steps turned into transitions at a time


@dataclass(frozen=True)
class CurvatureSpec:
    """Which curvature estimate (``CURVATURES``) and its options; see the module docstring.

    ``logit_bias``: for ``"ggn"``, the coordinates (start, stop) of the output layer's bias in the
    projected row (an unsketched block: ``Projector`` keeps small parameters whole).
    ``clip``: cap on η_max·λ(C̃_t) (None: no cap). ``batch_reduction``: how the loop reduced its batch
    loss (``"mean"``: s_b = rows of the step; ``"sum"``: s_b = 1).
    """

    kind: str
    batch_reduction: str = "mean"
    clip: float | None = None
    logit_bias: tuple[int, int] | None = None

    def __post_init__(self):
        if self.kind not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}, got {self.kind!r}.")
        if self.batch_reduction not in BATCH_REDUCTIONS:
            raise ValueError(f"batch_reduction must be one of {BATCH_REDUCTIONS}, got {self.batch_reduction!r}.")
        if self.kind == "ggn" and self.logit_bias is None:
            raise ValueError("curvature 'ggn' needs logit_bias=(start, stop): the coordinates of the output layer's "
                             "bias in the projected row (see output_bias_span).")
        if self.clip is not None and not self.clip > 0:
            raise ValueError(f"clip must be a positive number or None, got {self.clip!r}.")


def output_bias_span(projection_json: dict, name: str) -> tuple[int, int]:
    """Coordinates (start, stop) of parameter ``name`` in a projected row; it must be kept unsketched.

    ``projection_json``: the store's ``attrs["hydra_nb"]["projection"]`` (``Projector.to_json()``).
    """
    for block in projection_json["blocks"]:
        if block["name"] == name:
            if block["sketch"]:
                raise ValueError(f"{name!r} is sketched in this log; the 'ggn' curvature needs it whole.")
            return int(block["offset"]), int(block["offset"]) + int(block["dim"])
    raise ValueError(f"no parameter {name!r} in the projection (have: {[b['name'] for b in projection_json['blocks']]}).")


def find_output_bias(projection_json: dict, rows: np.ndarray) -> tuple[int, int] | None:
    """The span of the output layer's bias in the log's rows, if the rows show softmax cross-entropy; else None.

    With a softmax cross-entropy loss and one-hot targets the output bias's gradient is c·(p − y): its
    entries sum to zero and exactly one is negative (the label's, p_y − 1). The last unsketched
    one-dimensional parameter (of at least two entries) whose every nonzero row in ``rows`` (a sample
    of the log, (m, k)) has both properties is taken; none has them (another loss, label smoothing,
    soft targets): None, and the ``"ggn"`` estimate is not available.
    """
    rows = np.asarray(rows, dtype=np.float64)  # float16 logs round to ~1e-3 of an entry: the tolerances below
    found = None
    for block in projection_json["blocks"]:
        if block["sketch"] or block["cols"] != 1 or block["dim"] < 2:
            continue
        lo, hi = int(block["offset"]), int(block["offset"]) + int(block["dim"])
        part = rows[:, lo:hi]
        norm = np.abs(part).sum(1)
        live = norm > 0
        if not live.any():
            continue
        part, norm = part[live], norm[live]
        zero_sum = np.abs(part.sum(1)) <= 1e-3 * norm
        one_negative = (part < -1e-6 * norm[:, None]).sum(1) == 1
        if zero_sum.all() and one_negative.all():
            found = (lo, hi)
    return found


# -- one step's curvature operator ------------------------------------------------------------
class _LowRank:
    """C̃ = Vᵀ·diag(w)·V (rows V (m, k)), or Vᵀ·Q·diag(w')·Qᵀ·V after clipping; ``apply(X) = X·C̃``."""

    def __init__(self, V: torch.Tensor, w: torch.Tensor):
        self.V, self.w, self.core = V, w, None

    def clip(self, cap: float) -> None:
        """Shrink eigenvalues of C̃ above ``cap`` to ``cap`` (C̃ = Vᵀ diag(w) V, w ≥ 0)."""
        sw = self.w.clamp_min(0).sqrt()
        gram = (self.V * sw[:, None]) @ (self.V * sw[:, None]).T  # (m, m): same nonzero spectrum as C̃
        lam, Q = torch.linalg.eigh(gram)
        if float(lam.max()) <= cap:
            return
        # C̃ = Bᵀ B with B = diag(√w) V; C̃ = Bᵀ Q diag(1) Qᵀ B restricted; eigenvectors of C̃: Bᵀ q / √λ
        scale = torch.where(lam > cap, cap / lam.clamp_min(1e-300), torch.ones_like(lam))
        self.core = (sw[:, None] * Q) * scale[None, :] @ (Q.T * sw[None, :])  # (m, m)

    def apply(self, X: torch.Tensor) -> torch.Tensor:
        P = X @ self.V.T  # (M, m)
        P = P * self.w[None, :] if self.core is None else P @ self.core
        return P @ self.V


class _Diagonal:
    def __init__(self, d: torch.Tensor):
        self.d = d

    def apply(self, X: torch.Tensor) -> torch.Tensor:
        return X * self.d[None, :]


class _Scalar:
    def __init__(self, kappa: float):
        self.kappa = kappa

    def apply(self, X: torch.Tensor) -> torch.Tensor:
        return X * self.kappa


def row_weights(spec: CurvatureSpec, rows: torch.Tensor) -> torch.Tensor:
    """s_b (``"fisher"``) or s_b·ω_b (``"ggn"``) for one step's rows (m, k); see the module docstring."""
    m = rows.shape[0]
    s = float(m) if spec.batch_reduction == "mean" else 1.0
    w = torch.full((m,), s, dtype=rows.dtype, device=rows.device)
    if spec.kind != "ggn":
        return w
    lo, hi = spec.logit_bias
    delta = rows[:, lo:hi] * s  # p − y, the loss's gradient with respect to the logits
    label = delta.argmin(1)
    p = delta.clone()
    p[torch.arange(m), label] += 1.0
    p = p.clamp(0.0, 1.0)
    norm2 = (delta * delta).sum(1).clamp_min(torch.finfo(rows.dtype).tiny ** 0.5)
    omega = (1.0 - (p * p).sum(1)) / norm2  # tr(diag p − ppᵀ) / ‖δ‖²
    return w * omega.clamp_min(0.0)


def step_operator(spec: CurvatureSpec, rows: torch.Tensor, eta_max: float):
    """The operator X ↦ X·C̃_t of one step's rows (m, k), or None where C̃_t = 0."""
    if spec.kind == "none" or rows.shape[0] == 0:
        return None
    w = row_weights(spec, rows)
    if spec.kind == "diagonal":
        op = _Diagonal((rows * rows * w[:, None]).sum(0))
        if spec.clip is not None and eta_max > 0:
            op.d = op.d.clamp_max(spec.clip / eta_max)
        return op
    if spec.kind == "scalar":
        gram = rows @ rows.T  # ⟨ũ_b, ũ_b'⟩
        num = float(((gram * gram) * w[None, :]).sum())  # Σ_b ũ_bᵀ C̃^F ũ_b
        den = float(torch.diagonal(gram).sum())
        kappa = num / den if den > 0 else 0.0
        if spec.clip is not None and eta_max > 0:
            kappa = min(kappa, spec.clip / eta_max)
        return _Scalar(kappa)
    op = _LowRank(rows, w)
    if spec.clip is not None and eta_max > 0:
        op.clip(spec.clip / eta_max)
    return op


# -- the trace, as per-coordinate transition coefficients --------------------------------------
class _Transitions:
    """The walk's per-step coefficients, for steps asked in descending order.

    ``trace``: field → array (steps, P) (numpy, zarr or the store's checked arrays), ``spans``: the
    (start, stop) of each parameter's block in the projected vector. ``at(t)`` returns the six
    coefficients (A00, A01, A10, A11, e0, e1) of step t, each a Python float when every parameter
    shares it (one optimizer group: the usual case, and cheaper to multiply by) or a (k,) tensor per
    coordinate otherwise, and η_max (the largest learning rate of the step).
    """

    def __init__(self, trace: Mapping, spans, dtype: torch.dtype, transitions: Callable = _default_transitions):
        self.trace = trace
        self.transitions = transitions
        self.dtype = dtype
        k = max((b for _, b in spans), default=0)
        owner = np.full(k, -1, dtype=np.int64)
        for p, (a, b) in enumerate(spans):
            owner[a:b] = p
        if (owner < 0).any():
            raise ValueError("spans must cover every coordinate of the projected vector.")
        self.owner, self.k = torch.from_numpy(owner), k
        self._lo = self._hi = 0

    def _load(self, t: int) -> None:
        lo = max(0, t + 1 - _TRACE_WINDOW)
        window = {f: np.asarray(a[lo:t + 1]) for f, a in self.trace.items()}
        A, e = self.transitions(window)
        self._coef = np.stack([A[..., 0, 0], A[..., 0, 1], A[..., 1, 0], A[..., 1, 1], e[..., 0], e[..., 1]], 1)
        self._uniform = (self._coef.max(-1) == self._coef.min(-1)).all(1)  # (W,): one value per coefficient
        self._lr = np.abs(window["lr"].astype(np.float64)).max(1)
        self._lo, self._hi = lo, t + 1

    def at(self, t: int):
        if not (self._lo <= t < self._hi):
            self._load(t)
        i = t - self._lo
        c = self._coef[i]
        if self._uniform[i]:
            return [float(v) for v in c[:, 0]], float(self._lr[i])
        coef = torch.from_numpy(c).to(self.dtype)[:, self.owner]
        return list(coef), float(self._lr[i])


# -- the backward walk ---------------------------------------------------------------------------
Block = tuple  # (rows (m, k) array, samples (m,) int64, steps (m,) int64), rows in step order


def walk(tests: torch.Tensor, stops, blocks: Iterable[Block], trace: Mapping, spans, spec: CurvatureSpec,
         col: np.ndarray, n_cols: int, *, transitions: Callable = _default_transitions,
         progress: Callable[[], None] | None = None) -> torch.Tensor:
    """out[s, c, j] = Σ_{rows r: col[sample_r] = c, t_r < stops[s]} score_{s,j}(r), by the walk (3).

    ``tests`` (n_stops, n, k): the test vectors at each stop (callers pass negated projected test
    gradients for contributions, or the basis for embeddings). ``blocks``: the log of steps
    < max(stops), **last block first**, each block's rows in ascending step order (as the log stores
    them; a step may straddle two blocks). ``col`` maps dataset indices to output columns (−1: not
    accumulated; its rows still shape the curvature). Returns (n_stops, n_cols, n) in ``tests``'s dtype.
    ``progress()`` is called once per block.
    """
    n_stops, n, k = tests.shape
    dtype = tests.dtype
    stops = np.asarray(stops, dtype=np.int64).reshape(-1)
    if len(stops) != n_stops:
        raise ValueError("tests must have one (n, k) slice per stop.")
    col = np.asarray(col, dtype=np.int64)
    order = np.argsort(-stops, kind="stable")  # live stops form a prefix as the walk descends
    sorted_stops = stops[order]
    rho_h = tests[torch.from_numpy(order)].reshape(n_stops * n, k).clone()
    rho_b = torch.zeros_like(rho_h)
    acc = torch.zeros(n_cols, n_stops * n, dtype=dtype)
    tr = _Transitions(trace, spans, dtype, transitions)
    if tr.k != k:
        raise ValueError(f"tests have {k} coordinates, the spans {tr.k}.")
    top = int(sorted_stops[0]) if n_stops else 0
    state = {"t": top - 1}

    def advance(to: int, rows_of) -> None:
        """Walk steps state.t, …, ``to`` (inclusive, descending); ``rows_of(t)`` gives step t's (rows, samples)."""
        t = state["t"]
        while t >= to:
            live = int(np.searchsorted(-sorted_stops, -t, side="left")) * n  # stops > t
            (a00, a01, a10, a11, e0, e1), eta_max = tr.at(t)
            h, b = rho_h[:live], rho_b[:live]
            a = h * e0 + b * e1
            rows, samples = rows_of(t)
            op = None
            if rows is not None and len(samples):
                target = col[samples]
                keep = target >= 0
                if keep.all():
                    acc[:, :live].index_add_(0, torch.from_numpy(target), rows @ a.T)
                elif keep.any():
                    acc[:, :live].index_add_(0, torch.from_numpy(target[keep]), rows[torch.from_numpy(keep)] @ a.T)
                op = step_operator(spec, rows, eta_max)
            new_h = h * a00 + b * a10
            if op is not None:
                new_h += op.apply(a)
            b.mul_(a11).add_(h * a01)
            h.copy_(new_h)
            t -= 1
        state["t"] = t

    carry = None  # (step, rows, samples) of the previous block's lowest step, which may continue in this one
    for rows_np, samples, steps in blocks:
        samples = np.asarray(samples, dtype=np.int64)
        steps = np.asarray(steps, dtype=np.int64)
        if len(steps) == 0:
            continue
        if (np.diff(steps) < 0).any():
            raise ValueError("each block's rows must be in ascending step order.")
        rows = torch.as_tensor(np.asarray(rows_np)).to(dtype)
        bounds = {int(t): (int(a), int(b)) for t, a, b in _runs(steps)}
        lowest = int(steps[0])

        def rows_of(t, rows=rows, samples=samples, bounds=bounds, carry=carry):
            part = bounds.get(t)
            r, s = (rows[part[0]:part[1]], samples[part[0]:part[1]]) if part else (None, None)
            if carry is not None and t == carry[0]:  # the rest of the step, read with the previous block
                r = carry[1] if r is None else torch.cat([r, carry[1]])
                s = carry[2] if s is None else np.concatenate([s, carry[2]])
            return (r, s) if r is not None else (None, ())

        advance(lowest + 1, rows_of)
        a, b = bounds[lowest]
        held_rows, held_samples = rows[a:b].clone(), samples[a:b]
        if carry is not None and carry[0] == lowest:
            held_rows, held_samples = torch.cat([held_rows, carry[1]]), np.concatenate([held_samples, carry[2]])
        carry = (lowest, held_rows, held_samples)
        if progress is not None:
            progress()
    if carry is not None:
        advance(carry[0], lambda t: (carry[1], carry[2]) if t == carry[0] else (None, ()))
    advance(0, lambda t: (None, ()))
    out = acc.reshape(n_cols, n_stops, n).permute(1, 0, 2)
    result = torch.empty_like(out)
    result[torch.from_numpy(order)] = out
    return result


def _runs(steps: np.ndarray) -> Iterator[tuple[int, int, int]]:
    """(step, start, stop) of each run of equal steps in an ascending array."""
    edges = np.flatnonzero(np.diff(steps)) + 1
    starts = np.concatenate([[0], edges])
    stops = np.concatenate([edges, [len(steps)]])
    for a, b in zip(starts, stops):
        yield steps[a], a, b


def embeddings(stop: int, blocks: Iterable[Block], trace: Mapping, spans, spec: CurvatureSpec, col: np.ndarray,
               n_cols: int, *, dtype=torch.float32, transitions: Callable = _default_transitions,
               progress=None) -> torch.Tensor:
    """E (n_cols, k): the curvature-aware h̃_S(i) of each output column, S = ``stop``.

    ⟨g, E_c⟩ = Σ_{rows r: col[sample_r] = c} score_g(r) for any test vector g: the walk (3) with the
    k basis vectors as test vectors (ρ is k×k). Contributions are −E·(P∇L_z); self-influence −⟨E_i, P∇ℓ_i⟩.
    """
    k = max((b for _, b in spans), default=0)
    eye = torch.eye(k, dtype=dtype)[None]
    return walk(eye, [stop], blocks, trace, spans, spec, col, n_cols, transitions=transitions,
                progress=progress)[0]


# -- blocks of a log ---------------------------------------------------------------------------
def array_blocks(rows, samples, steps, before_step: int, block_rows: int) -> Iterator[Block]:
    """Blocks of an in-memory log (rows in step order), last block first, rows of steps < ``before_step``."""
    steps = np.asarray(steps)
    end = int(np.searchsorted(steps, before_step, side="left"))
    for start in range(((end - 1) // block_rows) * block_rows if end else -1, -1, -block_rows):
        stop = min(start + block_rows, end)
        yield rows[start:stop], np.asarray(samples[start:stop]), steps[start:stop]


def store_blocks(reader, before_step: int, block_rows: int) -> Iterator[Block]:
    """Blocks of a store's log (``StoreReader``), last block first, rows of steps < ``before_step``.

    One log part only (a distributed run's parts would have to be merged step by step: a later stage).
    """
    if len(reader.log_parts) != 1:
        raise NotImplementedError("curvature estimates of distributed runs (several log parts) are not supported yet.")
    if before_step <= 0:
        return
    part = reader.log_parts[0]
    end = int(reader.array(part["row_end"])[before_step - 1])
    sample, step, grad = (reader.array(part[key]) for key in ("sample", "step", "grad"))
    unit = int(grad.chunks[0])
    block_rows = max(unit, (block_rows // unit) * unit)
    for start in range(((end - 1) // block_rows) * block_rows if end else -1, -1, -block_rows):
        stop = min(start + block_rows, end)
        yield np.asarray(grad[start:stop]), np.asarray(sample[start:stop]), np.asarray(step[start:stop])
