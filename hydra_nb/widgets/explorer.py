"""The contribution explorer: an anywidget whose front end asks and whose Python side answers.

Protocol (custom messages; see ``wire.py`` for how arrays travel):

    front end → Python   {"type": "request", "id": n, "method": name, "params": {...}}
    Python → front end   {"type": "progress", "id": n, "done": d, "total": t}          (0 or more)
                         {"type": "response", "id": n, "ok": true, "result": {...},
                          "buffer_paths": [...]}  + buffers
                         {"type": "response", "id": n, "ok": false, "error": "..."}

Methods (``_handle_*``): ``gallery`` (a page of test samples with labels and predictions),
``rankings`` (top-k helpful/harmful/absolute training samples of one test sample, filtered by
training class), ``trajectory`` (contributions of some training samples at every checkpoint),
``self_influence`` (a page of the ranked training set) and ``class_matrix``. Each answers from the
store through the query API (``hydra_nb.query.Store``), which streams the store chunk by chunk;
only the requested page or the k cards are turned into thumbnails. Results that are costly and
reused (a test sample's contribution row, self-influence, the class matrix, trajectories) are
cached until the store gains a checkpoint.

While a cell runs, the kernel cannot read requests; live mode (``live.py``) pushes pinned rankings
through the ``live_state`` trait instead.
"""

from __future__ import annotations

import copy
import time
from collections import OrderedDict
from pathlib import Path

import anywidget
import numpy as np
import torch
import traitlets

from ..data import Samples, as_samples, feature_stats_for, predicted_classes
from ..errors import StoreError
from ..query import Store, open_store, smallest_k
from ..sources import SOURCES
from .wire import pack, split_buffers

STATIC = Path(__file__).parent / "static"
SORTS = ("both", "helpful", "harmful", "absolute")
_ROW_CACHE = 32  # test samples whose contribution rows are kept
_PROGRESS_SECONDS = 0.25

# Which hypergradient source a view answers from when explore(mode=None): the first of these that the store can
# give (SOURCES[m].unavailable) and that has the view's operation ("dot": rankings, trajectories, the class matrix;
# "self_dot": self-influence). The one place that decides the default: an exact-mode store answers from its
# recorded exact/h, any other run that replays exactly by replay (every training sample), else fast.
MODE_PREFERENCE = ("exact", "replay", "fast")
# Modes whose answers take a walk over the whole run (seconds or more): a view shows the instant PREVIEW_MODE
# answer first, labelled as such, and asks again for the exact one (the answer's "upgrade"). Live updates during
# training use the preview only (the kernel is busy training).
SLOW_MODES = ("replay",)
PREVIEW_MODE = "fast"

# How each view names the mode its numbers come from (the `mode` of its answer): a short label, the sentence shown
# beside it, and for an estimate the measured figure behind that sentence, with its source.
MODE_LABELS = {
    "fast": {
        "label": "fast estimate",
        "note": "fast estimate: may disagree with exact at large learning rates",
        "figure": "Measured: at lr 0.01 fast rankings match exact ones (Spearman ≥ 0.98 after 92 steps); at lr 0.05 "
                  "with momentum 0.9 they decorrelate within a few dozen steps (Spearman 0.03–0.14 at step 92).",
        "source": "benchmarks/RESULTS.md, “Approximation error: fast vs exact HYDRA over training” "
                  "(python benchmarks/field_approx.py)",
    },
    "exact": {
        "label": "exact",
        "note": "exact: the derivative of this training run, Hessian terms included (tracked samples only)",
    },
    "replay": {
        "label": "exact (replay)",
        "note": "exact by replay: the derivative of this training run for every sample, by replaying it backward",
    },
    "curvature": {
        "label": "curvature estimate",
        "note": "curvature estimate: fast mode with each step's curvature estimated from the log (closer to exact "
                "where training is stable; not at lr 0.05 with momentum 0.9)",
        "figure": "Measured (mean Spearman with exact): 0.07 at the quickstart's setting (fast −0.01); 0.63–0.82 "
                  "where the exact derivative is not hypersensitive (fast 0.17–0.55), magnitudes 0.6–1.0× exact "
                  "(fast 3–18×).",
        "source": "benchmarks/RESULTS.md, “Curvature-aware estimates from the log” "
                  "(python benchmarks/curvature_agreement.py)",
    },
}


