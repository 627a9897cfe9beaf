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

- a pair ``(inputs, targets)`` of tensors, arrays or pandas objects: images (N, 1, H, W), (N, 3, H, W)
  or (N, H, W); feature rows (N, D) (tabular), named by ``feature_names=`` or a DataFrame's columns;
- a pair ``(texts, targets)`` where ``texts`` is a sequence of strings; the model's inputs come from
  ``encode(list_of_strings) -> tensor`` (required for queries);
- a torch ``Dataset`` whose items are ``(x, y)``; ``x`` a tensor (an image (C, H, W)/(H, W) or a
  feature row (D,)) or a string (with ``encode``). Labels come from ``dataset.targets`` when it
  exists, else from one pass over the items (only when a view needs all labels).

``display``: optional strings shown instead of the default (e.g. the raw text of tokenised inputs).

pandas is optional: a ``DataFrame``/``Series`` is accepted wherever a tensor of samples is (queries' inputs
and targets, the explorer's and the plots' data) and turned into a tensor of its values; nothing here
imports pandas.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

THUMB_MAX = 64  # thumbnails are downsampled to at most this many pixels a side
TEXT_MAX = 240  # characters of text or a formatted row shown on a card
SALIENT = 4  # named features a tabular card lists first (the most unusual values of the row)
_STATS_ROWS = 20_000  # rows the feature statistics (what is unusual) are estimated from


def is_pandas(value) -> bool:
    """A pandas DataFrame or Series (or Index), recognised without importing pandas."""
    return type(value).__module__.split(".")[0] == "pandas" and hasattr(value, "to_numpy")


def from_pandas(value, what: str = "data"):
    """A tensor of a DataFrame's/Series' values (anything else unchanged); non-numeric columns are refused."""
    if not is_pandas(value):
        return value
    array = value.to_numpy(copy=True)  # pandas may hand out a read-only view; a tensor wants its own memory
    if array.dtype == object or array.dtype.kind not in "biuf":
        columns = getattr(value, "columns", None)
        bad = [str(c) for c in columns if value[c].dtype.kind not in "biuf"] if columns is not None else []
        which = f" (columns {', '.join(bad[:5])}{', …' if len(bad) > 5 else ''})" if bad else ""
        raise ValueError(f"{what}: the pandas values are not numeric{which}. Encode them as numbers first "
                         "(e.g. pandas.get_dummies for categories, Series.cat.codes for class labels).")
    return torch.as_tensor(array)


def feature_names_of(value) -> list[str] | None:
    """A DataFrame's column names, as strings (None for anything else)."""
    columns = getattr(value, "columns", None) if is_pandas(value) else None
    return None if columns is None else [str(c) for c in columns]


def short_number(v: float) -> str:
    """A feature value in a few characters, as the explorer writes it (js/src/format.js ``num``): 17.99 → 18,
    0.1184 → 0.118, 1001.5 → 1002, 3.0 → 3, 123456.7 → 1.2e+5."""
    v = float(v)
    if not math.isfinite(v):
        return str(v)
    a = abs(v)
    if v == int(v) and a < 1e5:
        return str(int(v))
    if a >= 1e5 or a < 1e-3:
        mantissa, exponent = f"{v:.1e}".split("e")
        return f"{mantissa}e{'-' if exponent.startswith('-') else '+'}{int(exponent.lstrip('+-'))}"
    if a >= 100:
        return str(math.floor(v + 0.5))  # as JavaScript's Math.round (Python's round() rounds half to even)
    return f"{v:.3g}"


class ModelInputs:
    """What a model is called with, for a batch of samples: a tensor ``x`` (``model(x)``), a tuple of
    tensors (``model(*xs)``) or a dict of tensors (``model(**kw)``), all with the samples on dim 0."""

    def __init__(self, value):
        if isinstance(value, ModelInputs):
            value = value.value
        value = from_pandas(value, "inputs")
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
    inputs, targets = ModelInputs(inputs), torch.as_tensor(from_pandas(targets, "targets"))
    single = ("; a single sample needs its batch dimension: pass x[None] (or x.reshape(1, -1)) and [y]"
              if inputs.kind == "tensor" and inputs.value.ndim == 1 and targets.numel() == 1 else "")
    if targets.ndim == 0:
        raise ValueError(f"targets is one value ({targets.item()!r}); queries take one target per test point, "
                         f"shape (n,){single or ': pass [y] (or y[None]) for a single sample'}.")
    if len(inputs) != targets.shape[0]:
        raise ValueError(f"inputs ({len(inputs)}) and targets ({targets.shape[0]}) differ in length{single}.")
    return inputs, targets


