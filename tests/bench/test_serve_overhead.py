"""``bench serve-overhead``'s local Ray: the environment its processes start with."""

from __future__ import annotations

import os

import pytest

from bench import serve_overhead


def test_ray_s_environment_is_set_for_its_start_and_restored_after(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPLITSERVE_TEST_KEPT", "before")
    monkeypatch.delenv("SPLITSERVE_TEST_NEW", raising=False)
    with (pytest.raises(RuntimeError),
          serve_overhead._environ({"SPLITSERVE_TEST_KEPT": "during",
                                   "SPLITSERVE_TEST_NEW": "during"})):
        assert os.environ["SPLITSERVE_TEST_KEPT"] == os.environ["SPLITSERVE_TEST_NEW"] == "during"
        raise RuntimeError("ray.init failed")  # restored all the same
    assert os.environ["SPLITSERVE_TEST_KEPT"] == "before"
    assert "SPLITSERVE_TEST_NEW" not in os.environ
