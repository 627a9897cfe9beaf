"""Scaling study: a ≥ 10M-row store, built and queried through the real code path (scaling issue).

Backs the numbers of ``docs/scaling.md``. Four measurements, in one process:

1. **Build.** A fast-mode store of N samples × E epochs rows (default 2,000,000 × 5 = 10,000,000
   rows, k = 128 → projected dimension 124, float16) written through
   ``hydra_nb.store.StoreWriter.create`` (the tracker's writer: same chunking, batching and
   commits as a tracked run), with a real parameter layout (the MLP of
   ``benchmarks/query_throughput.py``), a SGD trace row per step and a checkpoint per epoch, the
   same approach as ``query_throughput.build_store`` but with a float16 log. Rows are synthetic
   (drawn from a random pool: their values do not matter for timing, their bytes do). Reported:
   writer MB/s (bytes handed to the writer: row + 16 bytes of int64 indices), rows/s, steps/s,
   bytes per row on disk.
2. **Query.** ``store.contributions(model, X, Y)`` for n_test in (1, 16, 64) with the numpy engine
   and with the dask engine (threaded scheduler), interleaved with a **raw read** of the same bytes
   (``log/grad``, ``log/sample``, ``log/step`` in the query's blocks, numpy, same run). Medians of
   ``--repeats``; rows/s, GB/s (decoded log bytes: rows × (dim × itemsize + 16)) and ns per row.
   Peak RSS growth during each query (``/proc/self/status`` VmHWM, reset through
   ``/proc/self/clear_refs`` before the query, minus VmRSS before it), next to the size of the
   result (n_test × N × 4 bytes, which the query must hold). Also one query at the first-epoch
   checkpoint (1/E of the rows, same N and result size): time ∝ rows, peak memory not.
3. **k sweep.** Smaller stores (default 500,000 rows each) at other widths and dtypes
   (k = 512 and 2048 float16, 1024 and 2048 float32), numpy engine only, n_test up to 256, to fit
   the per-row cost ``t_row ≈ α + β_dtype·dim + γ·dim·n_test`` over every numpy measurement
   (least squares; β is per stored value: read, decode, convert to float32).
4. **Test side.** ``store.test_gradients`` + ``projector.project_flat`` for a wider MLP
   (~12.6M parameters), n_test = 8 and 32: seconds per test point per parameter of the part of a
   query that does not read the log (one forward + backward per test point, then a projection).

Everything is written to a temporary folder (``--dir``) and removed at the end. The stores were
just written, so queries read from a warm page cache (the machine has more RAM than the store):
this measures compute and decoding, not the disk. Outside load is measured with
``common.LoadMeter`` for each phase.

    python benchmarks/scale_query.py            # full: 10M rows (~2.6 GB) + sweep, 3 repeats (~10 min)
    python benchmarks/scale_query.py --quick    # smoke run: 1M rows, no sweep, 1 repeat (< 60 s)

MB/GB = 10^6/10^9 bytes. Output: a table per phase and ``benchmarks/out/scale_query[_quick].json``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from query_throughput import make_model, raw_read  # noqa: E402  (same layout and raw-read floor)

import hydra_nb  # noqa: E402
from hydra_nb.params import ParamLayout  # noqa: E402
from hydra_nb.projection import Projector  # noqa: E402
from hydra_nb.query import DEFAULT_MEMORY_BUDGET  # noqa: E402
from hydra_nb.store import StoreWriter, new_run_meta  # noqa: E402

MB, GB = 1e6, 1e9


# -- memory ------------------------------------------------------------------------------------
def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakRSS:
    """Peak RSS growth over a block: VmHWM after a reset, and (fallback) VmRSS sampled every 5 ms."""

    def __enter__(self):
        self.base_kb = _status_kb("VmRSS") or 0
        self.reset = reset_peak()
        self._max = self.base_kb
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.005):
            self._max = max(self._max, _status_kb("VmRSS") or 0)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        hwm = _status_kb("VmHWM") if self.reset else None
        self.peak_kb = max(self._max, hwm or 0)
        self.growth_bytes = (self.peak_kb - self.base_kb) * 1024
        return False


# -- build -------------------------------------------------------------------------------------
def build_store(path: Path, model: nn.Module, N: int, epochs: int, batch: int, k: int, dtype: str,
                seed: int = 0) -> dict:
    """``query_throughput.build_store`` with a choice of row dtype: a fast-mode store written by the
    tracker's ``StoreWriter`` from synthetic rows, a real SGD trace and a checkpoint per epoch."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    layout, tensors = ParamLayout.from_model(model, opt)
    projector = Projector.plan(layout, k, seed=seed)
    config = {"projection_dim": k, "seed": seed, "checkpoint_every": "epoch", "store_dtype": dtype,
              "loss_fn": "cross_entropy", "custom_loss": False, "batch_size": batch}
    meta = new_run_meta("fast", N, layout, projector.to_json(), config, [])
    writer = StoreWriter.create(path, meta, layout, projector.arrays(), projector.dim, np.dtype(dtype),
                                np.dtype("float32"), 0, None)
    rng = np.random.default_rng(seed)
    pool = torch.from_numpy(rng.standard_normal((8192, projector.dim), dtype=np.float32).astype(dtype))
    P = len(layout.slots)
    fixed = {"momentum": np.full(P, 0.9), "dampening": np.zeros(P), "weight_decay": np.full(P, 5e-4),
             "nesterov": np.zeros(P, bool), "active": np.ones(P, bool)}
    flat = layout.flatten([t.detach() for t in tensors])
    load = common.LoadMeter()
    start = time.perf_counter()
    writer.put_checkpoint(0, flat, None, None)
    step = 0
    for _ in range(epochs):
        perm = torch.from_numpy(rng.permutation(N).astype(np.int64))
        for b in range(0, N, batch):
            samples = perm[b:b + batch]
            row = {"lr": np.full(P, 0.05 * 0.9999 ** step), "first": np.full(P, step == 0), **fixed}
            off = int(rng.integers(0, len(pool) - batch))
            writer.put_step(row, samples, pool[off:off + len(samples)])
            step += 1
        flat = flat + 0.01 * torch.randn(flat.shape)
        writer.put_checkpoint(step, flat, None, None)
    writer.close("complete")
    seconds = time.perf_counter() - start
    if writer.error is not None:
        raise writer.error
    rows = N * epochs
    log_bytes = rows * (projector.dim * np.dtype(dtype).itemsize + 16)
    return {"build_s": seconds, "steps": step, "rows": rows, "dim": projector.dim, "dtype": dtype,
            "bytes_written": writer.bytes_written, "log_bytes": log_bytes,
            "writer_MB/s": log_bytes / seconds / MB, "rows/s": rows / seconds, "steps/s": step / seconds,
            "producer_waited_s": writer.wait_seconds, "load": load.read()}


