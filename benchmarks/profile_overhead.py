"""Where does the tracking overhead go? LeNet5 on 28×28 digits, mode="fast" (or --mode replay), projection_dim=1024.

1. cProfile over tracked epochs: the hydra_nb functions (and others) by total and cumulative time.
2. torch.profiler over plain and over tracked epochs: aten ops by self CPU time, side by side.

    python benchmarks/profile_overhead.py [--epochs 5] [--quick]

Writes benchmarks/out/profile_overhead.json (and the raw cProfile stats to profile_overhead.pstats).
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from overhead import MODELS, drain_writer, run_epoch  # noqa: E402

import hydra_nb  # noqa: E402
from hydra_nb.examples import load_digits  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=None, help="profiled epochs of each kind (default 5; --quick 1)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default="LeNet5", choices=list(MODELS))
    ap.add_argument("--projection-dim", type=int, default=1024)
    ap.add_argument("--mode", default="fast", choices=["fast", "replay"],
                    help="the recording profiled: fast (rows) or replay (replay-only, issue 17)")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)
    epochs = args.epochs or (1 if args.quick else 5)
    device = torch.device("cpu")
    model_cls, size = MODELS[args.model]
    x_tr, y_tr, _, _ = load_digits(image_size=size)
    common.seed_everything(0)
    plain_model = model_cls()
    tracked_model = copy.deepcopy(plain_model)
    ds = TensorDataset(x_tr, y_tr)
    mk = lambda: DataLoader(ds, batch_size=64, shuffle=True, generator=common.generator(0))  # noqa: E731
    plain_loader, tracked_loader = mk(), mk()
    plain_opt = torch.optim.SGD(plain_model.parameters(), lr=0.05, momentum=0.9)
    tracked_opt = torch.optim.SGD(tracked_model.parameters(), lr=0.05, momentum=0.9)
    tmp = Path(tempfile.mkdtemp(prefix="hydra_profile_"))
    result = {"benchmark": "profile_overhead", "machine": common.machine_info(device), "model": args.model,
              "epochs": epochs, "projection_dim": args.projection_dim}
    try:
        run_epoch(plain_model, plain_opt, plain_loader, device)  # warm-up
        load = common.LoadMeter()
        with hydra_nb.track(tracked_model, tracked_loader, store=str(tmp / "p.zarr"), optimizer=tracked_opt,
                            mode=args.mode, projection_dim=args.projection_dim, overwrite=True, seed=0) as tracker:
            run_epoch(tracked_model, tracked_opt, tracked_loader, device)  # warm-up
            drain_writer(tracker, 2)

            # 1. cProfile, tracked epochs (plain epochs profiled too, for the baseline)
            prof = cProfile.Profile()
            t = time.perf_counter()
            prof.enable()
            for _ in range(epochs):
                run_epoch(tracked_model, tracked_opt, tracked_loader, device)
            drain_writer(tracker, 2 + epochs)
            prof.disable()
            tracked_wall = time.perf_counter() - t
            base = cProfile.Profile()
            t = time.perf_counter()
            base.enable()
            for _ in range(epochs):
                run_epoch(plain_model, plain_opt, plain_loader, device)
            base.disable()
            plain_wall = time.perf_counter() - t

            # 2. torch.profiler, plain vs tracked
            tables = {}
            for kind, (m, o, dl) in {"plain": (plain_model, plain_opt, plain_loader),
                                     "tracked": (tracked_model, tracked_opt, tracked_loader)}.items():
                with profile(activities=[ProfilerActivity.CPU]) as tp:
                    for _ in range(epochs):
                        run_epoch(m, o, dl, device)
                    if kind == "tracked":
                        drain_writer(tracker, 2 + 2 * epochs)
                tables[kind] = {e.key: (e.self_cpu_time_total / 1e3, e.count) for e in tp.key_averages()}
        other = load.read()["foreign_cpu_share"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    common.OUT_DIR.mkdir(parents=True, exist_ok=True)
    prof.dump_stats(str(common.OUT_DIR / "profile_overhead.pstats"))
    print(f"{args.model}, {epochs} epochs each under cProfile: tracked {tracked_wall / epochs * 1e3:.0f} ms/epoch, "
          f"plain {plain_wall / epochs * 1e3:.0f} ms/epoch (profiler overhead included); other processes used "
          f"{100 * (other or 0):.0f}% of the machine")

    st = pstats.Stats(prof)
    rows = []
    for (file, line, func), (cc, nc, tt, ct, _) in st.stats.items():
        short = file.split("site-packages/")[-1].split("/work/main/")[-1]
        rows.append({"function": f"{short}:{line}({func})", "calls": nc, "tottime ms/ep": tt / epochs * 1e3,
                     "cumtime ms/ep": ct / epochs * 1e3})
    hyd = sorted([r for r in rows if "hydra_nb/" in r["function"]], key=lambda r: -r["cumtime ms/ep"])
    common.print_table(hyd[: args.top], digits=2,
                       title="cProfile: hydra_nb functions by cumulative time (tracked epochs)")
    by_tot = sorted(rows, key=lambda r: -r["tottime ms/ep"])
    common.print_table(by_tot[: args.top], digits=2, title="cProfile: all functions by own time (tracked epochs)")

    keys = set(tables["plain"]) | set(tables["tracked"])
    ops = []
    for k in keys:
        p_ms, p_n = tables["plain"].get(k, (0.0, 0))
        t_ms, t_n = tables["tracked"].get(k, (0.0, 0))
        ops.append({"op": k[:60], "plain ms/ep": p_ms / epochs, "tracked ms/ep": t_ms / epochs,
                    "extra ms/ep": (t_ms - p_ms) / epochs, "plain calls/ep": p_n / epochs,
                    "tracked calls/ep": t_n / epochs})
    ops.sort(key=lambda r: -r["extra ms/ep"])
    tot_p = sum(v[0] for v in tables["plain"].values()) / epochs
    tot_t = sum(v[0] for v in tables["tracked"].values()) / epochs
    common.print_table(ops[: args.top], digits=2,
                       title=f"torch.profiler: ops by extra self-CPU time when tracked (self CPU total: plain "
                             f"{tot_p:.0f} ms/ep, tracked {tot_t:.0f} ms/ep)")
    result.update({"tracked_ms_per_epoch_cprofile": tracked_wall / epochs * 1e3,
                   "plain_ms_per_epoch_cprofile": plain_wall / epochs * 1e3, "foreign_cpu_share": other,
                   "hydra_functions": hyd[:60], "functions_by_tottime": by_tot[:60], "torch_ops": ops[:60],
                   "torch_self_cpu_ms_per_epoch": {"plain": tot_p, "tracked": tot_t}})
    common.write_json(("profile_overhead_quick" if args.quick else "profile_overhead") + ("_replay" if args.mode == "replay" else ""), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
