"""Static int8 quantization of exported graphs (ONNX Runtime's ``quantize_static``, QDQ).

Activations are uint8 with ranges calibrated (min/max) on real photos; weights are int8 with one
scale per output channel. Each graph is pre-processed first (ONNX Runtime folds BatchNorm into
the convolution before it), so the int8 weights are the fused ones, as the float graph runs.
Each conv's int8 weights are then rounded up or down to move its output least
(``shared.export.rounding``) rather than to the nearest step, the stem and blocks.0 stay
float32 (``FLOAT32_WEIGHTS``), the classifier writes float32 logits, and the linear residual
stream stays float32 with int8 multiplies (``shared.export.stream``; ``EXTRA_BITS``). No torch.

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
from shared.export.rounding import input_moments, round_weights
from shared.export.stream import residual_adds, rewrite

__all__ = ["EXTRA_BITS", "FLOAT32_WEIGHTS", "RESIDUAL_WEIGHTS", "Rounded", "quantize"]

#: Convolutions (by their weight's name) that stay float32, with the Clip (ReLU6) after each.
#: Measured on efficientnet_lite0, whole model: top-1 agreement with float32 on the 5 photos +
#: 200 crops of bench/images.py (seed 0) / on 400 other crops (seed 7, against tuning to the
#: first set); logits SQNR; ms at 1 thread, interleaved in one run (ORT float32: 8.44 ms).
#: Calibrated on the shipped photos' views (``writer._views``), never on those crops.
#:   all int8, nearest rounding            91.2% / 91.5%, 17.8 dB
#:   all int8, adaptive rounding           95.6% / 96.5%, 24.0 dB
#:   stem float32, adaptive                95.6% / 95.8%, 24.3 dB, 4.70 ms  (another run of
#:                                         the same: 97.1% / 95.0%; near-ties decide)
#:   stem + blocks.0 float32, adaptive     96.6% / 96.8%, 26.3 dB, 4.45 ms  (this setting)
#:   + the classifier (Gemm) float32       96.6% / 97.0%, 26.9 dB, +0.26 ms (another run)
#:   + blocks.1 depthwise float32          83.4% / 85.0%, 15.4 dB, 4.64 ms  (ORT rewrote it)
#:     the same, WeightBiasQuantization off 93.7% / 97.0%, 26.5 dB, +35% ms (really float32)
#:   stem, blocks.0/1 float32, nearest     96.6% / 95.8%, 23.0 dB  (the old setting: 1.1 ms
#:                                         slower than all int8, another run)
#: Tried with adaptive rounding, no better: stem + blocks.0 float32 with Percentile 99.999
#: 95.1% / 96.0% (26.8 dB); stem float32 with 64 extra calibration crops (seed
#: 4242) 95.6% / 95.5%, or with the patch moments shrunk toward their diagonal 95.6% / 96.8%
#: (22.9 dB); all int8 with Percentile 99.999 96.6% / 95.5%, with the Gemm rounded too, or with
#: per-channel bias correction of every conv in turn 93.7% / 95.3% (25.0 dB: better logits, not
#: better top-1). Measured by editing the int8 graph (stem + blocks.0 + classifier float32,
#: 96.6% / 97.0%, 26.9 dB): any one weight tensor float32 moves it by -4 to +1 images and +0.0 to
#: +0.2 dB; any one activation float32 (no Q/DQ pair) -5 to +4 images, -0.5 to +0.6 dB; all
#: weights float32 28.2 dB, all activations float32 32.0 dB. Keeping blocks.0/1's outputs float32
#: (27.9 dB, 97.1% / 96.8%) cost 40% more time; scaling each activation's range by 0.7-1.1 to
#: maximise SQNR on the calibration views gained 0.4 dB there and 0.1 dB on the crops.
#: Activation ranges by MinMax with CalibMovingAverage (1.6 dB) or Percentile 99.99 (-0.4 dB)
#: clip some tensor far too tightly.
#: Float32 logits (no Q/DQ after the classifier's Gemm, ``_float_logits``) on top of this setting:
#: 96.6% / 96.75%, 26.8 dB, 5.21 vs 5.10 ms (kept; the exported bundle: 95.6% / 96.8%, 26.8 dB,
#: against 96.1% / 96.3%, 26.3 dB without; bench runtime in the README). Tried on it, no better
#: (calibration-view SQNR in brackets, which is where each choice was made; this setting 27.5):
#: sequential rounding against the int8 graph's own inputs (min E||W x - W_q x_q||^2, x_q the
#: input with uint8 activations and earlier layers rounded, layers in graph order; AdaRound's
#: asymmetric objective) 96.1% / 96.75%, 26.9 dB [33.2 dB: it fits the views' own activation
#: noise], 140 s more export; its compensation term halved 95.6% / 96.25%, 27.3 dB; rounded on
#: the views + 64 crops (seed 4242) 95.1% / 96.75%, 27.5 dB, 400 s. Activations left float32
#: (Q/DQ pair removed), ranked by calibration-view SQNR gain alone (each +0.5 dB at most): the
#: top 6 95.1% / 96.75%, 28.0 dB, 8.8 ms; top 12 96.6% / 96.5%, 28.7 dB, 12.8 ms (slower than
#: float32's 10.0 ms: their convs dequantize int8 weights every run). Each residual stream's
#: channel ranges equalized before quantizing (channel c of the tensors an Add chain joins divided
#: by s_c = (range_c / max range)^a, its producers' rows and consumers' columns rescaled to match;
#: ranges differ only 1.4-2.4x max/median): a = 0.5 95.1% / 97.5%, 27.7 dB [28.2]; a = 1 95.6% /
#: 96.75%, 27.6 dB. All 27 linear activations (project outputs, Adds, head) float32 [31.6 dB],
#: all 30 ReLU6 ones [28.0 dB]: the linear ones carry most of the noise. Entropy calibration through
#: quantize_static is MinMax exactly (its 128 histogram bins = 128 quantized bins leave one
#: candidate threshold); Distribution (meant for float8) 0%. Why 97% stays out of reach: the
#: 205 and 400 images hold 21 and 35 with float32 top-2 margins under 0.1 logits; the int8
#: margin error has 0.095 std, and sum(Phi(-margin / std)) predicts 7.5 / 12.7 flips (seen: 7 /
#: 13). 97% on both needs <= 6 / <= 12, which takes about +2 dB to reach on average and +5 dB
#: to reach reliably, near the 32.0 dB of all activations float32.
#: Linear activations float32 without per-run weight dequantization (project convs excluded
#: from quantization, float32 weights in the graph; the residual Adds float32 and reading each
#: other's float output, so only each expand conv's input is quantized; ReLU6 ones stay uint8;
#: calibration-view SQNR in brackets, ms whole model at 1 thread, torch eager in the same run):
#:   project convs of blocks.1-15 float32      97.6% / 98.0%, 28.4 dB [29.05], 7.74-7.92 ms
#:                                             vs torch 29.2-30.9 ms: 3.8-3.9x (this 5.2 ms: 6.3x)
#:   the same minus blocks.15                  97.6% / 98.0%, 28.4 dB [29.03], 4.0-4.1x
#:   their outputs still Q/DQ'd (stream int8)  95.1% / 96.5%, 27.4 dB [28.0]
#:   only the Adds float32 (convs int8)        95.6% / 97.5%, 27.0 dB [27.69], +0.15 ms
#: Per stage of residual blocks, calibration-view dB gained per ms (the subset criterion):
#: blocks.11-14 +0.38 dB / 0.73 ms, 5-7 +0.26 / 0.57, 1-2 +0.34 / 1.17, 8-10 +0.13 / 0.82,
#: 3-4 and 15 +0.01. With the Adds float32: 5-7 + 11-14 95.1% / 97.5%, 27.5 dB [28.20], 5.3-5.4x;
#: + 1-2 96.6% / 97.5%, 28.0 dB [28.62], 4.5-4.6x; + 1-2 + 8-10 95.6% / 98.0%, 28.2 dB [28.89].
#: _conv_head float32 too: no better (all projects 97.1% / 97.5%, 28.5 dB; 5-7 + 11-14 96.6% /
#: 96.75%, 27.4 dB, +0.45 ms). Each project conv int8 but computing K copies of its output, biases
#: offset by 1/K step, their mean float32 (log2 K more bits; the Adds float32): K = 2 97.1% /
#: 97.25%, 27.4 dB [28.14], 7.47 ms vs 5.27 (4.5x vs 6.4x); K = 4 97.1% / 97.5%, 27.7 dB [28.40],
#: 3.6x: the extra Q/DQ, Reshape and ReduceMean on the stream cost what float32 convs do. K = 2
#: clears 97% on both sets by one image only by luck of near-ties: the same graph with its copies'
#: biases float32 (run unfused, same arithmetic) 95.6% / 97.25%, and on the 64 crops of seed 4242
#: it agrees on 61 (this setting 62, projects 1-2 + 5-7 + 11-14 64, all projects 64).
#: An int8 conv with a float32 output (ConvInteger or MatMulInteger, then scale and bias) keeps
#: 28.1 dB but ONNX Runtime runs those 3-9x slower than a QLinearConv (0.67 vs 0.07 ms for a
#: 480 -> 80 1x1 conv at 14x14; float32 Conv 0.22 ms): 22 ms whole.
#: blocks.0 reads the stem's output at 112x112 and its float32 convs cost about what their
#: Q/DQ pairs save; blocks.1's 96-channel 112x112 input would not.
#: The float32 stream at int8 speed (this setting, ``shared.export.stream``). ORT's profiler
#: (SessionOptions.enable_profiling, shared.ortsession's options, 100 runs, whole model) on the
#: float-project setting above: 8.15 ms against 4.49 for the default int8 graph, of it float
#: Conv 2.92 ms (15 project convs 2.3 ms, ~5x their QLinearConvs), ReorderInput/ReorderOutput
#: 0.75 ms (float Conv runs NCHWc), DequantizeLinear 0.48, Transpose 0.38 (32 of them, at every
#: int8/float boundary), QuantizeLinear 0.31. A 1x1 conv as com.microsoft MatMulIntegerToFloat
#: over a channels-last [.., Cin] uint8 view (u8 x s8 GEMM, float scale and bias fused) runs
#: 0.018 ms for 480 -> 80 at 14x14, against QLinearConv 0.039 and float32 Conv 0.111 (the 3-9x
#: slower ConvInteger/MatMulInteger above had the weights as the int8 left operand: MLAS's slow
#: s8 x u8 path); its Transposes cancel against the NHWC QLinearConvs (the optimized graph keeps
#: 2 Transposes). Every project conv so (its adaptively rounded int8 weights plus a second GEMM
#: of their rounding residual at its own int8 scale: weights to 3e-5 of their range), residual
#: Adds float32 reading each other: 5.0 ms profiled, 28.4 dB, 96.1% / 97.75% (one term, 4.2 ms,
#: int8 weights only: 28.1 dB, 95.1% / 97.75%). Its logits differ from the float-weight setting's
#: by 30 dB although every tensor's SQNR against float32 matches to 0.1 dB: a 1e-4 change in
#: blocks.1 flips uint8 roundings downstream, so 200/205 there and 197/205 here are two draws of
#: one noise (as above). The rest of the linear noise is where expand convs read the stream at
#: uint8: ``EXTRA_BITS`` convs also read its rounding residual at 1/8 step (a second uint8 input,
#: weights / 8, one QLinearConv of twice the input channels). All 15 expand convs + _conv_head:
#: 30.9 dB, 98.0% / 97.75%, +1.2 ms (4.2-4.4x); per conv, calibration-view dB: blocks.2 +0.59,
#: 11 +0.31, 1 +0.22, 8 +0.19, 7 +0.19, 6 +0.18, 15 +0.16, 5 +0.15, 9 +0.13, 10 +0.11, 3 +0.11,
#: head +0.09, 14 +0.05, 13 +0.04, 12 +0.00, 4 -0.06; the 7 with most dB per MAC (2, 5-8, 11, 15)
#: 29.6 dB, 98.0% / 98.0%; 2, 7, 8, 11 29.1 dB, 97.6% / 98.5%. Exported (``python -m
#: device_client export --model efficientnet_lite0 --int8``) with every project's residual GEMM
#: and those 7: 29.5 dB, whole 97.6% (200/205) / 99.0% (396/400), split at blocks.9 98.0% /
#: 98.75%; ``bench runtime --bundle`` on it whole 4.8x, middle head 4.4x (another run, the
#: machine busier: 4.0x / 3.6x). ORT's profile of that middle head (3.85 ms): the residual GEMMs
#: and their Adds 0.46 ms for +0.27 dB, the extra bits 0.44 ms (doubled expand QLinearConvs 0.22,
#: Sub/Q/DQ/Concat 0.22). Residual GEMM per project, calibration-view dB: blocks.2 +0.17, 8
#: +0.10, 11 +0.05, 3 +0.04, others -0.08 to +0.03; only 2 and 8 (``RESIDUAL_WEIGHTS``) with
#: the 7 extra-bit convs: 29.3 dB, scratch graph 97.6% / 97.25% at 0.95x the default int8's
#: speed (none: 29.2 dB, 97.1% / 98.0%, same speed). This setting, exported: 29.3 dB, whole
#: 97.1% (199/205) / 98.0% (392/400), split at blocks.9 98.5% (202/205) / 98.0% (392/400);
#: bench runtime, torch eager / ORT fp32 / int8 interleaved at 1 thread: whole 5.3x, middle
#: head 4.9x (``--bundle`` of that export); plain ``python -m bench runtime --out DIR``
#: (exporting in a child process) 5.5x / 4.9x and 5.4x / 4.8x; ``--points middle`` on that
#: export twice, alternating with the previous default's export (95.6% / 96.1%): 5.3x / 5.2x
#: and 4.9x / 5.1x, previous 5.7x / 6.3x and 5.5x / 6.3x (int8 5.1-5.2 ms whole against 4.7,
#: 3.6-3.7 ms middle head against 3.2). Before bench runtime exported in a child process, an
#: in-process export left torch eager ~20% faster (28-30 -> 22 ms) and the plain command read
#: 4.3-4.4x / 3.7-3.8x (and ORT fp32 2.4-2.5x).
FLOAT32_WEIGHTS = (
    "_conv_stem.weight", "_blocks.0._depthwise_conv.weight", "_blocks.0._project_conv.weight",
)

#: Convs (by weight name) that read the float32 residual stream with 4 more bits
#: (``shared.export.stream``): the expand convs with the most calibration-view dB per MAC.
EXTRA_BITS = tuple(f"_blocks.{b}._expand_conv.weight" for b in (2, 5, 6, 7, 8, 11, 15))

#: Project convs (by weight name) whose int8 weights' rounding residual runs as a second GEMM:
#: the two that gained calibration-view dB (+0.17, +0.10; the others -0.08 to +0.05).
RESIDUAL_WEIGHTS = tuple(f"_blocks.{b}._project_conv.weight" for b in (2, 8))


#: Adaptively rounded int8 weights by name, with the scale they were rounded at.
Rounded = dict[str, tuple[np.ndarray, np.ndarray]]


def quantize(model: onnx.ModelProto, inputs: Sequence[np.ndarray], *, input_name: str,
             workdir: Path, rounded: Rounded | None = None) -> onnx.ModelProto:
    """An int8 QDQ copy of ``model`` (self-contained, initializers inline), calibrated on
    ``inputs``, its weights adaptively rounded (``shared.export.rounding``). ``workdir`` is an
    empty scratch directory (the quantizer works on files). Pass one ``rounded`` dict to every
    graph of a bundle: heads share the whole model's weights, so each is rounded once."""
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
            float_model = onnx.load(str(pre))
            adds = residual_adds(float_model.graph)
            quantize_static(str(pre), str(out), _Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8,
                            nodes_to_exclude=[*_float32_nodes(pre), *adds],
                            calibrate_method=CalibrationMethod.MinMax)
    except Exception as exc:  # onnxruntime.quantization raises plain Exceptions
        raise ExportError(f"int8 quantization failed: {exc}") from exc
    quantized = onnx.load(str(out))
    _float_logits(quantized)
    _round(quantized, float_model, inputs, input_name=input_name, workdir=workdir,
           rounded={} if rounded is None else rounded)
    rewrite(quantized, float_model, float_adds=adds, residual_weights=RESIDUAL_WEIGHTS,
            extra_bits=EXTRA_BITS)
    for path in (src, pre, out):
        path.unlink(missing_ok=True)
    return quantized


