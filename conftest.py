"""pytest's root: the packages' doctests are collected with the tests (``--doctest-modules`` over
``shared``, ``device_client`` and ``cloud_server``; see pyproject.toml)."""

from __future__ import annotations

import pytest

# Examples in modules another branch is rewriting (device_client/auto.py and link.py): they
# cannot run as written (no client, top-level await). Strict: once they run, this list must go.
PENDING_DOCTESTS = {
    "device_client/auto.py::device_client.auto.AutoSplit",
    "device_client/link.py::device_client.link",
    "device_client/link.py::device_client.link.probe",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.nodeid in PENDING_DOCTESTS:
            item.add_marker(
                pytest.mark.xfail(reason="example not yet runnable; make it prose", strict=True)
            )
