"""Data as queries, widgets and plots see it: model inputs, test points, datasets by index, display forms.

Model inputs (:class:`ModelInputs`): what the model is called with, for a batch of samples: a tensor
``x`` (``model(x)``), a tuple of tensors (``model(*xs)``) or a dict of tensors (``model(**kw)``),
all with the samples on dim 0.

Test points (``as_pair``): model inputs and one target per sample. A training set
(``dataset_len``, ``dataset_items``): a pair ``(inputs, targets)`` or a torch ``Dataset`` of
``(x, y)`` items, read by dataset index. The default loss (``default_loss``): per-sample
cross-entropy of the model's outputs against the targets.

Datasets for the explorer and the plots (:class:`Samples`, ``as_samples``) accept, for test and
training data alike:

- a pair ``(inputs, targets)`` of tensors or arrays: images (N, 1, H, W), (N, 3, H, W) or (N, H, W);
  feature rows (N, D) (tabular);
- a pair ``(texts, targets)`` where ``texts`` is a sequence of strings; the model's inputs come from
  ``encode(list_of_strings) -> tensor`` (required for queries);
- a torch ``Dataset`` whose items are ``(x, y)``; ``x`` a tensor (an image (C, H, W)/(H, W) or a
  feature row (D,)) or a string (with ``encode``). Labels come from ``dataset.targets`` when it
  exists, else from one pass over the items (only when a view needs all labels).

``display``: optional strings shown instead of the default (e.g. the raw text of tokenised inputs).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

THUMB_MAX = 64  # thumbnails are downsampled to at most this many pixels a side
TEXT_MAX = 240  # characters of text or a formatted row shown on a card


class ModelInputs:
    """What a model is called with, for a batch of samples: a tensor ``x`` (``model(x)``), a tuple of
    tensors (``model(*xs)``) or a dict of tensors (``model(**kw)``), all with the samples on dim 0."""

    def __init__(self, value):
        if isinstance(value, ModelInputs):
            value = value.value
        if isinstance(value, dict):
            self.kind, leaves = "dict", list(value.values())
        elif isinstance(value, (tuple, list)) and value and all(torch.is_tensor(v) for v in value):
            self.kind, leaves = "tuple", list(value)
        else:
            self.kind, value = "tensor", torch.as_tensor(value)
            leaves = [value]
        if not leaves or not all(torch.is_tensor(t) and t.dim() > 0 for t in leaves):
            raise ValueError("model inputs must be a tensor, a tuple of tensors or a dict of tensors, each with the "
                             "samples on its first dimension.")
        n = {t.shape[0] for t in leaves}
        if len(n) != 1:
            raise ValueError(f"the tensors of the model inputs disagree on the number of samples: {sorted(n)}.")
        self.value = value
        self._n = n.pop()

    def __len__(self) -> int:
        return self._n

    def map(self, fn) -> "ModelInputs":
        if self.kind == "dict":
            return ModelInputs({k: fn(v) for k, v in self.value.items()})
        if self.kind == "tuple":
            return ModelInputs(tuple(fn(v) for v in self.value))
        return ModelInputs(fn(self.value))

    def __getitem__(self, selection) -> "ModelInputs":
        return self.map(lambda t: t[selection])

    def leaves(self) -> list[torch.Tensor]:
        return list(self.value.values()) if self.kind == "dict" else list(self.value) if self.kind == "tuple" \
            else [self.value]

    def rebuild(self, leaves) -> tuple[tuple, dict]:
        """(args, kwargs) for calling the model with these leaves in place of this batch's tensors."""
        if self.kind == "dict":
            return (), dict(zip(self.value.keys(), leaves))
        if self.kind == "tuple":
            return tuple(leaves), {}
        return (leaves[0],), {}


