"""The HTTP contract (shared.schemas): one model per body, declared by the service, parsed by the
device, and a wrong answer is one ServiceError naming the field."""

from __future__ import annotations

import math
import subprocess
import sys
from typing import Any

import pytest
from pydantic import ValidationError

from cloud_server.app import create_app
from cloud_server.settings import Settings
from shared import candidates, schemas
from shared.errors import ServiceError
from shared.schemas import (
    ErrorBody,
    InferResponse,
    LiveBody,
    ModelMetadata,
    ProbeResponse,
    ReadyBody,
    parse,
)
from tests.support.contract import infer_body, metadata_body, with_field


def _metadata() -> dict[str, Any]:
    return metadata_body(split_ms={"_blocks.1": 7.0, "_blocks.5": None, "_blocks.9": 3.0})


def test_well_formed_answers_parse() -> None:
    meta = parse(ModelMetadata, _metadata())
    assert [p.name for p in meta.split_points] == ["_blocks.1", "_blocks.5", "_blocks.9"]
    assert meta.split_points[1].server_ms is None and meta.server_ms == 8.0
    answer = parse(InferResponse, infer_body())
    assert answer.top_k[0][0].label == "tabby" and answer.timings_ms.compute == 2.0
    assert parse(ProbeResponse, {"received_bytes": 10, "server_ms": 0}).server_ms == 0.0
    assert parse(ErrorBody, {"error": "queue full"}).error == "queue full"


BAD: dict[str, tuple[str, object, str]] = {
    # id: (dotted field, value or ... to delete, what the message must say)
    "missing-name": ("split_points.1.name", ..., "split_points.1.name: Field required"),
    "name-not-a-string": ("split_points.0.name", 3, "split_points.0.name: Input should be a "
                                                    "valid string"),
    "reserved-name": ("split_points.0.name", "cloud", "'cloud' is a candidate's name"),
    "duplicate": ("split_points.2.name", "_blocks.1", "'_blocks.1' is listed twice"),
    "ms-as-string": ("server_ms", "8.0", "server_ms: Input should be a valid number"),
    "ms-as-bool": ("queue_ms", True, "queue_ms: Input should be a valid number"),
    "ms-nan": ("split_points.0.server_ms", math.nan, "split_points.0.server_ms: Input should "
                                                     "be a finite number"),
    "ms-negative": ("server_ms", -1.0, "server_ms: Input should be greater than or equal to 0"),
    "no-fingerprint": ("fingerprint", ..., "fingerprint: Field required"),
    "points-not-a-list": ("split_points", {}, "split_points: Input should be a valid list"),
}


@pytest.mark.parametrize(("field", "value", "message"), BAD.values(), ids=BAD.keys())
def test_a_bad_metadata_field_is_one_service_error_naming_it(
    field: str, value: object, message: str
) -> None:
    with pytest.raises(ServiceError) as info:
        parse(ModelMetadata, with_field(_metadata(), field, value))
    assert str(info.value).startswith("service answer: ") and message in str(info.value)
    assert "\n" not in str(info.value)  # one line on the command line
    assert isinstance(info.value.__cause__, ValidationError)  # raised `from` pydantic's


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("timings_ms.decode", "fast", "timings_ms.decode: Input should be a valid number"),
        ("timings_ms.queue", -0.5, "timings_ms.queue: Input should be greater than or equal"),
        ("top_k", [], "top_k: List should have at least 1 item"),
        ("top_k.0.0.prob", None, "top_k.0.0.prob: Input should be a valid number"),
        ("batch_size", 0, "batch_size: Input should be greater than or equal to 1"),
    ],
    ids=["str-ms", "negative-ms", "no-rows", "null-prob", "zero-batch"],
)
def test_a_bad_inference_answer_names_the_field(field: str, value: object, message: str) -> None:
    with pytest.raises(ServiceError, match=message):
        parse(InferResponse, with_field(infer_body(), field, value))


@pytest.mark.parametrize("data", [[1, 2], "ok", None, 3], ids=["list", "string", "null", "int"])
def test_an_answer_that_is_not_an_object(data: object) -> None:
    with pytest.raises(ServiceError, match=r"^where: Input should be"):
        parse(ModelMetadata, data, source="where")


def test_several_errors_name_the_first_and_count_the_rest() -> None:
    with pytest.raises(ServiceError, match=r": name: Field required \(and 1 more\)$"):
        parse(ModelMetadata, with_field(with_field(_metadata(), "fingerprint", ...), "name", ...))


def test_health_bodies_carry_no_nulls() -> None:
    assert LiveBody(live=True).model_dump(exclude_none=True) == {"live": True}
    assert ReadyBody(ready=True).model_dump(exclude_none=True) == {"ready": True}


def test_candidate_names_are_defined_once() -> None:
    assert candidates.RESERVED == ("device", "cloud", "auto")
    assert candidates.WHOLE_MODEL == candidates.CLOUD  # the one name for the whole model


def test_the_service_publishes_the_shared_models() -> None:
    """Every body in the service's OpenAPI document is a model of shared.schemas."""
    doc = create_app(Settings(models=("efficientnet_lite0",))).openapi()
    published = doc["components"]["schemas"]
    assert set(published) <= set(schemas.__all__)
    for name, schema in published.items():
        own = getattr(schemas, name).model_json_schema()
        assert set(schema["properties"]) == set(own["properties"]), name
        assert schema.get("required") == own.get("required"), name
    answers = {path: content["application/json"]["schema"]
               for path, ops in doc["paths"].items() for method in ops
               if "application/json" in (content := ops[method]["responses"]["200"]["content"])}
    assert answers["/v2/models/{model}"] == {"$ref": "#/components/schemas/ModelMetadata"}
    assert answers["/v2/models/{model}/classify"] == {"$ref": "#/components/schemas/InferResponse"}
    assert answers["/v2/health/live"] == {"$ref": "#/components/schemas/LiveBody"}


def test_the_device_side_imports_no_web_framework() -> None:
    code = ("import sys, shared.schemas, shared.planner, device_client.cli; "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette', 'cloud_server') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr
