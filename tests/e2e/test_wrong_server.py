"""The command line against a wrong or broken server, a dead one and a bad URL, as a new user
meets them: one line that says what is wrong, the right exit code, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from PIL import Image

from device_client.local_service import LocalService, free_port
from device_client.runtime import DeviceRuntime
from tests.support.contract import infer_body, metadata_body, with_field
from tests.support.fake_service import JsonService

MODEL = "efficientnet_lite0"


@pytest.fixture(scope="module")
def photo(photos: dict[str, Image.Image], tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("photo") / "coffee.jpg"
    photos["coffee"].save(path, quality=95)
    return str(path)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # The torch device: these fake services hand out no bundle for the ONNX device to fetch.
    if args and args[0] in ("infer", "profile", "plan") and "--runtime" not in args:
        args = (args[0], "--runtime", "torch", *args[1:])
    return subprocess.run([sys.executable, "-m", "device_client", *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})},
                          stdin=subprocess.DEVNULL)


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr and 'File "' not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("device_client: error: "), stderr
    return lines[0]


@contextmanager
def _fake(metadata: dict[str, Any], infer: dict[str, Any]) -> Iterator[JsonService]:
    def answer(method: str, path: str) -> tuple[int, object]:
        if method == "GET" and path == f"/v2/models/{MODEL}":
            return 200, metadata
        if path.endswith("/probe"):
            return 200, {"received_bytes": 0, "server_ms": 0.0}
        if path.endswith(("/classify", "/infer")):
            return 200, infer
        return 404, {"error": f"no route {path}"}

    with JsonService(answer) as fake:
        yield fake


WRONG = {
    # id: (--split, where the answer is wrong, field, value (... deletes), message)
    "metadata-missing-name": ("_blocks.9", "metadata", "split_points.3.name", ...,
                              "split_points.3.name: Field required"),
    "metadata-wrong-type-auto": ("auto", "metadata", "queue_ms", "0.5",
                                 "queue_ms: Input should be a valid number"),
    "answer-wrong-type": ("cloud", "infer", "timings_ms.decode", "fast",
                          "timings_ms.decode: Input should be a valid number"),
    "answer-missing-field": ("_blocks.9", "infer", "top_k", ...,
                             "top_k: Field required"),
}


@pytest.mark.parametrize(("split", "body", "field", "value", "message"), WRONG.values(),
                         ids=WRONG.keys())
def test_a_wrong_field_is_one_line_naming_it_and_exit_1(
    photo: str, device_runtime: DeviceRuntime, split: str, body: str, field: str, value: object,
    message: str
) -> None:
    """With fallback on (the default): a wrong server is not a down one, so the device does not
    quietly run on its own; it says which field was wrong."""
    names = {p.name: 5.0 for p in device_runtime.points}
    metadata = metadata_body(model=MODEL, fingerprint=device_runtime.fingerprint, split_ms=names)
    infer = infer_body(model=MODEL, split=split)
    with_field(metadata if body == "metadata" else infer, field, value)
    with _fake(metadata, infer) as fake:
        result = cli("infer", photo, "--server", fake.url, "--split", split, "--json")
        assert result.returncode == 1, result.stdout + result.stderr
        line = _one_error_line(result.stderr)
        assert f"service answer from {fake.url}: {message}" in line, line
        assert result.stdout == ""  # no result printed for a failed image


def test_auto_against_a_dead_server_says_it_was_never_reached(photo: str) -> None:
    """`--split auto` still answers on the device, and says why, as a fixed split does."""
    server = f"http://127.0.0.1:{free_port()}"
    doc = json.loads(cli("infer", photo, "--server", server, "--split", "auto", "--json").stdout)
    assert doc["split"] == "device" and doc["ran"] == "device" and doc["requested"] == "auto"
    assert doc["fallback"].startswith("connection: cannot reach " + server), doc
    human = cli("infer", photo, "--server", server, "--split", "auto")
    assert human.returncode == 0, human.stderr
    header = human.stdout.splitlines()[0]
    assert "ran=device (fell back: connection: cannot reach" in header, header
    refused = cli("infer", photo, "--server", server, "--split", "auto", "--no-fallback")
    assert refused.returncode == 1 and "cannot reach" in _one_error_line(refused.stderr)


@pytest.mark.parametrize("url", ["127.0.0.1:8000", "localhost", "ftp://host", "http://h:port"])
def test_a_url_without_a_scheme_is_a_usage_error(photo: str, url: str) -> None:
    result = cli("infer", photo, "--split", "device", "--server", url)
    assert result.returncode == 2, result.stderr
    assert "argument --server: " in _one_error_line(result.stderr)


def _first_cells(table: str, column: int) -> set[str]:
    return {line.split("│")[column].strip() for line in table.splitlines()
            if line.startswith("│")}


def test_tables_piped_print_whole_values(
    live_service: LocalService, device_runtime: DeviceRuntime
) -> None:
    """Piped (stdout is not a terminal here) at 80 columns, no value is cut to `_bloc…`."""
    candidates = {"device", "cloud", *(p.name for p in device_runtime.points)}
    env = {"COLUMNS": "80"}
    profile = cli("profile", "--model", MODEL, env=env)
    assert profile.returncode == 0, profile.stderr
    assert "…" not in profile.stdout
    assert _first_cells(profile.stdout, 1) == candidates
    title = profile.stdout.splitlines()[0]
    assert title.strip().endswith(".json)"), title  # the cache path, whole on one line
    plan = cli("plan", "--model", MODEL, "--server", live_service.url, "--bandwidth-mbps", "1",
               "--rtt-ms", "50", env=env)
    assert plan.returncode == 0, plan.stderr
    assert "…" not in plan.stdout
    assert _first_cells(plan.stdout, 2) == candidates
