"""Bad input fails early and clearly; a tracking failure never kills training or a store."""

import json
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import hydra_nb
from hydra_nb import StoreError, TrackingConfigError, TrackingFailure, TrackingStoppedWarning

N, D_IN, C = 30, 5, 3


def data(n=N):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, D_IN, generator=g), torch.randint(0, C, (n,), generator=g))


def mlp():
    return nn.Sequential(nn.Linear(D_IN, 6), nn.Tanh(), nn.Linear(6, C))


def loader_of(ds=None, **kw):
    kw.setdefault("batch_size", 8)
    return DataLoader(ds or data(), **kw)


def train(model, loader, opt, epochs=1, on_step=None):
    step = 0
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if on_step:
                on_step(step)
            opt.step()
            step += 1
    return step


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def unchanged(model, snap):
    return all(torch.equal(a, b) for a, b in zip(model.parameters(), snap))


# -- refused before training starts --------------------------------------------------------

def test_unsupported_optimizer(tmp_path):
    model = mlp()
    with pytest.raises(TrackingConfigError, match="torch.optim.SGD"):
        hydra_nb.track(model, loader_of(), store=tmp_path / "a.zarr", optimizer=torch.optim.RMSprop(model.parameters()))
    assert not (tmp_path / "a.zarr").exists()


def test_maximize_refused(tmp_path):
    model = mlp()
    with pytest.raises(TrackingConfigError, match="maximize"):
        hydra_nb.track(model, loader_of(), store=tmp_path / "a.zarr",
                       optimizer=torch.optim.SGD(model.parameters(), lr=0.1, maximize=True))


def test_batchnorm_in_training_mode(tmp_path):
    """Supported by a documented choice (tests/test_batchnorm.py); only an unknown choice is refused."""
    model = nn.Sequential(nn.Linear(D_IN, 6), nn.BatchNorm1d(6), nn.Linear(6, C))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TrackingConfigError, match="batchnorm must be 'fixed'"):
        hydra_nb.track(model, loader_of(), store=tmp_path / "a.zarr", optimizer=opt, batchnorm=True)
    loader = loader_of()
    with hydra_nb.track(model, loader, store=tmp_path / "a.zarr", optimizer=opt, strict=True) as tracker:
        assert tracker.batchnorm == "exact"  # the default: the true batch-coupled derivative
        train(model, loader, opt)
    assert hydra_nb.open_store(tmp_path / "a.zarr").status == "complete"


def test_batchnorm_switched_to_training_inside_loop_raises_before_first_update(tmp_path):
    model = nn.Sequential(nn.Linear(D_IN, 6), nn.BatchNorm1d(6), nn.Linear(6, C))
    model.eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    snap = snapshot(model)
    loader = loader_of()
    with pytest.raises(TrackingConfigError, match="BatchNorm1d was switched to training mode"):
        with hydra_nb.track(model, loader, store=tmp_path / "a.zarr", optimizer=opt):
            model.train()
            train(model, loader, opt)
    assert unchanged(model, snap)


def test_batchnorm_in_eval_mode_is_tracked(tmp_path):
    model = nn.Sequential(nn.Linear(D_IN, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, C))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = loader_of()
    with hydra_nb.track(model, loader, store=tmp_path / "a.zarr", optimizer=opt, projection_dim=None, strict=True):
        train(model, loader, opt, epochs=2)
    store = hydra_nb.open_store(tmp_path / "a.zarr")
    assert store.status == "complete" and store.steps == 8
    # the stored BatchNorm statistics are used by queries, not the model's current ones
    x, y = data()[:4]
    before = store.contributions(model, x, y)
    with torch.no_grad():
        model[1].running_mean.zero_()
    assert np.allclose(store.contributions(model, x, y), before)