def disk_split(path: Path) -> dict:
    """Bytes on disk of log/grad, the log's indices (sample, step), and everything else."""
    grad = common.dir_size(path / "log" / "grad")
    idx = common.dir_size(path / "log" / "sample") + common.dir_size(path / "log" / "step")
    return {"grad": grad, "indices": idx, "other": common.dir_size(path) - grad - idx}


# -- queries -----------------------------------------------------------------------------------
def run_query(store, model, X, Y, engine: str, checkpoint: int = -1) -> tuple[float, PeakRSS]:
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        if engine == "dask":
            import dask

            with dask.config.set(scheduler="threads"):
                out = store.contributions(model, X, Y, engine="dask", progress=False, checkpoint=checkpoint)
        else:
            out = store.contributions(model, X, Y, progress=False, checkpoint=checkpoint)
        seconds = time.perf_counter() - t0
    assert out.shape == (len(X), store.n_train)
    del out
    return seconds, mem


def measure_store(store, model, tests: list[int], engines: list[str], repeats: int, rows: int,
                  row_bytes: int, label: str, epoch1: bool = False) -> list[dict]:
    """Interleaved raw reads and queries; one result row per (what, n_test), medians of ``repeats``."""
    N = store.n_train
    gen = torch.Generator().manual_seed(1)
    data = {n: (torch.randn(n, 64, generator=gen), torch.randint(0, 10, (n,), generator=gen)) for n in tests}
    block_rows = store.source("fast").block_rows(DEFAULT_MEMORY_BUDGET, 2 * max(tests) * 4 + 64)
    raw_read(store, block_rows)  # warm the page cache and zarr
    store.contributions(model, *data[tests[0]], progress=False)  # warm torch
    times: dict[tuple, list[float]] = {("raw", None): []}
    peaks: dict[tuple, list[int]] = {}
    load = common.LoadMeter()
    for r in range(repeats):
        times[("raw", None)].append(raw_read(store, block_rows))
        for engine in engines:
            for n in tests:
                s, mem = run_query(store, model, *data[n], engine)
                times.setdefault((engine, n), []).append(s)
                peaks.setdefault((engine, n), []).append(mem.growth_bytes)
        print(f"  [{label}] repeat {r + 1}/{repeats}: " + ", ".join(
            f"{e}{'' if n is None else f':{n}'} {v[-1]:.2f} s" for (e, n), v in times.items()), flush=True)
    if epoch1:  # the first-epoch checkpoint: 1/E of the rows, same N and result size
        ep_rows = int(store.array("trace/row_end")[int(store.checkpoint_steps[1]) - 1])
        n = 16 if 16 in tests else tests[0]
        for _ in range(repeats):
            s, mem = run_query(store, model, *data[n], "numpy", checkpoint=1)
            times.setdefault(("numpy@epoch1", n), []).append(s)
            peaks.setdefault(("numpy@epoch1", n), []).append(mem.growth_bytes)
    meter = load.read()
    out = []
    for (what, n), vals in times.items():
        med = statistics.median(vals)
        nrows = ep_rows if what == "numpy@epoch1" else rows
        out.append({"store": label, "what": what, "n_test": n, "rows": nrows, "median_s": med, "min_s": min(vals),
                    "Mrows/s": nrows / med / 1e6, "GB/s": nrows * row_bytes / med / GB, "ns/row": med / nrows * 1e9,
                    "ratio_to_raw": med / statistics.median(times[("raw", None)]) * (rows / nrows),
                    "peak_rss_growth_MB": None if what == "raw" else max(peaks[(what, n)]) / MB,
                    "result_MB": None if what == "raw" else n * N * 4 / MB,
                    "foreign_cpu_share": meter["foreign_cpu_share"], "times_s": vals})
    return out


