"""Store write throughput and storage per sample, for a LeNet-sized CNN (store issue).

Three measurements, all on LeNet5 (61,706 parameters) and 28×28 digits (1,438 training samples,
batch 64, SGD lr 0.05 momentum 0.9, so 23 optimizer steps per epoch):

1. **Writer throughput.** A ``hydra_nb.store.StoreWriter`` is driven directly from this thread with
   synthetic per-sample rows (batches of 64 rows of the projected dimension, float32 or float16,
   random values, so nothing compresses — the log is stored uncompressed anyway), a real SGD trace
   row per step (``hydra_nb.optim.SGDRule().read_step`` on a LeNet5 + SGD that took one step) and a
   parameter checkpoint every 23 steps (one per "epoch"), as ``hydra_nb.track`` would. The rows
   come from a small pre-generated pool, so the producer costs next to nothing and the queue stays
   full: the time from the first ``put_step`` until ``close`` returns (queue drained, everything
   flushed, trimmed and committed) measures what the writer can sustain. Per-sample data is the
   gradient row plus its two int64 indices (sample, step), i.e. ``bytes_written`` without the
   checkpoints. Written into the page cache: ``os.sync()`` afterwards is timed separately (the
   "durable" rate includes it; it syncs the whole machine). Optionally again with a second thread
   training a plain LeNet5 meanwhile (the training thread busy: it competes for the 2 cores and
   the GIL), reporting how much each slowed the other.

2. **Production rate.** LeNet5 trained under ``hydra_nb.track`` (fast mode, ``checkpoint_every=
   "epoch"``) for a few epochs: per-sample bytes handed to the writer per second of the tracked
   training loop, the largest writer backlog seen by an ``on_step`` callback (the queue holds 32
   items; a full queue blocks training = the writer is the bottleneck), and how long ``close``
   waited for the writer at exit. Ratio = writer throughput (1) / production rate, same dimension
   and dtype: must be ≫ 1.

3. **Storage per sample per epoch.** The same runs, at projection_dim = 256, 1024, 4096 and
   None (full dimension), store_dtype float32 and float16: the store's size on disk, split into the
   per-sample log (log/grad, log/sample, log/step) and the rest (checkpoints: one parameter vector
   per epoch plus the initial one; trace: one row per step; projection hashes; metadata), divided
   by N × epochs. Compared with the original HYDRA code, which keeps two full-parameter float32
   vectors per tracked sample (h and its momentum twin v): 2 × 61,706 × 4 = 493,648 bytes per
   sample whatever the number of epochs. hydra_nb instead keeps a per-step log of projected
   gradients from which the hypergradient at *any* checkpoint (and so whole trajectories) is
   computed at query time; it grows linearly with epochs, so the table gives the number of epochs
   after which the log exceeds HYDRA's fixed footprint, per k.

    python benchmarks/store_write.py            # full: >= 512 MB per writer run, 4 tracked epochs
    python benchmarks/store_write.py --quick    # smoke run (< 60 s)

MB = 10^6 bytes throughout. Output: markdown tables and ``benchmarks/out/store_write[_quick].json``.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import hydra_nb  # noqa: E402
from hydra_nb.examples import LeNet5, count_parameters, load_digits  # noqa: E402
from hydra_nb.optim import SGDRule  # noqa: E402
from hydra_nb.params import ParamLayout  # noqa: E402
from hydra_nb.projection import Projector  # noqa: E402
from hydra_nb.store import StoreWriter, new_run_meta  # noqa: E402

MB = 1e6
INDEX_BYTES = 16  # log/sample and log/step: one int64 each per row
DTYPES = {"float32": (np.float32, torch.float32), "float16": (np.float16, torch.float16)}
K_LABEL = lambda k: "full" if k is None else str(k)  # noqa: E731
LOG_PARTS = ("log/grad", "log/sample", "log/step")
FIXED_PARTS = ("checkpoints", "trace", "projection")


def parse_k(s: str):
    return None if s.lower() in ("full", "none") else int(s)


def make_sgd(model, args):
    return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)


def run_epoch(model, opt, loader) -> int:
    steps = 0
    for xb, yb in loader:
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        steps += 1
    return steps


def store_breakdown(store: Path) -> dict:
    """Bytes on disk of each part of a store, and the total."""
    out = {p: common.dir_size(store / p) for p in LOG_PARTS + FIXED_PARTS}
    out["total"] = common.dir_size(store)
    out["metadata"] = out["total"] - sum(out[p] for p in LOG_PARTS + FIXED_PARTS)  # zarr.json files, lock
    out["log"] = sum(out[p] for p in LOG_PARTS)
    return out


def timed_sync() -> float:
    t = time.perf_counter()
    os.sync()
    return time.perf_counter() - t


def make_writer(*args) -> StoreWriter:
    """A new StoreWriter (``StoreWriter.create`` where the store takes a writer lock, else the constructor)."""
    create = getattr(StoreWriter, "create", None)
    return create(*args) if create is not None else StoreWriter(*args)


def wait_seconds(writer):
    """Seconds the producer waited on a full queue, where the writer counts them (else None)."""
    v = getattr(writer, "wait_seconds", None)
    return None if v is None else float(v)


# -- a training thread competing with the writer -------------------------------------------------
class BusyTrainer(threading.Thread):
    """Plain (untracked) LeNet5 training in a loop until stopped; counts optimizer steps."""

    def __init__(self, x, y, args):
        super().__init__(name="busy-trainer", daemon=True)
        common.seed_everything(args.seed + 1)
        self.model = LeNet5()
        self.opt = make_sgd(self.model, args)
        self.x, self.y, self.batch = x, y, args.batch_size
        self.stop_event = threading.Event()
        self.steps = 0
        self._lock = threading.Lock()

    def run(self):
        n = len(self.y)
        i = 0
        while not self.stop_event.is_set():
            idx = torch.arange(i, i + self.batch) % n
            self.opt.zero_grad()
            F.cross_entropy(self.model(self.x[idx]), self.y[idx]).backward()
            self.opt.step()
            i += self.batch
            with self._lock:
                self.steps += 1

    def count(self) -> int:
        with self._lock:
            return self.steps

    def rate_over(self, seconds: float) -> float:
        s0, t0 = self.count(), time.perf_counter()
        time.sleep(seconds)
        return (self.count() - s0) / (time.perf_counter() - t0)


# -- 1. writer throughput ------------------------------------------------------------------------
def writer_throughput(k, dtype_name: str, args, data, tmp: Path, busy: bool) -> dict:
    np_dtype, torch_dtype = DTYPES[dtype_name]
    x_tr, y_tr = data
    n_train = len(y_tr)
    common.seed_everything(args.seed)
    model = LeNet5()
    opt = make_sgd(model, args)
    # one real step, so that the trace rows are those of a running SGD (active, momentum buffers exist)
    opt.zero_grad()
    F.cross_entropy(model(x_tr[: args.batch_size]), y_tr[: args.batch_size]).backward()
    opt.step()
    layout, params = ParamLayout.from_model(model, opt)
    projector = Projector.plan(layout, k, seed=0)
    dim = projector.dim
    row_bytes = dim * np.dtype(np_dtype).itemsize + INDEX_BYTES
    step_bytes = args.batch_size * row_bytes
    steps_per_epoch = math.ceil(n_train / args.batch_size)
    n_steps = max(math.ceil(args.writer_mb * MB / step_bytes), 8)
    pool_n = int(max(2, min(16, (64 * MB) // (args.batch_size * dim * np.dtype(np_dtype).itemsize))))
    gen = torch.Generator().manual_seed(args.seed)
    pool = [torch.randn(args.batch_size, dim, generator=gen).to(torch_dtype) for _ in range(pool_n)]
    perm = torch.randperm(n_train, generator=gen)
    sample_pool = [perm[(torch.arange(args.batch_size) + j * args.batch_size) % n_train]
                   for j in range(steps_per_epoch)]
    flat_params = layout.flatten([p.detach() for p in params])
    config = {"projection_dim": k, "seed": 0, "checkpoint_every": "epoch", "store_dtype": dtype_name,
              "loss_fn": "cross_entropy", "custom_loss": False, "batch_size": args.batch_size,
              "torch_version": torch.__version__, "device": "cpu"}
    meta = new_run_meta("fast", n_train, layout, projector.to_json(), config, [])
    store = tmp / f"writer_{K_LABEL(k)}_{dtype_name}{'_busy' if busy else ''}.zarr"
    shutil.rmtree(store, ignore_errors=True)

    trainer = None
    if busy:
        trainer = BusyTrainer(x_tr, y_tr, args)
        trainer.start()
        time.sleep(0.5)  # warm-up
        trainer_alone = trainer.rate_over(args.busy_baseline_s)
    timed_sync()  # start from a clean page cache (earlier runs' write-back would interfere)

    t_setup = time.perf_counter()
    writer = make_writer(store, meta, layout, projector.arrays(), dim, np_dtype, np.dtype(np.float32), 0, None)
    setup_s = time.perf_counter() - t_setup
    queue_size = getattr(writer._queue, "maxsize", None)
    busy_s0 = trainer.count() if trainer else 0
    put_s, max_backlog, full_hits = 0.0, 0, 0
    load = common.LoadMeter()
    t0 = time.perf_counter()
    writer.put_checkpoint(0, flat_params, None, None)
    for step in range(n_steps):
        trace_row = SGDRule().read_step(opt, params, layout)
        p0 = time.perf_counter()
        writer.put_step(trace_row, sample_pool[step % steps_per_epoch], pool[step % pool_n])
        put_s += time.perf_counter() - p0
        b = writer.backlog
        max_backlog = max(max_backlog, b)
        full_hits += queue_size is not None and b >= queue_size
        if (step + 1) % steps_per_epoch == 0:
            writer.put_checkpoint(step + 1, flat_params, None, None)
    t_put = time.perf_counter()
    writer.close("complete")
    t_close = time.perf_counter()
    busy_steps = (trainer.count() - busy_s0) if trainer else 0
    if trainer:
        trainer.stop_event.set()
        trainer.join()
    m = load.read()
    sync_s = timed_sync()
    if writer.error is not None:
        raise RuntimeError(f"store writer failed: {writer.error!r}")
    rows = n_steps * args.batch_size
    per_sample_bytes = rows * row_bytes
    elapsed = t_close - t0
    disk = common.dir_size(store)
    shutil.rmtree(store, ignore_errors=True)
    n_ckpt = 1 + n_steps // steps_per_epoch
    res = {
        "k": k, "dim": dim, "dtype": dtype_name, "busy": busy, "steps": n_steps, "rows": rows,
        "checkpoints": n_ckpt, "row_bytes": row_bytes, "per_sample_bytes": per_sample_bytes,
        "writer_bytes_written": writer.bytes_written, "setup_s": setup_s, "elapsed_s": elapsed,
        "producer_put_s": put_s, "producer_wait_s": wait_seconds(writer), "producer_s": t_put - t0, "close_s": t_close - t_put, "sync_s": sync_s,
        "mb_per_s": per_sample_bytes / MB / elapsed,
        "durable_mb_per_s": per_sample_bytes / MB / (elapsed + sync_s),
        "rows_per_s": rows / elapsed, "steps_per_s": n_steps / elapsed, "max_backlog": max_backlog, "queue_size": queue_size,
        "queue_full_share": full_hits / n_steps, "disk_bytes": disk,
        "foreign_cpu_share": m["foreign_cpu_share"], "own_cpu_s": m["own_cpu_s"],
    }
    if trainer:
        res["trainer_steps_per_s_alone"] = trainer_alone
        res["trainer_steps_per_s_with_writer"] = busy_steps / elapsed
    print(f"  writer k={K_LABEL(k)} ({dim}) {dtype_name}{' +training thread' if busy else ''}: "
          f"{per_sample_bytes / MB:.0f} MB in {elapsed:.2f} s = {res['mb_per_s']:.0f} MB/s "
          f"(+sync {sync_s:.2f} s: {res['durable_mb_per_s']:.0f} MB/s), max backlog {max_backlog}/{queue_size}"
          + (f", trainer {trainer_alone:.0f} -> {res['trainer_steps_per_s_with_writer']:.0f} steps/s"
             if trainer else ""), flush=True)
    return res


# -- 2 & 3. tracked training: production rate and storage ----------------------------------------
def tracked_run(k, dtype_name: str, args, data, tmp: Path) -> dict:
    x_tr, y_tr = data
    n_train = len(y_tr)
    common.seed_everything(args.seed)
    model = LeNet5()
    opt = make_sgd(model, args)
    loader = DataLoader(TensorDataset(x_tr, y_tr), batch_size=args.batch_size, shuffle=True,
                        generator=common.generator(args.seed))
    store = tmp / f"run_{K_LABEL(k)}_{dtype_name}.zarr"
    backlogs = []

    def on_step(tr):
        backlogs.append(tr.writer.backlog)

    timed_sync()
    t0 = time.perf_counter()
    tracker = hydra_nb.track(model, loader, store=str(store), optimizer=opt, mode="fast", projection_dim=k,
                             store_dtype=dtype_name, overwrite=True, seed=0, on_step=on_step)
    load = common.LoadMeter()
    epoch_s, epoch_rows, epoch_foreign = [], [], []
    with tracker:
        t1 = time.perf_counter()
        steps = 0
        for _ in range(args.epochs):
            r0, meter, e0 = tracker.stats["rows"], common.LoadMeter(), time.perf_counter()
            steps += run_epoch(model, opt, loader)
            epoch_s.append(time.perf_counter() - e0)
            epoch_rows.append(tracker.stats["rows"] - r0)
            epoch_foreign.append(meter.read()["foreign_cpu_share"])
        t2 = time.perf_counter()
    t3 = time.perf_counter()
    m = load.read()
    if tracker.failure is not None:
        raise RuntimeError(f"tracking failed: {tracker.failure!r}")
    stats = dict(tracker.stats)
    dim = tracker.log_projector.dim
    queue_size = getattr(tracker.writer._queue, "maxsize", None)
    row_bytes = dim * np.dtype(DTYPES[dtype_name][0]).itemsize + INDEX_BYTES
    per_sample_bytes = stats["rows"] * row_bytes
    loop_s = t2 - t1
    parts = store_breakdown(store)
    shutil.rmtree(store, ignore_errors=True)
    NE = n_train * args.epochs
    itemsize = np.dtype(DTYPES[dtype_name][0]).itemsize
    grad_data = stats["rows"] * dim * itemsize  # log/grad without the padding of its last (edge) chunk
    index_disk = parts["log/sample"] + parts["log/step"]
    ckpt_each = parts["checkpoints"] / (args.epochs + 1)  # the initial one and one per epoch
    steps_per_epoch = steps / args.epochs
    g_log = (grad_data + index_disk) / NE  # growth of the log per sample per epoch
    g_other = (ckpt_each + parts["trace"] / steps * steps_per_epoch) / n_train  # checkpoint + trace, per sample
    fixed = parts["total"] / n_train - (g_log + g_other) * args.epochs  # per sample, independent of epochs
    res = {
        "k": k, "dim": dim, "dtype": dtype_name, "epochs": args.epochs, "n_train": n_train, "steps": steps,
        "rows": stats["rows"], "row_bytes": row_bytes, "per_sample_bytes": per_sample_bytes,
        "bytes_written": stats["bytes_written"], "enter_s": t1 - t0, "loop_s": loop_s, "exit_s": t3 - t2,
        "steps_per_s": steps / loop_s,
        "production_mb_per_s": per_sample_bytes / MB / loop_s,
        "epoch_s": epoch_s, "epoch_foreign_cpu_share": epoch_foreign,
        "epoch_production_mb_per_s": [n * row_bytes / MB / t for n, t in zip(epoch_rows, epoch_s)],
        "peak_production_mb_per_s": max(n * row_bytes / MB / t for n, t in zip(epoch_rows, epoch_s)),
        "peak_steps_per_s": max(math.ceil(n_train / args.batch_size) / t for t in epoch_s),
        "bytes_written_mb_per_s": stats["bytes_written"] / MB / loop_s,
        "max_backlog": max(backlogs, default=0), "mean_backlog": float(np.mean(backlogs)) if backlogs else 0.0,
        "queue_size": queue_size, "queue_full_steps": sum(queue_size is not None and b >= queue_size for b in backlogs),
        "writer_wait_s": wait_seconds(tracker.writer),
        "tracking_seconds": stats["tracking_seconds"], "foreign_cpu_share": m["foreign_cpu_share"],
        "disk": parts,
        "log_b_per_sample_epoch": parts["log"] / NE,
        "theory_b_per_sample_epoch": row_bytes,
        "non_log_b_per_sample_epoch": (parts["total"] - parts["log"]) / NE,
        "total_b_per_sample_epoch": parts["total"] / NE,
        "checkpoint_bytes_each": ckpt_each,
        "log_grad_padding_bytes": parts["log/grad"] - grad_data, "index_bytes_per_row": index_disk / stats["rows"],
        "growth_log_b_per_sample_epoch": g_log, "growth_other_b_per_sample_epoch": g_other,
        "fixed_b_per_sample": fixed,
        "trace_bytes_per_step": parts["trace"] / steps,
    }
    print(f"  tracked k={K_LABEL(k)} ({dim}) {dtype_name}: {steps} steps in {loop_s:.2f} s, "
          f"{res['production_mb_per_s']:.1f} MB/s produced (fastest epoch {res['peak_production_mb_per_s']:.1f}), max backlog {res['max_backlog']}/{queue_size}, "
          f"exit {res['exit_s']:.2f} s, store {parts['total'] / 2**20:.1f} MiB "
          f"(log {res['log_b_per_sample_epoch']:.0f} B/sample/epoch)", flush=True)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 24 MB per writer run, 1 tracked epoch")
    ap.add_argument("--ks", nargs="+", type=parse_k, default=None,
                    help="projection dims ('full' = None); default 256 1024 4096 full")
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--writer-mb", type=float, default=None, help="per-sample MB per writer run (default 512)")
    ap.add_argument("--busy-ks", nargs="*", type=parse_k, default=None,
                    help="dims of the extra writer runs with a training thread busy (default 1024 full; "
                         "--quick: 1024)")
    ap.add_argument("--busy-baseline-s", type=float, default=None, help="seconds to time the trainer alone")
    ap.add_argument("--epochs", type=int, default=None, help="tracked epochs (default 4; --quick 1)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tmp", default=None, help="folder for the stores (default: a new temporary folder)")
    args = ap.parse_args(argv)
    args.ks = args.ks if args.ks is not None else [256, 1024, 4096, None]
    args.writer_mb = args.writer_mb if args.writer_mb is not None else (24 if args.quick else 512)
    args.busy_ks = args.busy_ks if args.busy_ks is not None else ([1024] if args.quick else [1024, None])
    args.busy_baseline_s = args.busy_baseline_s if args.busy_baseline_s is not None else (0.5 if args.quick else 2.0)
    args.epochs = args.epochs if args.epochs is not None else (1 if args.quick else 4)

    start = time.perf_counter()
    machine = common.machine_info("cpu")
    print(f"machine: {machine['cpu_model']}, {machine['cpu_count']} cores, torch {machine['torch_version']}, "
          f"{machine['torch_threads']} threads")
    x_tr, y_tr, _, _ = load_digits(image_size=28)
    data = (x_tr, y_tr)
    n_params = count_parameters(LeNet5())
    hydra_b = 2 * n_params * 4
    tmp = Path(args.tmp) if args.tmp else Path(tempfile.mkdtemp(prefix="hydra_store_write_"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        print(f"\n== 1. writer throughput ({args.writer_mb:.0f} MB of per-sample data per run)", flush=True)
        writer_runs = [writer_throughput(k, dt, args, data, tmp, busy=False) for k in args.ks for dt in args.dtypes]
        writer_runs += [writer_throughput(k, "float32", args, data, tmp, busy=True) for k in args.busy_ks]
        print(f"\n== 2-3. tracked LeNet5 training, {args.epochs} epoch(s) per run", flush=True)
        tracked = [tracked_run(k, dt, args, data, tmp) for k in args.ks for dt in args.dtypes]
    finally:
        if not args.tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    wall = time.perf_counter() - start

    # -- tables --------------------------------------------------------------------------------
    rows = [{
        "k": K_LABEL(r["k"]), "dim": r["dim"], "dtype": r["dtype"],
        "training thread": "busy" if r["busy"] else "idle", "MB written": r["per_sample_bytes"] / MB,
        "steps/s": r["steps_per_s"], "rows/s": r["rows_per_s"], "MB/s": r["mb_per_s"], "close s": r["close_s"], "sync s": r["sync_s"],
        "MB/s incl. sync": r["durable_mb_per_s"], "max backlog": f"{r['max_backlog']}/{r['queue_size']}",
        "trainer steps/s alone → with writer": (f"{r['trainer_steps_per_s_alone']:.0f} → "
                                                f"{r['trainer_steps_per_s_with_writer']:.0f}"
                                                if r["busy"] else "–"),
        "other load %": None if r["foreign_cpu_share"] is None else round(100 * r["foreign_cpu_share"], 1),
    } for r in writer_runs]
    common.print_table(rows, digits=1, title="1. StoreWriter sustained throughput (synthetic 64-row batches, "
                                              "checkpoint every 23 steps; from first put until close returns)")
    print("MB = 10^6 bytes of per-sample data (gradient row + int64 sample and step). 'MB/s incl. sync' adds "
          "the os.sync() that follows (page cache to disk). The producer outruns the writer by design (a full "
          "queue, backlog = queue size, is expected here). 'other load %' = CPU share used by other processes.")

    idle = {(r["k"], r["dtype"]): r for r in writer_runs if not r["busy"]}
    busy = {(r["k"], r["dtype"]): r for r in writer_runs if r["busy"]}
    rows, bottleneck, thin = [], [], []
    for r in tracked:
        w = idle.get((r["k"], r["dtype"]))
        wb = busy.get((r["k"], r["dtype"]))
        # against the fastest (least disturbed) epoch: the highest rate tracking produced, the conservative ratio
        ratio = None if w is None else w["mb_per_s"] / r["peak_production_mb_per_s"]
        ratio_busy = None if wb is None else wb["mb_per_s"] / r["peak_production_mb_per_s"]
        r["writer_over_production"] = ratio
        r["writer_busy_over_production"] = ratio_busy
        full = r["queue_full_steps"] > 0 or (r["writer_wait_s"] or 0) > 0.01 * r["loop_s"]
        if full:
            bottleneck.append(f"k={K_LABEL(r['k'])} {r['dtype']}")
        elif min(x for x in (ratio, ratio_busy, math.inf) if x is not None) < 3:
            thin.append(f"k={K_LABEL(r['k'])} {r['dtype']}")
        rows.append({
            "k": K_LABEL(r["k"]), "dim": r["dim"], "dtype": r["dtype"], "steps/s": r["steps_per_s"],
            "fastest epoch steps/s": r["peak_steps_per_s"], "produced MB/s": r["production_mb_per_s"],
            "fastest epoch MB/s": r["peak_production_mb_per_s"], "writer MB/s": None if w is None else w["mb_per_s"],
            "writer / produced": ratio, "writer (busy) / produced": ratio_busy,
            "max backlog": f"{r['max_backlog']}/{r['queue_size']}", "mean backlog": r["mean_backlog"],
            "steps at full queue": r["queue_full_steps"],
            "training waited on writer s": r["writer_wait_s"], "exit (drain) s": r["exit_s"],
            "other load %": None if r["foreign_cpu_share"] is None else round(100 * r["foreign_cpu_share"], 1),
        })
    common.print_table(rows, digits=2, title=f"2. Production rate: LeNet5 under hydra_nb.track, {args.epochs} "
                                              f"epoch(s), batch {args.batch_size}, SGD lr {args.lr} momentum "
                                              f"{args.momentum}")
    print("produced MB/s = rows × (dim × itemsize + 16) / seconds of the tracked training loop (all epochs; and "
          "its fastest epoch, the least disturbed by other processes); writer / produced uses the fastest epoch; "
          "max backlog polled in on_step (queue size after the slash); writer MB/s from table 1 (same dim and "
          "dtype; 'busy' = with a plain LeNet5 training thread competing).")

    rows = []
    for r in tracked:
        d = r["disk"]
        log_pse = r["log_b_per_sample_epoch"]
        tot_pse = r["total_b_per_sample_epoch"]
        g_log, g_all, c = (r["growth_log_b_per_sample_epoch"],
                           r["growth_log_b_per_sample_epoch"] + r["growth_other_b_per_sample_epoch"],
                           r["fixed_b_per_sample"])
        # first whole number of epochs E at which ours is larger than HYDRA's fixed per-sample footprint
        r["epochs_log_exceeds_hydra"] = math.floor(hydra_b / g_log) + 1
        r["epochs_store_exceeds_hydra"] = max(1, math.floor((hydra_b - c) / g_all) + 1)
        r["hydra_over_log_per_epoch"] = hydra_b / g_log
        rows.append({
            "k": K_LABEL(r["k"]), "dim": r["dim"], "dtype": r["dtype"],
            "store MiB": d["total"] / 2**20, "log B/sample/ep (measured)": log_pse,
            "log growth B/sample/ep": g_log,
            "ckpt+trace B/sample/ep": r["growth_other_b_per_sample_epoch"],
            "fixed B/sample": c, "all-in B/sample/ep (measured)": tot_pse,
            "HYDRA B/sample": hydra_b, "HYDRA / log growth": hydra_b / g_log,
            "log > HYDRA from epoch": r["epochs_log_exceeds_hydra"],
            "whole store > HYDRA from epoch": r["epochs_store_exceeds_hydra"],
        })
    common.print_table(rows, digits=1, title=f"3. Storage per sample per epoch on disk (LeNet5, N = "
                                              f"{tracked[0]['n_train'] if tracked else '?'}, {args.epochs} epoch(s)) "
                                              "vs the original HYDRA")
    fixed = [{"k": K_LABEL(r["k"]), "dtype": r["dtype"], "checkpoints KiB": r["disk"]["checkpoints"] / 1024,
              "per checkpoint KiB": r["checkpoint_bytes_each"] / 1024, "trace KiB": r["disk"]["trace"] / 1024,
              "trace B/step": r["trace_bytes_per_step"], "projection KiB": r["disk"]["projection"] / 1024,
              "metadata KiB": r["disk"]["metadata"] / 1024,
              "log/sample+log/step KiB": (r["disk"]["log/sample"] + r["disk"]["log/step"]) / 1024,
              "index B/row": r["index_bytes_per_row"], "log/grad MiB": r["disk"]["log/grad"] / 2**20,
              "log/grad edge padding KiB": r["log_grad_padding_bytes"] / 1024} for r in tracked]
    common.print_table(fixed, digits=1, title="3b. The parts that do not scale with N (and the log's split)")
    print(f"HYDRA (original code): h and v, two float32 vectors of all {n_params:,} parameters per tracked sample "
          f"= {hydra_b:,} B, fixed (it keeps only the current h, v: no trajectory, no other checkpoint). hydra_nb: "
          "a per-step log of projected per-sample gradients (one row per sample per step it was in) plus "
          "the SGD trace and one parameter checkpoint per epoch; hypergradients at any checkpoint (and "
          "trajectories) are computed from it at query time, so it grows linearly with epochs. "
          "'log B/sample/ep (measured)' = log/ on disk / (N × epochs), including the padding of the last "
          "(uncompressed, full-size) log/grad chunk; 'log growth' = what each further epoch adds per sample "
          "(dim × itemsize + the compressed int64 sample/step indices); 'ckpt+trace' = the parameter checkpoint "
          "and trace rows each epoch adds, per sample; 'fixed' = the rest per sample (initial checkpoint, "
          "projection hashes, metadata, chunk padding). 'log > HYDRA from epoch' = the first whole number of epochs "
          "at which the per-sample log alone is larger than HYDRA's per-sample footprint; 'whole store' = the "
          f"same for the whole store per sample at this N ({tracked[0]['n_train'] if tracked else '?'}; "
          "checkpoints weigh less per sample for larger N).")
    if bottleneck:
        print(f"\nWARNING: the writer was the bottleneck for: {', '.join(bottleneck)} (the queue was full at some "
              "step, or training waited on it for more than 1% of the loop).")
    else:
        print("\nThe writer was never the bottleneck: the queue was never full and training never waited on it.")
    if thin:
        print(f"Thin margin (writer MB/s < 3 × production MB/s, idle or busy) for: {', '.join(thin)}.")
    print(f"\nwall time {wall:.1f} s")
    common.write_json("store_write" + ("_quick" if args.quick else ""), {
        "benchmark": "store_write", "machine": machine, "config": {**vars(args), "ks": [K_LABEL(k) for k in args.ks],
                                                                      "busy_ks": [K_LABEL(k) for k in args.busy_ks]},
        "wall_seconds": wall, "lenet5_params": n_params, "hydra_bytes_per_sample": hydra_b,
        "writer": writer_runs, "tracked": tracked, "writer_bottleneck": bottleneck, "thin_margin": thin,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
