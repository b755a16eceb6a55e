"""The HTTP contract: one pydantic model per body, used by both sides.

The service declares these as its response models (and ``OipRequest`` as a request body); the
device parses every answer through them with ``parse``, strictly (no ``"1"`` for ``1.0``), so an
answer from a wrong or broken server is one ``ServiceError`` that names the field:

    >>> parse(ProbeResponse, {"received_bytes": 100})
    Traceback (most recent call last):
    ...
    shared.errors.ServiceError: service answer: server_ms: Field required

The Open Inference Protocol shapes (``ServerMetadata``, ``ModelReady``, ``OipTensorMetadata``,
``OipRequest``, ``OipResponse``) plus splitserve's own: model metadata with ``split_points`` and
the measured ``server_ms`` the planner reads, inference answers, probe answers, health, errors.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from shared.candidates import RESERVED
from shared.errors import ServiceError

__all__ = [
    "ErrorBody",
    "InferResponse",
    "LiveBody",
    "LoadBody",
    "ModelMetadata",
    "ModelReady",
    "OipRequest",
    "OipResponse",
    "OipTensor",
    "OipTensorMetadata",
    "PredictionBody",
    "ProbeResponse",
    "ReadyBody",
    "ServerMetadata",
    "SplitPointBody",
    "TensorBody",
    "TimingsBody",
    "describe",
    "parse",
]

Body = TypeVar("Body", bound=BaseModel)

# A duration the planner adds up: NaN or a negative figure would poison every estimate.
Ms = Annotated[float, Field(ge=0, allow_inf_nan=False)]


def _not_reserved(name: str) -> str:
    if name in RESERVED:
        raise ValueError(f"{name!r} is a candidate's name, not a split point's")
    return name


class ErrorBody(BaseModel):
    error: str = Field(description="What was wrong, in one sentence")


class LiveBody(BaseModel):
    live: bool


class ReadyBody(BaseModel):
    ready: bool
    error: Annotated[str | None, Field(description="Why not ready; absent once ready")] = None


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
    name: Annotated[str, Field(min_length=1), AfterValidator(_not_reserved)]
    index: int
    tensors: list[TensorBody]
    float32_bytes: int = Field(ge=0, description="Per sample, before quantization and compression")
    server_ms: Ms | None = Field(
        None, description="Decode + tail of a lone request now: the start-up profile moved by "
                          "the service's live speed, or this split's own recent lone requests")


class LoadBody(BaseModel):
    """The service's load when it answered: what a request sent now would wait before its
    answer, beyond the decode + compute the planner already counts (``server_ms``). One compute
    thread serves every candidate, so the queued work is shared; the candidates differ by the
    other requests their own forward pass carries."""

    queue_ms_whole: Ms = Field(description="Expected wait of a whole-model request (`cloud`)")
    queue_ms_tail: Ms = Field(
        description="Expected wait of a tail request whose split point is not in queue_ms_splits")
    queue_ms_splits: dict[str, Ms] = Field(
        default_factory=dict, description="Split points whose expected wait differs from tail's")
    queued: int = Field(0, ge=0, description="Requests waiting for a forward pass")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[OipTensorMetadata]
    outputs: list[OipTensorMetadata]
    fingerprint: str = Field(description="Hash of the served weights; frames must carry it")
    preprocessing: dict[str, Any]
    server_ms: Ms | None = Field(
        None, description="JPEG decode + whole model of a lone request now (the `cloud` "
                          "candidate; as a split point's server_ms)")
    queue_ms: Ms = Field(0.0, description="Recent mean time requests waited for a batch")
    load: LoadBody | None = Field(None, description="The load now (absent from older services)")
    split_points: list[SplitPointBody]

    @model_validator(mode="after")
    def _unique_split_points(self) -> ModelMetadata:
        names = [p.name for p in self.split_points]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"split point {twice[0]!r} is listed twice")
        return self


class PredictionBody(BaseModel):
    index: int
    label: str
    prob: float


class TimingsBody(BaseModel):
    decode: Ms = Field(description="Parse, check and dequantize (or decode the image), ms")
    queue: Ms = Field(description="Waiting for a batch, ms")
    compute: Ms = Field(description="Forward pass of the whole batch, ms")


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str
    split: str = Field(description="Split point name, or 'cloud' for a whole-model image request")
    top_k: list[list[PredictionBody]] = Field(
        min_length=1, description="One list per sample in the request")
    timings_ms: TimingsBody
    batch_size: int = Field(ge=1, description="Requests in the forward pass that answered this one")
    load: LoadBody | None = Field(None, description="The load as this answer left")


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
    received_bytes: int = Field(ge=0)
    server_ms: Ms


def parse(body: type[Body], data: object, *, source: str = "service answer") -> Body:
    """``data`` (decoded JSON) as a ``body``, or ``ServiceError`` naming the first bad field.

        >>> parse(ProbeResponse, {"received_bytes": 100, "server_ms": 0.5}).server_ms
        0.5
    """
    try:
        return body.model_validate(data, strict=True)
    except ValidationError as exc:
        raise ServiceError(f"{source}: {describe(exc)}") from exc


def describe(exc: ValidationError) -> str:
    """The first error as ``where: what``, e.g. ``split_points.3.name: Field required``."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"])
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first['msg']}{more}" if where else f"{first['msg']}{more}"
