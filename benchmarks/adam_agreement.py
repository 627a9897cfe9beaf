"""How close is hydra_nb's Adam/AdamW fast mode to the true derivative through the real Adam loop?

On scikit-learn's digits (8×8, flattened, float64; a subset of distinct images), a logistic
regression (650 parameters) and a tanh MLP 64→16→10 (1,210 parameters) are trained with
Adam, AdamW and, for context, SGD with momentum. Each run is tracked by hydra_nb twice (full
dimension and ``projection_dim=k``; the same seeds give the same training) and compared, over
all (test point, training sample) pairs of the contribution matrix C[test, train], with

* **truth**: −dL(z; θ_T)/dw_i by autograd through the whole unrolled optimizer loop, including the
  dependence of Adam's second moment v on w (``tests/reference.py``: ``unrolled_contributions``);
* **reference (1)**: approximation (1) alone — v held fixed, Hessian dropped, the true D_t at every
  step — in full dimension (``adam_hessian_free_contributions``). hydra_nb adds approximation (2)
  (each injection keeps the preconditioner D_s of its step; docs/optimizers.md).

Rows "hydra_nb full vs reference (1)" isolate approximation (2); "reference (1) vs truth" isolates (1);
"hydra_nb k vs hydra_nb full" the projection, and a second table says why it costs more with Adam
(``projection_diagnostics``). Rows "replay-exact ... vs truth" (issue 14) are the exact answer from the
same fast-mode stores by replaying the run backward (``store.contributions(..., mode="exact",
train_data=(x, y))``), on the full-dimensional store and on the projected one (replay does not use the
projected rows, so both should equal the truth to rounding).
Pearson and Spearman over all pairs, the mean per-test-point Spearman, the relative error
‖C − C_ref‖/‖C_ref‖ and the least-squares scale s minimising ‖C_ref − s·C‖ (1 = right magnitude).

    python benchmarks/adam_agreement.py            # ~1-2 min on 2 cores
    python benchmarks/adam_agreement.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))  # the independent references of the test suite
import common  # noqa: E402
from reference import (AdamRun, Run, adam_hessian_free_contributions, hessian_free_contributions,  # noqa: E402
                       train, unrolled_contributions)

import hydra_nb  # noqa: E402
from hydra_nb.examples import load_digits  # noqa: E402

DT = torch.float64


def digits(n_train: int, n_test: int):
    x_tr, y_tr, x_te, y_te = load_digits(dtype=DT)
    x_tr, x_te = x_tr.reshape(len(x_tr), -1), x_te.reshape(len(x_te), -1)
    _, first = np.unique(x_tr.numpy(), axis=0, return_index=True)  # the references need distinct rows
    keep = torch.from_numpy(np.sort(first)[:n_train])
    return x_tr[keep], y_tr[keep], x_te[:n_test], y_te[:n_test]


MODELS = {
    "logreg": lambda: nn.Linear(64, 10),
    "mlp": lambda: nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)),
}
OPTIMIZERS = {
    "Adam": lambda ps, a: torch.optim.Adam(ps, lr=a.adam_lr),
    "AdamW": lambda ps, a: torch.optim.AdamW(ps, lr=a.adam_lr, weight_decay=a.weight_decay),
    "SGD": lambda ps, a: torch.optim.SGD(ps, lr=a.sgd_lr, momentum=0.9),
}


def tracked_run(model_name, opt_name, data, projection_dim, args, tmp: Path):
    """Train once under hydra_nb.track; returns (model, recorded Run, contributions C, tracking seconds)."""
    x, y, xt, yt = data
    torch.manual_seed(args.seed)
    model = MODELS[model_name]().to(DT)
    opt = OPTIMIZERS[opt_name](model.parameters(), args)
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size, shuffle=True,
                        generator=common.generator(args.seed + 1))
    run = (Run if opt_name == "SGD" else AdamRun)(model, opt, x, y)
    path = tmp / f"{model_name}_{opt_name}_{projection_dim}.zarr"
    start = time.perf_counter()
    with hydra_nb.track(model, loader, store=str(path), optimizer=opt, projection_dim=projection_dim,
                        overwrite=True, strict=True, seed=args.seed):
        train(model, loader, opt, run, args.epochs)
    seconds = time.perf_counter() - start
    store = hydra_nb.open_store(str(path))
    C = np.asarray(store.contributions(model, xt, yt), dtype=np.float64)
    t0 = time.perf_counter()
    R = np.asarray(store.contributions(model, xt, yt, mode="exact", train_data=(x, y), progress=False),
                   dtype=np.float64)
    replay_s = time.perf_counter() - t0
    diag = projection_diagnostics(store, model, xt, yt, args.k) if projection_dim is None else None
    return model, run, C, seconds, diag, R, replay_s


def projection_diagnostics(store, model, xt, yt, k: int) -> dict:
    """Why a projection to k keeps more or less of the ranking (computed on a full-dimensional store).

    Blocks no larger than their share of k are kept exactly (unsketched); the others add noise of
    about ‖g_b‖·‖h_b‖/√k_b per pair. Reports the median noise-to-signal ratio over (test, train)
    pairs, the unsketched blocks' share of ‖h‖², and the correlation of their part of the
    contributions with the whole.
    """
    H = np.asarray(store.hypergradients(checkpoint=-1, progress=False), dtype=np.float64)
    G = []
    for j in range(len(xt)):
        model.zero_grad()
        F.cross_entropy(model(xt[j:j + 1]), yt[j:j + 1]).backward()
        G.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy())
    G = np.stack(G)
    plan = hydra_nb.projection.Projector.plan(store.layout, k, 0, torch.float64)
    noise2, exact, h_exact = np.zeros((len(G), len(H))), np.zeros((len(G), len(H))), 0.0
    for block, slot in zip(plan.blocks, store.layout.slots):
        gb, hb = G[:, slot.offset:slot.offset + slot.numel], H[:, slot.offset:slot.offset + slot.numel]
        if block.sketch:
            noise2 += np.outer((gb ** 2).sum(1), (hb ** 2).sum(1)) / block.dim
        else:
            exact += gb @ hb.T
            h_exact += float((hb ** 2).sum())
    whole = G @ H.T
    return {"noise_to_signal": float(np.median(np.sqrt(noise2) / np.abs(whole))),
            "unsketched_h_share": h_exact / float((H ** 2).sum()),
            "unsketched_corr": float(np.corrcoef(exact.ravel(), whole.ravel())[0, 1]) if exact.any() else float("nan")}


def compare(C: np.ndarray, ref: np.ndarray) -> dict:
    a, b = C.ravel(), ref.ravel()
    per = [stats.spearmanr(C[j], ref[j])[0] for j in range(len(ref)) if np.std(C[j]) > 0 and np.std(ref[j]) > 0]
    return {"pearson": float(stats.pearsonr(a, b)[0]), "spearman": float(stats.spearmanr(a, b)[0]),
            "spearman_per_test": float(np.mean(per)), "rel_error": float(np.linalg.norm(a - b) / np.linalg.norm(b)),
            "scale": float(a @ b / (a @ a))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-train", type=int, default=300)
    p.add_argument("--n-test", type=int, default=30)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--adam-lr", type=float, default=0.01)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--sgd-lr", type=float, default=0.05)
    p.add_argument("--k", type=int, default=128, help="projection_dim of the projected runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--quick", action="store_true", help="100 samples, 10 test points, 2 epochs")
    args = p.parse_args()
    if args.quick:
        args.n_train, args.n_test, args.epochs = 100, 10, 2
    torch.set_num_threads(2)
    data = digits(args.n_train, args.n_test)
    xt, yt = data[2], data[3]
    rows, diags = [], []
    load = common.LoadMeter()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for model_name in args.models:
            for opt_name in OPTIMIZERS:
                t0 = time.perf_counter()
                model, run, C_full, track_s, diag, R_full, replay_s = tracked_run(model_name, opt_name, data, None, args,
                                                                                 Path(tmp))
                _, _, C_k, _, _, R_k, _ = tracked_run(model_name, opt_name, data, args.k, args, Path(tmp))
                diags.append({"model": model_name, "optimizer": opt_name, "k": args.k, **diag})
                truth = unrolled_contributions(run, xt, yt)["values"][:, 0]
                base = dict(model=model_name, optimizer=opt_name, steps=run.T)
                rows.append({**base, "compared": "replay-exact (full store) vs truth", **compare(R_full, truth)})
                rows.append({**base, "compared": f"replay-exact (k={args.k} store) vs truth", **compare(R_k, truth)})
                rows.append({**base, "compared": "hydra_nb full vs truth", **compare(C_full, truth)})
                rows.append({**base, "compared": f"hydra_nb k={args.k} vs truth", **compare(C_k, truth)})
                rows.append({**base, "compared": f"hydra_nb k={args.k} vs hydra_nb full", **compare(C_k, C_full)})
                if opt_name != "SGD":
                    ref1 = adam_hessian_free_contributions(run, xt, yt)["values"][:, 0]
                    ref12 = adam_hessian_free_contributions(run, xt, yt, freeze_D=True)["values"][:, 0]
                    rows.append({**base, "compared": "reference (1) vs truth", **compare(ref1, truth)})
                    rows.append({**base, "compared": "hydra_nb full vs reference (1)", **compare(C_full, ref1)})
                    check = compare(C_full, ref12)["rel_error"]
                else:
                    check = compare(C_full, hessian_free_contributions(run, xt, yt)["values"][:, 0])["rel_error"]
                assert check < 1e-8, f"hydra_nb disagrees with its own reference ({check:.1e}): a bug, not an approximation"
                print(f"[{model_name} {opt_name}] {run.T} steps, tracking {track_s:.1f} s, replay query {replay_s:.1f} s, "
                      f"{time.perf_counter() - t0:.1f} s in all", flush=True)
    cols = ["model", "optimizer", "steps", "compared", "pearson", "spearman", "spearman_per_test", "rel_error", "scale"]
    common.print_table(rows, cols, digits=3, title="Adam/AdamW fast mode: agreement of contributions")
    print(common.markdown_table(rows, cols, digits=3))
    dcols = ["model", "optimizer", "k", "noise_to_signal", "unsketched_h_share", "unsketched_corr"]
    common.print_table(diags, dcols, digits=3, title="Projection diagnostics (full-dimensional runs)")
    print(common.markdown_table(diags, dcols, digits=3))
    wall = time.perf_counter() - start
    load = load.read()
    print(f"other processes used {100 * (load['foreign_cpu_share'] or 0):.0f}% of the machine's CPU during this run")
    print(f"wall time {wall:.1f} s")
    common.write_json("adam_agreement" + ("_quick" if args.quick else ""), {"config": vars(args), "n_train": len(data[0]), "rows": rows, "projection_diagnostics": diags,
                                         "wall_seconds": wall, "load": load, "machine": common.machine_info(),
                                         "git": common.git_revision()})


if __name__ == "__main__":
    main()
