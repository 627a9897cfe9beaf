"""Interactive views of a tracked run (anywidget): :func:`explore` returns an :class:`Explorer`.

The front end is built from ``js/`` into ``static/explorer.js`` (committed; ``npm run build`` in
``js/`` rebuilds it byte for byte). Static equivalents for reports: :mod:`hydra_nb.plot`.
"""

from .explorer import Explorer, explore

__all__ = ["Explorer", "explore"]
