"""Matplotlib versions of the explorer's views, for static reports and papers.

Each function returns a :class:`matplotlib.figure.Figure` with a title, labelled axes and units.
Contributions are ``−∂L(z_test)/∂w_i`` (``Store.contributions``): the change of the test loss, in
the loss's units (nats for cross-entropy), per unit of extra weight on training sample i, sign
flipped so that positive means *helpful*. Data arguments take the same forms as
:func:`hydra_nb.explore` (``(inputs, targets)`` tensors, ``(texts, targets)`` with ``encode=``, or
torch Datasets); pass precomputed results (``top=``, ``values=``, a ``ClassMatrix``) to skip the query.

    hydra_nb.plot.top_k(store, model, test_data, train_data, test_indices=[3, 14], k=5)
    hydra_nb.plot.trajectory(store, model, test_data, test_index=14, train_indices=[1057, 2])
    hydra_nb.plot.self_influence(store, model, train_data, n=20)
    hydra_nb.plot.class_matrix(store, model, train_data, test_data)
"""

from __future__ import annotations

import numpy as np

from .data import as_samples
from .query import ClassMatrix, TopK

UNITS = "contribution −∂L/∂w (loss units per unit sample weight)"
_GOOD, _BAD = "#1a9641", "#d7301f"


def _plt():
    import matplotlib.pyplot as plt

    return plt


def _name(class_names, c) -> str:
    c = int(c)
    return str(class_names[c]) if class_names is not None and 0 <= c < len(class_names) else str(c)


def _show_sample(ax, samples, i, title, color="k", cmap="gray_r"):
    if samples.kind == "image":
        img = samples.thumbnails([i])[0]
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap=cmap if img.shape[-1] == 1 else None,
                  vmin=0, vmax=255)
    else:
        ax.text(0.02, 0.5, samples.texts([i])[0][:80], fontsize=6, va="center", ha="left", wrap=True,
                transform=ax.transAxes)
    ax.set_title(title, fontsize=7, color=color)
    ax.set_xticks([])
    ax.set_yticks([])


def top_k(store, model, test_data, train_data, test_indices, k: int = 5, *, top: TopK | None = None,
          class_names=None, mode=None, encode=None):
    """Per test sample (a row): the sample, its ``k`` most helpful and ``k`` most harmful training samples.

    Images are drawn; texts and feature rows are shown as a bar chart of the scores labelled with
    the samples. ``top``: a precomputed ``Store.top_k`` result for ``test_indices``.
    """
    plt = _plt()
    test = as_samples(test_data, "test_data", encode=encode)
    train = as_samples(train_data, "train_data", encode=encode)
    test_indices = [int(i) for i in np.atleast_1d(test_indices)]
    if top is None:
        x, y = test.batch(test_indices)
        top = store.top_k(model, x, y, k=k, mode=mode, progress=False)
    k = top.helpful_indices.shape[1]
    n = len(test_indices)
    if train.kind == "image":
        fig, axes = plt.subplots(n, 2 * k + 1, figsize=(1.1 * (2 * k + 1), 1.45 * n + 0.8), squeeze=False)
        for r, j in enumerate(test_indices):
            _show_sample(axes[r, 0], test, j, f"test #{j}\ny={_name(class_names, test.label_of([j])[0])}")
            groups = [(top.helpful_indices[r], top.helpful_scores[r], _GOOD, "Greens"),
                      (top.harmful_indices[r], top.harmful_scores[r], _BAD, "Reds")]
            col = 1
            for ids, scores, color, cmap in groups:
                for i, s in zip(ids, scores):
                    lab = _name(class_names, train.label_of([i])[0])
                    _show_sample(axes[r, col], train, int(i), f"#{i} y={lab}\n{s:+.2e}", color=color, cmap=cmap)
                    col += 1
        fig.suptitle(f"Most helpful (green) and most harmful (red) training samples, k = {k}\n"
                     f"score: {UNITS}", fontsize=9)
    else:
        fig, axes = plt.subplots(n, 1, figsize=(8, (0.3 * 2 * k + 1.0) * n + 0.6), squeeze=False)
        for r, j in enumerate(test_indices):
            ax = axes[r, 0]
            ids = np.concatenate([top.helpful_indices[r], top.harmful_indices[r][::-1]])
            scores = np.concatenate([top.helpful_scores[r], top.harmful_scores[r][::-1]])
            labels = [f"#{i} y={_name(class_names, train.label_of([i])[0])}: {t[:40]}"
                      for i, t in zip(ids, train.texts(ids))]
            ax.barh(np.arange(len(ids))[::-1], scores, color=[_GOOD if s >= 0 else _BAD for s in scores])
            ax.set_yticks(np.arange(len(ids))[::-1], labels, fontsize=7)
            ax.axvline(0, color="k", lw=0.8)
            ax.set_xlabel(UNITS)
            ax.set_title(f"test #{j} (y={_name(class_names, test.label_of([j])[0])}): {test.texts([j])[0][:60]}",
                         fontsize=9)
        fig.suptitle(f"Most helpful and most harmful training samples, k = {k}", fontsize=10)
    fig.tight_layout()
    return fig


