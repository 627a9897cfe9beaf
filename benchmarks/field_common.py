"""Shared pieces of the comparative ("field") benchmarks: hydra_nb next to the methods a user would
otherwise pick (Captum's TracInCP, influence functions, gradient dot products, training loss,
cleanlab), on the same models, data and machine.

Everything here is plain PyTorch except the peers, which come from the ``bench`` extra
(``pip install -e .[bench]``: captum, cleanlab, scipy, scikit-learn).

Sign convention used by every method (hydra_nb's): a score ``c[j, i] > 0`` means training sample i
*helped* test point j (lowered its loss). The loss predicted for a training subset S is then
``-Σ_{i∈S} c[j, i]`` (up to an affine map, which rank correlations ignore).
"""

from __future__ import annotations

import copy
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import hydra_nb  # noqa: E402
from hydra_nb.examples import MLP, LeNet5, SmallCNN, load_digits  # noqa: E402


# -- models ----------------------------------------------------------------------------------
from models import ResNet8, SmoothCNN  # noqa: E402


MODELS = {
    # name: (constructor, image size)
    "MLP": (lambda: MLP(hidden=32), 8),
    "SmallCNN": (SmallCNN, 8),
    "LeNet5": (LeNet5, 28),
    "ResNet8": (ResNet8, 32),
    "SmoothCNN": (SmoothCNN, 8),  # SmallCNN with GELU and average pooling: a diagnostic (replay_lds.py)
}


def sizes(args, **defaults) -> None:
    """Fill the run-size options left unset (None) from ``defaults``: name=(quick value, full value), picked by
    ``args.quick`` — one place for the benchmarks' "--quick is a smoke run" rule."""
    for name, (quick, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)


def make_model(name: str, seed: int, dtype=torch.float64, device="cpu", **kw) -> nn.Module:
    ctor, _ = MODELS[name]
    torch.manual_seed(seed)
    model = (MLP(**kw) if name == "MLP" and kw else ctor())
    return model.to(device=device, dtype=dtype)


def digits(name: str, dtype=torch.float64, split_seed: int = 0):
    """(x_train, y_train, x_test, y_test) of scikit-learn's digits at the model's image size."""
    _, size = MODELS[name]
    return load_digits(image_size=size, dtype=dtype, seed=split_seed)


# -- training --------------------------------------------------------------------------------
def make_loader(x, y, batch_size: int, seed: int) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, generator=common.generator(seed))


def train_loop(model, loader, opt, epochs: int, on_epoch=None) -> None:
    """The user's own loop: mean cross-entropy, SGD. ``on_epoch(epoch)`` after each epoch."""
    model.train()
    for ep in range(epochs):
        for xb, yb in loader:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
        if on_epoch is not None:
            on_epoch(ep)


def train_plain(model, x, y, cfg, on_epoch=None) -> nn.Module:
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    train_loop(model, make_loader(x, y, cfg.batch_size, cfg.data_seed), opt, cfg.epochs, on_epoch)
    return model


def train_tracked(model, x, y, cfg, store, mode="fast", projection_dim=None, checkpoint_every="epoch",
                  exact_indices=None, ckpt_dir: Path | None = None, proj_seed: int = 0, **track_kw):
    """Train ``model`` under ``hydra_nb.track`` (same loader seed as ``train_plain``); optionally save a
    state_dict file after each epoch to ``ckpt_dir`` (for TracInCP). Returns (tracker, seconds, ckpt paths)."""
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    loader = make_loader(x, y, cfg.batch_size, cfg.data_seed)
    paths = []

    def save(ep):
        if ckpt_dir is not None:
            p = Path(ckpt_dir) / f"epoch{ep:03d}.pt"
            torch.save({"state": copy.deepcopy(model.state_dict()), "lr": cfg.lr}, p)
            paths.append(str(p))

    t0 = time.perf_counter()
    with hydra_nb.track(model, loader, store=str(store), optimizer=opt, mode=mode, projection_dim=projection_dim,
                        exact_indices=exact_indices, checkpoint_every=checkpoint_every, overwrite=True,
                        seed=proj_seed, **track_kw) as tracker:
        train_loop(model, loader, opt, cfg.epochs, save)
    seconds = time.perf_counter() - t0
    if tracker.failure is not None:
        raise RuntimeError(f"tracking failed: {tracker.failure!r}")
    return tracker, seconds, paths


