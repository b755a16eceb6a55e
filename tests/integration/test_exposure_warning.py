"""The service warns at start-up, in one log line, when it listens beyond loopback with no API
key: the compose file's default, easy on purpose, must not be silently open."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from pydantic import SecretStr

from cloud_server.__main__ import exposed_without_keys
from cloud_server.settings import Settings
from device_client.local_service import LocalService, free_port

WARNING = "with no API key"


@pytest.mark.parametrize(
    ("host", "exposed"),
    [("127.0.0.1", False), ("127.8.9.10", False), ("::1", False), ("[::1]", False),
     ("localhost", False), ("LOCALHOST", False), ("0.0.0.0", True), ("::", True),
     ("10.0.0.5", True), ("service.example", True)],
)
def test_exposed_without_keys(host: str, exposed: bool) -> None:
    assert exposed_without_keys(Settings(host=host)) is exposed
    assert not exposed_without_keys(Settings(host=host, api_keys=(SecretStr("k"),)))


def _start_up_log(host: str, keys: str) -> list[str]:
    """What ``python -m cloud_server`` logs until uvicorn says it is running; then stop it."""
    env = {**os.environ, "SPLITSERVE_API_KEYS": keys, "SPLITSERVE_PROFILE_REPEATS": "0",
           "SPLITSERVE_MODELS": "efficientnet_lite0"}
    process = subprocess.Popen(
        [sys.executable, "-m", "cloud_server", "--host", host, "--port", str(free_port())],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        stdin=subprocess.DEVNULL)
    lines: list[str] = []
    try:
        assert process.stdout is not None
        for line in process.stdout:  # pytest-timeout ends a start that never comes
            lines.append(line.rstrip())
            if "Uvicorn running on" in line:
                break
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
    assert any("Uvicorn running on" in line for line in lines), lines
    return lines


def test_listening_on_every_interface_without_keys_warns_once() -> None:
    # Bound to 0.0.0.0 for a moment; nothing connects to it, and no traffic leaves loopback.
    warnings = [line for line in _start_up_log("0.0.0.0", "") if WARNING in line]
    assert len(warnings) == 1, warnings
    assert "WARNING cloud_server: listening on 0.0.0.0" in warnings[0]
    assert "SPLITSERVE_API_KEYS" in warnings[0]


def test_no_warning_with_keys() -> None:
    assert not [line for line in _start_up_log("0.0.0.0", "secret") if WARNING in line]


def test_no_warning_on_loopback(live_service: LocalService) -> None:
    assert WARNING not in live_service.log_path.read_text()
