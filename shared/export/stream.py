"""A float32 residual stream in an int8 QDQ graph, at int8 speed.

Most of int8's error on EfficientNet-Lite0 is in its linear activations: the 1x1 project convs'
outputs and the residual Adds joining them, rounded to uint8 at every block. Here they stay
float32 while every multiply stays int8:

* each linear 1x1 conv (no ReLU after it) runs as ``MatMulIntegerToFloat`` (ONNX Runtime's
  contrib op: a u8 x s8 GEMM with the float scale and bias fused) over a channels-last view of
  its uint8 input, so its output is float32. ONNX Runtime's transpose optimizer cancels the two
  Transposes against its NHWC QLinearConvs, and the GEMM runs faster than the QLinearConv it
  replaces. Selected ones (``residual_weights``) add a second GEMM of their int8 weights'
  rounding residual at its own int8 scale: weights of ~15 bits;
* the residual Adds (quantized by nobody, ``residual_adds``) read each other's float output,
  so the stream is rounded only where an expand conv reads it;
* selected convs (``extra_bits``) read that stream with 4 more bits: their uint8 input ``q`` is
  joined by a second uint8 tensor holding the rounding residual ``x - s (q - z)`` at step
  ``s / K``, and the weights by the same weights over ``K``, so one QLinearConv of twice the
  input channels sums both.

    rewrite(int8_model, float_model, float_adds=residual_adds(float_model.graph),
            residual_weights=("_blocks.2._project_conv.weight",),
            extra_bits=("_blocks.2._expand_conv.weight",))
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["EXTRA_STEPS", "residual_adds", "rewrite"]

#: Steps of the extra input's residual per step of the uint8 input (``K``): the residual's
#: rounding error (1/K) against its weights' (they are the conv's weights over K, in the same
#: int8 steps); 8 is near the optimum for weights of rms ~30 steps.
EXTRA_STEPS = 8

_ACTIVATIONS = ("Clip", "Relu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "LeakyRelu")


def residual_adds(graph: onnx.GraphProto) -> list[str]:
    """Names of the Adds of a float ``graph`` whose inputs all come from Convs or such Adds:
    the residual stream's joins (``quantize_static`` leaves them float32 when excluded)."""
    producer = {o: n for n in graph.node for o in n.output}
    found: set[str] = set()
    for node in graph.node:  # graph order: an Add's producers come before it
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        sources = [producer.get(i) for i in node.input]
        if all(s is not None and (s.op_type == "Conv" or s.name in found) for s in sources):
            found.add(node.name)
    return [n.name for n in graph.node if n.name in found]


def rewrite(model: onnx.ModelProto, float_model: onnx.ModelProto, *,
            float_adds: Collection[str], residual_weights: Iterable[str] = (),
            extra_bits: Iterable[str] = ()) -> None:
    """Give the QDQ ``model`` (quantized from ``float_model``, its Adds ``float_adds`` left
    float32) a float32 linear stream, in place. Linear 1x1 convs whose weight name ends with
    one of ``residual_weights`` add a GEMM of their weights' rounding residual; convs whose
    weight name ends with one of ``extra_bits`` read the stream ``EXTRA_STEPS`` finer."""
    graph = model.graph
    floats = {i.name: numpy_helper.to_array(i) for i in float_model.graph.initializer}
    linear = _linear_conv_weights(float_model.graph)
    float_nodes = set(float_adds)
    residual = tuple(residual_weights)
    for conv in [n for n in graph.node if n.op_type == "Conv"]:
        weight = _quantized_weight(graph, conv)
        if weight is not None and weight in linear and _is_pointwise(conv):
            float_nodes.add(_as_gemm(graph, conv, floats[weight], floats.get(linear[weight]),
                                     residual=bool(residual) and weight.endswith(residual)))
    _read_float(graph, float_nodes)
    suffixes = tuple(extra_bits)
    if suffixes:
        for conv in [n for n in graph.node if n.op_type == "Conv"]:
            weight = _quantized_weight(graph, conv)
            if weight is not None and weight.endswith(suffixes):
                _extra_bits(graph, conv, floats[weight])
    _prune(graph)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def _linear_conv_weights(graph: onnx.GraphProto) -> dict[str, str]:
    """Weight name -> bias name ("" if none) of each Conv whose output no activation reads."""
    readers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.op_type)
    return {n.input[1]: n.input[2] if len(n.input) > 2 else "" for n in graph.node
            if n.op_type == "Conv" and len(n.input) > 1
            and not any(op in _ACTIVATIONS for op in readers.get(n.output[0], []))}


