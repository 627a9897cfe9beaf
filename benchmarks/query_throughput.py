"""Query throughput: ``Store.contributions`` over a ≥ 1 GB store vs reading the same bytes raw.

Builds a fast-mode store with ``hydra_nb.store.StoreWriter`` (the tracker's writer, same code
path and chunking as a tracked run) holding synthetic projected gradient rows: N samples ×
epochs rows of k float32 values (default N = 100,000, 3 epochs, k = 1024 → ~1.2 GB), a SGD
trace with momentum and a per-epoch checkpoint. The layout comes from a real MLP
(64 → 128 → 10, 9,610 parameters) so that ``contributions(model, ...)`` runs unchanged.

Then, in the same process and interleaved (raw, query n=16, query n=128, raw, ...), it times

* **raw**: reading all of ``log/grad``, ``log/sample`` and ``log/step`` with
  ``np.asarray(zarr_array[a:b])`` in the same blocks as the query uses — the floor of any query
  that has to look at every row;
* **query**: ``store.contributions(model, X, Y)`` for n test points (numpy engine, default memory
  budget; progress bar off), which also differentiates the test points and projects their
  gradients, computes the response coefficients and accumulates (n × N);
* optionally the dask engine (``--dask``, threaded scheduler).

and reports the median of ``--repeats`` runs and the ratio query / raw (target ≤ 1.3). The store
was just written, so both read from a warm page cache (the machine has far more RAM than the
store): this measures the query's own overhead over reading, not the disk.

    python benchmarks/query_throughput.py              # ≥ 1 GB store, 3 repeats
    python benchmarks/query_throughput.py --quick      # 10,000 samples (~120 MB), 2 repeats
    python benchmarks/query_throughput.py --dir /data  # where the temporary store goes (removed after)
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import hydra_nb  # noqa: E402
from hydra_nb.optim import rule_named  # noqa: E402
from hydra_nb.params import ParamLayout  # noqa: E402
from hydra_nb.projection import Projector  # noqa: E402
from hydra_nb.query import DEFAULT_MEMORY_BUDGET  # noqa: E402
from hydra_nb.store import StoreWriter, new_run_meta  # noqa: E402

TARGET_RATIO = 1.3


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def build_store(path: Path, model: nn.Module, N: int, epochs: int, batch: int, k: int, seed: int = 0) -> dict:
    """Write a fast-mode store of synthetic rows with the tracker's StoreWriter; returns build stats."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    layout, tensors = ParamLayout.from_model(model, opt)
    projector = Projector.plan(layout, k, seed=seed)
    config = {"projection_dim": k, "seed": seed, "checkpoint_every": "epoch", "store_dtype": "float32",
              "loss_fn": "cross_entropy", "custom_loss": False, "batch_size": batch}
    meta = new_run_meta("fast", N, layout, projector.to_json(), config, [])
    args = (meta, layout, projector.arrays(), projector.dim, np.dtype("float32"), np.dtype("float32"), 0, None)
    writer = StoreWriter.create(path, *args) if hasattr(StoreWriter, "create") else StoreWriter(path, *args)
    rng = np.random.default_rng(seed)
    # rows are drawn from a pool of random rows (their values do not matter for timing, their bytes do)
    pool = rng.standard_normal((8192, projector.dim), dtype=np.float32)
    P = len(layout.slots)
    flat = layout.flatten([t.detach() for t in tensors])
    start = time.perf_counter()
    writer.put_checkpoint(0, flat, None, None)
    step = 0
    for epoch in range(epochs):
        perm = rng.permutation(N)
        for b in range(0, N, batch):
            samples = perm[b:b + batch]
            row = {"lr": np.full(P, 0.05 * 0.999 ** step), "momentum": np.full(P, 0.9), "dampening": np.zeros(P),
                   "weight_decay": np.full(P, 5e-4), "nesterov": np.zeros(P, bool), "first": np.full(P, step == 0),
                   "active": np.ones(P, bool)}
            assert set(row) == set(rule_named("SGD").trace_fields)
            off = int(rng.integers(0, len(pool) - batch))
            rows = pool[off:off + len(samples)]
            writer.put_step(row, torch.from_numpy(samples.astype(np.int64)), torch.from_numpy(rows))
            step += 1
        flat = flat + 0.01 * torch.randn(flat.shape)
        writer.put_checkpoint(step, flat, None, None)
    writer.close("complete")
    if writer.error is not None:
        raise writer.error
    return {"build_s": time.perf_counter() - start, "steps": step, "dim": projector.dim}


