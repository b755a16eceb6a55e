"""Order statistics for the benchmarks' tables, defined once.

    percentile([1.0, 2.0, 3.0, 4.0], 50)   # 2.5
    percentile([], 50)                     # None: nothing measured, nothing made up
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["percentile"]


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) of ``values``, interpolating linearly between ranks
    (``numpy.percentile``'s default); ``None`` for no values, so an empty run shows as a gap
    rather than a made-up figure. Raises ``ValueError`` for ``q`` outside 0..100."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in 0..100, got {q}")
    if len(values) == 0:
        return None
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))
