"""bench.profile_agree: two profile --json outputs, monotone and within a tolerance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.profile_agree import disagreement, main, monotone


def _doc(whole: float, heads: list[float]) -> dict[str, object]:
    costs = [{"split": "device", "head_ms": whole}, {"split": "cloud", "head_ms": 0.0}]
    costs += [{"split": f"p{i}", "head_ms": ms} for i, ms in enumerate(heads)]
    return {"costs": costs}


def _write(tmp_path: Path, name: str, doc: dict[str, object]) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return str(path)


def test_monotone_and_disagreement() -> None:
    assert monotone(_doc(10.0, [1.0, 2.0, 2.0, 9.0]))
    assert not monotone(_doc(10.0, [1.0, 3.0, 2.0]))
    assert not monotone(_doc(10.0, [1.0, 11.0]))
    assert disagreement(10.0, 12.0) == pytest.approx(0.2)
    assert disagreement(12.0, 10.0) == pytest.approx(0.2)


def test_main_passes_only_when_both_hold(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                         ) -> None:
    a = _write(tmp_path, "a.json", _doc(10.0, [1.0, 5.0]))
    close = _write(tmp_path, "b.json", _doc(11.0, [1.1, 5.5]))
    far = _write(tmp_path, "c.json", _doc(20.0, [1.1, 5.5]))
    dip = _write(tmp_path, "d.json", _doc(10.0, [5.0, 1.0]))
    assert main([a, close]) == 0
    assert main([a, far]) == 1
    assert main([a, dip, "--tolerance", "10"]) == 1
    assert "DISAGREE" in capsys.readouterr().out
