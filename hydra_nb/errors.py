"""Exceptions raised by hydra_nb.

Every message says what went wrong and what to do about it.
"""

from __future__ import annotations


class HydraError(Exception):
    """Base class of every error hydra_nb raises on purpose."""


class TrackingConfigError(HydraError, ValueError):
    """The model, loader, optimizer or options cannot be tracked as given.

    Raised before training starts (at ``track(...)`` entry, or at the first
    ``optimizer.step()`` before any parameter has changed).
    """


class StoreOccupied(TrackingConfigError):
    """The store path holds another run, and the options say neither to replace it (``overwrite``) nor to continue
    it (``resume``); the message says which run and how to choose."""


class TrackingFailure(HydraError, RuntimeError):
    """Tracking could not continue in the middle of training.

    By default this is turned into a warning and training goes on; with
    ``strict=True`` it is raised.
    """


class StoreError(HydraError, OSError):
    """A store is missing, not a hydra_nb store, of a newer schema, or damaged."""


class UnsupportedQuery(HydraError, ValueError):
    """A query asked a hypergradient source for an operation it does not have; the message names the modes that do."""


class ReplayError(HydraError, RuntimeError):
    """Replaying a tracked run did not reproduce it (or it cannot be replayed): no exact answer is returned.

    The message names the checkpoint where the replay drifted, by how much, and the likely causes.
    """
