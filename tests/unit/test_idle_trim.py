"""The idle trimmer hands free heap back once per quiet spell, and only when there is enough of
it to be worth the next request's page faults."""

from __future__ import annotations

import asyncio

import pytest

from cloud_server.memory import TRIM_MIN_FREE_BYTES, IdleTrimmer, free_heap_bytes, freeze_heap


def _quiet_spells(trimmer: IdleTrimmer, spells: int) -> IdleTrimmer:
    async def run() -> None:
        trimmer.start()
        await asyncio.sleep(0.05)  # the trimmer's task is running: it sees the requests
        try:
            for spell in range(spells):
                trimmer.enter()  # a request, then quiet
                trimmer.exit()
                while trimmer.trims + trimmer.skipped <= spell:
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)  # quiet on: no second trim for the same spell
        finally:
            await trimmer.stop()

    asyncio.run(asyncio.wait_for(run(), 30))
    return trimmer


@pytest.mark.parametrize(("free", "trims", "skipped"), [
    (TRIM_MIN_FREE_BYTES // 2, 0, 2), (TRIM_MIN_FREE_BYTES * 4, 2, 0), (None, 2, 0),
], ids=["little-free", "a-burst-s-worth", "unknown"])
def test_one_trim_per_quiet_spell_when_worth_it(free: int | None, trims: int,
                                                skipped: int) -> None:
    trimmer = _quiet_spells(IdleTrimmer(0.02, free_bytes=lambda: free), spells=2)
    assert (trimmer.trims, trimmer.skipped) == (trims, skipped)


def test_free_heap_is_known_on_glibc() -> None:
    free = free_heap_bytes()
    assert free is None or free >= 0


def test_the_heap_alive_after_loading_is_frozen_out_of_collections() -> None:
    import gc

    kept = [[i] for i in range(1000)]  # alive now, as the loaded models are
    try:
        frozen = freeze_heap()
        assert frozen == gc.get_freeze_count() >= len(kept)
    finally:
        gc.unfreeze()  # this test process builds many apps: keep collecting them


def test_an_app_built_in_a_test_process_freezes_nothing() -> None:
    import gc

    from cloud_server.app import create_app
    from cloud_server.settings import Settings

    app = create_app(Settings(models=("resnet18",)))
    assert app.state.service.freeze_heap is False and gc.get_freeze_count() == 0
