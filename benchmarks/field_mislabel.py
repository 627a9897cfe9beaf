"""Mislabel detection on digits at 10% and 30% label noise: hydra_nb's self-influence next to TracIn
self-influence (Captum), influence-function self-influence, training loss and cleanlab's confident
learning.

For each noise rate and seed: flip that fraction of the 1,438 training labels to another class
(uniformly), train the MLP (64→32→10, tanh, 2,410 parameters; SGD lr 0.05, momentum 0.9, batch 64,
``--epochs`` epochs, float64) and rank every training sample by

* HYDRA self-influence, fast mode, projected (k = 1024) and full dimension (``store.self_influence``,
  largest first), and the same from ``mode="curvature"`` (issue 16);
* TracIn self-influence: Captum ``TracInCP.self_influence`` over the per-epoch checkpoints of the same run;
* influence-function self-influence g_iᵀ(G + λI)⁻¹g_i, G the exact generalized Gauss-Newton matrix at
  θ_T (eigendecomposition, λ = 0.01 and 0.1);
* training loss at θ_T (largest first);
* cleanlab confident learning: out-of-sample predicted probabilities from 5-fold cross-validation of
  the same model and schedule, ranked by ``cleanlab.rank.get_label_quality_scores`` (self-confidence,
  lowest first); ``cleanlab.filter.find_label_issues`` (prune_by_noise_rate) gives its flagged set,
  whose size, precision and recall are reported separately.

Reported: ROC AUC of the ranking for "label was flipped", and the fraction of flipped labels found
after inspecting the top 5 / 10 / 20% of the training set; mean ± std over seeds.

    python benchmarks/field_mislabel.py           # full: noise 10% and 30%, seeds 0 1 2, 20 epochs (~5 min)
    python benchmarks/field_mislabel.py --quick   # smoke run (< 1 min)
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

import hydra_nb  # noqa: E402

FRACTIONS = (0.05, 0.10, 0.20)


def flip_labels(y: torch.Tensor, rate: float, seed: int, n_classes: int = 10):
    rng = np.random.default_rng(seed)
    n = len(y)
    flipped = np.zeros(n, dtype=bool)
    idx = rng.choice(n, int(round(rate * n)), replace=False)
    flipped[idx] = True
    y_noisy = y.clone()
    shift = torch.from_numpy(rng.integers(1, n_classes, size=len(idx)))
    y_noisy[torch.from_numpy(idx)] = (y[torch.from_numpy(idx)] + shift) % n_classes
    return y_noisy, flipped


def cv_pred_probs(x, y, cfg, seed: int, folds: int = 5) -> np.ndarray:
    """Out-of-sample predicted probabilities from k-fold cross-validation (the same model and schedule)."""
    n = len(y)
    perm = np.random.default_rng(seed + 777).permutation(n)
    probs = np.zeros((n, 10))
    for f in range(folds):
        held = perm[f::folds]
        train = np.setdiff1d(perm, held)
        model = fc.make_model("MLP", seed + 100 * (f + 1))
        fc.train_plain(model, x[torch.from_numpy(train)], y[torch.from_numpy(train)], cfg)
        model.eval()
        with torch.no_grad():
            probs[held] = torch.softmax(model(x[torch.from_numpy(held)]), 1).numpy()
    return probs


def run(rate: float, seed: int, x, y_clean, xt, yt, cfg, args, tmp: Path) -> dict:
    y, flipped = flip_labels(y_clean, rate, seed)
    cfg.data_seed = seed
    scores, secs = {}, {}
    ckpt = tmp / "ckpt"
    ckpt.mkdir(exist_ok=True)

    t0 = time.perf_counter()
    fc.train_plain(fc.make_model("MLP", seed), x, y, cfg)
    plain_s = time.perf_counter() - t0

    model = None
    for k in args.ks:
        m = fc.make_model("MLP", seed)
        label = "HYDRA self-influence, fast, " + ("full dim" if k is None else f"k={k}")
        _, s, paths = fc.train_tracked(m, x, y, cfg, tmp / f"h{k}.zarr", projection_dim=k, proj_seed=seed,
                                       ckpt_dir=ckpt if model is None else None)
        t0 = time.perf_counter()
        store = hydra_nb.open_store(tmp / f"h{k}.zarr")
        scores[label] = store.self_influence(m, (x, y), progress=False)
        secs[label] = s + time.perf_counter() - t0
        curvature = label.replace("fast", "curvature")  # issue 16: the curvature estimate from the same log
        t0 = time.perf_counter()
        scores[curvature] = store.self_influence(m, (x, y), mode="curvature", progress=False)
        secs[curvature] = s + time.perf_counter() - t0
        if model is None:
            model, ckpt_paths = m, paths

    t0 = time.perf_counter()
    scores["TracIn self-influence (Captum TracInCP)"] = fc.tracin(model, x, y, ckpt_paths).self_influence().numpy()
    secs["TracIn self-influence (Captum TracInCP)"] = plain_s + time.perf_counter() - t0

    t0 = time.perf_counter()
    g = fc.per_sample_grads(model, x, y)
    ifn = fc.InfluenceFunction(fc.train_ggn(model, x, y), 1.0)
    t_if = time.perf_counter() - t0
    for lam in args.dampings:
        t0 = time.perf_counter()
        ifn.set_damping(lam)
        key = f"IF self-influence, GGN, λ={lam:g}"
        scores[key] = (ifn.solve(g) * g).sum(1).numpy()
        secs[key] = plain_s + t_if + time.perf_counter() - t0

    scores["training loss"] = fc.per_sample_losses(model, x, y).numpy()
    secs["training loss"] = plain_s

    import cleanlab

    t0 = time.perf_counter()
    probs = cv_pred_probs(x, y, cfg, seed, args.folds)
    yn = y.numpy()
    quality = cleanlab.rank.get_label_quality_scores(yn, probs, method="self_confidence")
    scores[f"cleanlab ({args.folds}-fold CV, self-confidence)"] = -quality
    issues = cleanlab.filter.find_label_issues(yn, probs, filter_by="prune_by_noise_rate")
    secs[f"cleanlab ({args.folds}-fold CV, self-confidence)"] = time.perf_counter() - t0
    tp = int((issues & flipped).sum())
    flagged = {"n_flagged": int(issues.sum()), "precision": tp / max(int(issues.sum()), 1),
               "recall": tp / int(flipped.sum())}

    metrics = {}
    for key, sc in scores.items():
        sc = np.asarray(sc, dtype=np.float64)
        m = {"auc": fc.auc(sc, flipped), **{f"found@{f:g}": v for f, v in fc.found_at(sc, flipped, FRACTIONS).items()},
             "seconds": secs[key]}
        metrics[key] = m
    model.eval()
    with torch.no_grad():
        acc = float((model(xt).argmax(1) == yt).double().mean())
    shutil.rmtree(ckpt, ignore_errors=True)
    return {"rate": rate, "seed": seed, "metrics": metrics, "cleanlab_flagged": flagged, "test_acc": acc,
            "plain_train_s": plain_s}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: seed 0, 3 epochs")
    ap.add_argument("--rates", type=float, nargs="+", default=[0.1, 0.3])
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (--quick 0)")
    ap.add_argument("--epochs", type=int, default=None, help="default 20 (--quick 3)")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--dampings", type=float, nargs="+", default=[0.01, 0.1])
    args = ap.parse_args(argv)
    fc.sizes(args, seeds=([0], [0, 1, 2]), epochs=(3, 20))
    args.ks = [1024, None]
    torch.set_default_dtype(torch.float64)
    session = fc.FieldRun()
    cfg = argparse.Namespace(lr=args.lr, momentum=args.momentum, batch_size=args.batch_size, epochs=args.epochs,
                             data_seed=0)
    x, y, xt, yt = fc.digits("MLP")
    fc.train_plain(fc.make_model("MLP", 0), x, y, argparse.Namespace(**{**vars(cfg), "epochs": 1}))  # warm-up
    runs = []
    for rate in args.rates:
        for seed in args.seeds:
            tmp = fc.tmpdir("hydra_mislabel_")
            try:
                r = run(rate, seed, x, y, xt, yt, cfg, args, tmp)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            runs.append(r)
            print(f"[noise {rate:.0%} seed {seed}] test acc {r['test_acc']:.3f}; " + "; ".join(
                f"{k}: AUC {v['auc']:.3f}" for k, v in r["metrics"].items()), flush=True)

    for rate in args.rates:
        rs = [r for r in runs if r["rate"] == rate]
        rows = []
        for key in rs[0]["metrics"]:
            row = {"method": key, "AUC": fc.pm([r["metrics"][key]["auc"] for r in rs])}
            for f in FRACTIONS:
                row[f"found @{f:.0%}"] = fc.pm([r["metrics"][key][f"found@{f:g}"] for r in rs], 2)
            row["s"] = f"{np.mean([r['metrics'][key]['seconds'] for r in rs]):.1f}"
            rows.append(row)
        common.print_table(rows, title=f"Mislabel detection, {rate:.0%} of labels flipped, MLP, {args.epochs} epochs, "
                                       f"seeds {args.seeds} (mean ± std)")
        fl = [r["cleanlab_flagged"] for r in rs]
        print(f"cleanlab find_label_issues flagged {np.mean([f['n_flagged'] for f in fl]):.0f} samples "
              f"(true: {int(round(rate * len(y)))}), precision {fc.pm([f['precision'] for f in fl], 2)}, "
              f"recall {fc.pm([f['recall'] for f in fl], 2)}; test accuracy of the noisy-label model "
              f"{fc.pm([r['test_acc'] for r in rs], 3)}; plain training {np.mean([r['plain_train_s'] for r in rs]):.1f} s")
    print("s: seconds from scratch to the ranking (training/tracking, checkpoints, curvature, CV trainings)")
    session.finish("field_mislabel", "_quick" if args.quick else "", vars(args), runs=runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
