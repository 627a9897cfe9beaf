"""Sample identity: which dataset indices each batch the user's loop receives holds.

The DataLoader's batch sampler runs in the main process, ahead of the loop
(workers prefetch), and batches come back in sampling order. So the tap records
every index list the sampler hands out in a queue owned by the iterator that
asked for it, and pops one list each time the loop receives a batch. It works
with ``shuffle=True``, ``num_workers>0``, persistent workers, custom samplers
and ``drop_last``. Everything is restored on ``detach``.
"""

from __future__ import annotations

import collections
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, IterableDataset

from .errors import TrackingConfigError


class CurrentBatch:
    """The batch the loop received last: its dataset indices and the batch itself."""

    __slots__ = ("generation", "indices", "batch")

    def __init__(self, generation: int, indices: torch.Tensor, batch: Any):
        self.generation = generation
        self.indices = indices
        self.batch = batch


class _RecordingBatchSampler:
    """Wraps the loader's batch sampler; each ``iter()`` records into a fresh queue."""

    def __init__(self, inner, tap: "LoaderTap"):
        self._inner = inner
        self._tap = tap

    def __iter__(self):
        queue: collections.deque = collections.deque()
        self._tap._queues.append(queue)
        inner = self._inner

        def generate():
            for batch in inner:
                queue.append(batch)
                yield batch

        return generate()

    def __len__(self):
        return len(self._inner)

    def __getattr__(self, name):
        return getattr(self._inner, name)


class _TappedIterator:
    """The iterator the loop sees: yields the loader's batches, noting their indices."""

    def __init__(self, inner, queue, tap: "LoaderTap"):
        self._inner = inner
        self._queue = queue
        self._tap = tap

    def __iter__(self):
        return self

    def __len__(self):
        return len(self._inner)

    def __next__(self):
        try:
            batch = next(self._inner)
        except StopIteration:
            self._tap._on_exhausted(self)
            raise
        if not self._queue:  # pragma: no cover - would mean the loader reordered batches
            raise RuntimeError("hydra_nb lost track of the batch order of the DataLoader")
        self._tap._on_batch(self._queue.popleft(), batch)
        return batch

    def __getattr__(self, name):
        return getattr(self._inner, name)


_SUBCLASSES: dict[type, type] = {}


def _tapped_class(cls: type) -> type:
    if cls not in _SUBCLASSES:

        def __iter__(self):
            tap: LoaderTap = self.__dict__["_hydra_tap"]
            before = len(tap._queues)
            inner = cls.__iter__(self)
            queue = tap._queues[-1] if len(tap._queues) > before else collections.deque()
            tap._queues.clear()
            return tap._new_iterator(inner, queue)

        _SUBCLASSES[cls] = type(cls.__name__, (cls,), {"__iter__": __iter__, "__module__": cls.__module__})
    return _SUBCLASSES[cls]


class LoaderTap:
    """Attach to a DataLoader to learn the dataset indices of every batch the loop gets.

    ``current`` is the last batch received (``None`` before the first);
    ``on_epoch_end`` is called when an iteration over the loader ends (exhausted,
    or abandoned because a new one started).
    """

    def __init__(self, loader: DataLoader, on_epoch_end: Callable[[], None] | None = None):
        validate_loader(loader)
        self.loader = loader
        self.n_samples = len(loader.dataset)
        self.on_epoch_end = on_epoch_end
        self.current: CurrentBatch | None = None
        self.failure: Exception | None = None  # raised by the tracker at the next step, never into the loop
        self.generation = 0
        self.epochs_started = 0
        self._queues: list = []
        self._active: _TappedIterator | None = None
        self._attached = False

    def attach(self) -> None:
        loader = self.loader
        self._orig_class = loader.__class__
        self._orig_batch_sampler = loader.batch_sampler
        object.__setattr__(loader, "batch_sampler", _RecordingBatchSampler(loader.batch_sampler, self))
        loader.__dict__["_hydra_tap"] = self
        loader.__class__ = _tapped_class(self._orig_class)
        persistent = getattr(loader, "_iterator", None)
        if persistent is not None and hasattr(persistent, "_index_sampler"):
            persistent._index_sampler = loader.batch_sampler
        self._attached = True

    def detach(self) -> None:
        if not self._attached:
            return
        loader = self.loader
        loader.__class__ = self._orig_class
        object.__setattr__(loader, "batch_sampler", self._orig_batch_sampler)
        loader.__dict__.pop("_hydra_tap", None)
        persistent = getattr(loader, "_iterator", None)
        if persistent is not None and hasattr(persistent, "_index_sampler"):
            persistent._index_sampler = self._orig_batch_sampler
        self._attached = False

    # -- called by the iterators ---------------------------------------------------------
    def _new_iterator(self, inner, queue) -> _TappedIterator:
        if self._active is not None:
            self._end_epoch()
        it = _TappedIterator(inner, queue, self)
        self._active = it
        self.epochs_started += 1
        return it

    def _on_batch(self, raw_indices, batch) -> None:
        try:
            indices = torch.as_tensor(raw_indices if torch.is_tensor(raw_indices) else list(raw_indices))
            if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
                raise TrackingConfigError(
                    "The DataLoader's sampler yields non-integer indices; hydra_nb needs integer dataset indices.")
            indices = indices.to(torch.int64).reshape(-1)
            if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.n_samples):
                raise TrackingConfigError(
                    f"The sampler yielded an index outside the dataset (size {self.n_samples}).")
        except Exception as exc:
            self.failure = exc if isinstance(exc, TrackingConfigError) else TrackingConfigError(
                f"hydra_nb could not read the sampler's indices: {exc!r}")
            self.current = None
            return
        self.generation += 1
        self.current = CurrentBatch(self.generation, indices, batch)

    def _on_exhausted(self, it: _TappedIterator) -> None:
        if self._active is it:
            self._end_epoch()

    def _end_epoch(self) -> None:
        self._active = None
        if self.on_epoch_end is not None:
            self.on_epoch_end()


def validate_loader(loader) -> None:
    """Raise a clear error if hydra_nb cannot know the dataset index of each sample."""
    if not isinstance(loader, DataLoader):
        raise TrackingConfigError(
            f"hydra_nb.track needs a torch.utils.data.DataLoader, got {type(loader).__name__}. "
            "Wrap your data in a map-style Dataset and a DataLoader, and iterate that loader in your loop."
        )
    if isinstance(loader.dataset, IterableDataset):
        raise TrackingConfigError(
            "The DataLoader's dataset is an IterableDataset, which has no sample indices, so hydra_nb "
            "cannot tell which training sample is which. Use a map-style Dataset (one with __getitem__ "
            "and __len__, e.g. TensorDataset)."
        )
    if loader.batch_sampler is None:
        raise TrackingConfigError(
            "The DataLoader was built with batch_size=None (no batching). hydra_nb needs batches: "
            "give the DataLoader a batch_size or a batch_sampler."
        )
    if getattr(loader, "in_order", True) is False:
        raise TrackingConfigError(
            "The DataLoader has in_order=False, so batches may arrive out of sampling order and "
            "hydra_nb cannot match them to dataset indices. Build it with in_order=True (the default)."
        )
    try:
        len(loader.dataset)
    except TypeError:
        raise TrackingConfigError("The DataLoader's dataset has no len(); hydra_nb needs the dataset size.") from None