# -- test side ---------------------------------------------------------------------------------
def measure_test_side(k: int, tests: list[int], repeats: int) -> list[dict]:
    """Per-test-point cost of differentiating and projecting at a checkpoint, for a ~12.6M-parameter MLP."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 2048), nn.ReLU(), nn.Linear(2048, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    layout, tensors = ParamLayout.from_model(model, opt)
    projector = Projector.plan(layout, k, seed=0)
    flat = layout.flatten([t.detach() for t in tensors]).numpy()
    from hydra_nb.data import default_loss
    from hydra_nb.sources import test_gradients

    out = []
    gen = torch.Generator().manual_seed(2)
    projector.project_flat(torch.zeros(1, layout.size))  # build the index maps once (a query does too)
    for n in tests:
        X, Y = torch.randn(n, 1024, generator=gen), torch.randint(0, 10, (n,), generator=gen)
        grad_s, proj_s, peaks = [], [], []
        load = common.LoadMeter()
        for _ in range(repeats):
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                G = test_gradients(model, layout, flat, None, [], X, Y, default_loss)
                t1 = time.perf_counter()
                projector.project_flat(G)
                t2 = time.perf_counter()
                del G
            grad_s.append(t1 - t0)
            proj_s.append(t2 - t1)
            peaks.append(mem.growth_bytes)
        g, p = statistics.median(grad_s), statistics.median(proj_s)
        out.append({"params": layout.size, "n_test": n, "grad_s": g, "project_s": p,
                    "ns/param/test (grad)": g / n / layout.size * 1e9,
                    "ns/param/test (project)": p / n / layout.size * 1e9,
                    "peak_rss_growth_MB": max(peaks) / MB, "full_grads_MB": n * layout.size * 4 / MB,
                    "foreign_cpu_share": load.read()["foreign_cpu_share"]})
    return out


def fit(points: list[dict]) -> dict:
    """Least squares over the numpy measurements: t_row[ns] = α + β_dtype·dim + γ·dim·n_test
    (β per stored value: read + decode + convert to float32; one β per row dtype), and per store
    t_row = a + b·dim·n_test."""
    dtypes = sorted({p["dtype"] for p in points})
    A = np.array([[1.0] + [p["dim"] * (p["dtype"] == d) for d in dtypes] + [p["dim"] * p["n_test"]] for p in points])
    y = np.array([p["ns/row"] for p in points])
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    pred = A @ coef
    per_store = {}
    for label in sorted({p["store"] for p in points}):
        pts = [p for p in points if p["store"] == label]
        if len(pts) >= 2:
            b, a = np.polyfit([p["dim"] * p["n_test"] for p in pts], [p["ns/row"] for p in pts], 1)
            per_store[label] = {"a_ns": a, "b_ns_per_mac": b}
    return {"alpha_ns": coef[0], "beta_ns_per_value": dict(zip(dtypes, coef[1:-1])), "gamma_ns_per_mac": coef[-1],
            "max_rel_error": float(np.max(np.abs(pred - y) / y)),
            "rel_errors": [{"store": p["store"], "n_test": p["n_test"], "measured_ns": p["ns/row"], "fit_ns": q}
                           for p, q in zip(points, pred)], "per_store": per_store}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 1M rows, no sweep, 1 repeat")
    ap.add_argument("--samples", type=int, default=None, help="N (default 2,000,000; quick 200,000)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--k", type=int, default=128)
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    ap.add_argument("--tests", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--repeats", type=int, default=None, help="default 3 (quick 1)")
    ap.add_argument("--no-dask", action="store_true")
    ap.add_argument("--sweep", nargs="*", default=None,
                    help="k:dtype stores for the fit (default 512:float16 2048:float16 1024:float32 2048:float32; "
                         "quick none)")
    ap.add_argument("--sweep-rows", type=int, default=500_000)
    ap.add_argument("--sweep-tests", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--dir", type=str, default=None, help="folder for the temporary stores (default: system temp)")
    args = ap.parse_args()
    N = args.samples or (200_000 if args.quick else 2_000_000)
    repeats = args.repeats or (1 if args.quick else 3)
    sweep = args.sweep if args.sweep is not None else ([] if args.quick else ["512:float16", "2048:float16",
                                                                             "1024:float32", "2048:float32"])
    engines = ["numpy"] + ([] if args.no_dask else ["dask"])
    common.seed_everything(0)
    rows = N * args.epochs
    expected = rows * (args.k * np.dtype(args.dtype).itemsize + 16)
    tmp = common.scratch_dir(args.dir, expected, "hydra_nb_scale_")
    wall = time.perf_counter()
    total_load = common.LoadMeter()
    builds, results, fit_points = [], [], []
    try:
        model = make_model()
        specs = [(f"main k={args.k} {args.dtype}", N, args.epochs, args.k, args.dtype, True)]
        for s in sweep:
            k, dt = s.split(":")
            specs.append((f"sweep k={k} {dt}", args.sweep_rows // args.epochs, args.epochs, int(k), dt, False))
        for label, n_s, ep, k, dt, main_store in specs:
            path = tmp / "run.zarr"
            print(f"building {label}: {n_s:,} samples × {ep} epochs = {n_s * ep:,} rows in {path} ...", flush=True)
            b = build_store(path, make_model(), n_s, ep, args.batch, k, dt)
            b.update({"store": label, "samples": n_s, "epochs": ep, "k": k, "disk": disk_split(path)})
            b["disk_bytes_per_row"] = {key: v / b["rows"] for key, v in b["disk"].items()}
            builds.append(b)
            print(f"  built in {b['build_s']:.1f} s: dim {b['dim']}, {b['writer_MB/s']:.0f} MB/s, "
                  f"{b['rows/s']:,.0f} rows/s, {b['steps/s']:,.0f} steps/s, on disk "
                  f"{common.fmt_bytes(sum(b['disk'].values()))} (other processes: "
                  f"{100 * (b['load']['foreign_cpu_share'] or 0):.0f}% of the machine)", flush=True)
            store = hydra_nb.open_store(str(path))
            row_bytes = b["dim"] * np.dtype(dt).itemsize + 16
            res = measure_store(store, model, args.tests if main_store else args.sweep_tests,
                                engines if main_store else ["numpy"],
                                repeats, b["rows"], row_bytes, label, epoch1=main_store and ep > 1)
            for r in res:
                r.update({"dim": b["dim"], "dtype": dt, "row_bytes": row_bytes})
                if r["what"] == "numpy":
                    fit_points.append(r)
            results += res
            del store
            shutil.rmtree(path)
        print("measuring the test side (~12.6M-parameter MLP) ...", flush=True)
        test_side = measure_test_side(1024, [8, 32], repeats)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    f = fit(fit_points)
    elapsed = time.perf_counter() - wall
    machine_load = total_load.read()

    common.print_table(
        [{"store": b["store"], "rows": b["rows"], "dim": b["dim"], "dtype": b["dtype"], "steps": b["steps"],
          "build s": b["build_s"], "writer MB/s": b["writer_MB/s"], "rows/s": b["rows/s"], "steps/s": b["steps/s"],
          "disk B/row (grad)": b["disk_bytes_per_row"]["grad"], "disk B/row (indices)": b["disk_bytes_per_row"]["indices"],
          "disk other MB": b["disk"]["other"] / MB, "foreign CPU": b["load"]["foreign_cpu_share"]} for b in builds],
        digits=2, title="Build: StoreWriter.create + put_step/put_checkpoint/close (synthetic rows, batch "
                        f"{args.batch}, a checkpoint per epoch)")
    common.print_table(
        [{k: r[k] for k in ("store", "what", "n_test", "rows", "median_s", "min_s", "Mrows/s", "GB/s", "ns/row",
                            "ratio_to_raw", "peak_rss_growth_MB", "result_MB", "foreign_cpu_share")} for r in results],
        digits=3, title=f"Query: contributions vs raw read of the same bytes, median of {repeats} (warm page cache)")
    common.print_table(test_side, digits=3, title="Test side: test_gradients + project_flat (k = 1024), median of "
                                                  f"{repeats}")
    betas = " + ".join(f"{v:.3f} ns × dim [{d}]" for d, v in f["beta_ns_per_value"].items())
    print(f"\nfit over the {len(fit_points)} numpy-engine points: t_row ≈ {f['alpha_ns']:.1f} ns + {betas} "
          f"+ {f['gamma_ns_per_mac']:.4f} ns × dim × n_test (max relative error {100 * f['max_rel_error']:.0f}%)")
    for label, v in f["per_store"].items():
        print(f"  {label}: t_row ≈ {v['a_ns']:.1f} ns + {v['b_ns_per_mac']:.4f} ns × dim × n_test")
    print(f"other processes used {100 * (machine_load['foreign_cpu_share'] or 0):.0f}% of the machine over the run")
    common.write_json("scale_query_quick" if args.quick else "scale_query", {
        "config": {"samples": N, "epochs": args.epochs, "batch": args.batch, "k": args.k, "dtype": args.dtype,
                   "tests": args.tests, "repeats": repeats, "engines": engines, "sweep": sweep,
                   "sweep_rows": args.sweep_rows, "memory_budget": DEFAULT_MEMORY_BUDGET,
                   "page_cache": "warm (store just written)"},
        "builds": builds, "queries": results, "test_side": test_side, "fit": f, "load": machine_load,
        "machine": common.machine_info(), "wall_s": elapsed,
    })
    print(f"[scale_query] wall time {elapsed:.1f} s")


if __name__ == "__main__":
    main()
