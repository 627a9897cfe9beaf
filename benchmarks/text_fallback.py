"""What tracking a transformer text classifier costs, and the torch.func fallback's share of it (issue 9).

Model: ``hydra_nb.examples.TextTransformer`` (token + position Embedding → ``nn.TransformerEncoder``,
batch_first, post-LayerNorm, dropout 0, padding masked → mean pool → Linear) on ``make_texts``
sentences (generated in place) encoded to a fixed length; SGD (lr 0.05, momentum 0.9), batch 64,
``track(mode="fast", projection_dim=1024)``, float32 on the CPU. For each size (d_model 32 and 64 by
default, 2 layers, 4 heads):

* what the capture chose for each module (``tracker.capture.owners``): Linear, Embedding and LayerNorm
  go through layer hooks (per-sample gradients from the layer's input and output gradient);
  ``nn.MultiheadAttention`` (in_proj and out_proj, whose weights its forward uses functionally) through
  its own rule, which follows those ``F.linear`` calls (until issue 17: the ``torch.func`` fallback, a
  vmapped per-sample VJP of the module at ``step()``; its time is still reported, now ~0);
* plain and tracked epoch time: two copies of the model (same init, same batch order), epochs
  interleaved P T, T P, ... after an untimed warm-up of each, medians; a tracked epoch includes the
  time the store writer needs afterwards to drain its queue (as in ``overhead.py``);
* ``tracker.stats['tracking_seconds']`` per epoch: time inside hydra_nb's hooks, step hook and checkpoints;
* the fallback's part of it: ``GradientCapture._run_fallbacks`` timed by a wrapper installed by this
  script (the package is not changed), and the gradient check's part (``GradientCapture.check``,
  at sampled steps) likewise.

    python benchmarks/text_fallback.py            # 7 repeats per size, 1 torch thread
    python benchmarks/text_fallback.py --quick    # 3 repeats (smoke run)
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from overhead import drain_writer, run_epoch  # noqa: E402

import hydra_nb  # noqa: E402
from hydra_nb.capture import GradientCapture  # noqa: E402
from hydra_nb.examples import TextTransformer, count_parameters, encode_texts, make_texts  # noqa: E402


class Stopwatch:
    """Wraps a method of a class; accumulates the wall seconds spent in it (all instances)."""

    def __init__(self, cls, name: str):
        self.cls, self.name, self.original = cls, name, getattr(cls, name)
        self.seconds, self.calls = 0.0, 0
        watch = self

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return watch.original(*args, **kwargs)
            finally:
                watch.seconds += time.perf_counter() - start
                watch.calls += 1

        setattr(cls, name, timed)

    def restore(self) -> None:
        setattr(self.cls, self.name, self.original)


def routing(tracker) -> dict:
    """{rule name: {"modules": Counter of module types, "params": number of scalar parameters}} as the capture chose."""
    out: dict = {}
    for owner in tracker.capture.owners:
        entry = out.setdefault(owner.rule.name, {"modules": Counter(), "params": 0})
        entry["modules"][type(owner.module).__name__] += 1
        named = dict(owner.module.named_parameters())
        entry["params"] += sum(named[n].numel() for n, _ in owner.owned)
    return {k: {"modules": dict(v["modules"]), "params": v["params"]} for k, v in out.items()}


def bench_size(d_model: int, args, tmp: Path) -> dict:
    texts, labels = make_texts(args.n_train, seed=args.seed)
    ids = encode_texts(texts, args.length)
    dataset = TensorDataset(ids, labels)
    common.seed_everything(args.seed)
    plain_model = TextTransformer(d_model=d_model, nhead=args.heads, num_layers=args.layers, max_len=args.length)
    tracked_model = copy.deepcopy(plain_model)
    n_params = count_parameters(plain_model)
    plain_opt = torch.optim.SGD(plain_model.parameters(), lr=args.lr, momentum=0.9)
    tracked_opt = torch.optim.SGD(tracked_model.parameters(), lr=args.lr, momentum=0.9)
    plain_loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, generator=common.generator(args.seed))
    tracked_loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                                generator=common.generator(args.seed))
    print(f"\n== d_model {d_model}: {n_params:,} parameters, {args.layers} layers, {args.heads} heads, length "
          f"{args.length}, {args.n_train} sentences, batch {args.batch_size}, {len(plain_loader)} steps/epoch, "
          f"{args.repeats} repeats", flush=True)
    run_epoch(plain_model, plain_opt, plain_loader, "cpu")  # warm-up (untimed)

    fallback = Stopwatch(GradientCapture, "_run_fallbacks")
    check = Stopwatch(GradientCapture, "check")
    plain, tracked, drains, track_s, fall_s, check_s = [], [], [], [], [], []
    store = tmp / f"text_{d_model}.zarr"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tracker = hydra_nb.track(tracked_model, tracked_loader, store=str(store), optimizer=tracked_opt,
                                     mode="fast", projection_dim=args.projection_dim, checkpoint_every="epoch",
                                     overwrite=True, seed=0)
            with tracker:
                checkpoints = 1
                run_epoch(tracked_model, tracked_opt, tracked_loader, "cpu")  # warm-up (untimed)
                checkpoints += 1
                drain_writer(tracker, checkpoints)
                route = routing(tracker)

                def tracked_epoch():
                    nonlocal checkpoints
                    s0, f0, c0 = tracker.stats["tracking_seconds"], fallback.seconds, check.seconds
                    with common.Timer("cpu") as t:
                        run_epoch(tracked_model, tracked_opt, tracked_loader, "cpu")
                    checkpoints += 1
                    waited = drain_writer(tracker, checkpoints)
                    tracked.append(t.seconds + waited)
                    drains.append(waited)
                    track_s.append(tracker.stats["tracking_seconds"] - s0)
                    fall_s.append(fallback.seconds - f0)
                    check_s.append(check.seconds - c0)

                def plain_epoch():
                    with common.Timer("cpu") as t:
                        run_epoch(plain_model, plain_opt, plain_loader, "cpu")
                    plain.append(t.seconds)

                for r in range(args.repeats):
                    for f in ((plain_epoch, tracked_epoch) if r % 2 == 0 else (tracked_epoch, plain_epoch)):
                        f()
    finally:
        fallback.restore()
        check.restore()
        shutil.rmtree(store, ignore_errors=True)
    if tracker.failure is not None:
        raise RuntimeError(f"tracking failed: {tracker.failure!r}")
    slow_ops = sorted({str(w.message).split("batching rule for ")[1].split(".")[0]
                       for w in caught if "batching rule for" in str(w.message)})
    p, t = common.median(plain), common.median(tracked)
    tr, fb, ck = common.median(track_s), common.median(fall_s), common.median(check_s)
    result = {
        "d_model": d_model, "params": n_params, "layers": args.layers, "heads": args.heads, "length": args.length,
        "batch_size": args.batch_size, "steps_per_epoch": len(plain_loader), "routing": route,
        "fallback_params": route.get("fallback", {}).get("params", 0),
        "plain_s": p, "tracked_s": t, "ratio": t / p, "tracking_s": tr, "drain_s": common.median(drains),
        "fallback_s": fb, "check_s": ck,
        "fallback_share_of_tracking": fb / tr, "fallback_share_of_overhead": fb / max(t - p, 1e-12),
        "vmap_ops_without_batching_rule": slow_ops,
        "plain_epochs_s": plain, "tracked_epochs_s": tracked, "tracking_s_epochs": track_s,
        "fallback_s_epochs": fall_s, "drain_s_epochs": drains, "check_s_epochs": check_s,
    }
    print(f"  routing: " + "; ".join(f"{k}: {v['modules']} ({v['params']:,} params)" for k, v in route.items()))
    print(f"  plain {p * 1e3:.0f} ms/epoch, tracked {t * 1e3:.0f} ms/epoch ({t / p:.2f}x); in hydra_nb "
          f"{tr * 1e3:.0f} ms/epoch, of which the torch.func fallback {fb * 1e3:.0f} ms ({100 * fb / tr:.0f}%) "
          f"and the gradient check {ck * 1e3:.0f} ms", flush=True)
    if slow_ops:
        print(f"  torch warned: no vmap batching rule for {', '.join(slow_ops)} (run one sample at a time)")
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 repeats")
    ap.add_argument("--repeats", type=int, default=None, help="timed epochs of each kind (default 7; --quick 3)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="d_model values")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--length", type=int, default=16, help="tokens per sentence after padding")
    ap.add_argument("--n-train", type=int, default=1024, help="sentences (1024 = 16 steps per epoch)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--projection-dim", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: steadier timings on a shared 2-core machine)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.repeats = args.repeats if args.repeats is not None else (3 if args.quick else 7)

    start = time.perf_counter()
    machine = common.machine_info("cpu")
    print(f"machine: {machine['cpu_model']}, {machine['cpu_count']} cores, torch {machine['torch_version']}, "
          f"{machine['torch_threads']} threads, commit {machine.get('git_commit')}")
    load = common.LoadMeter()
    tmp = Path(tempfile.mkdtemp(prefix="hydra_text_"))
    try:
        results = [bench_size(d, args, tmp) for d in args.sizes]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    other = load.read()["foreign_cpu_share"]
    wall = time.perf_counter() - start

    rows = [{
        "d_model": r["d_model"], "params": r["params"], "fallback params": r["fallback_params"],
        "plain ms/ep": r["plain_s"] * 1e3, "tracked ms/ep": r["tracked_s"] * 1e3, "ratio": r["ratio"],
        "tracking_seconds ms/ep": r["tracking_s"] * 1e3, "fallback ms/ep": r["fallback_s"] * 1e3,
        "fallback % of tracking": 100 * r["fallback_share_of_tracking"], "grad check ms/ep": r["check_s"] * 1e3,
        "writer drain ms/ep": r["drain_s"] * 1e3,
    } for r in results]
    common.print_table(rows, digits=1, title=f"TextTransformer ({args.layers} layers, {args.heads} heads, length "
                                             f"{args.length}, batch {args.batch_size}), fast mode, projection_dim="
                                             f"{args.projection_dim}, float32 CPU, median of {args.repeats} "
                                             "interleaved epochs")
    print("routing (both sizes): " + "; ".join(f"{k}: {v['modules']}" for k, v in results[0]["routing"].items()))
    print(f"other processes used {100 * (other or 0):.0f}% of the machine meanwhile; wall time {wall:.1f} s")
    common.write_json("text_fallback" + ("_quick" if args.quick else ""), {
        "benchmark": "text_fallback", "machine": machine, "config": vars(args), "wall_seconds": wall,
        "foreign_cpu_share": other, "results": results,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
