"""What ``bench fleet``'s emulated devices need, prepared once and cached in ``DIR/fleet-cache``.

    profile = device_profile(cache, "efficientnet_lite0", device_cpu=0.2, console=console)
    payloads = encode_payloads(cache, "efficientnet_lite0")   # {candidate: [Payload per photo]}

* The device profile is the latency benchmark's: ``bench.device_worker``'s ``profile`` command
  (its JSON-lines protocol, whatever runtime the worker runs), in a process on its own core
  moved into a ``bench.cpulimit`` group with ``device_cpu`` of one core (0.2: a Raspberry Pi 4
  class board) once loaded, exactly as ``bench latency`` does. Measured once (about a minute)
  and kept in ``device_profile.json``: reruns reuse it. Delete the file to measure again.
* The bodies are what a device sends: for every split point and photo, the head's output
  encoded with the product's codec (``bench.service_compute.encode_frames``: quantized,
  compressed, framed), and for ``cloud`` the JPEG of the centre crop (``encode_jpeg``, the
  device's quality). Each carries the top-1 class the service must answer. Kept as files, so
  a rerun loads no torch model.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from bench.cpulimit import PERIOD_US, CpuLimit, CpuLimitUnavailable, pick_cores
from bench.device_worker import WorkerHandle
from bench.fleet_device import Payload
from shared.bundle import load_bundle
from shared.candidates import CLOUD, DEVICE
from shared.errors import BundleError
from shared.planner import DeviceCost, DeviceProfile

__all__ = ["PROFILE_FILE", "device_profile", "encode_payloads", "profile_from_json"]

PROFILE_FILE = "device_profile.json"
RUNTIME = "onnx"  # the device CLI's default runtime (fp32, one thread), as bench latency runs it
JPEG_QUALITY = 90  # the device's default (Device(jpeg_quality=90))


def profile_from_json(doc: dict[str, Any]) -> DeviceProfile:
    """The ``DeviceProfile`` in a cached ``device_profile.json``."""
    costs = tuple(DeviceCost(c["split"], float(c["head_ms"]), float(c["encode_ms"]),
                             int(c["payload_bytes"])) for c in doc["costs"])
    return DeviceProfile(doc["model"], doc.get("fingerprint", ""), costs)


def device_profile(cache: Path, model: str, *, device_cpu: float, console: Console
                   ) -> tuple[DeviceProfile, dict[str, Any]]:
    """The board-class device profile (cached): the profile and the cached document."""
    path = cache / PROFILE_FILE
    if path.exists():
        doc = json.loads(path.read_text())
        if (doc.get("model"), doc.get("device_cpu"), doc.get("runtime")) == (
                model, device_cpu, RUNTIME):
            return profile_from_json(doc), doc
    with console.status(f"measuring the device profile at {device_cpu:g} of a core (~1 min)"):
        doc = asyncio.run(_measure(cache, model, device_cpu))
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))
    console.print(f"device profile: whole model {doc['costs'][0]['head_ms']:.0f} ms on the "
                  f"device ({'limited' if doc['device_cpu_limited'] else 'NOT limited'}); "
                  f"cached in {path}")
    return profile_from_json(doc), doc


async def _measure(cache: Path, model: str, device_cpu: float) -> dict[str, Any]:
    cores = pick_cores()
    limit: CpuLimit | None = None
    warning = None
    if device_cpu > 0:
        try:
            limit = CpuLimit.create(device_cpu, period_us=PERIOD_US)
        except CpuLimitUnavailable as exc:
            warning = f"the device profile ran at FULL speed, not {device_cpu:g} of a core: {exc}"
    pin = ["taskset", "-c", str(cores[0])] if cores is not None else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "SPLITSERVE_CACHE_DIR": str(cache / "profile-cache")}
    # The profile never talks to a service: the URL is never dialled, the bundle is local.
    worker = await WorkerHandle.spawn(
        [*pin, sys.executable, "-m", "bench.device_worker", "--url", "http://127.0.0.1:9",
         "--model", model, "--crops", "0", "--threads", "1", "--runtime", RUNTIME,
         "--bundle", str(_bundle(cache, model))], env=env)
    try:
        loaded = await worker.event()
        limited = False
        if limit is not None:
            try:
                limit.add(worker.pid)
                limited = True
            except CpuLimitUnavailable as exc:
                warning = f"the device profile ran at FULL speed: {exc}"
        prof = await worker.call({"cmd": "profile"})
    finally:
        await worker.close()
        if limit is not None:
            limit.remove()
    return {"model": model, "runtime": RUNTIME, "precision": prof.get("precision", "fp32"),
            "device_cpu": device_cpu, "device_cpu_limited": limited,
            "cpu_period_us": PERIOD_US if limited else None, "warning": warning,
            "points": loaded.get("points"), "costs": prof["costs"],
            "cpu_share": prof.get("cpu_share"), "elapsed_s": prof.get("elapsed_s")}


def _bundle(cache: Path, model: str) -> Path:
    """The model's float32 ONNX bundle for the emulated device's profile, exported once."""
    path = cache / "bundle"
    try:
        load_bundle(path, model=model)
    except BundleError:
        from shared.export import export_bundle  # torch: only when exporting

        export_bundle(model, path)
    return path


def encode_payloads(cache: Path, model: str, candidates: Sequence[str]
                    ) -> dict[str, list[Payload]]:
    """One body per sample photo for each of ``candidates`` (``cloud`` and split points;
    ``device`` sends nothing), from the cache or encoded now (and cached)."""
    folder = cache / "payloads"
    index_path = folder / "index.json"
    index: dict[str, list[dict[str, Any]]] = {}
    if index_path.exists():
        index = json.loads(index_path.read_text())
    wanted = [c for c in candidates if c != DEVICE]
    missing = [c for c in wanted if c not in index]
    if missing:
        index.update(_encode(folder, model, missing))
        index_path.write_text(json.dumps(index, indent=1))
    return {c: [Payload(e["name"], (folder / e["file"]).read_bytes(), e["expected"])
                for e in index[c]] for c in wanted}


def _encode(folder: Path, model: str, candidates: Sequence[str]
            ) -> dict[str, list[dict[str, Any]]]:
    from PIL import Image

    from bench.service_compute import encode_frames
    from device_client.runtime import DeviceRuntime
    from device_client.samples import sample_photos
    from shared.predictions import top_k
    from shared.preprocess import center_crop, encode_jpeg, preprocess

    runtime = DeviceRuntime(model)
    photos = sample_photos()
    out: dict[str, list[dict[str, Any]]] = {}
    for candidate in candidates:
        sub = folder / candidate
        sub.mkdir(parents=True, exist_ok=True)
        entries = []
        if candidate == CLOUD:
            for name, image in photos.items():
                jpeg = encode_jpeg(center_crop(image, runtime.preprocessing), JPEG_QUALITY)
                logits = runtime.run_full(preprocess(Image.open(io.BytesIO(jpeg)).convert("RGB"),
                                                     runtime.preprocessing))
                entries.append((name, jpeg, top_k(logits, runtime.labels, 1)[0][0].index))
        else:
            frames = encode_frames(runtime, runtime.point(candidate), photos)
            entries = [(f.name, f.body, f.expected) for f in frames]
        out[candidate] = []
        for name, body, expected in entries:
            (sub / f"{name}.bin").write_bytes(body)
            out[candidate].append({"name": name, "file": f"{candidate}/{name}.bin",
                                   "expected": int(expected)})
    return out
