"""Training-time overhead of ``hydra_nb.track(mode="fast", projection_dim=1024)`` (``--mode replay``: of the
replay-only recording, target ≤ 1.05×).

For ResNet8 (a ResNet-8-sized CNN without BatchNorm, 77,418 parameters, 32×32 digits), LeNet5 (28×28 digits) and SmallCNN and MLP (8×8 digits), batch 64, SGD (lr 0.05, momentum 0.9),
one process trains two copies of the same model (same init, same data, same batch order):
a plain one and one inside a single long-lived ``hydra_nb.track`` context. Plain and tracked epochs
are interleaved (ABBA order: P T, T P, P T, ...) after one untimed warm-up epoch of each, and

* a plain epoch is timed around the loop;
* a tracked epoch is timed around the loop *plus* the time the store writer thread needs afterwards
  to drain its queue (so background compression and disk writes are charged to tracking and do not
  steal CPU from the next plain epoch). The loop-only time is reported too.

Reported per model: median seconds per epoch (plain, tracked), the ratio tracked/plain (target for
LeNet5 on CPU: < 1.5×), ``tracker.stats['tracking_seconds']`` per epoch (time spent inside hydra_nb's
forward/backward hooks, the optimizer step hooks and checkpoints),
CPU seconds of the store-writer thread itself per epoch (Linux; zarr does its I/O on its own event-loop
thread, which this does not count: the drain time and the CPU-time ratio do), and bytes written per sample per epoch
(``tracker.writer.bytes_written``, before compression) and on disk. One-off costs (entering
and closing the context) are reported separately.

Shared machines are noisy: also reported are the ratio of the fastest epochs (min ratio), the ratio
of process CPU seconds per epoch (all threads: torch's, the writer's), and the share of the machine's
CPU that *other* processes used meanwhile (from /proc/stat), so that disturbed runs can be spotted.

    python benchmarks/overhead.py                 # 15 repeats
    python benchmarks/overhead.py --quick         # smoke run: 3 repeats
    python benchmarks/overhead.py --device cuda   # on a GPU machine (synchronizes before reading clocks)

torch's thread count is left at its default.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import hydra_nb  # noqa: E402
from hydra_nb.examples import MLP, LeNet5, SmallCNN, count_parameters, load_digits  # noqa: E402
from models import ResNet8  # noqa: E402

MODELS = {
    "ResNet8": (ResNet8, 32),
    "LeNet5": (LeNet5, 28),
    "SmallCNN": (SmallCNN, 8),
    "MLP": (MLP, 8),
}
TARGET_RATIO = {"LeNet5": 1.5}
REPLAY_TARGET = 1.05  # issue 17: a replay-only recording costs at most 5% of plain training


def run_epoch(model, opt, loader, device) -> int:
    steps = 0
    for xb, yb in loader:
        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        steps += 1
    return steps


def thread_cpu_seconds(thread: threading.Thread | None) -> float | None:
    """User+system CPU seconds of another thread of this process (Linux /proc), or None."""
    tid = getattr(thread, "native_id", None)
    if tid is None:
        return None
    try:
        with open(f"/proc/self/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def drain_writer(tracker, expected_checkpoints: int, timeout: float = 120.0) -> float:
    """Wait until the store writer has consumed its queue and written ``expected_checkpoints``.

    Uses the writer's public ``backlog`` plus its private checkpoint counter (benchmark-only:
    the writer has no public "idle" signal). Returns the seconds waited.
    """
    w = tracker.writer
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        done = getattr(w, "_checkpoints", expected_checkpoints) >= expected_checkpoints
        if done and w.backlog == 0:
            break
        if w.error is not None:
            raise RuntimeError(f"store writer failed: {w.error!r}")
        time.sleep(0.0005)
    return time.perf_counter() - start


def bench_model(name: str, args, device: torch.device, tmp: Path) -> dict:
    model_cls, size = MODELS[name]
    x_tr, y_tr, _, _ = load_digits(image_size=size)
    n_train = len(y_tr)
    common.seed_everything(args.seed)
    plain_model = model_cls().to(device)
    tracked_model = copy.deepcopy(plain_model)
    n_params = count_parameters(plain_model)
    plain_opt = torch.optim.SGD(plain_model.parameters(), lr=args.lr, momentum=args.momentum)
    tracked_opt = torch.optim.SGD(tracked_model.parameters(), lr=args.lr, momentum=args.momentum)
    dataset = TensorDataset(x_tr, y_tr)
    plain_loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, generator=common.generator(args.seed))
    tracked_loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                                generator=common.generator(args.seed))
    store = tmp / f"{name}.zarr"
    print(f"\n== {name}: {n_params:,} parameters, {n_train} samples, batch {args.batch_size}, "
          f"{len(plain_loader)} steps/epoch, {args.repeats} repeats, device {device}", flush=True)

    # warm-up (untimed): one plain epoch
    run_epoch(plain_model, plain_opt, plain_loader, device)

    plain, tracked, tracked_loop, drains, track_s, writer_cpu, bytes_ep, disk_ep = [], [], [], [], [], [], [], []
    plain_cpu, tracked_cpu, plain_foreign, tracked_foreign = [], [], [], []
    load = common.LoadMeter()
    t0 = time.perf_counter()
    tracker = hydra_nb.track(tracked_model, tracked_loader, store=str(store), optimizer=tracked_opt, mode=args.mode,
                             projection_dim=args.projection_dim, checkpoint_every="epoch", overwrite=True,
                             seed=0)
    with tracker:
        enter_s = time.perf_counter() - t0
        wthread = getattr(tracker.writer, "_thread", None)
        checkpoints = 1  # the one written on entering
        # warm-up (untimed): one tracked epoch
        run_epoch(tracked_model, tracked_opt, tracked_loader, device)
        checkpoints += 1
        drain_writer(tracker, checkpoints)
        dim = getattr(getattr(tracker, "log_projector", None), "dim", None)

        def tracked_epoch():
            nonlocal checkpoints
            s0, b0, c0 = tracker.stats["tracking_seconds"], tracker.writer.bytes_written, thread_cpu_seconds(wthread)
            d0 = common.dir_size(store)
            meter = common.LoadMeter()
            with common.Timer(device) as t:
                run_epoch(tracked_model, tracked_opt, tracked_loader, device)
            checkpoints += 1
            waited = drain_writer(tracker, checkpoints)
            c1 = thread_cpu_seconds(wthread)
            m = meter.read()
            tracked_cpu.append(m["own_cpu_s"])
            tracked_foreign.append(m["foreign_cpu_share"] or 0.0)
            tracked_loop.append(t.seconds)
            drains.append(waited)
            tracked.append(t.seconds + waited)
            track_s.append(tracker.stats["tracking_seconds"] - s0)
            writer_cpu.append(None if c0 is None or c1 is None else c1 - c0)
            bytes_ep.append((tracker.writer.bytes_written - b0) / n_train)
            disk_ep.append((common.dir_size(store) - d0) / n_train)

        def plain_epoch():
            meter = common.LoadMeter()
            with common.Timer(device) as t:
                run_epoch(plain_model, plain_opt, plain_loader, device)
            m = meter.read()
            plain.append(t.seconds)
            plain_cpu.append(m["own_cpu_s"])
            plain_foreign.append(m["foreign_cpu_share"] or 0.0)

        for r in range(args.repeats):
            order = (plain_epoch, tracked_epoch) if r % 2 == 0 else (tracked_epoch, plain_epoch)
            for f in order:
                f()
        t1 = time.perf_counter()
    exit_s = time.perf_counter() - t1
    if tracker.failure is not None:
        raise RuntimeError(f"tracking failed: {tracker.failure!r}")
    stats = dict(tracker.stats)
    whole = load.read()
    disk_total = common.dir_size(store)
    shutil.rmtree(store, ignore_errors=True)

    p, t, tl = common.median(plain), common.median(tracked), common.median(tracked_loop)
    # the plain and tracked epoch of one repeat run back to back: their ratio, kept if neither was disturbed
    quiet = [tr / pl for tr, pl, ft, fp in zip(tracked, plain, tracked_foreign, plain_foreign)
             if max(ft, fp) < args.quiet_threshold]
    quiet_ratio = common.median(quiet) if len(quiet) >= 3 else None
    verdict_ratio = quiet_ratio if quiet_ratio is not None else None
    target = REPLAY_TARGET if args.mode == "replay" else TARGET_RATIO.get(name)
    if target is not None:
        meets = None if verdict_ratio is None else verdict_ratio < target
    else:
        meets = None
    cpu_vals = [c for c in writer_cpu if c is not None]
    result = {
        "model": name, "params": n_params, "device": str(device), "mode": args.mode, "projection_dim": args.projection_dim,
        "projected_dim": dim, "steps_per_epoch": len(plain_loader), "n_train": n_train,
        "plain_s": p, "tracked_s": t, "ratio": t / p, "tracked_loop_s": tl, "loop_ratio": tl / p,
        "min_ratio": min(tracked) / min(plain),
        "plain_cpu_s": common.median(plain_cpu), "tracked_cpu_s": common.median(tracked_cpu),
        "cpu_ratio": common.median(tracked_cpu) / max(common.median(plain_cpu), 1e-9),
        "foreign_cpu_share": whole["foreign_cpu_share"],
"plain_cpu_epochs_s": plain_cpu, "tracked_cpu_epochs_s": tracked_cpu,
        "drain_s": common.median(drains), "tracking_s_per_epoch": common.median(track_s),
        "writer_cpu_s_per_epoch": common.median(cpu_vals) if cpu_vals else None,
        "bytes_per_sample_epoch": common.median(bytes_ep), "disk_bytes_per_sample_epoch": common.median(disk_ep),
        "enter_s": enter_s, "exit_s": exit_s, "store_bytes_total": disk_total,
        "quiet_pair_ratio": quiet_ratio, "quiet_pairs": len(quiet), "quiet_threshold": args.quiet_threshold,
        "target_ratio": target, "meets_target": meets,
        "plain_foreign_epochs": plain_foreign, "tracked_foreign_epochs": tracked_foreign,
        "plain_epochs_s": plain, "tracked_epochs_s": tracked, "tracked_loop_epochs_s": tracked_loop,
        "drain_epochs_s": drains, "tracking_s_epochs": track_s, "writer_cpu_epochs_s": writer_cpu,
        "tracker_stats": {k: v for k, v in stats.items() if k != "started"},
    }
    print(f"  plain {p * 1e3:.1f} ms/epoch, tracked {t * 1e3:.1f} ms/epoch (loop {tl * 1e3:.1f} + drain "
          f"{result['drain_s'] * 1e3:.1f}), ratio {t / p:.2f}× (min-based {result['min_ratio']:.2f}×, "
          f"CPU-time {result['cpu_ratio']:.2f}×, quiet pairs {len(quiet)}/{args.repeats}: "
          f"{'n/a' if quiet_ratio is None else f'{quiet_ratio:.2f}×'}); other processes used "
          f"{100 * (whole['foreign_cpu_share'] or 0):.0f}% of the machine meanwhile", flush=True)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 repeats")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]")
    ap.add_argument("--repeats", type=int, default=None, help="timed epochs of each kind (default 15; --quick 3)")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--projection-dim", type=int, default=1024)
    ap.add_argument("--mode", default="fast", choices=["fast", "replay"],
                    help="fast (per-sample rows, the default) or replay (only what replay needs: target ≤ 1.05×)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet-threshold", type=float, default=0.10,
                    help="an epoch is 'disturbed' if other processes used more than this share of the machine")
    ap.add_argument("--out", default=None, help="JSON name under benchmarks/out/ (default overhead[_<device>])")
    args = ap.parse_args(argv)
    args.repeats = args.repeats if args.repeats is not None else (3 if args.quick else 15)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda requested but CUDA is not available", file=sys.stderr)
        return 2

    start = time.perf_counter()
    machine = common.machine_info(device)
    print(f"machine: {machine['cpu_model']}, {machine['cpu_count']} cores, torch {machine['torch_version']}, "
          f"{machine['torch_threads']} threads, device {device}" + (f" ({machine['gpu']})" if "gpu" in machine else ""))
    tmp = Path(tempfile.mkdtemp(prefix="hydra_overhead_"))
    try:
        results = [bench_model(name, args, device, tmp) for name in args.models]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    wall = time.perf_counter() - start

    rows = []
    for r in results:
        rows.append({
            "model": r["model"], "params": r["params"], "k": r["projected_dim"], "steps/ep": r["steps_per_epoch"],
            "plain ms/ep": r["plain_s"] * 1e3, "tracked ms/ep": r["tracked_s"] * 1e3, "ratio": r["ratio"],
            "loop-only ratio": r["loop_ratio"], "quiet-pair ratio": r["quiet_pair_ratio"],
            "quiet pairs": f"{r['quiet_pairs']}/{args.repeats}", "min ratio": r["min_ratio"], "CPU-time ratio": r["cpu_ratio"],
            "drain ms": r["drain_s"] * 1e3,
            "tracking_seconds ms/ep": r["tracking_s_per_epoch"] * 1e3,
            "writer-thread CPU ms/ep": None if r["writer_cpu_s_per_epoch"] is None else r["writer_cpu_s_per_epoch"] * 1e3,
            "B/sample/ep": r["bytes_per_sample_epoch"], "disk B/sample/ep": r["disk_bytes_per_sample_epoch"],
            "other load %": None if r["foreign_cpu_share"] is None else 100 * r["foreign_cpu_share"],
            "target": "–" if r["target_ratio"] is None else
            f"<{r['target_ratio']}× " + ("DISTURBED (rerun)" if r["meets_target"] is None
                                          else "OK" if r["meets_target"] else "MISSED"),
        })
    common.print_table(rows, digits=2, title=f"Tracking overhead, mode={args.mode!r}, projection_dim={args.projection_dim}, "
                                             f"device {device}, median of {args.repeats} interleaved epochs")
    once = [{"model": r["model"], "enter ms": r["enter_s"] * 1e3, "exit ms": r["exit_s"] * 1e3,
             "store MiB total": r["store_bytes_total"] / 2**20} for r in results]
    common.print_table(once, digits=1, title="One-off costs (per track() context)")
    disturbed = [r["model"] for r in results if 3 * r["quiet_pairs"] < 2 * args.repeats]
    if disturbed:
        print(f"\nWARNING: other processes loaded the machine during {', '.join(disturbed)}; the median ratios "
              "there are unreliable (see 'quiet-pair ratio', 'min ratio', 'CPU-time ratio'). Rerun on a quiet machine.")
    print("ratio = median tracked epoch (loop + writer drain) / median plain epoch; quiet-pair ratio = median of "
          "tracked/plain over back-to-back pairs with other load < "
          f"{100 * args.quiet_threshold:.0f}% (the target verdict uses it)")
    print(f"\nwall time {wall:.1f} s")
    default_name = "overhead" + ("" if args.mode == "fast" else f"_{args.mode}") + \
        ("" if device.type == "cpu" else f"_{device.type}") + ("_quick" if args.quick else "")
    common.write_json(args.out or default_name, {
        "benchmark": "overhead", "machine": machine, "config": vars(args), "wall_seconds": wall,
        "results": results,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
