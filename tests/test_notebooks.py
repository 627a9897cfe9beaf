"""The teaching notebooks run end to end: every notebook in notebooks/ is executed with nbclient.

Each notebook runs in a fresh kernel of *this* interpreter (a kernel spec written to a temporary
folder, so a machine whose only Python is the venv needs no global Jupyter setup), with
``HYDRA_NB_QUICK=1`` (notebooks may train for fewer epochs, never compute anything different) and a
temporary working directory (stores land in ``<tmp>/runs/``). A cell that raises fails the test; the
notebooks' own ``assert`` cells are checks of the package.

The committed notebooks must also be clean: kernel spec ``python3`` and no outputs.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest

try:
    import ipykernel  # noqa: F401  (the kernel the notebooks run in)
    import nbclient
    import nbformat
except ImportError as exc:  # fail these tests loudly (never skip them), and let the rest of the suite run
    nbclient = nbformat = None
    MISSING = f"the notebook tests need nbformat, nbclient and ipykernel in the test environment ({exc})"
else:
    MISSING = None

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
KERNEL_NAME = "hydra-nb-tests"
CELL_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def kernel_path(tmp_path_factory) -> Path:
    """A Jupyter data folder holding one kernel spec that runs this interpreter."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL_NAME
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-Xfrozen_modules=off", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python {sys.version_info.major}.{sys.version_info.minor} (hydra_nb tests)",
        "language": "python",
    }))
    return root


def _require_jupyter():
    if MISSING:
        pytest.fail(MISSING, pytrace=False)


def test_notebooks_exist():
    assert NOTEBOOKS, "no notebooks found in notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_clean(path):
    """Committed without outputs or execution counts, and with the python3 kernel spec."""
    _require_jupyter()
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", f"{path.name}: kernelspec must be python3"
    dirty = [i for i, cell in enumerate(nb.cells)
             if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not dirty, f"{path.name}: cells {dirty} have outputs; strip them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, kernel_path, tmp_path, monkeypatch):
    _require_jupyter()
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_path))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(kernel_path / "runtime"))
    monkeypatch.setenv("HYDRA_NB_QUICK", "1")
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / ".ipython"))
    monkeypatch.delenv("MPLBACKEND", raising=False)   # the kernel's inline backend, as in Jupyter
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")

    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name=KERNEL_NAME, timeout=CELL_TIMEOUT_S,
                                     resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as exc:
        pytest.fail(f"{path.name}: a cell failed\n" + re.sub(r"\x1b\[[0-9;]*m", "", str(exc)), pytrace=False)
    print(f"{path.name}: executed in {time.perf_counter() - start:.1f} s")


# -- re-running: the same notebook twice (Run All in a new kernel) replaces its own run -------------
SETUP = """\
import torch, torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
%load_ext hydra_nb
torch.manual_seed(0)
x, y = torch.randn(48, 5), torch.randint(0, 3, (48,))
loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
model_e = nn.Linear(5, 3)  # a second model, defined before the training cell: the cell names its own"""

TRAIN = """\
%%hydra_track --store runs/rerun.zarr --dim 16
for epoch in range({epochs}):
    for xb, yb in loader:
        opt.zero_grad(); F.cross_entropy(model(xb), yb).backward(); opt.step()"""

CHECK = """assert hydra_store.steps == {steps} and hydra_store.status == "complete", hydra_store"""


def _execute(nb, kernel_path, cwd, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_path))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(kernel_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(cwd / ".ipython"))
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)  # as nbclient runs it: the kernel knows no notebook path
    client = nbclient.NotebookClient(nb, kernel_name=KERNEL_NAME, timeout=CELL_TIMEOUT_S,
                                     resources={"metadata": {"path": str(cwd)}})
    client.execute()
    return nb


def _notebook(*cells):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    return nb


def _outputs(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs)


def test_a_notebook_runs_twice_without_overwrite_and_another_is_refused(kernel_path, tmp_path, monkeypatch):
    _require_jupyter()
    notebook = _notebook(SETUP, TRAIN.format(epochs=2), CHECK.format(steps=6))
    first = _execute(notebook, kernel_path, tmp_path, monkeypatch)
    assert "replaced" not in _outputs(first.cells[1])
    second = _execute(nbformat.from_dict(first), kernel_path, tmp_path, monkeypatch)  # Run All again, a new kernel
    assert "hydra_nb: replaced the earlier run in 'runs/rerun.zarr' (fast mode, 6 steps, complete): this same " \
           "cell made it." in _outputs(second.cells[1])
    # another notebook's cell into the same store: refused, the run stays
    import hydra_nb

    run_id = hydra_nb.open_store(tmp_path / "runs" / "rerun.zarr").meta["run_id"]
    other = _notebook(SETUP, TRAIN.format(epochs=1), CHECK.format(steps=3))
    with pytest.raises(nbclient.exceptions.CellExecutionError) as failure:
        _execute(other, kernel_path, tmp_path, monkeypatch)
    message = re.sub(r"\x1b\[[0-9;]*m", "", str(failure.value))
    assert "'runs/rerun.zarr' already holds a hydra_nb run (fast mode, 6 steps, complete), made by another cell" \
        in message and "--overwrite" in message
    assert hydra_nb.open_store(tmp_path / "runs" / "rerun.zarr").meta["run_id"] == run_id
