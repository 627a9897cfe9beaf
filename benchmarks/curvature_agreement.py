"""Curvature-aware estimates (hydra_nb.curvature) against the exact derivative, next to fast mode.

For each setting, one training run is tracked three times from the same initial weights and batch order:
in ``mode="fast"`` with ``projection_dim=1024`` (the log a user has), in ``mode="fast"`` with
``projection_dim=None`` (the full-dimensional log) and in ``mode="exact"`` with ``--n-exact`` random
training samples tracked (default all N; the truth: their exact h). The runs must end at the same
parameters (checked). Every estimator reads the k = 1024 log; ``Spearman full dim`` repeats it on the
full-dimensional log (projection error removed). Agreement is over the exactly tracked samples.

Truth comes from one function, :func:`exact_truth`; when reverse-mode replay lands it becomes
``fast_store.contributions(model, x, y, mode="exact", train_data=(x_train, y_train))`` on the same store.

Per setting and estimator, over ``--n-test`` test points and all N training samples at the last
checkpoint (and at the first epoch's checkpoint): Spearman of the two rankings per test point (mean and
median), sign agreement (fraction of samples), median |estimate| / |exact|, and cost: the estimator's
walk for the same test points as a multiple of a fast query (``store.contributions(mode="fast")``),
measured side by side (alternating, best of ``--repeats``); ``embed ×`` is the one-off cost of the
embeddings of all samples (the cacheable form) in the same units.

Settings: the quickstart (SmallCNN on 8×8 digits, SGD lr 0.05, momentum 0.9, weight decay 1e-4,
batch 32, 8 epochs, float32; notebook 01 without a schedule, ``quickstart.py --script`` with cosine
annealing), and field_approx.py's (SmallCNN and the MLP, batch 64, 4 epochs, float64, lr 0.01/0.05/0.1,
momentum 0/0.9).

    python benchmarks/curvature_agreement.py                 # all settings (~40 min on one core)
    python benchmarks/curvature_agreement.py --quick         # quickstart, 2 epochs, 10 test points
    python benchmarks/curvature_agreement.py --settings quickstart --n-test 50
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import field_common as fc  # noqa: E402

import hydra_nb  # noqa: E402
from hydra_nb import curvature as cv  # noqa: E402


@dataclass
class Setting:
    model: str
    lr: float
    momentum: float
    weight_decay: float = 0.0
    batch_size: int = 64
    epochs: int = 4
    cosine: bool = False
    dtype: torch.dtype = torch.float64
    output_bias: str = "fc.bias"


QUICKSTART = dict(model="SmallCNN", lr=0.05, momentum=0.9, weight_decay=1e-4, batch_size=32, epochs=8,
                  dtype=torch.float32)
SETTINGS = {
    "quickstart": Setting(**QUICKSTART),
    "quickstart, cosine": Setting(**QUICKSTART, cosine=True),
}
for _model in ("SmallCNN", "MLP"):
    for _lr in (0.01, 0.05, 0.1):
        for _mom in (0.0, 0.9):
            SETTINGS[f"{_model} lr {_lr} mom {_mom}"] = Setting(_model, _lr, _mom,
                                                                output_bias="fc.bias" if _model == "SmallCNN" else "fc2.bias")

# name -> CurvatureSpec keyword arguments (logit_bias is filled per run)
ESTIMATORS = {
    "fast": dict(kind="none"),
    "fisher": dict(kind="fisher"),
    "fisher, clip 2": dict(kind="fisher", clip=2.0),
    "ggn": dict(kind="ggn"),
    "scalar": dict(kind="scalar"),
    "diagonal": dict(kind="diagonal"),
}


@dataclass
class Run:
    """One setting trained twice (fast k=1024 store, exact all-N full-dimensional store) and its data."""

    setting: Setting
    fast: object
    full: object
    exact: object
    model: torch.nn.Module
    data: tuple
    train_seconds: dict = field(default_factory=dict)


def _model(name: str, dtype, seed: int):
    return fc.make_model(name, seed, dtype=dtype)


def train_run(setting: Setting, seed: int, where: Path, epochs: int | None = None, n_exact: int | None = None) -> Run:
    """Train ``setting`` under fast (k = 1024), fast (full dimension) and exact trackers from one init."""
    epochs = epochs or setting.epochs
    x, y, xt, yt = fc.digits(setting.model, dtype=setting.dtype)
    init = _model(setting.model, setting.dtype, seed).state_dict()
    finals, seconds = {}, {}
    tracked = np.arange(len(y)) if n_exact is None or n_exact >= len(y) else \
        np.sort(np.random.default_rng(seed).choice(len(y), n_exact, replace=False))
    for name, mode in (("fast", "fast"), ("full", "fast"), ("exact", "exact")):
        model = _model(setting.model, setting.dtype, seed)
        model.load_state_dict(init)
        loader = DataLoader(TensorDataset(x, y), batch_size=setting.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(seed))
        opt = torch.optim.SGD(model.parameters(), lr=setting.lr, momentum=setting.momentum,
                              weight_decay=setting.weight_decay)
        sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(loader))
                 if setting.cosine else None)
        kw = {"fast": dict(projection_dim=1024), "full": dict(projection_dim=None),
              "exact": dict(projection_dim=None, exact_indices=tracked, hvp_batch=256)}[name]
        t0 = time.perf_counter()
        with hydra_nb.track(model, loader, store=str(where / f"{name}.zarr"), optimizer=opt, mode=mode,
                            checkpoint_every="epoch", overwrite=True, **kw) as tracker:
            for _ in range(epochs):
                model.train()
                for xb, yb in loader:
                    opt.zero_grad()
                    F.cross_entropy(model(xb), yb).backward()
                    opt.step()
                    if sched is not None:
                        sched.step()
        seconds[name] = time.perf_counter() - t0
        if tracker.failure is not None:
            raise RuntimeError(f"tracking failed: {tracker.failure!r}")
        finals[name] = fc.flat_params(model)
    drift = max(float((finals[n] - finals["exact"]).norm() / finals["exact"].norm()) for n in ("fast", "full"))
    if drift > 0:
        raise RuntimeError(f"the fast and exact runs ended at different parameters (rel. {drift:.1e}): "
                           "the comparison would not be of the same training run")
    model.eval()
    return Run(setting, *(hydra_nb.open_store(where / f"{n}.zarr") for n in ("fast", "full", "exact")),
               model, (x, y, xt, yt), seconds)


def exact_truth(run: Run, xq, yq, checkpoint: int) -> tuple[np.ndarray, np.ndarray]:
    """(samples, contributions[j, a] = −∂L(z_j; θ_S)/∂w_{samples[a]}): the truth every estimator is scored against.

    Today: forward exact mode with ``--n-exact`` samples tracked. With reverse-mode replay this becomes
    ``np.arange(N), run.fast.contributions(run.model, xq, yq, mode="exact", checkpoint=checkpoint,
    train_data=run.data[:2])``, all N samples.
    """
    out = run.exact.contributions(run.model, xq, yq, mode="exact", checkpoint=checkpoint, progress=False)
    order = np.argsort(run.exact.tracked_indices)
    return run.exact.tracked_indices[order], out[:, order]


def estimate(store, run: Run, name: str, xq, yq, checkpoint: int, block_rows: int = 8192):
    """(n, N) contributions of estimator ``name`` from ``store``'s log, and the seconds it took."""
    spec_kw = dict(ESTIMATORS[name])
    proj = store.meta["projection"]
    if spec_kw["kind"] == "ggn":
        spec_kw["logit_bias"] = cv.output_bias_span(proj, run.setting.output_bias)
    spec = cv.CurvatureSpec(**spec_kw)
    dtype = torch.float64 if run.setting.dtype == torch.float64 else torch.float32
    t0 = time.perf_counter()
    S = int(store.checkpoint_steps[checkpoint])
    G = store.test_gradients(run.model, xq, yq, checkpoint=checkpoint)
    pg = store.projector.to(dtype=dtype).project_flat(G.to(dtype))
    spans = [(b["offset"], b["offset"] + b["dim"]) for b in proj["blocks"]]
    N = store.n_train
    out = cv.walk(-pg[None], [S], cv.store_blocks(store, S, block_rows), store.trace(S), spans, spec,
                  np.arange(N), N)[0]
    return out.T.numpy().astype(np.float64), time.perf_counter() - t0


def fast_query(run: Run, xq, yq, checkpoint: int):
    t0 = time.perf_counter()
    out = run.fast.contributions(run.model, xq, yq, mode="fast", checkpoint=checkpoint, progress=False)
    return out.astype(np.float64), time.perf_counter() - t0


def embed_seconds(run: Run, name: str, checkpoint: int) -> float:
    """The one-off cost of every sample's embedding E_i (walk with the k basis vectors)."""
    spec_kw = dict(ESTIMATORS[name])
    proj = run.fast.meta["projection"]
    if spec_kw["kind"] == "ggn":
        spec_kw["logit_bias"] = cv.output_bias_span(proj, run.setting.output_bias)
    spec = cv.CurvatureSpec(**spec_kw)
    S = int(run.fast.checkpoint_steps[checkpoint])
    spans = [(b["offset"], b["offset"] + b["dim"]) for b in proj["blocks"]]
    N = run.fast.n_train
    t0 = time.perf_counter()
    cv.embeddings(S, cv.store_blocks(run.fast, S, 8192), run.fast.trace(S), spans, spec, np.arange(N), N)
    return time.perf_counter() - t0


def agreement(est: np.ndarray, exact: np.ndarray) -> dict:
    rho = fc.spearman_rows(est.T, exact.T)
    sign = (np.sign(est) == np.sign(exact)).mean(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.nanmedian(np.abs(est) / np.abs(exact))
    return {"spearman": rho, "spearman_mean": float(np.nanmean(rho)), "spearman_median": float(np.nanmedian(rho)),
            "sign_mean": float(sign.mean()), "scale_median": float(scale)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="quickstart only, 2 epochs, 10 test points")
    ap.add_argument("--settings", nargs="+", default=None, help=f"names among: {', '.join(SETTINGS)}")
    ap.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=list(ESTIMATORS))
    ap.add_argument("--n-test", type=int, default=None, help="test points (default 50, --quick 10)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2, help="timings: best of this many, alternating")
    ap.add_argument("--full", action="store_true", help="also run each estimator on the full-dimensional log")
    ap.add_argument("--n-exact", type=int, default=None, help="training samples tracked exactly (default: all N)")
    ap.add_argument("--tag", default="", help="suffix of the JSON file's name")
    ap.add_argument("--dir", default=None, help="scratch folder for the stores")
    args = ap.parse_args(argv)
    names = args.settings or (["quickstart"] if args.quick else list(SETTINGS))
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        ap.error(f"unknown settings {unknown}; choose from {list(SETTINGS)}")
    n_test = args.n_test or (10 if args.quick else 50)
    torch.set_num_threads(1)
    session = fc.FieldRun()
    results, rows = [], []
    for sname in names:
        setting = SETTINGS[sname]
        torch.set_default_dtype(setting.dtype)
        tmp = common.scratch_dir(args.dir, 400e6, "hydra_curv_")
        try:
            run = train_run(setting, args.seed, tmp, epochs=2 if args.quick else None, n_exact=args.n_exact)
            x, y, xt, yt = run.data
            xq, yq = xt[:n_test], yt[:n_test]
            model = run.model
            with torch.no_grad():
                wrong = torch.nonzero(model(xt).argmax(1) != yt).flatten().tolist()
            explained = wrong[0] if wrong else 0
            if explained >= n_test:  # the quickstart's explained digit, always among the test points
                xq, yq = torch.cat([xq, xt[explained:explained + 1]]), torch.cat([yq, yt[explained:explained + 1]])
                explained_row = n_test
            else:
                explained_row = explained
            checkpoints = {"epoch 1": 1, "last": len(run.fast.checkpoint_steps) - 1}
            entry = {"setting": sname, "config": vars(setting) | {"dtype": str(setting.dtype)},
                     "train_seconds": run.train_seconds, "explained_test_index": explained,
                     "n_exact": len(run.exact.tracked_indices), "checkpoints": {}}
            for label, c in checkpoints.items():
                cols, truth = exact_truth(run, xq, yq, c)
                fast_vals, _ = fast_query(run, xq, yq, c)
                per = {}
                for name in args.estimators:
                    vals, _ = estimate(run.fast, run, name, xq, yq, c)
                    if name == "fast":  # the walk without curvature is fast mode: the same numbers
                        err = np.abs(vals - fast_vals).max() / np.abs(fast_vals).max()
                        assert err < (1e-9 if setting.dtype == torch.float64 else 1e-3), err
                    vals = vals[:, cols]
                    a = agreement(vals, truth)
                    per[name] = a
                    a["explained_spearman"] = agreement(vals[explained_row:explained_row + 1],
                                                        truth[explained_row:explained_row + 1])["spearman_mean"]
                    if args.full:
                        fvals, _ = estimate(run.full, run, name, xq, yq, c)
                        per[name + " (full dim)"] = agreement(fvals[:, cols], truth)
                entry["checkpoints"][label] = {"step": int(run.fast.checkpoint_steps[c]), "estimators": per}
            # cost, at the last checkpoint: alternate fast query and each walk, best of --repeats
            c = checkpoints["last"]
            times = {name: [] for name in ["fast query"] + args.estimators}
            for _ in range(args.repeats):
                times["fast query"].append(fast_query(run, xq, yq, c)[1])
                for name in args.estimators:
                    times[name].append(estimate(run.fast, run, name, xq, yq, c)[1])
            best = {k: min(v) for k, v in times.items()}
            embed = {name: embed_seconds(run, name, c) for name in args.estimators if name != "fast"}
            entry["seconds"] = best
            entry["embed_seconds"] = embed
            results.append(entry)
            last, first = entry["checkpoints"]["last"], entry["checkpoints"]["epoch 1"]
            for name in args.estimators:
                e = last["estimators"][name]
                row = {"setting": sname, "estimator": name,
                       "Spearman mean": e["spearman_mean"], "median": e["spearman_median"],
                       "sign agr.": e["sign_mean"], "|est|/|exact|": e["scale_median"],
                       "explained digit": e["explained_spearman"],
                       "Spearman @ep1": first["estimators"][name]["spearman_mean"],
                       "cost × fast": best[name] / best["fast query"],
                       "embed × fast": embed[name] / best["fast query"] if name in embed else None}
                if args.full:
                    row["Spearman full dim"] = last["estimators"][name + " (full dim)"]["spearman_mean"]
                rows.append(row)
            print(f"[{sname}] done: train {run.train_seconds}, fast query {best['fast query']:.2f} s", flush=True)
            common.print_table([r for r in rows if r["setting"] == sname], digits=3)
            common.write_json("curvature_agreement_partial" + args.tag, {"config": vars(args), "runs": results,
                                                                         "table": rows})
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    exact_note = "all N" if args.n_exact is None else f"{args.n_exact} random"
    common.print_table(rows, digits=3, title=f"Curvature-aware estimates vs exact, {n_test} test points × {exact_note} "
                                             f"training samples, last checkpoint (seed {args.seed})")
    session.finish("curvature_agreement", ("_quick" if args.quick else "") + args.tag, vars(args), runs=results,
                   table=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