# -- gradients -------------------------------------------------------------------------------
def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def per_sample_grads(model, x, y, chunk: int = 256) -> torch.Tensor:
    """(n, P) per-sample gradients of cross-entropy at the model's current parameters (eval mode)."""
    model.eval()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss1(p, xi, yi):
        out = torch.func.functional_call(model, p, (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    g = torch.func.vmap(torch.func.grad(loss1), in_dims=(None, 0, 0))
    rows = []
    for s in range(0, len(y), chunk):
        d = g(params, x[s:s + chunk], y[s:s + chunk])
        rows.append(torch.cat([d[k].reshape(d[k].shape[0], -1) for k in params], 1))
    return torch.cat(rows)


def per_sample_losses(model, x, y) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


def train_hessian(model, x, y, chunk: int = 64) -> torch.Tensor:
    """The (P, P) Hessian of the mean training cross-entropy at the model's parameters, column blocks by
    vmapped forward-over-reverse HVPs on basis vectors (exact up to float error)."""
    model.eval()
    names = [k for k, _ in model.named_parameters()]
    shapes = [v.shape for _, v in model.named_parameters()]
    sizes = [v.numel() for _, v in model.named_parameters()]
    theta = flat_params(model)
    P = theta.numel()

    def unflat(v):
        return {n: t.reshape(s) for n, t, s in zip(names, torch.split(v, sizes), shapes)}

    def loss(v):
        return F.cross_entropy(torch.func.functional_call(model, unflat(v), (x,)), y)

    g = torch.func.grad(loss)
    hvp = torch.func.vmap(lambda t: torch.func.jvp(g, (theta,), (t,))[1])
    H = torch.empty(P, P, dtype=theta.dtype)
    eye = torch.eye(P, dtype=theta.dtype)
    for s in range(0, P, chunk):
        H[:, s:s + chunk] = hvp(eye[s:s + chunk]).T
    return 0.5 * (H + H.T)


class InfluenceFunction:
    """Koh & Liang influence functions with the exact damped Hessian of the mean training loss at θ_T.

    The Hessian of a trained non-convex net is indefinite; we eigendecompose it, clip negative
    eigenvalues to 0 and add damping λ (so the solve is (|H|₊ + λI)⁻¹). ``score(g_test, g_train)`` =
    g_testᵀ (H₊+λI)⁻¹ g_train: > 0 means up-weighting the training sample lowers the test loss (helpful),
    the same sign convention as hydra_nb's contributions.
    """

    def __init__(self, H: torch.Tensor, damping: float):
        evals, evecs = torch.linalg.eigh(H)
        self.n_negative = int((evals < 0).sum())
        self.min_eig, self.max_eig = float(evals.min()), float(evals.max())
        self.evals, self.evecs = evals, evecs
        self.set_damping(damping)

    def set_damping(self, damping: float) -> None:
        self.damping = damping
        self.inv = 1.0 / (self.evals.clamp_min(0) + damping)

    def solve(self, g: torch.Tensor) -> torch.Tensor:
        """(H₊+λI)⁻¹ applied to the rows of g."""
        return ((g @ self.evecs) * self.inv) @ self.evecs.T

    def scores(self, g_test: torch.Tensor, g_train: torch.Tensor) -> torch.Tensor:
        return self.solve(g_test) @ g_train.T


# -- Captum TracInCP ---------------------------------------------------------------------------
def _ckpt_loader(model, path):
    d = torch.load(path, weights_only=True)
    model.load_state_dict(d["state"])
    return float(d["lr"])


def tracin(model, x_train, y_train, ckpt_paths, batch_size: int = 128, fast: bool = False):
    """A Captum TracInCP (or TracInCPFast: last layer only) object over the given per-epoch checkpoints."""
    from captum.influence import TracInCP, TracInCPFast

    model = copy.deepcopy(model)
    model.eval()
    ds = TensorDataset(x_train, y_train)
    if fast:
        last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        return TracInCPFast(model, last, ds, ckpt_paths, checkpoints_load_func=_ckpt_loader,
                            loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=batch_size, vectorize=False)
    return TracInCP(model, ds, ckpt_paths, checkpoints_load_func=_ckpt_loader,
                    loss_fn=nn.CrossEntropyLoss(reduction="none"), batch_size=batch_size,
                    sample_wise_grads_per_batch=False)


# -- metrics ---------------------------------------------------------------------------------
def auc(scores: np.ndarray, positives: np.ndarray) -> float:
    """ROC AUC of ``scores`` (larger = more suspicious) for boolean ``positives`` (ties averaged)."""
    from scipy.stats import rankdata

    r = rankdata(scores)
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    return float((r[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def found_at(scores: np.ndarray, positives: np.ndarray, fractions=(0.05, 0.10, 0.20)) -> dict:
    """Fraction of the positives among the top ``f`` of samples ranked by ``scores`` (largest first)."""
    order = np.argsort(-scores, kind="stable")
    out = {}
    for f in fractions:
        top = order[: int(round(f * len(scores)))]
        out[f] = float(positives[top].sum() / positives.sum())
    return out


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of a[:, j] with b[:, j] for every column j (NaN where constant)."""
    from scipy.stats import rankdata

    ra = rankdata(a, axis=0)
    rb = rankdata(b, axis=0)
    ra -= ra.mean(0)
    rb -= rb.mean(0)
    den = np.sqrt((ra ** 2).sum(0) * (rb ** 2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ra * rb).sum(0) / den


def pearson(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.std() == 0 or b.std() == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


def pm(values, digits: int = 3) -> str:
    m, s = common.mean_std(values)
    return "nan" if math.isnan(m) else f"{m:.{digits}f} ± {s:.{digits}f}"


class FieldRun:
    """One run of a field benchmark: started on construction (wall clock, the other processes' CPU use,
    the machine, printed), finished by ``finish`` (load line, wall time, JSON under benchmarks/out/)."""

    def __init__(self, device="cpu"):
        self.start = time.perf_counter()
        self.load = common.LoadMeter()
        self.machine = common.machine_info(device)
        where = "" if torch.device(device).type == "cpu" else f", device {device}"
        print(f"machine: {self.machine['cpu_model']}, {threads_note()}{where}")

    def finish(self, benchmark: str, suffix: str, config: dict, **results) -> None:
        """Print the load and wall time; write ``<benchmark><suffix>.json`` with the machine, config and results."""
        r = self.load.read()
        print(f"other processes used {100 * (r['foreign_cpu_share'] or 0):.0f}% of the machine's CPU during this "
              f"run (wall {r['wall_s']:.1f} s)", flush=True)
        wall = time.perf_counter() - self.start
        print(f"\nwall time {wall:.1f} s")
        common.write_json(benchmark + suffix, {"benchmark": benchmark, "machine": self.machine, "config": config,
                                               "wall_seconds": wall, "load": r, **results})


def tmpdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))


def threads_note() -> str:
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores"


def train_ggn(model, x, y, chunk: int = 256) -> torch.Tensor:
    """The (P, P) generalized Gauss-Newton matrix of the mean training cross-entropy,
    (1/N) Σ_i J_iᵀ (diag(p_i) − p_i p_iᵀ) J_i with J_i the logits' Jacobian: positive semi-definite."""
    model.eval()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def logits1(p, xi):
        return torch.func.functional_call(model, p, (xi.unsqueeze(0),))[0]

    jac = torch.func.vmap(torch.func.jacrev(logits1), in_dims=(None, 0))
    P = sum(v.numel() for v in params.values())
    G = torch.zeros(P, P, dtype=next(iter(params.values())).dtype)
    for s in range(0, len(y), chunk):
        xb = x[s:s + chunk]
        d = jac(params, xb)
        J = torch.cat([d[k].reshape(d[k].shape[0], d[k].shape[1], -1) for k in params], 2)  # (n, C, P)
        with torch.no_grad():
            p = torch.softmax(model(xb), 1)
        lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        G += torch.einsum("ncp,ncd,ndq->pq", J, lam, J)
    return G / len(y)
