"""How wrong is the fixed-statistics approximation for BatchNorm, and what does each choice cost?

A tiny BatchNorm CNN (and a BatchNorm MLP) on scikit-learn's 8×8 digits, float64, trained with SGD
and momentum on a subset of the training set, the same initialisation and batch order in every run:

* ``plain``: untracked training (the cost reference);
* ``fixed``: fast mode, ``batchnorm="fixed"`` (per-sample gradients with the batch statistics held
  constant), full dimension (``projection_dim=None``), so injections can be compared row by row;
* ``exact``: fast mode, ``batchnorm="exact"`` (batch-coupled per-sample gradients), full dimension;
* ``exact mode (exact|fixed)``: ``mode="exact"`` (Hessian terms kept) with either choice, for the first
  ``--exact-samples`` training samples (exact mode costs one Hessian-vector product per sample and step);
* ``autograd``: ground truth by autograd through the unrolled weighted training loop,
  −dL(z_j; θ_T)/dw_i with every batch loss (1/B)·Σ_b (1 + w_b)·ℓ_b through PyTorch's own BatchNorm.

Reported: the relative error of the fixed-statistics injections u_t(i) against the batch-coupled ones
(all rows, same steps and samples), and of contributions C[test, train] (Pearson, Spearman over
all pairs, relative error ‖C − C_ref‖/‖C_ref‖) against the batch-coupled fast estimate and the
autograd ground truth; exact mode with either choice against the ground truth isolates the
BatchNorm approximation from fast mode's (dropping the Hessian); plus each run's wall time over
plain training's. Test losses use the
model in eval mode with the run's final running statistics (taken as constants, as queries do).

    python benchmarks/batchnorm_error.py            # ~2 min on 2 cores
    python benchmarks/batchnorm_error.py --quick    # CI smoke run
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
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import hydra_nb  # noqa: E402
from hydra_nb.examples import count_parameters, load_digits  # noqa: E402

DT = torch.float64


class BNCNN(nn.Module):
    """conv(1→4) → BN2d → relu → pool → conv(4→8) → BN2d → relu → pool → linear(32→10): 690 parameters."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(x.flatten(1))


class BNMLP(nn.Module):
    """linear(64→32) → BN1d → tanh → linear(32→10): 2,474 parameters."""

    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(64, 32), nn.BatchNorm1d(32), nn.Linear(32, 10)

    def forward(self, x):
        return self.fc2(torch.tanh(self.bn(self.fc1(x.flatten(1)))))


MODELS = {"BNCNN": BNCNN, "BNMLP": BNMLP}


class EpochBatches:
    """A batch sampler replaying fixed index lists, one list of batches per epoch (the same in every run)."""

    def __init__(self, epochs: list[list[list[int]]]):
        self.epochs, self.e = epochs, 0

    def __iter__(self):
        batches = self.epochs[self.e % len(self.epochs)]
        self.e += 1
        return iter(batches)

    def __len__(self):
        return len(self.epochs[0])


def fresh(model_cls, seed: int) -> nn.Module:
    common.seed_everything(seed)
    return model_cls().to(DT)


def train(model, data, order, args, epochs=None, **track_kw):
    """One training run; under hydra_nb.track unless track_kw is empty. Returns (model, CPU seconds, tracker).

    CPU time of this process (all threads), not wall time: the shared benchmark machine is often busy
    with other work, which inflates wall times by a varying factor.
    """
    epochs = args.epochs if epochs is None else epochs
    x, y = data
    loader = DataLoader(TensorDataset(x, y), batch_sampler=EpochBatches(order))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)

    def loop():
        for _ in range(epochs):
            for xb, yb in loader:
                opt.zero_grad()
                F.cross_entropy(model(xb), yb).backward()
                opt.step()

    start = time.process_time()
    tracker = None
    if track_kw:
        with hydra_nb.track(model, loader, optimizer=opt, strict=True, overwrite=True, **track_kw) as tracker:
            loop()
    else:
        loop()
    return model, time.process_time() - start, tracker


