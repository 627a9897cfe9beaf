"""``%%hydra_track`` and ``%hydra_status`` driven through a real ``InteractiveShell``."""

import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from traitlets.config import Config

import hydra_nb
import hydra_nb.magic
from hydra_nb.magic import HydraMagics

N, D_IN, C = 40, 5, 3

# the user's own loop, as it would stand in a cell (2 epochs of 5 batches: 10 steps)
LOOP = """\
step = 0
for epoch in range(2):
    for x, y in loader:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        step += 1
        last_loss = loss.item()
"""

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def plain(text: str) -> str:
    return ANSI.sub("", text)


def dataset(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(N, D_IN, generator=g, dtype=dtype), torch.randint(0, C, (N,), generator=g))


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, 6), nn.Tanh(), nn.Linear(6, C))


def objects(seed=0, dtype=torch.float32):
    """A fresh model, loader and optimizer (same seed, same data, same order: same training)."""
    model = mlp(seed).to(dtype)
    loader = DataLoader(dataset(dtype), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return {"model": model, "loader": loader, "opt": opt}


@pytest.fixture(scope="session")
def shell(tmp_path_factory):
    os.environ.setdefault("IPYTHONDIR", str(tmp_path_factory.mktemp("ipython")))
    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    config.InteractiveShell.colors = "nocolor"
    ip = InteractiveShell.instance(config=config)
    ip.run_line_magic("load_ext", "hydra_nb")
    return ip


@pytest.fixture
def ip(shell, tmp_path, monkeypatch):
    """The shell with an empty namespace (torch and F imported), fresh magic state, cwd in tmp_path."""
    monkeypatch.chdir(tmp_path)
    shell.reset(new_session=False)
    shell.register_magics(HydraMagics)
    shell.user_ns.update(torch=torch, F=F, nn=nn)
    yield shell
    shell.reset(new_session=False)


def cell(store="runs/a.zarr", flags="", body=LOOP):
    return f"%%hydra_track --store {store} {flags}\n{body}"


def usage_error(ip, text) -> str:
    r = ip.run_cell(text)
    assert not r.success
    assert isinstance(r.error_in_exec, UsageError), repr(r.error_in_exec)
    return str(r.error_in_exec)


# -- registration and auto-detection ----------------------------------------------------------

def test_load_ext_registers_both_magics(shell):
    assert "hydra_nb" in shell.extension_manager.loaded
    assert "hydra_track" in shell.magics_manager.magics["cell"]
    assert "hydra_status" in shell.magics_manager.magics["line"]


def test_auto_detection_trains_tracks_and_binds_the_store(ip, capsys, monkeypatch):
    monkeypatch.setattr(hydra_nb.magic, "PROGRESS_DELAY_S", 0.0)  # the bar at once, however quick the run
    objs = objects()
    # a parameterless loss module and a second name for the same model are not ambiguities
    ip.user_ns.update(objs, criterion=nn.CrossEntropyLoss(), net=objs["model"], test_x=torch.zeros(2, D_IN))
    r = ip.run_cell(cell(flags="--dim 16"))
    assert r.success, r.error_in_exec
    store = ip.user_ns["hydra_store"]
    assert isinstance(store, hydra_nb.Store)
    assert store.status == "complete" and store.steps == 10
    assert list(store.checkpoint_steps) == [0, 5, 10]
    out = capsys.readouterr()
    assert repr(store) in out.out
    assert "Bound to hydra_store" in out.out
    # the progress display (tqdm's text bar outside a notebook) ends with the full line
    assert "10step" in out.err and "samples/s" in out.err and "overhead" in out.err and "kB written" in out.err
    # hooks are gone afterwards
    assert type(objs["loader"]) is DataLoader and "zero_grad" not in vars(objs["opt"])


def test_text_progress_when_tqdm_is_missing(ip, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import fails
    ip.user_ns.update(objects())
    assert ip.run_cell(cell(flags="--dim 16")).success
    out = capsys.readouterr().out
    # speeds are formatted with thousands separators ("1,279 samples/s" on a fast machine)
    assert re.search(r"hydra_track runs/a\.zarr: 10 steps, \d[\d,]* samples/s, overhead [\d,]+%, [\d.]+ kB written",
                     out), out


@pytest.mark.parametrize("role,flag,names", [
    ("model", "--model", ("net_a", "net_b")),
    ("loader", "--loader", ("train_loader", "val_loader")),
    ("opt", "--optimizer", ("opt_a", "opt_b")),
])
def test_each_ambiguity_lists_candidates_and_names_the_flag(ip, role, flag, names):
    objs = objects()
    base = dict(objs)
    if role == "model":
        del base["model"]
        base.update({names[0]: objs["model"], names[1]: mlp(1)})
    elif role == "loader":
        del base["loader"]
        base.update({names[0]: objs["loader"], names[1]: DataLoader(dataset(), batch_size=4)})
    else:
        del base["opt"]
        base.update({names[0]: objs["opt"], names[1]: torch.optim.SGD(objs["model"].parameters(), lr=1.0)})
    ip.user_ns.update(base)
    message = usage_error(ip, cell())
    assert names[0] in message and names[1] in message and f"{flag} NAME" in message
    assert not os.path.exists("runs/a.zarr")  # nothing ran, nothing written


def test_all_ambiguities_reported_together_and_flags_resolve_them(ip):
    objs = objects()
    other = objects(seed=1)
    ip.user_ns.update(model=objs["model"], model2=other["model"], loader=objs["loader"], loader2=other["loader"],
                      opt=objs["opt"], opt2=other["opt"])
    # the cell names both of each (its AST), so the names it uses do not decide
    both = "pairs = (model, model2), (loader, loader2), (opt, opt2)\n" + LOOP
    message = usage_error(ip, cell(body=both))
    for flag in ("--model", "--loader", "--optimizer"):
        assert flag in message
    assert "2 candidates for the torch.nn.Module with trainable parameters in the names this cell uses: model, " \
           "model2" in message
    r = ip.run_cell(cell(flags="--model model --loader loader --optimizer opt --dim 16", body=both))
    assert r.success, r.error_in_exec
    assert ip.user_ns["hydra_store"].steps == 10
    assert all(torch.equal(a, b) for a, b in zip(other["model"].parameters(), mlp(1).parameters()))


def test_the_names_the_cell_uses_come_first(ip):
    """A second model, loader or optimizer defined later in the notebook is no ambiguity when the cell names one."""
    objs = objects()
    other = objects(seed=1)
    ip.user_ns.update(objs, model_e=other["model"], loader_e=other["loader"], opt_e=other["opt"])
    r = ip.run_cell(cell(flags="--dim 16"))
    assert r.success, r.error_in_exec
    assert ip.user_ns["hydra_store"].steps == 10
    assert all(torch.equal(a, b) for a, b in zip(other["model"].parameters(), mlp(1).parameters()))  # untouched
    # names the cell only uses through a function of the namespace: found there when unique
    ip.user_ns.update(objects())
    del ip.user_ns["model_e"], ip.user_ns["loader_e"], ip.user_ns["opt_e"]
    ip.user_ns["fit"] = lambda: exec(LOOP, {"F": F, **{k: ip.user_ns[k] for k in ("model", "loader", "opt")}})
    r = ip.run_cell(cell(store="runs/b.zarr", flags="--dim 16", body="fit()\n"))
    assert r.success, r.error_in_exec
    assert ip.user_ns["hydra_store"].steps == 10


def test_nothing_to_detect(ip):
    message = usage_error(ip, cell())
    assert "No torch.nn.Module" in message and "--model" in message
    assert "No torch.utils.data.DataLoader" in message and "No torch.optim.Optimizer" in message


@pytest.mark.parametrize("flags,expected", [
    ("--model nope", "no variable named 'nope'"),
    ("--model modle", "Did you mean model"),
    ("--loader model", "model is a Sequential, not a torch.utils.data.DataLoader"),
    ("--optimizer loader", "loader is a DataLoader, not a torch.optim.Optimizer"),
    ("--model model.missing", "model has no attribute 'missing'"),
    ("--model 1+1", "takes a variable name"),
    ("--loss nope", "no variable named 'nope'"),
    ("--loss N_CLASSES", "not a callable"),
    ("--exact-indices undefined_thing --mode exact", "NameError"),
    ("--dim abc", "--dim takes a positive int"),
    ("--dim 0", "--dim must be positive"),
    ("--checkpoint-every soon", "--checkpoint-every takes 'epoch'"),
    ("--mode slow", "invalid choice"),
    ("--as 1x", "--as takes a Python variable name"),
    ("--resume --overwrite", "exclude each other"),
    # a misspelled flag: the closest known ones
    ("--dimm 16", "--dimm: did you mean --dim?"),
    ("--overwirte", "--overwirte: did you mean --overwrite?"),
    ("--chekpoint-every 3 --sed 1", "--chekpoint-every: did you mean --checkpoint-every?\n--sed: did you mean --seed"),
    # the engine's own refusals surface as usage errors before the cell runs
    ("--exact-indices 'range(3)'", "exact_indices applies to mode='exact' only"),
])
def test_bad_flags_are_clear_usage_errors(ip, flags, expected):
    objs = objects()
    before = [p.detach().clone() for p in objs["model"].parameters()]
    ip.user_ns.update(objs, N_CLASSES=3)
    assert expected in usage_error(ip, cell(flags=flags))
    assert all(torch.equal(a, b) for a, b in zip(before, objs["model"].parameters()))
    assert not os.path.exists("runs/a.zarr")


def test_progress_bar_waits_about_a_second(ip, capsys, monkeypatch):
    """A quick cell shows no bar: tqdm's delay= (the same as the queries' bars), then the bar as before."""
    from hydra_nb.sources import PROGRESS_DELAY_S

    assert hydra_nb.magic.PROGRESS_DELAY_S == PROGRESS_DELAY_S == 1.0
    monkeypatch.setattr(hydra_nb.magic, "PROGRESS_DELAY_S", 1e6)  # a run shorter than the delay, however slow
    ip.user_ns.update(objects())
    assert ip.run_cell(cell(flags="--dim 16")).success
    out = capsys.readouterr()
    assert "step" not in out.err and "Bound to hydra_store" in out.out


def test_notebook_bar_text_wraps_instead_of_running_off():
    """In a notebook tqdm writes its text with non-breaking spaces on one widget line: a long postfix ran past the
    cell's edge (checked in a browser by tests/browser); hydra_nb's bar lets it wrap. A terminal bar is tqdm's own."""
    import tqdm
    import tqdm.notebook

    from hydra_nb.magic import _notebook_bar

    assert _notebook_bar(tqdm.tqdm) is tqdm.tqdm
    bar = _notebook_bar(tqdm.notebook.tqdm)(desc="hydra_track a.zarr", unit="step", delay=0)
    try:
        bar.set_postfix_str("1,234 samples/s, overhead 18%, 5.9 MB written")
        text = bar.container.children[-1]
        assert "1,234 samples/s, overhead 18%, 5.9 MB written" in text.value and "\u2007" not in text.value
        assert bar.container.layout.flex_flow == "row wrap" and text.layout.height == "auto"
    finally:
        bar.close()


def test_missing_store_is_a_usage_error(ip):
    ip.user_ns.update(objects())
    assert "--store" in usage_error(ip, "%%hydra_track --dim 16\n" + LOOP)


def test_unsupported_optimizer_is_refused_before_the_cell_runs(ip):
    objs = objects()
    objs["opt"] = torch.optim.RMSprop(objs["model"].parameters())
    ip.user_ns.update(objs)
    assert "torch.optim.SGD" in usage_error(ip, cell())
    assert "step" not in ip.user_ns


def test_syntax_error_writes_no_store(ip):
    ip.user_ns.update(objects())
    r = ip.run_cell(cell(body="for x in loader\n    pass\n"))
    assert isinstance(r.error_in_exec, SyntaxError)
    assert not os.path.exists("runs/a.zarr")


# -- errors in the cell -----------------------------------------------------------------------

def test_failing_cell_is_the_cells_error(ip, capsys):
    objs = objects()
    ip.user_ns.update(objs)
    body = LOOP + "        if step == 7:\n            raise ValueError('boom from the user loop')\n"
    r = ip.run_cell(cell(flags="--dim 16", body=body))
    assert not r.success
    assert isinstance(r.error_in_exec, ValueError) and str(r.error_in_exec) == "boom from the user loop"
    out = plain(capsys.readouterr().out)
    # the user's own line, numbered as in the cell (the magic line is line 1)
    assert re.search(r"line 12\n(.*\n)*-*> *12 +raise ValueError\('boom from the user loop'\)", out), out
    assert "the cell raised ValueError at step 7" in out
    store = ip.user_ns["hydra_store"]
    assert store.status.startswith("interrupted at step 7")
    assert store.steps == 7 and list(store.checkpoint_steps) == [0, 5, 7]
    reopened = hydra_nb.open_store("runs/a.zarr")
    assert reopened.contributions(mlp(), *dataset()[:3]).shape == (3, N)
    assert ip.user_ns["step"] == 7  # the cell's variables up to the error are there, as without the magic
    assert type(objs["loader"]) is DataLoader and "zero_grad" not in vars(objs["opt"])


def test_keyboard_interrupt_stops_cleanly_and_says_where_the_store_stands(ip, capsys):
    objs = objects()
    ip.user_ns.update(objs)
    body = LOOP + "        if step == 3:\n            raise KeyboardInterrupt\n"
    r = ip.run_cell(cell(flags="--dim 16", body=body))
    assert not r.success and isinstance(r.error_in_exec, KeyboardInterrupt)
    out = plain(capsys.readouterr().out)
    assert "training interrupted at step 3" in out and "The store is consistent" in out
    assert "interrupted at step 3 (KeyboardInterrupt" in out and "checkpoints at steps 0, 3" in out
    store = ip.user_ns["hydra_store"]
    assert store.status.startswith("interrupted at step 3") and store.steps == 3
    assert type(objs["loader"]) is DataLoader and "zero_grad" not in vars(objs["opt"])
    # training can go on untracked afterwards, as without the magic
    assert ip.run_cell("x, y = next(iter(loader)); opt.zero_grad(); F.cross_entropy(model(x), y).backward(); "
                       "opt.step()").success


def test_another_cell_is_refused_then_overwrite_replaces(ip):
    objs = objects()
    ip.user_ns.update(objs)
    assert ip.run_cell(cell(flags="--dim 16")).success
    first = ip.user_ns["hydra_store"]
    before = [p.detach().clone() for p in objs["model"].parameters()]
    # another cell (its source differs) into the same store: refused (the same cell again replaces its run, below)
    message = usage_error(ip, cell(flags="--dim 16", body="# another cell\n" + LOOP))
    assert "already holds a hydra_nb run" in message and "10 steps" in message
    assert "--overwrite" in message and "--resume" in message and "--store" in message
    assert "overwrite=True" not in message
    assert all(torch.equal(a, b) for a, b in zip(before, objs["model"].parameters()))  # the cell did not run
    assert hydra_nb.open_store("runs/a.zarr").status == "complete"
    r = ip.run_cell(cell(flags="--dim 16 --overwrite", body=LOOP.replace("range(2)", "range(1)")))
    assert r.success, r.error_in_exec
    assert ip.user_ns["hydra_store"].steps == 5 and ip.user_ns["hydra_store"] is not first


def test_the_same_cell_again_replaces_its_own_run(ip, capsys):
    objs = objects()
    ip.user_ns.update(objs)
    assert ip.run_cell(cell(flags="--dim 16")).success
    first = ip.user_ns["hydra_store"]
    assert first.meta["origin"]["source_sha256"] and first.meta["origin"]["cell_id"] is None
    capsys.readouterr()
    r = ip.run_cell(cell(flags="--dim 16"))  # no --overwrite: this cell made that run
    assert r.success, r.error_in_exec
    out = capsys.readouterr().out
    assert "hydra_nb: replaced the earlier run in 'runs/a.zarr' (fast mode, 10 steps, complete): this same cell " \
           "made it." in out
    again = ip.user_ns["hydra_store"]
    assert again.meta["run_id"] != first.meta["run_id"] and again.steps == 10 and again.status == "complete"


def test_a_jupyter_cell_is_known_by_its_id_and_its_notebook(ip, capsys):
    ip.user_ns.update(objects(), __session__="/home/me/a.ipynb")  # ipykernel's name of the notebook under Jupyter
    assert ip.run_cell(cell(flags="--dim 16"), cell_id="cell-1").success
    origin = ip.user_ns["hydra_store"].meta["origin"]
    assert origin["cell_id"] == "cell-1" and origin["notebook"] == "/home/me/a.ipynb"
    # the same cell, edited (a Jupyter cell keeps its id): replaces its own run
    edited = cell(flags="--dim 16", body=LOOP.replace("range(2)", "range(1)"))
    assert ip.run_cell(edited, cell_id="cell-1").success
    assert ip.user_ns["hydra_store"].steps == 5 and "this same cell made it" in capsys.readouterr().out
    # another cell of that notebook, even with the same source: refused
    message = usage_error_in(ip, edited, "cell-2")
    assert "already holds a hydra_nb run (fast mode, 5 steps, complete), made by another cell of /home/me/a.ipynb" \
        in message and "--overwrite" in message
    # the same cell of another notebook (a copy: same id, same source): refused
    ip.user_ns["__session__"] = "/home/me/copy of a.ipynb"
    assert "made by another cell of /home/me/a.ipynb" in usage_error_in(ip, edited, "cell-1")
    assert hydra_nb.open_store("runs/a.zarr").meta["run_id"] == ip.user_ns["hydra_store"].meta["run_id"]


def usage_error_in(ip, text, cell_id) -> str:
    """usage_error for a cell sent with a Jupyter cell id (as ipykernel passes it to run_cell)."""
    r = ip.run_cell(text, cell_id=cell_id)
    assert not r.success
    assert isinstance(r.error_in_exec, UsageError), repr(r.error_in_exec)
    return str(r.error_in_exec)


def test_a_run_that_failed_before_its_first_step_is_replaced(ip, capsys):
    objs = objects()
    ip.user_ns.update(objs)
    clipped = LOOP.replace("        opt.step()", "        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)\n"
                                                 "        opt.step()")
    r = ip.run_cell(cell(flags="--dim 16", body=clipped))
    assert not r.success and "clipping" in str(r.error_in_exec)
    failed = hydra_nb.open_store("runs/a.zarr")
    assert failed.status.startswith("failed") and failed.steps == 0
    capsys.readouterr()
    assert ip.run_cell(cell(flags="--dim 16")).success  # the corrected cell: another source, no --overwrite
    assert "(fast mode, 0 steps, failed): it failed before its first step and holds nothing." in \
        capsys.readouterr().out
    assert ip.user_ns["hydra_store"].steps == 10


def test_track_outside_the_magic_is_never_the_same_cell(ip):
    objs = objects()
    with hydra_nb.track(objs["model"], objs["loader"], store="runs/a.zarr", optimizer=objs["opt"], projection_dim=16):
        exec(LOOP, {"F": F, **objs})
    assert "origin" not in hydra_nb.open_store("runs/a.zarr").meta
    ip.user_ns.update(objects())
    assert "made outside %%hydra_track" in usage_error(ip, cell(flags="--dim 16"))


def test_resume_continues_the_run(ip):
    ip.user_ns.update(objects())
    assert ip.run_cell(cell()).success
    first = ip.user_ns["hydra_store"]
    assert ip.run_cell(cell(flags="--resume")).success  # the same cell again: two more epochs
    resumed = ip.user_ns["hydra_store"]
    assert resumed.meta["run_id"] == first.meta["run_id"]
    assert resumed.steps == 2 * first.steps
    assert list(resumed.checkpoint_steps[: len(first.checkpoint_steps)]) == list(first.checkpoint_steps)
    assert resumed.meta["resumed"][0]["at_step"] == first.steps


# -- options ----------------------------------------------------------------------------------

def test_as_name_and_hydra_status(ip, capsys):
    ip.run_line_magic("hydra_status", "")
    assert "no store yet" in capsys.readouterr().out
    ip.user_ns.update(objects())
    body = LOOP.replace("range(2)", "range(1)") + "get_ipython().run_line_magic('hydra_status', '')\n"
    assert ip.run_cell(cell(store='"runs/first run.zarr"', flags="--as first --dim '16'", body=body)).success
    out = capsys.readouterr().out
    assert "tracking into 'runs/first run.zarr': 5 steps" in out  # while the cell runs: the current run
    assert "hydra_store" not in ip.user_ns
    first = ip.user_ns["first"]
    assert first.path.name == "first run.zarr"
    ip.run_line_magic("hydra_status", "")
    assert capsys.readouterr().out.strip() == repr(first)


def test_dim_none_stores_full_dimension(ip):
    objs = objects()
    ip.user_ns.update(objs)
    assert ip.run_cell(cell(flags="--dim none")).success
    store = ip.user_ns["hydra_store"]
    n_params = sum(p.numel() for p in objs["model"].parameters())
    assert store.meta["config"]["projection_dim"] is None
    assert store.hypergradients().shape == (N, n_params)


def test_dim_near_the_parameter_count_stores_full_dimension_and_says_so(ip, capsys):
    """--dim 1024 on a 1,058-parameter model once gave k = 998: a store as big as full dimension, every score noisy."""
    torch.manual_seed(0)
    objs = objects()
    objs["model"] = nn.Sequential(nn.Linear(D_IN, 150), nn.Tanh(), nn.Linear(150, C))  # 750 + 150 + 450 + 3 = 1,353
    objs["opt"] = torch.optim.SGD(objs["model"].parameters(), lr=0.1)
    ip.user_ns.update(objs)
    assert ip.run_cell(cell(flags="--dim 1200")).success
    out = capsys.readouterr().out
    assert "hydra_nb: --dim 1200 is at least 75% of the model's 1,353 parameters: storing full-dimensional rows" in out
    store = ip.user_ns["hydra_store"]
    assert store.projector.is_identity and store.hypergradients(progress=False).shape == (N, 1353)
    assert "none (full dimension, 1,353 parameters; projection_dim=1200 asked for most of them)" in store._repr_html_()
    # below three quarters: a sketch, and no such line
    assert ip.run_cell(cell(store="runs/b.zarr", flags="--dim 1000")).success
    assert "full-dimensional" not in capsys.readouterr().out
    assert ip.user_ns["hydra_store"].hypergradients(progress=False).shape[1] <= 1000


def test_exact_mode_with_exact_indices(ip):
    ip.user_ns.update(objects(dtype=torch.float64), picks=[3, 1, 4])
    r = ip.run_cell(cell(flags='--mode exact --exact-indices "range(0, 40, 4)" --dim 16'))
    assert r.success, r.error_in_exec
    store = ip.user_ns["hydra_store"]
    assert store.mode == "exact" and list(store.tracked_indices) == list(range(0, 40, 4))
    assert store.contributions(mlp().double(), *dataset(torch.float64)[:2]).shape == (2, 10)
    ip.user_ns.update(objects(dtype=torch.float64))
    assert ip.run_cell(cell(store="runs/b.zarr", flags="--mode exact --exact-indices picks --dim 16")).success
    assert list(ip.user_ns["hydra_store"].tracked_indices) == [3, 1, 4]


def test_loss_and_checkpoint_every(ip):
    def per_sample_nll(outputs, targets):
        return F.nll_loss(F.log_softmax(outputs, -1), targets, reduction="none")

    ip.user_ns.update(objects(), per_sample_nll=per_sample_nll)
    r = ip.run_cell(cell(flags="--loss per_sample_nll --checkpoint-every 3 --seed 5 --store-dtype float16 --dim 16"))
    assert r.success, r.error_in_exec
    store = ip.user_ns["hydra_store"]
    assert list(store.checkpoint_steps) == [0, 3, 6, 9, 10]
    assert store.meta["config"]["loss_fn"] == "per_sample_nll" and store.loss_fn is per_sample_nll
    assert store.meta["config"]["seed"] == 5 and store.meta["config"]["store_dtype"] == "float16"
    assert store.contributions(mlp(), *dataset()[:2]).shape == (2, N)  # the bound store carries the loss


# -- transparency and equality with hydra_nb.track -------------------------------------------

TRANSPARENT = LOOP + """\
    epoch_note = f"epoch {epoch} ended"
def helper(k):
    return k * step
doubled = [helper(i) for i in range(3)]
total = sum(p.sum().item() for p in model.parameters())
last_loss
"""


def test_cell_is_transparent(ip):
    runs = {}
    for label, text in (("plain", TRANSPARENT), ("magic", cell(flags="--dim 16", body=TRANSPARENT))):
        ip.reset(new_session=False)
        ip.user_ns.update(torch=torch, F=F, nn=nn)
        objs = objects()
        ip.user_ns.update(objs)
        r = ip.run_cell(text)
        assert r.success, r.error_in_exec
        ns = {k: v for k, v in ip.user_ns.items()
              if not k.startswith("_") and k not in ip.user_ns_hidden and k != "hydra_store"}
        runs[label] = (ns, r.result, [p.detach().clone() for p in objs["model"].parameters()])
    (plain_ns, plain_out, plain_params), (magic_ns, magic_out, magic_params) = runs["plain"], runs["magic"]
    assert set(plain_ns) == set(magic_ns)
    assert {"step", "epoch", "x", "y", "loss", "last_loss", "epoch_note", "helper", "doubled", "total"} <= set(magic_ns)
    for name in ("step", "epoch", "last_loss", "epoch_note", "doubled", "total"):
        assert magic_ns[name] == plain_ns[name], name
    assert torch.equal(magic_ns["x"], plain_ns["x"]) and torch.equal(magic_ns["y"], plain_ns["y"])
    assert magic_ns["helper"](2) == 20  # a function defined in the cell sees the namespace as its globals
    assert magic_out == plain_out == magic_ns["last_loss"]  # the trailing expression is the cell's result
    assert all(torch.equal(a, b) for a, b in zip(plain_params, magic_params))


def test_store_equals_hydra_nb_track(ip):
    objs = objects()
    namespace = {"F": F, **objs}
    with hydra_nb.track(objs["model"], objs["loader"], store="runs/direct.zarr", optimizer=objs["opt"],
                        projection_dim=16, seed=0):
        exec(LOOP, namespace)
    direct = hydra_nb.open_store("runs/direct.zarr")

    ip.user_ns.update(objects())
    assert ip.run_cell(cell(store="runs/magic.zarr", flags="--dim 16")).success
    via_magic = ip.user_ns["hydra_store"]

    np.testing.assert_array_equal(via_magic.checkpoint_steps, direct.checkpoint_steps)
    x, y = dataset()[:6]
    np.testing.assert_allclose(via_magic.contributions(mlp(), x, y), direct.contributions(mlp(), x, y),
                               rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(via_magic.params_at(-1), direct.params_at(-1), rtol=0, atol=0)


def test_batchnorm_flag(ip):
    objs = objects()
    torch.manual_seed(0)
    objs["model"] = nn.Sequential(nn.Linear(D_IN, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, C))
    objs["opt"] = torch.optim.SGD(objs["model"].parameters(), lr=0.1)
    ip.user_ns.update(objs)
    r = ip.run_cell(cell(flags="--dim 16 --batchnorm fixed --strict"))  # not the default ("exact")
    assert r.success, r.error_in_exec
    assert ip.user_ns["hydra_store"].meta["config"]["batchnorm"] == "fixed"
    assert "--batchnorm" in usage_error(ip, cell(store="runs/b.zarr", flags="--batchnorm approx"))


# -- flags generated from TrackOptions --------------------------------------------------------

def test_option_flags_are_generated_from_track_options():
    from dataclasses import fields

    from hydra_nb.options import TrackOptions

    actions = {a.dest: a for a in HydraMagics.hydra_track.parser._actions}
    flagged = [f for f in fields(TrackOptions) if "flag" in f.metadata]
    assert {f.metadata["flag"] for f in flagged} >= {"--mode", "--dim", "--checkpoint-every", "--seed", "--store-dtype",
                                                     "--overwrite", "--strict", "--resume", "--batchnorm",
                                                     "--hvp-batch", "--hvp-method"}
    for f in flagged:
        action = actions[f.name]
        assert action.option_strings == [f.metadata["flag"]]
        assert action.default == f.default and action.help == f.metadata["help"]
        assert tuple(action.choices or ()) == tuple(f.metadata.get("choices", ()))
    # options without a flag of their own: from the namespace (--loss, --exact-indices) or the magic itself (on_step)
    for name in ("loss_fn", "on_step", "batch_fn"):
        assert name not in actions
    assert actions["exact_indices"].option_strings == ["--exact-indices"] and actions["exact_indices"].type is None


def test_hvp_flags_reach_the_tracker(ip):
    ip.user_ns.update(objects(dtype=torch.float64))
    body = LOOP.replace("range(2)", "range(1)") + (
        "seen = get_ipython().magics_manager.registry['HydraMagics']._tracker.options\n")
    r = ip.run_cell(cell(flags="--mode exact --exact-indices 'range(4)' --hvp-method loop --hvp-batch 3 --dim 16",
                         body=body))
    assert r.success, r.error_in_exec
    seen = ip.user_ns["seen"]
    assert (seen.hvp_method, seen.hvp_batch, seen.mode, seen.exact_indices) == ("loop", 3, "exact", (0, 1, 2, 3))
    assert "--hvp-batch must be a positive int" in usage_error(ip, cell(store="runs/b.zarr", flags="--hvp-batch 0"))
