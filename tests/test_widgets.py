"""The explorer's Python side without a front end: requests in, JSON + binary buffers out.

Every answer is checked against the query API it wraps (``Store.top_k``, ``trajectory``,
``self_influence``, ``class_matrix``), or against a brute-force ranking of ``contributions``. Also:
the wire format, the dataset adaptors, live mode during a real tracked run, the matplotlib views,
the committed bundle (rebuilt from js/) and the wheel that carries it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

import hydra_nb
from hydra_nb.examples import MLP, SmallCNN, load_digits
from hydra_nb.widgets import Explorer, explore
from hydra_nb.data import Samples, short_number
from hydra_nb.widgets.wire import pack, put_buffers, split_buffers, unpack

REPO = Path(__file__).resolve().parents[1]
STATIC = REPO / "hydra_nb" / "widgets" / "static"


# -- a small tracked run ---------------------------------------------------------------------------
def _train(path, n_train=300, epochs=2, checkpoint_every="epoch", on_step=None, seed=0):
    torch.manual_seed(seed)
    x_tr, y_tr, x_te, y_te = load_digits(seed=0)
    x_tr, y_tr = x_tr[:n_train], y_tr[:n_train]
    loader = DataLoader(TensorDataset(x_tr, y_tr), batch_size=32, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with hydra_nb.track(model, loader, store=path, optimizer=opt, projection_dim=128,
                        checkpoint_every=checkpoint_every, overwrite=True, on_step=on_step):
        for _ in range(epochs):
            for x, y in loader:
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
    return model, (x_tr, y_tr), (x_te[:60], y_te[:60])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("widgets") / "digits.zarr"
    model, train, test = _train(path)
    return hydra_nb.open_store(path), model, train, test


class Front:
    """A stand-in for the browser: sends requests the way js/src/rpc.js does, decodes answers as wire.js does."""

    def __init__(self, widget: Explorer):
        self.widget, self.sent, self.next_id = widget, [], 1
        widget.send = lambda content, buffers=None: self.sent.append((content, list(buffers or [])))

    def raw(self, method, **params):
        rid, self.next_id = self.next_id, self.next_id + 1
        self.sent.clear()
        msg = {"content": {"data": {"method": "custom", "content": {"type": "request", "id": rid, "method": method,
                                                                     "params": params}}}, "buffers": []}
        self.widget._handle_msg(msg)  # the path a comm message takes in ipywidgets
        replies = [(c, b) for c, b in self.sent if c.get("id") == rid]
        assert replies and replies[-1][0]["type"] == "response"
        return replies

    def ask(self, method, **params):
        content, buffers = self.raw(method, **params)[-1]
        assert content["ok"], content.get("error")
        json.dumps(content)  # the JSON part really is JSON
        _no_float_lists(content)
        assert all(isinstance(b, memoryview) for b in buffers)
        return _decode(put_buffers(content["result"], content["buffer_paths"], buffers))


def _no_float_lists(value):
    if isinstance(value, list):
        assert not any(isinstance(v, float) for v in value), f"a JSON list of floats: {value[:5]}"
        for v in value:
            _no_float_lists(v)
    elif isinstance(value, dict):
        for v in value.values():
            _no_float_lists(v)


def _decode(value):
    if isinstance(value, dict) and set(value) == {"dtype", "shape", "data"}:
        return unpack(value)
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


@pytest.fixture(scope="module")
def front(run):
    store, model, train, test = run
    return Front(explore(store, model, test, train, k=5))


# -- the protocol ----------------------------------------------------------------------------------
def test_gallery_page_is_binary_and_lazy(run, front):
    store, model, train, test = run
    page = front.ask("gallery", offset=10, limit=20)
    assert page["total"] == 60 and page["offset"] == 10
    np.testing.assert_array_equal(page["indices"], np.arange(10, 30))
    np.testing.assert_array_equal(page["labels"], test[1][10:30].numpy())
    assert page["thumbs"].dtype == np.uint8 and page["thumbs"].shape == (20, 8, 8, 1)
    m = SmallCNN()
    store.load_params(m)
    with torch.no_grad():
        pred = m.eval()(test[0][10:30]).argmax(1).numpy()
    np.testing.assert_array_equal(page["predicted"], pred)
    wrong = front.ask("gallery", filter="misclassified", limit=500)
    assert (wrong["predicted"] != wrong["labels"]).all()
    sevens = front.ask("gallery", filter="class:7", limit=500)
    assert (sevens["labels"] == 7).all() and sevens["total"] == int((test[1] == 7).sum())


def test_rankings_preview_then_exact_by_replay(run, front):
    """A fast store that replays: the cards come first as the fast preview, labelled, naming the exact mode to ask
    for next; that answer is the exact one by replay, for every training sample."""
    store, model, train, test = run
    assert store.replays and front.widget.mode_for() == "replay" and front.widget.preview_mode() == "fast"
    preview = front.ask("rankings", test=3, k=5, sort="both")
    assert preview["mode"] == "fast" and preview["upgrade"] == "replay"
    exact = front.ask("rankings", test=3, k=5, sort="both", mode="replay")
    assert exact["mode"] == "replay" and exact["upgrade"] is None and exact["candidates"] == 300
    values = store.contributions(model, test[0][3:4], test[1][3:4], mode="exact", train_data=train, progress=False)[0]
    order = np.argsort(-values)[:5]
    np.testing.assert_array_equal(exact["groups"]["helpful"]["indices"], order)
    np.testing.assert_allclose(exact["groups"]["helpful"]["scores"], values[order], rtol=1e-6, atol=1e-9)
    traj = front.ask("trajectory", test=3, train=[int(order[0])], mode="replay")
    _, ref = store.trajectory(model, test[0][3:4], test[1][3:4], [int(order[0])], mode="exact", train_data=train,
                              progress=False)
    assert traj["mode"] == "replay"
    np.testing.assert_allclose(traj["values"][:, 0], ref[0, :, 0], rtol=1e-6, atol=1e-9)


def test_verify_retrains_without_the_cards_by_replay(run, front):
    """The "what if" button: the selected test sample's loss and prediction after retraining (by replay, same
    batches) without some training samples, beside the change their contributions predicted."""
    store, model, train, test = run
    remove = [1, 7]
    r = front.ask("verify", test=3, train=remove)
    without = store.replay_without(model, remove, train_data=train, progress=False)
    x, y = test[0][3:4], test[1][3:4]
    m = SmallCNN()
    store.load_params(m)
    with torch.no_grad():
        before = float(F.cross_entropy(m.eval()(x), y))
        after = float(F.cross_entropy(without(x), y))
    assert r["removed"] == remove and r["mode"] == "replay"
    assert r["loss_before"] == pytest.approx(before, rel=1e-5) and r["loss_after"] == pytest.approx(after, rel=1e-5)
    c = store.contributions(model, x, y, mode="exact", train_data=train, progress=False)[0]
    assert r["predicted_change"] == pytest.approx(float(c[remove].sum()), rel=1e-5, abs=1e-9)
    content, _ = front.raw("verify", test=3, train=[])[-1]
    assert not content["ok"] and "Pick one or more cards" in content["error"]


def test_rankings_equal_store_top_k(run, front):
    store, model, train, test = run
    top = store.top_k(model, test[0][3:4], test[1][3:4], k=5, progress=False)
    r = front.ask("rankings", test=3, k=5, sort="both")
    assert r["test"] == 3 and r["label"] == int(test[1][3]) and r["candidates"] == 300
    helpful, harmful = r["groups"]["helpful"], r["groups"]["harmful"]
    np.testing.assert_array_equal(helpful["indices"], top.helpful_indices[0])
    np.testing.assert_allclose(helpful["scores"], top.helpful_scores[0], rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(harmful["indices"], top.harmful_indices[0])
    np.testing.assert_allclose(harmful["scores"], top.harmful_scores[0], rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(helpful["labels"], train[1][top.helpful_indices[0]].numpy())
    assert helpful["thumbs"].shape == (5, 8, 8, 1)  # thumbnails of the 5 cards only


def test_absolute_sort_and_class_filter_match_brute_force(run, front):
    store, model, train, test = run
    row = store.contributions(model, test[0][7:8], test[1][7:8], progress=False)[0]
    labels = train[1].numpy()
    r = front.ask("rankings", test=7, k=6, sort="absolute", train_class=4)
    g = r["groups"]["absolute"]
    ids = np.flatnonzero(labels == 4)
    expect = ids[np.argsort(-np.abs(row[ids]), kind="stable")][:6]
    np.testing.assert_array_equal(np.sort(g["indices"]), np.sort(expect))
    assert (g["labels"] == 4).all() and r["candidates"] == len(ids)
    assert np.all(np.diff(np.abs(g["scores"])) <= 1e-12)
    harmful = front.ask("rankings", test=7, k=3, sort="harmful")["groups"]
    assert list(harmful) == ["harmful"]
    np.testing.assert_array_equal(harmful["harmful"]["indices"], np.argsort(row, kind="stable")[:3])


def test_trajectory_equals_store_trajectory(run, front):
    store, model, train, test = run
    r = front.ask("trajectory", test=2, train=[5, 17, 5])
    steps, values = store.trajectory(model, test[0][2:3], test[1][2:3], [5, 17, 5], progress=False)
    np.testing.assert_array_equal(r["steps"], steps)
    np.testing.assert_allclose(r["values"], values[0], rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(r["epochs"], store.checkpoint_steps[1:])  # checkpoint_every="epoch"
    assert r["epoch_exact"] is True
    # cached per (test, train) pair: a second call adds one new sample only
    r2 = front.ask("trajectory", test=2, train=[17, 40])
    np.testing.assert_allclose(r2["values"][:, 0], r["values"][:, 1])


def test_self_influence_pages_equal_store(run, front):
    store, model, train, test = run
    si = store.self_influence(model, train, progress=False)
    page = front.ask("self_influence", offset=0, limit=10)
    expect = np.argsort(-si, kind="stable")[:10]
    np.testing.assert_array_equal(page["indices"], expect)
    np.testing.assert_allclose(page["scores"], si[expect], rtol=1e-6)
    nxt = front.ask("self_influence", offset=10, limit=10, order="asc", train_class=2)
    ids = np.flatnonzero(train[1].numpy() == 2)
    np.testing.assert_array_equal(nxt["indices"], ids[np.argsort(si[ids], kind="stable")][10:20])
    assert nxt["total"] == len(ids)


def test_class_matrix_equals_store(run, front):
    store, model, train, test = run
    cm = store.class_matrix(model, train[1], test[0], test[1], progress=False)
    r = front.ask("class_matrix")
    np.testing.assert_array_equal(r["train_classes"], cm.train_classes)
    np.testing.assert_allclose(r["mean"], cm.mean, rtol=1e-6, equal_nan=True)
    assert r["mean"].shape == (len(cm.train_classes), len(cm.test_classes))


def test_errors_and_progress_messages(run, front):
    content, _ = front.raw("no_such_thing")[-1]
    assert content["ok"] is False and "unknown request" in content["error"]
    content, _ = front.raw("rankings", test=3, sort="sideways")[-1]
    assert content["ok"] is False and "sort" in content["error"]
    front.widget._clear_caches()
    replies = front.raw("rankings", test=11, k=3)
    kinds = [c["type"] for c, _ in replies]
    assert kinds[-1] == "response" and "progress" in kinds  # progress reports carry the request's id
    done = [c for c, _ in replies if c["type"] == "progress"][-1]
    assert done["done"] == done["total"]


def test_state_traits_and_bundle_path(run):
    store, model, train, test = run
    ex = explore(store, model, test, train, class_names=[f"digit {i}" for i in range(10)])
    esm = ex._esm if isinstance(ex._esm, str) else str(getattr(ex._esm, "contents", ""))
    assert "hydra-gallery-item" in esm and "hydra-heatmap" in esm  # anywidget read static/explorer.js
    assert ex.info["n_test"] == 60 and ex.info["test_kind"] == "image"
    assert ex.info["class_names"][3] == "digit 3" and ex.info["store"]["status"] == "complete"
    assert ex.info["train_classes"] == list(range(10))
    assert hydra_nb.explore is not None and isinstance(hydra_nb.explore(store, model, test, train), Explorer)


def test_a_path_without_a_run_waits(tmp_path, run):
    _, model, train, test = run
    ex = explore(tmp_path / "later.zarr", model, test, train)
    f = Front(ex)
    assert ex.info["store"] is None
    assert f.ask("gallery", limit=4)["thumbs"].shape == (4, 8, 8, 1)  # the gallery works before the run
    content, _ = f.raw("rankings", test=0)[-1]
    assert content["ok"] is False and "No run" in content["error"]


# -- wire format and data adaptors -----------------------------------------------------------------
def test_wire_round_trip():
    a = np.arange(12, dtype=np.int64).reshape(3, 4)
    msg = {"a": pack(a), "b": [pack(np.array([0.5, -1.0])), "text"], "n": np.int64(3)}
    body, paths, bufs = split_buffers(msg)
    assert paths == [["a", "data"], ["b", 0, "data"]] and body["n"] == 3
    json.dumps(body)
    back = put_buffers(body, paths, [bytes(b) for b in bufs])
    np.testing.assert_array_equal(unpack(back["a"]), a)
    assert unpack(back["a"]).dtype == np.int32 and back["b"][0]["dtype"] == "float64"
    with pytest.raises(TypeError):
        pack(np.array(["x"]))
    with pytest.raises(OverflowError):
        pack(np.array([2**40]))


def test_samples_images_text_tabular_and_datasets():
    rgb = Samples((torch.rand(4, 3, 100, 50), torch.tensor([0, 1, 2, 3])))
    t = rgb.thumbnails([1, 2])
    assert rgb.kind == "image" and t.shape == (2, 64, 32, 3) and t.dtype == np.uint8
    assert t.max() == 255 and t.min() == 0  # each image scaled to its own range
    grey = Samples((np.random.rand(5, 6, 7), np.arange(5)))
    assert grey.kind == "image" and grey.thumbnails([0]).shape == (1, 6, 7, 1)
    x5 = torch.randn(5, 3)
    rows = Samples((x5, torch.arange(5)))
    assert rows.kind == "tabular" and rows.feature_names == ["x0", "x1", "x2"] and "view" not in rows.view([0])
    order, _ = rows.salient([0], 3)  # a row as named items, the most unusual first (it was "[v0, v1, v2]")
    assert rows.texts([0])[0] == ", ".join(f"x{c} {short_number(x5[0, c])}" for c in order[0])
    texts = Samples((["a good film", "a bad film"], [1, 0]), encode=lambda s: torch.tensor([[len(x)] for x in s]))
    assert texts.kind == "text" and texts.texts([1]) == ["a bad film"]
    x, y = texts.batch([0, 1])
    assert x.tolist() == [[11], [10]] and y.tolist() == [1, 0]
    with pytest.raises(ValueError, match="encode"):
        Samples((["x", "y"], [0, 1])).batch([0])

    class NoTargets(Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.full((8, 8), float(i)), i % 2

    ds = Samples(NoTargets())
    assert ds.kind == "image" and ds.labels.tolist() == [0, 1, 0]
    assert ds.batch([2])[0].shape == (1, 8, 8)
    tds = Samples(TensorDataset(torch.randn(4, 5), torch.tensor([1, 1, 0, 0])))
    assert tds.kind == "tabular" and tds.label_of([0, 2]).tolist() == [1, 0]


def test_tabular_explorer_end_to_end(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(120, 6)
    y = (x[:, 0] > 0).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=20, shuffle=True)
    model = MLP(hidden=8, n_classes=2, n_inputs=6)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with hydra_nb.track(model, loader, store=tmp_path / "t.zarr", optimizer=opt, projection_dim=None):
        for _ in range(2):
            for xb, yb in loader:
                opt.zero_grad(); F.cross_entropy(model(xb), yb).backward(); opt.step()
    f = Front(explore(str(tmp_path / "t.zarr"), model, (x[:10], y[:10]), (x, y), class_names=["neg", "pos"]))
    r = f.ask("rankings", test=0, k=4)
    # feature rows travel as numbers (the cards draw named tables), not as texts or thumbnails
    helpful = r["groups"]["helpful"]
    assert helpful["features"].shape == (4, 6) and "thumbs" not in helpful and "texts" not in helpful
    np.testing.assert_array_equal(helpful["features"], x.double().numpy()[helpful["indices"]])
    assert f.ask("gallery", limit=3)["features"].shape == (3, 6)


def _tabular_run(path, mode="fast"):
    """A breast-cancer-like table: 6 named features of very different scales, 2 classes."""
    import pandas as pd  # a test dependency; hydra_nb itself never imports it

    torch.manual_seed(0)
    x = torch.randn(120, 6, dtype=torch.float64) * torch.tensor([1.0, 10.0, 0.01, 1000.0, 1.0, 0.1],
                                                                dtype=torch.float64)
    y = (x[:, 0] > 0).long()
    names = ["mean radius", "mean texture", "mean smoothness", "worst area", "worst symmetry", "fractal dimension"]
    frame, labels = pd.DataFrame(x.numpy(), columns=names), pd.Series(y.numpy(), name="diagnosis")
    loader = DataLoader(TensorDataset((x / x.std(0)).float(), y), batch_size=20, shuffle=True)
    model = MLP(hidden=8, n_classes=2, n_inputs=6)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kw = {"exact_indices": list(range(0, 120, 3))} if mode == "exact" else {}
    with hydra_nb.track(model, loader, store=path, optimizer=opt, projection_dim=None, mode=mode,
                        **kw):
        for _ in range(2):
            for xb, yb in loader:
                opt.zero_grad(); F.cross_entropy(model(xb), yb).backward(); opt.step()
    scaled = pd.DataFrame((x / x.std(0)).numpy(), columns=names)  # what the model was trained on, as a DataFrame
    return model, scaled, labels, frame


def test_tabular_explorer_names_features_from_a_dataframe(tmp_path):
    model, scaled, labels, _ = _tabular_run(tmp_path / "t.zarr")
    ex = explore(str(tmp_path / "t.zarr"), model, (scaled[:10], labels[:10]), (scaled, labels),
                 class_names=["malignant", "benign"])
    assert ex.info["feature_names"] == list(scaled.columns) and ex.info["test_kind"] == "tabular"
    f = Front(ex)
    r = f.ask("rankings", test=3, k=5)
    # the selected row travels with the answer; its salient features are the most unusual against the training set
    row = r["test_view"]["features"][0]
    mean, std = scaled.to_numpy().mean(0), scaled.to_numpy().std(0)
    z = (row - mean) / std
    np.testing.assert_array_equal(r["test_view"]["salient"][0], np.argsort(-np.abs(z), kind="stable")[:4])
    np.testing.assert_allclose(r["test_view"]["z"][0], z[r["test_view"]["salient"][0]], rtol=1e-5)
    # predictions from a float64 DataFrame on a float32 model, as the queries take it
    pred = ex.predictions()
    with torch.no_grad():
        m = MLP(hidden=8, n_classes=2, n_inputs=6)
        ex.store.load_params(m)
        expect = m.eval()(torch.tensor(scaled[:10].to_numpy()).float()).argmax(1).numpy()
    np.testing.assert_array_equal(pred, expect)
    assert r["predicted"] == expect[3]
    # names given explicitly win over nothing; a wrong count is refused
    x = torch.as_tensor(scaled.to_numpy())
    ex2 = explore(str(tmp_path / "t.zarr"), model, (x[:5], torch.as_tensor(labels.to_numpy()[:5])),
                  (x, torch.as_tensor(labels.to_numpy())), feature_names=[f"f{i}" for i in range(6)])
    assert ex2.info["feature_names"] == [f"f{i}" for i in range(6)]
    with pytest.raises(ValueError, match="test_data: 3 feature names for rows of 6 features"):
        explore(str(tmp_path / "t.zarr"), model, (x[:5], labels[:5]), (x, labels), feature_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="feature_names are for feature rows"):
        explore(str(tmp_path / "t.zarr"), model, (torch.rand(3, 1, 8, 8), torch.arange(3)), (x, labels),
                feature_names=["a"])


def test_each_view_says_its_mode_and_mode_preference_is_the_one_place(tmp_path, run, monkeypatch):
    import hydra_nb.widgets.explorer as explorer_module

    store, model, train, test = run
    f = Front(explore(store, model, test, train, k=3))
    assert f.widget.info["modes"]["fast"]["note"] == "fast estimate: may disagree with exact at large learning rates"
    assert "benchmarks/RESULTS.md" in f.widget.info["modes"]["fast"]["source"]
    assert f.ask("rankings", test=1, k=2)["mode"] == "fast"
    assert f.ask("trajectory", test=1, train=[2])["mode"] == "fast"
    assert f.ask("self_influence", limit=2)["mode"] == "fast"
    assert f.ask("class_matrix")["mode"] == "fast"
    # an exact store: every view answers exactly (self-influence too: the exact source has self_dot) ...
    model_e, scaled, labels, _ = _tabular_run(tmp_path / "e.zarr", mode="exact")
    e = Front(explore(str(tmp_path / "e.zarr"), model_e, (scaled[:6], labels[:6]), (scaled, labels)))
    assert e.ask("rankings", test=0, k=2)["mode"] == "exact" and e.widget.mode_for("self_dot") == "exact"
    row = e.widget.contribution_row(0)
    np.testing.assert_allclose(row, e.widget.store.contributions(model_e, scaled[:1], labels[:1], mode="exact",
                                                                 progress=False)[0], rtol=1e-5, atol=1e-9)
    # ... unless MODE_PREFERENCE, the one place that orders the modes, says otherwise
    monkeypatch.setattr(explorer_module, "MODE_PREFERENCE", ("fast",))
    assert e.widget.mode_for() == "fast"
    # mode= picks one for every view; an unknown one is refused at once
    assert Front(explore(str(tmp_path / "e.zarr"), model_e, (scaled[:6], labels[:6]), (scaled, labels),
                         mode="exact")).ask("rankings", test=0, k=2)["mode"] == "exact"
    with pytest.raises(ValueError, match="mode must be one of 'fast', 'exact', 'replay', 'curvature' or None"):
        explore(store, model, test, train, mode="slow")


def test_exact_by_replay_reaches_every_view_that_asks_for_it(tmp_path):
    """Explorer(mode="replay") (and "exact" on a fast store, which replays) hands replay the training set."""
    model, scaled, labels, _ = _tabular_run(tmp_path / "t.zarr")
    test, train = (scaled[:5], labels[:5]), (scaled, labels)
    for mode in ("replay", "exact"):
        f = Front(explore(str(tmp_path / "t.zarr"), model, test, train, mode=mode, k=3))
        r = f.ask("rankings", test=2, k=3)
        assert r["mode"] == mode and f.widget.info["modes"]["replay"]["label"] == "exact (replay)"
        store = f.widget.store
        expect = store.contributions(model, scaled[2:3], labels[2:3], mode="replay", train_data=f.widget._train_data,
                                     progress=False)[0]
        np.testing.assert_allclose(f.widget.contribution_row(2), expect, rtol=1e-5, atol=1e-9)  # float32 run
        np.testing.assert_array_equal(r["groups"]["helpful"]["indices"], np.argsort(-expect, kind="stable")[:3])


def test_hydra_nb_never_imports_pandas():
    """pandas is optional: accepted when the user has it, never imported by hydra_nb."""
    code = ("import sys, hydra_nb, hydra_nb.widgets, hydra_nb.plot, hydra_nb.magic; "
            "assert 'pandas' not in sys.modules, 'hydra_nb imported pandas'")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-2000:]


# -- live mode ---------------------------------------------------------------------------------------
def test_live_pushes_rankings_during_a_tracked_run(tmp_path, run):
    _, _, train, test = run
    path = tmp_path / "live.zarr"
    x_tr, y_tr = train
    model = SmallCNN()
    ex = explore(path, model, test, train)  # created before the run exists
    ex.live(every=5, pin=[0, 4], k=3)
    pushed = []
    ex.observe(lambda ch: pushed.append(ch.new), "live_state")
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(x_tr, y_tr), batch_size=32, shuffle=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    during = []
    with hydra_nb.track(model, loader, store=path, optimizer=opt, projection_dim=128, checkpoint_every=5):
        for _ in range(4):  # 40 steps: time for the writer thread to commit a few checkpoints
            for xb, yb in loader:
                opt.zero_grad(); F.cross_entropy(model(xb), yb).backward(); opt.step()
        during = [p for p in pushed if p["items"]]
    assert during, "no rankings were pushed while training ran"
    assert all(p["active"] for p in during)
    assert [p["step"] for p in during] == sorted(p["step"] for p in during)
    assert during[-1]["checkpoint_step"] > 0 and len(during[-1]["items"]) == 2
    ex._live._on_cell_end()  # what IPython's post_run_cell does after the training cell
    final = pushed[-1]
    assert final["active"] is False and ex._live is not None and ex._live._hook is None
    store = hydra_nb.open_store(path)
    top = store.top_k(model, test[0][[0, 4]], test[1][[0, 4]], k=3, progress=False)
    item = final["items"][1]
    assert item["test"] == 4
    np.testing.assert_array_equal(unpack(item["helpful"]["indices"]), top.helpful_indices[1])
    np.testing.assert_allclose(unpack(item["harmful"]["scores"]), top.harmful_scores[1], rtol=1e-6, atol=1e-9)
    state = ex.get_state()  # ipywidgets moves the binary leaves into buffers itself
    from ipywidgets.widgets.widget import _remove_buffers
    _, paths, buffers = _remove_buffers(state)
    assert any(p[0] == "live_state" for p in paths) and buffers


def test_on_step_hook_of_track(tmp_path, run):
    _, _, train, test = run
    path = tmp_path / "hooked.zarr"
    ex = explore(str(path), SmallCNN(), test, train)
    ex.pinned = [1]
    pushes = []
    ex.observe(lambda ch: pushes.append(ch.new), "live_state")
    _train(path, n_train=160, epochs=2, checkpoint_every=4, on_step=ex.on_step)
    assert ex._live.every == 200 and ex._live.steps == 10
    ex._live.every = 2
    _train(path, n_train=160, epochs=4, checkpoint_every=4, on_step=ex.on_step)
    assert ex._live.steps == 20 and len(pushes) >= 10  # one push per 2 steps of the run, from its own count
    # (whether a ranking is in them depends on how fast the writer thread commits; the last one has it)
    ex._live.update(final=True)
    assert pushes[-1]["items"][0]["test"] == 1 and pushes[-1]["checkpoint_step"] == 20


# -- matplotlib ----------------------------------------------------------------------------------------
def test_plots_have_titles_axes_and_units(run):
    import matplotlib.figure

    from hydra_nb import plot

    store, model, train, test = run
    fig = plot.top_k(store, model, test, train, [0, 1], k=3)
    assert isinstance(fig, matplotlib.figure.Figure) and "helpful" in fig._suptitle.get_text()
    assert len(fig.axes) == 2 * 7
    _assert_laid_out(fig)
    assert fig.axes[0].get_ylabel() == "test #0" and " → " in fig.axes[0].get_title()  # rows named, predictions
    assert _assert_laid_out(plot.self_influence(store, model, train, n=12))
    fig = plot.trajectory(store, model, test, 0, [1, 2], train_data=train)
    ax = fig.axes[0]
    assert ax.get_xlabel().startswith("optimizer step") and "∂L/∂w" in ax.get_ylabel() and ax.get_title()
    assert len(ax.get_lines()) >= 2 + len(store.checkpoint_steps) - 1
    fig = plot.self_influence(store, model, train, n=5)
    assert "Self-influence" in fig.axes[0].get_title() and fig.axes[0].get_ylabel()
    fig = plot.class_matrix(store, model, train, test, class_names=[str(i) for i in range(10)])
    ax = fig.axes[0]
    assert ax.get_xlabel() == "test class" and ax.get_ylabel() == "training class"
    assert "contribution" in fig.axes[1].get_ylabel()  # the colorbar's unit
    cm = store.class_matrix(model, train[1], test[0], test[1], progress=False)
    assert plot.class_matrix(cm).axes[0].get_title()
    x = torch.randn(30, 4)
    texts = Samples((x, (x[:, 0] > 0).long()))
    assert texts.kind == "tabular"


def _text_boxes(fig):
    """(text, window extent) of every text a drawn figure shows: visible and non-empty, and for tick labels only
    those of ticks inside their axis's view (matplotlib keeps labels of ticks beyond it, undrawn)."""
    import matplotlib.text

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    tick_labels, drawn = set(), []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            pad = 1e-9 * max(1.0, abs(lo), abs(hi))
            for loc, tick in zip(axis.get_majorticklocs(), axis.get_major_ticks()):
                for label in (tick.label1, tick.label2):
                    tick_labels.add(id(label))
                    if lo - pad <= loc <= hi + pad:
                        drawn.append(label)
    texts = [t for t in fig.findobj(matplotlib.text.Text) if id(t) not in tick_labels] + drawn
    return [(t.get_text(), t.get_window_extent(renderer)) for t in texts if t.get_visible() and t.get_text().strip()]


