"""Static int8 quantization of exported graphs (ONNX Runtime's ``quantize_static``, QDQ).

Activations are uint8 with ranges calibrated (min/max) on real photos; weights are int8 with one
scale per output channel. Each graph is pre-processed first (ONNX Runtime folds BatchNorm into
the convolution before it), so the int8 weights are the fused ones, as the float graph runs.
The few convolutions whose int8 weights cost the most accuracy stay float32 (``FLOAT32_WEIGHTS``).
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

__all__ = ["FLOAT32_WEIGHTS", "quantize"]

#: Convolutions (by their weight's name) that stay float32, with the Clip (ReLU6) after each.
#: Measured on efficientnet_lite0, whole model, top-1 agreement with float32 on the 5 photos +
#: 200 crops of bench/images.py: all int8 91.2% (187/205; logits 17.8 dB SQNR). Its error is the
#: weights' (16-bit activations: 94.6%), and mostly the first layers': int8 weights in one conv
#: alone, logits SQNR: blocks.0 depthwise 20.5 dB, blocks.0 project 28.9, stem 29.6, blocks.1
#: depthwise 30.0, blocks.1 project 30.6, every other conv >= 34. These five float32: 96.6%
#: (198/205, 23.0 dB), int8 4.3x torch eager at 1 thread (all-int8 5.7x, same run). Tried and
#: worse or no better: Entropy 91.2%, Percentile 99.99 92.7%, 200 more crops (seed 12345) 93.2%,
#: QInt8 symmetric activations 93.2% (and slower), QuantizeBias off 92.7%, per-tensor weights
#: 50.2%, reduce_range 82.9%, the last Gemm float32 93.2%, bias correction of every conv for its
#: int8 weights 95.1% (with these five float32: 95.6%), the first 6 or 8 convs float32 95.1%/95.6%.
#: 97% was reached only by keeping more float32 than 4x allows: these four without the stem
#: 97.6% (200/205, 21.4 dB: at this noise level a few near-tie crops decide) but int8 ~0.9 ms
#: slower than with these five (float32 next to int8 costs Q/DQ at 112x112). Float32 regions
#: cost every int8 head after them too (bench runtime: middle head 3.4x eager, was 4.8x).
FLOAT32_WEIGHTS = (
    "_conv_stem.weight", "_blocks.0._depthwise_conv.weight", "_blocks.0._project_conv.weight",
    "_blocks.1._depthwise_conv.weight", "_blocks.1._project_conv.weight",
)


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
                            weight_type=QuantType.QInt8, nodes_to_exclude=_float32_nodes(pre),
                            calibrate_method=CalibrationMethod.MinMax)
    except Exception as exc:  # onnxruntime.quantization raises plain Exceptions
        raise ExportError(f"int8 quantization failed: {exc}") from exc
    quantized = onnx.load(str(out))
    for path in (src, pre, out):
        path.unlink(missing_ok=True)
    return quantized


def _float32_nodes(path: Path) -> list[str]:
    """The Conv nodes of ``FLOAT32_WEIGHTS`` in the model at ``path``, and each one's Clip."""
    graph = onnx.load(str(path), load_external_data=False).graph
    convs = {n.output[0]: n.name for n in graph.node if n.op_type == "Conv" and len(n.input) > 1
             and n.input[1].endswith(FLOAT32_WEIGHTS)}
    # Excluding a Conv but quantizing its Clip loses the clamp (logits fell to 8 dB SQNR).
    clips = [n.name for n in graph.node if n.op_type == "Clip" and n.input[0] in convs]
    return [*convs.values(), *clips]


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
