"""``python -m bench install-size``'s measuring half, on a fake site-packages (no venv, no pip)."""

from __future__ import annotations

import os
from pathlib import Path

from bench.install_size import _markdown, du_bytes, install_sizes


def _dist(site: Path, name: str, files: dict[str, bytes]) -> None:
    info = site / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    record = [f"{name}-1.0.dist-info/METADATA,,", f"{name}-1.0.dist-info/RECORD,,"]
    for rel, data in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_bytes(data)
        record.append(f"{rel},,")
    (info / "RECORD").write_text("\n".join(record) + "\n")


def test_sizes_come_from_each_distribution_s_record(tmp_path: Path) -> None:
    site = tmp_path / "site-packages"
    _dist(site, "big", {"big/__init__.py": b"x" * 100_000, "big.libs/lib.so": b"y" * 50_000})
    _dist(site, "small", {"small.py": b"z" * 10})
    sizes = install_sizes(path=site)
    assert set(sizes) == {"big", "small"}
    assert 150_000 < (sizes["big"] or 0) < 151_000  # the .libs directory counts as its own
    assert install_sizes(("small", "absent"), path=site)["absent"] is None
    on_disk = install_sizes(path=site, blocks=True)
    assert (on_disk["big"] or 0) >= 150_000  # whole blocks, as du counts them
    assert du_bytes([site]) >= sum(v or 0 for v in on_disk.values())


def test_a_hard_link_counts_once(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"a" * 40_000)
    os.link(tmp_path / "a", tmp_path / "b")
    assert du_bytes([tmp_path / "a", tmp_path / "b"]) == du_bytes([tmp_path / "a"]) > 0


def test_the_report_separates_ours_from_the_venv_s_own() -> None:
    result = {"python": "python3.12", "python_version": "3.12.1", "command": "c",
              "import_torch_fails": True, "site_packages_mb": 240.0, "ours_mb": 228.0,
              "venv_own": {"pip": 12.0}, "venv_own_mb": 12.0, "pyc_mb": 48.0,
              "top": [{"name": "onnxruntime", "mb": 78.0, "venv_own": False},
                      {"name": "pip", "mb": 12.0, "venv_own": True}],
              "bar_mb": 250, "under_bar": True}
    text = _markdown(result)
    assert "**240 MB**" in text and "met" in text and "pip (venv's own)" in text
    assert "`import torch` fails" in text