def _round(quantized: onnx.ModelProto, float_model: onnx.ModelProto,
           inputs: Sequence[np.ndarray], *, input_name: str, workdir: Path,
           rounded: Rounded) -> None:
    """Replace ``quantized``'s nearest-rounded int8 weights with adaptively rounded ones."""
    from onnx import numpy_helper

    q_inits = {i.name: i for i in quantized.graph.initializer}
    weights = {i.name: numpy_helper.to_array(i) for i in float_model.graph.initializer
               if f"{i.name}_quantized" in q_inits and f"{i.name}_scale" in q_inits}
    todo = {name for name, w in weights.items() if name not in rounded or not np.array_equal(
        rounded[name][0], numpy_helper.to_array(q_inits[f"{name}_scale"]))}
    moments = input_moments(float_model, inputs, input_name=input_name, workdir=workdir,
                            weights=todo) if todo else {}
    for name, w in weights.items():
        q_init = q_inits[f"{name}_quantized"]
        scale = numpy_helper.to_array(q_inits[f"{name}_scale"])
        if name in moments:
            q = numpy_helper.to_array(q_init)
            channels = w.shape[0]
            new = round_weights(w.reshape(channels, -1),
                                np.broadcast_to(scale, (channels,)).astype(np.float64),
                                q.reshape(channels, -1), moments[name]).reshape(q.shape)
            rounded[name] = (scale, new)
        if name in rounded:
            q_init.CopyFrom(numpy_helper.from_array(rounded[name][1], q_init.name))


