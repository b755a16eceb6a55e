"""Rules that make a device profile trustworthy: pure functions of measured figures.

``monotone_heads`` repairs what noise does to a profile (a head cheaper than a head it
contains, a head dearer than the whole model); ``contradicted`` says when live runs disagree
with a profiled figure so much that it must be measured again.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from shared.timing import low_quantile

__all__ = ["CONTRADICTION_BOUNDS", "CONTRADICTION_RUNS", "LIVE_FLOOR_MS", "candidate_ms",
           "contradicted", "live_ratio", "monotone_heads", "pin_head"]

# Live cost over predicted cost outside these bounds on this many runs in a row: the profiled
# figure is wrong, not the run. One slow run is a GC pause or a page-in; three are a pattern.
CONTRADICTION_BOUNDS = (0.5, 2.0)
CONTRADICTION_RUNS = 3
# Added to both sides of a live/predicted ratio: a 0.5 ms encode taking 1.2 ms is noise, a 3.7 ms
# head taking 13 ms in every request (a short head profiled under a CPU quota) is not.
LIVE_FLOOR_MS = 1.0


def candidate_ms(runs_ms: Sequence[float], *, quota: float | None, quantile: float) -> float:
    """One candidate's figure from its profiled runs: a low ``quantile`` of them, or under a CPU
    ``quota`` their median.

    A low quantile drops the runs a neighbour's burst of load slowed down. Under a quota that
    slow-down is the device's own: a quota is a duty cycle, and a run that starts with budget
    left in the period goes at full speed while one that starts without waits for the next. A
    request's head starts after the photo's resize has spent the budget, so the low quantile
    keeps exactly the runs that requests never see: at 0.2 of a core, 10 ms periods, `_blocks.1`
    of EfficientNet-Lite0 ran in 2 ms or in 10-20 ms, and two profiles put it at 2.0 and 14.4 ms.
    The median is the common case, which is what a request sees.

        >>> candidate_ms([2.0, 13.0, 14.0, 3.0, 15.0], quota=None, quantile=0.2)
        2.8
        >>> candidate_ms([2.0, 13.0, 14.0, 3.0, 15.0], quota=0.2, quantile=0.2)
        13.0
    """
    if not runs_ms:
        raise ValueError("no runs to take a figure from")
    if quota is None:
        return low_quantile(runs_ms, quantile)
    return float(statistics.median(runs_ms))


def monotone_heads(head_ms: Sequence[float], whole_ms: float) -> list[float]:
    """Head costs in split-point order made monotone and capped at the whole model.

    Split points are listed in execution order and every head is the graph's prefix up to its
    cut, so a later head contains every node of an earlier one, whether one tensor crosses the
    cut or several (a tensor crossing an earlier cut is either consumed before the later cut,
    hence inside that head, or crosses it too). So a head costs at least the running maximum of
    the heads before it, and no head costs more than the whole model, which contains them all.

        >>> monotone_heads([2.0, 5.0, 4.0, 9.0, 30.0], whole_ms=12.0)
        [2.0, 5.0, 5.0, 9.0, 12.0]
    """
    if whole_ms < 0:
        raise ValueError(f"whole_ms must be >= 0, got {whole_ms}")
    out: list[float] = []
    running = 0.0
    for ms in head_ms:
        if ms < 0:
            raise ValueError(f"a head cannot take {ms} ms")
        running = max(running, ms)
        out.append(min(running, whole_ms))
    return out


def pin_head(head_ms: Sequence[float], index: int, value_ms: float, whole_ms: float
             ) -> list[float]:
    """Heads with ``head_ms[index]`` replaced by a figure measured again (trusted over the rest),
    kept monotone around it: heads before it cost no more, heads after it no less, none more
    than the whole model.

        >>> pin_head([2.0, 300.0, 11.0, 12.0], 1, 8.0, whole_ms=14.0)
        [2.0, 8.0, 11.0, 12.0]
        >>> pin_head([2.0, 5.0, 6.0, 7.0], 1, 9.0, whole_ms=14.0)
        [2.0, 9.0, 9.0, 9.0]
    """
    if not 0 <= index < len(head_ms):
        raise ValueError(f"no head {index} among {len(head_ms)}")
    value_ms = min(value_ms, whole_ms)
    return [min(ms, value_ms, whole_ms) if i < index else
            value_ms if i == index else min(max(ms, value_ms), whole_ms)
            for i, ms in enumerate(head_ms)]


def live_ratio(live_ms: float, predicted_ms: float, *, floor_ms: float = LIVE_FLOOR_MS) -> float:
    """Live over predicted device time of one run, both raised by ``floor_ms`` so that a
    candidate costing a fraction of a ms on the device is judged on ms, not on its ratio.

        >>> round(live_ratio(13.0, 3.7), 2)
        2.98
        >>> round(live_ratio(1.2, 0.5), 2)
        1.47
    """
    if live_ms < 0 or predicted_ms < 0 or floor_ms <= 0:
        raise ValueError(f"no ratio for {live_ms} ms over {predicted_ms} ms (floor {floor_ms})")
    return (live_ms + floor_ms) / (predicted_ms + floor_ms)


def contradicted(ratios: Sequence[float], *, runs: int = CONTRADICTION_RUNS,
                 bounds: tuple[float, float] = CONTRADICTION_BOUNDS) -> bool:
    """Whether the last ``runs`` live/predicted ratios of one candidate all fall on the same side
    outside ``bounds``: its profiled figure, not the moment, is wrong.

        >>> contradicted([1.1, 2.5, 3.0, 2.2])
        True
        >>> contradicted([2.5, 0.9, 3.0, 2.2])
        False
        >>> contradicted([0.3, 0.4, 0.2])
        True
    """
    if runs < 1:
        raise ValueError("runs must be >= 1")
    low, high = bounds
    last = ratios[-runs:]
    if len(last) < runs:
        return False
    return all(r > high for r in last) or all(r < low for r in last)
