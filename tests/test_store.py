"""The store under stress: a killed writer, a second writer, readers during training, resume, damage."""

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import hydra_nb
from hydra_nb import StoreError, TrackingConfigError
from hydra_nb.store import read_meta

sys.path.insert(0, str(Path(__file__).parent))
import store_run  # noqa: E402

TEST_X, TEST_Y = store_run.data()[:4]


def contributions_at(store, c):
    return store.contributions(store_run.model(), TEST_X, TEST_Y, checkpoint=c)


def test_kill_9_mid_run_keeps_a_consistent_committed_prefix(tmp_path):
    path = tmp_path / "killed.zarr"
    child = subprocess.Popen([sys.executable, str(Path(__file__).parent / "store_run.py"), str(path),
                              "--sleep", "0.01"])
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            meta = read_meta(path) if (path / "zarr.json").exists() else None
            if meta and meta["committed"]["checkpoints"] >= 6:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the child never committed 6 checkpoints")
        os.kill(child.pid, signal.SIGKILL)  # in the middle of whatever it was doing, writes included
    finally:
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL

    store = hydra_nb.open_store(path)
    assert store.status.startswith(f"interrupted at step {store.steps}") and "killed or crashed" in store.status
    assert store.writer is None
    assert len(store.checkpoint_steps) >= 6 and store.steps == store.checkpoint_steps[-1]
    # every committed checkpoint answers exactly as an uninterrupted run of the same training
    reference = store_run.train(tmp_path / "reference.zarr", store.steps)
    ref = hydra_nb.open_store(tmp_path / "reference.zarr")
    assert list(ref.checkpoint_steps) == list(store.checkpoint_steps)
    for c in range(len(store.checkpoint_steps)):
        np.testing.assert_allclose(contributions_at(store, c), contributions_at(ref, c), rtol=1e-9, atol=1e-12)
    # and the killed run can be resumed (the dead writer holds no lock): what it wrote after its last
    # checkpoint is cut back, and the resumed steps continue from there
    net = store_run.model()
    store.load_params(net)
    torch.testing.assert_close(torch.cat([p.flatten() for p in net.parameters()]),
                               torch.cat([p.flatten() for p in reference.parameters()]))
    loader = DataLoader(store_run.data(), batch_size=8)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    with hydra_nb.track(net, loader, store=path, optimizer=opt, projection_dim=None, checkpoint_every=2,
                        resume=True):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    resumed = hydra_nb.open_store(path)
    assert resumed.status == "complete" and resumed.steps == store.steps + 5
    assert list(resumed.checkpoint_steps[:len(store.checkpoint_steps)]) == list(store.checkpoint_steps)
    assert resumed.group["trace/row_end"].shape[0] == resumed.steps  # trimmed to what was committed
    np.testing.assert_allclose(contributions_at(resumed, len(store.checkpoint_steps) - 1),
                               contributions_at(store, -1), rtol=1e-12)
    assert np.isfinite(contributions_at(resumed, -1)).all()


def test_one_writer_at_a_time_and_readers_see_committed_steps(tmp_path):
    path = tmp_path / "a.zarr"
    net = store_run.model()
    loader = DataLoader(store_run.data(), batch_size=8)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with hydra_nb.track(net, loader, store=path, optimizer=opt):
        for x, y in loader:  # one epoch: a checkpoint at its end (step 5)
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
        for _ in range(2):
            x, y = next(iter(loader))  # a new epoch starts: 2 steps past the checkpoint
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
        other = store_run.model()
        for kwargs in ({"overwrite": True}, {"resume": True}, {}):
            with pytest.raises(TrackingConfigError, match="being written"):
                with hydra_nb.track(other, DataLoader(store_run.data(), batch_size=8), store=path,
                                    optimizer=torch.optim.SGD(other.parameters(), lr=0.1), **kwargs):
                    pass
        deadline = time.time() + 10
        while read_meta(path)["committed"]["checkpoints"] < 2 and time.time() < deadline:
            time.sleep(0.01)  # the writer thread commits in the background
        live = hydra_nb.open_store(path)
        assert live.status == "running: 5 steps committed" and live.writer["pid"] == os.getpid()
        during = live.contributions(store_run.model(), TEST_X, TEST_Y)
    final = hydra_nb.open_store(path)
    assert final.status == "complete" and final.steps == 7 and final.writer is None
    np.testing.assert_allclose(contributions_at(final, 1), during, rtol=1e-12)


_OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1),  # its step counts resume too
}


def _interrupted_run(path, mode, fail_at, opt_name="sgd"):
    """Train 3 epochs of 5 steps, raising at step ``fail_at``; returns the optimizer state at each epoch end."""
    net = store_run.model()
    loader = DataLoader(store_run.data(), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(3))
    opt = _OPTIMIZERS[opt_name](net.parameters())
    saved, step = {}, 0
    with pytest.raises(RuntimeError, match="power cut"):
        with hydra_nb.track(net, loader, store=path, optimizer=opt, mode=mode, projection_dim=None):
            for epoch in range(3):
                for x, y in loader:
                    if step == fail_at:
                        raise RuntimeError("power cut")
                    opt.zero_grad()
                    F.cross_entropy(net(x), y).backward()
                    opt.step()
                    step += 1
                saved[step] = (copy.deepcopy(opt.state_dict()), loader.generator.get_state())
    return saved


@pytest.mark.parametrize("mode,opt_name,old_store", [("fast", "sgd", False), ("exact", "sgd", False),
                                                     ("fast", "adamw", False), ("fast", "adamw", True)])
def test_resume_after_an_interruption_equals_an_uninterrupted_run(tmp_path, mode, opt_name, old_store):
    """``old_store``: the interrupted store lacks the trace fields a rule gained later (Adam's beta2, eps, amsgrad,
    decoupled, step), as one written by an older hydra_nb: it still reads, and resumes keeping its own fields."""
    path = tmp_path / "a.zarr"
    saved = _interrupted_run(path, mode, fail_at=10, opt_name=opt_name)  # at the start of epoch 3
    rule = hydra_nb.open_store(path).optimizer_rule
    if old_store:
        import shutil

        assert set(rule.trace_fields) > set(rule.fast_fields)
        for f in set(rule.trace_fields) - set(rule.fast_fields):
            shutil.rmtree(path / "trace" / f)
    store = hydra_nb.open_store(path)
    assert store.steps == 10 and store.status.startswith("interrupted at step 10")
    run_id = store.meta["run_id"]

    # resume from the last checkpoint: parameters from the store, optimizer and sampler state as saved then
    net = store_run.model()
    store.load_params(net)
    loader = DataLoader(store_run.data(), batch_size=8, shuffle=True, generator=torch.Generator())
    opt = _OPTIMIZERS[opt_name](net.parameters())
    opt_state, rng_state = saved[10]
    opt.load_state_dict(opt_state)
    loader.generator.set_state(rng_state)
    with hydra_nb.track(net, loader, store=path, optimizer=opt, mode=mode, projection_dim=None, resume=True):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    resumed = hydra_nb.open_store(path)
    assert resumed.status == "complete" and resumed.steps == 15 and resumed.meta["run_id"] == run_id
    assert resumed.meta["resumed"] == [{"at_step": 10, "time": resumed.meta["resumed"][0]["time"]}]

    # the same training, never interrupted
    net = store_run.model()
    loader = DataLoader(store_run.data(), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(3))
    opt = _OPTIMIZERS[opt_name](net.parameters())
    with hydra_nb.track(net, loader, store=tmp_path / "b.zarr", optimizer=opt, mode=mode, projection_dim=None):
        for epoch in range(3):
            for x, y in loader:
                opt.zero_grad()
                F.cross_entropy(net(x), y).backward()
                opt.step()
    whole = hydra_nb.open_store(tmp_path / "b.zarr")
    assert list(whole.checkpoint_steps) == list(resumed.checkpoint_steps) == [0, 5, 10, 15]
    assert whole.trace_fields == rule.trace_fields
    assert resumed.trace_fields == (rule.fast_fields if old_store else rule.trace_fields)
    for f in resumed.trace_fields:
        np.testing.assert_array_equal(resumed.trace()[f], whole.trace()[f])
    np.testing.assert_allclose(resumed.contributions(net, TEST_X, TEST_Y), whole.contributions(net, TEST_X, TEST_Y),
                               rtol=1e-9, atol=1e-13)
    if mode == "exact":
        np.testing.assert_allclose(resumed.contributions(net, TEST_X, TEST_Y, mode="fast"),
                                   whole.contributions(net, TEST_X, TEST_Y, mode="fast"), rtol=1e-9, atol=1e-13)