def raw_read(store, block_rows: int) -> float:
    """Seconds to read log/grad, log/sample, log/step completely, block by block, with numpy."""
    g = store.group
    arrays = (g["log/sample"], g["log/step"], g["log/grad"])
    end = arrays[2].shape[0]
    start = time.perf_counter()
    total = 0.0
    for a in range(0, end, block_rows):
        for arr in arrays:
            x = np.asarray(arr[a:a + block_rows])
        total += float(x[0, 0])  # touch the data
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10,000 samples, 2 repeats")
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--tests", type=int, nargs="+", default=[16, 128])
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--dask", action="store_true", help="also time engine='dask' (threaded scheduler)")
    ap.add_argument("--dir", type=str, default=None, help="folder for the temporary store (default: system temp)")
    ap.add_argument("--device", default="cpu", help="where the model and the test points live (cpu or cuda): the "
                                                    "test gradients are computed there, the rows are read and "
                                                    "accumulated on the host")
    args = ap.parse_args()
    N = args.samples or (10_000 if args.quick else 100_000)
    repeats = args.repeats or (2 if args.quick else 3)
    common.seed_everything(0)
    expected = N * args.epochs * args.k * 4
    tmp = common.scratch_dir(args.dir, expected, "hydra_nb_query_")
    wall = time.perf_counter()
    try:
        model = make_model()
        path = tmp / "run.zarr"
        print(f"building a store of ~{common.fmt_bytes(expected)} in {path} ...", flush=True)
        build = build_store(path, model, N, args.epochs, args.batch, args.k)
        store = hydra_nb.open_store(str(path))
        grad = store.group["log/grad"]
        log_bytes = grad.nbytes + 16 * grad.shape[0]
        disk = common.dir_size(path)
        print(f"built in {build['build_s']:.1f} s: {grad.shape[0]:,} rows × {grad.shape[1]} float32, "
              f"{common.fmt_bytes(disk)} on disk, {build['steps']:,} steps, chunks of {grad.chunks[0]} rows", flush=True)
        block_rows = store.source("fast").block_rows(DEFAULT_MEMORY_BUDGET, 2 * max(args.tests) * 4 + 64)
        gen = torch.Generator().manual_seed(1)
        tests = {n: (torch.randn(n, 64, generator=gen), torch.randint(0, 10, (n,), generator=gen)) for n in args.tests}
        model = model.to(args.device)
        tests = {n: (xq.to(args.device), yq.to(args.device)) for n, (xq, yq) in tests.items()}
        engines = ["numpy"] + (["dask"] if args.dask else [])
        raw_read(store, block_rows)  # warm the page cache and zarr
        for n in args.tests:  # warm up torch (threads, vmap) and check the result once
            out = store.contributions(model, *tests[n], progress=False)
            assert out.shape == (n, N) and np.isfinite(out).all()
        times: dict[str, list[float]] = {"raw": []}
        for r in range(repeats):
            times["raw"].append(raw_read(store, block_rows))
            for engine in engines:
                for n in args.tests:
                    t0 = time.perf_counter()
                    if engine == "dask":
                        import dask

                        with dask.config.set(scheduler="threads"):
                            store.contributions(model, *tests[n], engine="dask", progress=False)
                    else:
                        store.contributions(model, *tests[n], progress=False)
                    times.setdefault(f"{engine}:{n}", []).append(time.perf_counter() - t0)
            print(f"repeat {r + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
        raw = statistics.median(times["raw"])
        rows = [{"what": "raw read (numpy, same blocks)", "n_test": None, "median_s": raw, "min_s": min(times["raw"]),
                 "GB/s": log_bytes / raw / 1e9, "ratio": 1.0, "target": None}]
        for key, vals in times.items():
            if key == "raw":
                continue
            engine, n = key.split(":")
            med = statistics.median(vals)
            rows.append({"what": f"contributions ({engine})", "n_test": int(n), "median_s": med, "min_s": min(vals),
                         "GB/s": log_bytes / med / 1e9, "ratio": med / raw,
                         "target": f"≤ {TARGET_RATIO}" if engine == "numpy" else None})
        common.print_table(rows, ["what", "n_test", "median_s", "min_s", "GB/s", "ratio", "target"], digits=3,
                           title=f"Query throughput: {common.fmt_bytes(disk)} store ({N:,} samples × {args.epochs} "
                                 f"epochs, k = {grad.shape[1]}), median of {repeats}")
        met = all(r["ratio"] <= TARGET_RATIO for r in rows if r["target"])
        print(f"\ntarget (numpy engine, ratio ≤ {TARGET_RATIO}): {'met' if met else 'MISSED'}")
        common.write_json("query_throughput" + ("" if args.device == "cpu" else f"_{args.device.split(':')[0]}"), {
            "config": {"samples": N, "epochs": args.epochs, "batch": args.batch, "k": args.k, "dim": grad.shape[1],
                       "tests": args.tests, "repeats": repeats, "block_rows": block_rows,
                       "memory_budget": DEFAULT_MEMORY_BUDGET, "page_cache": "warm (store just written)"},
            "store": {"rows": grad.shape[0], "log_bytes": log_bytes, "disk_bytes": disk, **build},
            "times_s": times, "rows": rows, "target_ratio": TARGET_RATIO, "target_met": met,
            "machine": common.machine_info(args.device), "wall_s": time.perf_counter() - wall,
        })
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"[query_throughput] wall time {time.perf_counter() - wall:.1f} s")


if __name__ == "__main__":
    main()
