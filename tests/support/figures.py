"""Figures that a test measured, for ``python -m bench reliability`` to tabulate.

A test calls ``record("hostile", "idle flood", ready_ms=412.0, passed=True)``. When the
environment names a file in ``SPLITSERVE_FIGURES_OUT``, each call appends one JSON line to it;
otherwise the call does nothing, so plain ``pytest`` runs are unaffected. The benchmark sets the
variable, runs the suite in a subprocess and reads the lines back: tests and benchmarks share a
file format, not code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

ENV_VAR = "SPLITSERVE_FIGURES_OUT"


def record(section: str, row: str, **values: float | int | str | bool | None) -> None:
    """Append one measured row, ``{"section", "row", **values}``, to ``$SPLITSERVE_FIGURES_OUT``."""
    target = os.environ.get(ENV_VAR)
    if not target:
        return
    line = json.dumps({"section": section, "row": row, **values}, sort_keys=True)
    with Path(target).open("a", encoding="utf-8") as out:
        out.write(line + "\n")
