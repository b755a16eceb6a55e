"""Adaptive rounding of int8 weights: round each weight up or down so a layer's output moves least.

Rounding every weight to its nearest int8 step is what ``quantize_static`` does, and on
EfficientNet-Lite0 it is most of int8's error (blocks.0's 3x3 depthwise filters are a large
centre tap and small neighbours, so nearest rounding mangles the small ones). The error a layer
adds is ``d^T C d`` per output channel, ``d`` the weights' rounding error and ``C`` the second
moment of the input patches it sees (neighbouring pixels are strongly correlated, so errors that
cancel across a patch cost little). Choosing floor or ceil per weight to minimise that, by
coordinate descent, is AdaRound's objective without its learned relaxation (Nagel et al. 2020,
"Up or Down? Adaptive Rounding for Post-Training Quantization"). The int8 scales stay as the
quantizer chose them; only the integers change, so the graph and its kernels are unchanged.

    moments = input_moments(float_graph, calibration, input_name="input")
    q_new = round_weights(w.reshape(cout, -1), scales, q.reshape(cout, -1), moments[name])
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

__all__ = ["input_moments", "round_weights"]

#: Passes over a channel's weights; coordinate descent settles in 2-4 on EfficientNet-Lite0.
SWEEPS = 8


def input_moments(model: onnx.ModelProto, inputs: Sequence[np.ndarray], *, input_name: str,
                  workdir: Path, weights: set[str] | None = None) -> dict[str, np.ndarray]:
    """For each Conv of ``model`` (float32, initializers inline) whose weight is in
    ``weights`` (default all): ``E[p p^T]`` over its input patches ``p``, per group, as
    ``(groups, K, K)`` float64 (``K`` = in-channels per group x kernel area). ``workdir`` is
    scratch space for one graph file."""
    from shared.ortsession import open_session

    inits = {i.name: i for i in model.graph.initializer}
    layers = [n for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 1
              and n.input[1] in inits and (weights is None or n.input[1] in weights)]
    if not layers:
        return {}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output} | {input_name}
    wanted = sorted({n.input[0] for n in layers})
    for name in wanted:
        if name not in known:
            probe.graph.output.append(helper.make_tensor_value_info(
                name, onnx.TensorProto.FLOAT, None))
    path = workdir / "moments.onnx"
    onnx.save(probe, path)
    session = open_session(path, threads=1)
    fetch = [n for n in wanted if n != input_name]
    sums: dict[str, Any] = {}
    for x in inputs:
        values = dict(zip(fetch, session.run(fetch, {input_name: x}), strict=True)
                      ) if fetch else {}
        values[input_name] = x
        for node in layers:
            patches = _patches(node, values[node.input[0]], list(inits[node.input[1]].dims))
            m = np.einsum("gap,gbp->gab", patches, patches, optimize=True) / patches.shape[-1]
            sums[node.input[1]] = sums.get(node.input[1], 0.0) + m
    path.unlink(missing_ok=True)
    return {name: s / len(inputs) for name, s in sums.items()}


def round_weights(w: np.ndarray, scale: np.ndarray, q: np.ndarray, moments: np.ndarray
                  ) -> np.ndarray:
    """Integers for ``w`` ``(C, K)`` at per-channel ``scale`` ``(C,)``, starting from the nearest
    ``q`` ``(C, K)``, each weight floor or ceil of ``w / scale``, minimising ``d^T M d`` per
    channel with ``d = scale * q - w`` and ``M`` = ``moments[c // (C / groups)]``.

    >>> import numpy as np
    >>> w = np.array([[0.26, 0.26]]); m = np.array([[[1.0, 0.9], [0.9, 1.0]]])
    >>> round_weights(w, np.array([0.5]), np.array([[1, 1]]), m)  # nearest: both up; errors cancel
    array([[0, 1]], dtype=int8)
    """
    w = w.astype(np.float64)
    channels, k = w.shape
    s = np.where(scale == 0, 1.0, scale).astype(np.float64)[:, None]
    shared = moments.shape[0] == 1  # a dense conv: one (K, K) matrix for every channel
    m = moments if shared else np.repeat(moments, channels // moments.shape[0], axis=0)
    lo, hi = np.floor(w / s), np.ceil(w / s)
    qf = q.astype(np.float64).copy()
    d = s * qf - w
    grad = d @ m[0] if shared else np.einsum("ck,ckl->cl", d, m)
    for _ in range(SWEEPS):
        changed = False
        for i in range(k):
            alt = np.where(qf[:, i] == lo[:, i], hi[:, i], lo[:, i])
            step = s[:, 0] * (alt - qf[:, i])
            diag = m[0, i, i] if shared else m[:, i, i]
            better = (2 * step * grad[:, i] + step * step * diag < -1e-12) & (np.abs(alt) <= 127)
            if not better.any():
                continue
            step = np.where(better, step, 0.0)
            qf[:, i] = np.where(better, alt, qf[:, i])
            grad += step[:, None] * (m[0, :, i][None, :] if shared else m[:, :, i])
            changed = True
        if not changed:
            break
    return qf.astype(np.int8)


def _patches(node: onnx.NodeProto, x: np.ndarray, dims: list[int]) -> np.ndarray:
    """``(groups, K, positions)`` input patches of one image for a Conv ``node``."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    stride = attrs.get("strides", [1, 1])
    pads = attrs.get("pads", [0, 0, 0, 0])
    dil = attrs.get("dilations", [1, 1])
    groups = attrs.get("group", 1)
    _, cin_g, kh, kw = dims
    a = np.pad(x[0], ((0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    h = (a.shape[1] - dil[0] * (kh - 1) - 1) // stride[0] + 1
    w = (a.shape[2] - dil[1] * (kw - 1) - 1) // stride[1] + 1
    taps = [a[:, i * dil[0]:i * dil[0] + h * stride[0]:stride[0],
              j * dil[1]:j * dil[1] + w * stride[1]:stride[1]]
            for i in range(kh) for j in range(kw)]
    return np.stack(taps, 1).reshape(groups, cin_g * kh * kw, h * w).astype(np.float64)