def unrolled(model_cls, theta0: dict, data, order, args, buffers: dict, xq, yq) -> tuple[np.ndarray, dict]:
    """Autograd through the unrolled loop: −dL(z_j; θ_T)/dw (n_test, N) and θ_T."""
    x, y = data
    arch = model_cls().to(DT).train()  # architecture only; its running statistics move and are never used
    w = torch.zeros(len(y), dtype=DT, requires_grad=True)
    theta = {n: t.clone().requires_grad_(True) for n, t in theta0.items()}
    buf: dict = {}
    for e in range(args.epochs):
        for idx in order[e % len(order)]:
            idx = torch.as_tensor(idx)
            per = F.cross_entropy(functional_call(arch, theta, (x[idx],)), y[idx], reduction="none")
            loss = ((1 + w[idx]) * per).mean()
            grads = torch.autograd.grad(loss, list(theta.values()), create_graph=True)
            new = {}
            for (n, t), g in zip(theta.items(), grads):
                buf[n] = g if n not in buf else args.momentum * buf[n] + g
                new[n] = t - args.lr * buf[n]
            theta = new
    arch.eval()
    out = functional_call(arch, {**theta, **buffers}, (xq,))
    losses = F.cross_entropy(out, yq, reduction="none")
    C = np.zeros((len(yq), len(y)))
    for j in range(len(yq)):
        (g,) = torch.autograd.grad(losses[j], w, retain_graph=j + 1 < len(yq))
        C[j] = -g.numpy()
    return C, {n: t.detach() for n, t in theta.items()}


def compare(C: np.ndarray, ref: np.ndarray) -> dict:
    a, b = C.ravel(), ref.ravel()
    return {"pearson": float(stats.pearsonr(a, b)[0]), "spearman": float(stats.spearmanr(a, b)[0]),
            "rel_error": float(np.linalg.norm(a - b) / np.linalg.norm(b))}