def _is_pointwise(conv: onnx.NodeProto) -> bool:
    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    return (attrs.get("group", 1) == 1 and list(attrs.get("kernel_shape", [1, 1])) == [1, 1]
            and set(attrs.get("strides", [1])) == {1} and set(attrs.get("pads", [0])) == {0}
            and set(attrs.get("dilations", [1])) == {1})


def _producer(graph: onnx.GraphProto, name: str) -> onnx.NodeProto | None:
    return next((n for n in graph.node if name in n.output), None)


def _init(graph: onnx.GraphProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(i for i in graph.initializer if i.name == name))


def _quantized_weight(graph: onnx.GraphProto, conv: onnx.NodeProto) -> str | None:
    """The float weight name of a QDQ Conv (int8 weights, uint8 input), else None."""
    if len(conv.input) < 2:
        return None
    w_dq, x_dq = _producer(graph, conv.input[1]), _producer(graph, conv.input[0])
    if (w_dq is None or w_dq.op_type != "DequantizeLinear" or x_dq is None
            or x_dq.op_type != "DequantizeLinear" or len(x_dq.input) < 3
            or not w_dq.input[0].endswith("_quantized")):
        return None
    name: str = w_dq.input[0]
    return name[: -len("_quantized")]


def _as_gemm(graph: onnx.GraphProto, conv: onnx.NodeProto, w: np.ndarray,
             bias: np.ndarray | None, *, residual: bool) -> str:
    """Replace the QDQ 1x1 ``conv`` by ``MatMulIntegerToFloat`` over NHWC (with ``residual``,
    a second one of the weights' rounding residual, summed); returns the name of the node that
    now writes its (float32) output."""
    x_dq, w_dq = _producer(graph, conv.input[0]), _producer(graph, conv.input[1])
    assert x_dq is not None and w_dq is not None
    x_q, x_scale, x_zero = x_dq.input[:3]
    q = _init(graph, w_dq.input[0])
    channels = q.shape[0]
    q = q.reshape(channels, -1)
    scale = np.broadcast_to(_init(graph, w_dq.input[1]).astype(np.float64), (channels,))
    w64 = w.reshape(channels, -1).astype(np.float64)
    error = w64 - scale[:, None] * q
    scale_lo = np.abs(error).max(axis=1) / 127
    scale_lo[scale_lo == 0] = 1.0
    q_lo = np.clip(np.round(error / scale_lo[:, None]), -127, 127).astype(np.int8)
    b = np.zeros(channels, np.float32) if bias is None else bias.astype(np.float32)
    out = conv.output[0]
    p = f"{out}_gemm"
    graph.initializer.extend([
        numpy_helper.from_array(np.ascontiguousarray(q.T), f"{p}_w"),
        numpy_helper.from_array(scale.astype(np.float32), f"{p}_w_scale"),
        numpy_helper.from_array(np.ascontiguousarray(q_lo.T), f"{p}_w_lo"),
        numpy_helper.from_array(scale_lo.astype(np.float32), f"{p}_w_lo_scale"),
        numpy_helper.from_array(b, f"{p}_bias")])
    hi = f"{p}_hi" if residual else f"{p}_y"
    nodes = [
        helper.make_node("Transpose", [x_q], [f"{p}_x"], perm=[0, 2, 3, 1], name=f"{p}_nhwc"),
        helper.make_node("MatMulIntegerToFloat",
                         [f"{p}_x", f"{p}_w", x_scale, f"{p}_w_scale", x_zero, "", f"{p}_bias"],
                         [hi], domain="com.microsoft", name=f"{p}_hi")]
    if residual:
        nodes += [
            helper.make_node("MatMulIntegerToFloat",
                             [f"{p}_x", f"{p}_w_lo", x_scale, f"{p}_w_lo_scale", x_zero],
                             [f"{p}_lo"], domain="com.microsoft", name=f"{p}_lo"),
            helper.make_node("Add", [hi, f"{p}_lo"], [f"{p}_y"], name=f"{p}_sum")]
    nodes.append(helper.make_node("Transpose", [f"{p}_y"], [out], perm=[0, 3, 1, 2],
                                  name=f"{p}_nchw"))
    at = list(graph.node).index(conv)
    graph.node.remove(conv)
    for offset, node in enumerate(nodes):
        graph.node.insert(at + offset, node)
    return nodes[-1].name


