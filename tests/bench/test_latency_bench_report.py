"""Tests for the latency benchmark's pure halves: the run order and the summing up."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from bench import __main__ as cli
from bench import latency
from bench.latency_report import BAR_CHOSEN, markdown, plot, summarize, table_rows
from bench.latency_run import candidate_orders

CANDIDATES = ["device", "cloud", "_blocks.0", "_dropout", "auto"]


def test_each_photo_gets_its_own_seeded_order() -> None:
    orders = candidate_orders(CANDIDATES, 20, seed="0:lan")
    assert all(sorted(o) == sorted(CANDIDATES) for o in orders)
    assert orders == candidate_orders(CANDIDATES, 20, seed="0:lan")  # reproducible
    assert orders != candidate_orders(CANDIDATES, 20, seed="1:lan")
    # auto does not always follow the same candidate
    before_auto = {o[o.index("auto") - 1] for o in orders if o.index("auto") > 0}
    assert len(before_auto) > 1


def _result(split: str, image: int, total: float, predicted: float | None = None
            ) -> dict[str, Any]:
    parts = {"head": 0.0, "encode": 0.0, "network": 0.0, "server": 0.0, "tail": 0.0}
    return {"image": image, "split": split, "timings_ms": {**parts, "total": total},
            "bytes_sent": 0, "wall_ms": total + 1, "fallback": None,
            "predicted_ms": predicted, "link": None}


def _raw(auto_ms: float) -> dict[str, Any]:
    runs = {
        "device": [_result("device", i, 100.0 + i) for i in range(5)],
        "cloud": [_result("cloud", i, 50.0 + i) for i in range(5)],
        "_blocks.0": [_result("_blocks.0", i, 40.0 + i) for i in range(5)],
        "auto": [_result("cloud", i, auto_ms + i, predicted=45.0) for i in range(5)],
    }
    link = {"name": "lan", "uplink_mbps": 500, "downlink_mbps": 500, "rtt_ms": 1}
    return {"links": {"lan": {"link": link, "runs": runs}},
            "device_profile": {"elapsed_s": 1, "cpu_share": 0.2, "cgroup": "/x", "costs": []},
            "device_cpu_limited": True, "cpu_limit_interface": "cgroup v2 (cpu.max)", "seed": 0}


def test_auto_is_compared_with_the_fixed_run_of_what_it_chose() -> None:
    summary = summarize(_raw(51.0), command="x")
    lan = summary["profiles"]["lan"]
    assert lan["oracle"]["split"] == "_blocks.0"
    assert lan["auto"]["split"] == "cloud"
    assert lan["auto"]["chosen_fixed_p50_ms"] == 52.0
    assert lan["ratios"]["auto_vs_chosen"] == round(53.0 / 52.0, 3)
    assert lan["ratios"]["auto_vs_oracle"] == round(53.0 / 42.0, 3)
    assert lan["auto"]["prediction_error_p50"] == round(53.0 / 45.0 - 1, 3)
    assert "auto_vs_chosen" in lan["ratios_ci90"]
    assert summary["cpu_limit_interface"] == "cgroup v2 (cpu.max)"
    row = table_rows(summary)[0]
    assert "1.02" in row and "45 (+18%)" in row


def test_auto_slower_than_its_own_candidate_misses_the_bar() -> None:
    ok = summarize(_raw(50.0), command="x")["profiles"]["lan"]
    slow = summarize(_raw(50.0 * (BAR_CHOSEN + 0.02)), command="x")["profiles"]["lan"]
    assert ok["ratios"]["auto_vs_chosen"] <= BAR_CHOSEN
    assert slow["ratios"]["auto_vs_chosen"] > BAR_CHOSEN and not slow["meets_bar"]


def test_the_chart_is_drawn(tmp_path: Path) -> None:
    path = plot(summarize(_raw(51.0), command="x"), tmp_path / "latency.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_the_command_and_the_report_name_the_device_runtime() -> None:
    p = argparse.ArgumentParser()
    latency.add_arguments(p)
    default = latency._config(p.parse_args([]))
    assert (default.runtime, default.precision, default.bundle) == ("onnx", "fp32", None)
    assert "--runtime onnx --precision fp32 --out" in latency._command(default)
    torch_run = latency._config(p.parse_args(["--runtime", "torch"]))
    assert "--runtime torch --precision fp32" in latency._command(torch_run)
    raw = {**_raw(51.0), "device_cpu": 0.2, "device_runtime": "onnx", "device_precision": "fp32",
           "device_threads": 1}
    cpu = {"model": "Xeon X", "vnni_flags": ["avx512_vnni"]}
    text = markdown(summarize(raw, command="x", cpu=cpu))
    assert "Device: onnx fp32" in text and "Xeon X, VNNI flags: avx512_vnni" in text


def test_int8_without_a_bundle_is_refused_before_anything_starts(tmp_path: Path) -> None:
    assert cli.main(["latency", "--precision", "int8", "--out", str(tmp_path)]) == 2
    with pytest.raises(SystemExit):
        cli.main(["latency", "--runtime", "tflite"])
