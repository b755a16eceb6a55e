"""The device path imports no torch: ``pip install splitserve`` has none (issue 10, item 3)."""

from __future__ import annotations

import subprocess
import sys

import pytest

DEVICE_PATH = (
    "shared.codec",
    "shared.wire",
    "shared.preprocess",
    "shared.predictions",
    "shared.planner",
    "shared.schemas",
    "shared.tensorspec",
    "shared.bundle",
    "device_client.client",
    "device_client.pipeline",
    "device_client.cli",
    "device_client.onnx_runtime",
    "device_client.bundles",
    "device_client.auto",
    "device_client.runtimes",
)


@pytest.mark.parametrize("module", DEVICE_PATH)
def test_importing_leaves_torch_out(module: str) -> None:
    # A fresh interpreter: this test process has torch loaded already.
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "False"


def test_all_at_once() -> None:
    code = f"import sys; import {', '.join(DEVICE_PATH)}; print(sorted(m for m in sys.modules " \
           "if m.split('.')[0] in ('torch', 'torchvision', 'onnx', 'onnxscript')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "[]"


def test_the_reference_photo_loads_without_torch() -> None:
    # Profiles (and so --split auto) time the device on it.
    code = ("import sys; from shared.preprocess import reference_photo; reference_photo(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "False"
