"""Export's acceptance test: every graph of a bundle against torch, on a real photo.

float32 graphs must match torch within a tolerance scaled to the tensor's magnitude; int8 graphs
must give torch's top-1 class (an int8 head is followed by its float32 tail, as the device and
the service would run them). Tails are also run at batch 2: they are exported with a dynamic
batch dimension, and dynamic batching on the service depends on it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import fx

from shared.errors import ExportError
from shared.ortsession import open_session

__all__ = ["Checker", "close_enough"]

#: |onnx - torch| <= ATOL + RTOL * max|torch|: fp32 kernels differ in summation order and in
#: fused (BatchNorm-folded) weights, so results agree to ~1e-5 of the range, not bit for bit.
RTOL = 1e-3
ATOL = 1e-4


def close_enough(got: np.ndarray, want: np.ndarray) -> tuple[bool, float]:
    """Whether ``got`` matches ``want`` within the tolerance, and the largest difference."""
    if got.shape != want.shape:
        return False, float("inf")
    diff = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
    return diff <= ATOL + RTOL * float(np.max(np.abs(want))), diff


class Checker:
    """Runs bundle graphs from ``root`` on one preprocessed photo and compares them to torch."""

    def __init__(self, root: Path, model: torch.nn.Module, x: torch.Tensor, *,
                 input_name: str, output_name: str) -> None:
        self.root = root
        self.input_name = input_name
        self.output_name = output_name
        self.x = x.numpy()
        with torch.inference_mode():
            self.logits = model(x).numpy()
        self.top1 = int(self.logits.argmax())

    def full(self, name: str, *, int8: bool) -> None:
        (logits,) = self._run(name, [self.output_name], {self.input_name: self.x})
        self._logits(name, logits, int8=int8)

    def head_tail(self, head_name: str, tail_name: str, head: fx.GraphModule,
                  names: Sequence[str], *, int8: bool) -> None:
        """Check ``head_name`` against torch's ``head``, then ``tail_name`` (fed torch's own
        head outputs, at batch 1 and 2). For an int8 head, only top-1 through the fp32 tail."""
        with torch.inference_mode():
            want = [t.numpy() for t in head(torch.from_numpy(self.x))]
        got = self._run(head_name, list(names), {self.input_name: self.x})
        if int8:
            (logits,) = self._run(tail_name, [self.output_name], dict(zip(names, got, strict=True)))
            self._logits(f"{head_name} + {tail_name}", logits, int8=True)
            return
        for name, g, w in zip(names, got, want, strict=True):
            ok, diff = close_enough(g, w)
            if not ok:
                raise ExportError(f"{head_name} disagrees with torch on {name}: max |diff| "
                                  f"{diff:.3g}; no bundle written")
        feed = dict(zip(names, want, strict=True))
        (logits,) = self._run(tail_name, [self.output_name], feed)
        self._logits(tail_name, logits, int8=False)
        batch2 = {k: np.concatenate([v, v]) for k, v in feed.items()}
        (logits2,) = self._run(tail_name, [self.output_name], batch2)
        for row in logits2:
            self._logits(f"{tail_name} at batch 2", row[None], int8=False)

    def _logits(self, what: str, logits: np.ndarray, *, int8: bool) -> None:
        if int8:
            top1 = int(logits.argmax())
            if top1 != self.top1:
                raise ExportError(f"{what} (int8) answers class {top1} where torch answers "
                                  f"{self.top1}; no bundle written (calibrate on photos like "
                                  "the model's with --calibration, or export without --int8)")
            return
        ok, diff = close_enough(logits, self.logits)
        if not ok:
            raise ExportError(f"{what} disagrees with torch: max |logit diff| {diff:.3g}; "
                              "no bundle written")

    def _run(self, name: str, outputs: list[str], feed: dict[str, np.ndarray]
             ) -> list[np.ndarray]:
        session = open_session(self.root / name, threads=1)
        run: Callable[..., list[np.ndarray]] = session.run
        return run(outputs, feed)