def test_resume_refusals(tmp_path):
    path = tmp_path / "a.zarr"
    store_run.train(path, 6)

    def attempt(net=None, n=None, **kwargs):
        net = net if net is not None else store_run.model()
        ds = store_run.data() if n is None else torch.utils.data.Subset(store_run.data(), range(n))
        loader = DataLoader(ds, batch_size=8)
        kwargs.setdefault("projection_dim", None)
        with hydra_nb.track(net, loader, store=kwargs.pop("store", path), optimizer=torch.optim.SGD(
                net.parameters(), lr=0.1), resume=True, **kwargs):
            pass

    with pytest.raises(TrackingConfigError, match="parameters are not those of the run's last checkpoint"):
        attempt()  # a fresh model: not at the checkpoint
    at_checkpoint = store_run.model()
    hydra_nb.open_store(path).load_params(at_checkpoint)
    with pytest.raises(TrackingConfigError, match="exact mode"):
        attempt(copy.deepcopy(at_checkpoint), mode="exact")
    with pytest.raises(TrackingConfigError, match="has 30"):
        attempt(copy.deepcopy(at_checkpoint), n=30)
    with pytest.raises(TrackingConfigError, match="projection_dim=None, this is 16"):
        attempt(copy.deepcopy(at_checkpoint), projection_dim=16)
    with pytest.raises(TrackingConfigError, match="Nothing to resume"):
        attempt(copy.deepcopy(at_checkpoint), store=tmp_path / "nothing.zarr")
    with pytest.raises(TrackingConfigError, match="exclude each other"):
        attempt(copy.deepcopy(at_checkpoint), overwrite=True)
    attempt(copy.deepcopy(at_checkpoint))  # all matches: accepted
    assert hydra_nb.open_store(path).status == "complete"


@pytest.fixture
def finished(tmp_path):
    path = tmp_path / "a.zarr"
    store_run.train(path, 10, checkpoint_every=5)
    return path


@pytest.mark.parametrize("array", ["log/grad", "checkpoints/params", "trace/lr", "log/sample"])
def test_missing_chunk_is_reported_not_read_as_zeros(finished, array):
    chunk = sorted((finished / array / "c").rglob("*"))
    chunk = [p for p in chunk if p.is_file()][0]
    chunk.unlink()
    store = hydra_nb.open_store(finished)
    with pytest.raises(StoreError, match=f"damaged: chunk {array}/c/.* is missing"):
        store.contributions(store_run.model(), TEST_X, TEST_Y)


@pytest.mark.parametrize("array", ["log/grad", "checkpoints/params"])
def test_truncated_chunk_is_an_error_naming_the_store(finished, array):
    last = read_meta(finished)["committed"]["checkpoints"] - 1  # the queries below read the last checkpoint
    chunk = finished / array / "c" / ("0/0" if array == "log/grad" else f"{last}/0")
    chunk.write_bytes(chunk.read_bytes()[:37])
    store = hydra_nb.open_store(finished)
    with pytest.raises(StoreError, match=f"{finished.name}.* is damaged: {array} could not be read"):
        store.contributions(store_run.model(), TEST_X, TEST_Y)


