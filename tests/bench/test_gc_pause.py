"""``python -m bench gc-pause``: the service's app in this process, its collections timed
before and after the freeze; no network."""

from __future__ import annotations

import gc
import json
from pathlib import Path

from bench.__main__ import main


def test_gc_pause_times_collections_before_and_after_the_freeze(tmp_path: Path) -> None:
    assert main(["gc-pause", "--repeats", "1", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "gc_pause.json").read_text())
    loaded, frozen = doc["results"]
    assert (loaded["heap"], frozen["heap"]) == ("as loaded", "frozen once loaded")
    # the models' objects leave the collector's walks; what they were is frozen
    assert frozen["objects"] < loaded["objects"] / 10 and frozen["frozen"] > 10_000
    assert gc.get_freeze_count() == 0  # the test process is left collecting as before
    assert (tmp_path / "gc_pause.md").read_text().count("|") > 8
    assert (tmp_path / "gc_pause.png").stat().st_size > 0
