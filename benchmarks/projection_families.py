"""Which random projection keeps HYDRA contributions best, at equal dimension?

Trains LeNet5 on 28×28 digits for 4 epochs (SGD lr 0.05, momentum 0.9, batch 64) under
``hydra_nb.track(projection_dim=None)``, reads the full-dimensional hypergradients h_T of all
training samples and the gradients of 32 test points, then projects both with each candidate
family and reports the Pearson correlation of projected with exact contributions −⟨g, h⟩
(mean ± std over 3 seeds). Families, each with one block per parameter (the dimensions per
block given by an allocation rule):

* ``kronecker``  P_out·G·P_inᵀ with Gaussian factors (LoGra-style; hydra_nb's first version)
* ``gaussian``   a dense Gaussian per block
* ``countsketch`` a CountSketch per block (fully random hash)
* ``tensorsketch`` a TensorSketch-structured CountSketch per block (hydra_nb's projection)
* ``global``     one dense Gaussian over all parameters (not usable by hydra_nb: it mixes parameter
  groups whose hyperparameters differ; reported as a bound)

and, for ``tensorsketch``, allocations ∝ numel^p for p in 0, 0.25, 0.4, 0.5, 0.75, 1.

    python benchmarks/projection_families.py [--quick]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import hydra_nb  # noqa: E402
from hydra_nb.examples import LeNet5, load_digits  # noqa: E402
from hydra_nb.projection import _smooth_below  # noqa: E402


def allocate(numels, k, power, small=16):
    keep = [n <= small for n in numels]
    budget = k - sum(n for n, kp in zip(numels, keep) if kp)
    changed = True
    while changed:
        changed = False
        rest = [i for i in range(len(numels)) if not keep[i]]
        w = sum(numels[i] ** power for i in rest)
        for i in sorted(rest, key=lambda i: numels[i]):
            if numels[i] <= budget * numels[i] ** power / w:
                keep[i], budget, changed = True, budget - numels[i], True
                break
    rest = [i for i in range(len(numels)) if not keep[i]]
    w = sum(numels[i] ** power for i in rest)
    return [n if keep[i] else _smooth_below(max(1, int(budget * n ** power / w))) for i, n in enumerate(numels)]


def project(M, slots, dims, family, seed):
    g = torch.Generator().manual_seed(seed)
    parts = []
    for s, kp in zip(slots, dims):
        X = M[:, s.offset:s.offset + s.numel]
        if kp >= s.numel:
            parts.append(X)
            continue
        if family == "gaussian":
            parts.append(X @ (torch.randn(s.numel, kp, generator=g) / math.sqrt(kp)))
        elif family == "kronecker":
            ko = min(max(int(round(math.sqrt(kp * s.rows / s.cols))), 1), s.rows)
            ki = min(max(kp // ko, 1), s.cols)
            Po = torch.randn(ko, s.rows, generator=g) / math.sqrt(ko)
            Pi = torch.randn(ki, s.cols, generator=g) / math.sqrt(ki)
            parts.append((Po @ X.reshape(-1, s.rows, s.cols) @ Pi.T).reshape(X.shape[0], -1))
        else:
            if family == "tensorsketch":
                h1, h2 = torch.randint(0, kp, (s.rows,), generator=g), torch.randint(0, kp, (s.cols,), generator=g)
                s1 = torch.randint(0, 2, (s.rows,), generator=g) * 2 - 1
                s2 = torch.randint(0, 2, (s.cols,), generator=g) * 2 - 1
                idx = ((h1[:, None] + h2[None, :]) % kp).reshape(-1)
                sign = (s1[:, None] * s2[None, :]).reshape(-1).float()
            else:
                idx = torch.randint(0, kp, (s.numel,), generator=g)
                sign = (torch.randint(0, 2, (s.numel,), generator=g) * 2 - 1).float()
            parts.append(torch.zeros(X.shape[0], kp).index_add_(1, idx, X * sign))
    return torch.cat(parts, 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 epoch, 8 test points, 1 seed, k=1024 only")
    args = ap.parse_args(argv)
    epochs, n_test, seeds, ks = (1, 8, [0], [1024]) if args.quick else (4, 32, [0, 1, 2], [256, 1024, 4096])
    start = time.perf_counter()
    common.seed_everything(0)
    x, y, xt, yt = load_digits(image_size=28)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, generator=common.generator(0))
    model = LeNet5()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with tempfile.TemporaryDirectory() as tmp:
        with hydra_nb.track(model, loader, store=Path(tmp) / "full.zarr", optimizer=opt, projection_dim=None):
            for _ in range(epochs):
                for xb, yb in loader:
                    opt.zero_grad()
                    F.cross_entropy(model(xb), yb).backward()
                    opt.step()
        store = hydra_nb.open_store(Path(tmp) / "full.zarr")
        H = torch.from_numpy(store.hypergradients()).float()
        G = store.test_gradients(model, xt[:n_test], yt[:n_test]).float()
        slots = store.layout.slots
    exact = (-(G @ H.T)).numpy().ravel()
    numels = [s.numel for s in slots]
    rows = []

    def evaluate(family, k, power):
        dims = allocate(numels, k, power)
        cs = []
        for seed in seeds:
            if family == "global":
                R = torch.randn(G.shape[1], k, generator=torch.Generator().manual_seed(seed)) / math.sqrt(k)
                est = -((G @ R) @ (H @ R).T)
            else:
                est = -(project(G, slots, dims, family, seed) @ project(H, slots, dims, family, seed).T)
            cs.append(np.corrcoef(est.numpy().ravel(), exact)[0, 1])
        m, s = common.mean_std(cs)
        rows.append({"family": family, "allocation": "-" if family == "global" else f"numel^{power}", "k": k,
                     "dim": k if family == "global" else sum(dims), "pearson": m, "pearson_std": s})

    for k in ks:
        for family in ("kronecker", "gaussian", "countsketch", "tensorsketch", "global"):
            evaluate(family, k, 0.5)
        for power in (0.0, 0.25, 0.4, 0.75, 1.0):
            evaluate("tensorsketch", k, power)
    common.print_table(rows, title=f"LeNet5, {epochs} epochs, {n_test} test × {H.shape[0]} train, seeds {seeds}")
    print(f"wall time {time.perf_counter() - start:.1f} s")
    path = common.write_json("projection_families" + ("_quick" if args.quick else ""),
                             {"machine": common.machine_info(), "rows": rows, "epochs": epochs, "n_test": n_test})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