def test_iterable_dataset(tmp_path):
    class Stream(IterableDataset):
        def __iter__(self):
            yield from zip(torch.randn(10, D_IN), torch.zeros(10, dtype=torch.long))

    model = mlp()
    with pytest.raises(TrackingConfigError, match="IterableDataset"):
        hydra_nb.track(model, DataLoader(Stream(), batch_size=4), store=tmp_path / "a.zarr",
                       optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def test_not_a_dataloader(tmp_path):
    model = mlp()
    with pytest.raises(TrackingConfigError, match="DataLoader"):
        hydra_nb.track(model, [data()[:8]], store=tmp_path / "a.zarr",
                       optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def test_loop_iterates_another_loader(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracked, other = loader_of(), loader_of()
    snap = snapshot(model)
    with pytest.raises(TrackingConfigError, match="DataLoader that your loop iterates"):
        with hydra_nb.track(model, tracked, store=tmp_path / "a.zarr", optimizer=opt):
            train(model, other, opt)
    assert unchanged(model, snap)


def test_loop_batches_do_not_match_loader(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracked = loader_of(batch_size=8)
    other = loader_of(batch_size=5)
    snap = snapshot(model)
    with pytest.raises(TrackingConfigError, match="batch of 5 samples"):
        with hydra_nb.track(model, tracked, store=tmp_path / "a.zarr", optimizer=opt):
            for (_, _), (x, y) in zip(tracked, other):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
    assert unchanged(model, snap)


@pytest.mark.parametrize("kwargs,match", [
    ({"mode": "approximate"}, "mode must be"),
    ({"projection_dim": 0}, "projection_dim"),
    ({"projection_dim": 2.5}, "projection_dim"),
    ({"checkpoint_every": 0}, "checkpoint_every"),
    ({"checkpoint_every": "batch"}, "checkpoint_every"),
    ({"exact_indices": [1, 2]}, "exact_indices applies to mode='exact'"),
    ({"mode": "exact", "exact_indices": [0, N]}, r"exact_indices must lie in \[0, 30\)"),
    ({"mode": "exact", "exact_indices": [1, 1]}, "duplicates"),
    ({"store_dtype": "bfloat16"}, "store_dtype"),
    ({"loss_fn": "cross_entropy"}, "loss_fn must be a callable"),
])
def test_bad_options(tmp_path, kwargs, match):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TrackingConfigError, match=match):
        hydra_nb.track(model, loader_of(), store=tmp_path / "a.zarr", optimizer=opt, **kwargs)


def test_optimizer_of_another_model(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(mlp().parameters(), lr=0.1)
    with pytest.raises(TrackingConfigError, match="not parameters of the model"):
        hydra_nb.track(model, loader_of(), store=tmp_path / "a.zarr", optimizer=opt)


def test_exact_mode_refuses_dropout(tmp_path):
    model = nn.Sequential(nn.Linear(D_IN, 6), nn.Dropout(0.5), nn.Linear(6, C))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TrackingConfigError, match="dropout"):
        hydra_nb.track(model, loader_of(), store=tmp_path / "a.zarr", optimizer=opt, mode="exact")


def test_fast_mode_handles_dropout(tmp_path):
    model = nn.Sequential(nn.Linear(D_IN, 6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, C))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = loader_of()
    with hydra_nb.track(model, loader, store=tmp_path / "a.zarr", optimizer=opt, strict=True):
        train(model, loader, opt)
    assert hydra_nb.open_store(tmp_path / "a.zarr").status == "complete"


def test_exact_mode_loss_mismatch(tmp_path):
    model = mlp().double()
    ds = TensorDataset(data().tensors[0].double(), data().tensors[1])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = loader_of(ds)
    snap = snapshot(model)
    with pytest.raises(TrackingConfigError, match="not a per-sample weighted sum of loss_fn"):
        with hydra_nb.track(model, loader, store=tmp_path / "a.zarr", optimizer=opt, mode="exact"):
            for x, y in loader:  # the loop trains on a squared loss, but loss_fn defaults to cross-entropy
                opt.zero_grad()
                ((model(x) - F.one_hot(y, C)) ** 2).sum(1).mean().backward()
                opt.step()
    assert unchanged(model, snap)


def test_exact_mode_loss_fn_must_be_per_sample(tmp_path):
    model = mlp().double()
    ds = TensorDataset(data().tensors[0].double(), data().tensors[1])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = loader_of(ds)
    with pytest.raises(TrackingConfigError, match="one loss per sample"):
        with hydra_nb.track(model, loader, store=tmp_path / "a.zarr", optimizer=opt, mode="exact",
                            loss_fn=F.cross_entropy):
            train(model, loader, opt)


def test_step_with_closure_refused(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = loader_of()
    with pytest.raises(TrackingConfigError, match="closure"):
        with hydra_nb.track(model, loader, store=tmp_path / "a.zarr", optimizer=opt):
            for x, y in loader:
                def closure():
                    opt.zero_grad()
                    loss = F.cross_entropy(model(x), y)
                    loss.backward()
                    return loss
                opt.step(closure)


# -- store paths ------------------------------------------------------------------------

def _run(tmp_path, name="a.zarr", **kw):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = loader_of()
    with hydra_nb.track(model, loader, store=tmp_path / name, optimizer=opt, **kw):
        train(model, loader, opt)
    return model


def test_existing_run_needs_overwrite(tmp_path):
    _run(tmp_path)
    first = hydra_nb.open_store(tmp_path / "a.zarr").meta["run_id"]
    with pytest.raises(TrackingConfigError, match="overwrite=True"):
        _run(tmp_path)
    assert hydra_nb.open_store(tmp_path / "a.zarr").meta["run_id"] == first  # untouched
    _run(tmp_path, overwrite=True)
    assert hydra_nb.open_store(tmp_path / "a.zarr").meta["run_id"] != first


def test_foreign_folder_is_never_overwritten(tmp_path):
    folder = tmp_path / "a.zarr"
    folder.mkdir()
    (folder / "thesis.tex").write_text("precious")
    with pytest.raises(TrackingConfigError, match="not a hydra_nb store"):
        _run(tmp_path, overwrite=True)
    assert (folder / "thesis.tex").read_text() == "precious"


def test_store_path_is_a_file(tmp_path):
    (tmp_path / "a.zarr").write_text("x")
    with pytest.raises(TrackingConfigError, match="is a file"):
        _run(tmp_path)


def test_open_store_errors(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        hydra_nb.open_store(tmp_path / "missing.zarr")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="not a hydra_nb store"):
        hydra_nb.open_store(tmp_path / "empty")
    _run(tmp_path)
    meta_file = tmp_path / "a.zarr" / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["attributes"]["hydra_nb"]["schema_version"] = 99
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="schema version 99.*Upgrade hydra_nb"):
        hydra_nb.open_store(tmp_path / "a.zarr")


def test_store_holds_only_json_and_arrays(tmp_path):
    _run(tmp_path)
    files = [p for p in (tmp_path / "a.zarr").rglob("*") if p.is_file()]
    assert files
    for p in files:
        if p.name in ("zarr.json", "hydra_nb.lock"):
            json.loads(p.read_text())  # metadata (and the writer lock's note) is plain JSON
        else:  # everything else is a zarr chunk: <array>/c/<i>/<j>
            assert "c" in p.relative_to(tmp_path / "a.zarr").parts[:-1], p
        assert not p.read_bytes().startswith(b"\x80")  # no pickle stream anywhere


def test_query_with_wrong_architecture(tmp_path):
    _run(tmp_path)
    store = hydra_nb.open_store(tmp_path / "a.zarr")
    x, y = data()[:2]
    with pytest.raises(ValueError, match="does not match the store"):
        store.contributions(nn.Sequential(nn.Linear(D_IN, 7), nn.Tanh(), nn.Linear(7, C)), x, y)


def test_custom_loss_must_be_given_to_queries(tmp_path):
    def half_ce(out, y):
        return 0.5 * F.cross_entropy(out, y, reduction="none")

    model = _run(tmp_path, loss_fn=half_ce)
    x, y = data()[:2]
    with pytest.raises(ValueError, match="custom loss_fn"):
        hydra_nb.open_store(tmp_path / "a.zarr").contributions(model, x, y)
    a = hydra_nb.open_store(tmp_path / "a.zarr", loss_fn=half_ce).contributions(model, x, y)
    b = hydra_nb.open_store(tmp_path / "a.zarr", loss_fn=lambda o, t: F.cross_entropy(o, t, reduction="none")
                            ).contributions(model, x, y)
    assert np.allclose(2 * a, b, rtol=1e-5, atol=1e-9)


@pytest.fixture
def tabular_store(tmp_path):
    model = _run(tmp_path)
    return model, hydra_nb.open_store(tmp_path / "a.zarr")


QUERIES = {
    "contributions": lambda store, model, x, y: store.contributions(model, x, y),
    "top_k": lambda store, model, x, y: store.top_k(model, x, y, k=2),
    "trajectory": lambda store, model, x, y: store.trajectory(model, x, y, [0, 1]),
    "class_matrix": lambda store, model, x, y: store.class_matrix(model, data().tensors[1], x, y),
    "test_gradients": lambda store, model, x, y: store.test_gradients(model, x, y),
}


@pytest.mark.parametrize("query", sorted(QUERIES))
def test_queries_check_their_inputs_and_say_what_was_expected(tabular_store, query):
    """Each Store entry point refuses bad test points before any work, naming what the model expects."""
    model, store = tabular_store
    x, y = data()[:4]
    ask = QUERIES[query]
    # a feature too many: once "mat1 and mat2 shapes cannot be multiplied"
    with pytest.raises(ValueError, match=r"first layer, Linear\(5 → 6\), takes 5 features per sample, inputs of "
                                         r"shape \(n, 5\); these have 6\. Pass the feature columns"):
        ask(store, model, torch.cat([x, x[:, :1]], 1), y)
    # one sample without its batch dimension: once "IndexError: tuple index out of range"
    with pytest.raises(ValueError, match=r"targets is one value .*a single sample needs its batch dimension: pass "
                                         r"x\[None\]"):
        ask(store, model, x[0], y[0])
    with pytest.raises(ValueError, match=r"inputs \(5\) and targets \(1\) differ in length; a single sample needs"):
        ask(store, model, x[0], y[:1])
    # float class labels: once a torch dtype error
    with pytest.raises(ValueError, match=r"targets are float32; the default loss \(cross-entropy\) takes class "
                                         r"indices, as integers: pass targets.long\(\)"):
        ask(store, model, x, y.float())


def test_self_influence_checks_the_training_set(tabular_store):
    model, store = tabular_store
    x, y = data().tensors
    with pytest.raises(ValueError, match=r"cannot run on these training samples .*takes 5 features per sample"):
        store.self_influence(model, (x[:, :4], y))
    with pytest.raises(ValueError, match=r"loss cannot be computed for these training samples.*targets.long\(\)"):
        store.self_influence(model, (x, y.double()))


def test_queries_take_pandas_data(tabular_store):
    """A DataFrame of features and a Series of labels give the same numbers as the tensors they hold."""
    import pandas as pd  # a test dependency (the package itself never imports it)
    model, store = tabular_store
    x, y = data()[:4]
    frame = pd.DataFrame(x.double().numpy(), columns=[f"f{i}" for i in range(D_IN)])
    np.testing.assert_allclose(store.contributions(model, frame, pd.Series(y.numpy())),
                               store.contributions(model, x, y), rtol=1e-5, atol=1e-9)
    train_x, train_y = data().tensors
    train_frame = pd.DataFrame(train_x.numpy(), columns=[f"f{i}" for i in range(D_IN)])
    np.testing.assert_allclose(store.self_influence(model, (train_frame, pd.Series(train_y.numpy()))),
                               store.self_influence(model, (train_x, train_y)), rtol=1e-5, atol=1e-9)
    frame["colour"] = ["red", "green", "blue", "red"]
    with pytest.raises(ValueError, match=r"inputs: the pandas values are not numeric \(columns colour\)\. Encode"):
        store.contributions(model, frame, y)


# -- failures in the middle of training ---------------------------------------------------

def _train_with_clipping_from(model, loader, opt, start, epochs=2):
    step = 0
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if step >= start:  # gradient clipping changes .grad after the backward: not trackable
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
            opt.step()
            step += 1
    return step


def test_late_failure_warns_and_training_goes_on(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = loader_of()
    with pytest.warns(TrackingStoppedWarning, match="stopped tracking at step 5.*do not add up"):
        with hydra_nb.track(model, loader, store=tmp_path / "a.zarr", optimizer=opt, checkpoint_every=2):
            steps = _train_with_clipping_from(model, loader, opt, start=5)
    assert steps == 8
    store = hydra_nb.open_store(tmp_path / "a.zarr")
    assert store.steps == 5 and store.status.startswith("stopped at step 5")
    assert list(store.checkpoint_steps) == [0, 2, 4, 5]
    x, y = data()[:3]
    assert np.isfinite(store.contributions(model, x, y)).all()
    # the stored final parameters are those at step 5, not the model's current ones
    assert not np.allclose(store.params_at(-1), torch.cat([p.detach().flatten() for p in model.parameters()]).numpy())


def test_grad_changed_at_one_unsampled_step_is_caught_at_that_step(tmp_path):
    """The .grad check runs at sampled steps, and at any step whose .grad was changed after its backward:
    clipping at step 6 alone (not a sampled step) stops tracking at step 6, before anything of it is recorded."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = loader_of()
    clip = lambda step: step == 6 and torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)  # noqa: E731
    with pytest.warns(TrackingStoppedWarning, match="stopped tracking at step 6.*do not add up"):
        with hydra_nb.track(model, loader, store=tmp_path / "a.zarr", optimizer=opt, checkpoint_every=2) as run:
            train(model, loader, opt, epochs=3, on_step=clip)
    assert run.step == 6 and hydra_nb.open_store(tmp_path / "a.zarr").steps == 6


def test_grad_change_through_autograd_is_caught_at_the_next_sampled_step(tmp_path):
    """A loss term on the parameters reaches .grad through autograd, which only the check sees: begun at
    step 5, it is caught at step 16 (checks: steps 0–2, then every 16th on the CPU), and the warning says
    which steps went unchecked. From the first step on it is refused at once (test_manual_l2_penalty_...)."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = loader_of()
    checked = []
    with pytest.warns(TrackingStoppedWarning, match="stopped tracking at step 16.*Steps 3–15 were recorded without"):
        with hydra_nb.track(model, loader, store=tmp_path / "a.zarr", optimizer=opt) as run:
            real = run.capture.check
            run.capture.check = lambda *a, **k: checked.append(run.step) or real(*a, **k)
            for epoch in range(6):
                for x, y in loader:
                    opt.zero_grad()
                    loss = F.cross_entropy(model(x), y)
                    if run.step >= 5 or not run.active:
                        loss = loss + 1e-2 * sum((p ** 2).sum() for p in model.parameters())
                    loss.backward()
                    opt.step()
    assert checked == [0, 1, 2, 16] and run.step == 16


def test_several_backwards_before_a_step_are_checked_at_any_step(tmp_path):
    """Gradients zeroed by hand between two backwards of one batch at step 7 (not a sampled step): .grad holds
    the second backward alone while the batch's rows hold both, and the check, which runs whenever several
    backwards reached .grad, says so at step 7."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = loader_of()
    with pytest.warns(TrackingStoppedWarning, match="stopped tracking at step 7.*do not add up"):
        with hydra_nb.track(model, loader, store=tmp_path / "a.zarr", optimizer=opt) as run:
            step = 0
            for epoch in range(3):
                for x, y in loader:
                    opt.zero_grad()
                    if step == 7:  # a backward whose gradients are then thrown away by hand
                        F.cross_entropy(model(x), y).backward()
                        for p in model.parameters():
                            p.grad = None
                    F.cross_entropy(model(x), y).backward()
                    opt.step()
                    step += 1
    assert run.step == 7


def test_late_failure_strict_raises(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = loader_of()
    with pytest.raises(TrackingFailure, match="step 3"):
        with hydra_nb.track(model, loader, store=tmp_path / "a.zarr", optimizer=opt, strict=True):
            _train_with_clipping_from(model, loader, opt, start=3)
    store = hydra_nb.open_store(tmp_path / "a.zarr")
    assert store.steps == 3


def test_disk_failure_keeps_committed_prefix(tmp_path, monkeypatch):
    from zarr.storage import LocalStore

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = loader_of()
    calls = {"n": 0}
    original = LocalStore.set

    async def failing_set(self, key, value):
        if key.startswith("checkpoints/params/c/"):
            calls["n"] += 1
            if calls["n"] == 3:  # the third checkpoint: disk full
                raise OSError(28, "No space left on device")
        return await original(self, key, value)

    monkeypatch.setattr(LocalStore, "set", failing_set)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with hydra_nb.track(model, loader, store=tmp_path / "a.zarr", optimizer=opt, checkpoint_every=2):
            steps = train(model, loader, opt, epochs=3)
    assert steps == 12
    assert any(issubclass(w.category, TrackingStoppedWarning) and "No space left" in str(w.message) for w in caught)
    monkeypatch.undo()
    store = hydra_nb.open_store(tmp_path / "a.zarr")
    assert list(store.checkpoint_steps) == [0, 2]
    x, y = data()[:3]
    assert store.contributions(model, x, y).shape == (3, N)


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_exception_in_loop_leaves_consistent_store(tmp_path, exc):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = loader_of()
    with pytest.raises(type(exc)):
        with hydra_nb.track(model, loader, store=tmp_path / "a.zarr", optimizer=opt):
            for i, (x, y) in enumerate(loader):
                if i == 3:
                    raise exc
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
    store = hydra_nb.open_store(tmp_path / "a.zarr")
    assert store.steps == 3 and store.status.startswith("interrupted at step 3")
    x, y = data()[:2]
    assert store.contributions(model, x, y).shape == (2, N)


def test_everything_is_restored_after_tracking(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = loader_of(shuffle=True)
    cls, sampler = type(loader), loader.batch_sampler
    with hydra_nb.track(model, loader, store=tmp_path / "a.zarr", optimizer=opt):
        assert type(loader) is not cls
        train(model, loader, opt)
    assert type(loader) is cls and loader.batch_sampler is sampler
    assert "zero_grad" not in vars(opt) and "zero_grad" not in vars(model)
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert not any(m._forward_hooks for m in model.modules())
    assert "_hydra_tap" not in vars(loader)


def test_validation_forward_inside_loop_is_ignored(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = loader_of()
    x_val, _ = data()[:5]
    with hydra_nb.track(model, loader, store=tmp_path / "a.zarr", optimizer=opt, strict=True):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            with torch.no_grad():
                model(x_val)  # 5 samples: would not match the batch if it were captured
            model.eval()
            model(x_val)
            model.train()
    assert hydra_nb.open_store(tmp_path / "a.zarr").status == "complete"


def test_sampler_with_bad_indices_late_does_not_kill_training(tmp_path):
    class Sampler(torch.utils.data.Sampler):
        def __init__(self):
            self.calls = 0

        def __iter__(self):
            self.calls += 1
            batches = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
            if self.calls == 2:  # second epoch: the sampler goes wrong (an index past the dataset)
                batches[1] = [4, 5, 6, 99]
            for b in batches:
                yield b

        def __len__(self):
            return 3

    class Lenient(torch.utils.data.Dataset):  # serves any index, like a dataset with a wrong __len__
        def __len__(self):
            return N

        def __getitem__(self, i):
            return data().tensors[0][i % N], data().tensors[1][i % N]

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(Lenient(), batch_sampler=Sampler())
    with pytest.warns(TrackingStoppedWarning, match="outside the dataset"):
        with hydra_nb.track(model, loader, store=tmp_path / "a.zarr", optimizer=opt):
            steps = train(model, loader, opt, epochs=2)
    assert steps == 6
    assert hydra_nb.open_store(tmp_path / "a.zarr").steps == 4


def test_unexpected_hook_error_does_not_reach_the_forward(tmp_path, monkeypatch):
    from hydra_nb import capture

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = loader_of()
    real = capture.GradientCapture._pass_for

    def flaky(self, batch_size):
        if self.tap.current is not None and self.tap.current.generation == 5:  # during the 5th forward: an internal error
            raise RuntimeError("internal")
        return real(self, batch_size)

    monkeypatch.setattr(capture.GradientCapture, "_pass_for", flaky)
    with pytest.warns(TrackingStoppedWarning, match="internal"):
        with hydra_nb.track(model, loader, store=tmp_path / "a.zarr", optimizer=opt):
            steps = train(model, loader, opt, epochs=2)
    assert steps == 8
    assert hydra_nb.open_store(tmp_path / "a.zarr").steps == 4


def test_queries_work_with_a_loss_vmap_cannot_batch(tmp_path):
    def squared_error(out, y):  # F.one_hot has no vmap rule: queries fall back to a per-sample loop
        return ((out - F.one_hot(y, C).to(out.dtype)) ** 2).sum(1)

    model = _run(tmp_path, loss_fn=squared_error)
    x, y = data()[:3]
    store = hydra_nb.open_store(tmp_path / "a.zarr", loss_fn=squared_error)
    g = store.test_gradients(model, x, y)
    for j in range(3):  # equal to plain autograd at the stored parameters
        m = mlp()
        torch.nn.utils.vector_to_parameters(torch.from_numpy(store.params_at(-1)), m.parameters())
        expect = torch.autograd.grad(squared_error(m(x[j:j + 1]), y[j:j + 1]).sum(), list(m.parameters()))
        assert torch.allclose(g[j], torch.cat([e.flatten() for e in expect]), atol=1e-6)
    assert np.isfinite(store.contributions(model, x, y)).all()


def test_loader_is_freed_after_tracking(tmp_path):
    import gc
    import weakref

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = loader_of()
    with hydra_nb.track(model, loader, store=tmp_path / "a.zarr", optimizer=opt) as run:
        train(model, loader, opt)
    assert run.step == 4
    ref = weakref.ref(loader)
    gc.collect()
    gc.disable()
    try:
        del loader, run
        assert ref() is None  # freed by reference counting (persistent workers stop at once), not by the GC
    finally:
        gc.enable()


@pytest.mark.parametrize("penalty", [1e-2, 1e-4])
def test_manual_l2_penalty_is_refused_at_the_first_step(tmp_path, penalty):
    # a hand-written L2 term changes .grad without going through any layer: its share of .grad is small
    # (about 1e-3 relative for the smaller penalty) and must still be caught before any update
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = loader_of()
    snap = snapshot(model)
    with pytest.raises(TrackingConfigError, match="weight_decay"):
        with hydra_nb.track(model, loader, store=tmp_path / "a.zarr", optimizer=opt):
            for x, y in loader:
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y) + penalty * sum((p ** 2).sum() for p in model.parameters())
                loss.backward()
                opt.step()
    assert unchanged(model, snap)


def test_a_slow_disk_makes_training_wait_and_says_so(tmp_path, monkeypatch):
    """The writer stalls (a slow disk) until training has filled its queue, then for WRITER_STALL seconds:
    training must wait at least that long, whatever the speed of the machine (ordering, not timing)."""
    from hydra_nb import magic
    from hydra_nb.store import StoreWriter

    real = StoreWriter._on_step
    stalled = []

    def slow_step(self, *args):
        if not stalled:
            stalled.append(True)
            assert _SmallQueue.training_blocked.wait(60), "training never found the writer's queue full"
            time.sleep(WRITER_STALL)  # training is blocked in put() all this while: nothing takes from the queue
        return real(self, *args)

    monkeypatch.setattr(StoreWriter, "_on_step", slow_step)
    import hydra_nb.store as store_module

    _SmallQueue.training_blocked.clear()
    monkeypatch.setattr(store_module, "queue", _SmallQueue)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = loader_of()
    with hydra_nb.track(model, loader, store=tmp_path / "a.zarr", optimizer=opt) as run:
        train(model, loader, opt, epochs=3)
    assert run.writer.wait_seconds >= WRITER_STALL
    assert "waited" in magic._describe(run) and "store writer" in magic._describe(run)
    assert hydra_nb.open_store(tmp_path / "a.zarr").steps == 12  # nothing lost


WRITER_STALL = 0.2


class _SmallQueue:
    """The queue module, with queues of two items whose blocking put() says that the queue was full."""

    import queue as _q
    import threading as _threading
    Full = _q.Full
    training_blocked = _threading.Event()

    class _Queue(_q.Queue):
        def put(self, item, block=True, timeout=None):
            if block and self.full():
                _SmallQueue.training_blocked.set()
            super().put(item, block, timeout)

    @staticmethod
    def Queue(maxsize=0):
        return _SmallQueue._Queue(maxsize=2)
