"""Model metadata: the OIP fields plus every split point and what it costs here."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Security

from cloud_server.middleware import bearer
from cloud_server.runtime import ModelRuntime
from cloud_server.service import ServiceDep
from shared.candidates import WHOLE_MODEL
from shared.schemas import (
    ErrorBody,
    LoadBody,
    ModelMetadata,
    OipTensorMetadata,
    SplitPointBody,
    TensorBody,
)

router = APIRouter(tags=["models"], dependencies=[Security(bearer)])


def metadata(runtime: ModelRuntime, queue_ms: float, load: LoadBody | None = None
             ) -> ModelMetadata:
    c, h, w = runtime.spec.input_shape[1:]
    server_ms = dict(runtime.server_ms)
    return ModelMetadata(
        name=runtime.name,
        versions=[runtime.fingerprint],
        platform="pytorch_torchfx",
        inputs=[OipTensorMetadata(name="input", datatype="FP32", shape=[-1, c, h, w])],
        outputs=[OipTensorMetadata(name="logits", datatype="FP32",
                                   shape=[-1, runtime.spec.num_classes])],
        fingerprint=runtime.fingerprint,
        preprocessing=asdict(runtime.spec.preprocessing),
        server_ms=server_ms.get(WHOLE_MODEL),
        queue_ms=round(queue_ms, 3),
        load=load,
        split_points=[
            SplitPointBody(
                name=p.name, index=p.index, float32_bytes=p.float32_bytes,
                tensors=[TensorBody(shape=[-1, *t.shape[1:]], dtype=t.dtype) for t in p.tensors],
                server_ms=server_ms.get(p.name))
            for p in runtime.points],
    )


@router.get("/v2/models/{model}", response_model=ModelMetadata,
            responses={404: {"model": ErrorBody}, 503: {"model": ErrorBody}})
async def model_metadata(model: str, service: ServiceDep) -> ModelMetadata:
    """OIP model metadata, plus ``fingerprint``, ``split_points`` and measured ``server_ms``."""
    runtime = service.runtime(model)
    return metadata(runtime, service.queue_ms, service.load(runtime))
