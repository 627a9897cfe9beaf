"""How faithful are projected fast-mode contributions to full-dimensional ones?

For SmallCNN (8×8 digits) and LeNet5 (28×28 digits) this trains the same run (same init, same
batch order) once with ``projection_dim=None`` (full parameter dimension) and once per
k in (256, 1024, 4096) and projection seed, then compares the contribution matrices
C[test, train] of ``n_test`` test points:

* Pearson / Spearman correlation over all (test, train) pairs,
* the mean over test points of the per-test-point Pearson / Spearman correlation,
* relative error ‖C_k − C_full‖ / ‖C_full‖ and the overlap of the top-10 most helpful
  training samples per test point,

plus store size on disk, tracking time and query time per run.

    python benchmarks/projection_fidelity.py            # full: 4 epochs, 32 test points, seeds 0 1 2
    python benchmarks/projection_fidelity.py --quick    # CI smoke run (~30 s)
    python benchmarks/projection_fidelity.py --seeds 0 1 2 3 4

A k at or above a model's parameter count is planned as the identity (no projection), so it
reproduces the full run exactly; the table marks such rows ``identity``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import hydra_nb  # noqa: E402
from hydra_nb.examples import MLP, LeNet5, SmallCNN, count_parameters, load_digits  # noqa: E402,F401

MODELS = {
    "SmallCNN": (SmallCNN, 8),
    "LeNet5": (LeNet5, 28),
}
KS = (256, 1024, 4096)
TOP = 10


def train_tracked(model_cls, data, store: Path, projection_dim, proj_seed: int, args) -> dict:
    """Train a fresh model (init seed ``args.train_seed``, batch order ``args.data_seed``) under track()."""
    x_tr, y_tr = data
    common.seed_everything(args.train_seed)
    model = model_cls()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    loader = DataLoader(TensorDataset(x_tr, y_tr), batch_size=args.batch_size, shuffle=True,
                        generator=common.generator(args.data_seed))
    start = time.perf_counter()
    with hydra_nb.track(model, loader, store=str(store), optimizer=opt, mode="fast", projection_dim=projection_dim,
                        checkpoint_every="epoch", overwrite=True, seed=proj_seed) as tracker:
        for _ in range(args.epochs):
            for xb, yb in loader:
                opt.zero_grad()
                F.cross_entropy(model(xb), yb).backward()
                opt.step()
    seconds = time.perf_counter() - start
    if tracker.failure is not None:
        raise RuntimeError(f"tracking failed: {tracker.failure!r}")
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return {"model": model, "train_seconds": seconds, "stats": dict(tracker.stats),
            "bytes_written": tracker.writer.bytes_written, "final_params": flat}


def query(model, store: Path, x_te, y_te) -> tuple[np.ndarray, float, int]:
    start = time.perf_counter()
    s = hydra_nb.open_store(str(store))
    C = s.contributions(model, x_te, y_te)
    return np.asarray(C, dtype=np.float64), time.perf_counter() - start, int(s.projector.dim)


def compare(C: np.ndarray, ref: np.ndarray) -> dict:
    a, b = C.ravel(), ref.ravel()
    per_p, per_s, overlap = [], [], []
    for j in range(ref.shape[0]):
        if np.std(C[j]) > 0 and np.std(ref[j]) > 0:
            per_p.append(stats.pearsonr(C[j], ref[j])[0])
            per_s.append(stats.spearmanr(C[j], ref[j])[0])
        top_c = set(np.argsort(-C[j])[:TOP])
        top_r = set(np.argsort(-ref[j])[:TOP])
        overlap.append(len(top_c & top_r) / TOP)
    return {
        "pearson_all": float(stats.pearsonr(a, b)[0]),
        "spearman_all": float(stats.spearmanr(a, b)[0]),
        "pearson_per_test_mean": float(np.mean(per_p)) if per_p else float("nan"),
        "spearman_per_test_mean": float(np.mean(per_s)) if per_s else float("nan"),
        "pearson_per_test_min": float(np.min(per_p)) if per_p else float("nan"),
        "rel_error": float(np.linalg.norm(C - ref) / (np.linalg.norm(ref) + 1e-300)),
        f"top{TOP}_overlap": float(np.mean(overlap)),
    }


def run_model(name: str, args, tmp: Path) -> tuple[list[dict], list[dict]]:
    model_cls, size = MODELS[name]
    x_tr, y_tr, x_te, y_te = load_digits(image_size=size)
    n_test = min(args.n_test, len(y_te))
    x_q, y_q = x_te[:n_test], y_te[:n_test]
    n_params = count_parameters(model_cls())
    print(f"\n== {name}: {n_params:,} parameters, {len(y_tr)} train samples, {args.epochs} epochs, "
          f"{n_test} test points", flush=True)

    runs = []
    full_store = tmp / f"{name}_full.zarr"
    full = train_tracked(model_cls, (x_tr, y_tr), full_store, None, 0, args)
    C_full, q_full, dim_full = query(full["model"], full_store, x_q, y_q)
    full_disk = common.dir_size(full_store)
    runs.append({"model": name, "k": "full", "seed": None, "dim": dim_full, "train_s": full["train_seconds"],
                 "tracking_s": full["stats"]["tracking_seconds"], "query_s": q_full, "store_bytes": full_disk,
                 "bytes_written": full["bytes_written"], "steps": full["stats"]["steps"],
                 "rows": full["stats"]["rows"]})
    print(f"  full: dim {dim_full:,}, store {common.fmt_bytes(full_disk)}, train {full['train_seconds']:.1f} s, "
          f"query {q_full:.2f} s", flush=True)
    shutil.rmtree(full_store, ignore_errors=True)

    for k in args.ks:
        for seed in args.seeds:
            store = tmp / f"{name}_k{k}_s{seed}.zarr"
            r = train_tracked(model_cls, (x_tr, y_tr), store, k, seed, args)
            param_diff = float((r["final_params"] - full["final_params"]).abs().max())
            C, q_s, dim = query(r["model"], store, x_q, y_q)
            disk = common.dir_size(store)
            shutil.rmtree(store, ignore_errors=True)
            row = {"model": name, "k": k, "seed": seed, "dim": dim, "identity": dim >= n_params,
                   "train_s": r["train_seconds"], "tracking_s": r["stats"]["tracking_seconds"], "query_s": q_s,
                   "store_bytes": disk, "bytes_written": r["bytes_written"], "steps": r["stats"]["steps"],
                   "rows": r["stats"]["rows"], "max_param_diff_vs_full": param_diff, **compare(C, C_full)}
            runs.append(row)
            print(f"  k={k} seed={seed}: dim {dim:,}, pearson {row['pearson_all']:.4f}, "
                  f"spearman {row['spearman_all']:.4f}, store {common.fmt_bytes(disk)}", flush=True)

    # aggregate over projection seeds
    summary = [{"model": name, "k": "full", "dim": dim_full, "n_params": n_params, "pearson_all": "1 (ref)",
                "spearman_all": "1 (ref)", "pearson_per_test": "1 (ref)", "spearman_per_test": "1 (ref)",
                "rel_error": "0 (ref)", f"top{TOP}_overlap": "1 (ref)", "store_MiB": full_disk / 2**20,
                "train_s": full["train_seconds"], "query_s": q_full}]
    metrics = [("pearson_all", "pearson_all"), ("spearman_all", "spearman_all"),
               ("pearson_per_test_mean", "pearson_per_test"), ("spearman_per_test_mean", "spearman_per_test"),
               ("rel_error", "rel_error"), (f"top{TOP}_overlap", f"top{TOP}_overlap")]
    for k in args.ks:
        rows = [r for r in runs if r["k"] == k]
        entry = {"model": name, "k": str(k) if not rows[0]["identity"] else f"{k} (identity)", "dim": rows[0]["dim"],
                 "n_params": n_params}
        for key, label in metrics:
            m, s = common.mean_std([r[key] for r in rows])
            entry[label] = f"{m:.4f} ± {s:.4f}" if len(rows) > 1 else f"{m:.4f}"
            entry[label + "_mean"], entry[label + "_std"] = m, s
        entry["store_MiB"] = common.mean_std([r["store_bytes"] for r in rows])[0] / 2**20
        entry["train_s"] = common.mean_std([r["train_s"] for r in rows])[0]
        entry["query_s"] = common.mean_std([r["query_s"] for r in rows])[0]
        summary.append(entry)
    return runs, summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI smoke run: 1 epoch, 8 test points, seed 0")
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="projection seeds to repeat over (default: 0 1 2; --quick: 0)")
    ap.add_argument("--epochs", type=int, default=None, help="training epochs (default 4; --quick 1)")
    ap.add_argument("--n-test", type=int, default=None, help="test points (default 32; --quick 8)")
    ap.add_argument("--ks", type=int, nargs="+", default=list(KS), help="projection dims (default 256 1024 4096)")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--train-seed", type=int, default=0, help="model init seed (the same for every run)")
    ap.add_argument("--data-seed", type=int, default=0, help="batch order seed (the same for every run)")
    ap.add_argument("--out", default=None,
                    help="JSON name under benchmarks/out/ (default projection_fidelity, or projection_fidelity_quick)")
    args = ap.parse_args(argv)
    args.seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    args.epochs = args.epochs if args.epochs is not None else (1 if args.quick else 4)
    args.n_test = args.n_test if args.n_test is not None else (8 if args.quick else 32)
    args.out = args.out or ("projection_fidelity_quick" if args.quick else "projection_fidelity")

    start = time.perf_counter()
    machine = common.machine_info("cpu")
    print(f"machine: {machine['cpu_model']}, {machine['cpu_count']} cores, torch {machine['torch_version']}, "
          f"{machine['torch_threads']} threads")
    all_runs, all_summary = [], []
    load = common.LoadMeter()
    tmp = Path(tempfile.mkdtemp(prefix="hydra_fidelity_"))
    try:
        for name in args.models:
            runs, summary = run_model(name, args, tmp)
            all_runs += runs
            all_summary += summary
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    wall = time.perf_counter() - start
    other = load.read()["foreign_cpu_share"]

    cols = ["model", "k", "dim", "pearson_all", "spearman_all", "pearson_per_test", "spearman_per_test",
            "rel_error", f"top{TOP}_overlap", "store_MiB", "train_s", "query_s"]
    seeds_note = f"mean ± std over projection seeds {args.seeds}" if len(args.seeds) > 1 else f"seed {args.seeds[0]}"
    common.print_table(all_summary, cols, digits=3,
                       title=f"Projected vs full-dimensional fast-mode contributions ({args.epochs} epochs, "
                             f"{args.n_test} test points, {seeds_note})")
    sanity = max((r.get("max_param_diff_vs_full", 0.0) for r in all_runs), default=0.0)
    print(f"\nmax |θ_k − θ_full| over runs (same training in every run): {sanity:.3g}")
    print(f"other processes used {100 * (other or 0):.0f}% of the machine during the run "
          "(train_s / query_s are wall times and are disturbed by it; the correlations are not)")
    print(f"wall time {wall:.1f} s")
    common.write_json(args.out, {
        "benchmark": "projection_fidelity", "machine": machine,
        "config": {k: v for k, v in vars(args).items()}, "wall_seconds": wall, "foreign_cpu_share": other,
        "summary": all_summary, "runs": all_runs,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
