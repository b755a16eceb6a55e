"""bench.runtime's pure parts: quantiles, CPU flags, rows, the chart and the output files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.runtime import open_bundle, table_rows, write_outputs
from bench.runtime_measure import Agreement, CaseTimes, cpu_info, install_sizes, low_quantile_ms
from shared.errors import ExportError

CPUINFO = """processor\t: 0
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx_vnni
"""


def _cases() -> list[CaseTimes]:
    return [
        CaseTimes("whole", None, None, {"torch": 14.4, "ort_fp32": 4.8, "ort_int8": 2.0}),
        CaseTimes("head", "_blocks.0", 0, {"torch": 2.0, "ort_fp32": 0.5, "ort_int8": 0.25}),
        CaseTimes("tail", "_blocks.0", 0, {"torch": 12.0, "ort_fp32": 4.0, "ort_int8": None}),
    ]


@pytest.mark.parametrize(("samples", "q", "want"), [
    ([5.0, 1.0, 3.0, 2.0, 4.0], 0.2, 1.0), ([5.0, 1.0, 3.0, 2.0, 4.0], 0.5, 3.0),
    ([7.0], 0.2, 7.0), ([4.0, 3.0, 2.0, 1.0] * 5, 0.0, 1.0)], ids=["q20", "median", "one", "q0"])
def test_low_quantile(samples: list[float], q: float, want: float) -> None:
    assert low_quantile_ms(samples, q) == want


def test_low_quantile_needs_samples() -> None:
    with pytest.raises(ValueError):
        low_quantile_ms([])


def test_cpu_flags_are_named() -> None:
    info = cpu_info(CPUINFO)
    assert info["model"] == "Intel(R) Xeon(R) Processor"
    assert info["vnni_flags"] == ["avx512_vnni", "avx_vnni"]
    assert cpu_info("")["vnni_flags"] == []


def test_rows_show_speedups_and_missing_graphs() -> None:
    rows = table_rows(_cases())
    assert rows[0] == ["whole model", "14.40", "4.80", "2.00", "3.0x", "7.2x"]
    assert rows[2][3] == "—" and rows[2][5] == "—"


def test_install_sizes_of_a_missing_package_are_none() -> None:
    sizes = install_sizes(("pytest", "no-such-distribution-xyz"))
    assert sizes["no-such-distribution-xyz"] is None
    assert (sizes["pytest"] or 0) > 100_000


def test_outputs_are_written(tmp_path: Path) -> None:
    result = {"model": "efficientnet_lite0", "command": "python -m bench runtime", "rounds": 3,
              "cpu": cpu_info(CPUINFO), "bundle_sizes": {"bundle_bytes": 30_000_000},
              "installed_bytes": {"torch": 754_000_000, "onnx": None}}
    agreement = Agreement(5, {"ort_int8 whole": 5})
    paths = write_outputs(result, _cases(), agreement, tmp_path)
    assert [p.name for p in paths] == ["runtime.json", "runtime.md", "runtime.png"]
    assert json.loads(paths[0].read_text())["rounds"] == 3
    md = paths[1].read_text()
    assert "avx512_vnni" in md and "100.0% (5/5)" in md and "installed torch" in md
    assert paths[2].read_bytes()[:4] == b"\x89PNG"


def test_a_failed_export_is_one_line(tmp_path: Path) -> None:
    # The bundle is exported by a child `device_client export` (an export in the measuring
    # process changes torch eager's speed); its failure surfaces as one ExportError line.
    with pytest.raises(ExportError, match="exporting no_such_model") as err:
        open_bundle(tmp_path / "bundle", "no_such_model", "0" * 16, export=True)
    assert "\n" not in str(err.value)
