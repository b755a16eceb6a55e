"""Bodies a splitserve service answers, built through the contract (``shared.schemas``), for
fake services and tests that need a well-formed answer to break one field of."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shared.schemas import (
    InferResponse,
    ModelMetadata,
    PredictionBody,
    SplitPointBody,
    TimingsBody,
)

__all__ = ["infer_body", "metadata_body", "with_field"]


def metadata_body(*, model: str = "m", fingerprint: str = "f" * 16, server_ms: float | None = 8.0,
                  queue_ms: float = 0.0, split_ms: Mapping[str, float | None] | None = None
                  ) -> dict[str, Any]:
    """``GET /v2/models/{model}``: split points named as the keys of ``split_ms``, in order."""
    points = [SplitPointBody(name=name, index=i, tensors=[], float32_bytes=0, server_ms=ms)
              for i, (name, ms) in enumerate((split_ms or {}).items())]
    return ModelMetadata(
        name=model, versions=[fingerprint], platform="pytorch_torchfx", inputs=[], outputs=[],
        fingerprint=fingerprint, preprocessing={}, server_ms=server_ms, queue_ms=queue_ms,
        split_points=points).model_dump(mode="json")


def infer_body(*, model: str = "m", split: str = "cloud", label: str = "tabby") -> dict[str, Any]:
    """An inference answer with one prediction and small timings."""
    return InferResponse(
        model_name=model, model_version="f" * 16, id="", split=split,
        top_k=[[PredictionBody(index=281, label=label, prob=0.9)]],
        timings_ms=TimingsBody(decode=1.0, queue=0.0, compute=2.0),
        batch_size=1).model_dump(mode="json")


def with_field(body: dict[str, Any], path: str, value: object) -> dict[str, Any]:
    """``body`` with the field at dotted ``path`` (``split_points.3.name``) set to ``value``, or
    deleted if ``value`` is ``...``. Changes ``body`` in place and returns it."""
    *parents, last = path.split(".")
    node: Any = body
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    slot: int | str = int(last) if isinstance(node, list) else last
    if value is ...:
        del node[slot]
    else:
        node[slot] = value
    return body
