"""Measuring torch eager against ONNX Runtime fp32 and int8, side by side in one process.

Every timed call is interleaved: round after round, each case (whole model, each head, each
tail) runs once on each runtime, so a burst of load from a neighbour lands on all of them alike.
A case's figure is a low quantile of its rounds: on a shared machine the fast runs are the
machine's, the slow ones its neighbours'.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from PIL import Image

from bench.install_size import install_sizes
from device_client.onnx_runtime import OnnxDeviceRuntime
from device_client.runtime import DeviceRuntime
from shared.bundle import Bundle
from shared.preprocess import preprocess, reference_photo

__all__ = [
    "RUNTIMES",
    "Agreement",
    "CaseTimes",
    "bundle_sizes",
    "cpu_info",
    "install_sizes",
    "low_quantile_ms",
    "measure_agreement",
    "measure_times",
]

RUNTIMES = ("torch", "ort_fp32", "ort_int8")
#: The 20th percentile of the rounds: robust to a neighbour's bursts, unlike the mean or median,
#: and not the single luckiest run, unlike the minimum.
QUANTILE = 0.2
_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def low_quantile_ms(samples_ms: Sequence[float], q: float = QUANTILE) -> float:
    """The ``q`` quantile of ``samples_ms`` (nearest rank, no interpolation).

    >>> low_quantile_ms([5.0, 1.0, 3.0, 2.0, 4.0])
    1.0
    """
    if not samples_ms or not 0.0 <= q <= 1.0:
        raise ValueError("need samples and a quantile in [0, 1]")
    ordered = sorted(samples_ms)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@dataclass(frozen=True)
class CaseTimes:
    """One case (``whole``, ``head`` or ``tail`` of a split point): ms per runtime, or None
    where the runtime has no such graph (tails are float32 only)."""

    kind: str
    split: str | None
    index: int | None
    ms: dict[str, float | None]

    def speedup(self, runtime: str) -> float | None:
        base, other = self.ms.get("torch"), self.ms.get(runtime)
        return base / other if base and other else None


@dataclass(frozen=True)
class Agreement:
    """Top-1 agreement with torch float32 over ``images`` images, per configuration."""

    images: int
    agree: dict[str, int]
    disagreeing: dict[str, list[str]] = field(default_factory=dict)

    def rate(self, name: str) -> float:
        return self.agree[name] / self.images if self.images else 0.0


def measure_times(torch_rt: DeviceRuntime, fp32: OnnxDeviceRuntime,
                  int8: OnnxDeviceRuntime | None, point_keys: Iterable[int], *, rounds: int,
                  on_round: Callable[[int], None] | None = None) -> list[CaseTimes]:
    """Time the whole model and the heads and tails of ``point_keys`` on every runtime."""
    pre = torch_rt.spec.preprocessing
    x = preprocess(reference_photo(), pre)
    xn = x.numpy()
    calls: dict[tuple[str, str | None, int | None], dict[str, Callable[[], object]]] = {}
    calls[("whole", None, None)] = {
        "torch": lambda: torch_rt.run_full(x), "ort_fp32": lambda: fp32.run_full(xn)}
    if int8 is not None:
        calls[("whole", None, None)]["ort_int8"] = lambda: int8.run_full(xn)
    for key in point_keys:
        tp, op = torch_rt.point(key), fp32.point(key)
        t_mid, o_mid = torch_rt.run_head(tp, x), fp32.run_head(op, xn)
        head = {"torch": _bind(torch_rt.run_head, tp, x), "ort_fp32": _bind(fp32.run_head, op, xn)}
        if int8 is not None:
            head["ort_int8"] = _bind(int8.run_head, op, xn)
        calls[("head", tp.name, tp.index)] = head
        calls[("tail", tp.name, tp.index)] = {"torch": _bind(torch_rt.run_tail, tp, t_mid),
                                              "ort_fp32": _bind(fp32.run_tail, op, o_mid)}
    for fns in calls.values():  # warm-up: first calls pay for allocations and session setup
        for fn in fns.values():
            fn()
    samples: dict[tuple[Any, ...], list[float]] = {
        (case, rt): [] for case, fns in calls.items() for rt in fns}
    for r in range(rounds):
        for case, fns in calls.items():
            for rt, fn in fns.items():
                start = time.perf_counter()
                fn()
                samples[(case, rt)].append((time.perf_counter() - start) * 1e3)
        if on_round is not None:
            on_round(r)
    out = []
    for (kind, split, index), fns in calls.items():
        ms: dict[str, float | None] = {rt: None for rt in RUNTIMES}
        for rt in fns:
            ms[rt] = low_quantile_ms(samples[((kind, split, index), rt)])
        out.append(CaseTimes(kind, split, index, ms))
    return out


def measure_agreement(torch_rt: DeviceRuntime, fp32: OnnxDeviceRuntime,
                      int8: OnnxDeviceRuntime | None, images: Sequence[tuple[str, Image.Image]],
                      *, point_key: int) -> Agreement:
    """Top-1 of ORT fp32 and int8 (whole model, and head at ``point_key`` + fp32 tail) against
    torch float32, image by image."""
    pre = torch_rt.spec.preprocessing
    op = fp32.point(point_key)
    configs: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "ort_fp32 whole": fp32.run_full,
        f"ort_fp32 split {op.name}": lambda a: fp32.run_tail(op, fp32.run_head(op, a))}
    if int8 is not None:
        configs["ort_int8 whole"] = int8.run_full
        configs[f"ort_int8 split {op.name}"] = lambda a: fp32.run_tail(op, int8.run_head(op, a))
    agree = dict.fromkeys(configs, 0)
    wrong: dict[str, list[str]] = {k: [] for k in configs}
    for name, image in images:
        x = preprocess(image, pre)
        want = int(torch_rt.run_full(x).argmax())
        for config, fn in configs.items():
            if int(fn(x.numpy()).argmax()) == want:
                agree[config] += 1
            else:
                wrong[config].append(name)
    return Agreement(len(images), agree, {k: v for k, v in wrong.items() if v})


def bundle_sizes(bundle: Bundle) -> dict[str, int]:
    """Bytes on disk: the bundle, its parts, and the whole model as one self-contained file."""
    files = {p.name: p.stat().st_size for p in bundle.root.iterdir() if p.is_file()}

    def total(prefix: str, suffix: str = ".onnx") -> int:
        return sum(v for k, v in files.items() if k.startswith(prefix) and k.endswith(suffix)
                   and (suffix != ".onnx" or not k.endswith(".int8.onnx")))

    whole = len(onnx.load(str(bundle.path(bundle.full["fp32"]))).SerializeToString())
    return {
        "bundle_bytes": sum(files.values()),
        "weights_bytes": files.get(bundle.manifest.weights, 0),
        "head_graphs_fp32_bytes": total("head_"),
        "head_graphs_int8_bytes": total("head_", ".int8.onnx"),
        "tail_graphs_bytes": total("tail_"),
        "whole_model_onnx_bytes": whole,
    }


def cpu_info(cpuinfo: str | None = None) -> dict[str, Any]:
    """The CPU's model name and which int8 dot-product flags (VNNI) it has."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    flags_line = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", cpuinfo, re.M)
    flags = set(flags_line.group(1).split()) if flags_line else set()
    return {"model": model.group(1).strip() if model else "unknown",
            "vnni_flags": [f for f in _VNNI_FLAGS if f in flags],
            "avx512f": "avx512f" in flags, "avx2": "avx2" in flags}


def _bind(fn: Callable[..., object], *args: Any) -> Callable[[], object]:
    return lambda: fn(*args)


def torch_threads() -> int:
    return torch.get_num_threads()
