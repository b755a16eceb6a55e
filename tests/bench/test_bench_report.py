"""Tests for bench.report: markdown and JSON writers, the rich table, the PNG writer."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
from rich.console import Console

from bench.report import markdown_table, new_figure, print_table, save_png, write_json


def test_markdown_table_layout() -> None:
    text = markdown_table(
        ["split", "bytes"], [["_blocks.5", "13,720"], ["cloud", 18352]], align="lr"
    )
    assert text == (
        "| split | bytes |\n| :--- | ---: |\n| _blocks.5 | 13,720 |\n| cloud | 18352 |\n"
    )


def test_markdown_table_defaults_left_and_allows_no_rows() -> None:
    assert markdown_table(["a", "b"], []) == "| a | b |\n| :--- | :--- |\n"


def test_markdown_table_escapes_pipes_and_newlines() -> None:
    text = markdown_table(["x"], [["a|b\nc"]])
    assert text.splitlines()[2] == "| a\\|b c |"


@pytest.mark.parametrize(
    ("headers", "rows", "align"),
    [
        (["a", "b"], [["1"]], None),
        (["a", "b"], [["1", "2", "3"]], None),
        (["a", "b"], [], "l"),
        (["a", "b"], [], "lc"),
    ],
    ids=["short-row", "long-row", "align-too-short", "align-bad-letter"],
)
def test_markdown_table_rejects_mismatched_shapes(
    headers: list[str], rows: list[list[str]], align: str | None
) -> None:
    with pytest.raises(ValueError):
        markdown_table(headers, rows, align=align)


def test_write_json_round_trips_and_creates_directories(tmp_path: Path) -> None:
    obj = {"model": "efficientnet_lite0", "points": [{"split": "_blocks.5", "ratio": 0.25}]}
    path = write_json(tmp_path / "a" / "b" / "fidelity.json", obj)
    text = path.read_text(encoding="utf-8")
    assert json.loads(text) == obj
    assert text.endswith("\n")
    assert [p.name for p in path.parent.iterdir()] == ["fidelity.json"]  # no temporary left


def test_write_json_refuses_nan_and_keeps_the_old_file(tmp_path: Path) -> None:
    path = write_json(tmp_path / "r.json", {"ok": 1})
    with pytest.raises(ValueError):
        write_json(path, {"ratio": math.nan})
    assert json.loads(path.read_text(encoding="utf-8")) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_print_table_shows_every_cell() -> None:
    buf = io.StringIO()
    print_table(
        "fidelity",
        ["split", "ratio"],
        [["_relu1", "3.71%"]],
        align="lr",
        console=Console(file=buf, width=100),
    )
    out = buf.getvalue()
    assert "fidelity" in out and "_relu1" in out and "3.71%" in out


def test_save_png_writes_a_png(tmp_path: Path) -> None:
    fig, (top, bottom) = new_figure(2, sharex=True)
    top.plot([0, 1], [1, 10])
    top.set_yscale("log")
    bottom.plot([0, 1], [1.0, 0.5], label="top-1 agreement, mean |Δlogit|")
    bottom.legend()
    path = save_png(fig, tmp_path / "out" / "chart.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
