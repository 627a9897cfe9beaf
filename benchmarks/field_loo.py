"""Leave-one-out: the change in a test loss when one training sample is removed, retrained for real,
against what each attribution method predicted.

Tiny model: the MLP (64→32→10, tanh, 2,410 parameters) on scikit-learn's digits, float64, SGD (lr 0.05,
momentum 0.9, batch 64), ``--epochs`` epochs, mean cross-entropy per batch. For each seed (model init and
batch order) and each of ``--n-test`` test points z:

1. the candidates are the 20 training samples with the largest and the 20 with the smallest fast-HYDRA
   contribution to z (full dimension): the most helpful and the most harmful;
2. each candidate i is removed by retraining from the same initialisation with the same batches in
   the same order, its term in every batch loss set to zero (weight 1 + w_i with w_i = −1; the batch
   mean keeps its denominator |B|): exactly the counterfactual that HYDRA's derivative describes, so the
   comparison tests the linearisation, not a change of batch composition;
3. actual ΔL = L(z; θ_T without i) − L(z; θ_T). A method's prediction for removing i is its score
   c[z, i] (c > 0: i helped z, so removing it raises z's loss by ≈ c).

Methods: HYDRA replay-exact (issue 14: the exact derivative for all N samples from one backward walk of
the fast-mode run, ``store.contributions(..., mode="exact", train_data=(x, y))``), HYDRA exact
(forward mode: Hessian-vector products, the candidates tracked exactly), HYDRA fast (full
dimension, and projected to k = 1024), Captum TracInCP over the per-epoch checkpoints, influence
functions (exact damped GGN and exact Hessian with negative eigenvalues clipped, λ = 0.01), gradient
dot product at θ_T. Reported: Pearson correlation of predicted and actual ΔL over the 40 candidates of a
test point, mean ± std over (seed, test point); the pooled Pearson over all pairs; and for the methods
that predict in loss units (HYDRA), the regression slope of actual on predicted.

    python benchmarks/field_loo.py           # seeds 0 1 2, 5 test points each, 4 epochs (~5 min on 2 cores)
    python benchmarks/field_loo.py --quick   # smoke run (< 1 min)
"""

from __future__ import annotations

import argparse
import shutil
import time
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import field_common as fc  # noqa: E402

import hydra_nb  # noqa: E402


