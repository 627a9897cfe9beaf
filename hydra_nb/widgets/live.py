"""Live mode: push pinned rankings to an explorer while a training cell runs.

While a cell runs, the kernel reads no messages from the browser, so the front end cannot ask;
but trait updates from Python are sent at once. A :class:`LiveFeed` is called after optimizer
steps and, every ``every`` steps, looks at the store's committed checkpoint count (one small JSON
read). Only when a new checkpoint has been committed does it reopen the store read-only (readers
see committed checkpoints only) and compute ``top_k`` for the pinned test samples, then set the
explorer's ``live_state`` trait: cost per update ≈ one pass over the log for a handful of test
points, and nothing at all between checkpoints.

How it hears about steps, without changes to the tracker or the magic:

- ``explorer.live()``: a global optimizer step post-hook
  (``torch.optim.optimizer.register_optimizer_step_post_hook``) counts the steps of any optimizer
  in this process, so it works with ``%%hydra_track`` and ``hydra_nb.track`` alike; after the first
  cell that took steps ends (IPython's ``post_run_cell``), a last update is pushed and the hook removed.
- ``track(..., on_step=explorer.on_step)``: the tracker's own step count drives it.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..errors import StoreError
from ..query import open_store
from ..store import read_meta
from ..data import predicted_classes
from .explorer import packed_view


class LiveFeed:
    def __init__(self, explorer, every: int = 200, k: int = 5):
        if int(every) < 1:
            raise ValueError(f"every must be a positive number of steps, got {every!r}.")
        self.explorer, self.every, self.k = explorer, int(every), int(k)
        self.steps = 0
        self.pushes = 0
        self._seen = None  # (run_id, committed checkpoints) of the last ranking pushed
        self._hook = None
        self._shell = None
        self._broken = False

    # -- wiring -------------------------------------------------------------------------------
    def attach(self) -> "LiveFeed":
        self._hook = register_optimizer_step_post_hook(self._on_optimizer_step)
        try:
            from IPython import get_ipython

            shell = get_ipython()
        except ImportError:  # pragma: no cover - IPython is a dependency
            shell = None
        if shell is not None:
            shell.events.register("post_run_cell", self._on_cell_end)
            self._shell = shell
        self._publish(note="waiting for training steps")
        return self

    def detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._shell is not None:
            try:
                self._shell.events.unregister("post_run_cell", self._on_cell_end)
            except ValueError:
                pass
            self._shell = None

    def _on_optimizer_step(self, optimizer, args, kwargs) -> None:
        self.steps += 1
        if self.steps % self.every == 0:
            self.update()

    def on_tracker_step(self, tracker) -> None:
        self.steps = int(tracker.step)
        if self.steps % self.every == 0:
            self.update()

    def _on_cell_end(self, result=None) -> None:
        if self.steps == 0:
            return  # the cell that called live(): training comes in a later cell
        self.update(final=True)
        self.detach()

    # -- the update ---------------------------------------------------------------------------
    def update(self, final: bool = False) -> None:
        """Push rankings if a new checkpoint was committed (never raises into the training loop)."""
        if self._broken:
            return
        try:
            self._update(final)
        except Exception as exc:
            self._broken = True
            warnings.warn(f"hydra_nb explorer: live updates stopped: {exc!r}", RuntimeWarning, stacklevel=2)
            self._publish(note=f"live updates stopped: {type(exc).__name__}: {exc}")

    def _update(self, final: bool) -> None:
        ex = self.explorer
        meta = read_meta(ex._path)
        if meta is None or int(meta.get("committed", {}).get("checkpoints", 0)) == 0:
            self._publish(note="waiting for the first checkpoint")
            return
        key = (meta.get("run_id"), int(meta["committed"]["checkpoints"]))
        if key == self._seen and not final:
            self._publish()  # step count only
            return
        try:
            store = open_store(ex._path, loss_fn=ex._loss_fn)
        except StoreError:
            return  # between a commit's files: try again at the next update
        if store.steps == 0:  # only the initial checkpoint: every contribution is still 0
            self._publish(note="waiting for the first checkpoint after step 0")
            return
        self._seen = key
        ex._store = store
        ex._run_key = None  # caches are stale; refreshed on the next request
        ex._refresh_store()
        pinned = list(ex.pinned) or ([ex.selected] if ex.selected >= 0 else [0])
        pinned = [j for j in pinned if 0 <= j < len(ex.test)][:8]
        items = []
        if pinned:
            x, y = ex.test.batch(pinned)
            top = ex._ask("top_k", x, y, k=self.k, progress=False)
            pred = _predict(ex, x)
            for r, j in enumerate(pinned):
                item = {"test": int(j), "label": int(ex.test.label_of([j])[0]), "predicted": int(pred[r])}
                item.update(packed_view(ex.test, [j], ex._feature_stats))
                item["helpful"] = ex._cards(top.helpful_indices[r], top.helpful_scores[r])
                item["harmful"] = ex._cards(top.harmful_indices[r], top.harmful_scores[r])
                items.append(item)
        self.pushes += 1
        self._items = items
        self._mode = ex.mode_for()
        self._checkpoint_step = int(store.steps)
        self._status = store.status
        self._publish(final=final)

    def _publish(self, note: str | None = None, final: bool = False) -> None:
        items = getattr(self, "_items", [])
        state = {"active": not final, "step": int(self.steps), "every": self.every,
                 "checkpoint_step": getattr(self, "_checkpoint_step", None),
                 "status": getattr(self, "_status", None), "note": note, "updates": self.pushes,
                 "mode": getattr(self, "_mode", None),
                 "time": time.time(), "items": items}
        self.explorer.live_state = state


def _predict(ex, x) -> np.ndarray:
    return predicted_classes(ex._model_at_checkpoint(), x)
