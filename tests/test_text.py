"""Text (issue 9): an Embedding + TransformerEncoder classifier on generated sentences, tracked and explored.

* fast mode, projected, ``strict=True`` (the gradient check passes wherever it runs): attention
  (MultiheadAttention, its F.linear projections followed by its rule) and LayerNorm parameters are in the
  store;
  contributions, top_k and self_influence are finite and not trivial;
* fast mode, full dimension, float64: contributions equal ``tests/reference.py``'s Hessian-free
  recursion with per-sample gradients from a one-sample-at-a-time autograd loop (1e-8);
* the explorer serves the training *texts* on its cards (no thumbnails), driven as in test_widgets.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import hydra_nb
from hydra_nb.examples import TEXT_CLASSES, TextTransformer, encode_texts, make_texts
from reference import (assert_replay_matches, hessian_free_contributions, layout_check, make_loader, rel_err,
                       tracked_training)

# torch's vmap has no batching rule for CPU flash attention (per-sample gradients of test points in the
# queries); the warning says so once per call
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

LENGTH = 12
N_TRAIN = 300


def unique_texts(n, seed):
    """``n`` distinct generated sentences (the reference identifies samples by their token rows)."""
    texts, labels = make_texts(3 * n, seed=seed)
    seen, keep = set(), []
    for i, t in enumerate(texts):
        if t not in seen:
            seen.add(t)
            keep.append(i)
    keep = keep[:n]
    assert len(keep) == n
    return [texts[i] for i in keep], labels[keep]


def small_transformer(d_model=32, dtype=torch.float32):
    torch.manual_seed(0)
    return TextTransformer(d_model=d_model, nhead=2, num_layers=1, dim_feedforward=2 * d_model,
                           max_len=LENGTH).to(dtype)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    texts, labels = unique_texts(N_TRAIN, seed=0)
    test_texts, test_labels = make_texts(60, seed=1)
    ids = encode_texts(texts, LENGTH)
    loader = DataLoader(TensorDataset(ids, labels), batch_size=32, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    model = small_transformer()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    path = tmp_path_factory.mktemp("text") / "text.zarr"
    with hydra_nb.track(model, loader, store=str(path), optimizer=opt, mode="fast", projection_dim=256,
                        strict=True) as tracker:
        for _ in range(12):
            for x, y in loader:
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
    store = hydra_nb.open_store(str(path))
    routes = {type(owner.module).__name__: owner.rule.name for owner in tracker.capture.owners}
    return store, model, (texts, labels), (test_texts, test_labels), routes


def test_attention_and_layernorm_are_captured(run):
    store, model, train, test, routes = run
    assert store.status == "complete"
    names = [s.name for s in store.layout.slots]
    for part in ("self_attn.in_proj_weight", "self_attn.in_proj_bias", "self_attn.out_proj.weight",
                 "self_attn.out_proj.bias", "norm1.weight", "norm2.bias", "embed.weight", "position.weight"):
        assert any(part in n for n in names), part
    assert names == [n for n, _ in model.named_parameters()]
    # what the capture chose: attention by its rule (its projections followed), the rest through layer hooks
    assert routes == {"MultiheadAttention": "attention", "Linear": "linear", "LayerNorm": "layernorm",
                      "Embedding": "embedding"}
    with torch.no_grad():
        acc = (model.eval()(encode_texts(test[0], LENGTH)).argmax(1) == test[1]).float().mean().item()
    model.train()
    assert acc > 0.55, f"the classifier did not learn the topics (test accuracy {acc:.2f})"


def test_queries_are_finite_and_not_trivial(run):
    store, model, train, test, _ = run
    x, y = encode_texts(test[0][:5], LENGTH), test[1][:5]
    c = store.contributions(model, x, y, progress=False)
    assert c.shape == (5, N_TRAIN) and np.isfinite(c).all()
    assert (c > 0).any() and (c < 0).any() and np.abs(c).max() > 1e-3
    top = store.top_k(model, x, y, k=5, progress=False)
    np.testing.assert_array_equal(top.helpful_indices, np.argsort(-c, axis=1, kind="stable")[:, :5])
    np.testing.assert_allclose(top.helpful_scores, -np.sort(-c, axis=1)[:, :5], rtol=1e-5, atol=1e-8)
    # the most helpful training sentences of a test sentence are mostly of its topic
    same = (train[1].numpy()[top.helpful_indices] == y.numpy()[:, None]).mean()
    assert same > 0.6, same
    si = store.self_influence(model, (encode_texts(train[0], LENGTH), train[1]), progress=False)
    assert si.shape == (N_TRAIN,) and np.isfinite(si).all() and si.std() > 0


def test_full_dimension_equals_hessian_free_reference(tmp_path):
    """Fast mode, no projection, float64: hydra_nb's hooks vs. a per-sample autograd recursion."""
    texts, labels = unique_texts(24, seed=2)
    X = encode_texts(texts, LENGTH)
    test_texts, test_labels = make_texts(3, seed=3)
    Xt = encode_texts(test_texts, LENGTH)
    model = small_transformer(16, torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    run, store = tracked_training(tmp_path, model, opt, make_loader(X, labels, batch_size=8), X, labels,
                                  epochs=2, mode="fast", projection_dim=None)
    layout_check(run, store)
    ref = hessian_free_contributions(run, Xt, test_labels)
    assert_replay_matches(run, ref)
    got = store.contributions(model, Xt, test_labels, progress=False)
    assert rel_err(got, ref["values"][:, -1]) < 1e-8


class Front:
    """The browser's side of the widget protocol (as in test_widgets.Front): a request in, the reply out."""

    def __init__(self, widget):
        self.widget, self.sent, self.next_id = widget, [], 1
        widget.send = lambda content, buffers=None: self.sent.append((content, list(buffers or [])))

    def ask(self, method, **params):
        rid, self.next_id = self.next_id, self.next_id + 1
        self.sent.clear()
        self.widget._handle_msg({"content": {"data": {"method": "custom", "content": {
            "type": "request", "id": rid, "method": method, "params": params}}}, "buffers": []})
        content, buffers = [(c, b) for c, b in self.sent if c.get("id") == rid][-1]
        assert content["type"] == "response" and content["ok"], content.get("error")
        json.dumps(content)
        return content["result"], buffers


def test_explorer_cards_show_training_texts(run):
    store, model, train, test, _ = run
    encode = lambda strings: encode_texts(strings, LENGTH)  # noqa: E731
    explorer = hydra_nb.explore(store, model, test, train, k=4, encode=encode, class_names=list(TEXT_CLASSES))
    front = Front(explorer)
    info = explorer._info()
    assert info["test_kind"] == "text" and info["train_kind"] == "text"
    page, buffers = front.ask("gallery", offset=0, limit=6)
    assert page["texts"] == test[0][:6] and "thumbs" not in page
    reply, _ = front.ask("rankings", test=2, k=4, sort="both")
    top = store.top_k(model, encode(test[0][2:3]), test[1][2:3], k=4, progress=False)
    for group, indices in (("helpful", top.helpful_indices[0]), ("harmful", top.harmful_indices[0])):
        cards = reply["groups"][group]
        assert "thumbs" not in cards
        assert cards["texts"] == [train[0][i] for i in indices]  # the sentences themselves, in rank order
    si, _ = front.ask("self_influence", offset=0, limit=5)
    first = np.argsort(-explorer.self_influence(), kind="stable")[:5]
    assert "thumbs" not in si and si["texts"] == [train[0][i] for i in first]
