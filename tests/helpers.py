"""Helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import torch

from device_client.runtime import DeviceRuntime
from shared import wire


def make_frame(
    device: DeviceRuntime,
    split: str,
    *,
    rows: int = 1,
    request_id: str = "test",
    **overrides: object,
) -> bytes:
    """A real wire frame for ``split``: the head's activations on seeded noise, with any frame
    field replaced by ``overrides`` (``fingerprint=...``, ``tensors=...``)."""
    point = device.point(split)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((rows, *device.spec.input_shape[1:]), generator=generator)
    frame = wire.decode(device.encode(point, device.run_head(point, x), request_id))
    fields = {
        "model": frame.model,
        "fingerprint": frame.fingerprint,
        "split": frame.split,
        "request_id": frame.request_id,
        "tensors": frame.tensors,
        **overrides,
    }
    return wire.encode(wire.Frame(**fields))  # type: ignore[arg-type]