def test_missing_array_is_an_error(finished):
    import shutil

    shutil.rmtree(finished / "trace" / "lr")
    with pytest.raises(StoreError, match="damaged: missing array.*trace/lr"):
        hydra_nb.open_store(finished)


def test_open_by_file_url(finished):
    local = hydra_nb.open_store(finished)
    url = hydra_nb.open_store(f"file://{finished}")
    np.testing.assert_array_equal(url.contributions(store_run.model(), TEST_X, TEST_Y),
                                  local.contributions(store_run.model(), TEST_X, TEST_Y))
    assert url.status == "complete"


def test_corrupted_compressed_chunk_is_an_error_not_wrong_numbers(finished):
    last = read_meta(finished)["committed"]["checkpoints"] - 1
    chunk = finished / "checkpoints" / "params" / "c" / f"{last}" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x10  # one flipped bit
    chunk.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="checkpoints/params could not be read.*checksum"):
        hydra_nb.open_store(finished).contributions(store_run.model(), TEST_X, TEST_Y)


def test_store_at_an_fsspec_url_answers_with_both_engines(finished):
    import fsspec

    fs = fsspec.filesystem("memory")
    for p in finished.rglob("*"):  # the store, copied to an in-memory object store
        if p.is_file() and p.name != "hydra_nb.lock":
            fs.pipe(f"/runs/a.zarr/{p.relative_to(finished).as_posix()}", p.read_bytes())
    remote = hydra_nb.open_store("memory://runs/a.zarr")
    assert not remote.is_local and remote.status == "complete" and remote.writer is None
    local = hydra_nb.open_store(finished)
    want = local.contributions(store_run.model(), TEST_X, TEST_Y)
    for engine in ("numpy", "dask"):
        got = remote.contributions(store_run.model(), TEST_X, TEST_Y, engine=engine, progress=False)
        np.testing.assert_allclose(got, want, rtol=1e-12)


