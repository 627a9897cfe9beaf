"""Approximation error of fast HYDRA (Hessian terms dropped) against exact HYDRA, over training.

One run per (model, setting, seed) in ``mode="exact"``: ``--n-tracked`` random training samples tracked
with Hessian-vector products, the fast estimate of the same samples logged in the same run, a
checkpoint every ``--every`` steps. ``store.trajectory(..., mode="exact")`` and ``mode="fast"`` give the
contributions of those samples to ``--n-test`` test points as if training had stopped at each
checkpoint; per checkpoint we report

* relative error ‖C_fast − C_exact‖ / ‖C_exact‖ (Frobenius, over test × tracked),
* the mean over test points of the Spearman correlation of the two rankings of the tracked samples,
* the top-10 overlap (most helpful samples per test point), mean over test points.

Models: the MLP (64→32→10, tanh, 2,410 parameters) and SmallCNN (1,898) on 8×8 digits, float64, batch 64.
Settings: SGD lr 0.01 without momentum, and lr 0.05 with momentum 0.9 (the quickstart's).

For the projection's error (dimensions 64…4096 against full dimension) see projection_fidelity.py:

    python benchmarks/projection_fidelity.py --models LeNet5 --ks 64 128 256 512 1024 2048 4096

    python benchmarks/field_approx.py           # seeds 0 1, 4 epochs, 200 tracked, 50 test points (~6 min)
    python benchmarks/field_approx.py --quick   # smoke run
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import field_common as fc  # noqa: E402

import hydra_nb  # noqa: E402

SETTINGS = {"lr 0.01, no momentum": (0.01, 0.0), "lr 0.05, momentum 0.9": (0.05, 0.9)}


def compare(exact: np.ndarray, fast: np.ndarray) -> dict:
    """Metrics between two (n_test, n_train) contribution matrices."""
    rel = float(np.linalg.norm(fast - exact) / np.linalg.norm(exact))
    rho = float(np.nanmean(fc.spearman_rows(exact.T, fast.T)))
    top_e = np.argsort(-exact, axis=1)[:, :10]
    top_f = np.argsort(-fast, axis=1)[:, :10]
    overlap = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top_e, top_f)]))
    return {"rel_err": rel, "spearman": rho, "top10": overlap}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="MLP, seed 0, 1 epoch, 40 tracked, 10 test points")
    ap.add_argument("--models", nargs="+", default=None, choices=["MLP", "SmallCNN"])
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--epochs", type=int, default=None, help="default 4 (--quick 1)")
    ap.add_argument("--n-tracked", type=int, default=None, help="default 200 (--quick 40)")
    ap.add_argument("--n-test", type=int, default=None, help="default 50 (--quick 10)")
    ap.add_argument("--every", type=int, default=15, help="checkpoint every this many steps")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args(argv)
    q = args.quick
    args.models = args.models or (["MLP"] if q else ["MLP", "SmallCNN"])
    args.seeds = args.seeds if args.seeds is not None else ([0] if q else [0, 1])
    args.epochs = args.epochs or (1 if q else 4)
    args.n_tracked = args.n_tracked or (40 if q else 200)
    args.n_test = args.n_test or (10 if q else 50)
    torch.set_default_dtype(torch.float64)
    session = fc.FieldRun()
    runs = []
    for name in args.models:
        x, y, xt, yt = fc.digits(name)
        xq, yq = xt[: args.n_test], yt[: args.n_test]
        for setting, (lr, mom) in SETTINGS.items():
            for seed in args.seeds:
                cfg = argparse.Namespace(lr=lr, momentum=mom, batch_size=args.batch_size, epochs=args.epochs,
                                         data_seed=seed)
                tracked = np.sort(np.random.default_rng(seed).choice(len(y), args.n_tracked, replace=False))
                tmp = fc.tmpdir("hydra_approx_")
                try:
                    model = fc.make_model(name, seed)
                    _, secs, _ = fc.train_tracked(model, x, y, cfg, tmp / "exact.zarr", mode="exact",
                                                  projection_dim=None, exact_indices=tracked,
                                                  checkpoint_every=args.every, hvp_batch=256)
                    st = hydra_nb.open_store(tmp / "exact.zarr")
                    steps, ex = st.trajectory(model, xq, yq, tracked, mode="exact", progress=False)
                    _, fa = st.trajectory(model, xq, yq, tracked, mode="fast", progress=False)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
                per_ckpt = [{"step": int(s), **compare(ex[:, c], fa[:, c])} for c, s in enumerate(steps) if s > 0]
                runs.append({"model": name, "setting": setting, "seed": seed, "tracking_s": secs,
                             "checkpoints": per_ckpt})
                last = per_ckpt[-1]
                print(f"[{name}, {setting}, seed {seed}] {len(steps)} checkpoints; at step {last['step']}: "
                      f"rel. error {last['rel_err']:.3f}, Spearman {last['spearman']:.3f}, top-10 {last['top10']:.2f}",
                      flush=True)

    rows = []
    for name in args.models:
        for setting in SETTINGS:
            rs = [r for r in runs if r["model"] == name and r["setting"] == setting]
            n_ck = len(rs[0]["checkpoints"])
            picks = sorted({0, 1, n_ck // 4, n_ck // 2, n_ck - 1} & set(range(n_ck)))
            for c in picks:
                rows.append({"model": name, "setting": setting, "step": rs[0]["checkpoints"][c]["step"],
                             "rel. error": fc.pm([r["checkpoints"][c]["rel_err"] for r in rs]),
                             "Spearman": fc.pm([r["checkpoints"][c]["spearman"] for r in rs]),
                             "top-10 overlap": fc.pm([r["checkpoints"][c]["top10"] for r in rs], 2)})
    common.print_table(rows, title=f"Fast vs exact HYDRA over training: {args.n_tracked} samples tracked exactly, "
                                   f"{args.n_test} test points, batch {args.batch_size}, float64, seeds {args.seeds} "
                                   f"(mean ± std)")
    session.finish("field_approx", "_quick" if q else "", vars(args), runs=runs, table=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