def _assert_laid_out(fig, overlaps_allowed=lambda a, b: False):
    """Constrained layout; every text inside the figure (nothing clipped without bbox_inches='tight'); no two
    texts overlap."""
    from matplotlib.layout_engine import ConstrainedLayoutEngine

    assert isinstance(fig.get_layout_engine(), ConstrainedLayoutEngine)
    boxes = _text_boxes(fig)
    frame = fig.bbox
    for text, box in boxes:
        assert box.x0 >= frame.x0 - 1 and box.x1 <= frame.x1 + 1 and box.y0 >= frame.y0 - 1 and \
            box.y1 <= frame.y1 + 1, f"{text!r} is cut off by the figure's edge"
    for i, (ta, a) in enumerate(boxes):
        for tb, b in boxes[i + 1:]:
            shrunk = a.padded(-0.5)
            if shrunk.overlaps(b.padded(-0.5)) and not overlaps_allowed(ta, tb):
                raise AssertionError(f"{ta!r} overlaps {tb!r}")
    return boxes


@pytest.mark.parametrize("n", [2, 10, 100])
def test_class_matrix_lays_out_2_to_100_classes(n):
    from hydra_nb import plot
    from hydra_nb.query import ClassMatrix

    rng = np.random.default_rng(0)
    names = ["malignant", "benign"] if n == 2 else [f"class name {i}" for i in range(n)]
    cm = ClassMatrix(np.arange(n), np.arange(n), rng.normal(size=(n, n)), np.ones((n, n)), np.ones(n), np.ones(n))
    fig = plot.class_matrix(cm, class_names=names)
    cells = {f"{v:.2g}" for v in cm.mean.ravel()}
    boxes = _assert_laid_out(fig, lambda a, b: a in cells or b in cells)  # a cell's number lies on the image
    shown = [t for t, _ in boxes]
    assert "malignant" in shown and "benign" in shown if n == 2 else "class name 0" in shown
    ticks = [t for t in fig.axes[0].get_xticklabels() if t.get_visible()]
    assert len(ticks) == n if n <= 10 else n // 4 <= len(ticks) < n  # thinned to what fits, never overlapping
    fig.clf()