class Explorer(anywidget.AnyWidget):
    """Which training samples helped or hurt a test prediction: gallery, ranked cards, trajectories,
    self-influence and a class-by-class heatmap. Create with :func:`explore`.

    Synced state (set from Python or by clicks): ``selected`` (test index, -1 for none), ``k``,
    ``sort`` (``"both"``, ``"helpful"``, ``"harmful"``, ``"absolute"``), ``train_class`` (None for all
    classes), ``compared`` (training indices on the trajectory chart), ``pinned`` (test indices
    pushed in live mode), ``tab`` (``"explain"`` or ``"training"``). ``timeout_s``: how long the front
    end waits for an answer (default 120 s; large stores take a while).
    """

    _esm = STATIC / "explorer.js"
    _css = STATIC / "explorer.css"

    info = traitlets.Dict().tag(sync=True)
    selected = traitlets.Int(-1).tag(sync=True)
    k = traitlets.Int(10).tag(sync=True)
    sort = traitlets.Unicode("both").tag(sync=True)
    train_class = traitlets.Int(None, allow_none=True).tag(sync=True)
    compared = traitlets.List(traitlets.Int()).tag(sync=True)
    pinned = traitlets.List(traitlets.Int()).tag(sync=True)
    tab = traitlets.Unicode("explain").tag(sync=True)
    live_state = traitlets.Dict().tag(sync=True)
    timeout_s = traitlets.Float(120.0).tag(sync=True)

    def __init__(self, store, model, test_data, train_data, *, k: int = 10, class_names=None, encode=None,
                 test_display=None, train_display=None, feature_names=None, loss_fn=None, mode: str | None = None,
                 **kwargs):
        super().__init__(**kwargs)
        if mode is not None and mode not in SOURCES:
            raise ValueError(f"mode must be one of {', '.join(map(repr, SOURCES))} or None (the most exact the store "
                             f"gives), got {mode!r}.")
        self.model = model
        self.test = as_samples(test_data, "test_data", encode=encode, display=test_display,
                               feature_names=feature_names)
        self.train = as_samples(train_data, "train_data", encode=encode, display=train_display,
                                feature_names=feature_names)
        self._feature_stats = feature_stats_for(self.train, self.test)
        self._train_data = self.train.as_dataset()  # one object: the store keeps the replay source built for it
        self.class_names = None if class_names is None else [str(c) for c in class_names]
        self.query_mode = mode
        self._loss_fn = loss_fn
        if isinstance(store, Store):
            self._path, self._store = store.where, store
            self._loss_fn = loss_fn or store.loss_fn
        else:
            self._path, self._store = str(store), None
        self._run_key = ()  # no run seen yet (None: no store at the path)
        self._clear_caches()
        self._live = None
        self._handlers = {name[len("_handle_"):]: getattr(self, name) for name in dir(type(self))
                          if name.startswith("_handle_")}
        self.k = int(k)
        self._refresh_store()
        self.on_msg(self._on_custom)

    # -- the store, reopened while its run is live ---------------------------------------------
    def _clear_caches(self) -> None:
        self._rows: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()  # (mode, test index) → contributions
        self._traj: dict[tuple[str, int, int], np.ndarray] = {}  # (mode, test, train) → values at each checkpoint
        self._self_influence = None
        self._class_matrix = None
        self._pred = None
        self._query_model = None

    def _refresh_store(self) -> Store | None:
        """The store at its latest committed checkpoint (reopened while running; None before the run exists)."""
        s = self._store
        if s is None or not s.status.startswith("complete"):
            try:
                s = open_store(self._path, loss_fn=self._loss_fn, curvature=getattr(s, "curvature", None))
            except StoreError:
                s = self._store  # not there yet, or between runs: keep what we had
        self._store = s
        key = None if s is None else (s.meta.get("run_id"), len(s.checkpoint_steps))
        if key != self._run_key:
            self._run_key = key
            self._clear_caches()
            self.info = self._info()
        return s

    def _need_store(self) -> Store:
        s = self._refresh_store()
        if s is None:
            raise StoreError(f"No run in {self._path!r} yet: train under hydra_nb.track or %%hydra_track first.")
        return s

    @property
    def store(self) -> Store | None:
        return self._store

    def _info(self) -> dict:
        s = self._store
        labels = {}
        for name, samples in (("train", self.train), ("test", self.test)):
            try:
                labels[name] = sorted({int(v) for v in np.unique(samples.labels)})
            except Exception:  # labels not integers (regression): no class views
                labels[name] = []
        store = None
        if s is not None:
            store = {"path": str(self._path), "status": s.status, "mode": s.mode, "steps": int(s.steps),
                     "checkpoints": len(s.checkpoint_steps), "n_tracked": int(len(s.tracked_indices)),
                     "n_train": int(s.n_train), "replays": bool(s.replays)}
        features = self.train.feature_names or self.test.feature_names
        return {"test_kind": self.test.kind, "train_kind": self.train.kind, "n_test": len(self.test),
                "n_train": len(self.train), "train_classes": labels["train"], "test_classes": labels["test"],
                "class_names": self.class_names, "store": store, "path": str(self._path),
                "feature_names": features, "modes": MODE_LABELS}

    # -- which source answers -------------------------------------------------------------------
    def mode_for(self, operation: str = "dot") -> str:
        """The mode a view's numbers come from: ``mode=`` if given, else the first of ``MODE_PREFERENCE`` the store
        can give that has ``operation`` ("dot", or "self_dot" for self-influence); the store's own mode otherwise."""
        if self.query_mode is not None:
            return self.query_mode
        s = self._need_store()
        for mode in MODE_PREFERENCE:
            cls = SOURCES.get(mode)
            if cls is None or cls.unavailable(s.reader) is not None:
                continue
            if operation == "dot" or cls.offers(operation):
                return mode
        return s.mode

    def preview_mode(self, operation: str = "dot") -> str | None:
        """The instant mode a view shows first while ``mode_for(operation)`` is a slow one (replay), or None when
        the best mode is instant (or the store has no faster one)."""
        best = self.mode_for(operation)
        if self.query_mode is not None or best not in SLOW_MODES:
            return None
        cls = SOURCES.get(PREVIEW_MODE)
        return PREVIEW_MODE if cls is not None and cls.unavailable(self._need_store().reader) is None else None

    def _answer_mode(self, mode: str | None, operation: str = "dot") -> tuple[str, str | None]:
        """(the mode to answer in, the mode to ask for next or None): a request without ``mode`` gets the preview
        first, if there is one, and is told which better mode to ask for."""
        best = self.mode_for(operation)
        if mode is not None:
            if mode not in SOURCES:
                raise ValueError(f"mode must be one of {', '.join(map(repr, SOURCES))}, got {mode!r}.")
            return mode, None
        preview = self.preview_mode(operation)
        return (preview, best) if preview is not None else (best, None)

    def _ask(self, query: str, *args, operation: str = "dot", mode: str | None = None, **kwargs):
        """``Store.<query>(self.model, *args, mode=…, **kwargs)`` in ``mode`` (default: the source ``mode_for(operation)``
        picks); queries of ``dot`` get the training set too (``train_data``: exact answers by replay walk the run
        with it)."""
        s = self._need_store()
        if operation == "dot":
            kwargs["train_data"] = self._train_data
        return getattr(s, query)(self.model, *args, mode=mode or self.mode_for(operation), **kwargs)

    def _model_at_checkpoint(self):
        """A copy of the model with the last committed checkpoint's parameters (for predictions)."""
        if self._query_model is None:
            m = copy.deepcopy(self.model)
            if self._store is not None:
                self._store.load_params(m)
            self._query_model = m.eval()
        return self._query_model

    def predictions(self) -> np.ndarray:
        """Predicted class of every test sample at the last checkpoint (-1 where the output is no class score)."""
        if self._pred is None:
            m = self._model_at_checkpoint()
            out = np.full(len(self.test), -1, dtype=np.int64)
            for a in range(0, len(self.test), 512):  # a batch of samples at a time (a Dataset is read item by item)
                ids = np.arange(a, min(a + 512, len(self.test)))
                out[ids] = predicted_classes(m, self.test.batch(ids)[0])
            self._pred = out
        return self._pred

    # -- request handling ---------------------------------------------------------------------
    def _on_custom(self, _widget, content, buffers) -> None:
        if not isinstance(content, dict) or content.get("type") != "request":
            return
        rid = content.get("id")
        method = content.get("method")
        handler = self._handlers.get(method)
        try:
            if handler is None:
                raise ValueError(f"unknown request {method!r}")
            result = handler(progress=self._progress_to(rid), **(content.get("params") or {}))
        except Exception as exc:  # the front end shows it; the kernel stays usable
            self.send({"type": "response", "id": rid, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
            return
        body, paths, bufs = split_buffers(result)
        self.send({"type": "response", "id": rid, "ok": True, "result": body, "buffer_paths": paths}, bufs)

    def _progress_to(self, rid):
        last = [0.0]

        def report(done, total):
            now = time.monotonic()
            if now - last[0] >= _PROGRESS_SECONDS or done >= total:
                last[0] = now
                self.send({"type": "progress", "id": rid, "done": int(done), "total": int(total)})
        return report

    def _cards(self, ids, scores=None) -> dict:
        """What the front end needs to draw training cards: indices, labels, scores, thumbnails or texts."""
        ids = np.asarray(ids, dtype=np.int64)
        out = {"indices": pack(ids), "labels": pack(self.train.label_of(ids))}
        if scores is not None:
            out["scores"] = pack(np.asarray(scores, dtype=np.float64))
        out.update(packed_view(self.train, ids, self._feature_stats))
        return out

    def _handle_gallery(self, offset: int = 0, limit: int = 48, filter: str = "all", progress=None) -> dict:
        """A page of test samples: ``filter`` is "all", "misclassified" or "class:<c>"."""
        n = len(self.test)
        ids = np.arange(n)
        pred = None
        if self._store is not None or filter == "misclassified":
            pred = self.predictions()
        labels = self.test.labels
        if filter == "misclassified":
            ids = ids[(pred >= 0) & (pred != labels)]
        elif filter.startswith("class:"):
            ids = ids[labels == int(filter.split(":", 1)[1])]
        total = len(ids)
        page = ids[int(offset):int(offset) + max(0, min(int(limit), 500))]
        out = {"total": total, "offset": int(offset), "indices": pack(page), "labels": pack(labels[page]),
               "predicted": pack(pred[page] if pred is not None else np.full(len(page), -1))}
        out.update(packed_view(self.test, page, self._feature_stats))
        return out

    def contribution_row(self, test_index: int, progress=False, mode: str | None = None) -> np.ndarray:
        """contributions of every training sample the mode answers for to test sample ``test_index`` (cached)."""
        s = self._need_store()
        mode = mode or self.mode_for()
        key = (mode, int(test_index))
        if key in self._rows:
            self._rows.move_to_end(key)
            return self._rows[key]
        x, y = self.test.batch([int(test_index)])
        row = self._ask("contributions", x, y, mode=mode, progress=progress)[0]
        self._rows[key] = row
        while len(self._rows) > _ROW_CACHE:
            self._rows.popitem(last=False)
        return row

    def rank(self, test_index: int, k: int = 10, sort: str = "both", train_class=None, progress=False,
             mode: str | None = None):
        """{group: (dataset indices, scores)} for one test sample: the Python side of the ranking cards."""
        if sort not in SORTS:
            raise ValueError(f"sort must be one of {SORTS}, got {sort!r}.")
        mode = mode or self.mode_for()
        row = self.contribution_row(test_index, progress=progress, mode=mode)
        tracked = self._store.source(mode, train_data=self._train_data).tracked
        if train_class is not None:
            keep = self.train.label_of(tracked) == int(train_class)
            tracked, row = tracked[keep], row[keep]
        k = max(1, min(int(k), len(row))) if len(row) else 0
        groups = {}
        keys = {"helpful": -row, "harmful": row, "absolute": -np.abs(row)}
        for name in (("helpful", "harmful") if sort == "both" else (sort,)):
            order = smallest_k(keys[name], k)
            groups[name] = (tracked[order], row[order])
        return groups, int(len(row))

    def _handle_rankings(self, test: int, k: int = 10, sort: str = "both", train_class=None, progress=None,
                         mode: str | None = None) -> dict:
        """The cards of test sample ``test``. Without ``mode``: in the best mode, or, when that is a slow one
        (replay), first the instant preview with ``upgrade`` naming the mode to ask for next."""
        mode, upgrade = self._answer_mode(mode)
        groups, candidates = self.rank(test, k, sort, train_class, progress=progress, mode=mode)
        test = int(test)
        pred = self.predictions()
        # a picture is on screen already (the gallery's); a feature row or a text travels with the answer
        shown = {} if self.test.kind == "image" else {"test_view": packed_view(self.test, [test], self._feature_stats)}
        return {**shown, "test": test, "label": int(self.test.label_of([test])[0]), "predicted": int(pred[test]),
                "candidates": candidates, "step": int(self._store.steps), "mode": mode, "upgrade": upgrade,
                "groups": {name: self._cards(ids, scores) for name, (ids, scores) in groups.items()}}

    def verify(self, test_index: int, remove, progress=False) -> dict:
        """What if training had not seen ``remove``? The run replayed with their loss terms weighted 0 (same batches,
        ``Store.replay_without``): test sample ``test_index``'s loss and prediction before and after, beside the
        change its contributions predict, Σ_{i ∈ remove} contributions[z, i] (in the best mode available)."""
        s = self._need_store()
        remove = sorted({int(i) for i in remove})
        if not remove:
            raise ValueError("Pick one or more cards first (click them): they are the training samples to leave out.")
        j = int(test_index)
        loss_fn = s._loss(self._loss_fn)
        without = s.replay_without(self.model, remove, train_data=self._train_data, loss_fn=self._loss_fn,
                                   progress=progress)
        x, y = self.test.batch([j])
        before_model = self._model_at_checkpoint()
        with torch.no_grad():
            before = float(loss_fn(before_model(x), y).sum())
            after = float(loss_fn(without(x), y).sum())
        mode = self.mode_for()
        row = self.contribution_row(j, mode=mode)
        position = {int(i): a for a, i in enumerate(s.source(mode, train_data=self._train_data).tracked)}
        predicted = float(sum(row[position[i]] for i in remove if i in position))
        return {"test": j, "removed": remove, "loss_before": before, "loss_after": after,
                "actual_change": after - before, "predicted_change": predicted, "mode": mode,
                "predicted_before": int(predicted_classes(before_model, x)[0]),
                "predicted_after": int(predicted_classes(without, x)[0]), "label": int(self.test.label_of([j])[0])}

    def _handle_verify(self, test: int, train, progress=None) -> dict:
        return self.verify(test, train, progress=progress)

    def trajectories(self, test_index: int, train_indices, progress=False,
                     mode: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(steps (C,), values (C, len(train_indices))) for one test sample, cached per pair."""
        s = self._need_store()
        mode = mode or self.mode_for()
        j = int(test_index)
        train_indices = [int(i) for i in train_indices]
        missing = sorted({i for i in train_indices if (mode, j, i) not in self._traj})
        if missing:
            x, y = self.test.batch([j])
            _, values = self._ask("trajectory", x, y, missing, mode=mode, progress=progress)
            for col, i in enumerate(missing):
                self._traj[(mode, j, i)] = values[0, :, col]
        values = np.stack([self._traj[(mode, j, i)] for i in train_indices], axis=1) if train_indices else \
            np.zeros((len(s.checkpoint_steps), 0))
        return s.checkpoint_steps.copy(), values

    def _handle_trajectory(self, test: int, train, progress=None, mode: str | None = None) -> dict:
        """Trajectories of the compared cards; without ``mode`` the preview first, as for the rankings."""
        mode, upgrade = self._answer_mode(mode)
        steps, values = self.trajectories(test, train, progress=progress, mode=mode)
        train = np.asarray([int(i) for i in train], dtype=np.int64)
        return {"test": int(test), "mode": mode, "upgrade": upgrade, "steps": pack(steps, "float64"),
                "values": pack(values, "float64"),
                "epochs": pack(self._store.epoch_boundaries(), "float64"),
                "epoch_exact": self._store.meta["config"].get("checkpoint_every") == "epoch",
                "train": pack(train), "labels": pack(self.train.label_of(train))}

    def self_influence(self, progress=False) -> np.ndarray:
        """Self-influence of every training sample (cached; NaN for untracked samples)."""
        if self._self_influence is None:
            self._self_influence = self._ask("self_influence", self._train_data, operation="self_dot",
                                             progress=progress)
        return self._self_influence

    def _handle_self_influence(self, offset: int = 0, limit: int = 40, order: str = "desc", train_class=None,
                               progress=None) -> dict:
        values = self.self_influence(progress=progress)
        ids = np.flatnonzero(~np.isnan(values))
        if train_class is not None:
            ids = ids[self.train.label_of(ids) == int(train_class)]
        key = {"desc": -values[ids], "asc": values[ids], "abs": -np.abs(values[ids])}[order]
        ranked = ids[np.argsort(key, kind="stable")]
        page = ranked[int(offset):int(offset) + max(0, min(int(limit), 500))]
        finite = values[~np.isnan(values)]
        return {"total": int(len(ranked)), "offset": int(offset), "order": order,
                "mode": self.mode_for("self_dot"),
                "range": pack(np.array([finite.min(), finite.max()] if finite.size else [0.0, 0.0]), "float64"),
                **self._cards(page, values[page])}

    def global_mode(self) -> str:
        """The mode of the views over the whole test set (the class matrix): the instant one. A replay walk for
        every test class is a query to ask for in code (``Store.class_matrix(..., mode="exact", train_data=...)``)."""
        return self.preview_mode() or self.mode_for()

    def class_matrix(self, progress=False):
        if self._class_matrix is None:
            x, y = self.test.all()
            self._class_matrix = self._ask("class_matrix", self.train.labels, x, y, mode=self.global_mode(),
                                           progress=progress)
        return self._class_matrix

    def _handle_class_matrix(self, progress=None) -> dict:
        cm = self.class_matrix(progress=progress)
        return {"mode": self.global_mode(), "train_classes": pack(cm.train_classes),
                "test_classes": pack(cm.test_classes),
                "mean": pack(cm.mean, "float64"), "counts": pack(cm.counts, "float64")}

    # -- live mode ----------------------------------------------------------------------------
    def live(self, every: int = 200, pin=None, k: int = 5):
        """Push rankings of the pinned test samples while a training cell runs (see ``live.py``).

        Every ``every`` optimizer steps (of any optimizer in this process, or of the run given to
        ``track(on_step=explorer.on_step)``), if the store has committed a new checkpoint, the
        top-``k`` helpful and harmful training samples of each pinned test sample are recomputed
        from it and sent through the ``live_state`` trait. Returns the explorer.
        """
        from .live import LiveFeed

        if pin is not None:
            self.pinned = [int(i) for i in np.atleast_1d(pin)]
        if self._live is not None:
            self._live.detach()
        self._live = LiveFeed(self, every=every, k=k).attach()
        return self

    def stop_live(self) -> None:
        if self._live is not None:
            self._live.detach()
            self._live = None

    def on_step(self, tracker) -> None:
        """For ``track(..., on_step=explorer.on_step)``: live updates driven by that run's step count."""
        from .live import LiveFeed

        if self._live is None:
            self._live = LiveFeed(self, every=200, k=5)
        self._live.on_tracker_step(tracker)


def packed_view(samples: Samples, ids, stats=None) -> dict:
    """``samples.view(ids)`` as the front end takes it: arrays packed (thumbnails, feature rows), texts as they are."""
    view = samples.view(ids, stats)
    if "thumbs" in view:
        return {"thumbs": pack(view["thumbs"], "uint8")}
    if "features" in view:
        return {"features": pack(view["features"], "float64"), "salient": pack(view["salient"], "int32"),
                "z": pack(view["z"], "float32")}
    return view


def explore(store, model, test_data, train_data, **kwargs) -> Explorer:
    """An interactive explorer of a tracked run (display it as the last expression of a cell).

    ``store``: an open :class:`~hydra_nb.Store` or the path of one (the path may not hold a run yet:
    live mode waits for it). ``model``: the architecture queries run (parameters come from the
    store). ``test_data``/``train_data``: ``(inputs, targets)`` tensors, ``(texts, targets)`` with
    ``encode=``, or torch Datasets of ``(x, y)`` (see ``hydra_nb.data``); pandas DataFrames/Series too.
    Options: ``k`` (cards per group, default 10), ``class_names``, ``encode`` (strings → model inputs),
    ``test_display``/``train_display`` (strings to show), ``feature_names`` (names of the columns of feature
    rows; a DataFrame's columns by default), ``loss_fn``, ``mode`` (None: each view answers in the most exact
    mode the store gives, ``MODE_PREFERENCE``; "fast"/"exact" for every view). Each view says its mode.
    """
    return Explorer(store, model, test_data, train_data, **kwargs)