def _float_logits(model: onnx.ModelProto) -> None:
    """Drop the Q/DQ pair on each graph output a Gemm (the classifier) writes: ONNX Runtime
    then runs it as a QGemm with a float32 output, at no measurable cost. uint8 logits add a
    rounding step of 1/255 of their range to every logit where near-tie top-2 margins decide
    (logits SQNR 26.3 -> 26.8 dB)."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    readers = [i for n in graph.node for i in n.input]
    for output in graph.output:
        dq = producer.get(output.name)
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in producer:
            continue
        q = producer[dq.input[0]]
        if q.op_type != "QuantizeLinear" or readers.count(q.output[0]) != 1 \
                or output.name in readers or q.input[0] not in producer:
            continue
        gemm = producer[q.input[0]]
        if gemm.op_type != "Gemm" or readers.count(gemm.output[0]) != 1:
            continue
        gemm.output[0] = output.name
        graph.node.remove(q)
        graph.node.remove(dq)


def _float32_nodes(path: Path) -> list[str]:
    """The Conv nodes of ``FLOAT32_WEIGHTS`` in the model at ``path``, and each one's Clip."""
    graph = onnx.load(str(path), load_external_data=False).graph
    convs = {n.output[0]: n.name for n in graph.node if n.op_type == "Conv" and len(n.input) > 1
             and n.input[1].endswith(FLOAT32_WEIGHTS)}
    # The Clip stays float32 too: a float Conv between a DequantizeLinear and a QuantizeLinear
    # is re-quantized per tensor by ONNX Runtime's WeightBiasQuantization transformer where a
    # session leaves it on (blocks.0's depthwise alone so fell from 19.5 to 7.7 dB logits
    # SQNR); shared.ortsession turns it off, other runtimes may not.
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
