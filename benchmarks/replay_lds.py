"""Linear datamodeling score (LDS) of replay-exact HYDRA and its peers at small and large removal
fractions, with removal done two ways (issue 14's quality benchmark).

Digits, float64, the MLP (64→32→10, 2,410 parameters) and SmallCNN (1,898), SGD (default lr 0.05,
momentum 0.9, batch 64, 4 epochs: the field benchmarks' setting), mean cross-entropy per batch.
For every seed s (model init, batch order, subset draws):

1. train once on all N = 1,438 samples under ``hydra_nb.track`` (fast mode, full dimension; a state
   file per epoch for TracInCP) and score ``--n-test`` test points with every method (c[z, i] > 0:
   sample i helped z):
   replay-exact (``store.contributions(..., mode="exact", train_data=...)``: the exact derivative
   −∂L_z/∂w_i for all N samples, walking the recorded run backward); HYDRA fast (full dimension);
   Captum TracInCP over the per-epoch checkpoints; influence functions with the exact damped GGN
   (and, for the MLP, the Hessian with negative eigenvalues clipped) at λ = 0.1 / 0.01 / 0.001; the
   gradient dot product at θ_T; random scores.
2. for each removal fraction f in ``--fractions`` draw ``--subsets`` random sets R of round(f·N)
   samples to remove (seeded) and retrain from the same initialisation, two ways:

   * **weight zero** ("zero"): the same batches in the same order, the removed samples' loss terms
     multiplied by 0, the batch mean keeping its denominator |B| (field_loo.py's counterfactual:
     w_i = −1 for i ∈ R, exactly what the derivative describes);
   * **actual removal** ("drop"): a new DataLoader over the kept samples with the same generator seed
     (so other batches: every batch after the first removed sample changes).

   The M retrains of one (fraction, removal) are one vmapped training run (``torch.func``: every
   model its own parameters and momentum, the same SGD arithmetic as ``torch.optim.SGD``); the
   script checks that with all weights one it reproduces the tracked run's θ_T.
3. LDS(z) = Spearman correlation, over the subsets, of the predicted loss change Σ_{i∈R} c[z, i]
   (= −Σ_{i∈S} c[z, i] + const, S the kept set) with the actual test loss after retraining; the mean
   over test points, then mean ± std over seeds.

Noise ceiling: "drop" retrains every subset a second time with another batch order (generator seed
s + 1000) and reports the LDS of that second retrain used as the prediction — how well one training
run can predict another at all. Two retrains share the signal and carry independent noise, so their
correlation r is the signal's share of the variance, and a predictor of the signal alone (the expected
loss over batch orders) would correlate about √r with one retrain: the "noise-free" ceiling row
(mean over test points of √max(r, 0)). A method can beat the first row, not (beyond noise) the second.
"zero" retraining is deterministic (the same batches, the same arithmetic): its ceiling is 1; the script
verifies this by retraining the first subsets again and reporting the largest difference in test loss (0.0 on the CPU).

    python benchmarks/replay_lds.py                     # 2 models × 3 seeds × 4 fractions × 100 subsets
    python benchmarks/replay_lds.py --quick             # smoke run (~1 min)
    python benchmarks/replay_lds.py --models MLP --lr 0.01 --tag _lr0.01   # a setting sweep (JSON suffix)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import field_common as fc  # noqa: E402

import hydra_nb  # noqa: E402

DAMPINGS = (1e-1, 1e-2, 1e-3)
REPLAY = "HYDRA replay-exact"
CEILING = "ceiling"
CEILING_NF = "ceiling, noise-free predictor"


# -- batch schedules ---------------------------------------------------------------------------
def loader_order(n: int, cfg) -> list[torch.Tensor]:
    """The positions, batch by batch over all epochs, that ``fc.make_loader`` over n samples yields
    (``RandomSampler`` with a generator seeded ``cfg.data_seed``: the order depends on n and the seed only)."""
    loader = fc.make_loader(torch.arange(n), torch.arange(n), cfg.batch_size, cfg.data_seed)
    return [idx.clone() for _ in range(cfg.epochs) for idx, _ in loader]


# -- M retrains at once --------------------------------------------------------------------------
class BatchedSGD:
    """M copies of a model trained together with ``torch.func.vmap``: per-model parameters and momentum
    buffers, per-model per-sample loss weights or per-model batches. The update is torch.optim.SGD's
    (momentum, no dampening/Nesterov/weight decay): buf ← μ·buf + g (buf ← g at the first step),
    θ ← θ − η·buf.
    The batch loss is Σ_b w_b·ℓ_b / |B| (the mean cross-entropy when every w_b = 1)."""

    def __init__(self, name: str, seed: int, cfg):
        self.base = fc.make_model(name, seed)
        self.base.train()
        self.cfg = cfg

        def batch_loss(p, xb, yb, wb):
            out = functional_call(self.base, p, (xb,))
            return (F.cross_entropy(out, yb, reduction="none") * wb).sum() / yb.shape[0]

        self.shared = vmap(grad(batch_loss), in_dims=(0, None, None, 0))   # same batch, per-model weights
        self.own = vmap(grad(batch_loss), in_dims=(0, 0, 0, None))        # per-model batches, weights one

        def test_losses(p, xq, yq):
            return F.cross_entropy(functional_call(self.base, p, (xq,)), yq, reduction="none")

        self.test = vmap(test_losses, in_dims=(0, None, None))

    def _init(self, M: int) -> dict:
        return {k: v.detach().unsqueeze(0).repeat(M, *([1] * v.dim())).contiguous()
                for k, v in self.base.named_parameters()}

    def _step(self, params, bufs, g, first: bool):
        lr, mom = self.cfg.lr, self.cfg.momentum
        for k in params:
            if mom:
                if first:
                    bufs[k] = g[k].clone()
                else:
                    bufs[k].mul_(mom).add_(g[k])
                params[k].sub_(lr * bufs[k])
            else:
                params[k].sub_(lr * g[k])

    def weighted(self, x, y, order, weights: torch.Tensor) -> dict:
        """Train M models on the shared batch ``order``; ``weights`` (M, N): sample i's weight in model m."""
        params, bufs = self._init(len(weights)), {}
        for t, idx in enumerate(order):
            g = self.shared(params, x[idx], y[idx], weights[:, idx])
            self._step(params, bufs, g, t == 0)
        return params

    def subsets(self, x, y, orders: list[list[torch.Tensor]]) -> dict:
        """Train M models, model m on its own batch sequence ``orders[m]`` (dataset indices; all of one length
        and batch sizes, as for subsets of one size)."""
        params, bufs = self._init(len(orders)), {}
        one = torch.ones((), dtype=x.dtype)
        for t in range(len(orders[0])):
            idx = torch.stack([o[t] for o in orders])  # (M, B)
            g = self.own(params, x[idx], y[idx], one)
            self._step(params, bufs, g, t == 0)
        return params

    def losses(self, params, xq, yq) -> np.ndarray:
        with torch.no_grad():
            return self.test(params, xq, yq).numpy()


