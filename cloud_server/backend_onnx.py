"""The ONNX Runtime backend: the tails and whole model of the service's own bundle.

Tails are exported with a dynamic batch dimension (``shared.export.graphs``), so a batch the
batcher stacked runs as one ``session.run``. Sessions open on first use of a split point (a
service that only ever sees a few split points holds only their graphs) and are kept; each has
the service's intra-op thread count (``Settings.torch_threads``) and inter-op parallelism off,
as ``shared.ortsession.open_session`` sets up for the device.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch

from shared.bundle import Bundle
from shared.candidates import WHOLE_MODEL
from shared.ortsession import open_session

__all__ = ["OnnxBackend"]


class OnnxBackend:
    """``run(key, inputs)`` on ``bundle``'s float32 graphs with ONNX Runtime.

        backend = OnnxBackend(service_bundle(name, fp, root=root), threads=2)
        backend.run(WHOLE_MODEL, (x,))   # x: (N, 3, H, W) float32 -> (N, classes) logits
    """

    name = "onnxruntime"

    def __init__(self, bundle: Bundle, *, threads: int) -> None:
        self.bundle = bundle
        self.threads = threads
        manifest = bundle.manifest
        self._output = manifest.output.name
        # key -> (graph file, its input names in the order the inputs come)
        self._graphs: dict[str, tuple[str, tuple[str, ...]]] = {
            WHOLE_MODEL: (manifest.full["fp32"], (manifest.input.name,))}
        for point in manifest.points:
            self._graphs[point.name] = (point.tail, tuple(t.name for t in point.tensors))
        self._sessions: dict[str, Any] = {}
        self._lock = threading.Lock()

    def session(self, key: str) -> Any:
        """The (cached) ``InferenceSession`` of ``key``; raises KeyError for an unknown key."""
        session = self._sessions.get(key)
        if session is None:
            with self._lock:
                session = self._sessions.get(key)
                if session is None:
                    file_name, _ = self._graphs[key]
                    session = open_session(self.bundle.path(file_name), threads=self.threads)
                    self._sessions[key] = session
        return session

    def run(self, key: str, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        session = self.session(key)
        _, names = self._graphs[key]
        if len(names) != len(inputs):
            raise ValueError(f"{key!r} takes {len(names)} tensors, got {len(inputs)}")
        feed = {name: np.ascontiguousarray(x.detach().numpy(), dtype=np.float32)
                for name, x in zip(names, inputs, strict=True)}
        out, = session.run([self._output], feed)
        return torch.from_numpy(out)
