"""How large a reliability run is: CI-sized by default, full when the benchmark asks for it.

Plain ``pytest`` runs the CI sizes. ``python -m bench reliability`` runs the same tests in a
subprocess with ``SPLITSERVE_RELIABILITY_FULL=1`` (thousands of fuzz cases, a 10,000-request
soak), and may set the seed and the soak's size, so every figure it prints is reproducible
through the tests::

    SPLITSERVE_RELIABILITY_FULL=1 python -m pytest tests/reliability/test_fuzz.py
"""

from __future__ import annotations

import os

FULL_VAR = "SPLITSERVE_RELIABILITY_FULL"
SEED_VAR = "SPLITSERVE_RELIABILITY_SEED"
SOAK_REQUESTS_VAR = "SPLITSERVE_SOAK_REQUESTS"
SOAK_CONCURRENCY_VAR = "SPLITSERVE_SOAK_CONCURRENCY"


def full() -> bool:
    """Whether the benchmark asked for the full run."""
    return os.environ.get(FULL_VAR, "") == "1"


def pick(ci: int, full_size: int) -> int:
    """``ci`` in a plain test run, ``full_size`` in the benchmark's full run."""
    return full_size if full() else ci


def seed() -> int:
    """The seed of every random mutation (0 unless the benchmark sets another)."""
    return int(os.environ.get(SEED_VAR, "0"))


def soak_requests() -> int:
    """Requests after the soak's warm-up: 2,000 in CI, 10,000 in the full run."""
    return int(os.environ.get(SOAK_REQUESTS_VAR) or pick(2_000, 10_000))


def soak_concurrency() -> int:
    """Connections the soak keeps busy (8)."""
    return int(os.environ.get(SOAK_CONCURRENCY_VAR) or 8)


def flat(values: dict[str, object]) -> dict[str, float | int | str | bool | None]:
    """``values`` with every container turned into a short string, for ``figures.record``:
    ``{"reasons": {"connection": 3}}`` becomes ``{"reasons": "connection 3"}``."""
    out: dict[str, float | int | str | bool | None] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out[key] = ", ".join(f"{k} {v}" for k, v in value.items())
        elif isinstance(value, list | tuple | set):
            out[key] = "; ".join(str(v) for v in value)
        elif value is None or isinstance(value, float | int | str | bool):
            out[key] = value
        else:
            out[key] = str(value)
    return out
