"""Speed against the field: time to the first ranking, hydra_nb vs Captum's TracInCP, and batched vs
looped Hessian-vector products in exact mode.

**A. End-to-end time to the first ranking.** For MLP (8×8 digits, 2,410 parameters), LeNet5 (28×28,
61,706) and ResNet8 (32×32, a ResNet-8-sized CNN without BatchNorm, 77,418), float32, batch 64, SGD
(lr 0.05, momentum 0.9), ``--epochs`` epochs on the 1,438 digits training samples, from an untrained
model to the scores of all training samples for ``--n-test`` test points:

* **plain**: the training loop alone (the floor);
* **hydra_nb**: the same loop under ``hydra_nb.track(mode="fast", projection_dim=1024)`` (the
  writer's queue drained, the store closed), then ``store.contributions`` for the test points;
* **TracInCP**: the same loop saving a checkpoint (state_dict) after every epoch, then Captum's
  ``TracInCP(...).influence((x_test, y_test))`` over those checkpoints: the post-hoc way to the
  same kind of answer (sum over checkpoints of lr·∇ℓ_testᵀ∇ℓ_train, all parameters);
* **TracInCPFast**: Captum's last-layer-only variant (cheaper, approximates more).

The three pipelines run interleaved ``--repeats`` times (ABC, BCA, CAB, ...) after one untimed warm-up
of each; medians are reported with the ratio to plain training. The answers differ in what they
mean (HYDRA follows every step with momentum; TracInCP samples checkpoints once per epoch), so the
script also reports the Spearman correlation of hydra_nb's and TracInCP's scores, as a check that
they rank the same kind of thing, not as a quality measure (see field_lds.py for quality).

**B. Exact mode: batched HVPs vs one per sample.** At the parameters after one epoch of training
and on one batch of 64, Hessian-vector products of the batch loss for ``--n-vectors`` tracked
hypergradient vectors, computed (1) as the original HYDRA code did, one double-backward
``torch.autograd.grad`` per vector in a Python loop (the gradient graph built once and retained),
and (2) as hydra_nb's exact mode does (``ExactHypergradients``: ``torch.func`` forward-over-reverse
``jvp(grad(L))`` vmapped over chunks of ``hvp_batch`` vectors). Medians of ``--repeats``; the two
results are compared (max relative difference) so the speed-up is for the same numbers.

**C. Exact mode end to end.** ``hydra_nb.track(mode="exact")`` for ``--exact-n`` training samples over
two epochs of ``--exact-steps`` optimizer steps each (batch 64, the same SGD) with ``hvp_method`` "vmap", "loop" and "auto"
(which times both on its first step and keeps the faster): seconds of tracked training, interleaved,
median of ``--repeats``; the three stores' contributions are compared (max relative difference).

    python benchmarks/field_speed.py             # 3 repeats, 2 epochs, 10 test points
    python benchmarks/field_speed.py --skip-e2e --skip-hvp   # only C
    python benchmarks/field_speed.py --quick     # smoke run (MLP only, 1 repeat)
    python benchmarks/field_speed.py --device cuda
"""

from __future__ import annotations

import argparse
import copy
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import field_common as fc  # noqa: E402

import hydra_nb  # noqa: E402
from hydra_nb.hypergrad import ExactHypergradients  # noqa: E402
from hydra_nb.optim import SGDRule  # noqa: E402
from hydra_nb.params import ParamLayout  # noqa: E402


def _loader(x, y, args):
    return DataLoader(TensorDataset(x, y), batch_size=args.batch_size, shuffle=True,
                      generator=common.generator(args.seed))


def _loop(model, opt, loader, device, epochs, after_epoch=None):
    model.train()
    for ep in range(epochs):
        for xb, yb in loader:
            xb, yb = xb.to(device), yb.to(device)
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
        if after_epoch is not None:
            after_epoch(ep)
    common.sync(device)


def _fresh(name, args, device):
    return fc.make_model(name, args.seed, dtype=torch.float32, device=device)


