"""Batches and inputs of every shape: dicts, several tensors, keyword arguments, text models."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import hydra_nb

N, L, VOCAB, C = 24, 6, 13, 3


def token_data():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (N, L), generator=g)
    mask = (torch.rand(N, L, generator=g) > 0.2).to(torch.float64)
    labels = torch.randint(0, C, (N,), generator=g)
    return ids, mask, labels


class DictDataset(Dataset):
    """Samples as dicts, like a tokenised text dataset."""

    def __init__(self):
        self.ids, self.mask, self.labels = token_data()

    def __len__(self):
        return N

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


class BagOfEmbeddings(nn.Module):
    """Masked mean of token embeddings, then a linear head; called with keyword arguments."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 5, padding_idx=0)
        self.head = nn.Linear(5, C)

    def forward(self, input_ids, attention_mask):
        e = self.embed(input_ids) * attention_mask.unsqueeze(-1)
        return self.head(torch.tanh(e.sum(1) / attention_mask.sum(1, keepdim=True).clamp_min(1)))


def train(loader, model, call, mode="fast", **track_options):
    model = model.double()
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    store = track_options.pop("store")
    with hydra_nb.track(model, loader, store=store, optimizer=opt, mode=mode, projection_dim=None, strict=True,
                        **track_options):
        for _ in range(2):
            for batch in loader:
                opt.zero_grad()
                out, y = call(model, batch)
                F.cross_entropy(out, y).backward()
                opt.step()
    return model, hydra_nb.open_store(store)


def dict_call(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]), batch["labels"]


def tuple_call(model, batch):
    ids, mask, labels = batch
    return model(ids, mask), labels


def loaders():
    dict_loader = DataLoader(DictDataset(), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(2))
    tuple_loader = DataLoader(TensorDataset(*token_data()), batch_size=8, shuffle=True,
                              generator=torch.Generator().manual_seed(2))
    return dict_loader, tuple_loader


@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_dict_batches_and_keyword_inputs_equal_tuple_batches(tmp_path, mode):
    dict_loader, tuple_loader = loaders()
    options = {"batch_fn": lambda b: ((b["input_ids"], b["attention_mask"]), b["labels"])} if mode == "exact" else {}
    model_a, a = train(dict_loader, BagOfEmbeddings(), dict_call, mode, store=tmp_path / "dict.zarr", **options)
    if mode == "exact":  # (ids, mask, labels): the targets are not the second element
        with pytest.raises(hydra_nb.TrackingConfigError, match="batch_fn"):
            train(tuple_loader, BagOfEmbeddings(), tuple_call, mode, store=tmp_path / "wrong.zarr")
        options = {"batch_fn": lambda b: (b[:2], b[2])}
        _, tuple_loader = loaders()  # the failed attempt drew a shuffle from the loader's generator
    model_b, b = train(tuple_loader, BagOfEmbeddings(), tuple_call, mode, store=tmp_path / "tuple.zarr", **options)
    ids, mask, labels = token_data()
    as_dict = {"input_ids": ids[:5], "attention_mask": mask[:5]}
    ca = a.contributions(model_a, as_dict, labels[:5])  # queries take the inputs as the model does
    cb = b.contributions(model_b, (ids[:5], mask[:5]), labels[:5])
    assert np.abs(ca).max() > 1e-4
    np.testing.assert_allclose(ca, cb, rtol=1e-9, atol=1e-12)
    top = a.top_k(model_a, as_dict, labels[:5], k=3, progress=False)
    assert top.helpful_indices.shape == (5, 3)
    si_a = a.self_influence(model_a, ({"input_ids": ids, "attention_mask": mask}, labels), progress=False)
    si_b = b.self_influence(model_b, ((ids, mask), labels), progress=False)
    np.testing.assert_allclose(si_a, si_b, rtol=1e-9, atol=1e-12)


def test_exact_mode_without_targets_in_the_batch_asks_for_batch_fn(tmp_path):
    class Unlabelled(Dataset):
        def __len__(self):
            return N

        def __getitem__(self, i):
            ids, mask, labels = token_data()
            return {"input_ids": ids[i], "attention_mask": mask[i], "answer": labels[i]}

    loader = DataLoader(Unlabelled(), batch_size=8)
    model = BagOfEmbeddings().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(hydra_nb.TrackingConfigError, match="batch_fn"):
        with hydra_nb.track(model, loader, store=tmp_path / "a.zarr", optimizer=opt, mode="exact"):
            for batch in loader:
                opt.zero_grad()
                F.cross_entropy(model(batch["input_ids"], batch["attention_mask"]), batch["answer"]).backward()
                opt.step()


def test_transformer_text_classifier(tmp_path):
    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed = nn.Embedding(VOCAB, 8, padding_idx=0)
            layer = nn.TransformerEncoderLayer(8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
            self.head = nn.Linear(8, C)

        def forward(self, input_ids):
            return self.head(self.encoder(self.embed(input_ids)).mean(1))

    dict_loader, _ = loaders()
    model, store = train(dict_loader, Classifier(), lambda m, b: (m(b["input_ids"]), b["labels"]),
                         store=tmp_path / "t.zarr")  # strict: the gradient check passed at every step
    names = [s.name for s in store.layout.slots]
    assert any("self_attn.in_proj_weight" in n for n in names) and any("norm1.weight" in n for n in names)
    ids, _, labels = token_data()
    si = store.self_influence(model, (ids, labels), progress=False)
    assert si.shape == (N,) and np.isfinite(si).all() and np.abs(si).max() > 0