def check_points(model, inputs: ModelInputs, targets: torch.Tensor, loss_fn, what: str = "test points") -> None:
    """Run ``model`` and ``loss_fn`` on the first of these points, before any work, and turn a failure into a
    ``ValueError`` that says what the model expects (its first layer's input, class-index targets).

    Eval mode and no gradients, as queries run it; the model's parameters and modes are left as they were.
    Float inputs are cast to the model's dtype and moved to its device, as queries do.
    """
    if len(inputs) == 0:
        return
    param = next(model.parameters(), None)
    device = param.device if param is not None else None
    dtype = param.dtype if param is not None and param.is_floating_point() else None
    one = inputs[:1].map(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None))
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            args, kwargs = one.rebuild(one.leaves())
            try:
                out = model(*args, **kwargs)
            except Exception as exc:
                raise ValueError(_forward_problem(model, inputs, exc, what)) from exc
            try:
                loss_fn(out, targets[:1].to(device))
            except Exception as exc:
                raise ValueError(_loss_problem(targets, loss_fn, exc, what)) from exc
    finally:
        for m, training in modes:
            m.training = training


def _first_layer(model):
    """The first module (in definition order) that holds parameters of its own."""
    for m in model.modules():
        if any(True for _ in m.parameters(recurse=False)):
            return m
    return None


def _forward_problem(model, inputs: ModelInputs, exc: Exception, what: str) -> str:
    shapes = ", ".join(str(tuple(t.shape)) for t in inputs.leaves())
    head = (f"The model cannot run on these {what} (inputs of shape {shapes}): model(inputs[:1]) raised "
            f"{type(exc).__name__}: {exc}.")
    layer = _first_layer(model)
    x = inputs.leaves()[0]
    if isinstance(layer, torch.nn.Linear):
        have = f"; these have {x.shape[-1]}" if x.shape[-1] != layer.in_features else ""
        return (f"{head} Its first layer, Linear({layer.in_features} → {layer.out_features}), takes "
                f"{layer.in_features} features per sample, inputs of shape (n, {layer.in_features}){have}. Pass the "
                "feature columns the model was trained on, in the same order.")
    if isinstance(layer, torch.nn.modules.conv._ConvNd):
        dims = len(layer.kernel_size)
        space = ", ".join("HWD"[:dims]) if dims > 1 else "L"
        return (f"{head} Its first layer, {type(layer).__name__}({layer.in_channels} → {layer.out_channels}), takes "
                f"inputs of shape (n, {layer.in_channels}, {space}): samples on the first dimension, then channels.")
    if isinstance(layer, torch.nn.Embedding):
        return (f"{head} Its first layer, Embedding({layer.num_embeddings}, {layer.embedding_dim}), takes integer "
                f"token ids in [0, {layer.num_embeddings}).")
    return f"{head} Pass inputs shaped like one batch of the training loop (samples on the first dimension)."


def _loss_problem(targets: torch.Tensor, loss_fn, exc: Exception, what: str) -> str:
    head = (f"The loss cannot be computed for these {what}: loss_fn(model(inputs[:1]), targets[:1]) raised "
            f"{type(exc).__name__}: {exc}.")
    if loss_fn is default_loss and targets.is_floating_point() and targets.ndim == 1:
        return (f"{head} The targets are {str(targets.dtype).replace('torch.', '')}; the default loss (cross-entropy) "
                "takes class indices, as integers: pass targets.long() (or the loss_fn=... the run was tracked with).")
    return (f"{head} The targets ({str(targets.dtype).replace('torch.', '')}, shape {tuple(targets.shape)}) must be "
            "what the training loop's loss took, and loss_fn the per-sample loss the run was tracked with.")


def as_model_input(model, x):
    """Float inputs in the model's dtype (a float64 DataFrame for a float32 model), as queries cast them."""
    param = next(model.parameters(), None)
    if param is None or not torch.is_tensor(x) or not x.is_floating_point() or not param.is_floating_point():
        return x
    return x.to(dtype=param.dtype)


def predicted_classes(model, x, batch: int = 512) -> np.ndarray:
    """The class ``model`` predicts for each input (argmax of its outputs; -1 where they are no class scores),
    in eval mode and without gradients (the caller gives the model its checkpoint's parameters and mode)."""
    n = len(ModelInputs(x)) if not torch.is_tensor(x) else len(x)
    out = np.full(n, -1, dtype=np.int64)
    with torch.no_grad():
        for a in range(0, n, batch):
            logits = model(as_model_input(model, x[a:a + batch]))
            if logits.ndim == 2 and logits.shape[1] > 1:
                out[a:a + batch] = logits.argmax(1).cpu().numpy()
    return out


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
    """(inputs, targets) of the samples ``ids`` of a torch Dataset of (x, y) or a pair of tensors (or pandas objects)."""
    if is_pair(dataset):
        idx = torch.from_numpy(np.asarray(ids, dtype=np.int64))
        return ModelInputs(dataset[0])[idx], torch.as_tensor(from_pandas(dataset[1], "targets"))[idx]
    items = [dataset[int(i)] for i in ids]
    xs = torch.stack([torch.as_tensor(it[0]) for it in items])
    ys = torch.stack([torch.as_tensor(it[1]) for it in items])
    return xs, ys


def _is_tensorlike(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "__getitem__")


def _is_strings(x) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(s, str) for s in x[:16])


