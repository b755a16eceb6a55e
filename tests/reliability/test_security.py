"""Security: nothing untrusted is unpickled, TLS works end to end with a private certificate,
API keys never reach the log, and error bodies never carry a stack trace."""

from __future__ import annotations

import ast
import asyncio
import pickle
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch
from PIL import Image

from cloud_server.app import create_app
from cloud_server.settings import Settings
from device_client.client import ServiceClient
from device_client.local_service import LocalService
from device_client.pipeline import Device
from device_client.runtime import DeviceRuntime
from shared.errors import ServiceUnavailableError, WeightsError
from shared.models import get_model, get_spec
from tests.helpers import make_frame

MODEL = "efficientnet_lite0"
REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("shared", "device_client", "cloud_server")
FAST_START = {"SPLITSERVE_PROFILE_REPEATS": "0"}


class _Payload:
    """Unpickling this creates ``marker`` (``Path.touch``): what a hostile checkpoint or frame
    would carry, with an effect the test can see. ``test_the_payload_is_live`` shows it works,
    so a service or loader that unpickled it would leave the marker behind."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[Path]]:
        return Path.touch, (self.marker,)


def _bodies(marker: Path) -> list[bytes]:
    return [pickle.dumps(_Payload(marker)), pickle.dumps({"t": [_Payload(marker)]}, protocol=2)]


def test_the_payload_is_live(tmp_path: Path) -> None:
    """Each body the refusal tests send does run code when unpickled: here, in this process."""
    marker = tmp_path / "pwned"
    for body in _bodies(marker):
        pickle.loads(body)  # the point: what the service must never do
        assert marker.exists(), "unpickling did not run the payload: the tests would prove nothing"
        marker.unlink()


# --- nothing untrusted is unpickled -------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["torch_save", "raw_pickle"])
def test_malicious_checkpoint_is_refused_and_never_runs(tmp_path: Path, fmt: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"state_dict": {"fc.weight": _Payload(marker)}}
    if fmt == "torch_save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(WeightsError, match="refused|cannot read"):
        get_model(MODEL, weights=path)
    assert not marker.exists(), "the checkpoint's code ran"


def test_pickled_frame_is_a_400_and_never_runs(
    live_service: LocalService, device_runtime: DeviceRuntime, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"  # the service runs on this machine: it could create it
    split = "_blocks.9"
    url = f"{live_service.url}/v2/models/{MODEL}/splits/{split}/infer"
    for body in _bodies(marker):
        r = httpx.post(url, content=body, headers={"Content-Type": "application/msgpack"})
        assert r.status_code == 400, r.text
        assert r.headers["content-type"].startswith("application/json")
        assert set(r.json()) == {"error"} and r.json()["error"], r.text
    time.sleep(0.2)
    assert not marker.exists(), "the frame's code ran"
    good = make_frame(device_runtime, split)
    r = httpx.post(url, content=good, headers={"Content-Type": "application/msgpack"})
    assert r.status_code == 200


def _sources() -> Iterator[tuple[Path, ast.Module]]:
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            yield path, ast.parse(path.read_text(), filename=str(path))


def test_every_torch_load_is_weights_only() -> None:
    calls = 0
    for path, tree in _sources():
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
            ):
                calls += 1
                flags = {k.arg: k.value for k in node.keywords}
                value = flags.get("weights_only")
                assert isinstance(value, ast.Constant) and value.value is True, (
                    f"{path.relative_to(REPO)}:{node.lineno}: torch.load without weights_only=True"
                )
    assert calls >= 1  # the checkpoint loader itself: the scan found what it looks for


UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal",
                  "shelve", "jsonpickle"}  # fmt: skip


def test_no_unpickling_anywhere() -> None:
    """No deserializer that can name code is imported, with one exception: the checkpoint
    loader imports ``pickle`` only to catch ``pickle.UnpicklingError``, which is what
    ``torch.load(weights_only=True)`` raises for a file that names code. Any other use of
    ``pickle`` (load, loads, Unpickler, ...) fails this test."""
    for path, tree in _sources():
        where = path.relative_to(REPO)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in UNSAFE_MODULES:
                names = {a.name for a in node.names}
                assert names <= {"UnpicklingError"}, f"{where}:{node.lineno}: from {node.module}"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in UNSAFE_MODULES - {"pickle"}:
                        raise AssertionError(f"{where}:{node.lineno}: import {alias.name}")
                    if alias.name == "pickle":  # renamed, the attribute check below is blind
                        assert alias.asname is None, f"{where}:{node.lineno}: import pickle as"
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in UNSAFE_MODULES
            ):
                assert node.attr == "UnpicklingError", f"{where}:{node.lineno}: pickle.{node.attr}"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in ("eval", "exec"), f"{where}:{node.lineno}"


# --- TLS ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (the ``cryptography`` package is not a
    dependency; the ``openssl`` binary makes one)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl binary to make a certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1",
         "-addext", "basicConstraints=critical,CA:TRUE"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def tls_service(certificate: tuple[Path, Path]) -> Iterator[LocalService]:
    cert, key = certificate
    args = ["--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
    with LocalService(models=[MODEL], env=FAST_START, extra_args=args, scheme="https") as svc:
        yield svc


@pytest.mark.slow
def test_device_over_https_with_a_private_certificate(
    tls_service: LocalService,
    certificate: tuple[Path, Path],
    device_runtime: DeviceRuntime,
    photos: dict[str, Image.Image],
    local_top1: dict[str, int],
) -> None:
    assert tls_service.url.startswith("https://")
    verify = ssl.create_default_context(cafile=str(certificate[0]))

    async def run() -> object:
        async with ServiceClient(tls_service.url, verify=verify) as client:
            device = Device(device_runtime, client, fallback=False)
            return await device.infer(photos["coffee"], split="_blocks.9", name="coffee")

    result = asyncio.run(run())
    assert result.ran == "split"  # type: ignore[attr-defined]
    assert result.top5[0].index == local_top1["coffee"]  # type: ignore[attr-defined]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "device_client", "infer", "--runtime", "torch", *args, "--json"],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip


@pytest.mark.slow
def test_cli_over_https_and_clean_failures(
    tls_service: LocalService,
    certificate: tuple[Path, Path],
    photos: dict[str, Image.Image],
    local_top1: dict[str, int],
    tmp_path: Path,
) -> None:
    image = tmp_path / "coffee.jpg"
    photos["coffee"].save(image, quality=95)
    base = [str(image), "--split", "_blocks.9", "--no-fallback", "--timeout", "10"]
    ok = _cli(*base, "--server", tls_service.url, "--ca-cert", str(certificate[0]))
    assert ok.returncode == 0, ok.stderr
    assert '"ran": "split"' in ok.stdout and str(local_top1["coffee"]) in ok.stdout
    plain = tls_service.url.replace("https://", "http://")
    for failing in (
        [*base, "--server", plain],  # plain HTTP to the TLS port
        [*base, "--server", tls_service.url],  # a certificate nobody vouches for
        [*base, "--server", tls_service.url, "--ca-cert", str(tmp_path / "missing.pem")],
    ):
        bad = _cli(*failing)
        assert bad.returncode == 1, (failing, bad.stdout, bad.stderr)
        assert bad.stderr.startswith("device_client: error: ") and bad.stderr.count("\n") == 1
        assert "Traceback" not in bad.stderr and not bad.stdout
    assert httpx.get(f"{tls_service.url}/v2/health/ready", verify=False).status_code == 200


def test_plain_http_to_the_tls_port_fails_cleanly_in_the_library(
    tls_service: LocalService, device_runtime: DeviceRuntime, photos: dict[str, Image.Image]
) -> None:
    async def run() -> object:
        plain = tls_service.url.replace("https://", "http://")
        async with ServiceClient(plain, timeout_s=5) as client:
            return await Device(device_runtime, client, fallback=False).infer(
                photos["coffee"], split="_blocks.9"
            )

    with pytest.raises(ServiceUnavailableError):
        asyncio.run(run())


# --- keys never logged, errors never echo a stack trace -----------------------------------------


@pytest.mark.slow
def test_api_keys_never_logged_even_at_debug(
    photos: dict[str, Image.Image], tmp_path: Path
) -> None:
    keys = ("k3y-one-s3cret", "k3y-two-s3cret")
    env = {**FAST_START, "SPLITSERVE_API_KEYS": ",".join(keys), "SPLITSERVE_LOG_LEVEL": "debug"}
    image = tmp_path / "coffee.jpg"
    photos["coffee"].save(image, quality=95)
    with LocalService(models=[MODEL], env=env) as service:
        for key in (*keys, "wr0ng-k3y-guess"):
            httpx.get(
                f"{service.url}/v2/models/{MODEL}", headers={"Authorization": f"Bearer {key}"}
            )
        httpx.get(f"{service.url}/v2/models/{MODEL}", headers={"Authorization": keys[0]})  # 401
        run = _cli(str(image), "--server", service.url, "--split", "12", "--api-key", keys[1])
        assert run.returncode == 0, run.stderr
        log = service.log_path.read_text()
    # Debug logging really was on: the service logs its settings (keys masked) at debug.
    assert "DEBUG cloud_server: settings: Settings(" in log and "GET /v2/models" in log
    for secret in (*keys, "wr0ng-k3y-guess"):
        assert secret not in log


class _ExplodingRuntime:
    """Quacks like a ModelRuntime for one request, then fails as a bug would, with internals
    in its message."""

    SECRET = 'RuntimeError: boom at File "/srv/splitserve/secret.py", line 42'

    def __init__(self) -> None:
        self.name = MODEL
        self.spec = get_spec(MODEL)
        self.fingerprint = "0" * 32
        self.labels = tuple(str(i) for i in range(1000))

    def point(self, key: str) -> SimpleNamespace:
        return SimpleNamespace(name=key, tensors=())

    def decode_frame(self, *args: object, **kwargs: object) -> object:
        raise RuntimeError(self.SECRET)

    def decode_image(self, body: bytes) -> object:
        raise RuntimeError(self.SECRET)

    def run(self, key: str, inputs: object) -> object:
        raise RuntimeError(self.SECRET)


def test_internal_errors_answer_a_bare_500(caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(
        Settings(models=(MODEL,), profile_repeats=0),
        loader=lambda name, weights: _ExplodingRuntime(),  # type: ignore[arg-type,return-value]
    )
    oip = {"inputs": [{"name": "x", "shape": [1, 3, 224, 224], "datatype": "FP32",
                       "data": [0.0] * (3 * 224 * 224)}]}  # fmt: skip

    async def scenario() -> list[httpx.Response]:
        async with app.router.lifespan_context(app):
            assert await asyncio.to_thread(app.state.service.wait_ready, 30)
            # Starlette answers the 500, then re-raises for the server to log; don't re-raise.
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                answers = [
                    await client.post(f"/v2/models/{MODEL}/splits/_blocks.9/infer", content=b"x",
                                      headers={"Content-Type": "application/msgpack"}),
                    await client.post(f"/v2/models/{MODEL}/classify", content=b"x",
                                      headers={"Content-Type": "image/jpeg"}),
                    await client.post(f"/v2/models/{MODEL}/infer", json=oip),
                ]  # fmt: skip
                assert (await client.get("/v2/health/ready")).status_code == 200
                return answers

    for r in asyncio.run(scenario()):
        assert r.status_code == 500
        assert r.headers["content-type"] == "application/json"
        assert r.json() == {"error": "internal error"}
        assert "secret" not in r.text and "Traceback" not in r.text
    # ...while the log keeps the whole story for the operator.
    assert "secret.py" in caplog.text
