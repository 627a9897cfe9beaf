"""The quickstart: train a small CNN on scikit-learn's digits under hydra_nb, and explain its mistakes.

    python -m hydra_nb.quickstart [--out runs/quickstart]            # the notebook, executed headless
    python -m hydra_nb.quickstart --script [--epochs 8]               # the same story as a plain script

By default it executes ``notebooks/01_quickstart.ipynb`` (of this repository) in a fresh kernel of
this interpreter, writes the executed notebook and an HTML export to ``--out``, and prints what the
notebook printed — the 5 training digits that helped a misclassified test digit most and the 5 that
hurt it most, exact (replayed), with the instant fast estimate beside them. ``--script`` (also used when the notebook is not there, e.g. a wheel install) trains
under ``hydra_nb.track`` directly, prints the same table for a few test digits and saves a figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import hydra_nb
from hydra_nb.examples import SmallCNN, load_digits


def train(out: Path, epochs: int, projection_dim: int, seed: int):
    torch.manual_seed(seed)
    x_tr, y_tr, x_te, y_te = load_digits(image_size=8, seed=seed)
    loader = DataLoader(TensorDataset(x_tr, y_tr), batch_size=32, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(loader))
    start = time.perf_counter()
    with hydra_nb.track(model, loader, store=out / "digits.zarr", optimizer=opt, mode="fast",
                        projection_dim=projection_dim, overwrite=True) as run:
        for epoch in range(epochs):
            model.train()
            for x, y in loader:  # the user's own loop, unchanged
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
                sched.step()
            model.eval()
            with torch.no_grad():
                acc = (model(x_te).argmax(1) == y_te).float().mean().item()
            print(f"epoch {epoch + 1}/{epochs}: test accuracy {acc:.3f}")
    seconds = time.perf_counter() - start
    print(f"trained and tracked {run.stats['steps']} steps in {seconds:.1f} s "
          f"({run.stats['tracking_seconds']:.1f} s in hydra_nb hooks)")
    return model, (x_tr, y_tr, x_te, y_te)


NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "01_quickstart.ipynb"


def run_notebook(path: Path, out: Path, timeout: int = 900) -> Path:
    """Execute a notebook headless in a kernel of this interpreter; write it executed and as HTML to ``out``.

    The notebook runs with ``out`` as its working directory (its stores land there). Everything its
    cells print is echoed to this terminal. Returns the executed notebook's path.
    """
    try:
        import nbclient
        import nbformat
        from nbconvert import HTMLExporter
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SystemExit(f"The quickstart notebook needs nbclient and nbconvert: pip install 'hydra_nb[examples]' ({exc})")
    out.mkdir(parents=True, exist_ok=True)
    nb = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory() as jupyter:
        # a kernel spec that runs *this* Python, so a fresh virtualenv needs no global Jupyter set-up
        spec = Path(jupyter) / "kernels" / "hydra-nb"
        spec.mkdir(parents=True)
        (spec / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python (hydra_nb quickstart)", "language": "python"}))
        env = {"JUPYTER_PATH": jupyter, "JUPYTER_RUNTIME_DIR": str(Path(jupyter) / "runtime")}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="hydra-nb",
                                             resources={"metadata": {"path": str(out)}})
            client.execute()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    executed = out / path.name
    nbformat.write(nb, executed)
    html, _ = HTMLExporter().from_notebook_node(nb)
    (out / path.with_suffix(".html").name).write_text(html, encoding="utf-8")
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream" and output.get("name") == "stdout":
                print(output["text"], end="" if output["text"].endswith("\n") else "\n")
    return executed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="folder for the outputs")
    parser.add_argument("--script", action="store_true", help="run the plain-script version instead of the notebook")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--dim", type=int, default=1024, help="projection dimension")
    parser.add_argument("--n-test", type=int, default=3, help="how many test digits to explain")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.script and NOTEBOOK.exists():
        start = time.perf_counter()
        executed = run_notebook(NOTEBOOK, args.out.resolve())
        print(f"\nexecuted {NOTEBOOK.name} in {time.perf_counter() - start:.0f} s: {executed} and "
              f"{executed.with_suffix('.html')}")
        return 0

    model, (x_tr, y_tr, x_te, y_te) = train(args.out, args.epochs, args.dim, args.seed)
    store = hydra_nb.open_store(args.out / "digits.zarr")
    print(store)

    model.eval()
    with torch.no_grad():
        pred = model(x_te).argmax(1)
    wrong = torch.nonzero(pred != y_te).flatten().tolist()
    right = torch.nonzero(pred == y_te).flatten().tolist()
    chosen = (wrong + right)[: args.n_test]
    # the answer: exact for every training digit, by replaying the run backward; the fast preview beside it
    start = time.perf_counter()
    scores = store.contributions(model, x_te[chosen], y_te[chosen], mode="exact", train_data=(x_tr, y_tr))
    print(f"exact contributions of {scores.shape[1]:,} training digits to {len(chosen)} test digits in "
          f"{time.perf_counter() - start:.1f} s (one replay of the run)")
    fast = store.contributions(model, x_te[chosen], y_te[chosen])

    rows = []
    for j, t in enumerate(chosen):
        order = np.argsort(scores[j])
        helpful, harmful = order[::-1][:5], order[:5]
        print(f"\ntest digit #{t}: label {int(y_te[t])}, predicted {int(pred[t])}")
        print(f"  {'most helpful (exact)':>40} | {'most harmful (exact)':>40}")
        print(f"  {'train idx':>9} {'label':>5} {'exact':>11} {'fast':>11} | {'train idx':>9} {'label':>5} "
              f"{'exact':>11} {'fast':>11}")
        for a, b in zip(helpful, harmful):
            print(f"  {a:>9d} {int(y_tr[a]):>5d} {scores[j, a]:>+11.3e} {fast[j, a]:>+11.3e} | "
                  f"{b:>9d} {int(y_tr[b]):>5d} {scores[j, b]:>+11.3e} {fast[j, b]:>+11.3e}")
        rho = np.corrcoef(np.argsort(np.argsort(fast[j])), np.argsort(np.argsort(scores[j])))[0, 1]
        print(f"  fast preview vs exact: Spearman {rho:.2f} over all training digits")
        rows.append((t, helpful, harmful))

    figure = args.out / "quickstart.png"
    _figure(rows, scores, x_tr, y_tr, x_te, y_te, pred, figure)
    print(f"\nfigure: {figure}")
    return 0


def _figure(rows, scores, x_tr, y_tr, x_te, y_te, pred, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 11, figsize=(13, 1.6 * len(rows) + 0.6), squeeze=False)
    for r, (t, helpful, harmful) in enumerate(rows):
        ax = axes[r, 0]
        ax.imshow(x_te[t, 0], cmap="gray_r")
        ax.set_title(f"test #{t}\ny={int(y_te[t])} ŷ={int(pred[t])}", fontsize=8, color="tab:red" if pred[t] != y_te[t] else "k")
        for k, (idx, kind) in enumerate([(i, "helpful") for i in helpful] + [(i, "harmful") for i in harmful]):
            ax = axes[r, k + 1]
            ax.imshow(x_tr[idx, 0], cmap="Greens" if kind == "helpful" else "Reds")
            ax.set_title(f"#{idx} y={int(y_tr[idx])}\n{scores[r, idx]:+.1e}", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("HYDRA contributions: 5 most helpful (green) and 5 most harmful (red) training digits", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