def test_plots_of_feature_rows_name_rows_and_show_predictions(tmp_path):
    from hydra_nb import plot

    model, scaled, labels, _ = _tabular_run(tmp_path / "t.zarr")
    store = hydra_nb.open_store(tmp_path / "t.zarr")
    names = ["malignant", "benign"]
    test, train = (scaled[:10], labels[:10]), (scaled, labels)
    fig = plot.top_k(store, model, test, train, [0, 3], k=3, class_names=names)
    _assert_laid_out(fig)
    ax = fig.axes[0]
    pred = ex_pred = Front(explore(str(tmp_path / "t.zarr"), model, test, train)).widget.predictions()
    assert ax.get_title(loc="left").startswith(f"test #0 (y={names[int(labels[0])]} → {names[pred[0]]})\n")
    rows = [t.get_text() for t in ax.get_yticklabels()]
    assert len(rows) == 6 and all(r.startswith("#") for r in rows)
    for r in rows:  # named features, most unusual first, whole "name value" items only
        items = r.split(": ", 1)[1].split(", ")
        for item in items:
            if item != "…":
                name, value = item.rsplit(" ", 1)
                assert name in scaled.columns and float(value) == float(value)
    fig = plot.self_influence(store, model, train, n=8, class_names=names)
    _assert_laid_out(fig)
    bars = fig.axes[1]
    assert [b.get_facecolor() for b in bars.patches][0][:3] == pytest.approx(
        tuple(int(plot.SUSPECT[i:i + 2], 16) / 255 for i in (1, 3, 5)))  # suspects amber, as in the explorer
    assert all(" → " in t.get_text() for t in bars.get_yticklabels())  # label → predicted
    fig = plot.trajectory(store, model, test, 0, [1, 2], train_data=train, class_names=names)
    _assert_laid_out(fig)
    del ex_pred


