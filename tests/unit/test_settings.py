"""Service settings: the environment, the fixed operator names, CLI overrides, clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from cloud_server.__main__ import _parse, load_settings
from cloud_server.settings import Settings
from shared.errors import SplitServeError


def test_fixed_operator_names_are_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in {
        "SPLITSERVE_API_KEYS": "key-aa, key-bb ,key-cc",
        "SPLITSERVE_MAX_BATCH_SIZE": "32",
        "SPLITSERVE_MAX_QUEUE_DELAY_MS": "7.5",
        "SPLITSERVE_MAX_QUEUE": "9",
        "SPLITSERVE_MAX_BODY_BYTES": "2048",
        "SPLITSERVE_MODELS": "resnet18,mobilenet_v2=/w.pth",
    }.items():
        monkeypatch.setenv(name, value)
    s = Settings()
    assert [k.get_secret_value() for k in s.api_keys] == ["key-aa", "key-bb", "key-cc"]
    assert (s.max_batch_size, s.max_queue_delay_ms, s.max_queue, s.max_body_bytes) == (
        32,
        7.5,
        9,
        2048,
    )
    assert s.model_weights() == {"resnet18": None, "mobilenet_v2": "/w.pth"}
    assert "key-aa" not in repr(s)  # keys are secrets: never in a repr or a log line


def test_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPLITSERVE_PORT", "9000")
    s = load_settings(_parse(["--port", "9100", "--host", "0.0.0.0"]))
    assert (s.host, s.port) == ("0.0.0.0", 9100)


@pytest.mark.parametrize(
    ("env", "args", "message"),
    [
        ({"SPLITSERVE_MAX_BATCH_SIZE": "0"}, [], "max_batch_size"),
        ({}, ["--port", "70000"], "port"),
        ({}, ["--models", "alexnet"], "no model named 'alexnet'"),
        ({}, ["--models", "resnet18=/nonexistent.pth"], "not found"),
        ({"SPLITSERVE_SSL_CERTFILE": "/c.pem"}, [], "go together"),
        ({"SPLITSERVE_BACKEND": "tensorrt"}, [], "unknown backend 'tensorrt'"),
    ],
    ids=["batch", "port", "model", "weights", "ssl", "backend"],
)
def test_bad_settings_are_one_clear_error(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], args: list[str], message: str
) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SplitServeError, match=message):
        load_settings(_parse(args))


def test_service_cli_error_is_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cloud_server", "--models", "alexnet"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("cloud_server: error:")
    assert "Traceback" not in result.stderr and result.stderr.strip().count("\n") == 0


@pytest.mark.parametrize(
    ("env", "args"),
    [({"SPLITSERVE_BACKEND": "tensorrt"}, []), ({}, ["--backend", "tensorrt"])],
    ids=["env", "flag"],
)
def test_unknown_backend_is_one_line_and_exit_2(env: dict[str, str], args: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cloud_server", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )
    assert result.returncode == 2
    line = result.stderr.strip()
    assert line.startswith("cloud_server: error:") and "backend" in line and "tensorrt" in line
    assert "Traceback" not in line and line.count("\n") == 0


def test_backend_and_bundle_dir_from_environment_and_flags(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("SPLITSERVE_BACKEND", raising=False)
    monkeypatch.delenv("SPLITSERVE_BUNDLE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    from cloud_server import settings as settings_module
    from cloud_server.backend import BACKENDS

    assert settings_module._BACKENDS == BACKENDS
    default = Settings()
    assert default.backend == "onnxruntime"
    assert default.bundle_root() == tmp_path / "xdg" / "splitserve" / "bundles"
    monkeypatch.setenv("SPLITSERVE_BACKEND", "torch")
    monkeypatch.setenv("SPLITSERVE_BUNDLE_DIR", str(tmp_path / "b"))
    s = Settings()
    assert (s.backend, s.bundle_root()) == ("torch", tmp_path / "b")
    flags = load_settings(_parse(["--backend", "onnxruntime", "--bundle-dir", str(tmp_path)]))
    assert (flags.backend, flags.bundle_root()) == ("onnxruntime", tmp_path)


def test_bundle_int8_from_environment_and_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPLITSERVE_BUNDLE_INT8", raising=False)
    assert load_settings(_parse([])).bundle_int8 is False
    assert load_settings(_parse(["--bundle-int8"])).bundle_int8 is True
    monkeypatch.setenv("SPLITSERVE_BUNDLE_INT8", "1")
    assert load_settings(_parse([])).bundle_int8 is True


def test_threads_follow_the_cgroup_cpu_quota() -> None:
    """In a cgroup capped at half a CPU, the service would start one torch thread, not one per
    core it can see."""
    group = Path("/sys/fs/cgroup/cpu") / f"splitserve-test-{uuid.uuid4().hex[:8]}"
    try:
        group.mkdir()
        (group / "cpu.cfs_quota_us").write_text("50000")
    except OSError as exc:
        pytest.skip(f"cannot create a cgroup v1 cpu group here: {exc}")
    try:
        code = (
            "import os, sys; open(sys.argv[1], 'w').write(str(os.getpid())); "
            "from cloud_server.settings import Settings; print(Settings().torch_threads())"
        )
        env = {k: v for k, v in os.environ.items() if k != "SPLITSERVE_THREADS"}
        result = subprocess.run(
            [
                "sh",
                "-c",
                f'echo $$ > {group}/cgroup.procs && exec "$0" -c "$1" /dev/null',
                sys.executable,
                code,
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "1"
    finally:
        group.rmdir()