class Samples:
    """One dataset: ``batch(ids)`` gives model inputs/targets, ``labels`` the classes, ``view(ids)`` the display.

    Feature rows (``kind == "tabular"``) are named by ``feature_names`` (or a DataFrame's columns; else
    ``x0, x1, …``); a row reads best by its most unusual values (``salient``: largest |z-score| against
    ``feature_stats``, the dataset's own column means and standard deviations unless given).
    """

    def __init__(self, data, *, encode: Callable | None = None, display: Sequence[str] | None = None,
                 feature_names: Sequence[str] | None = None, name: str = "data"):
        self.name, self.encode = name, encode
        self._labels: np.ndarray | None = None
        self._x = self._y = self._texts = self._dataset = None
        self._stats = None
        names = None
        if isinstance(data, (tuple, list)) and len(data) == 2 and (_is_tensorlike(data[0]) or _is_strings(data[0])):
            x, y = data
            names = feature_names_of(x)
            x, y = from_pandas(x, f"{name} inputs"), from_pandas(y, f"{name} targets")
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
        self.feature_names = None
        if self.kind == "tabular" and first is not None:
            width = int(torch.as_tensor(first).numel())
            names = list(feature_names) if feature_names is not None else names
            if names is not None and len(names) != width:
                raise ValueError(f"{name}: {len(names)} feature names for rows of {width} features.")
            self.feature_names = [str(c) for c in names] if names is not None else [f"x{i}" for i in range(width)]
        elif feature_names is not None:
            raise ValueError(f"{name}: feature_names are for feature rows (N, D); these samples are {self.kind}s.")

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

    def features(self, ids) -> np.ndarray:
        """float64 (n, D): the feature rows ``ids`` (tabular samples)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        xs, _ = self._raw(ids)
        rows = [torch.as_tensor(x).reshape(-1) for x in xs] if isinstance(xs, list) else list(xs.reshape(len(ids), -1))
        width = len(self.feature_names or ())
        if not rows:
            return np.zeros((0, width))
        return torch.stack(rows).detach().to("cpu", torch.float64).numpy()

    def feature_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) of each feature over the dataset (over an even sample of at most 20,000 rows), cached."""
        if self._stats is None:
            ids = np.linspace(0, self.n - 1, min(self.n, _STATS_ROWS)).round().astype(np.int64) if self.n else []
            rows = self.features(np.unique(ids))
            self._stats = (rows.mean(0), rows.std(0)) if len(rows) else (np.zeros(0), np.zeros(0))
        return self._stats

    def salient(self, ids, k: int = SALIENT, stats=None) -> tuple[np.ndarray, np.ndarray]:
        """(order (n, k) int64, z (n, k)): per row, its ``k`` features with the largest |z-score| (ties: column
        order), against ``stats`` = (mean, std) (default: ``feature_stats``); constant features score 0."""
        rows = self.features(ids)
        mean, std = stats if stats is not None else self.feature_stats()
        with np.errstate(invalid="ignore", divide="ignore"):
            z = np.where(std > 0, (rows - mean) / np.where(std > 0, std, 1.0), 0.0)
        k = min(int(k), rows.shape[1])
        order = np.argsort(-np.abs(z), axis=1, kind="stable")[:, :k]
        return order, np.take_along_axis(z, order, axis=1)

    def row_texts(self, ids, max_chars: int = TEXT_MAX, stats=None) -> list[str]:
        """Feature rows as "name value" items, the most unusual first, whole items only (never cut in a number)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        rows = self.features(ids)
        order, _ = self.salient(ids, rows.shape[1], stats)
        out = []
        for row, cols in zip(rows, order):
            items, used = [], 0
            for c in cols:
                item = f"{self.feature_names[c]} {short_number(row[c])}"
                if items and used + len(item) + 2 > max_chars - 2:
                    items.append("…")
                    break
                items.append(item)
                used += len(item) + 2
            out.append(", ".join(items))
        return out

    def texts(self, ids) -> list[str]:
        """Short strings: the text itself, or the feature row as named items, the most unusual first."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if self.display is not None:
            out = [self.display[int(i)] for i in ids]
        elif self.kind == "tabular":
            return self.row_texts(ids)
        else:
            xs, _ = self._raw(ids)
            out = [x if isinstance(x, str) else str(x) for x in xs]
        return [s if len(s) <= TEXT_MAX else s[:TEXT_MAX - 1] + "…" for s in out]

    def view(self, ids, stats=None) -> dict:
        """What a card shows: ``{"thumbs": uint8 (n, H, W, C)}`` for images; for feature rows ``{"features":
        float64 (n, D), "salient": (n, k) column order, "z": (n, k)}`` (``salient``); ``{"texts": [...]}`` otherwise."""
        if self.kind == "image":
            return {"thumbs": self.thumbnails(ids)}
        if self.kind == "tabular" and self.display is None:
            order, z = self.salient(ids, SALIENT, stats)
            return {"features": self.features(ids), "salient": order, "z": z}
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


def feature_stats_for(*samples: Samples):
    """The (mean, std) the rows of several datasets are compared against: the first tabular one's (the training
    set's, so that a test row's unusual values are unusual for the training data), or None."""
    for s in samples:
        if s.kind == "tabular" and s.display is None:
            return s.feature_stats()
    return None