def trajectory(store, model, test_data, test_index: int, train_indices, *, class_names=None, mode=None,
               encode=None, train_data=None, ax=None):
    """Contribution of each of ``train_indices`` to test sample ``test_index`` if training had stopped
    at each checkpoint; epoch ends as dashed lines (estimated when checkpoints were every N steps)."""
    plt = _plt()
    test = as_samples(test_data, "test_data", encode=encode)
    train = None if train_data is None else as_samples(train_data, "train_data", encode=encode)
    train_indices = [int(i) for i in np.atleast_1d(train_indices)]
    x, y = test.batch([int(test_index)])
    steps, values = store.trajectory(model, x, y, train_indices, mode, progress=False)
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 3.8))
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
    ax.set_title(f"Contribution to test sample #{int(test_index)} "
                 f"(y={_name(class_names, test.label_of([int(test_index)])[0])}) over training", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def self_influence(store, model, train_data, n: int = 20, *, values=None, class_names=None, mode=None,
                   encode=None):
    """The mislabel hunt: all self-influence values ranked (top), and the ``n`` highest with their labels.

    ``values``: a precomputed ``Store.self_influence`` array (N,).
    """
    plt = _plt()
    train = as_samples(train_data, "train_data", encode=encode)
    if values is None:
        values = store.self_influence(model, train.as_dataset(), mode, progress=False)
    values = np.asarray(values, dtype=np.float64)
    ids = np.flatnonzero(~np.isnan(values))
    ranked = ids[np.argsort(-values[ids], kind="stable")]
    n = min(int(n), len(ranked))
    cols = min(n, 10)
    rows = -(-n // cols) if train.kind == "image" else 0
    fig = plt.figure(figsize=(max(7, 1.0 * cols), 2.8 + 1.25 * rows + (0.25 * n if train.kind != "image" else 0)))
    grid = fig.add_gridspec(1 + max(rows, 1), cols, height_ratios=[2.2] + [1.0] * max(rows, 1))
    ax = fig.add_subplot(grid[0, :])
    ax.plot(np.arange(1, len(ranked) + 1), values[ranked], color="0.3", lw=1)
    ax.scatter(np.arange(1, n + 1), values[ranked[:n]], color=_BAD, s=10, zorder=3, label=f"top {n}")
    ax.set_xscale("log")
    ax.set_xlabel("rank (log scale)")
    ax.set_ylabel("self-influence −∂L(z_i)/∂w_i")
    ax.set_title(f"Self-influence of {len(ranked):,} training samples (high: memorised, often mislabelled)",
                 fontsize=10)
    ax.legend(fontsize=7)
    if train.kind == "image":
        for r in range(n):
            i = int(ranked[r])
            a = fig.add_subplot(grid[1 + r // cols, r % cols])
            _show_sample(a, train, i, f"{r + 1}. #{i}\ny={_name(class_names, train.label_of([i])[0])} "
                                      f"{values[i]:+.2g}")
    else:
        a = fig.add_subplot(grid[1, :])
        top = ranked[:n]
        a.barh(np.arange(n)[::-1], values[top], color=_BAD)
        a.set_yticks(np.arange(n)[::-1], [f"#{i} y={_name(class_names, train.label_of([i])[0])}: {t[:40]}"
                                          for i, t in zip(top, train.texts(top))], fontsize=7)
        a.set_xlabel("self-influence −∂L(z_i)/∂w_i")
    fig.tight_layout()
    return fig


def class_matrix(store, model=None, train_data=None, test_data=None, *, class_names=None, mode=None,
                 encode=None, annotate: bool | None = None):
    """Heatmap of the mean contribution of each training class (rows) to each test class (columns).

    ``store`` may be a precomputed :class:`~hydra_nb.ClassMatrix`.
    """
    plt = _plt()
    if isinstance(store, ClassMatrix):
        cm = store
    else:
        train = as_samples(train_data, "train_data", encode=encode)
        test = as_samples(test_data, "test_data", encode=encode)
        x, y = test.all()
        cm = store.class_matrix(model, train.labels, x, y, mode, progress=False)
    mean = np.asarray(cm.mean, dtype=np.float64)
    vmax = float(np.nanmax(np.abs(mean))) if np.isfinite(mean).any() else 1.0
    fig, ax = plt.subplots(figsize=(1.0 + 0.5 * len(cm.test_classes) + 1.5, 1.0 + 0.5 * len(cm.train_classes)))
    im = ax.imshow(mean, cmap="RdYlGn", vmin=-vmax, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cm.test_classes)), [_name(class_names, c) for c in cm.test_classes])
    ax.set_yticks(range(len(cm.train_classes)), [_name(class_names, c) for c in cm.train_classes])
    ax.set_xlabel("test class")
    ax.set_ylabel("training class")
    ax.set_title("Mean contribution of training class to test class", fontsize=10)
    if annotate is None:
        annotate = mean.size <= 144
    if annotate:
        for a in range(mean.shape[0]):
            for b in range(mean.shape[1]):
                if np.isfinite(mean[a, b]):
                    ax.text(b, a, f"{mean[a, b]:.2g}", ha="center", va="center", fontsize=6)
    fig.colorbar(im, ax=ax, label="mean contribution −∂L/∂w")
    fig.tight_layout()
    return fig
