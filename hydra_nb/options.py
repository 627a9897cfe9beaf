"""The options of ``hydra_nb.track``: one frozen dataclass, ``TrackOptions``.

Each option is one field with its default and, in ``field(metadata=...)``:

- ``help``: what it does (the magic's ``--help`` shows it);
- ``flag``: its ``%%hydra_track`` flag, if it has one, with ``choices`` (a fixed set of values),
  ``parse`` (text → value: raises ``ValueError`` saying what the flag takes), ``metavar`` and
  ``action="store_true"`` for switches; the magic builds its argparse flags from these;
- ``resume``: for options a continued run must share with the stored one, the problem to report
  when they differ (``{stored}``, ``{current}``: the two values in the store's ``config``).

``__post_init__`` checks every value (``OptionError``, a ``TrackingConfigError`` that can name the
options as the magic's flags), ``config()`` gives the JSON the store keeps as
``attrs["hydra_nb"]["config"]``, and ``check_resume`` decides whether a stored run can be continued.
To add an option: a field here (with its check), a keyword of ``track``/``Tracker`` passing it on,
and its use in the tracker (docs/architecture.md, "An option of track").
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Callable

import numpy as np
import torch

from .errors import TrackingConfigError
from .hypergrad import HVP_METHODS

MODES = ("fast", "exact", "replay")
STORE_DTYPES = ("float16", "float32", "float64")
BATCHNORM_CHOICES = ("exact", "fixed")


def python_name(option: str) -> str:
    """How messages name an option for ``hydra_nb.track`` callers: its keyword (``resume=True`` for switches)."""
    return f"{option}=True" if option in _SWITCHES else option


class OptionError(TrackingConfigError):
    """An option of ``track`` has a value ``TrackOptions`` refuses.

    ``build(name)`` writes the message naming each option by ``name(option)``: ``str(error)`` names
    them as keywords (``python_name``); ``spelled(name)`` as the caller wants (the magic: its flags).
    """

    def __init__(self, build: Callable[[Callable[[str], str]], str]):
        self._build = build
        super().__init__(build(python_name))

    def spelled(self, name: Callable[[str], str]) -> str:
        return self._build(name)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


# -- the magic's text → value (value checks are __post_init__'s) ----------------------------------
def _parse_dim(text: str):
    if text.lower() in ("none", "full"):
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"takes a positive int, or 'none'/'full' for the full parameter dimension; got {text!r}") \
            from None


def _parse_checkpoint_every(text: str):
    if text == "epoch":
        return "epoch"
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"takes 'epoch' or a positive number of optimizer steps; got {text!r}") from None


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"takes an int; got {text!r}") from None


@dataclass(frozen=True)
class TrackOptions:
    """Every option of ``hydra_nb.track`` (the model, loader, store and optimizer aside), checked on creation."""

    mode: str = field(default="fast", metadata={
        "flag": "--mode", "choices": MODES,
        "help": "fast: all samples' projected rows (instant, approximate views); exact: also Hessian-vector products "
                "for exact_indices; replay: only what replaying the run needs (exact answers for every sample by "
                "replay, no rows: the cheapest recording). Every mode records what replay needs."})
    projection_dim: int | None = field(default=1024, metadata={
        "flag": "--dim", "parse": _parse_dim, "metavar": "K",
        "help": "Projection dimension; 'none' or 'full' for the full parameter dimension.",
        "resume": "it used projection_dim={stored}, this is {current}"})
    exact_indices: tuple[int, ...] | None = field(default=None, metadata={
        "help": "Exact mode: the dataset indices to track (None: all of them)."})
    loss_fn: Callable | None = field(default=None, metadata={
        "help": "(outputs, targets) -> per-sample losses, for test losses and exact mode's HVPs; "
                "default cross-entropy."})
    checkpoint_every: str | int = field(default="epoch", metadata={
        "flag": "--checkpoint-every", "parse": _parse_checkpoint_every, "metavar": "N",
        "help": "'epoch' or a number of optimizer steps between checkpoints."})
    seed: int = field(default=0, metadata={"flag": "--seed", "parse": _parse_int, "help": "Projection seed."})
    store_dtype: str | None = field(default=None, metadata={
        "flag": "--store-dtype", "choices": STORE_DTYPES,
        "help": "dtype of the stored per-sample rows (default: float32, float64 for float64 models).",
        "resume": "it stores {stored} rows, this would store {current}"})
    overwrite: bool = field(default=False, metadata={
        "flag": "--overwrite", "action": "store_true", "help": "Replace the run already in the store."})
    strict: bool = field(default=False, metadata={
        "flag": "--strict", "action": "store_true", "help": "Raise instead of warning if tracking fails mid-training."})
    hvp_batch: int = field(default=32, metadata={
        "flag": "--hvp-batch", "parse": _parse_int, "metavar": "N",
        "help": "Exact mode: hypergradients per vmapped Hessian-vector product."})
    hvp_method: str = field(default="auto", metadata={
        "flag": "--hvp-method", "choices": HVP_METHODS,
        "help": "Exact mode: vmap (forward-over-reverse), loop (one double-backward per vector) or auto "
                "(both timed once, the faster kept). Same numbers either way."})
    on_step: Callable | None = field(default=None, metadata={
        "help": "Called with the Tracker after every tracked optimizer step (progress displays)."})
    resume: bool = field(default=False, metadata={
        "flag": "--resume", "action": "store_true", "help": "Continue the run already in the store."})
    batch_fn: Callable | None = field(default=None, metadata={
        "help": "Exact mode, for batches that are neither (inputs, targets, ...) nor dicts with labels/targets: "
                "batch -> (inputs, targets)."})
    batchnorm: str = field(default="exact", metadata={
        "flag": "--batchnorm", "choices": BATCHNORM_CHOICES,
        "help": "BatchNorm in training mode: batch-coupled per-sample gradients (exact, the default), or with the "
                "batch statistics held fixed (cheaper at large batches, approximate). See docs/batchnorm.md.",
        "resume": "it used batchnorm={stored!r}, this is {current!r}"})
    origin: dict | None = field(default=None, metadata={
        "help": "Where the run comes from, kept in the store as its 'origin': %%hydra_track passes its cell "
                "({'notebook', 'cell_id', 'source_sha256'}); the same cell run again replaces its own run "
                "without overwrite=True (hydra_nb.store.same_cell)."})

    def __post_init__(self):
        if self.mode not in MODES:
            raise OptionError(lambda n: f"{n('mode')} must be 'fast', 'exact' or 'replay', got {self.mode!r}.")
        dim = self.projection_dim
        if dim is not None and (not _is_int(dim) or dim < 1):
            raise OptionError(lambda n: f"{n('projection_dim')} must be positive: an int ≥ 1, or None for the full "
                                        f"parameter dimension; got {dim!r}.")
        every = self.checkpoint_every
        if every != "epoch" and (not _is_int(every) or every < 1):
            raise OptionError(lambda n: f"{n('checkpoint_every')} must be 'epoch' or a positive number of optimizer "
                                        f"steps, got {every!r}.")
        if self.loss_fn is not None and not callable(self.loss_fn):
            kind = type(self.loss_fn).__name__
            raise OptionError(lambda n: f"{n('loss_fn')} must be a callable (outputs, targets) -> per-sample losses; "
                                        f"got {kind}, which is not a callable.")
        if not _is_int(self.seed):
            raise OptionError(lambda n: f"{n('seed')} must be an int (the projection's seed), got {self.seed!r}.")
        if self.store_dtype is not None and self.store_dtype not in STORE_DTYPES:
            raise OptionError(lambda n: f"{n('store_dtype')} must be one of {sorted(STORE_DTYPES)}, "
                                        f"got {self.store_dtype!r}.")
        if not _is_int(self.hvp_batch) or self.hvp_batch < 1:
            raise OptionError(lambda n: f"{n('hvp_batch')} must be a positive int, got {self.hvp_batch!r}.")
        if self.hvp_method not in HVP_METHODS:
            raise OptionError(lambda n: f"{n('hvp_method')} must be one of {HVP_METHODS}, got {self.hvp_method!r}.")
        if self.on_step is not None and not callable(self.on_step):
            raise OptionError(lambda n: f"{n('on_step')} must be a callable taking the Tracker.")
        if self.origin is not None and not isinstance(self.origin, dict):
            raise OptionError(lambda n: f"{n('origin')} must be a dict (notebook, cell_id, source_sha256) or None.")
        if self.batch_fn is not None and not callable(self.batch_fn):
            raise OptionError(lambda n: f"{n('batch_fn')} must be a callable: loader batch -> (inputs, targets).")
        for switch in _SWITCHES:
            object.__setattr__(self, switch, bool(getattr(self, switch)))
        if self.resume and self.overwrite:
            raise OptionError(lambda n: f"{n('resume')} and {n('overwrite')} exclude each other: pick one.")
        if self.batchnorm not in BATCHNORM_CHOICES:
            raise OptionError(lambda n: (
                f"{n('batchnorm')} must be 'fixed' (per-sample gradients with the batch statistics held constant) or "
                "'exact' (batch-coupled per-sample gradients, about B backward passes per step; the default), "
                f"got {self.batchnorm!r}."))
        self._check_exact_indices()

    def _check_exact_indices(self) -> None:
        # the engine's wording on purpose (the magic shows it as is): the option only exists with mode='exact'
        if self.exact_indices is None:
            return
        if self.mode != "exact":
            raise TrackingConfigError("exact_indices applies to mode='exact' only; fast mode tracks every sample.")
        indices = np.asarray(self.exact_indices).reshape(-1)
        if indices.size == 0 or not np.issubdtype(indices.dtype, np.integer):
            raise TrackingConfigError("exact_indices must be a non-empty list of integer dataset indices.")
        if len(np.unique(indices)) != len(indices):
            raise TrackingConfigError("exact_indices contains duplicates.")
        object.__setattr__(self, "exact_indices", tuple(int(i) for i in indices))

    # -- what the tracker derives from them -------------------------------------------------------
    def tracked_indices(self, n_train: int) -> np.ndarray:
        """Exact mode's tracked dataset indices (all ``n_train`` of them by default), checked against the dataset."""
        if self.exact_indices is None:
            return np.arange(n_train, dtype=np.int64)
        tracked = np.asarray(self.exact_indices, dtype=np.int64)
        if tracked.min() < 0 or tracked.max() >= n_train:
            raise TrackingConfigError(f"exact_indices must lie in [0, {n_train}) (the dataset size).")
        return tracked

    def config(self, *, store_dtype: str, batchnorm: str | None, batch_size, device: str) -> dict:
        """The store's ``config`` (JSON): the options that describe the run, with what the tracker resolved.

        ``store_dtype``: the row dtype actually stored (the option's, or the model's default); ``batchnorm``:
        the BatchNorm route that applies (None without BatchNorm in training mode); ``batch_size`` (the
        loader's) and ``device`` (the parameters').
        """
        custom = self.loss_fn is not None
        return {
            "projection_dim": self.projection_dim, "seed": int(self.seed), "checkpoint_every": self.checkpoint_every
            if self.checkpoint_every == "epoch" else int(self.checkpoint_every), "store_dtype": store_dtype,
            "loss_fn": getattr(self.loss_fn, "__name__", "custom") if custom else "cross_entropy",
            "custom_loss": custom, "batch_size": batch_size, "torch_version": torch.__version__, "device": device,
            "batchnorm": batchnorm,
        }

    def check_resume(self, where: str, stored: dict, current: dict, stored_tracked=None, tracked=None) -> None:
        """Raise unless the run whose metadata (``attrs["hydra_nb"]``) is ``stored`` can be continued by this one.

        ``current``: the metadata this run would write (``optimizer``, ``mode``, ``n_train``, ``params``,
        ``config``); exact mode also compares the tracked indices. The optimizer, mode, dataset size,
        parameter layout and every option with a ``resume`` message must be the same.
        """
        problems = []
        if stored.get("optimizer", "SGD") != current["optimizer"]:  # stores without the key are SGD's
            problems.append(f"it was tracked with {stored.get('optimizer', 'SGD')}, this is {current['optimizer']}")
        if stored["mode"] != current["mode"]:
            problems.append(f"it was tracked in {stored['mode']} mode, this is {current['mode']} mode")
        if int(stored["n_train"]) != current["n_train"]:
            problems.append(f"its dataset has {stored['n_train']} samples, this loader's has {current['n_train']}")
        if stored["params"] != current["params"]:
            problems.append("its model has other parameters (names, shapes or optimizer groups)")
        for f in fields(self):
            message = f.metadata.get("resume")
            if message is not None and stored["config"].get(f.name) != current["config"][f.name]:
                problems.append(message.format(stored=stored["config"].get(f.name), current=current["config"][f.name]))
        if current["mode"] == "exact" and not np.array_equal(stored_tracked, tracked):
            problems.append("it tracks other exact_indices")
        if problems:
            raise TrackingConfigError(
                f"Cannot resume {where!r}: {'; '.join(problems)}. Resume with the same model, dataset and "
                "options, or start a new run (overwrite=True or another store path).")


_SWITCHES = tuple(f.name for f in fields(TrackOptions) if f.metadata.get("action") == "store_true")
