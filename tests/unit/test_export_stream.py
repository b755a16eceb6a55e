"""shared.export.stream: the int8 graph's float32 residual stream, on a three-block toy network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from shared.export.quantize import EXTRA_BITS, quantize
from shared.export.stream import residual_adds
from shared.ortsession import open_session

EXPANDED = "_blocks.2._expand_conv.weight"  # the toy's second block


def _toy() -> onnx.ModelProto:
    """stem, ReLU6 -> three blocks (1x1 expand, ReLU6, 1x1 project), the last two residual."""
    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def conv(name: str, x: str, cin: int, cout: int, y: str) -> None:
        inits.append(numpy_helper.from_array(
            (rng.standard_normal((cout, cin, 1, 1)) / np.sqrt(cin)).astype(np.float32), name))
        inits.append(numpy_helper.from_array(
            (0.1 * rng.standard_normal(cout)).astype(np.float32), f"{name}_bias"))
        nodes.append(helper.make_node("Conv", [x, name, f"{name}_bias"], [y], name=f"{y}_conv"))

    inits += [numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
              numpy_helper.from_array(np.array(6.0, np.float32), "hi")]
    conv("stem.weight", "input", 3, 8, "s0")
    nodes.append(helper.make_node("Clip", ["s0", "lo", "hi"], ["s"], name="stem_clip"))
    stream = "s"
    for block in range(3):  # block 0 has no residual (its stage changes width), 1 and 2 do
        # named as blocks 1-3: quantize keeps blocks.0's convs float32 (FLOAT32_WEIGHTS)
        weight = f"_blocks.{block + 1}._expand_conv.weight"
        conv(weight, stream, 8, 24, f"e{block}")
        nodes.append(helper.make_node("Clip", [f"e{block}", "lo", "hi"], [f"r{block}"],
                                      name=f"clip{block}"))
        conv(f"_blocks.{block + 1}._project_conv.weight", f"r{block}", 24, 8, f"p{block}")
        if block == 0:
            stream = "p0"
            continue
        out = "output" if block == 2 else f"a{block}"
        nodes.append(helper.make_node("Add", [stream, f"p{block}"], [out], name=f"add{block}"))
        stream = out
    graph = helper.make_graph(
        nodes, "toy", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 6, 6])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 8, 6, 6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, path: Path, xs: list[np.ndarray]) -> np.ndarray:
    onnx.save(model, path)
    session = open_session(path, threads=1)
    return np.concatenate([session.run(["output"], {"input": x})[0] for x in xs])


def test_residual_adds_are_the_adds_joining_convs_and_adds() -> None:
    assert residual_adds(_toy().graph) == ["add1", "add2"]


def test_int8_graph_keeps_the_stream_float_and_multiplies_in_int8(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((1, 3, 6, 6)).astype(np.float32) for _ in range(8)]
    model = _toy()
    scratch = tmp_path / "q"
    scratch.mkdir()
    int8 = quantize(model, xs, input_name="input", workdir=scratch)
    ops = [n.op_type for n in int8.graph.node]
    assert ops.count("MatMulIntegerToFloat") == 4  # 3 project convs + blocks.2 residual
    assert ops.count("Conv") == 4  # stem and expands stay QDQ convs (QLinearConv in ORT)
    assert EXPANDED in EXTRA_BITS
    assert ops.count("Concat") == 1  # only the EXTRA_BITS expand reads 4 more bits
    producer = {o: n for n in int8.graph.node for o in n.output}
    for add in (n for n in int8.graph.node if n.name in ("add1", "add2")):
        assert all(producer[i].op_type != "DequantizeLinear" for i in add.input)
    want = _run(model, tmp_path / "f.onnx", xs)
    got = _run(int8, tmp_path / "i.onnx", xs)
    sqnr_db = 10 * np.log10(np.sum(want**2) / np.sum((got - want) ** 2))
    assert sqnr_db > 30