def train_weighted(seed, x, y, cfg, drop: int | None = None):
    """Train the MLP with each sample's term weighted 1 (0 for ``drop``), mean over the batch size."""
    model = fc.make_model("MLP", seed)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    loader = fc.make_loader(torch.arange(len(y)), y, cfg.batch_size, cfg.data_seed)
    model.train()
    for _ in range(cfg.epochs):
        for idx, yb in loader:
            w = torch.ones(len(idx), dtype=x.dtype)
            if drop is not None:
                w[idx == drop] = 0.0
            opt.zero_grad()
            (F.cross_entropy(model(x[idx]), yb, reduction="none") * w).sum().div(len(idx)).backward()
            opt.step()
    return model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="seed 0, 2 test points, 1 epoch, 5+5 candidates")
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--n-test", type=int, default=None, help="test points per seed (default 5)")
    ap.add_argument("--n-extreme", type=int, default=None, help="most and least influential per test point (default 20)")
    ap.add_argument("--epochs", type=int, default=None, help="default 4 (--quick 1)")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--damping", type=float, default=0.01)
    args = ap.parse_args(argv)
    q = args.quick
    fc.sizes(args, seeds=([0], [0, 1, 2]), n_test=(2, 5), n_extreme=(5, 20), epochs=(1, 4))
    torch.set_default_dtype(torch.float64)
    session = fc.FieldRun()
    x, y, xt, yt = fc.digits("MLP")
    cfg = argparse.Namespace(lr=args.lr, momentum=args.momentum, batch_size=args.batch_size, epochs=args.epochs,
                             data_seed=0)
    replay_info = []
    pairs = []  # one dict per (seed, test point): method -> predicted (40,), "actual" -> (40,)
    for seed in args.seeds:
        cfg.data_seed = seed
        tmp = fc.tmpdir("hydra_loo_")
        try:
            base = train_weighted(seed, x, y, cfg)
            xq, yq = xt[seed * args.n_test:(seed + 1) * args.n_test], yt[seed * args.n_test:(seed + 1) * args.n_test]
            base_loss = fc.per_sample_losses(base, xq, yq).numpy()

            # the user's loop under hydra_nb.track: the same batches, mean cross-entropy
            model = fc.make_model("MLP", seed)
            _, _, ckpts = fc.train_tracked(model, x, y, cfg, tmp / "full.zarr", projection_dim=None, ckpt_dir=tmp)
            drift = float((fc.flat_params(model) - fc.flat_params(base)).abs().max())
            full = hydra_nb.open_store(tmp / "full.zarr")
            fast = full.contributions(model, xq, yq, progress=False)
            t0 = time.perf_counter()
            replay = full.contributions(model, xq, yq, mode="exact", train_data=(x, y), progress=False)
            t_replay = time.perf_counter() - t0
            m = fc.make_model("MLP", seed)
            fc.train_tracked(m, x, y, cfg, tmp / "k1024.zarr", projection_dim=1024, proj_seed=seed)
            proj = hydra_nb.open_store(tmp / "k1024.zarr").contributions(m, xq, yq, progress=False)

            cand = [np.concatenate([np.argsort(-fast[j])[: args.n_extreme], np.argsort(fast[j])[: args.n_extreme]])
                    for j in range(len(yq))]
            union = np.unique(np.concatenate(cand))
            m = fc.make_model("MLP", seed)
            fc.train_tracked(m, x, y, cfg, tmp / "exact.zarr", mode="exact", projection_dim=None,
                             exact_indices=union, hvp_batch=512)
            st = hydra_nb.open_store(tmp / "exact.zarr")
            exact_sub = st.contributions(m, xq, yq, progress=False)
            col = {int(i): c for c, i in enumerate(st.tracked_indices)}
            cols = [col[int(i)] for i in union]
            replay_vs_forward = float(np.linalg.norm(replay[:, union] - exact_sub[:, cols])
                                      / np.linalg.norm(exact_sub[:, cols]))

            tracin = fc.tracin(model, x, y, ckpts).influence((xq, yq)).numpy()
            g_tr, g_te = fc.per_sample_grads(model, x, y), fc.per_sample_grads(model, xq, yq)
            ggn = fc.InfluenceFunction(fc.train_ggn(model, x, y), args.damping).scores(g_te, g_tr).numpy()
            hess = fc.InfluenceFunction(fc.train_hessian(model, x, y), args.damping).scores(g_te, g_tr).numpy()
            dot = (g_te @ g_tr.T).numpy()

            actual = {}
            for i in union:
                actual[int(i)] = fc.per_sample_losses(train_weighted(seed, x, y, cfg, drop=int(i)), xq, yq).numpy() - base_loss
            for j in range(len(yq)):
                c = cand[j]
                pairs.append({
                    "seed": seed, "test": int(seed * args.n_test + j), "candidates": c.tolist(),
                    "actual": np.array([actual[int(i)][j] for i in c]),
                    "HYDRA replay-exact (all N)": replay[j, c],
                    "HYDRA forward-exact (tracked candidates)": np.array([exact_sub[j, col[int(i)]] for i in c]),
                    "HYDRA fast, full dim": fast[j, c], "HYDRA fast, k=1024": proj[j, c],
                    "TracInCP (Captum)": tracin[j, c], f"IF, GGN, λ={args.damping:g}": ggn[j, c],
                    f"IF, Hessian₊, λ={args.damping:g}": hess[j, c], "gradient dot product": dot[j, c],
                })
            replay_info.append({"seed": seed, "replay_query_s": t_replay, "n_test": len(yq),
                                "rel_diff_replay_vs_forward_exact": replay_vs_forward})
            print(f"[seed {seed}] replay query {t_replay:.1f} s ({len(yq)} test points × {len(y)} samples), "
                  f"‖replay − forward exact‖/‖forward exact‖ on the candidates {replay_vs_forward:.1e}")
            print(f"[seed {seed}] {len(union)} leave-one-out retrains; max |θ_tracked − θ_weighted-loop| {drift:.1e}; "
                  + "; ".join(f"test {p['test']}: r(forward exact) {fc.pearson(p['HYDRA forward-exact (tracked candidates)'], p['actual']):.3f}"
                              for p in pairs if p["seed"] == seed), flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    methods = [k for k in pairs[0] if k not in ("seed", "test", "candidates", "actual")]
    rows = []
    for meth in methods:
        per = [fc.pearson(p[meth], p["actual"]) for p in pairs]
        pooled_pred = np.concatenate([p[meth] for p in pairs])
        pooled_act = np.concatenate([p["actual"] for p in pairs])
        row = {"method": meth, "Pearson per test point": fc.pm(per), "pooled Pearson": fc.pearson(pooled_pred, pooled_act)}
        if meth.startswith("HYDRA"):
            row["slope actual/predicted"] = float(np.polyfit(pooled_pred, pooled_act, 1)[0])
        else:
            row["slope actual/predicted"] = "– (other units)"
        rows.append(row)
    common.print_table(rows, digits=3, title=f"Leave-one-out on the MLP, {len(args.seeds)} seeds × {args.n_test} test "
                                             f"points × ({args.n_extreme} most + {args.n_extreme} least influential), "
                                             f"{args.epochs} epochs")
    print("Pearson per test point: mean ± std over (seed, test point) of the correlation over its candidates")
    session.finish("field_loo", "_quick" if q else "", vars(args), pairs=pairs, table=rows, replay=replay_info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
