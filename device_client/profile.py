"""Measuring what each candidate costs on this device, and caching it.

For every split point: the median head latency and the median quantize+compress+frame cost,
and the frame's size; for ``device`` the whole model; for ``cloud`` the JPEG encode and size. All
on a real photo (``reference_photo``), on this runtime and thread count. The result is cached in
a file keyed by model, weights fingerprint, torch version, thread count, CPU model and CPU quota
(and the encoding options), so a device
measures once, not at every start.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

from device_client.runtime import DeviceRuntime, EncodeOptions
from shared.candidates import CLOUD, DEVICE
from shared.cpu import cgroup_quota
from shared.errors import ConfigError
from shared.planner import DeviceCost, DeviceProfile
from shared.preprocess import center_crop, encode_jpeg, reference_photo, to_tensor
from shared.timing import median_ms

__all__ = ["ProfileKey", "cache_dir", "load_or_measure", "measure"]

CACHE_ENV = "SPLITSERVE_CACHE_DIR"
_FORMAT = 2  # bump when the cached JSON changes shape

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ProfileKey:
    """What a profile depends on: change any of these and it must be measured again."""

    model: str
    fingerprint: str
    torch_version: str
    threads: int
    cpu: str
    cpu_quota: float | None  # a board emulated at 20% of a core is not the host at full speed
    granularity: str
    zstd_level: int
    jpeg_quality: int

    @classmethod
    def current(cls, runtime: DeviceRuntime, options: EncodeOptions, jpeg_quality: int
                ) -> ProfileKey:
        return cls(runtime.name, runtime.fingerprint, torch.__version__, torch.get_num_threads(),
                   cpu_name(), cgroup_quota(), options.granularity, options.zstd_level,
                   jpeg_quality)

    def filename(self) -> str:
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()
        return f"profile-{self.model}-{digest[:16]}.json"


def cpu_name() -> str:
    """The CPU model, so a profile copied to different hardware is not trusted."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model", "Hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_dir() -> Path:
    """``$SPLITSERVE_CACHE_DIR``, else ``$XDG_CACHE_HOME/splitserve``, else ~/.cache/splitserve."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "splitserve"


def measure(runtime: DeviceRuntime, *, options: EncodeOptions, jpeg_quality: int = 90,
            repeats: int = 5, progress: Progress | None = None) -> DeviceProfile:
    """Time every candidate on this device. ``progress(name)`` is called as each one starts."""
    step = progress or (lambda name: None)
    crop = center_crop(reference_photo(), runtime.spec.preprocessing)
    x = to_tensor(crop, runtime.spec.preprocessing)
    costs = []
    step(DEVICE)
    costs.append(DeviceCost(DEVICE, median_ms(lambda: runtime.run_full(x), repeats=repeats),
                            0.0, 0))
    step(CLOUD)
    jpeg = encode_jpeg(crop, quality=jpeg_quality)
    costs.append(DeviceCost(CLOUD, 0.0, median_ms(lambda: encode_jpeg(crop, jpeg_quality),
                                                  repeats=repeats), len(jpeg)))
    for point in runtime.points:
        step(point.name)
        acts = runtime.run_head(point, x)  # also builds and warms up the halves
        head_ms = median_ms(partial(runtime.run_head, point, x), repeats=repeats)
        encode_ms = median_ms(partial(runtime.encode, point, acts, "profile", options),
                              repeats=repeats)
        frame = runtime.encode(point, acts, "0123456789abcdef", options)
        costs.append(DeviceCost(point.name, head_ms, encode_ms, len(frame)))
    return DeviceProfile(runtime.name, runtime.fingerprint, tuple(costs))


def load_or_measure(runtime: DeviceRuntime, *, options: EncodeOptions, jpeg_quality: int = 90,
                    repeats: int = 5, force: bool = False, progress: Progress | None = None
                    ) -> tuple[DeviceProfile, Path, bool]:
    """The cached profile if its key matches, else a fresh measurement saved to the cache.

    Returns ``(profile, path, measured_now)``.
    """
    key = ProfileKey.current(runtime, options, jpeg_quality)
    path = cache_dir() / key.filename()
    if not force:
        cached = _read(path, key)
        if cached is not None:
            return cached, path, False
    profile = measure(runtime, options=options, jpeg_quality=jpeg_quality, repeats=repeats,
                      progress=progress)
    _write(path, key, profile)
    return profile, path, True


def _read(path: Path, key: ProfileKey) -> DeviceProfile | None:
    try:
        doc = json.loads(path.read_text())
        if doc.get("format") != _FORMAT or doc.get("key") != asdict(key):
            return None
        return DeviceProfile(key.model, key.fingerprint,
                             tuple(DeviceCost(**c) for c in doc["costs"]))
    except (OSError, ValueError, TypeError, KeyError):
        return None  # missing or corrupt cache: measure again


def _write(path: Path, key: ProfileKey, profile: DeviceProfile) -> None:
    doc = {"format": _FORMAT, "key": asdict(key), "measured_at": time.time(),
           "costs": [asdict(c) for c in profile.costs]}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(path)  # atomic: a crash never leaves half a profile
    except OSError as exc:
        raise ConfigError(f"cannot write the profile cache {path}: {exc}") from exc
