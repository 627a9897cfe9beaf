"""Matplotlib versions of the explorer's views, for static reports and papers.

Each function returns a :class:`matplotlib.figure.Figure` that lays itself out (matplotlib's constrained
layout: nothing is clipped, whether saved with ``bbox_inches="tight"`` or not), with a title, labelled axes
and units. Contributions are ``−∂L(z_test)/∂w_i`` (``Store.contributions``): the change of the test
loss, in the loss's units (nats for cross-entropy), per unit of extra weight on training sample i, sign
flipped so that positive means *helpful*. Colour means what it means in the explorer: helpful green,
harmful red, suspects (high self-influence) amber.

Data arguments take the same forms as :func:`hydra_nb.explore` (``(inputs, targets)`` tensors, arrays or
pandas objects, ``(texts, targets)`` with ``encode=``, or torch Datasets); feature rows are named by
``feature_names=`` (or a DataFrame's columns) and shown by their most unusual values. Pass precomputed
results (``top=``, ``values=``, a ``ClassMatrix``) to skip the query. Test samples are shown with their
true and predicted class (the model at the store's last checkpoint). ``mode=`` as for queries:
``mode="exact"`` on a fast-mode store replays the run with the training data given (``train_data``), so
the figure shows the exact derivative for every training sample.

    hydra_nb.plot.top_k(store, model, test_data, train_data, test_indices=[3, 14], k=5)
    hydra_nb.plot.trajectory(store, model, test_data, test_index=14, train_indices=[1057, 2])
    hydra_nb.plot.self_influence(store, model, train_data, n=20)
    hydra_nb.plot.class_matrix(store, model, train_data, test_data)
"""

from __future__ import annotations

import copy
import math

import numpy as np

from .data import as_samples, feature_stats_for, predicted_classes
from .query import ClassMatrix, TopK

UNITS = "contribution −∂L/∂w (loss units per unit sample weight)"
# the explorer's colours (js/src/style.css): helped, hurt, suspect
GOOD, BAD, SUSPECT = "#1a9641", "#d7301f", "#e08e0b"
_NAME_MAX = 12    # characters of a class name in titles and ticks (the whole name where there is room)
_LABEL_MAX = 56   # characters of a feature row or a text beside a bar (whole items only)


def _plt():
    import matplotlib.pyplot as plt

    return plt


def _name(class_names, c, short: bool = True) -> str:
    """Class c's name; a long one cut in the middle (a figure has no tooltips: keep both ends apart)."""
    c = int(c)
    name = str(class_names[c]) if class_names is not None and 0 <= c < len(class_names) else str(c)
    return name if not short or len(name) <= _NAME_MAX else name[:_NAME_MAX - 4] + "…" + name[-3:]


def _predicted(store, model, samples, ids) -> np.ndarray:
    """The class the model at the store's last checkpoint predicts for samples ``ids`` (-1: no class scores)."""
    m = copy.deepcopy(model)
    store.load_params(m)
    return predicted_classes(m.eval(), samples.batch(ids)[0])


def _true_pred(class_names, label, pred) -> str:
    return f"y={_name(class_names, label)}" + (f" → {_name(class_names, pred)}" if pred >= 0 else "")


def _show_image(ax, samples, i, title, color="k", cmap="gray_r"):
    img = samples.thumbnails([i])[0]
    ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap=cmap if img.shape[-1] == 1 else None,
              vmin=0, vmax=255)
    ax.set_title(title, fontsize=7, color=color)
    ax.set_xticks([])
    ax.set_yticks([])


def _describe(samples, ids, stats, max_chars: int = _LABEL_MAX) -> list[str]:
    """Feature rows as their most unusual named values, texts as their first words: whole items, never cut in a
    number."""
    if samples.kind == "tabular" and samples.display is None:
        return samples.row_texts(ids, max_chars, stats)
    return [t if len(t) <= max_chars else t[:max_chars - 1] + "…" for t in samples.texts(ids)]


def _replay_data(train):
    """The training set as queries take it (``mode="exact"`` on a fast store replays the run with it), or None."""
    return None if train is None else train.as_dataset()


