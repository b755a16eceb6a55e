"""The device's intra-op thread count: one unless OMP_NUM_THREADS asks for more, never more
than the board's share of CPU."""

from __future__ import annotations

import pytest

from device_client import runtimes


@pytest.mark.parametrize(("env", "limit", "want"), [
    (None, 4, 1),        # the default: one thread, whatever the board has
    ("3", 4, 3),         # an explicit setting wins ...
    ("8", 2, 2),         # ... up to the board's share of CPU
    ("0", 4, 1),         # nonsense falls back to the default
    ("two", 4, 1),
])
def test_threads_default_to_one_and_respect_the_cpu_share(
        monkeypatch: pytest.MonkeyPatch, env: str | None, limit: int, want: int) -> None:
    if env is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", env)
    monkeypatch.setattr(runtimes, "cpu_limit", lambda: limit)
    assert runtimes.threads() == want
