"""The batcher's fill wait ends once nothing else is on its way: a lone request on an idle
service runs at once, and a request caught mid-decode still joins the batch."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable

import pytest
import torch

from cloud_server.batching import Batcher
from cloud_server.service import Service
from cloud_server.settings import Settings
from shared.errors import OverloadedError

HOUR_MS = 3_600_000.0  # a fill delay no test could sit out


def _identity(key: Hashable, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return inputs[0]


def _row() -> tuple[torch.Tensor, ...]:
    return (torch.zeros(1, 2),)


def test_a_lone_request_does_not_wait_for_a_batch_that_cannot_fill() -> None:
    async def run() -> int:
        batcher = Batcher(_identity, max_batch_size=16, max_queue_delay_ms=HOUR_MS,
                          max_queue=8, incoming=lambda: 0)
        await batcher.start()
        try:
            result = await asyncio.wait_for(batcher.submit("k", _row(), timeout_s=60), 30)
            assert batcher.wait_ms().shared_ms == 0.0  # idle, and no fill wait to expect
            return result.batch_size
        finally:
            await batcher.stop()

    assert asyncio.run(run()) == 1


def test_a_request_still_decoding_joins_the_batch() -> None:
    decoding = 1

    async def run() -> list[int]:
        nonlocal decoding
        batcher = Batcher(_identity, max_batch_size=16, max_queue_delay_ms=HOUR_MS,
                          max_queue=8, incoming=lambda: decoding)
        await batcher.start()
        try:
            first = asyncio.create_task(batcher.submit("k", _row(), timeout_s=60))
            for _ in range(20):  # the scheduler is now waiting for the one on its way
                await asyncio.sleep(0)
            assert not first.done() and batcher.depth == 1
            decoding = 0  # ... which arrives
            second = batcher.submit("k", _row(), timeout_s=60)
            results = await asyncio.wait_for(asyncio.gather(first, second), 30)
            return [r.batch_size for r in results]
        finally:
            await batcher.stop()

    assert asyncio.run(run()) == [2, 2]


def test_the_service_counts_a_request_as_incoming_until_its_block_ends() -> None:
    service = Service(Settings(models=("efficientnet_lite0",), max_queue=1))
    with service.incoming():
        assert service.decoding == 1
    with pytest.raises(ValueError), service.incoming():
        raise ValueError("a bad body")  # a request that fails to decode stops counting too
    assert service.decoding == 0


def test_a_refused_request_is_never_counted_as_incoming() -> None:
    service = Service(Settings(models=("efficientnet_lite0",), max_queue=1))
    service.batcher._depth = 1  # the queue is full
    with pytest.raises(OverloadedError), service.incoming():
        pass
    assert service.decoding == 0
