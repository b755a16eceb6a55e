"""Start the real cloud service as a subprocess on loopback, for the demo and the benchmarks.

It runs exactly ``python -m cloud_server --host 127.0.0.1 --port P``, the container's command.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

import httpx

from shared.errors import ConfigError

__all__ = ["LocalService", "free_port"]


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class LocalService:
    """``with LocalService(models=["efficientnet_lite0"]) as svc: ... svc.url ...``"""

    def __init__(self, *, models: Sequence[str] = ("efficientnet_lite0",),
                 env: Mapping[str, str] | None = None, port: int | None = None,
                 ready_timeout_s: float = 300.0, extra_args: Sequence[str] = (),
                 command_prefix: Sequence[str] = (), scheme: str = "http") -> None:
        self.port = port or free_port()
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self._env = {**os.environ, "SPLITSERVE_MODELS": ",".join(models), **(env or {})}
        self._args = [*command_prefix, sys.executable, "-m", "cloud_server", "--host",
                      "127.0.0.1", "--port", str(self.port), *extra_args]
        self._ready_timeout_s = ready_timeout_s
        self._log = tempfile.NamedTemporaryFile(prefix="splitserve-", suffix=".log", delete=False)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return Path(self._log.name)

    def start(self) -> LocalService:
        # Looked up, not imported: the device side never imports the service (it runs it).
        if importlib.util.find_spec("cloud_server") is None:
            raise ConfigError("the cloud service is not installed: "
                              "pip install 'splitserve[cloud]'")
        self.process = subprocess.Popen(self._args, env=self._env, stdout=self._log,
                                        stderr=subprocess.STDOUT)
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self._ready_timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ConfigError(f"the service exited with code {self.process.returncode}: "
                                  f"{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=2.0,
                             verify=False).status_code == 200:  # noqa: S501 (loopback only)
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise ConfigError(f"the service was not ready within {self._ready_timeout_s:.0f} s: "
                          f"{self.log_tail()}")

    def log_tail(self, lines: int = 5) -> str:
        text = self.log_path.read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:]) or "(no output)"

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM (graceful: requests in flight finish), then SIGKILL after ``timeout_s``."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL: the service dies mid-request, as in a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log.close()

    def __enter__(self) -> LocalService:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
        self.log_path.unlink(missing_ok=True)
