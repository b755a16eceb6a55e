"""One weights file for many ONNX graphs: every initializer stored once, found by content.

Heads, tails and the whole model are cut from one exported graph, so they hold the same weight
tensors (and int8 graphs quantized from the same weights hold the same int8 tensors). Each
graph's initializers are moved into ONNX external data, and a tensor whose bytes are already in
the file points at the existing copy. No torch.

    store = SharedWeights(staging / "weights.bin")
    store.externalize(head)          # head's initializers now point into weights.bin
    onnx.save(head, staging / "head_005.onnx")
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
from onnx import TensorProto, numpy_helper
from onnx.external_data_helper import set_external_data

__all__ = ["SharedWeights"]

# Below this a tensor stays inside its graph: a scale or a shape costs less inline than as an
# offset and a length (onnx's own convert_model_to_external_data uses the same threshold).
_MIN_EXTERNAL_BYTES = 1024
# Offsets aligned so that a runtime may map or read each tensor without unaligned copies.
_ALIGN_BYTES = 64


class SharedWeights:
    """Appends initializer bytes to ``path`` (created empty), each distinct tensor once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # Relative to the graph, so the graphs must sit next to the file: runtimes refuse
        # external data outside the graph's own directory.
        self.location = path.name
        self._offsets: dict[str, tuple[int, int]] = {}
        self._size = 0
        path.write_bytes(b"")

    @property
    def nbytes(self) -> int:
        return self._size

    def externalize(self, model: onnx.ModelProto) -> None:
        """Point every large initializer of ``model`` into the file, appending new bytes."""
        location = self.location
        for tensor in model.graph.initializer:
            if tensor.data_location == TensorProto.EXTERNAL:
                continue
            plain = numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name)
            data = plain.raw_data
            if len(data) < _MIN_EXTERNAL_BYTES:
                continue
            key = hashlib.sha256(
                f"{plain.data_type}:{tuple(plain.dims)}:".encode() + data).hexdigest()
            if key not in self._offsets:
                self._offsets[key] = (self._append(data), len(data))
            offset, length = self._offsets[key]
            tensor.CopyFrom(plain)
            set_external_data(tensor, location=location, offset=offset, length=length)
            tensor.data_location = TensorProto.EXTERNAL
            tensor.ClearField("raw_data")

    def _append(self, data: bytes) -> int:
        offset = -(-self._size // _ALIGN_BYTES) * _ALIGN_BYTES
        with open(self.path, "r+b") as f:
            f.seek(offset)
            f.write(data)
        self._size = offset + len(data)
        return offset
