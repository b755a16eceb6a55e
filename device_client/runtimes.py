"""Which runtime the device runs: ``--runtime onnx`` (a bundle on ONNX Runtime, no torch) or
``--runtime torch`` (eager PyTorch, imported only then), and at which ``--precision``.

With onnx the bundle is ``--bundle DIR`` or the service's, fetched once and cached
(``device_client.bundles``); the weights are the bundle's.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from device_client.bundles import fetch_bundle, use_bundle
from device_client.client import ServiceClient
from shared.bundle import Bundle
from shared.cpu import cpu_limit
from shared.errors import ConfigError

if TYPE_CHECKING:
    from device_client.pipeline import Runtime

__all__ = ["RUNTIMES", "open_runtime", "threads"]

RUNTIMES = ("onnx", "torch")


def threads() -> int:
    """Intra-op threads: ``OMP_NUM_THREADS`` if set, else 1.

    One, not a thread per core: a head is a few milliseconds of small operators, and a pool
    thread that has to wait for a core its neighbour holds stalls every operator. Profiled beside
    a busy process, two threads disagreed with a quiet profile by 137-856% where one thread stayed
    within 11% (README, "Do two profiles agree?"), and the planner trusts the profile. The
    board's share of CPU (``shared.cpu.cpu_limit``) still caps an explicit setting.
    """
    value = os.environ.get("OMP_NUM_THREADS", "")
    return min(int(value), cpu_limit()) if value.isdigit() and int(value) >= 1 else 1


async def open_runtime(runtime: str, model: str, *, precision: str = "fp32",
                       weights: str | None = None, bundle: str | None = None,
                       client: ServiceClient | None = None) -> Runtime:
    """The device's model on ``runtime``; raises ``ConfigError`` (one line) on a bad combination.

    ``client`` is needed only for onnx without ``bundle``: the service's bundle is fetched.
    """
    if runtime == "torch":
        if precision != "fp32":
            raise ConfigError("--precision int8 runs on --runtime onnx only")
        if bundle is not None:
            raise ConfigError("--bundle is for --runtime onnx; the torch runtime takes --weights")
        return _torch_runtime(model, weights)
    if runtime != "onnx":
        raise ConfigError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if weights is not None:
        raise ConfigError("--weights needs --runtime torch; for onnx, export a bundle of the "
                          "checkpoint (`device_client export --weights PATH --out DIR`) and "
                          "pass --bundle DIR")
    from device_client.onnx_runtime import OnnxDeviceRuntime

    if bundle is not None:
        found: Bundle = use_bundle(bundle, model=model)
    elif client is None:
        raise ConfigError("--runtime onnx needs --bundle DIR or a service to fetch the bundle "
                          "from")
    else:
        meta = await client.metadata(model)
        found = use_bundle(await fetch_bundle(client, model, meta.fingerprint), model=model,
                           fingerprint=meta.fingerprint)
    if precision not in found.manifest.precisions:
        where = f"the bundle in {bundle}" if bundle is not None else "the service's bundle"
        service_side = "" if bundle is not None else (
            "start the service with SPLITSERVE_BUNDLE_INT8=1, or ")
        raise ConfigError(f"--precision {precision}: {where} has only "
                          f"{', '.join(found.manifest.precisions)}; {service_side}export one "
                          f"with `python -m device_client export --model {model} --int8 "
                          f"--out DIR` and pass --bundle DIR")
    rt: Runtime = OnnxDeviceRuntime(found, precision="int8" if precision == "int8" else "fp32",
                                    threads=threads())
    return rt


def _torch_runtime(model: str, weights: str | None) -> Runtime:
    try:
        import torch

        from device_client.runtime import DeviceRuntime
    except ImportError as exc:
        raise ConfigError("--runtime torch needs torch: pip install 'splitserve[torch]' "
                          "(or use the default --runtime onnx)") from exc
    torch.set_num_threads(threads())  # one unless OMP_NUM_THREADS says otherwise, as for onnx
    rt: Runtime = DeviceRuntime(model, weights=weights)
    return rt