def _read_float(graph: onnx.GraphProto, float_nodes: set[str]) -> None:
    """Float nodes read another float node's output directly, not its Q/DQ copy."""
    producer = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        if node.name not in float_nodes or node.op_type != "Add":
            continue
        for i, name in enumerate(node.input):
            dq = producer.get(name)
            q = producer.get(dq.input[0]) if dq is not None else None
            if dq is None or dq.op_type != "DequantizeLinear" or q is None \
                    or q.op_type != "QuantizeLinear":
                continue
            source = producer.get(q.input[0])
            if source is not None and source.name in float_nodes:
                node.input[i] = q.input[0]


def _extra_bits(graph: onnx.GraphProto, conv: onnx.NodeProto, w: np.ndarray) -> None:
    """Let the QDQ ``conv`` also read its input's rounding residual, ``EXTRA_STEPS`` finer."""
    x_dq, w_dq = _producer(graph, conv.input[0]), _producer(graph, conv.input[1])
    assert x_dq is not None and w_dq is not None
    x_q, x_scale, x_zero = x_dq.input[:3]
    quant = _producer(graph, x_q)
    if quant is None or quant.op_type != "QuantizeLinear":
        return
    k = EXTRA_STEPS
    scale = _init(graph, w_dq.input[1]).astype(np.float64)
    per_channel = scale.reshape((-1,) + (1,) * (w.ndim - 1))
    q_lo = np.clip(np.round(w / (k * per_channel)), -127, 127).astype(np.int8)
    weights = np.concatenate([_init(graph, w_dq.input[0]), q_lo], axis=1)
    p = f"{conv.output[0]}_extra"
    step = float(_init(graph, x_scale)) / k
    graph.initializer.extend([numpy_helper.from_array(weights, f"{p}_w"),
                              numpy_helper.from_array(np.array(step, np.float32), f"{p}_step")])
    nodes = [
        helper.make_node("DequantizeLinear", [x_q, x_scale, x_zero], [f"{p}_xq"], name=f"{p}_dq"),
        helper.make_node("Sub", [quant.input[0], f"{p}_xq"], [f"{p}_r"], name=f"{p}_sub"),
        helper.make_node("QuantizeLinear", [f"{p}_r", f"{p}_step", x_zero], [f"{p}_rq"],
                         name=f"{p}_q"),
        helper.make_node("Concat", [x_q, f"{p}_rq"], [f"{p}_in_q"], axis=1, name=f"{p}_cat"),
        helper.make_node("DequantizeLinear", [f"{p}_in_q", x_scale, x_zero], [f"{p}_in"],
                         name=f"{p}_in"),
        helper.make_node("DequantizeLinear", [f"{p}_w", *w_dq.input[1:]], [f"{p}_wf"],
                         axis=0, name=f"{p}_wdq")]
    at = list(graph.node).index(conv)
    for offset, node in enumerate(nodes):
        graph.node.insert(at + offset, node)
    conv.input[0], conv.input[1] = f"{p}_in", f"{p}_wf"


def _prune(graph: onnx.GraphProto) -> None:
    """Drop nodes nobody reads (ONNX Runtime keeps and runs dead DequantizeLinears) and the
    initializers only they read."""
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    used = {i for n in graph.node for i in n.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
