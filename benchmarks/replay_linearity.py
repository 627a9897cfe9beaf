"""Over what size of change does the exact derivative predict retraining? Finite differences against
replay-exact, per training sample, from ε = 1e-8 up to removal (ε = 1).

The derivative replay returns, c[z, i] = −∂L_z/∂w_i, describes retraining with sample i's loss term
weighted 1 + w_i in the same batches. Here each chosen sample i is down-weighted to 1 − ε (w_i = −ε)
and the model retrained (same initialisation, same batches, vmapped like replay_lds.py); the finite
difference (L_z(ε) − L_z(0))/ε tends to c[z, i] as ε → 0 if the derivative is right, and stays close
to it up to the largest ε over which training is linear in w. Removal (LOO, LDS with weight zero) is
ε = 1. Reported per ε, over all (test point, sample) pairs: the relative error ‖FD − c‖/‖c‖, the
Pearson correlation of FD with c, the regression slope of FD on c, and the mean |ΔL|.

"Metasmoothness" (MAGIC, Ilyas & Engstrom 2025): a run whose outcome is a smooth function of the
data weights has a large linear range; a chaotic one (a large step size with ReLU/max-pool kinks) a
tiny one, and then even an exact derivative does not predict a removal.

    python benchmarks/replay_linearity.py                          # MLP and SmallCNN at the field setting
    python benchmarks/replay_linearity.py --models SmallCNN --lr 0.01 --epochs 16 --tag _cnn_lr0.01_ep16
    python benchmarks/replay_linearity.py --quick
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import field_common as fc  # noqa: E402
from replay_lds import BatchedSGD, loader_order  # noqa: E402

import hydra_nb  # noqa: E402

EPS = (1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 0.3, 1.0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 seed, 4 samples, 4 test points, 1 epoch")
    ap.add_argument("--models", nargs="+", default=["MLP", "SmallCNN"], choices=["MLP", "SmallCNN", "SmoothCNN"],
                    help="SmoothCNN: SmallCNN with GELU and average pooling (a diagnostic)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 (--quick 0)")
    ap.add_argument("--n-samples", type=int, default=None, help="random training samples per seed (default 20)")
    ap.add_argument("--n-test", type=int, default=None, help="test points (default 20)")
    ap.add_argument("--eps", type=float, nargs="+", default=list(EPS))
    ap.add_argument("--epochs", type=int, default=None, help="default 4 (--quick 1)")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--tag", default="", help="suffix of the JSON file name")
    args = ap.parse_args(argv)
    q = args.quick
    fc.sizes(args, seeds=([0], [0, 1]), n_samples=(4, 20), n_test=(4, 20), epochs=(1, 4))
    torch.set_default_dtype(torch.float64)
    session = fc.FieldRun()
    cfg = argparse.Namespace(lr=args.lr, momentum=args.momentum, batch_size=args.batch_size, epochs=args.epochs,
                             data_seed=0)
    rows, raw = [], {}
    for name in args.models:
        x, y, xt, yt = fc.digits(name)
        xq, yq = xt[: args.n_test], yt[: args.n_test]
        N = len(y)
        per_eps = {e: {"fd": [], "c": [], "dl": []} for e in args.eps}
        for seed in args.seeds:
            cfg.data_seed = seed
            tmp = fc.tmpdir("hydra_lin_")
            try:
                model = fc.make_model(name, seed)
                fc.train_tracked(model, x, y, cfg, tmp / "s.zarr", projection_dim=16)
                t0 = time.perf_counter()
                c = np.asarray(hydra_nb.open_store(tmp / "s.zarr").contributions(
                    model, xq, yq, mode="exact", train_data=(x, y), progress=False), dtype=np.float64)
                t_replay = time.perf_counter() - t0
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            samples = np.random.default_rng(1000 + seed).choice(N, args.n_samples, replace=False)
            trainer = BatchedSGD(name, seed, cfg)
            order = loader_order(N, cfg)
            w = torch.ones(1 + len(args.eps) * len(samples), N)
            for a, e in enumerate(args.eps):
                for b, i in enumerate(samples):
                    w[1 + a * len(samples) + b, i] = 1.0 - e
            losses = trainer.losses(trainer.weighted(x, y, order, w), xq, yq)  # (1 + E·S, n_test)
            base = losses[0]
            for a, e in enumerate(args.eps):
                dl = losses[1 + a * len(samples): 1 + (a + 1) * len(samples)] - base  # (S, n_test)
                per_eps[e]["fd"].append((dl / e).T.ravel())
                per_eps[e]["c"].append(c[:, samples].ravel())
                per_eps[e]["dl"].append(np.abs(dl).ravel())
            print(f"[{name} seed {seed}] replay query {t_replay:.1f} s; {len(w)} retrains", flush=True)
        for e in args.eps:
            fd, cc, dl = (np.concatenate(per_eps[e][k]) for k in ("fd", "c", "dl"))
            rows.append({"model": name, "ε": e, "rel. error ‖FD − c‖/‖c‖": float(np.linalg.norm(fd - cc)
                                                                               / np.linalg.norm(cc)),
                         "Pearson(FD, c)": fc.pearson(fd, cc), "slope FD/c": float(np.polyfit(cc, fd, 1)[0]),
                         "mean |ΔL|": float(dl.mean()), "mean |ε·c|": float(np.abs(e * cc).mean())})
            raw[f"{name} {e:g}"] = {"fd": fd, "c": cc}
    common.print_table(rows, digits=3, title=f"Finite differences vs replay-exact, {len(args.seeds)} seeds × "
                                             f"{args.n_samples} samples × {args.n_test} test points, {args.epochs} "
                                             f"epochs SGD(lr {args.lr}, momentum {args.momentum}, batch "
                                             f"{args.batch_size}), float64")
    print("FD = (L(w_i = −ε) − L(0))/ε with the same batches; c = replay-exact −∂L/∂w_i; ε = 1 is removal.")
    session.finish("replay_linearity", ("_quick" if q else "") + args.tag, vars(args), table=rows, raw=raw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
