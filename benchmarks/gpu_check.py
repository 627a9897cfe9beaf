"""Correctness on CUDA: the same tracked run on the GPU and on the CPU must give the same numbers.

Trains SmallCNN on 8×8 digits in float64 (so that the comparison is not limited by float32
round-off; cuDNN is put in deterministic mode) for 2 epochs, SGD (lr 0.05, momentum 0.9, weight
decay 5e-4), under ``hydra_nb.track`` once on ``cuda`` and once on ``cpu``, in five configurations:
fast mode at full dimension, fast mode projected to k = 1024, exact mode for 32 samples, and exact
answers by replay (all samples) from a fast store and from a replay-only recording. Reports
the relative difference of the contribution matrices (20 test points × tracked samples); the check
fails (exit status 1) above ``--rtol``. Also reports the final-parameter difference, which bounds
what tracking could reproduce.

    python benchmarks/gpu_check.py            # needs a CUDA device; ~1 min
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
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import hydra_nb  # noqa: E402
from hydra_nb.examples import SmallCNN, load_digits  # noqa: E402

CONFIGS = {  # name: (track's options, the query's mode; "exact" on a fast or replay store is the replay)
    "fast, full dim": (dict(mode="fast", projection_dim=None), None),
    "fast, k=1024": (dict(mode="fast", projection_dim=1024), None),
    "exact, 32 samples": (dict(mode="exact", projection_dim=None, exact_indices=np.arange(0, 1438, 45)[:32]), None),
    "exact by replay, fast store": (dict(mode="fast", projection_dim=1024), "exact"),
    "exact by replay, replay-only recording": (dict(mode="replay"), "exact"),
}


def run(device: str, cfg: tuple, tmp: Path, x, y, xq, yq, epochs: int):
    cfg, query_mode = cfg
    torch.manual_seed(0)
    model = SmallCNN().to(device=device, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, generator=common.generator(0))
    store = tmp / f"{device}.zarr"
    t0 = time.perf_counter()
    with hydra_nb.track(model, loader, store=str(store), optimizer=opt, overwrite=True, **cfg) as tracker:
        for _ in range(epochs):
            for xb, yb in loader:
                xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
                opt.zero_grad()
                F.cross_entropy(model(xb), yb).backward()
                opt.step()
    common.sync(device)
    secs = time.perf_counter() - t0
    if tracker.failure is not None:
        raise RuntimeError(f"tracking failed on {device}: {tracker.failure!r}")
    query = {} if query_mode is None else {"mode": query_mode, "train_data": (x.to(device), y.to(device))}
    c = hydra_nb.open_store(store).contributions(model, xq.to(device), yq.to(device), progress=False, **query)
    theta = torch.cat([p.detach().cpu().reshape(-1) for p in model.parameters()])
    return c, theta, secs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rtol", type=float, default=1e-6)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: this check needs one (run it on a GPU machine)")
        return 2
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    x, y, xt, yt = load_digits(image_size=8, dtype=torch.float64)
    xq, yq = xt[:20], yt[:20]
    rows, ok = [], True
    tmp = Path(tempfile.mkdtemp(prefix="hydra_gpu_check_"))
    try:
        for name, cfg in CONFIGS.items():
            c_gpu, th_gpu, s_gpu = run("cuda", cfg, tmp, x, y, xq, yq, args.epochs)
            c_cpu, th_cpu, s_cpu = run("cpu", cfg, tmp, x, y, xq, yq, args.epochs)
            rel = float(np.linalg.norm(c_gpu - c_cpu) / np.linalg.norm(c_cpu))
            dth = float((th_gpu - th_cpu).norm() / th_cpu.norm())
            ok &= rel <= args.rtol
            rows.append({"configuration": name, "rel. diff contributions": rel, "rel. diff θ_T": dth,
                         "tracked s (cuda)": s_gpu, "tracked s (cpu)": s_cpu,
                         "verdict": "ok" if rel <= args.rtol else f"FAIL (> {args.rtol:g})"})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    common.print_table(rows, digits=3, title=f"CUDA vs CPU, SmallCNN float64, {args.epochs} epochs "
                                             f"({torch.cuda.get_device_name(0)})")
    common.write_json("gpu_check", {"benchmark": "gpu_check", "machine": common.machine_info("cuda"), "rows": rows,
                                    "ok": ok})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
