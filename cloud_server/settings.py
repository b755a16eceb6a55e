"""Service settings, read from ``SPLITSERVE_*`` environment variables (and CLI flags).

Five names are fixed because operators script against them: ``SPLITSERVE_API_KEYS``,
``SPLITSERVE_MAX_BATCH_SIZE``, ``SPLITSERVE_MAX_QUEUE_DELAY_MS``, ``SPLITSERVE_MAX_QUEUE`` and
``SPLITSERVE_MAX_BODY_BYTES``. The README has the full table.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from cloud_server.bundles import default_root
from shared.cpu import cpu_limit

__all__ = ["Settings", "get_settings"]

_BACKENDS = ("onnxruntime", "torch")  # cloud_server.backend.BACKENDS (which imports torch)


class Settings(BaseSettings):
    """Everything an operator can set: keywords in tests, the environment in production."""

    model_config = SettingsConfigDict(env_prefix="SPLITSERVE_", frozen=True, extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # "name" or "name=/path/to/checkpoint.pth", comma-separated in the environment.
    models: Annotated[tuple[str, ...], NoDecode] = ("efficientnet_lite0",)
    api_keys: Annotated[tuple[SecretStr, ...], NoDecode] = ()
    max_batch_size: int = Field(16, ge=1, le=1024)
    max_queue_delay_ms: float = Field(2.0, ge=0, le=10_000)
    max_queue: int = Field(256, ge=1, le=1_000_000)
    max_body_bytes: int = Field(16 * 2**20, ge=1024)
    max_request_batch: int = Field(16, ge=1, le=1024)  # samples in one frame
    request_timeout_s: float = Field(30.0, gt=0)
    threads: int = Field(0, ge=0, le=256)  # 0: follow the CPU limit (cgroup quota, affinity)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    profile_repeats: int = Field(5, ge=0, le=1000)  # start-up timing runs per split point; 0 = skip
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    graceful_shutdown_s: float = Field(30.0, ge=0)
    # Connections held at once; lowered at start-up to fit the open-file limit (see server.py).
    max_connections: int = Field(1000, ge=1, le=1_000_000)
    backlog: int = Field(2048, ge=16, le=65535)  # the kernel's queue of connections to accept
    header_timeout_s: float = Field(10.0, gt=0, le=3600)  # accept -> complete request head
    keep_alive_s: float = Field(5.0, ge=1, le=3600)  # idle between requests on one connection
    max_header_bytes: int = Field(16 * 2**10, ge=1024, le=2**20)  # an incomplete request head
    # Decoded size of one /classify image (width x height x bands x bytes per band) ...
    max_image_bytes: int = Field(96 * 2**20, ge=2**20)
    # ... and of every image being decoded at once: a burst waits instead of piling up.
    image_memory_budget_bytes: int = Field(384 * 2**20, ge=2**20)
    # Free heap goes back to the OS once the service has been idle this long (0: never).
    trim_idle_s: float = Field(1.0, ge=0, le=3600)
    # What runs tails and the whole model: ONNX Runtime on the service's own exported bundle, or
    # torch eager on the fx partition. Default: the faster in ``python -m bench service``.
    backend: Literal["onnxruntime", "torch"] = "onnxruntime"
    # Root of the service's bundle cache, one <model>-<fingerprint>/ each ("": the user cache).
    bundle_dir: str = ""
    # Also export and hand out int8 heads and whole model (calibrated on the shipped photos), so
    # devices can run --precision int8 from the service's bundle; adds the calibration to the
    # first start.
    bundle_int8: bool = False

    @field_validator("models", "api_keys", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("backend", mode="before")
    @classmethod
    def _known_backend(cls, value: object) -> object:
        # Literal's own message does not say what was given; an operator's typo should show.
        if isinstance(value, str) and value not in _BACKENDS:
            raise ValueError(f"unknown backend {value!r}; valid: {', '.join(_BACKENDS)}")
        return value

    @field_validator("image_memory_budget_bytes")
    @classmethod
    def _budget_fits_an_image(cls, value: int, info: ValidationInfo) -> int:
        per_image = info.data.get("max_image_bytes", 0)
        if value < per_image:
            raise ValueError(f"must be at least max_image_bytes ({per_image})")
        return value

    @field_validator("models")
    @classmethod
    def _at_least_one_model(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("serve at least one model")
        return value

    def model_weights(self) -> dict[str, str | None]:
        """``{name: checkpoint path or None}`` from ``models``."""
        out: dict[str, str | None] = {}
        for entry in self.models:
            name, _, path = entry.partition("=")
            out[name.strip()] = path.strip() or None
        return out

    def torch_threads(self) -> int:
        """Intra-op threads of either backend: ``threads``, else the CPU limit."""
        return self.threads or cpu_limit()

    def bundle_root(self) -> Path:
        """``bundle_dir``, else ``cloud_server.bundles.default_root()``."""
        return Path(self.bundle_dir).expanduser() if self.bundle_dir else default_root()


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read once from the environment. Tests override this."""
    return Settings()
