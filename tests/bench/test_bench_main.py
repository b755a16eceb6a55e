"""``python -m bench`` itself: where results go when it runs outside the repository root."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bench import __main__ as cli
from bench import fidelity


def _capture(monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    seen: dict[str, Path] = {}

    def run(args: argparse.Namespace) -> int:
        seen["out"] = args.out
        return 0

    monkeypatch.setattr(fidelity, "run", run)
    return seen


def test_the_default_out_is_the_repository_s_from_anywhere(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen = _capture(monkeypatch)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["fidelity"]) == 0
    assert seen["out"] == cli.REPO / "bench" / "results"
    assert cli.main(["fidelity", "--out", "here"]) == 0
    assert seen["out"] == Path("here")  # a path the user gave stays relative to where they are


def test_the_default_out_stays_relative_at_the_root(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _capture(monkeypatch)
    monkeypatch.chdir(cli.REPO)
    assert cli.main(["fidelity"]) == 0
    assert seen["out"] == Path("bench/results")