def test_writer_rows_come_back_exactly_across_chunks_flushes_and_a_reopen(tmp_path, monkeypatch):
    """The writer keeps each array's partial last chunk in memory and writes chunks whole: appends that
    start and end inside chunks, span several, arrive in mid-epoch flushes or only at checkpoints, and a
    reopened writer continuing a chunk the previous one left partial, all read back as written."""
    import zarr

    import hydra_nb.store as store_module
    from hydra_nb.optim import SGDRule
    from hydra_nb.params import ParamLayout
    from hydra_nb.projection import Projector
    from hydra_nb.store import StoreWriter, new_run_meta

    monkeypatch.setattr(store_module, "_TRACE_CHUNK", 4)  # trace chunks of 4 steps
    monkeypatch.setattr(store_module, "_TARGET_CHUNK_BYTES", 1)  # log chunks of 64 rows (the minimum)
    monkeypatch.setattr(store_module, "_FLUSH_BYTES", 64 * 7 * 8)  # flush whole chunks mid-epoch
    monkeypatch.setattr(store_module, "_HANDOVER_BYTES", 3 * 7 * 8)
    model = torch.nn.Linear(2, 2, bias=False).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    layout, tensors = ParamLayout.from_model(model, opt)
    projector = Projector.plan(layout, None, dtype=torch.float64)
    meta = new_run_meta("fast", 1000, layout, projector.to_json(), {"projection_dim": None}, [])
    path = tmp_path / "w.zarr"
    rng = np.random.default_rng(0)
    expect = {"sample": [], "step": [], "grad": [], "row_end": [], "lr": [], "params": []}

    def run(writer, first_step, sizes, checkpoint_every):
        step = first_step
        for n in sizes:
            row = {f: np.full(1, step, dtype=np.float64) for f in SGDRule.trace_fields[:4]}
            row.update({f: np.ones(1, dtype=bool) for f in SGDRule.trace_fields[4:]})
            samples = rng.integers(0, 1000, n)
            rows = rng.standard_normal((n, projector.dim))
            writer.put_step(row, torch.from_numpy(samples), torch.from_numpy(rows))
            expect["sample"].append(samples)
            expect["step"].append(np.full(n, step))
            expect["grad"].append(rows)
            expect["lr"].append(step)
            expect["row_end"].append(sum(len(s) for s in expect["sample"]))
            step += 1
            if step % checkpoint_every == 0:
                params = torch.from_numpy(rng.standard_normal(layout.size))
                writer.put_checkpoint(step, params, None)
                expect["params"].append(params.numpy())
        return step

    writer = StoreWriter.create(path, meta, layout, projector.arrays(), projector.dim, np.float64, np.dtype("float64"),
                                0, None)
    writer.put_checkpoint(0, torch.from_numpy(np.zeros(layout.size)), None)
    expect["params"].append(np.zeros(layout.size))
    sizes = [5, 0, 37, 64, 100, 1, 3, 130, 2, 63, 65, 9, 4]
    step = run(writer, 0, sizes, checkpoint_every=3)
    writer.close("complete")
    assert writer.error is None, writer.error
    last = 3 * (step // 3)  # what a reopened writer keeps: the run up to its last checkpoint
    keep_rows = expect["row_end"][last - 1]
    for key in ("sample", "step", "grad"):
        expect[key] = [np.concatenate(expect[key])[:keep_rows]]
    expect["row_end"], expect["lr"] = expect["row_end"][:last], expect["lr"][:last]
    writer = StoreWriter.reopen(path)
    run(writer, last, [7, 70, 1, 61, 3, 3], checkpoint_every=2)
    writer.close("complete")
    assert writer.error is None, writer.error

    g = zarr.open_group(str(path), mode="r")
    n_steps = len(expect["lr"])
    np.testing.assert_array_equal(g["log/sample"][:], np.concatenate(expect["sample"]))
    np.testing.assert_array_equal(g["log/step"][:], np.concatenate(expect["step"]))
    np.testing.assert_array_equal(g["log/grad"][:], np.concatenate(expect["grad"]))
    np.testing.assert_array_equal(g["trace/row_end"][:], expect["row_end"])
    np.testing.assert_array_equal(g["trace/lr"][:, 0], expect["lr"])
    assert g["trace/active"][:].all() and g["trace/active"].shape == (n_steps, 1)
    np.testing.assert_array_equal(g["checkpoints/params"][:], np.stack(expect["params"]))
    np.testing.assert_array_equal(g["checkpoints/step"][:], [0, 3, 6, 9, 12, 14, 16, 18])
    committed = read_meta(path)["committed"]
    assert committed == {"steps": n_steps, "rows": len(np.concatenate(expect["sample"])), "checkpoints": 8}


def test_same_cell_and_what_may_be_replaced():
    """The rules %%hydra_track's re-runs rest on (hydra_nb.store.same_cell, replaceable)."""
    from hydra_nb.store import replaceable, same_cell

    a = {"notebook": "/n/a.ipynb", "cell_id": "c1", "source_sha256": "s1"}
    assert same_cell(a, dict(a, source_sha256="s2"))                  # an edited cell keeps its id
    assert not same_cell(a, dict(a, cell_id="c2"))                     # another cell, even with the same source
    assert not same_cell(a, dict(a, notebook="/n/copy.ipynb"))         # a copy of the notebook
    assert same_cell(a, {"notebook": None, "cell_id": None, "source_sha256": "s1"})   # nbclient: the source decides
    assert not same_cell(a, {"notebook": None, "cell_id": None, "source_sha256": "s2"})
    assert not same_cell(None, a) and not same_cell(a, None) and not same_cell({}, {})
    done = {"status": "complete", "committed": {"steps": 10}, "origin": a}
    assert replaceable(done, dict(a)) == "this same cell made it"
    assert replaceable(done, None) is None and replaceable(dict(done, origin=None), a) is None
    failed = {"status": "failed", "committed": {"steps": 0}}
    assert replaceable(failed, None) == "it failed before its first step and holds nothing"
    assert replaceable(dict(failed, committed={"steps": 3}), None) is None