# -- the bundle and the wheel ---------------------------------------------------------------------------
def _need_js() -> bool:
    return (REPO / "js" / "node_modules" / "esbuild").is_dir()


def test_bundle_is_committed_and_rebuilds_identically(tmp_path):
    js, css = STATIC / "explorer.js", STATIC / "explorer.css"
    assert js.is_file() and css.is_file() and "hydra-card" in js.read_text()
    if not _need_js():
        if os.environ.get("HYDRA_REQUIRE_JS") == "1":
            pytest.fail("js/node_modules is missing: run `npm ci` in js/ (scripts/test.sh does).")
        pytest.skip("js/node_modules not installed (npm ci in js/); scripts/test.sh runs this check")
    node = shutil.which("node")
    assert node, "node is needed to rebuild the bundle"
    subprocess.run([node, "build.mjs", "--outdir", str(tmp_path)], cwd=REPO / "js", check=True, capture_output=True)
    assert (tmp_path / "explorer.js").read_bytes() == js.read_bytes(), \
        "hydra_nb/widgets/static/explorer.js is stale: run `npm run build` in js/ and commit it"
    assert (tmp_path / "explorer.css").read_bytes() == css.read_bytes()


def test_wheel_carries_the_bundle(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                          "-q", "-w", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    wheel = next(tmp_path.glob("hydra_nb-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert "hydra_nb/widgets/static/explorer.js" in names and "hydra_nb/widgets/static/explorer.css" in names
        assert z.read("hydra_nb/widgets/static/explorer.js") == (STATIC / "explorer.js").read_bytes()
        assert "hydra_nb/plot.py" in names and "hydra_nb/widgets/explorer.py" in names
