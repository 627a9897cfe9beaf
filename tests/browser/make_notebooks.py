"""Writes the notebooks the browser tests open (run once after editing; the .ipynb files are committed).

    python tests/browser/make_notebooks.py
"""

from pathlib import Path

import nbformat

HERE = Path(__file__).parent / "notebooks"

SETUP = """\
import time
import torch, torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
import hydra_nb
from hydra_nb.examples import SmallCNN, load_digits

torch.manual_seed(0)
x_tr, y_tr, x_te, y_te = load_digits(seed=0)
loader = DataLoader(TensorDataset(x_tr, y_tr), batch_size=32, shuffle=True,
                    generator=torch.Generator().manual_seed(0))
model = SmallCNN()
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)"""

TRAIN = """\
with hydra_nb.track(model, loader, store="runs/digits.zarr", optimizer=opt, projection_dim=256, overwrite=True):
    for epoch in range(4):
        for x, y in loader:
            opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()
store = hydra_nb.open_store("runs/digits.zarr")
store"""

EXPLORER = """\
explorer = hydra_nb.explore(store, model, (x_te, y_te), (x_tr, y_tr), k=8)
explorer"""

LIVE_WIDGET = """\
%load_ext hydra_nb
live = hydra_nb.explore("runs/live.zarr", model, (x_te, y_te), (x_tr, y_tr))
live.live(every=15, pin=[0, 1])
live"""

LIVE_TRAIN = """\
%%hydra_track --store runs/live.zarr --dim 256 --checkpoint-every 15
for epoch in range(4):
    for x, y in loader:
        opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()
        time.sleep(0.03)  # slow enough for the test to watch the live panel while the cell runs"""

TABULAR_SETUP = """\
import pandas as pd
import torch, torch.nn.functional as F
from sklearn.datasets import load_breast_cancer
from torch.utils.data import DataLoader, TensorDataset
import hydra_nb
from hydra_nb.examples import MLP
%load_ext hydra_nb

torch.manual_seed(0)
data = load_breast_cancer()
features = pd.DataFrame(data.data, columns=data.feature_names)
features = (features - features.mean()) / features.std()           # standardised, still named
labels = pd.Series(data.target, name="diagnosis")
train_x, test_x, train_y, test_y = features[:450], features[450:], labels[:450], labels[450:]
loader = DataLoader(TensorDataset(torch.tensor(train_x.to_numpy(), dtype=torch.float32),
                                  torch.tensor(train_y.to_numpy())),
                    batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
model = MLP(hidden=16, n_classes=2, n_inputs=30)
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)"""

TABULAR_TRAIN = """\
%%hydra_track --store runs/cancer.zarr --dim 256
for epoch in range(6):
    for x, y in loader:
        opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()"""

TABULAR_EXPLORER = """\
explorer = hydra_nb.explore(hydra_store, model, (test_x, test_y), (train_x, train_y), k=6,
                            class_names=list(data.target_names))
explorer"""

MARK = """print("HYDRA-DONE")"""


def notebook(name, *cells):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
    nb.metadata["language_info"] = {"name": "python"}
    # cell ids fixed by notebook and position: rewriting a notebook changes only what changed
    nb.cells = [nbformat.v4.new_code_cell(c, id=f"{name}-{i}") for i, c in enumerate(cells)]
    return nb


def main():
    HERE.mkdir(exist_ok=True)
    nbformat.write(notebook("explorer", SETUP, TRAIN, EXPLORER, MARK), HERE / "explorer.ipynb")
    nbformat.write(notebook("live", SETUP, LIVE_WIDGET, LIVE_TRAIN, MARK), HERE / "live.ipynb")
    nbformat.write(notebook("tabular", TABULAR_SETUP, TABULAR_TRAIN, TABULAR_EXPLORER, MARK), HERE / "tabular.ipynb")


if __name__ == "__main__":
    main()
