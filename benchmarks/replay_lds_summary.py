"""One table from several ``replay_lds.py`` runs (a setting sweep): per run, model and removal cell, the
training setting, how well it trained (test accuracy on the whole digits test set of the model trained on
all samples, retrained here from the run's config: the same initialisation and batches as the tracked run),
replay-exact's LDS and the best peer's.

    python benchmarks/replay_lds_summary.py benchmarks/out/replay_lds_sweep_*.json benchmarks/out/replay_lds.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import field_common as fc  # noqa: E402

REPLAY = "HYDRA replay-exact"
NOT_PEERS = (REPLAY, "random", "ceiling", "ceiling, noise-free predictor")


def mean_std(vals) -> str:
    vals = [v for v in vals if v is not None and not math.isnan(v)]
    if not vals:
        return "–"
    return f"{np.mean(vals):.3f} ± {np.std(vals, ddof=1) if len(vals) > 1 else 0.0:.3f}"


def test_accuracy(model: str, seed: int, c: dict) -> float:
    x, y, xt, yt = fc.digits(model)
    cfg = argparse.Namespace(lr=c["lr"], momentum=c["momentum"], batch_size=c["batch_size"], epochs=c["epochs"],
                             data_seed=seed)
    m = fc.train_plain(fc.make_model(model, seed), x, y, cfg)
    with torch.no_grad():
        return float((m(xt).argmax(1) == yt).double().mean())


def noise_free(per_seed, cell) -> str:
    """The noise-free predictor's ceiling (replay_lds.py's row); for runs made before it was recorded,
    √ of the mean two-retrain LDS (marked ≈; an upper estimate of the mean of the √s)."""
    vals = [r["lds"][cell].get("ceiling, noise-free predictor") for r in per_seed]
    if all(v is not None for v in vals):
        return mean_std(vals)
    raw = [r["lds"][cell].get("ceiling") for r in per_seed]
    if any(v is None for v in raw):
        return "–"
    return "≈ " + mean_std([math.sqrt(max(v, 0.0)) for v in raw])


def fraction(cell: str) -> float:
    return float(cell.split()[1].rstrip("%"))


def rows_of(path: Path, n_train: int) -> list[dict]:
    d = json.loads(path.read_text())
    c = d["config"]
    rows = []
    for model, per_seed in d["results"].items():
        steps = c["epochs"] * math.ceil(n_train / c["batch_size"])
        acc = [test_accuracy(model, r["seed"], c) for r in per_seed]
        for cell in sorted(per_seed[0]["lds"], key=lambda k: (k.split()[0] != "zero", fraction(k))):
            peers = [k for k in per_seed[0]["lds"][cell] if not k.startswith("_") and k not in NOT_PEERS]
            peer_mean = {k: np.mean([r["lds"][cell][k] for r in per_seed]) for k in peers}
            best = max(peer_mean, key=peer_mean.get)
            rows.append({
                "model": model, "lr": c["lr"], "momentum": c["momentum"], "batch": c["batch_size"],
                "epochs": c["epochs"], "steps": steps, "seeds": len(per_seed),
                "test acc": mean_std(acc),
                "cell": cell, "ε": c.get("down_weight", 1.0) if cell.startswith("zero") else "–",
                "replay-exact": mean_std([r["lds"][cell][REPLAY] for r in per_seed]),
                "best peer": f"{peer_mean[best]:.3f} ({best})",
                "slope actual/replay": mean_std([r["lds"][cell].get("_slope actual/replay") for r in per_seed]),
                "ceiling": mean_std([r["lds"][cell].get("ceiling") for r in per_seed]),
                "noise-free ceiling": noise_free(per_seed, cell),
                "file": path.name,
            })
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--n-train", type=int, default=1438, help="training samples (for the step count)")
    args = ap.parse_args(argv)
    torch.set_default_dtype(torch.float64)
    rows = [r for f in args.files for r in rows_of(f, args.n_train)]
    rows.sort(key=lambda r: (r["model"], r["lr"] / (1 - r["momentum"]), r["steps"], -r["batch"], r["file"]))  # stable sort
    common.print_table(rows, title="replay_lds.py runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
