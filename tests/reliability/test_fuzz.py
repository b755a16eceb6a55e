"""Fuzz the live service (real uvicorn on loopback) and hold every answer to the promise: no 5xx,
no dropped connection, every error body exactly ``{"error": str}`` with no traceback, and the
service ready and right afterwards. CI-sized; ``python -m bench reliability`` runs thousands
(``tests.support.sizes``) and tabulates the figures each test records."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import asdict

import httpx
import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image

from cloud_server.app import create_app
from cloud_server.settings import Settings
from device_client.local_service import LocalService
from device_client.runtime import DeviceRuntime
from shared.preprocess import center_crop, encode_jpeg
from tests.helpers import make_frame
from tests.support import figures, sizes
from tests.support.bodies import image_cases, oip_cases, oip_documents, raw_http_cases
from tests.support.fuzz import (
    MSGPACK_TYPE,
    FuzzReport,
    bad_neighbours,
    fuzz_raw_http,
    send_all,
    send_schema_case,
    still_serving,
)
from tests.support.mutate import HttpCase, extreme_frame, frame_cases, short

MODEL = "efficientnet_lite0"
SPLITS = ("_conv_stem", "_blocks.9", "flatten")  # first, middle, last but one
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def service() -> Iterator[LocalService]:
    """Our own service: fuzzing must not risk the session's shared one. A 20 ms queue delay
    lets concurrent requests share forward passes."""
    env = {"SPLITSERVE_PROFILE_REPEATS": "0", "SPLITSERVE_MAX_QUEUE_DELAY_MS": "20"}
    with LocalService(models=[MODEL], env=env) as svc:
        yield svc


@pytest.fixture(scope="module")
def frames(device_runtime: DeviceRuntime) -> dict[str, bytes]:
    return {split: make_frame(device_runtime, split) for split in SPLITS}


@pytest.fixture(scope="module")
def expected(service: LocalService, frames: dict[str, bytes]) -> int:
    """Top-1 of the untouched middle frame, as this service answered it before any fuzzing."""
    r = httpx.post(
        f"{service.url}/v2/models/{MODEL}/splits/{SPLITS[1]}/infer",
        content=frames[SPLITS[1]],
        headers={"Content-Type": "application/msgpack"},
    )
    assert r.status_code == 200, r.text
    top1: int = r.json()["top_k"][0][0]["index"]
    return top1


def _assert_kept(
    source: str,
    report: FuzzReport,
    service: LocalService,
    frames: dict[str, bytes],
    expected: int,
) -> None:
    """Record the run's figures, then hold it to the promise: no problem answer, the service
    alive, ready and right, and no unexpected error in its log."""
    alive = service.process is not None and service.process.poll() is None
    with httpx.Client(base_url=service.url, timeout=60) as http:
        path = f"/v2/models/{MODEL}/splits/{SPLITS[1]}/infer"
        serving = still_serving(http, path, frames[SPLITS[1]], expected) if alive else "dead"
    unexpected = service.log_path.read_text(errors="replace").count("failed unexpectedly")
    doc = report.to_json()
    for problem in doc.pop("problem_examples"):
        figures.record("fuzz_problems", source, **problem)
    statuses = {f"status_{code}": n for code, n in doc.pop("statuses").items()}
    figures.record(
        "fuzz",
        source,
        alive_after=alive,
        serving_after=serving or "ready and right",
        unexpected_errors_logged=unexpected,
        **sizes.flat(doc),
        **statuses,
    )
    assert report.problem_count == 0, report.summary()
    assert report.server_errors == 0
    assert alive, service.log_tail()
    assert serving is None, serving
    assert unexpected == 0, service.log_tail()


@pytest.fixture(scope="module")
def schema_report() -> FuzzReport:
    """Every schemathesis answer of the module, for ``test_schemathesis_kept_the_promise``."""
    return FuzzReport()


# The service's own OpenAPI document, built from its app without serving it: the cases are
# generated at collection and sent to the live service. The frame body is binary like
# application/octet-stream; schemathesis needs telling.
schemathesis.serializer.alias(MSGPACK_TYPE, "application/octet-stream")
api = schemathesis.openapi.from_dict(create_app(Settings(models=(MODEL,))).openapi())
api.config.generation.update(modes=list(schemathesis.GenerationMode))  # positive and negative
#: Path parameters as generated (mostly 404s), then pinned to the real model and split points,
#: so that cases reach past the lookups into the handlers.
PINNINGS = [{}, {"model": MODEL}, *({"model": MODEL, "split": s} for s in SPLITS)]


@api.parametrize()
@api.given(pin=st.sampled_from(PINNINGS))
@settings(
    max_examples=sizes.pick(40, 300),
    database=None,
    deadline=None,
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=list(HealthCheck),
)
@hypothesis.seed(sizes.seed())
def test_schemathesis_every_endpoint(
    case: schemathesis.Case, pin: dict[str, str], service: LocalService, schema_report: FuzzReport
) -> None:
    """One test per operation of the schema; the answers are judged together below."""
    names = {p.name for p in case.operation.path_parameters}
    pinned = {k: v for k, v in pin.items() if k in names}
    if pinned:
        case.path_parameters = {**(case.path_parameters or {}), **pinned}
    send_schema_case(service.url, schema_report, case)


def test_schemathesis_kept_the_promise(
    service: LocalService, frames: dict[str, bytes], expected: int, schema_report: FuzzReport
) -> None:
    """The verdict on every answer ``test_schemathesis_every_endpoint`` got (it runs first, in
    file order): every operation reached, with and without real path parameters."""
    _assert_kept("schema", schema_report, service, frames, expected)
    assert schema_report.tried["schema"] >= 200, schema_report.summary()
    assert {404, 400, 200} <= set(schema_report.statuses), schema_report.summary()


def test_mutated_real_frames(
    service: LocalService, frames: dict[str, bytes], expected: int
) -> None:
    report = FuzzReport()
    n = sizes.pick(300, 3000)
    with httpx.Client(base_url=service.url, timeout=120) as http:
        send_all(http, report, "frames", frame_cases(frames, model=MODEL, n=n, seed=sizes.seed()))
    _assert_kept("frames", report, service, frames, expected)
    assert report.tried["frames"] >= n + 3 * 25
    assert report.statuses[400] > 200 and report.statuses[409] > 0, report.summary()


def test_broken_and_bomb_images(
    service: LocalService,
    frames: dict[str, bytes],
    expected: int,
    photos: dict[str, Image.Image],
    device_runtime: DeviceRuntime,
) -> None:
    encoded = {}
    for name in ("coffee", "rocket"):
        crop = center_crop(photos[name], device_runtime.spec.preprocessing)
        encoded[f"{name}.jpg"] = encode_jpeg(crop)
        png = io.BytesIO()
        crop.save(png, format="PNG")
        encoded[f"{name}.png"] = png.getvalue()
    report = FuzzReport()
    with httpx.Client(base_url=service.url, timeout=120) as http:
        cases = image_cases(encoded, model=MODEL, n=sizes.pick(60, 500), seed=sizes.seed())
        send_all(http, report, "images", cases)
    _assert_kept("images", report, service, frames, expected)


def test_broken_oip_json(service: LocalService, frames: dict[str, bytes], expected: int) -> None:
    report = FuzzReport()
    with httpx.Client(base_url=service.url, timeout=120) as http:
        cases = oip_cases(model=MODEL, n=sizes.pick(60, 500), seed=sizes.seed())
        send_all(http, report, "oip", cases)
    _assert_kept("oip", report, service, frames, expected)


@pytest.fixture(scope="module")
def oip_report() -> FuzzReport:
    return FuzzReport()


@given(doc=oip_documents)
@settings(
    max_examples=sizes.pick(100, 800),
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
@hypothesis.seed(sizes.seed())
def test_generated_oip_documents(
    doc: object, service: LocalService, oip_report: FuzzReport
) -> None:
    """Documents drawn from a hypothesis strategy; judged with the rest in the next test."""
    body = json.dumps(doc, allow_nan=False).encode()
    case = HttpCase(f"oip document {short(doc)}", f"/v2/models/{MODEL}/infer", body,
                    {"Content-Type": "application/json"})  # fmt: skip
    with httpx.Client(base_url=service.url, timeout=120) as http:
        send_all(http, oip_report, "oip-generated", [case])


def test_generated_oip_documents_kept_the_promise(
    service: LocalService, frames: dict[str, bytes], expected: int, oip_report: FuzzReport
) -> None:
    """The verdict on ``test_generated_oip_documents`` (it runs first, in file order)."""
    _assert_kept("oip-generated", oip_report, service, frames, expected)
    assert oip_report.tried["oip-generated"] >= sizes.pick(100, 800) // 2, oip_report.summary()
    assert oip_report.statuses[400] > 0, oip_report.summary()


def test_malformed_http(service: LocalService, frames: dict[str, bytes], expected: int) -> None:
    report = FuzzReport()
    fuzz_raw_http(service.url, report, raw_http_cases(model=MODEL, split=SPLITS[1]))
    _assert_kept("http", report, service, frames, expected)


def test_hostile_neighbours_in_a_batch_do_not_harm_good_requests(
    service: LocalService, frames: dict[str, bytes], expected: int, device_runtime: DeviceRuntime
) -> None:
    """Frames whose legal-but-absurd values drive the tail to inf/NaN, stacked into the same
    forward pass as good ones: the hostile ones get 400, the good ones their right answer."""
    split = SPLITS[-1]
    good = frames[split]
    path = f"/v2/models/{MODEL}/splits/{split}/infer"
    right = httpx.post(
        f"{service.url}{path}", content=good, headers={"Content-Type": "application/msgpack"}
    ).json()["top_k"][0][0]["index"]
    hostile = [extreme_frame(good), extreme_frame(good, negative=True)]
    result = bad_neighbours(service.url, path, good, right, hostile, rounds=sizes.pick(10, 50))
    figures.record("fuzz_neighbours", "neighbours", ok=result.ok, **asdict(result))
    assert result.ok, result
    assert result.shared > 0, "no good request shared a forward pass: the test proved nothing"
    _assert_kept("neighbours", FuzzReport(), service, frames, expected)
