"""shared.ortsession: a float32 Conv between int8 layers stays float32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from shared.ortsession import open_session


def _float_conv_between_int8(path: Path) -> None:
    # input -> Q/DQ -> float Conv -> Q/DQ: the pattern ONNX Runtime's WeightBiasQuantization
    # would turn into an int8 Conv with one weight scale per tensor.
    nodes = [
        helper.make_node("QuantizeLinear", ["input", "s_in", "zp"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s_in", "zp"], ["x"]),
        helper.make_node("Conv", ["x", "w"], ["y"]),
        helper.make_node("QuantizeLinear", ["y", "s_out", "zp"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "s_out", "zp"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 2, 1, 1])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array(0.01, np.float32), "s_in"),
         numpy_helper.from_array(np.array(0.001, np.float32), "s_out"),
         numpy_helper.from_array(np.array(0, np.uint8), "zp"),
         # 0.003 is 0 at the per-tensor int8 step of 1.0 (1/127).
         numpy_helper.from_array(np.array([1.0, 0.003], np.float32).reshape(1, 2, 1, 1), "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_a_float_conv_between_int8_layers_keeps_its_float_weights(tmp_path: Path) -> None:
    path = tmp_path / "g.onnx"
    _float_conv_between_int8(path)
    x = np.array([0.1, 1.0], np.float32).reshape(1, 2, 1, 1)
    (out,) = open_session(path).run(["out"], {"input": x})
    # float weights: 0.1 + 0.003 = 0.103; re-quantized to int8 they would give 0.100.
    assert round(float(out.ravel()[0]), 3) == 0.103
