"""shared.export.rounding and quantize: adaptive rounding of int8 weights on small graphs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from shared.export.quantize import quantize
from shared.export.rounding import input_moments, round_weights
from shared.ortsession import open_session


def _conv_graph(w: np.ndarray, *, group: int, pads: int = 1) -> onnx.ModelProto:
    cout = w.shape[0]
    conv = helper.make_node("Conv", ["input", "w", "b"], ["y"], group=group,
                            pads=[pads] * 4, strides=[1, 1])
    clip = helper.make_node("Clip", ["y", "lo", "hi"], ["out"])
    graph = helper.make_graph(
        [conv, clip], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                          [1, w.shape[1] * group, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w.astype(np.float32), "w"),
         numpy_helper.from_array(np.full(cout, 0.1, np.float32), "b"),
         numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
         numpy_helper.from_array(np.array(6.0, np.float32), "hi")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _smooth_inputs(n: int, channels: int, seed: int = 0) -> list[np.ndarray]:
    # Neighbouring pixels correlated, as in photos: where adaptive rounding pays.
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.normal(size=(1, channels, 8, 8)).cumsum(axis=2).cumsum(axis=3) / 4
        out.append(x.astype(np.float32))
    return out


def test_moments_are_the_second_moment_of_the_input_patches(tmp_path: Path) -> None:
    w = np.random.default_rng(1).normal(size=(2, 1, 3, 3))
    xs = _smooth_inputs(2, 2)
    moments = input_moments(_conv_graph(w, group=2), xs, input_name="input", workdir=tmp_path)
    m = moments["w"]
    assert m.shape == (2, 9, 9)
    by_hand = np.zeros((9, 9))
    for x in xs:  # channel 1 (group 1), every 3x3 patch of the zero-padded image
        padded = np.pad(x[0, 1].astype(np.float64), 1)
        patches = np.array([padded[i:i + 3, j:j + 3].reshape(-1)
                            for i in range(8) for j in range(8)])
        by_hand += patches.T @ patches / len(patches) / len(xs)
    assert np.allclose(m[1], by_hand, rtol=1e-5)
    assert not list(tmp_path.iterdir())  # its scratch graph is removed


@pytest.mark.parametrize("groups", [1, 4], ids=["dense", "depthwise"])
def test_rounding_never_loses_to_nearest_and_stays_floor_or_ceil(groups: int) -> None:
    rng = np.random.default_rng(groups)
    channels, k = 4, 9
    w = rng.normal(size=(channels, k))
    scale = np.abs(w).max(axis=1) / 127
    nearest = np.round(w / scale[:, None])
    a = rng.normal(size=(groups, k, 50)).cumsum(axis=1)
    moments = np.einsum("gap,gbp->gab", a, a) / 50
    q = round_weights(w, scale, nearest.astype(np.int8), moments)
    assert q.dtype == np.int8
    assert np.all((q == np.floor(w / scale[:, None])) | (q == np.ceil(w / scale[:, None])))
    m = moments if groups == channels else np.repeat(moments, channels // groups, axis=0)

    def cost(qq: np.ndarray) -> float:
        d = scale[:, None] * qq - w
        return float(np.einsum("ck,ckl,cl->", d, m, d))

    assert cost(q) <= cost(nearest) + 1e-12


def test_quantize_rounds_each_weight_once_across_graphs(tmp_path: Path) -> None:
    w = np.random.default_rng(2).normal(size=(4, 1, 3, 3))
    model = _conv_graph(w, group=4)
    xs = _smooth_inputs(4, 4)
    rounded: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    first = quantize(model, xs, input_name="input", workdir=tmp_path, rounded=rounded)
    assert set(rounded) == {"w"}
    rounded["w"] = (rounded["w"][0], np.zeros_like(rounded["w"][1]))  # a marker
    second = quantize(model, xs, input_name="input", workdir=tmp_path, rounded=rounded)
    weights = {i.name: numpy_helper.to_array(i) for i in second.graph.initializer}
    assert not weights["w_quantized"].any()  # the cached integers, not recomputed
    path = tmp_path / "first.onnx"
    onnx.save(first, path)
    got = open_session(path).run(None, {"input": xs[0]})[0]
    want = open_session(_save(model, tmp_path / "fp32.onnx")).run(None, {"input": xs[0]})[0]
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)
    return path


def _classifier_graph(w: np.ndarray) -> onnx.ModelProto:
    # A 1x1 conv (so the graph has int8 activations) then the classifier Gemm, as in a model.
    conv = helper.make_node("Conv", ["input", "cw"], ["features"])
    flat = helper.make_node("Flatten", ["features"], ["flat"])
    gemm = helper.make_node("Gemm", ["flat", "gw", "gb"], ["logits"], transB=1)
    graph = helper.make_graph(
        [conv, flat, gemm], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4, 1, 1])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.eye(4, dtype=np.float32).reshape(4, 4, 1, 1), "cw"),
         numpy_helper.from_array(w.astype(np.float32), "gw"),
         numpy_helper.from_array(np.zeros(w.shape[0], np.float32), "gb")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_quantize_leaves_the_classifier_s_logits_float(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    model = _classifier_graph(rng.normal(size=(10, 4)))
    xs = [rng.normal(size=(1, 4, 1, 1)).astype(np.float32) for _ in range(8)]
    int8 = quantize(model, xs, input_name="input", workdir=tmp_path)
    producer = {o: n for n in int8.graph.node for o in n.output}
    assert producer["logits"].op_type == "Gemm"  # no QuantizeLinear/DequantizeLinear after it
    assert any(n.op_type == "QuantizeLinear" for n in int8.graph.node)  # the rest is int8
    got = open_session(_save(int8, tmp_path / "int8.onnx")).run(None, {"input": xs[0]})[0]
    want = open_session(_save(model, tmp_path / "fp32.onnx")).run(None, {"input": xs[0]})[0]
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
