"""The reliability benchmark's table, built from figure lines like the ones the suite records."""

from __future__ import annotations

from typing import Any

from bench.reliability import markdown, summarise, table_rows

LINES: list[dict[str, Any]] = [
    {"section": "fuzz", "row": "frames", "cases": 375, "problems": 0, "server_errors": 0,
     "client_deadline_504": 2, "unsendable": 0, "alive_after": True,
     "serving_after": "ready and right", "unexpected_errors_logged": 0, "status_400": 300,
     "status_409": 73, "status_504": 2},
    {"section": "fuzz", "row": "schema", "cases": 250, "problems": 0, "server_errors": 0,
     "client_deadline_504": 0, "unsendable": 1, "alive_after": True,
     "serving_after": "ready and right", "unexpected_errors_logged": 0, "status_404": 250},
    {"section": "fuzz_neighbours", "row": "neighbours", "ok": True, "good": 20, "good_right": 20,
     "bad": 20, "bad_400": 20, "shared": 14},
    {"section": "soak", "row": "soak", "requests": 300, "warmup": 500, "concurrency": 8,
     "errors": 0, "seconds": 1.0, "requests_per_s": 300.0, "rss_start_bytes": 2**28,
     "rss_end_bytes": 2**28, "rss_peak_bytes": 2**28, "rss_growth": 0.0, "alive_after": True},
    {"section": "soak_rss", "row": "0", "seconds": 0.0, "rss_bytes": 2**28},
    {"section": "hostile", "row": "idle flood", "ready_ms": 412.0, "passed": True},
    {"section": "hostile", "row": "slow body", "passed": False, "answered": 0},
]  # fmt: skip


def _doc() -> dict[str, Any]:
    return {
        "seed": 0, "command": "python -m bench reliability --quick", "seconds": 9.0, "cpus": 2,
        "machine": "x86_64", "suite": "python -m pytest tests/reliability",
        "tests": {"passed": 20, "failed": 1, "skipped": 0}, **summarise(LINES),
    }  # fmt: skip


def test_fuzz_runs_add_up() -> None:
    fuzz = summarise(LINES)["fuzz"]
    assert fuzz["cases"] == 625 and fuzz["by_source"] == {"frames": 375, "schema": 250}
    assert fuzz["statuses"] == {"400": 300, "404": 250, "409": 73, "504": 2}
    assert fuzz["client_deadline_504"] == 2 and fuzz["neighbours"]["shared"] == 14


def test_known_sections_first_then_any_other_row_by_row() -> None:
    rows = table_rows(_doc())
    checks = [r[0] for r in rows]
    assert checks[:4] == ["bad inputs tried", "5xx seen", "crashes", "bad input harming others"]
    assert checks[4] == "RSS growth over the soak"
    assert checks[5:7] == ["hostile: idle flood", "hostile: slow body"]
    assert rows[5][1:3] == ["pass", "ready ms 412"] and rows[6][1] == "FAIL"
    assert rows[-1][:3] == ["reliability tests", "FAIL", "20 passed, 1 failed, 0 skipped"]
    assert "hostile: slow body" in markdown(_doc() | {"load_1m_before": None}, rows)
