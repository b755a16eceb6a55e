"""HTTP schemas (pydantic): the Open Inference Protocol shapes plus splitserve's split endpoints."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ErrorBody",
    "HealthBody",
    "InferResponse",
    "ModelMetadata",
    "ModelReady",
    "OipRequest",
    "OipResponse",
    "OipTensor",
    "OipTensorMetadata",
    "PredictionBody",
    "ProbeResponse",
    "ServerMetadata",
    "SplitPointBody",
    "TensorBody",
    "TimingsBody",
]


class ErrorBody(BaseModel):
    error: str = Field(description="What was wrong, in one sentence")


class HealthBody(BaseModel):
    live: bool | None = None
    ready: bool | None = None
    error: str | None = None


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelReady(BaseModel):
    name: str
    ready: bool


class OipTensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 marks the batch dimension")


class TensorBody(BaseModel):
    shape: list[int] = Field(description="Batch dimension first, as -1")
    dtype: str


class SplitPointBody(BaseModel):
    name: str
    index: int
    tensors: list[TensorBody]
    float32_bytes: int = Field(description="Per sample, before quantization and compression")
    server_ms: float | None = Field(
        None, description="Decode + tail at batch 1, measured at start-up, refreshed live")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[OipTensorMetadata]
    outputs: list[OipTensorMetadata]
    fingerprint: str = Field(description="Hash of the served weights; frames must carry it")
    preprocessing: dict[str, Any]
    server_ms: float | None = Field(
        None, description="JPEG decode + whole model at batch 1 (the `cloud` candidate)")
    queue_ms: float = Field(0.0, description="Recent mean time requests waited for a batch")
    split_points: list[SplitPointBody]


class PredictionBody(BaseModel):
    index: int
    label: str
    prob: float


class TimingsBody(BaseModel):
    decode: float = Field(description="Parse, check and dequantize (or decode the image), ms")
    queue: float = Field(description="Waiting for a batch, ms")
    compute: float = Field(description="Forward pass of the whole batch, ms")


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str
    split: str = Field(description="Split point name, or 'cloud' for a whole-model image request")
    top_k: list[list[PredictionBody]] = Field(description="One list per sample in the request")
    timings_ms: TimingsBody
    batch_size: int = Field(description="Requests in the forward pass that answered this one")


class OipTensor(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=256)
    shape: list[int] = Field(max_length=8)
    datatype: Literal["FP32"]
    data: list[Any] = Field(description="Row-major, flat or nested")
    parameters: dict[str, Any] | None = None


class OipRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str | None = Field(None, max_length=256)
    inputs: list[OipTensor] = Field(min_length=1, max_length=1)
    outputs: list[dict[str, Any]] | None = None
    parameters: dict[str, Any] | None = None


class OipResponse(BaseModel):
    model_name: str
    model_version: str
    id: str
    outputs: list[OipTensor]


class ProbeResponse(BaseModel):
    received_bytes: int
    server_ms: float
