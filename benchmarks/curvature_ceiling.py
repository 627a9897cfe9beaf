"""How good can a curvature estimate be? The walk of hydra_nb.curvature fed the *true* per-step curvature.

A diagnostic, not an estimator: it needs the training data. One run is trained by hand in float64 (SGD
with the setting's momentum, weight decay and schedule, the same batches as a DataLoader with the seed),
keeping θ_t of every step. Then the adjoint walk (3) of ``hydra_nb.curvature`` runs backward from the last
step for ``--n-test`` test gradients, once per curvature model C_t, at full dimension:

* ``hessian``: C_t = H_t, the batch loss's Hessian at θ_t (Hessian-vector products): the walk is then the
  exact derivative of this run (the truth every other row is scored against);
* ``hessian ×0.9`` / ``×1.1``: the same with a 10% error in the curvature (how sensitive the truth is);
* ``ggn``: C_t = the batch's generalized Gauss–Newton matrix Σ_b c_b J_bᵀ(diag p_b − p_b p_bᵀ)J_b;
* ``fisher``: C_t = Σ_b s_b u_b u_bᵀ from the true full-dimensional per-sample gradients (what
  ``curvature="fisher"`` estimates from a log tracked with ``projection_dim=None``);
* ``ggn from rows``: the same with the trace-matched weights ω_b of ``curvature="ggn"``;
* ``ggn from rows, Rayleigh weight``: the alternative weight ω_b = δ_bᵀΛ_bδ_b/‖δ_b‖⁴ (the GGN's curvature
  along δ_b alone; as exact as the trace-matched weight for two classes);
* ``ggn from rows, exact last layer``: the same, with its output-layer block replaced by that layer's
  exact GGN, Λ_b ⊗ [a_b; 1][a_b; 1]ᵀ (a_b: the layer's input), which a log could provide where the output
  layer's weight gradient δ_b a_bᵀ lets a_b be solved for;
* ``none``: fast mode.

Also reported per setting: the share of the exact contribution matrix's energy in its top three singular
values (a few dominant directions make rankings fragile), and η·λ_max of the full training loss's Hessian
at each epoch's end (subspace iteration on HVPs), against the stability threshold 2(1 + μ).

Each row reports the Spearman correlation with the ``hessian`` walk per test point over all N training
samples (mean), sign agreement and the median |estimate|/|exact|. If the true GGN falls short of a target,
no Gauss–Newton estimate from the log can reach it; if ×0.9/×1.1 already do, the truth is hypersensitive
to curvature errors in that setting.

    python benchmarks/curvature_ceiling.py --settings quickstart          # ~2 min on one core
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import field_common as fc  # noqa: E402
from curvature_agreement import SETTINGS  # noqa: E402

from hydra_nb.optim.sgd import SGDRule  # noqa: E402

transitions = SGDRule().transitions

MODELS = ("none", "hessian", "hessian ×0.9", "hessian ×1.1", "ggn", "fisher", "ggn from rows",
          "ggn from rows, Rayleigh weight", "ggn from rows, exact last layer")


def flat_layout(model):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    return names, shapes, sizes


def _sharpness(model, logits, x, y, thetas, lrs, steps_per_epoch: int, iters: int = 40) -> list[float]:
    """η·λ_max of the full training loss's Hessian at each epoch's end (subspace iteration, 4 vectors)."""
    out = []
    for t in range(steps_per_epoch, len(thetas), steps_per_epoch):
        th = thetas[t]
        g = torch.func.grad(lambda v: F.cross_entropy(logits(v, x), y))
        hvp = torch.func.vmap(lambda u: torch.func.jvp(g, (th,), (u,))[1])
        Q, _ = torch.linalg.qr(torch.randn(len(th), 4, dtype=th.dtype, generator=torch.Generator().manual_seed(0)))
        for _ in range(iters):
            Q, _ = torch.linalg.qr(hvp(Q.T).T)
        lam = float(torch.linalg.eigvalsh(Q.T @ hvp(Q.T).T).max())
        out.append(lrs[min(t, len(lrs)) - 1] * lam)
    return out


def run_setting(setting, seed: int, n_test: int, epochs: int | None):
    epochs = epochs or setting.epochs
    dt = torch.float64
    x, y, xt, yt = fc.digits(setting.model, dtype=dt)
    model = fc.make_model(setting.model, seed, dtype=dt)
    names, shapes, sizes = flat_layout(model)
    owner = np.concatenate([np.full(s, i) for i, s in enumerate(sizes)])

    def unflat(v):
        return {n: t.reshape(s) for n, t, s in zip(names, torch.split(v, sizes), shapes)}

    def logits(v, xb):
        return torch.func.functional_call(model, unflat(v), (xb,))

    theta = fc.flat_params(model).clone()
    loader = DataLoader(TensorDataset(torch.arange(len(y))), batch_size=setting.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    T = epochs * len(loader)
    lr0, mom, wd = setting.lr, setting.momentum, setting.weight_decay
    thetas, batches, lrs = [], [], []
    buf = None
    t = 0
    for _ in range(epochs):
        for (idx,) in loader:
            lr = lr0 * (1 + np.cos(np.pi * t / T)) / 2 if setting.cosine else lr0
            thetas.append(theta.clone())
            batches.append(idx)
            lrs.append(lr)
            g = torch.func.grad(lambda v: F.cross_entropy(logits(v, x[idx]), y[idx]))(theta)
            d = g + wd * theta
            buf = d.clone() if buf is None or mom == 0 else mom * buf + d
            theta = theta - lr * (buf if mom != 0 else d)
            t += 1
    P = len(names)
    trace = {"lr": np.repeat(np.asarray(lrs)[:, None], P, 1), "momentum": np.full((T, P), mom),
             "dampening": np.zeros((T, P)), "weight_decay": np.full((T, P), wd),
             "nesterov": np.zeros((T, P), bool), "active": np.ones((T, P), bool),
             "first": np.zeros((T, P), bool)}
    trace["first"][0] = mom != 0
    A, e = transitions(trace)
    co = [torch.from_numpy(v[:, owner]) for v in (A[:, :, 0, 0], A[:, :, 0, 1], A[:, :, 1, 0], A[:, :, 1, 1],
                                                 e[:, :, 0], e[:, :, 1])]
    xq, yq = xt[:n_test], yt[:n_test]
    model.eval()
    Gt = torch.func.vmap(torch.func.grad(lambda v, xi, yi: F.cross_entropy(logits(v, xi[None]), yi[None])),
                         in_dims=(None, 0, 0))(theta, xq, yq)
    rho = {m: (-Gt.clone(), torch.zeros_like(Gt)) for m in MODELS}
    acc = {m: np.zeros((n_test, len(y))) for m in MODELS}
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    lw = names.index([n for n, p in model.named_parameters() if p is last.weight][0])
    lo_last = int(sum(sizes[:lw]))  # output layer: weight (C, h) then bias (C), the last parameters
    assert lo_last + last.weight.numel() + last.bias.numel() == sum(sizes)
    C_out, h_in = last.weight.shape
    feats = {}
    last.register_forward_hook(lambda mod, inp, out: feats.__setitem__("a", inp[0].detach()))
    per_sample = torch.func.vmap(torch.func.jacrev(lambda v, xi: logits(v, xi[None])[0]), in_dims=(None, 0))
    start = time.perf_counter()
    for t in range(T - 1, -1, -1):
        idx = batches[t]
        th = thetas[t]
        B = len(idx)
        J = per_sample(th, x[idx])  # (B, C, D)
        with torch.no_grad():
            p = torch.softmax(logits(th, x[idx]), 1)
            a_in = feats["a"]  # (B, h): the output layer's inputs
        delta = p - F.one_hot(y[idx], p.shape[1]).to(dt)
        U = torch.einsum("bcd,bc->bd", J, delta) / B  # rows as they entered .grad (mean loss)
        lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        norm2 = (delta * delta).sum(1).clamp_min(1e-150)
        omega = (1 - (p * p).sum(1)) / norm2
        omega_ray = ((p * delta * delta).sum(1) - (p * delta).sum(1) ** 2) / norm2 ** 2
        grad_fn = torch.func.grad(lambda v: F.cross_entropy(logits(v, x[idx]), y[idx]))
        hvp = torch.func.vmap(lambda u: torch.func.jvp(grad_fn, (th,), (u,))[1])
        for m in MODELS:
            h, b = rho[m]
            a = h * co[4][t] + b * co[5][t]
            np.add.at(acc[m].T, idx.numpy(), (U @ a.T).numpy())
            new_h = h * co[0][t] + b * co[2][t]
            if m.startswith("hessian"):
                scale = {"hessian": 1.0, "hessian ×0.9": 0.9, "hessian ×1.1": 1.1}[m]
                new_h = new_h + scale * hvp(a)
            elif m == "ggn":
                Ja = torch.einsum("bcd,nd->nbc", J, a)
                new_h = new_h + torch.einsum("bcd,nbc->nd", J, torch.einsum("bce,nbe->nbc", lam, Ja)) / B
            elif m == "fisher":
                new_h = new_h + ((a @ U.T) * B) @ U
            elif m == "ggn from rows":
                new_h = new_h + ((a @ U.T) * (B * omega)[None, :]) @ U
            elif m == "ggn from rows, Rayleigh weight":
                new_h = new_h + ((a @ U.T) * (B * omega_ray)[None, :]) @ U
            elif m == "ggn from rows, exact last layer":
                rank1 = ((a @ U.T) * (B * omega)[None, :]) @ U
                rank1_LL = ((a[:, lo_last:] @ U[:, lo_last:].T) * (B * omega)[None, :]) @ U[:, lo_last:]
                aW = a[:, lo_last:lo_last + C_out * h_in].reshape(-1, C_out, h_in)
                ab = a[:, lo_last + C_out * h_in:]
                Jv = torch.einsum("nch,bh->nbc", aW, a_in) + ab[:, None, :]  # (n, B, C)
                w = torch.einsum("bce,nbe->nbc", lam, Jv) / B
                ggn_LL = torch.cat([torch.einsum("nbc,bh->nch", w, a_in).reshape(len(a), -1), w.sum(1)], 1)
                extra = torch.zeros_like(a)
                extra[:, lo_last:] = ggn_LL - rank1_LL
                new_h = new_h + rank1 + extra
            rho[m] = (new_h, h * co[1][t] + b * co[3][t])
    truth = acc["hessian"]
    sv = np.linalg.svd(truth, compute_uv=False)
    spectrum = {"top3_energy": float((sv[:3] ** 2).sum() / (sv ** 2).sum()),
                "eta_lambda_max": _sharpness(model, logits, x, y, thetas + [theta], lrs, len(loader)),
                "threshold": 2 * (1 + mom)}
    out = {"_spectrum": spectrum}
    for m in MODELS:
        rho_s = fc.spearman_rows(acc[m].T, truth.T)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = float(np.nanmedian(np.abs(acc[m]) / np.abs(truth)))
        out[m] = {"spearman_mean": float(np.nanmean(rho_s)), "spearman_median": float(np.nanmedian(rho_s)),
                  "sign": float((np.sign(acc[m]) == np.sign(truth)).mean()), "scale": scale}
    return out, time.perf_counter() - start, T


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", nargs="+", default=["quickstart"], help=f"among: {', '.join(SETTINGS)}")
    ap.add_argument("--n-test", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=None, help="override the setting's epochs")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    session = fc.FieldRun()
    rows, runs = [], []
    for name in args.settings:
        result, secs, T = run_setting(SETTINGS[name], args.seed, args.n_test, args.epochs)
        runs.append({"setting": name, "steps": T, "walk_seconds": secs, "models": result})
        spec = result.pop("_spectrum")
        runs[-1]["spectrum"] = spec
        print(f"[{name}] top-3 singular values carry {spec['top3_energy']:.1%} of the exact matrix's energy; "
              f"η·λ_max at the epochs' ends {np.round(spec['eta_lambda_max'], 2).tolist()} "
              f"(threshold {spec['threshold']:.1f})", flush=True)
        for m, r in result.items():
            rows.append({"setting": name, "steps": T, "curvature": m, "Spearman mean": r["spearman_mean"],
                         "median": r["spearman_median"], "sign agr.": r["sign"], "|est|/|exact|": r["scale"]})
        common.print_table([r for r in rows if r["setting"] == name], digits=3)
    common.print_table(rows, digits=3, title=f"The walk with true per-step curvature vs the exact (Hessian) walk, "
                                             f"{args.n_test} test points × all N samples, float64, seed {args.seed}")
    session.finish("curvature_ceiling", "", vars(args), runs=runs, table=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
