"""hydra_nb: which training samples made my model do this? HYDRA hypergradients, tracked while training.

Public surface: :func:`track` (context manager around an unchanged training loop),
:func:`open_store` and the :class:`Store` it returns (contributions, trajectory,
hypergradients, tracked_indices).
"""

__version__ = "0.1.0"

from .errors import HydraError, StoreError, TrackingConfigError, TrackingFailure  # noqa: E402
from .query import ClassMatrix, Store, TopK, open_store  # noqa: E402
from .tracker import Tracker, TrackingStoppedWarning, track  # noqa: E402



def explore(store, model, test_data, train_data, **kwargs):
    """The interactive explorer of a tracked run (anywidget); see :func:`hydra_nb.widgets.explore`."""
    from .widgets import explore as _explore  # imported on use: anywidget is only needed for the views

    return _explore(store, model, test_data, train_data, **kwargs)


def __getattr__(name):
    """``hydra_nb.plot`` and ``hydra_nb.widgets`` load on first use (they import matplotlib and anywidget)."""
    if name in ("plot", "widgets"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'hydra_nb' has no attribute {name!r}")


def load_ipython_extension(ipython):
    """``%load_ext hydra_nb``: registers ``%%hydra_track`` and ``%hydra_status``."""
    from .magic import load_ipython_extension as _load

    _load(ipython)


__all__ = [
    "track", "open_store", "explore", "Store", "TopK", "ClassMatrix", "Tracker", "HydraError", "StoreError", "TrackingConfigError",
    "TrackingFailure", "TrackingStoppedWarning", "__version__",
]