def default_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy: the default ``loss_fn`` of tracking and of queries."""
    return F.cross_entropy(outputs, targets, reduction="none")


def as_pair(inputs, targets) -> tuple[ModelInputs, torch.Tensor]:
    """Test points: model inputs (a tensor, a tuple or a dict of tensors, see ``ModelInputs``) and targets."""
    inputs, targets = ModelInputs(inputs), torch.as_tensor(targets)
    if len(inputs) != targets.shape[0]:
        raise ValueError(f"inputs ({len(inputs)}) and targets ({targets.shape[0]}) differ in length.")
    return inputs, targets


def is_pair(dataset) -> bool:
    """An (inputs, targets) pair: inputs a tensor, a tuple of tensors or a dict of tensors."""
    if not (isinstance(dataset, (tuple, list)) and len(dataset) == 2 and hasattr(dataset[1], "shape")):
        return False
    try:
        ModelInputs(dataset[0])
    except (ValueError, TypeError, RuntimeError):
        return False
    return True


def dataset_len(dataset) -> int:
    """Samples in a training set: a pair (inputs, targets) or a torch Dataset of (x, y) items."""
    return len(ModelInputs(dataset[0])) if is_pair(dataset) else len(dataset)


def dataset_items(dataset, ids: np.ndarray) -> tuple[ModelInputs | torch.Tensor, torch.Tensor]:
    """(inputs, targets) of the samples ``ids`` of a torch Dataset of (x, y) or a pair of tensors."""
    if is_pair(dataset):
        idx = torch.from_numpy(np.asarray(ids, dtype=np.int64))
        return ModelInputs(dataset[0])[idx], torch.as_tensor(dataset[1])[idx]
    items = [dataset[int(i)] for i in ids]
    xs = torch.stack([torch.as_tensor(it[0]) for it in items])
    ys = torch.stack([torch.as_tensor(it[1]) for it in items])
    return xs, ys


def _is_tensorlike(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "__getitem__")


def _is_strings(x) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(s, str) for s in x[:16])


class Samples:
    """One dataset: ``batch(ids)`` gives model inputs/targets, ``labels`` the classes, ``view(ids)`` the display."""

    def __init__(self, data, *, encode: Callable | None = None, display: Sequence[str] | None = None,
                 name: str = "data"):
        self.name, self.encode = name, encode
        self._labels: np.ndarray | None = None
        self._x = self._y = self._texts = self._dataset = None
        if isinstance(data, (tuple, list)) and len(data) == 2 and (_is_tensorlike(data[0]) or _is_strings(data[0])):
            x, y = data
            self._y = torch.as_tensor(np.asarray(y) if not torch.is_tensor(y) else y)
            if _is_strings(x):
                self._texts = list(x)
                self.n = len(self._texts)
            else:
                self._x = x if torch.is_tensor(x) else torch.as_tensor(np.asarray(x))
                self.n = len(self._x)
            if len(self._y) != self.n:
                raise ValueError(f"{name}: {self.n} inputs but {len(self._y)} targets.")
            self._labels = self._y.detach().cpu().numpy().reshape(self.n, -1)[:, 0] if self._y.ndim else None
            first = self._texts[0] if self._texts is not None else (self._x[0] if self.n else None)
        elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
            self._dataset = data
            self.n = len(data)
            first = data[0][0] if self.n else None
            targets = getattr(data, "targets", None)
            if targets is not None and len(targets) == self.n:
                self._labels = np.asarray(torch.as_tensor(targets).cpu()).reshape(self.n, -1)[:, 0]
        else:
            raise TypeError(f"{name}: expected (inputs, targets) tensors, (texts, targets) or a torch Dataset of "
                            f"(x, y) items; got {type(data).__name__}.")
        self.display = list(display) if display is not None else None
        if self.display is not None and len(self.display) != self.n:
            raise ValueError(f"{name}: display has {len(self.display)} entries for {self.n} samples.")
        self.kind = self._kind(first)
        if self.kind == "text" and isinstance(first, str) and encode is None:
            self._needs_encode = True
        else:
            self._needs_encode = False

    # -- what it is -------------------------------------------------------------------------
    def _kind(self, first) -> str:
        if self.display is not None or isinstance(first, str):
            return "text"
        if first is None:
            return "tabular"
        shape = tuple(torch.as_tensor(first).shape)
        if len(shape) == 2 or (len(shape) == 3 and shape[0] in (1, 3)):
            return "image"
        return "tabular"

    def __len__(self) -> int:
        return self.n

    @property
    def labels(self) -> np.ndarray:
        """(N,) class label of every sample (one pass over a Dataset without ``targets``, then cached)."""
        if self._labels is None:
            self._labels = np.asarray([int(torch.as_tensor(self._dataset[i][1]).reshape(-1)[0])
                                       for i in range(self.n)])
        return self._labels

    def label_of(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if self._labels is not None:
            return self._labels[ids]
        if self._y is not None:
            return self._y[torch.from_numpy(ids)].cpu().numpy().reshape(len(ids), -1)[:, 0]
        return np.asarray([int(torch.as_tensor(self._dataset[int(i)][1]).reshape(-1)[0]) for i in ids])

    # -- model inputs -----------------------------------------------------------------------
    def _raw(self, ids: np.ndarray):
        if self._dataset is not None:
            items = [self._dataset[int(i)] for i in ids]
            xs = [it[0] for it in items]
            ys = torch.stack([torch.as_tensor(it[1]) for it in items]) if items else torch.zeros(0, dtype=torch.long)
            return xs, ys
        idx = torch.from_numpy(ids)
        xs = [self._texts[int(i)] for i in ids] if self._texts is not None else self._x[idx]
        return xs, self._y[idx]

    def batch(self, ids) -> tuple[torch.Tensor, torch.Tensor]:
        """Model inputs and targets of samples ``ids`` (strings go through ``encode``)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        xs, ys = self._raw(ids)
        if isinstance(xs, list):
            if xs and isinstance(xs[0], str):
                if self.encode is None:
                    raise ValueError(f"{self.name}: the samples are strings; pass encode=callable(list of str) -> "
                                     "tensor so the model can be queried on them.")
                xs = torch.as_tensor(self.encode(xs))
            else:
                xs = torch.stack([torch.as_tensor(x) for x in xs]) if xs else torch.zeros(0)
        return xs, ys

    def all(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch(np.arange(self.n))

    def as_dataset(self):
        """What ``Store.self_influence`` takes: a pair of tensors, or an indexable of (x, y) items."""
        if self._x is not None:
            return (self._x, self._y)
        return _EncodedItems(self)

    # -- display ----------------------------------------------------------------------------
    def thumbnails(self, ids) -> np.ndarray:
        """uint8 (n, H, W, C), C = 1 or 3, each image scaled to its own [min, max], at most THUMB_MAX a side."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        xs, _ = self._raw(ids)
        x = torch.stack([torch.as_tensor(v) for v in xs]) if isinstance(xs, list) else xs
        x = x.detach().to("cpu", torch.float32)
        if x.ndim == 3:
            x = x[:, None]
        if len(ids) == 0:
            return np.zeros((0, *x.shape[2:], x.shape[1]), np.uint8)
        h, w = x.shape[-2:]
        if max(h, w) > THUMB_MAX:
            scale = THUMB_MAX / max(h, w)
            x = F.interpolate(x, size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="area")
        flat = x.reshape(len(x), -1)
        lo, hi = flat.min(1).values[:, None, None, None], flat.max(1).values[:, None, None, None]
        x = ((x - lo) / torch.clamp(hi - lo, min=1e-12) * 255).round().clamp(0, 255).to(torch.uint8)
        return x.permute(0, 2, 3, 1).contiguous().numpy()

    def texts(self, ids) -> list[str]:
        """Short strings: the text itself, or the formatted feature row."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if self.display is not None:
            out = [self.display[int(i)] for i in ids]
        else:
            xs, _ = self._raw(ids)
            out = []
            for x in xs:
                if isinstance(x, str):
                    out.append(x)
                else:
                    row = torch.as_tensor(x).reshape(-1).tolist()
                    shown = ", ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row[:12])
                    out.append("[" + shown + (", …" if len(row) > 12 else "") + f"]  ({len(row)} features)"
                               if len(row) > 12 else "[" + shown + "]")
        return [s if len(s) <= TEXT_MAX else s[:TEXT_MAX - 1] + "…" for s in out]

    def view(self, ids) -> dict:
        """What a card shows: ``{"thumbs": uint8 (n, H, W, C)}`` for images, ``{"texts": [...]}`` otherwise."""
        if self.kind == "image":
            return {"thumbs": self.thumbnails(ids)}
        return {"texts": self.texts(ids)}


class _EncodedItems:
    """A Dataset-like view whose items are model-ready ``(x, y)`` tensors (strings encoded)."""

    def __init__(self, samples: Samples):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        x, y = self.samples.batch([int(i)])
        return x[0], y[0]


def as_samples(data, name: str, **kwargs) -> Samples:
    return data if isinstance(data, Samples) else Samples(data, name=name, **kwargs)
