"""What runs a tail or the whole model: the one interface the runtime calls, two engines.

    backend = TorchBackend(model, tails)                      # cloud_server.backend_torch
    backend = OnnxBackend(bundle, threads=2)                  # cloud_server.backend_onnx
    logits = backend.run("_blocks.8", (activation,))          # or WHOLE_MODEL, (image,)

Inputs and output are CPU tensors with the batch dimension first, because that is what frame
decoding and the batcher work on; the ONNX Runtime backend views them as numpy arrays without a
copy (``Tensor.numpy()`` / ``torch.from_numpy``). Which one the service uses is
``SPLITSERVE_BACKEND`` (``BACKENDS``).
"""

from __future__ import annotations

from typing import Protocol

import torch

__all__ = ["BACKENDS", "Backend"]

#: The values of ``SPLITSERVE_BACKEND`` / ``--backend``.
BACKENDS: tuple[str, ...] = ("onnxruntime", "torch")


class Backend(Protocol):
    """Runs the tail of split point ``key`` (a split point name), or the whole model for
    ``shared.candidates.WHOLE_MODEL``, on a batch; thread-safe, called from the compute thread."""

    name: str

    def run(self, key: str, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor: ...
