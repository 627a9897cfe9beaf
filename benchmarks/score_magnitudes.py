"""How large are the scores? Typical magnitudes of contributions and self-influence, in fast and exact mode.

The README's "How to read the scores" quotes these. Two runs, trained as the README's examples train:

* **digits**: the quickstart's SmallCNN (1,898 parameters) on scikit-learn's 8×8 digits, SGD lr 0.05,
  momentum 0.9, weight decay 1e-4, batch 32, 8 epochs; fast mode at k = 1024 for all 1,438 training samples,
  and, in a second run with the same seed and batch order, exact mode for 200 random training samples (their
  fast estimate is recorded in the same run);
* **breast cancer**: an MLP (30 → 16 → 2, 530 parameters) on scikit-learn's standardised breast-cancer table
  (450 training rows), SGD lr 0.05, momentum 0.9, batch 32, 6 epochs; exact mode for every training sample
  (and its fast estimate, full dimension).

For 100 test points (the breast-cancer table has 119) it reports the distribution of |contribution| over all
(test, training) pairs, the largest contribution per test point (its most helpful sample) and the most
negative (its most harmful one), the rank correlation between a test point's loss and its largest |c|,
self-influence over the training set, and the test loss for scale. Units: the loss's (nats, cross-entropy)
per unit of extra weight on a training sample.

    python benchmarks/score_magnitudes.py          # about a minute on two CPU cores
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import hydra_nb  # noqa: E402
from hydra_nb.examples import MLP, SmallCNN, load_digits  # noqa: E402

N_TEST = 100
N_EXACT = 200


def train(model, loader, opt, epochs, store, **track):
    with hydra_nb.track(model, loader, store=store, optimizer=opt, **track):
        for _ in range(epochs):
            model.train()
            for x, y in loader:
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
    return hydra_nb.open_store(store)


def summary(c: np.ndarray, losses: np.ndarray) -> dict:
    """Magnitudes of a (n_test, n_train) contribution matrix, and how a test point's largest |c| follows its loss."""
    a = np.abs(c)
    rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    return {"median |c|": float(np.median(a)), "p90 |c|": float(np.quantile(a, 0.9)),
            "p99 |c|": float(np.quantile(a, 0.99)), "max |c|": float(a.max()),
            "top helpful (median over tests)": float(np.median(c.max(1))),
            "top harmful (median over tests)": float(np.median(c.min(1))),
            "Spearman(test loss, max |c|)": float(np.corrcoef(rank(losses), rank(a.max(1)))[0, 1])}


def test_losses(store, model, x, y) -> np.ndarray:
    """Each test point's loss under the run's last checkpoint."""
    m = MLP(hidden=16, n_classes=2, n_inputs=30) if isinstance(model, MLP) else type(model)()
    store.load_params(m)
    with torch.no_grad():
        return F.cross_entropy(m.eval()(x), y, reduction="none").numpy()


def digits(root: Path) -> list[dict]:
    x_tr, y_tr, x_te, y_te = load_digits(image_size=8, seed=0)
    x_te, y_te = x_te[:N_TEST], y_te[:N_TEST]

    def run():
        torch.manual_seed(0)
        loader = DataLoader(TensorDataset(x_tr, y_tr), batch_size=32, shuffle=True, generator=common.generator(0))
        model = SmallCNN()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        return model, loader, opt

    model, loader, opt = run()
    fast = train(model, loader, opt, 8, root / "digits_fast.zarr", projection_dim=1024)
    picks = np.sort(np.random.default_rng(0).choice(len(y_tr), N_EXACT, replace=False))
    model_e, loader_e, opt_e = run()
    exact = train(model_e, loader_e, opt_e, 8, root / "digits_exact.zarr", mode="exact", projection_dim=None,
                  exact_indices=picks)
    c_fast_all = fast.contributions(model, x_te, y_te, progress=False)
    c_exact = exact.contributions(model_e, x_te, y_te, progress=False)
    c_fast = exact.contributions(model_e, x_te, y_te, mode="fast", progress=False)
    si_fast = fast.self_influence(model, (x_tr, y_tr), progress=False)
    si_exact = exact.self_influence(model_e, (x_tr, y_tr), progress=False)[picks]
    si_fast_picks = exact.self_influence(model_e, (x_tr, y_tr), mode="fast", progress=False)[picks]
    losses = test_losses(fast, model, x_te, y_te)
    loss = float(np.median(losses))
    return [
        {"run": "digits", "mode": "fast, k=1024", "samples": len(y_tr), **summary(c_fast_all, losses),
         "self-influence median": float(np.median(si_fast)), "self-influence max": float(si_fast.max()),
         "median test loss": loss},
        {"run": "digits", "mode": f"fast, full dim ({N_EXACT} samples)", "samples": N_EXACT, **summary(c_fast, losses),
         "self-influence median": float(np.median(si_fast_picks)), "self-influence max": float(si_fast_picks.max()),
         "median test loss": loss},
        {"run": "digits", "mode": f"exact ({N_EXACT} samples)", "samples": N_EXACT, **summary(c_exact, losses),
         "self-influence median": float(np.median(si_exact)), "self-influence max": float(si_exact.max()),
         "median test loss": loss},
    ]


def cancer(root: Path) -> list[dict]:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x = (data.data - data.data.mean(0)) / data.data.std(0)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(data.target)
    x_tr, y_tr, x_te, y_te = x[:450], y[:450], x[450:], y[450:]
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(x_tr, y_tr), batch_size=32, shuffle=True, generator=common.generator(0))
    model = MLP(hidden=16, n_classes=2, n_inputs=30)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    store = train(model, loader, opt, 6, root / "cancer.zarr", mode="exact", projection_dim=None)
    losses = test_losses(store, model, x_te, y_te)
    loss = float(np.median(losses))
    rows = []
    for mode in ("fast", "exact"):
        c = store.contributions(model, x_te, y_te, mode=mode, progress=False)
        si = store.self_influence(model, (x_tr, y_tr), mode=mode, progress=False)
        rows.append({"run": "breast cancer", "mode": f"{mode}, full dim" if mode == "fast" else mode,
                     "samples": len(y_tr), **summary(c, losses), "self-influence median": float(np.median(si)),
                     "self-influence max": float(si.max()), "median test loss": loss})
    return rows


def main() -> int:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="hydra_magnitudes_") as tmp:
        rows = digits(Path(tmp)) + cancer(Path(tmp))
    common.print_table(rows, digits=3, title="Typical magnitudes of contributions (nats per unit sample weight)")
    common.write_json("score_magnitudes", {"rows": rows, "machine": common.machine_info(),
                                            "git": common.git_revision()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