def retrain(trainer: BatchedSGD, x, y, xq, yq, removed: np.ndarray, how: str, cfg, data_seed: int,
            chunk: int, down_weight: float = 1.0) -> np.ndarray:
    """(M, n_test) test losses after retraining without each row's removed set (``removed``: (M, N) bool).
    ``how="zero"`` with ``down_weight`` ε < 1: the removed samples' weights become 1 − ε instead of 0."""
    M, N = removed.shape
    out = np.empty((M, len(yq)))
    run_cfg = argparse.Namespace(**{**vars(cfg), "data_seed": data_seed})
    if how == "zero":
        order = loader_order(N, run_cfg)
    else:
        n_keep = N - int(removed[0].sum())
        pos = loader_order(n_keep, run_cfg)  # the same positions for every subset of this size
    for s in range(0, M, chunk):
        rows = removed[s:s + chunk]
        if how == "zero":
            params = trainer.weighted(x, y, order, 1.0 - down_weight * torch.from_numpy(rows).to(x.dtype))
        else:
            keep = [torch.from_numpy(np.flatnonzero(~r)) for r in rows]
            params = trainer.subsets(x, y, [[k[p] for p in pos] for k in keep])
        out[s:s + chunk] = trainer.losses(params, xq, yq)
    return out


# -- scores ------------------------------------------------------------------------------------
def attributions(name, seed, x, y, xq, yq, cfg, args, tmp: Path, x_all_test,
                 y_all_test) -> tuple[dict, dict, dict, torch.nn.Module]:
    """{method: (n_test, N) scores}, {method: seconds}, info, the trained model."""
    scores, secs, info = {}, {}, {}
    ckpt = tmp / "ckpt"
    ckpt.mkdir()
    model = fc.make_model(name, seed)
    _, s_track, paths = fc.train_tracked(model, x, y, cfg, tmp / "full.zarr", projection_dim=None, ckpt_dir=ckpt)
    info["tracked_train_s"] = s_track
    store = hydra_nb.open_store(tmp / "full.zarr")

    t0 = time.perf_counter()
    scores[REPLAY] = np.asarray(store.contributions(model, xq, yq, mode="exact", train_data=(x, y), progress=False),
                                dtype=np.float64)
    secs[REPLAY] = time.perf_counter() - t0
    src = getattr(store, "_replay_source", None)
    drift = getattr(src[1], "drift", None) if src else None
    if drift:
        info["replay_max_drift"] = max(drift.values())  # relative, at the checkpoints

    t0 = time.perf_counter()
    scores["HYDRA fast, full dim"] = np.asarray(store.contributions(model, xq, yq, progress=False), dtype=np.float64)
    secs["HYDRA fast, full dim"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    scores["TracInCP (Captum)"] = fc.tracin(model, x, y, paths).influence((xq, yq)).numpy()
    secs["TracInCP (Captum)"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    g_tr, g_te = fc.per_sample_grads(model, x, y), fc.per_sample_grads(model, xq, yq)
    t_grad = time.perf_counter() - t0
    scores["gradient dot product"] = (g_te @ g_tr.T).numpy()
    secs["gradient dot product"] = t_grad

    curvatures = [("GGN", fc.train_ggn)] + ([("Hessian₊", fc.train_hessian)] if name in args.hessian_models else [])
    for label, fn in curvatures:
        t0 = time.perf_counter()
        ifn = fc.InfluenceFunction(fn(model, x, y), 1.0)
        t_h = time.perf_counter() - t0
        for lam in DAMPINGS:
            t0 = time.perf_counter()
            ifn.set_damping(lam)
            scores[f"IF, {label}, λ={lam:g}"] = ifn.scores(g_te, g_tr).numpy()
            secs[f"IF, {label}, λ={lam:g}"] = t_grad + t_h + time.perf_counter() - t0

    scores["random"] = np.random.default_rng(10_000 + seed).standard_normal(scores[REPLAY].shape)
    secs["random"] = 0.0
    with torch.no_grad():
        info["test_acc_queried"] = float((model(xq).argmax(1) == yq).double().mean())
        info["test_acc_all"] = float((model(x_all_test).argmax(1) == y_all_test).double().mean())
        info["train_loss"] = float(fc.per_sample_losses(model, x, y).mean())
    shutil.rmtree(ckpt, ignore_errors=True)
    return scores, secs, info, model


def lds(scores: np.ndarray, removed: np.ndarray, actual: np.ndarray) -> float:
    """Mean over test points of Spearman(predicted, actual) over subsets; predicted = Σ_{i∈R} c[z, i]."""
    pred = removed.astype(np.float64) @ scores.T  # (M, n_test)
    return float(np.nanmean(fc.spearman_rows(pred, actual)))


def frac_label(f: float) -> str:
    return f"{100 * f:g}%"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: seed 0, 20 subsets, 10 test points, 1 epoch")
    ap.add_argument("--models", nargs="+", default=["MLP", "SmallCNN"], choices=["MLP", "SmallCNN", "SmoothCNN"],
                    help="SmoothCNN: SmallCNN with GELU and average pooling (a diagnostic)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (--quick: 0)")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.05, 0.10, 0.50])
    ap.add_argument("--removal", nargs="+", default=["zero", "drop"], choices=["zero", "drop"])
    ap.add_argument("--subsets", type=int, default=None, help="removal sets per fraction and seed (default 100)")
    ap.add_argument("--n-test", type=int, default=None, help="test points (default 50)")
    ap.add_argument("--epochs", type=int, default=None, help="default 4 (--quick 1)")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--hessian-models", nargs="*", default=["MLP"],
                    help="models for which the clipped exact Hessian is formed besides the GGN")
    ap.add_argument("--chunk", type=int, default=100, help="retrains per vmapped training run")
    ap.add_argument("--no-ceiling", action="store_true", help="skip the second retrain of 'drop' subsets")
    ap.add_argument("--down-weight", type=float, default=1.0,
                    help="ε: 'zero' removal multiplies the removed samples' loss terms by 1 − ε (default 1: weight "
                         "zero); ε < 1 is a smaller step along the same direction, to tell a wrong derivative from "
                         "a training run that is not linear over a whole removal")
    ap.add_argument("--tag", default="", help="suffix of the JSON file name (for setting sweeps)")
    args = ap.parse_args(argv)
    q = args.quick
    fc.sizes(args, seeds=([0], [0, 1, 2]), subsets=(20, 100), n_test=(10, 50), epochs=(1, 4))
    torch.set_default_dtype(torch.float64)

    session = fc.FieldRun()
    cfg = argparse.Namespace(lr=args.lr, momentum=args.momentum, batch_size=args.batch_size, epochs=args.epochs,
                             data_seed=0)
    results = {}
    for name in args.models:
        x, y, xt, yt = fc.digits(name)
        xq, yq = xt[: args.n_test], yt[: args.n_test]
        N = len(y)
        per_seed = []
        for seed in args.seeds:
            tmp = fc.tmpdir(f"hydra_rlds_{name}_")
            try:
                cfg.data_seed = seed
                t0 = time.perf_counter()
                scores, secs, info, model = attributions(name, seed, x, y, xq, yq, cfg, args, tmp, xt, yt)
                t_attr = time.perf_counter() - t0
                trainer = BatchedSGD(name, seed, cfg)
                # the batched trainer with every weight one is the tracked run
                p1 = trainer.weighted(x, y, loader_order(N, cfg), torch.ones(1, N))
                info["batched_vs_tracked_max_abs"] = float(max(
                    (p1[k][0] - v.detach()).abs().max() for k, v in model.named_parameters()))
                base_loss = fc.per_sample_losses(model, xq, yq).numpy()
                cells = {}
                t0 = time.perf_counter()
                for f in args.fractions:
                    rng = np.random.default_rng([seed, int(round(f * 1e6))])
                    n_rm = int(round(f * N))
                    removed = np.zeros((args.subsets, N), dtype=bool)
                    for m in range(args.subsets):
                        removed[m, rng.choice(N, n_rm, replace=False)] = True
                    for how in args.removal:
                        actual = retrain(trainer, x, y, xq, yq, removed, how, cfg, seed, args.chunk,
                                         args.down_weight)
                        cell = {k: lds(sc, removed, actual) for k, sc in scores.items()}
                        pred = removed.astype(np.float64) @ scores[REPLAY].T
                        if how == "zero":
                            pred = args.down_weight * pred  # w_i = −ε: the first-order change is ε·Σ c
                        delta = actual - base_loss
                        cell["_mean |ΔL|"] = float(np.abs(delta).mean())
                        cell["_slope actual/replay"] = float(np.polyfit(pred.ravel(), delta.ravel(), 1)[0])
                        cell["_pearson actual/replay pooled"] = fc.pearson(pred.ravel(), delta.ravel())
                        if how == "zero":
                            k = min(5, args.subsets)
                            again = retrain(trainer, x, y, xq, yq, removed[:k], how, cfg, seed, args.chunk,
                                            args.down_weight)
                            cell["_repeat max |Δ|"] = float(np.abs(again - actual[:k]).max())
                            cell[CEILING] = 1.0 if cell["_repeat max |Δ|"] == 0.0 else float("nan")
                            cell[CEILING_NF] = cell[CEILING]
                        elif not args.no_ceiling:
                            actual2 = retrain(trainer, x, y, xq, yq, removed, how, cfg, seed + 1000, args.chunk)
                            per = fc.spearman_rows(actual2, actual)
                            cell[CEILING] = float(np.nanmean(per))
                            # two retrains share the signal and have independent noise: their correlation r is
                            # the signal's share of the variance; a predictor of the signal alone (the expected
                            # loss over batch orders) would correlate √r with one retrain
                            cell[CEILING_NF] = float(np.nanmean(np.sqrt(np.clip(per, 0, None))))
                        cells[f"{how} {frac_label(f)}"] = cell
                        print(f"[{name} seed {seed}] {how:4s} {frac_label(f):>4s}: "
                              + ", ".join(f"{k}: {v:.3f}" for k, v in cell.items()
                                          if k in (REPLAY, "HYDRA fast, full dim", "TracInCP (Captum)", CEILING)
                                          or k.startswith("_")), flush=True)
                t_retrain = time.perf_counter() - t0
                per_seed.append({"seed": seed, "lds": cells, "seconds": secs, "info": info,
                                 "attribution_s": t_attr, "retrain_s": t_retrain})
                print(f"[{name} seed {seed}] attributions {t_attr:.0f} s, retrains {t_retrain:.0f} s; info {info}",
                      flush=True)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        results[name] = per_seed

    tables = {}
    for name in args.models:
        cols = list(results[name][0]["lds"])
        methods = [k for k in results[name][0]["lds"][cols[0]]
                   if not k.startswith("_") and k not in (CEILING, CEILING_NF)]
        extra = ["_mean |ΔL|", "_slope actual/replay", "_pearson actual/replay pooled"]
        rows = []
        for meth in methods + [CEILING, CEILING_NF] + extra:
            row = {"method": meth.lstrip("_")}
            for c in cols:
                vals = [r["lds"][c].get(meth, np.nan) for r in results[name]]
                row[c] = "–" if all(np.isnan(v) for v in vals) else fc.pm(vals)
            rows.append(row)
        tables[name] = rows
        common.print_table(rows, title=f"{name}: LDS, {len(args.seeds)} seeds × {args.subsets} removal sets per "
                                       f"fraction, {args.n_test} test points, {args.epochs} epochs SGD(lr {args.lr}, "
                                       f"momentum {args.momentum}, batch {args.batch_size}), float64")
    print("zero: weight-zero removal in the same batch order; drop: a new DataLoader over the kept samples, same seed. "
          "LDS: mean over test points of the Spearman correlation over removal sets; ± = std over seeds. "
          "ceiling (zero): 1 when retraining is deterministic (verified); (drop): a second retrain, other batch order, "
          "as the prediction; noise-free: mean over test points of √max(r, 0), what a predictor of the expected "
          "loss over batch orders would reach. "
          "Last rows: replay-exact's prediction against the actual change, pooled over test points and sets.")
    session.finish("replay_lds", ("_quick" if q else "") + args.tag, vars(args), results=results, tables=tables)
    return 0


if __name__ == "__main__":
    sys.exit(main())