def _samples(test_data, train_data, encode, feature_names):
    test = None if test_data is None else as_samples(test_data, "test_data", encode=encode,
                                                     feature_names=feature_names)
    train = None if train_data is None else as_samples(train_data, "train_data", encode=encode,
                                                       feature_names=feature_names)
    return test, train, feature_stats_for(*(s for s in (train, test) if s is not None))


def top_k(store, model, test_data, train_data, test_indices, k: int = 5, *, top: TopK | None = None,
          class_names=None, mode=None, encode=None, feature_names=None):
    """Per test sample (a row, named by the test sample with its true and predicted class): its ``k`` most
    helpful and ``k`` most harmful training samples.

    Images are drawn; texts and feature rows are a bar chart of the scores, each bar named by its sample
    (index, class, and its most unusual feature values or first words). ``top``: a precomputed
    ``Store.top_k`` result for ``test_indices``.
    """
    plt = _plt()
    test, train, stats = _samples(test_data, train_data, encode, feature_names)
    test_indices = [int(i) for i in np.atleast_1d(test_indices)]
    if top is None:
        x, y = test.batch(test_indices)
        top = store.top_k(model, x, y, k=k, mode=mode, progress=False, train_data=_replay_data(train))
    k = top.helpful_indices.shape[1]
    n = len(test_indices)
    labels, preds = test.label_of(test_indices), _predicted(store, model, test, test_indices)
    if train.kind == "image":
        fig, axes = plt.subplots(n, 2 * k + 1, figsize=(1.1 * (2 * k + 1), 1.55 * n + 0.9), squeeze=False,
                                 layout="constrained")
        for r, j in enumerate(test_indices):
            wrong = 0 <= preds[r] != labels[r]
            if test.kind == "image":
                _show_image(axes[r, 0], test, j, f"test #{j}\n{_true_pred(class_names, labels[r], preds[r])}",
                            color=BAD if wrong else "k")
            else:
                axes[r, 0].axis("off")
                axes[r, 0].set_title(f"test #{j}\n{_true_pred(class_names, labels[r], preds[r])}", fontsize=7)
            axes[r, 0].set_ylabel(f"test #{j}", fontsize=8)
            groups = [(top.helpful_indices[r], top.helpful_scores[r], GOOD, "Greens"),
                      (top.harmful_indices[r], top.harmful_scores[r], BAD, "Reds")]
            col = 1
            for ids, scores, color, cmap in groups:
                for i, s in zip(ids, scores):
                    lab = _name(class_names, train.label_of([i])[0])
                    _show_image(axes[r, col], train, int(i), f"#{i} y={lab}\n{s:+.2e}", color=color, cmap=cmap)
                    col += 1
        fig.suptitle(f"Each row: a test sample (y = true → predicted), its {k} most helpful (green) and {k} most "
                     f"harmful (red) training samples\nscore: {UNITS}", fontsize=9)
        return fig
    fig, axes = plt.subplots(n, 1, figsize=(9, (0.27 * 2 * k + 0.9) * n + 0.5), squeeze=False, layout="constrained")
    for r, j in enumerate(test_indices):
        ax = axes[r, 0]
        ids = np.concatenate([top.helpful_indices[r], top.harmful_indices[r][::-1]])
        scores = np.concatenate([top.helpful_scores[r], top.harmful_scores[r][::-1]])
        names = [f"#{i} y={_name(class_names, train.label_of([i])[0])}: {t}"
                 for i, t in zip(ids, _describe(train, ids, stats))]
        rows = np.arange(len(ids))[::-1]
        ax.barh(rows, scores, color=[GOOD if s >= 0 else BAD for s in scores])
        ax.set_yticks(rows, names, fontsize=7)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_xlabel(UNITS, fontsize=8)
        wrong = 0 <= preds[r] != labels[r]
        ax.set_title(f"test #{j} ({_true_pred(class_names, labels[r], preds[r])})\n"
                     f"{_describe(test, [j], stats)[0]}", fontsize=8, color=BAD if wrong else "k", loc="left")
    fig.suptitle(f"Most helpful (green) and most harmful (red) training samples, k = {k}", fontsize=10)
    return fig


