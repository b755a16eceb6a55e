"""Opening an ONNX Runtime session the way splitserve runs one: CPU, a fixed number of threads.

Shared by the device runtime (``device_client.onnx_runtime``) and the export's checks
(``shared.export``), so what export verifies is what the device runs. No torch.

    session = open_session(bundle.path("full.onnx"), threads=1)
    logits, = session.run(["logits"], {"input": x})
"""

from __future__ import annotations

import os
from typing import Any

from shared.errors import BundleError, ConfigError

__all__ = ["open_session"]

# ORT's own log levels: 0 verbose .. 4 fatal. Warnings about unused initializers and the like
# would land on the device's stderr for every session.
_LOG_ERRORS_ONLY = 3

# ONNX Runtime's graph optimizer would quantize a float32 Conv that sits between int8 layers
# (a DequantizeLinear before it, a QuantizeLinear after) to int8 with one scale per tensor,
# undoing an export's choice to keep it float32 (blocks.1's depthwise conv kept float32 fell
# from 26.5 to 15.4 dB logits SQNR). Graphs without such a Conv run the same. Older versions
# without this transformer ignore the name.
_DISABLED_OPTIMIZERS = ["WeightBiasQuantization"]


def open_session(path: str | os.PathLike[str], *, threads: int = 1) -> Any:
    """An ``onnxruntime.InferenceSession`` for the graph at ``path`` on the CPU.

    ``threads`` is the intra-op thread count (>= 1); inter-op parallelism is off, as a board's
    few cores are better spent inside each operator. Raises ``BundleError`` when the graph
    cannot be loaded (a bad graph, or its external weights missing).
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads must be an int >= 1, got {threads!r}")
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ConfigError("the ONNX runtime needs onnxruntime: "
                          "pip install onnxruntime (a dependency of splitserve itself)") from exc
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = _LOG_ERRORS_ONLY
    # Threads that spin while waiting burn the cores a shared board needs for other work.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=_DISABLED_OPTIMIZERS)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... classes
        raise BundleError(f"onnxruntime cannot load {os.fspath(path)}: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}"
                          ) from exc
