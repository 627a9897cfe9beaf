"""``TrackOptions``: defaults shared with ``track``, every check, ``config()`` as stores hold it, the resume check."""

import dataclasses
import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import hydra_nb
from hydra_nb.errors import TrackingConfigError
from hydra_nb.options import OptionError, TrackOptions
from hydra_nb.tracker import Tracker


def test_track_defaults_are_the_dataclass_defaults():
    """``track``/``Tracker`` keep their public signature; their defaults must be TrackOptions' (one source of truth)."""
    signature = inspect.signature(Tracker.__init__).parameters
    for f in dataclasses.fields(TrackOptions):
        assert f.name in signature, f"Tracker.__init__ has no keyword for the option {f.name}"
        assert signature[f.name].default == f.default, f.name
        assert f.metadata["help"], f.name
    options = set(signature) - {"self", "model", "loader", "store", "optimizer"}
    assert options == {f.name for f in dataclasses.fields(TrackOptions)}
    track_params = inspect.signature(hydra_nb.track).parameters
    for name in ("mode", "projection_dim", "exact_indices", "loss_fn", "checkpoint_every"):
        assert track_params[name].default == TrackOptions.__dataclass_fields__[name].default


def test_frozen_and_normalised():
    options = TrackOptions(mode="exact", exact_indices=range(3, 9, 2), resume=1)
    assert options.exact_indices == (3, 5, 7) and options.resume is True
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.mode = "fast"
    np.testing.assert_array_equal(options.tracked_indices(10), [3, 5, 7])
    np.testing.assert_array_equal(TrackOptions(mode="exact").tracked_indices(4), np.arange(4))
    with pytest.raises(TrackingConfigError, match=r"exact_indices must lie in \[0, 6\)"):
        options.tracked_indices(6)
    assert TrackOptions(exact_indices=np.array([1, 2]), mode="exact") == TrackOptions(exact_indices=[1, 2], mode="exact")


BAD = [
    ({"mode": "approximate"}, "mode must be 'fast', 'exact' or 'replay', got 'approximate'.", "--mode must be"),
    ({"projection_dim": 0}, "projection_dim must be positive: an int ≥ 1", "--dim must be positive"),
    ({"projection_dim": 2.5}, "projection_dim must be positive", "--dim must be positive"),
    ({"projection_dim": True}, "projection_dim must be positive", "--dim must be positive"),
    ({"checkpoint_every": 0}, "checkpoint_every must be 'epoch' or a positive number", "--checkpoint-every must be"),
    ({"checkpoint_every": "batch"}, "checkpoint_every must be 'epoch'", "--checkpoint-every must be"),
    ({"loss_fn": "cross_entropy"}, "loss_fn must be a callable (outputs, targets) -> per-sample losses; got str, "
                                   "which is not a callable.", None),
    ({"seed": 1.5}, "seed must be an int", "--seed must be an int"),
    ({"store_dtype": "bfloat16"}, "store_dtype must be one of ['float16', 'float32', 'float64'], got 'bfloat16'.",
     "--store-dtype must be"),
    ({"hvp_batch": 0}, "hvp_batch must be a positive int, got 0.", "--hvp-batch must be"),
    ({"hvp_method": "fast"}, "hvp_method must be one of ('auto', 'vmap', 'loop'), got 'fast'.", "--hvp-method must"),
    ({"on_step": 3}, "on_step must be a callable taking the Tracker.", None),
    ({"batch_fn": "x"}, "batch_fn must be a callable: loader batch -> (inputs, targets).", None),
    ({"resume": True, "overwrite": True}, "resume=True and overwrite=True exclude each other: pick one.",
     "--resume and --overwrite exclude each other"),
    ({"batchnorm": True}, "batchnorm must be 'fixed' (per-sample gradients with the batch statistics held constant) or "
                          "'exact'", "--batchnorm must be"),
]


@pytest.mark.parametrize("kwargs,message,flagged", BAD, ids=[next(iter(k)) for k, _, _ in BAD])
def test_each_check_says_what_is_wrong(kwargs, message, flagged):
    with pytest.raises(OptionError) as info:
        TrackOptions(**kwargs)
    assert message in str(info.value)
    assert isinstance(info.value, TrackingConfigError)
    if flagged is not None:  # the magic names the options by their flags
        from hydra_nb.magic import _flag_of

        assert flagged in info.value.spelled(_flag_of)