def trajectory(store, model, test_data, test_index: int, train_indices, *, class_names=None, mode=None,
               encode=None, train_data=None, ax=None, feature_names=None):
    """Contribution of each of ``train_indices`` to test sample ``test_index`` if training had stopped
    at each checkpoint; epoch ends as dashed lines (estimated when checkpoints were every N steps)."""
    plt = _plt()
    test, train, _ = _samples(test_data, train_data, encode, feature_names)
    train_indices = [int(i) for i in np.atleast_1d(train_indices)]
    x, y = test.batch([int(test_index)])
    steps, values = store.trajectory(model, x, y, train_indices, mode, progress=False, train_data=_replay_data(train))
    if ax is None:
        fig, ax = plt.subplots(figsize=(7.5, 3.8), layout="constrained")
    else:
        fig = ax.figure
    for col, i in enumerate(train_indices):
        label = f"train #{i}" + ("" if train is None else f" (y={_name(class_names, train.label_of([i])[0])})")
        ax.plot(steps, values[0, :, col], marker="o", ms=3, label=label)
    exact = store.meta.get("config", {}).get("checkpoint_every") == "epoch"
    for e_i, e in enumerate(store.epoch_boundaries()):
        ax.axvline(e, color="0.6", ls="--", lw=0.8, label=("epoch end" if exact else "epoch end (est.)")
                   if e_i == 0 else None)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("optimizer step (checkpoints)")
    ax.set_ylabel("contribution −∂L/∂w")
    label, pred = test.label_of([int(test_index)])[0], _predicted(store, model, test, [int(test_index)])[0]
    ax.set_title(f"Contribution to test sample #{int(test_index)} ({_true_pred(class_names, label, pred)}) "
                 "over training", fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the lines, never over them
    return fig


def self_influence(store, model, train_data, n: int = 20, *, values=None, class_names=None, mode=None,
                   encode=None, feature_names=None):
    """The mislabel hunt: all self-influence values ranked (top), and the ``n`` highest, the suspects, with their
    label and the class the model predicts for them (a suspect predicted as another class is worth a look).

    ``values``: a precomputed ``Store.self_influence`` array (N,).
    """
    plt = _plt()
    _, train, stats = _samples(None, train_data, encode, feature_names)
    if values is None:
        values = store.self_influence(model, train.as_dataset(), mode, progress=False)
    values = np.asarray(values, dtype=np.float64)
    ids = np.flatnonzero(~np.isnan(values))
    ranked = ids[np.argsort(-values[ids], kind="stable")]
    n = min(int(n), len(ranked))
    top = ranked[:n]
    labels, preds = train.label_of(top), _predicted(store, model, train, top)
    cols = min(max(n, 1), 10)
    image_rows = -(-n // cols) if train.kind == "image" else 0
    below = 1.35 * image_rows if image_rows else 0.24 * n + 0.8
    fig = plt.figure(figsize=(max(7.5, 1.0 * cols), 2.9 + below), layout="constrained")
    # two subfigures, laid out apart: the bars' long labels must not push the ranking's axes (and title) aside
    upper, lower = fig.subfigures(2, 1, height_ratios=[2.9, max(below, 0.1)])
    ax = upper.add_subplot()
    ax.plot(np.arange(1, len(ranked) + 1), values[ranked], color="0.3", lw=1)
    ax.scatter(np.arange(1, n + 1), values[top], color=SUSPECT, s=12, zorder=3, label=f"top {n}: suspects")
    ax.set_xscale("log")
    ax.set_xlabel("rank (log scale)")
    ax.set_ylabel("self-influence −∂L(z_i)/∂w_i")
    ax.set_title(f"Self-influence of {len(ranked):,} training samples (high: memorised, often mislabelled)",
                 fontsize=10)
    ax.legend(fontsize=7)
    if image_rows:
        grid = lower.add_gridspec(image_rows, cols)
        for r, i in enumerate(top):
            a = lower.add_subplot(grid[r // cols, r % cols])
            _show_image(a, train, int(i), f"{r + 1}. #{i} {values[i]:+.2g}\n"
                                          f"{_true_pred(class_names, labels[r], preds[r])}", color=SUSPECT)
    elif n:
        a = lower.add_subplot()
        a.barh(np.arange(n)[::-1], values[top], color=SUSPECT)
        a.set_yticks(np.arange(n)[::-1], [f"{r + 1}. #{i} {_true_pred(class_names, labels[r], preds[r])}: {t}"
                                          for r, (i, t) in enumerate(zip(top, _describe(train, top, stats)))],
                     fontsize=7)
        a.set_xlabel("self-influence −∂L(z_i)/∂w_i")
    return fig


def class_matrix(store, model=None, train_data=None, test_data=None, *, class_names=None, mode=None,
                 encode=None, annotate: bool | None = None, feature_names=None):
    """Heatmap of the mean contribution of each training class (rows) to each test class (columns), green where
    the training class helped, red where it hurt. Sized for 2 to 100 classes: cells shrink, tick labels turn
    and thin out (every class keeps its row and column; the labels show every one that fits).

    ``store`` may be a precomputed :class:`~hydra_nb.ClassMatrix`.
    """
    plt = _plt()
    if isinstance(store, ClassMatrix):
        cm = store
    else:
        test, train, _ = _samples(test_data, train_data, encode, feature_names)
        x, y = test.all()
        cm = store.class_matrix(model, train.labels, x, y, mode, progress=False, train_data=_replay_data(train))
    mean = np.asarray(cm.mean, dtype=np.float64)
    vmax = float(np.nanmax(np.abs(mean))) if np.isfinite(mean).any() else 1.0
    n_rows, n_cols = len(cm.train_classes), len(cm.test_classes)
    cell = min(0.5, 9.0 / max(n_rows, n_cols))                     # inches
    font = max(4.0, min(8.0, 72 * cell * 0.8))                       # a tick label's height fits its cell
    col_names = [_name(class_names, c) for c in cm.test_classes]
    row_names = [_name(class_names, c) for c in cm.train_classes]
    size = (max(4.8, cell * n_cols + 2.6), max(3.4, cell * n_rows + 1.9))
    # the cells of a small matrix grow to fill the figure: a label turns only if it is wider than its real cell
    col_cell, row_cell = max(cell, (size[0] - 2.6) / n_cols), max(cell, (size[1] - 1.9) / n_rows)
    wide = max(map(len, col_names), default=1) * font * 0.62 / 72 > col_cell * 0.95
    fig, ax = plt.subplots(figsize=size, layout="constrained")
    im = ax.imshow(mean, cmap="RdYlGn", vmin=-vmax, vmax=vmax, aspect="auto")
    ax.set_xticks(range(n_cols), col_names, fontsize=font, rotation=90 if wide else 0)
    ax.set_yticks(range(n_rows), row_names, fontsize=font)
    _thin(ax.get_xticklabels(), col_cell, font * 1.25 if wide else max(map(len, col_names)) * font * 0.62 + font)
    _thin(ax.get_yticklabels(), row_cell, font * 1.25)
    ax.set_xlabel("test class")
    ax.set_ylabel("training class")
    ax.set_title("Mean contribution of training class (rows)\nto test class (columns)", fontsize=10)
    if annotate is None:
        annotate = mean.size <= 144
    if annotate:
        for a in range(mean.shape[0]):
            for b in range(mean.shape[1]):
                if np.isfinite(mean[a, b]):
                    ax.text(b, a, f"{mean[a, b]:.2g}", ha="center", va="center", fontsize=min(6, font))
    fig.colorbar(im, ax=ax, label="mean contribution −∂L/∂w", shrink=0.9)
    return fig


def _thin(labels, cell_in: float, size_pt: float) -> None:
    """Show every k-th tick label, k the fewest cells one label needs along the axis (``size_pt``, air included)."""
    step = max(1, math.ceil(size_pt / 72 / cell_in))
    for i, label in enumerate(labels):
        label.set_visible(i % step == 0)
