"""When each policy of one fleet size runs: interleaved rounds, and each size's window.

The machine that runs ``bench fleet`` is shared, and its speed moves 2-3x from one minute to
the next: policies measured one after another, each in its own minutes, are compared across
those moves. So the policies of one fleet size take turns: ``rounds`` rounds, each policy one
short window per round, in an order that changes from round to round, and each policy's
windows pooled into its row. A slow minute then lands on every policy's windows alike.

    >>> round_orders(4, 2)
    [[0, 1, 3, 2], [1, 2, 0, 3]]
    >>> size_window(1, period_s=1.5, duration_s=10.0, min_photos=40)
    (0.5, 20.0)
    >>> size_rounds(4, policies=6, period_s=1 / 6, duration_s=20.0, shortened=True)
    40
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

__all__ = ["FINE_PAUSE_S", "SPELL_S", "answer_spans", "round_orders", "size_rounds",
           "size_window"]

MAX_STRETCH = 2.0  # a small fleet's window grows to this many times --duration, no further
# The shared machine's slow spells (compute 1.5x for a few seconds) last 3-6 s in bench
# fleet's records: a fleet too small to fill its window at the asked photo rate (a single
# device at the defaults) runs its policies' rounds this short, so a spell lands on every
# policy alike.
SPELL_S = 3.0
# between such short windows: so small a fleet leaves no queue to settle. The pooled time line
# still puts a gap of ``bench.fleet_run.ROUND_GAP_S`` before each window, so a window's first
# request is classed cold (``bench.fleet_sim_served.IDLE_S``), here and in the simulation alike,
# though the service ran the other policies' windows meanwhile.
FINE_PAUSE_S = 0.1


def round_orders(count: int, rounds: int) -> list[list[int]]:
    """The order of ``count`` policies (indices) in each of ``rounds`` rounds: the rows of a
    Williams design (a Latin square balanced for carry-over), cycled if ``rounds`` is larger.
    Over ``count`` rounds (``2 * count`` for an odd count) each policy runs once in every
    position and follows every other policy equally often, so neither a drift over the rounds
    nor what ran just before (a service left busy by a saturating policy) favours one policy.

        >>> round_orders(3, 2)
        [[0, 1, 2], [1, 2, 0]]
    """
    if count < 1 or rounds < 1:
        raise ValueError(f"need count >= 1 and rounds >= 1, got {count}, {rounds}")
    # 0, 1, n-1, 2, n-2, ...: each row adds r (mod n); for an odd n the mirrored rows follow.
    base = [0]
    low, high = 1, count - 1
    while low <= high:
        base.append(low)
        if low != high:
            base.append(high)
        low, high = low + 1, high - 1
    rows = [[(b + r) % count for b in base] for r in range(count)]
    if count % 2:
        rows += [row[::-1] for row in rows]
    return [rows[r % len(rows)] for r in range(rounds)]


def size_window(devices: int, *, period_s: float, duration_s: float, min_photos: int
                ) -> tuple[float, float]:
    """``(period_s, duration_s)`` for a fleet of ``devices``: enough photos for a p95.

    ``duration_s`` (measured seconds per policy) grows until its window holds ``min_photos``
    photos, up to ``MAX_STRETCH`` times; past that the photo period shrinks instead. One device
    at a photo every 1.5 s would need a minute per policy for 40 photos. A shorter period
    also keeps a single device's service warm: at 0.5 s it sleeps long enough before each
    request to run it cold (``bench.fleet_sim_served.IDLE_S``), at 0.17 s it does not.

        >>> size_window(8, period_s=1.5, duration_s=10.0, min_photos=40)
        (1.5, 10.0)
        >>> size_window(2, period_s=1.5, duration_s=10.0, min_photos=40)
        (1.0, 20.0)
    """
    if devices < 1 or period_s <= 0 or duration_s <= 0 or min_photos < 1:
        raise ValueError("need devices >= 1, period_s > 0, duration_s > 0, min_photos >= 1")
    needed_s = min_photos * period_s / devices
    duration_s = min(max(duration_s, needed_s), MAX_STRETCH * duration_s)
    return min(period_s, devices * duration_s / min_photos), duration_s


def size_rounds(rounds: int, *, policies: int, period_s: float, duration_s: float,
                shortened: bool) -> int:
    """The rounds for one fleet size: ``rounds``, or for a fleet whose photo period
    ``size_window`` shortened, enough that one round of every policy's window lasts about
    ``SPELL_S`` at most, each window a whole number of photo periods when ``duration_s`` holds
    a whole number of windows (as at the defaults), and never less than one period. A single
    device's p95 over 120 photos is its 6th slowest, so one slow spell inside one policy's 5 s
    window decided it: two policies that sent every photo alike (auto all to ``cloud``, and
    ``cloud``) came out 13% apart at p95 in one run.

        >>> size_rounds(4, policies=6, period_s=1.0, duration_s=10.0, shortened=False)
        4
        >>> size_rounds(4, policies=4, period_s=1 / 6, duration_s=20.0, shortened=True)
        30
    """
    if not shortened:
        return rounds
    photos = max(1, math.floor(SPELL_S / policies / period_s))  # whole photos per window
    return max(rounds, math.ceil(duration_s / (photos * period_s) - 1e-9))


def answer_spans(records: Iterable[Any], windows: Iterable[tuple[float, float]]
                 ) -> list[tuple[float, float]]:
    """Each window, to the service's last answer to a photo taken in it, inclusive: the
    answers a window's photos got (``records``: anything with ``photo_s``, ``done_s`` and
    ``served``). A window holds the photos taken in it; the answers to its last ones arrive
    after it ends, and a saturated window's backlog drains after it ends, with nothing new
    arriving. The service's throughput is counted over these spans, and the simulation's
    service times are taken from them (``bench.fleet_sim_served``): to the window's end, a
    single device's 0.5 s windows lost a third of their answers, and 128 devices' `cloud`
    kept only the batches that ran while requests kept arriving (16 rows in 205 ms, against
    171 ms over the whole span), so its drain simulated slow."""
    records = list(records)
    out = []
    for start, end in windows:
        last = max((r.done_s for r in records if r.served and start <= r.photo_s < end),
                   default=end)
        out.append((start, max(end, last)))
    return out