def log_rows(store_path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    s = hydra_nb.open_store(str(store_path))
    n = int(s.meta["committed"]["rows"])
    g = s.group
    return np.asarray(g["log/step"][:n]), np.asarray(g["log/sample"][:n]), np.asarray(g["log/grad"][:n])


def run_model(name: str, args, tmp: Path) -> tuple[dict, list[dict]]:
    model_cls = MODELS[name]
    x_tr, y_tr, x_te, y_te = load_digits(dtype=DT)
    data = (x_tr[:args.n_train], y_tr[:args.n_train])
    xq, yq = x_te[:args.n_test], y_te[:args.n_test]
    g = torch.Generator().manual_seed(args.data_seed)
    order = [[p[i:i + args.batch_size].tolist() for i in range(0, args.n_train, args.batch_size)]
             for p in (torch.randperm(args.n_train, generator=g) for _ in range(args.epochs))]
    n_params = count_parameters(model_cls())
    print(f"\n== {name}: {n_params:,} parameters, {args.n_train} train samples, {args.epochs} epochs, "
          f"batch {args.batch_size}, {args.n_test} test points", flush=True)

    times, C, rows, finals = {}, {}, {}, {}
    theta0 = {n: p.detach().clone() for n, p in fresh(model_cls, args.train_seed).named_parameters()}
    plain_s = []
    for _ in range(args.repeats):
        m, s, _ = train(fresh(model_cls, args.train_seed), data, order, args)
        plain_s.append(s)
    times["plain"] = min(plain_s)
    plain_state = {k: v.clone() for k, v in m.state_dict().items()}
    subset = list(range(args.exact_samples))
    runs = {"fixed": dict(mode="fast", batchnorm="fixed"), "exact": dict(mode="fast", batchnorm="exact"),
            "exact mode (exact)": dict(mode="exact", batchnorm="exact", exact_indices=subset),
            "exact mode (fixed)": dict(mode="exact", batchnorm="fixed", exact_indices=subset)}
    for label, kw in runs.items():  # warm-up (one-time costs of torch.func and the store), not timed
        train(fresh(model_cls, args.train_seed), data, [order[0][:2]], args, epochs=1, store=str(tmp / "warm.zarr"),
              projection_dim=None, **kw)
    for label, kw in runs.items():
        path = tmp / f"{name}_{label.replace(' ', '_').replace('(', '').replace(')', '')}.zarr"
        seconds = []
        for _ in range(args.repeats if kw["mode"] == "fast" else 1):  # exact mode: too slow to repeat
            model, s, _ = train(fresh(model_cls, args.train_seed), data, order, args, store=str(path),
                                projection_dim=None, **kw)
            seconds.append(s)
        times[label] = s = min(seconds)
        same = all(torch.equal(plain_state[k], v) for k, v in model.state_dict().items())
        assert same, f"{label}: training with tracking differs from plain training"
        store = hydra_nb.open_store(str(path))
        C[label] = np.asarray(store.contributions(model, xq, yq), dtype=np.float64)
        if kw["mode"] == "fast":
            rows[label] = log_rows(path)
        finals[label] = model
        print(f"  {label}: {s:.1f} CPU s ({s / times['plain']:.1f}× plain)", flush=True)
    buffers = {n: b.detach().clone() for n, b in finals["fixed"].named_buffers()}
    start = time.process_time()
    C["autograd"], theta_T = unrolled(model_cls, theta0, data, order, args, buffers, xq, yq)
    times["autograd (reference)"] = time.process_time() - start
    live = dict(finals["fixed"].named_parameters())
    replay_err = max(float((theta_T[n] - live[n].detach()).abs().max()) for n in theta_T)
    print(f"  autograd through the unrolled loop: {times['autograd (reference)']:.1f} CPU s, "
          f"max |θ_T replay − θ_T| = {replay_err:.2g}", flush=True)

    (sf, if_, uf), (se, ie, ue) = rows["fixed"], rows["exact"]
    assert np.array_equal(sf, se) and np.array_equal(if_, ie)
    per_row = np.linalg.norm(uf - ue, axis=1) / np.maximum(np.linalg.norm(ue, axis=1), 1e-300)
    cos = (uf * ue).sum(1) / np.maximum(np.linalg.norm(uf, axis=1) * np.linalg.norm(ue, axis=1), 1e-300)
    injection = {"model": name, "n_params": n_params, "rows": len(ue),
                 "rel_error_all_rows": float(np.linalg.norm(uf - ue) / np.linalg.norm(ue)),
                 "rel_error_per_row_median": float(np.median(per_row)),
                 "rel_error_per_row_p90": float(np.quantile(per_row, 0.9)),
                 "cosine_median": float(np.median(cos)), "replay_max_abs_err": replay_err}
    table = []
    for label, ref in (("fixed", "exact"), ("fixed", "autograd"), ("exact", "autograd"),
                       ("exact mode (fixed)", "autograd"), ("exact mode (exact)", "autograd")):
        a, b = C[label], C[ref]
        cols = "all"
        if a.shape != b.shape:  # exact mode: its tracked subset
            b, cols = b[:, subset], f"first {len(subset)}"
        table.append({"model": name, "contributions of": label, "vs": ref, "train samples": cols, **compare(a, b)})
    cost = [{"model": name, "run": k + (f" ({len(subset)} samples)" if k.startswith("exact mode") else ""),
             "cpu_seconds": v, "× plain": v / times["plain"]} for k, v in times.items()]
    return {"injection": injection, "cost": cost}, table


def cost_scaling(name: str, args, tmp: Path) -> list[dict]:
    """CPU time of one epoch over the whole digits training set, plain and with each choice, per batch size."""
    model_cls = MODELS[name]
    x_tr, y_tr, _, _ = load_digits(dtype=DT)
    data, n = (x_tr, y_tr), len(y_tr)
    out = []
    for B in args.cost_batch_sizes:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(args.data_seed)).tolist()
        order = [[perm[i:i + B] for i in range(0, n - B + 1, B)]]  # whole batches only
        row = {"model": name, "batch": B, "steps": len(order[0])}
        for label, kw in (("plain", {}), ("fixed", dict(batchnorm="fixed")), ("exact", dict(batchnorm="exact"))):
            extra = dict(store=str(tmp / "cost.zarr"), projection_dim=None, **kw) if kw else {}
            if kw:  # warm-up, not timed
                train(fresh(model_cls, args.train_seed), data, [order[0][:2]], args, epochs=1, **extra)
            row[f"{label}_cpu_s"] = min(train(fresh(model_cls, args.train_seed), data, order, args, epochs=1,
                                              **extra)[1] for _ in range(args.repeats if not kw else 2))
        row["fixed × plain"] = row["fixed_cpu_s"] / row["plain_cpu_s"]
        row["exact × plain"] = row["exact_cpu_s"] / row["plain_cpu_s"]
        row["exact / fixed"] = row["exact_cpu_s"] / row["fixed_cpu_s"]
        out.append(row)
        print(f"  cost, batch {B}: fixed {row['fixed × plain']:.1f}× plain, exact {row['exact × plain']:.1f}× plain",
              flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI smoke run: 64 samples, 1 epoch, BNCNN only")
    ap.add_argument("--models", nargs="+", default=None, choices=list(MODELS))
    ap.add_argument("--n-train", type=int, default=None, help="training samples (default 256)")
    ap.add_argument("--n-test", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=None, help="default 3")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--exact-samples", type=int, default=None, help="samples tracked by exact mode (default 32)")
    ap.add_argument("--cost-batch-sizes", type=int, nargs="*", default=None,
                    help="batch sizes of the cost scaling runs, one epoch over all 1,438 training samples "
                         "(default 32 128; --quick: none)")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--repeats", type=int, default=5,
                    help="timed runs of plain training and of fast mode (the fastest counts; exact mode runs once)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: CPU times are steadier on a shared machine)")
    ap.add_argument("--train-seed", type=int, default=0)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.models = args.models or (["BNCNN"] if args.quick else list(MODELS))
    args.n_train = args.n_train or (64 if args.quick else 256)
    args.exact_samples = min(args.n_train, args.exact_samples or (8 if args.quick else 32))
    if args.cost_batch_sizes is None:
        args.cost_batch_sizes = [] if args.quick else [32, 128]
    args.epochs = args.epochs or (1 if args.quick else 3)
    args.out = args.out or ("batchnorm_error_quick" if args.quick else "batchnorm_error")

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    machine = common.machine_info("cpu")
    print(f"machine: {machine['cpu_model']}, {machine['cpu_count']} cores, torch {machine['torch_version']}, "
          f"{machine['torch_threads']} threads")
    load = common.LoadMeter()
    tmp = Path(tempfile.mkdtemp(prefix="hydra_bn_"))
    results, tables, scaling = [], [], []
    try:
        for name in args.models:
            res, table = run_model(name, args, tmp)
            results.append(res)
            tables += table
            scaling += cost_scaling(name, args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    wall = time.perf_counter() - start
    other = load.read()["foreign_cpu_share"]
    common.print_table([r["injection"] for r in results], digits=4,
                       title="Injections u_t(i): fixed statistics vs batch-coupled (same rows)")
    common.print_table(tables, digits=4, title="Contributions C[test, train] (all pairs)")
    common.print_table([c for r in results for c in r["cost"]], digits=2,
                       title="Cost: CPU time of the whole training run, this process (plain and fast mode: fastest "
                             "of --repeats)")
    if scaling:
        common.print_table(scaling, digits=2, title="Cost scaling: one epoch over all training samples, CPU time "
                                                    "(plain: fastest of --repeats, tracked: fastest of 2)")
    print(f"\nother processes used {100 * (other or 0):.0f}% of the machine during the run")
    print(f"wall time {wall:.1f} s")
    common.write_json(args.out, {"benchmark": "batchnorm_error", "machine": machine, "config": vars(args),
                                 "wall_seconds": wall, "foreign_cpu_share": other, "results": results,
                                 "contributions": tables, "cost_scaling": scaling})
    return 0


if __name__ == "__main__":
    sys.exit(main())
