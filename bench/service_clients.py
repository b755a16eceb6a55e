"""Can a maintained HTTP client drive ``bench service``? The hand-written ``service_http``
client against ``httpx.AsyncClient`` with a pool sized to the clients, side by side.

    python -m bench.service_clients                 # 16 clients, 4 rounds of 5 s each
    python -m bench.service_clients 32 6 10         # clients, rounds, seconds per round

The same service (pinned as ``bench service`` pins it), the same frames and the same
``run_level`` loop; only the connection class differs. Rounds alternate (A B, B A, ...), so drift
on a shared machine falls on both. Per client it prints the median throughput and the load
generator's own CPU per answered request: a client that costs CPU competes with the service it
measures, and on a core of its own it caps the request rate at 1 / (CPU per request).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from typing import Any

import httpx

from bench import report, service, service_load
from bench.service_compute import encode_frames
from bench.service_http import Connection, HttpError
from device_client.runtime import DeviceRuntime
from device_client.samples import sample_photos


class HttpxConnection:
    """``service_http.Connection``'s interface over one shared, tuned ``httpx.AsyncClient``."""

    client: httpx.AsyncClient

    def __init__(self, host: str, port: int) -> None:
        self.base = f"http://{host}:{port}"

    async def post(
        self, path: str, body: bytes, *, content_type: str, timeout_s: float
    ) -> tuple[int, dict[str, str], bytes]:
        try:
            r = await self.client.post(
                self.base + path,
                content=body,
                headers={"Content-Type": content_type},
                timeout=timeout_s,
            )
        except httpx.TimeoutException as exc:
            raise TimeoutError(str(exc)) from exc
        except httpx.HTTPError as exc:
            raise HttpError(type(exc).__name__, str(exc)) from exc
        return r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.content

    async def get(self, path: str, *, timeout_s: float) -> tuple[int, dict[str, str], bytes]:
        r = await self.client.get(self.base + path, timeout=timeout_s)
        return r.status_code, dict(r.headers), r.content

    async def close(self) -> None:
        pass  # the pool is shared; it closes once, after the round


async def _round(
    url: str, frames: Any, kind: str, clients: int, seconds: float
) -> dict[str, float]:
    if kind == "httpx":
        limits = httpx.Limits(max_connections=clients + 1, max_keepalive_connections=clients + 1)
        HttpxConnection.client = httpx.AsyncClient(limits=limits, timeout=30)
        service_load.Connection = HttpxConnection  # type: ignore[misc,assignment]
    else:
        service_load.Connection = Connection  # type: ignore[misc]
    try:
        run = await service_load.run_level(
            url, frames, concurrency=clients, warmup_s=1.0, duration_s=seconds, timeout_s=30
        )
    finally:
        if kind == "httpx":
            await HttpxConnection.client.aclose()
    ok = [s for s in run.samples if s.result.outcome == "ok" and 1.0 <= s.done_s <= 1.0 + seconds]
    return {
        "req_per_s": len(ok) / seconds,
        "client_cpu_ms_per_req": run.client_cpu_s * 1e3 / max(1, len(ok)),
        "not_ok": sum(s.result.outcome != "ok" for s in run.samples),
    }


def main(argv: list[str]) -> int:
    clients, rounds, seconds = (int(argv[0]) if argv else 16), 4, 5.0
    if len(argv) > 1:
        rounds = int(argv[1])
    if len(argv) > 2:
        seconds = float(argv[2])
    parser = argparse.ArgumentParser()
    service.add_arguments(parser)
    args = parser.parse_args(["--quick"])
    layout = service._layout(args)
    settings = service._service_settings(args, layout)
    device = DeviceRuntime(args.model)
    point = device.middle_point()
    frames = encode_frames(device, point, sample_photos())
    console = report.make_console()
    got: dict[str, list[dict[str, float]]] = {"hand-written": [], "httpx": []}
    with service._service(console, args.model, settings, layout) as svc:
        url = f"{svc.url}/v2/models/{args.model}/splits/{point.name}/infer"
        for i in range(rounds):
            for kind in ("hand-written", "httpx")[:: 1 if i % 2 == 0 else -1]:
                result = asyncio.run(_round(url, frames, kind, clients, seconds))
                console.print(f"{kind}: {result}")
                got[kind].append(result)
    rows = [
        [
            kind,
            f"{statistics.median(r['req_per_s'] for r in runs):.1f}",
            f"{min(r['req_per_s'] for r in runs):.0f}-{max(r['req_per_s'] for r in runs):.0f}",
            f"{statistics.median(r['client_cpu_ms_per_req'] for r in runs):.3f}",
            str(sum(int(r["not_ok"]) for r in runs)),
        ]
        for kind, runs in got.items()
    ]
    headers = ["client", "req/s (median)", "range", "client CPU ms/req", "not ok"]
    report.print_table(
        f"{clients} clients, {rounds} rounds of {seconds:g} s", headers, rows, console=console
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