def run_plain(name, data, args, device, tmp):
    x, y, _, _ = data
    model = _fresh(name, args, device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    t0 = time.perf_counter()
    _loop(model, opt, _loader(x, y, args), device, args.epochs)
    return time.perf_counter() - t0, None


def run_hydra(name, data, args, device, tmp):
    x, y, xq, yq = data
    model = _fresh(name, args, device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    loader = _loader(x, y, args)
    store = tmp / "hydra.zarr"
    t0 = time.perf_counter()
    with hydra_nb.track(model, loader, store=str(store), optimizer=opt, mode="fast",
                        projection_dim=args.projection_dim, overwrite=True) as tracker:
        _loop(model, opt, loader, device, args.epochs)
    if tracker.failure is not None:
        raise RuntimeError(f"tracking failed: {tracker.failure!r}")
    t_train = time.perf_counter() - t0
    scores = hydra_nb.open_store(store).contributions(model, xq.to(device), yq.to(device), progress=False)
    total = time.perf_counter() - t0
    return total, {"scores": scores, "train_s": t_train}


def _tracin(name, data, args, device, tmp, fast):
    x, y, xq, yq = data
    model = _fresh(name, args, device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    ckpt = tmp / ("ckpt_fast" if fast else "ckpt")
    shutil.rmtree(ckpt, ignore_errors=True)
    ckpt.mkdir()
    paths = []

    def save(ep):
        p = ckpt / f"epoch{ep:03d}.pt"
        torch.save({"state": copy.deepcopy(model.state_dict()), "lr": args.lr}, p)
        paths.append(str(p))

    t0 = time.perf_counter()
    _loop(model, opt, _loader(x, y, args), device, args.epochs, save)
    t_train = time.perf_counter() - t0
    tr = fc.tracin(model, x.to(device), y.to(device), paths, batch_size=args.batch_size, fast=fast)
    scores = tr.influence((xq.to(device), yq.to(device)))
    common.sync(device)
    total = time.perf_counter() - t0
    return total, {"scores": scores.detach().cpu().numpy(), "train_s": t_train}


def run_tracin(name, data, args, device, tmp):
    return _tracin(name, data, args, device, tmp, fast=False)


def run_tracin_fast(name, data, args, device, tmp):
    return _tracin(name, data, args, device, tmp, fast=True)


PIPELINES = {"plain": run_plain, "hydra_nb (fast, k=1024)": run_hydra, "TracInCP (Captum)": run_tracin,
             "TracInCPFast (Captum, last layer)": run_tracin_fast}


def bench_end_to_end(name, args, device, tmp) -> dict:
    _, size = fc.MODELS[name]
    x, y, xt, yt = fc.load_digits(image_size=size, dtype=torch.float32)
    data = (x, y, xt[: args.n_test], yt[: args.n_test])
    names = list(PIPELINES)
    times = {k: [] for k in names}
    extra = {}
    for k in names:  # warm-up (first-call costs: allocator, kernels, imports)
        PIPELINES[k](name, data, args, device, tmp)
    for r in range(args.repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for k in order:
            t, info = PIPELINES[k](name, data, args, device, tmp)
            times[k].append(t)
            if info is not None:
                extra.setdefault(k, []).append(info)
    med = {k: statistics.median(v) for k, v in times.items()}
    h = extra["hydra_nb (fast, k=1024)"][-1]["scores"]
    t = extra["TracInCP (Captum)"][-1]["scores"]
    rho = float(np.nanmean(fc.spearman_rows(h.T, t.T)))
    rows = []
    for k in names:
        train_s = statistics.median([i["train_s"] for i in extra[k]]) if k in extra else med[k]
        rows.append({"model": name, "params": sum(p.numel() for p in _fresh(name, args, "cpu").parameters()), "pipeline": k,
                     "s to first ranking": med[k], "× plain": med[k] / med["plain"],
                     "of which training s": train_s})
    print(f"[{name}] " + ", ".join(f"{k} {v:.2f} s" for k, v in med.items())
          + f"; Spearman(hydra_nb, TracInCP) per test point, mean {rho:.3f}", flush=True)
    return {"rows": rows, "times": times, "spearman_hydra_tracin": rho}


# -- B: HVPs -------------------------------------------------------------------------------------
def bench_hvp(name, args, device) -> dict:
    _, size = fc.MODELS[name]
    x, y, _, _ = fc.load_digits(image_size=size, dtype=torch.float32)
    model = _fresh(name, args, device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    _loop(model, opt, _loader(x, y, args), device, 1)
    xb, yb = x[: args.batch_size].to(device), y[: args.batch_size].to(device)
    layout, params = ParamLayout.from_model(model, opt)
    D = layout.size
    gen = torch.Generator().manual_seed(0)
    V = torch.randn(args.n_vectors, D, generator=gen).to(device)

    def loop_hvps():
        loss = F.cross_entropy(model(xb), yb)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        flat = torch.cat([g.reshape(-1) for g in grads])
        out = torch.empty_like(V)
        for j in range(len(V)):
            hv = torch.autograd.grad(flat @ V[j], params, retain_graph=True)
            out[j] = torch.cat([t.reshape(-1) for t in hv])
        common.sync(device)
        return out

    def batch_loss(p):
        return F.cross_entropy(torch.func.functional_call(model, p, (xb,)), yb)

    results = {}
    timings = {}
    for hvp_batch in args.hvp_batches:
        ex = ExactHypergradients(model, params, layout, np.arange(len(V)), len(V), None, hvp_batch=hvp_batch,
                                 hvp_method="vmap", rule=SGDRule())
        ex.h.copy_(V)
        ex.seen[:] = True

        def batched(ex=ex):
            out = ex._hvp(batch_loss)
            common.sync(device)
            return out
        results[f"torch.func vmap, hvp_batch={hvp_batch}"] = batched
    results = {"autograd loop (one double-backward per vector)": loop_hvps, **results}
    outs = {}
    for k, fn in results.items():
        fn()  # warm-up
        ts = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            outs[k] = fn()
            ts.append(time.perf_counter() - t0)
        timings[k] = statistics.median(ts)
    ref = outs["autograd loop (one double-backward per vector)"]
    base = timings["autograd loop (one double-backward per vector)"]
    rows = []
    for k, t in timings.items():
        diff = float((outs[k] - ref).norm() / ref.norm())
        rows.append({"model": name, "params": D, "method": k, "ms per HVP": 1000 * t / len(V),
                     "speed-up vs loop": base / t, "rel. diff vs loop": diff})
    print(f"[{name} HVP] " + ", ".join(f"{r['method']}: {r['ms per HVP']:.2f} ms" for r in rows), flush=True)
    return {"rows": rows}


# -- C: exact mode end to end ---------------------------------------------------------------------
def bench_exact(name, args, device, tmp) -> dict:
    _, size = fc.MODELS[name]
    x, y, xt, yt = fc.load_digits(image_size=size, dtype=torch.float32)
    n_batches = args.exact_steps
    x, y = x[: n_batches * args.batch_size], y[: n_batches * args.batch_size]
    tracked = np.arange(args.exact_n)
    times, scores, chosen = {}, {}, {}
    methods = ["vmap", "loop", "auto"]
    for r in range(args.repeats + 1):  # the first round is a warm-up
        for method in methods[r % 3:] + methods[: r % 3]:
            model = _fresh(name, args, device)
            opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
            loader = _loader(x, y, args)
            t0 = time.perf_counter()
            with hydra_nb.track(model, loader, store=str(tmp / f"exact_{method}.zarr"), optimizer=opt, mode="exact",
                                projection_dim=None, exact_indices=tracked, overwrite=True, hvp_method=method,
                                strict=True) as tracker:
                _loop(model, opt, loader, device, 2)
            if r:
                times.setdefault(method, []).append(time.perf_counter() - t0)
            chosen[method] = tracker.exact.hvp_method
            if r == args.repeats:
                scores[method] = hydra_nb.open_store(tmp / f"exact_{method}.zarr").contributions(
                    model, xt[:5].to(device), yt[:5].to(device), progress=False)
    ref = scores["vmap"]
    rows = []
    for m in methods:
        med = statistics.median(times[m])
        rows.append({"model": name, "hvp_method": m if m != "auto" else f"auto (chose {chosen['auto'] if chosen['auto'] != 'auto' else 'nothing: vmap'})",
                     "tracked s": med, "× vmap": med / statistics.median(times["vmap"]),
                     "rel. diff vs vmap": float(np.linalg.norm(scores[m] - ref) / np.linalg.norm(ref))})
    print(f"[{name} exact] " + ", ".join(f"{r['hvp_method']}: {r['tracked s']:.2f} s" for r in rows), flush=True)
    return {"rows": rows, "times": times}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: MLP only, 1 repeat, 1 epoch")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", nargs="+", default=None, choices=["MLP", "LeNet5", "ResNet8"])
    ap.add_argument("--epochs", type=int, default=None, help="default 2 (--quick 1)")
    ap.add_argument("--repeats", type=int, default=None, help="default 3 (--quick 1)")
    ap.add_argument("--n-test", type=int, default=10)
    ap.add_argument("--projection-dim", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-vectors", type=int, default=None, help="HVPs per timing (default 256; --quick 32)")
    ap.add_argument("--hvp-batches", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--skip-hvp", action="store_true")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--skip-exact", action="store_true")
    ap.add_argument("--exact-n", type=int, default=64, help="C: training samples tracked exactly")
    ap.add_argument("--exact-steps", type=int, default=6, help="C: optimizer steps")
    args = ap.parse_args(argv)
    q = args.quick
    args.models = args.models or (["MLP"] if q else ["MLP", "LeNet5", "ResNet8"])
    args.epochs = args.epochs or (1 if q else 2)
    args.repeats = args.repeats or (1 if q else 3)
    args.n_vectors = args.n_vectors or (32 if q else 256)
    device = torch.device(args.device)
    session = fc.FieldRun(device)
    tmp = fc.tmpdir("hydra_speed_")
    out = {"e2e": {}, "hvp": {}, "exact": {}}
    try:
        if not args.skip_e2e:
            for name in args.models:
                out["e2e"][name] = bench_end_to_end(name, args, device, tmp)
        if not args.skip_hvp:
            for name in args.models:
                out["hvp"][name] = bench_hvp(name, args, device)
        if not args.skip_exact:
            for name in args.models:
                out["exact"][name] = bench_exact(name, args, device, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if out["e2e"]:
        rows = [r for v in out["e2e"].values() for r in v["rows"]]
        common.print_table(rows, digits=3, title=f"Time to the first ranking ({args.n_test} test points × 1,438 training "
                                                 f"samples), {args.epochs} epochs, batch {args.batch_size}, "
                                                 f"median of {args.repeats}, {device}")
    if out["hvp"]:
        rows = [r for v in out["hvp"].values() for r in v["rows"]]
        common.print_table(rows, digits=3, title=f"Exact mode: Hessian-vector products of a batch-{args.batch_size} "
                                                 f"loss, {args.n_vectors} vectors, median of {args.repeats}, {device}")
    if out["exact"]:
        rows = [r for v in out["exact"].values() for r in v["rows"]]
        common.print_table(rows, digits=3, title=f"Exact mode end to end: {args.exact_n} samples tracked, "
                                                 f"2 × {args.exact_steps} steps of batch {args.batch_size}, median of "
                                                 f"{args.repeats}, {device}")
    suffix = ("_quick" if q else "") + ("" if device.type == "cpu" else f"_{device.type}")
    if args.skip_e2e and args.skip_hvp:
        suffix += "_exact"
    session.finish("field_speed", suffix, vars(args), results=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
