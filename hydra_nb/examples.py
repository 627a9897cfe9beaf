"""Built-in example data and models: scikit-learn's digits (shipped with scikit-learn, no network) and
short generated texts (:func:`make_texts`, no download at all).

Used by the quickstart, the teaching notebooks, the tests and the benchmarks.
The digits need the ``examples`` extra (scikit-learn); the texts need only torch.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn


def load_digits(image_size: int = 8, test_fraction: float = 0.2, seed: int = 0, dtype=torch.float32):
    """scikit-learn's 1,797 8×8 handwritten digits as tensors, split into train and test.

    Returns ``(x_train, y_train, x_test, y_test)``; images are (N, 1, size, size) scaled to [0, 1]
    (bilinearly resized when ``image_size`` is not 8), labels are int64 in 0..9.
    """
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("The digits examples need scikit-learn: pip install 'hydra_nb[examples]'") from exc
    data = _load()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(y) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    x = x.to(dtype)
    return x[train], y[train], x[test], y[test]


class SmallCNN(nn.Module):
    """A small CNN for 8×8 digits: conv(1→8) → conv(8→16) → linear(64→10): 1,898 parameters."""

    def __init__(self, n_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 2 * 2, n_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


class LeNet5(nn.Module):
    """LeNet-5 for 28×28 inputs (digits resized): 61.7k parameters."""

    def __init__(self, n_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, n_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class MLP(nn.Module):
    """A one-hidden-layer MLP on flattened 8×8 digits."""

    def __init__(self, hidden: int = 32, n_classes: int = 10, n_inputs: int = 64):
        super().__init__()
        self.fc1 = nn.Linear(n_inputs, hidden)
        self.fc2 = nn.Linear(hidden, n_classes)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x.flatten(1))))


# -- text: a seeded template grammar, a whitespace tokenizer and a small transformer ------------------
TEXT_CLASSES = ("sport", "food", "weather")
_TOPIC = {
    "sport": ("match", "goal", "team", "coach", "score", "stadium", "race", "ball"),
    "food": ("soup", "bread", "cheese", "dinner", "recipe", "kitchen", "pasta", "cake"),
    "weather": ("rain", "storm", "sunshine", "wind", "snow", "forecast", "cloud", "fog"),
}
_SUBJECT = ("we", "they", "my friend", "the kids", "everyone", "our neighbour", "she", "he")
_VERB = ("talked about", "loved", "watched", "hated", "remembered", "described", "expected", "missed")
_ADJ = ("great", "strange", "long", "quiet", "late", "cold", "big", "short")
_TIME = ("today", "yesterday", "last night", "this morning", "again", "all week", "on sunday", "at noon")
_TEMPLATES = (
    "{subj} {verb} the {adj} {t1} {time}",
    "{subj} {verb} the {t1} and the {t2}",
    "the {t1} was {adj} {time}",
    "{time} {subj} {verb} the {t1}",
    "{subj} {verb} a {adj} {t1} and a {t2} {time}",
)
TEXT_PAD, TEXT_UNK = 0, 1
TEXT_VOCAB = ("<pad>", "<unk>") + tuple(sorted({w for group in (*_TOPIC.values(), _SUBJECT, _VERB, _ADJ, _TIME,
                                                                 _TEMPLATES) for phrase in group
                                                for w in phrase.replace("{", " ").replace("}", " ").split()
                                                if w not in ("subj", "verb", "adj", "t1", "t2", "time")}))
_TEXT_INDEX = {w: i for i, w in enumerate(TEXT_VOCAB)}


def make_texts(n: int, seed: int = 0, ambiguous: float = 0.15):
    """``n`` short English-like sentences from a seeded template grammar, labelled by topic.

    Classes are :data:`TEXT_CLASSES` (sport, food, weather). Each sentence fills a template with
    shared filler words (subjects, verbs, adjectives, times: no class information) and one or two
    topic words of its class; with probability ``ambiguous`` one topic word is taken from another
    class instead: sentences with two topic words then mix two topics, one-topic sentences read as
    mislabeled (what self-influence should find). Generated in place (no network), the same
    for the same ``seed``. Returns ``(texts, labels)``: a list of str and an int64 tensor (n,).
    Encode them with :func:`encode_texts`; the vocabulary is :data:`TEXT_VOCAB`.
    """
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        c = rng.randrange(len(TEXT_CLASSES))
        own = _TOPIC[TEXT_CLASSES[c]]
        t1, t2 = rng.sample(own, 2)
        if rng.random() < ambiguous:
            other = _TOPIC[TEXT_CLASSES[(c + rng.randrange(1, len(TEXT_CLASSES))) % len(TEXT_CLASSES)]]
            if "{t2}" in (template := rng.choice(_TEMPLATES)) and rng.random() < 0.5:
                t2 = rng.choice(other)
            else:
                t1 = rng.choice(other)
        else:
            template = rng.choice(_TEMPLATES)
        texts.append(template.format(subj=rng.choice(_SUBJECT), verb=rng.choice(_VERB), adj=rng.choice(_ADJ),
                                     time=rng.choice(_TIME), t1=t1, t2=t2))
        labels.append(c)
    return texts, torch.tensor(labels, dtype=torch.int64)


def encode_texts(texts, length: int = 16) -> torch.Tensor:
    """Whitespace tokenizer: (len(texts), length) int64 token ids, padded with ``TEXT_PAD`` (0) at the end,
    cut at ``length``; words outside :data:`TEXT_VOCAB` become ``TEXT_UNK`` (1). Usable as the explorer's
    ``encode=``."""
    out = torch.full((len(texts), length), TEXT_PAD, dtype=torch.int64)
    for i, text in enumerate(texts):
        ids = [_TEXT_INDEX.get(w, TEXT_UNK) for w in text.lower().split()][:length]
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
    return out


class TextTransformer(nn.Module):
    """Token + position embeddings → ``nn.TransformerEncoder`` (batch_first, post-LayerNorm, dropout 0 by
    default) → mean over the non-padding tokens → linear head. Padding (token 0) is masked out of attention."""

    def __init__(self, vocab_size: int = len(TEXT_VOCAB), d_model: int = 32, nhead: int = 2, num_layers: int = 2,
                 dim_feedforward: int | None = None, n_classes: int = len(TEXT_CLASSES), max_len: int = 16,
                 dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=TEXT_PAD)
        self.position = nn.Embedding(max_len, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward or 2 * d_model, dropout=dropout,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pad = ids == TEXT_PAD
        # positions as a (batch, length) index, so that hydra_nb's Embedding hook sees one row per sample
        positions = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        h = self.encoder(self.embed(ids) + self.position(positions), src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(1) / keep.sum(1).clamp(min=1))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
