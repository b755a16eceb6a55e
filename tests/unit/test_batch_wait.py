"""The batcher's ``wait_ms``: a key's own batch rows count while it runs, and fade once it stops."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable

import torch

from cloud_server.batching import ROWS_HALF_LIFE_S, Batcher


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _identity(key: Hashable, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return inputs[0]


def _bursts(batcher: Batcher, clock: _Clock, *steps: tuple[float, int]) -> None:
    """For each (seconds, rows): advance the clock, then send ``rows`` requests at once."""
    async def run() -> None:
        await batcher.start()
        try:
            for seconds, rows in steps:
                clock.now += seconds
                await asyncio.gather(*(batcher.submit("cloud", (torch.zeros(1, 2),),
                                                      timeout_s=5) for _ in range(rows)))
        finally:
            await batcher.stop()

    asyncio.run(run())


def test_a_burst_s_batch_size_fades_once_the_key_stops_running() -> None:
    clock = _Clock()
    batcher = Batcher(_identity, max_batch_size=16, max_queue_delay_ms=50, max_queue=64,
                      clock=clock)
    _bursts(batcher, clock, (0.0, 16))  # one forward pass of 16 rows
    busy = batcher.wait_ms().extra_ms["cloud"]
    assert busy > 0  # a request now would ride a batch of ~16: it waits for 15 other rows
    clock.now += ROWS_HALF_LIFE_S
    assert batcher.wait_ms().extra_ms["cloud"] == busy / 2  # 15 -> 7.5 other rows
    clock.now += 20 * ROWS_HALF_LIFE_S
    assert batcher.wait_ms().extra_ms["cloud"] < busy / 1000  # nobody sends: it runs alone


def test_after_a_pause_a_single_request_does_not_bring_the_burst_back() -> None:
    clock = _Clock()
    batcher = Batcher(_identity, max_batch_size=16, max_queue_delay_ms=50, max_queue=64,
                      clock=clock)
    _bursts(batcher, clock, (0.0, 16), (20 * ROWS_HALF_LIFE_S, 1))  # then one, alone
    assert batcher.wait_ms().extra_ms["cloud"] < 1e-3
