"""``python -m device_client demo``: the whole system on one machine, on real photos.

Starts the real service (``python -m cloud_server``) on a free loopback port, classifies the
scikit-image sample photos with the network cut at a middle split point, prints each answer next
to local unsplit inference, and stops the service.
"""

from __future__ import annotations

import asyncio

from PIL import Image
from rich.console import Console
from rich.table import Table

from device_client.client import ServiceClient
from device_client.local_service import LocalService
from device_client.pipeline import DEVICE, Device, Runtime
from device_client.runtimes import open_runtime
from device_client.samples import sample_photos

__all__ = ["run_demo"]


def run_demo(*, model: str, split: str | None = None, runtime: str = "onnx",
             precision: str = "fp32") -> int:
    """``runtime`` onnx fetches the service's bundle (the service exports it at start-up)."""
    console = Console()
    photos = sample_photos()
    with console.status("starting the cloud service on loopback (loads, warms up, profiles)"):
        service = LocalService(models=[model]).start()
    try:
        with console.status(f"loading {model} on the device ({runtime} {precision})"):
            rt = asyncio.run(_open(runtime, model, precision, service.url))
        point = rt.point(split) if split is not None else rt.middle_point()
        console.print(f"service ready at {service.url}; cutting {model} after "
                      f"[bold]{point.name}[/] (split point {point.index} of "
                      f"{len(rt.points)}), {point.float32_bytes:,} float32 bytes per image")
        agree = asyncio.run(_classify(console, rt, service.url, point.name, photos))
    finally:
        with console.status("stopping the service"):
            service.stop()
    console.print(f"{agree}/{len(photos)} photos: split top-1 equals local unsplit top-1.")
    return 0 if agree == len(photos) else 1


async def _open(runtime: str, model: str, precision: str, url: str) -> Runtime:
    async with ServiceClient(url) as client:
        return await open_runtime(runtime, model, precision=precision, client=client)


async def _classify(console: Console, runtime: Runtime, url: str, split: str,
                    photos: dict[str, Image.Image]) -> int:
    table = Table(title=f"{runtime.name} cut after {split} vs. unsplit on the device")
    table.add_column("photo")
    table.add_column("split inference")
    table.add_column("unsplit, local")
    table.add_column("same")
    table.add_column("bytes sent", justify="right")
    table.add_column("total ms", justify="right")
    agree = 0
    f32 = runtime.point(split).float32_bytes
    timings = []
    async with ServiceClient(url) as client:
        device = Device(runtime, client, fallback=False)
        for name, image in photos.items():
            remote = await device.infer(image, split=split, name=name)
            local = await device.infer(image, split=DEVICE, name=name)
            same = remote.top5[0].index == local.top5[0].index
            agree += same
            timings.append(remote.timings)
            table.add_row(
                name, f"{remote.top5[0].label} {remote.top5[0].prob:.0%}",
                f"{local.top5[0].label} {local.top5[0].prob:.0%}", "yes" if same else "NO",
                f"{remote.bytes_sent:,} ({remote.bytes_sent / f32:.0%})",
                f"{remote.timings.total:.1f}")
    console.print(table)
    n = len(timings)
    console.print(
        "mean ms: head {:.1f}, encode {:.1f}, network {:.1f}, server {:.1f}, total {:.1f}".format(
            *(sum(getattr(t, k) for t in timings) / n
              for k in ("head", "encode", "network", "server", "total"))))
    return agree