@pytest.mark.parametrize("kwargs,message", [
    ({"exact_indices": [1, 2]}, "exact_indices applies to mode='exact' only"),
    ({"mode": "exact", "exact_indices": []}, "non-empty list of integer dataset indices"),
    ({"mode": "exact", "exact_indices": [1.5]}, "non-empty list of integer dataset indices"),
    ({"mode": "exact", "exact_indices": [1, 1]}, "exact_indices contains duplicates."),
])
def test_exact_indices_checks(kwargs, message):
    with pytest.raises(TrackingConfigError, match=message):
        TrackOptions(**kwargs)


def _train(path, **options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    data = TensorDataset(torch.randn(12, 4), torch.randint(0, 3, (12,)))
    loader = DataLoader(data, batch_size=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with hydra_nb.track(model, loader, store=path, optimizer=opt, strict=True, **options) as tracker:
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return tracker, hydra_nb.open_store(path)


def test_config_is_what_the_store_holds(tmp_path):
    def nll(outputs, targets):
        return F.nll_loss(F.log_softmax(outputs, -1), targets, reduction="none")

    tracker, store = _train(tmp_path / "a.zarr", projection_dim=8, seed=4, checkpoint_every=np.int64(2),
                            loss_fn=nll, store_dtype="float16")
    assert store.meta["config"] == {
        "projection_dim": 8, "seed": 4, "checkpoint_every": 2, "store_dtype": "float16", "loss_fn": "nll",
        "custom_loss": True, "batch_size": 4, "torch_version": torch.__version__, "device": "cpu", "batchnorm": None}
    assert store.meta["config"] == tracker.options.config(store_dtype="float16", batchnorm=None, batch_size=4,
                                                          device="cpu")
    _, default = _train(tmp_path / "b.zarr")
    assert default.meta["config"]["store_dtype"] == "float32" and default.meta["config"]["loss_fn"] == "cross_entropy"
    assert default.meta["config"]["projection_dim"] == 1024 and default.meta["config"]["checkpoint_every"] == "epoch"


def _meta(**changes):
    config = TrackOptions().config(store_dtype="float32", batchnorm=None, batch_size=4, device="cpu")
    meta = {"optimizer": "SGD", "mode": "fast", "n_train": 12, "params": [{"name": "w"}], "config": config}
    for key, value in changes.items():
        if key in config:
            meta["config"] = {**config, key: value}
        else:
            meta[key] = value
    return meta


@pytest.mark.parametrize("changes,problem", [
    ({"optimizer": "AdamW"}, "it was tracked with AdamW, this is SGD"),
    ({"mode": "exact"}, "it was tracked in exact mode, this is fast mode"),
    ({"n_train": 30}, "its dataset has 30 samples, this loader's has 12"),
    ({"params": []}, "its model has other parameters (names, shapes or optimizer groups)"),
    ({"projection_dim": None}, "it used projection_dim=None, this is 1024"),
    ({"store_dtype": "float16"}, "it stores float16 rows, this would store float32"),
    ({"batchnorm": "fixed"}, "it used batchnorm='fixed', this is None"),
])
def test_check_resume_names_each_difference(changes, problem):
    options = TrackOptions()
    options.check_resume("runs/a.zarr", _meta(), _meta())  # the same run: accepted
    with pytest.raises(TrackingConfigError) as info:
        options.check_resume("runs/a.zarr", _meta(**changes), _meta())
    assert str(info.value) == (f"Cannot resume 'runs/a.zarr': {problem}. Resume with the same model, dataset and "
                               "options, or start a new run (overwrite=True or another store path).")
    stored = _meta()
    del stored["optimizer"]  # stores written before the key existed are SGD's
    options.check_resume("runs/a.zarr", stored, _meta())


def test_check_resume_compares_exact_indices():
    exact = TrackOptions(mode="exact", exact_indices=[1, 2])
    meta = _meta(mode="exact")
    exact.check_resume("a", meta, meta, np.array([1, 2]), np.array([1, 2]))
    with pytest.raises(TrackingConfigError, match="it tracks other exact_indices"):
        exact.check_resume("a", meta, meta, np.array([1, 3]), np.array([1, 2]))
