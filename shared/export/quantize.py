"""Static int8 quantization of exported graphs (ONNX Runtime's ``quantize_static``, QDQ).

Activations are uint8 with ranges calibrated (min/max) on real photos; weights are int8 with one
scale per output channel. Each graph is pre-processed first (ONNX Runtime folds BatchNorm into
the convolution before it), so the int8 weights are the fused ones, as the float graph runs.
No torch.

    inputs = calibration_inputs(images, preprocessing)     # float32 arrays, (1, 3, H, W)
    int8 = quantize(head, inputs, workdir=tmp)
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from shared.errors import ExportError

__all__ = ["quantize"]


def quantize(model: onnx.ModelProto, inputs: Sequence[np.ndarray], *, input_name: str,
             workdir: Path) -> onnx.ModelProto:
    """An int8 QDQ copy of ``model`` (self-contained, initializers inline), calibrated on
    ``inputs``. ``workdir`` is an empty scratch directory (the quantizer works on files)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class _Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._it = iter(inputs)

        def get_next(self) -> dict[str, Any] | None:
            x = next(self._it, None)
            return None if x is None else {input_name: x}

    if not inputs:
        raise ExportError("int8 calibration needs at least one image")
    src, pre, out = workdir / "fp32.onnx", workdir / "pre.onnx", workdir / "int8.onnx"
    onnx.save(model, src)
    try:
        with _quiet():
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            quantize_static(str(pre), str(out), _Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
    except Exception as exc:  # onnxruntime.quantization raises plain Exceptions
        raise ExportError(f"int8 quantization failed: {exc}") from exc
    quantized = onnx.load(str(out))
    for path in (src, pre, out):
        path.unlink(missing_ok=True)
    return quantized


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # quantize_static logs advice ("consider pre-processing", "axis out of range" for BatchNorm
    # vectors it leaves per-tensor) on the root logger at WARNING for every graph.
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)
