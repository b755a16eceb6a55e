"""Output helpers shared by the benchmarks: JSON files, markdown tables, rich tables, PNG charts.

    write_json(Path("bench/results/x.json"), {"ratio": 0.25})
    print(markdown_table(["split", "bytes"], [["_blocks.5", "12,345"]], align="lr"))
    # | split | bytes |
    # | :--- | ---: |
    # | _blocks.5 | 12,345 |
    fig, (top, bottom) = new_figure(2, sharex=True)
    save_png(fig, Path("bench/results/x.png"))

Files are written whole or not at all (a temporary file, then a rename), so an interrupted run
never leaves a half-written result next to good ones.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from rich.console import Console
from rich.table import Table

from shared.errors import ConfigError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "make_console",
    "markdown_table",
    "new_figure",
    "print_table",
    "save_png",
    "write_json",
    "write_text",
]

Cell = str | int | float


def _atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A sibling file opened normally (not mkstemp, which makes it 0600): the result gets the
    # umask's permissions, and os.replace within one directory is atomic.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, creating directories; returns ``path``."""
    return _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (plus a newline) to ``path``; returns ``path``.

    NaN and infinity raise ``ValueError``: they are not JSON, and other tools reject them.

        write_json(Path("out/fidelity.json"), {"model": "efficientnet_lite0", "images": 205})
    """
    return write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def markdown_table(
    headers: Sequence[str], rows: Sequence[Sequence[Cell]], *, align: str | None = None
) -> str:
    """A GitHub-flavoured markdown table. ``align`` has one letter per column, ``l`` or ``r``
    (default: all left). Cells are ``str()``-ed; pipes are escaped and newlines become spaces.

        markdown_table(["a", "b"], [[1, "x|y"]])
        # '| a | b |\\n| :--- | :--- |\\n| 1 | x\\\\|y |\\n'
    """
    align = align or "l" * len(headers)
    if len(align) != len(headers) or set(align) - {"l", "r"}:
        raise ValueError(f"align needs one of 'l'/'r' per column, got {align!r}")
    for i, row in enumerate(rows):
        if len(row) != len(headers):
            raise ValueError(f"row {i} has {len(row)} cells, expected {len(headers)}")
    rule = [":---" if a == "l" else "---:" for a in align]
    lines = [_md_row(headers), _md_row(rule), *(_md_row(row) for row in rows)]
    return "\n".join(lines) + "\n"


def _md_row(cells: Sequence[Cell]) -> str:
    text = (str(c).replace("|", "\\|").replace("\r", " ").replace("\n", " ") for c in cells)
    return "| " + " | ".join(text) + " |"


def make_console() -> Console:
    """A rich console for reports: the terminal's width, or 160 columns when output goes to a
    file or a pipe (rich would use 80 there, and wrap every table row into two lines)."""
    out = Console()
    return out if out.is_terminal else Console(width=160)


def print_table(
    title: str,
    headers: Sequence[str],
    rows: Sequence[Sequence[Cell]],
    *,
    align: str | None = None,
    console: Console | None = None,
) -> None:
    """Print the same table as ``markdown_table`` to the terminal, with rich."""
    align = align or "l" * len(headers)
    table = Table(title=title)
    for header, a in zip(headers, align, strict=True):
        table.add_column(header, justify="right" if a == "r" else "left")
    for row in rows:
        table.add_row(*(str(c) for c in row))
    (console or make_console()).print(table)


def new_figure(
    nrows: int = 1, *, sharex: bool = False, size_in: tuple[float, float] = (9.0, 6.0)
) -> tuple[Figure, list[Axes]]:
    """A figure with ``nrows`` stacked axes, rendered with Agg: never a GUI, never pyplot's
    global figure list (so nothing leaks when many charts are made in one process)."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ConfigError("charts need matplotlib: pip install 'splitserve[bench]'") from exc
    # Before any pyplot import, in this or another bench module: headless machines have no
    # display, and the default backend lookup can warn (an error under pytest's settings).
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=size_in, layout="constrained")
    axes = fig.subplots(nrows, 1, sharex=sharex, squeeze=False)[:, 0]
    return fig, list(axes)


def save_png(fig: Figure, path: Path, *, dpi: int = 120) -> Path:
    """Render ``fig`` to a PNG at ``path`` (atomically, creating directories); returns ``path``."""
    return _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
