"""Measuring what each candidate costs on this device, and caching it.

For every split point: the head latency, the quantize+compress+frame cost and the frame's size;
for ``device`` the whole model; for ``cloud`` the JPEG encode and size. All on a real photo
(``reference_photo``), on this runtime, precision and thread count.

Every candidate is timed in the same rounds, one run of each per round (``interleaved_ms``), and
its figure is a low quantile of its runs: a burst of load then costs every candidate one slow
run that the quantile drops, instead of every run of whichever head was being measured. Under a
CPU quota it is the median instead (``profile_rules.candidate_ms``): there a run that started
with the period's budget left goes at full speed, and the low quantile kept only those. Each
run's time leaves out what the kernel reports its threads spent waiting for a CPU another
process held (unless a CPU quota applies: then that wait is the device's own budget), so a
busy neighbour does not make the device look slow; auto learns the live slow-down at run time. Heads
are then made monotone (``monotone_heads``): a head never costs less than a head it contains,
nor more than the whole model.

The result is cached in a file keyed by model, weights fingerprint, runtime (``torch`` or
``onnx``), its version, precision, thread count, CPU model and CPU quota (and the encoding
options), so a device measures once, not at every start. A cache file of another format is
measured again.

The profiler needs only what ``ProfiledRuntime`` names, so it runs on the torch runtime
(``DeviceRuntime``) and on ONNX Runtime (``OnnxDeviceRuntime``) alike.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from PIL import Image

from device_client.options import EncodeOptions
from device_client.profile_rules import candidate_ms, monotone_heads
from shared.candidates import CLOUD, DEVICE
from shared.cpu import cgroup_quota
from shared.errors import ConfigError
from shared.planner import DeviceCost, DeviceProfile
from shared.preprocess import center_crop, encode_jpeg, reference_photo
from shared.timing import interleaved_ms, no_waits, runqueue_waits_ms

__all__ = ["FORMAT", "QUANTILE", "REPEATS", "ProfileKey", "ProfiledRuntime", "cache_dir",
           "load_or_measure", "measure", "measure_candidate"]

CACHE_ENV = "SPLITSERVE_CACHE_DIR"
FORMAT = 4  # bump when the cached JSON, or how it is measured, changes: older files are ignored
QUANTILE = 0.2  # of each candidate's runs (no CPU quota): see shared.timing.low_quantile
# Rounds of timed runs: the 20th percentile of 10 lies between the 2nd and 3rd fastest, so two
# slow runs of a candidate never reach its figure. ~4 s for EfficientNet-Lite0 at one thread.
REPEATS = 10
_DISTRIBUTIONS = {"torch": "torch", "onnx": "onnxruntime"}  # runtime -> package to version

Progress = Callable[[str], None]


class ProfiledRuntime(Protocol):
    """What the profiler runs: ``DeviceRuntime`` (torch) and ``OnnxDeviceRuntime`` both fit.
    Points and inputs are whatever the runtime takes (torch tensors or numpy arrays)."""

    name: str
    fingerprint: str

    @property
    def kind(self) -> str: ...  # "torch" or "onnx"

    @property
    def precision(self) -> str: ...  # "fp32" or "int8"

    @property
    def threads(self) -> int: ...

    @property
    def preprocessing(self) -> Any: ...  # resize_size, crop_size, mean, std

    @property
    def points(self) -> Sequence[Any]: ...

    def prepare(self, crop: Image.Image) -> Any: ...  # a center crop -> the model's input

    def run_full(self, x: Any) -> Any: ...

    def run_head(self, point: Any, x: Any) -> Any: ...

    def encode(self, point: Any, tensors: Any, request_id: str,
               options: EncodeOptions | None = None) -> bytes: ...


@dataclass(frozen=True)
class ProfileKey:
    """What a profile depends on: change any of these and it must be measured again."""

    model: str
    fingerprint: str
    runtime: str
    runtime_version: str
    precision: str
    threads: int
    cpu: str
    cpu_quota: float | None  # a board emulated at 20% of a core is not the host at full speed
    granularity: str
    zstd_level: int
    jpeg_quality: int

    @classmethod
    def current(cls, runtime: ProfiledRuntime, options: EncodeOptions, jpeg_quality: int
                ) -> ProfileKey:
        return cls(runtime.name, runtime.fingerprint, runtime.kind, _version(runtime.kind),
                   runtime.precision, runtime.threads, cpu_name(), cgroup_quota(),
                   options.granularity, options.zstd_level, jpeg_quality)

    def filename(self) -> str:
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()
        return f"profile-{self.model}-{digest[:16]}.json"


def _version(kind: str) -> str:
    try:
        return importlib.metadata.version(_DISTRIBUTIONS.get(kind, kind))
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


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


def measure(runtime: ProfiledRuntime, *, options: EncodeOptions, jpeg_quality: int = 90,
            repeats: int = REPEATS, progress: Progress | None = None) -> DeviceProfile:
    """Time every candidate on this device. ``progress(name)`` is called as each one is built
    and warmed up, before the timed rounds."""
    return _measure(runtime, runtime.points, options=options, jpeg_quality=jpeg_quality,
                    repeats=repeats, progress=progress)


def measure_candidate(runtime: ProfiledRuntime, split: str, *, options: EncodeOptions,
                      jpeg_quality: int = 90, repeats: int = 5) -> DeviceCost:
    """One candidate measured again now (with the whole model in the same rounds, as a full
    profile does, so a head still cannot come out dearer than the whole model)."""
    points = [p for p in runtime.points if p.name == split]
    profile = _measure(runtime, points, options=options, jpeg_quality=jpeg_quality,
                       repeats=repeats, progress=None)
    return profile.cost(split)


def _measure(runtime: ProfiledRuntime, points: Sequence[Any], *, options: EncodeOptions,
             jpeg_quality: int, repeats: int, progress: Progress | None) -> DeviceProfile:
    step = progress or (lambda name: None)
    crop = center_crop(reference_photo(), runtime.preprocessing)
    x = runtime.prepare(crop)
    fns: dict[str, Callable[[], object]] = {}
    sizes: dict[str, int] = {}
    step(DEVICE)
    fns[DEVICE] = partial(runtime.run_full, x)
    step(CLOUD)
    fns[CLOUD] = partial(encode_jpeg, crop, jpeg_quality)
    sizes[CLOUD] = len(encode_jpeg(crop, quality=jpeg_quality))
    for point in points:
        step(point.name)
        acts = runtime.run_head(point, x)  # also builds and warms up the halves
        fns[_head(point.name)] = partial(runtime.run_head, point, x)
        fns[_encode(point.name)] = partial(runtime.encode, point, acts, "profile", options)
        sizes[point.name] = len(runtime.encode(point, acts, "0123456789abcdef", options))
    for fn in fns.values():
        fn()  # one untimed round: first calls pay lazy allocations
    # Under a CPU quota (an emulated board, a container) the waits are the device's own budget,
    # not neighbours' load: the kernel counts throttled time as run-queue waiting, so keep it.
    quota = cgroup_quota()
    waits = runqueue_waits_ms if quota is None else no_waits
    samples = interleaved_ms(fns, repeats=repeats, waits=waits)
    ms = {name: candidate_ms(runs, quota=quota, quantile=QUANTILE)
          for name, runs in samples.items()}
    whole_ms = ms[DEVICE]
    heads = monotone_heads([ms[_head(p.name)] for p in points], whole_ms)
    costs = [DeviceCost(DEVICE, whole_ms, 0.0, 0), DeviceCost(CLOUD, 0.0, ms[CLOUD], sizes[CLOUD])]
    costs += [DeviceCost(p.name, head_ms, ms[_encode(p.name)], sizes[p.name])
              for p, head_ms in zip(points, heads, strict=True)]
    return DeviceProfile(runtime.name, runtime.fingerprint, tuple(costs))


def _head(name: str) -> str:
    return f"head:{name}"


def _encode(name: str) -> str:
    return f"encode:{name}"


def load_or_measure(runtime: ProfiledRuntime, *, options: EncodeOptions, jpeg_quality: int = 90,
                    repeats: int = REPEATS, force: bool = False, progress: Progress | None = None
                    ) -> tuple[DeviceProfile, Path, bool]:
    """The cached profile if its key and format match, else a fresh measurement saved to the
    cache. Returns ``(profile, path, measured_now)``."""
    key = ProfileKey.current(runtime, options, jpeg_quality)
    path = cache_dir() / key.filename()
    if not force:
        cached = _read(path, key)
        if cached is not None:
            return cached, path, False
    profile = measure(runtime, options=options, jpeg_quality=jpeg_quality, repeats=repeats,
                      progress=progress)
    _write(path, key, profile, repeats=repeats)
    return profile, path, True


def _read(path: Path, key: ProfileKey) -> DeviceProfile | None:
    try:
        doc = json.loads(path.read_text())
        if doc.get("format") != FORMAT or doc.get("key") != asdict(key):
            return None  # an older format was measured another way (and less reliably)
        return DeviceProfile(key.model, key.fingerprint,
                             tuple(DeviceCost(**c) for c in doc["costs"]))
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None  # missing or corrupt cache: measure again


def _write(path: Path, key: ProfileKey, profile: DeviceProfile, *, repeats: int) -> None:
    doc = {"format": FORMAT, "key": asdict(key), "measured_at": time.time(),
           "repeats": repeats, "quantile": QUANTILE if key.cpu_quota is None else 0.5,
           "costs": [asdict(c) for c in profile.costs]}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(path)  # atomic: a crash never leaves half a profile
    except OSError as exc:
        raise ConfigError(f"cannot write the profile cache {path}: {exc}") from exc


if TYPE_CHECKING:  # both device runtimes fit the protocol: mypy checks this, nothing runs it
    from device_client.onnx_runtime import OnnxDeviceRuntime
    from device_client.runtime import DeviceRuntime

    def _fits(torch_rt: DeviceRuntime, onnx_rt: OnnxDeviceRuntime) -> list[ProfiledRuntime]:
        return [torch_rt, onnx_rt]
