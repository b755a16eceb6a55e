"""Ray Serve's proxy overhead: the same requests, one at a time, to plain `python -m cloud_server`
and to the same app behind a Ray Serve proxy (one replica), on this machine.

    python -m bench serve-overhead --out /tmp/so
    python -m bench serve-overhead --requests 500

Two endpoints: POST /v2/models/<model>/splits/<middle>/infer with one real frame (the device's
head output on a sample photo, encoded once beforehand), and GET /v2/health/ready. Each engine
gets ``--warmup`` requests first, then ``--requests`` timed ones per endpoint, serially over one
keep-alive connection (httpx). Serial on purpose: the figure is what the proxy adds to one
request's latency, not what it does to throughput. Both engines run with the same SPLITSERVE_*
settings (one compute thread, no start-up profiling) and one after the other, never at once.

Needs the ray extra (``pip install '.[ray]'``). Writes ``serve_overhead.json`` and
``serve_overhead.md`` to ``--out`` (default ``bench/results``).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from bench import report
from bench.stats import percentile
from device_client.local_service import LocalService, free_port
from device_client.runtime import DeviceRuntime
from device_client.samples import sample_photos
from shared import cliargs
from shared.errors import ConfigError, SplitServeError
from shared.preprocess import center_crop, to_tensor
from shared.wire import CONTENT_TYPE

__all__ = ["add_arguments", "run"]

MODEL = "efficientnet_lite0"
ENGINES = ("uvicorn", "ray-serve")
READY_TIMEOUT_S = 600.0
# Ray's own metrics (not splitserve's /metrics): every Ray process exports them to the node's
# dashboard agent every 10 s by default, and the agent ingests them in a 25-35 ms burst of CPU
# (seen in /proc/<pid>/task/*/schedstat sampled every 5 ms; py-spy: its ReporterAgent). Here
# Ray's whole node shares the replica's one core, so each burst landed in whatever request was
# in flight: in `bench fleet`'s kept records, one replica's single-device round trips more than
# 10 ms over their median were 15 of 360 with the default, 2 of 360 with the export every 10 min
# (the README's fleet section). A node with cores to spare keeps Ray's default.
RAY_ENV = {"RAY_metrics_report_interval_ms": "600000"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from bench.__main__ import DEFAULT_OUT

    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    p.add_argument("--requests", type=cliargs.integer(at_least=1), default=200,
                   help="timed requests per endpoint and engine (default 200)")
    p.add_argument("--warmup", type=cliargs.integer(at_least=1), default=20,
                   help="untimed requests per endpoint first (default 20)")


def run(args: argparse.Namespace) -> int:
    runtime = DeviceRuntime(MODEL)
    point = runtime.points[len(runtime.points) // 2]
    frame = _frame(runtime, point)
    env = {"SPLITSERVE_MODELS": MODEL, "SPLITSERVE_PROFILE_REPEATS": "0",
           "SPLITSERVE_THREADS": "1", "OMP_NUM_THREADS": "1"}
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="splitserve-bundles-") as bundles:
        env["SPLITSERVE_BUNDLE_DIR"] = bundles  # exported once, by the first engine
        for engine in ENGINES:
            start = _uvicorn if engine == "uvicorn" else _ray_serve
            with start(env) as url:
                results += _measure(engine, url, point.name, frame, args.requests, args.warmup)
    doc = {"model": MODEL, "split": point.name, "frame_bytes": len(frame),
           "requests": args.requests, "warmup": args.warmup, "replicas": 1,
           "host": {"machine": platform.machine(), "cpus": os.cpu_count()},
           "results": results, "overhead_ms": _overhead(results)}
    report.write_json(args.out / "serve_overhead.json", doc)
    headers, rows = _table(results)
    report.write_text(args.out / "serve_overhead.md", _markdown(doc, headers, rows))
    report.print_table("Serial requests: plain uvicorn vs the Ray Serve proxy", headers, rows,
                       align="llrrr")
    print(f"wrote {args.out / 'serve_overhead.json'} and {args.out / 'serve_overhead.md'}")
    return 0


def _frame(runtime: DeviceRuntime, point: Any) -> bytes:
    image = next(iter(sample_photos().values()))
    x = to_tensor(center_crop(image, runtime.spec.preprocessing), runtime.spec.preprocessing)
    return runtime.encode(point, runtime.run_head(point, x), "serve-overhead")


@contextmanager
def _uvicorn(env: dict[str, str]) -> Iterator[str]:
    with LocalService(models=[MODEL], env=env, ready_timeout_s=READY_TIMEOUT_S) as service:
        yield service.url


@contextmanager
def _ray_serve(env: dict[str, str], *, replicas: int = 1,
               after_start: Callable[[], None] | None = None) -> Iterator[str]:
    """The Serve proxy's URL, in front of ``replicas`` replicas (one CPU each) on a local Ray;
    ``after_start`` runs once Ray's processes have started (``bench fleet`` pins them)."""
    try:
        import ray
        from ray import serve

        from cloud_server.serve import SplitServe
    except ImportError as exc:
        raise ConfigError("the Ray Serve engine needs the ray extra: pip install '.[ray]'"
                          ) from exc
    # The replica imports the same code as this process.
    replica_env = {**env, "PYTHONPATH": os.environ.get("PYTHONPATH", os.getcwd())}
    with _environ(RAY_ENV):  # read by the Ray processes ray.init starts
        ray.init(address="local", num_cpus=max(2, replicas), include_dashboard=False,
                 log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        if after_start is not None:
            after_start()
        serve.run(SplitServe.options(num_replicas=replicas, ray_actor_options={
            "num_cpus": 1, "runtime_env": {"env_vars": replica_env}}).bind(),
            name="splitserve", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, in_a_row=5 * replicas)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


@contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` set, restored after."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _wait_ready(url: str, *, in_a_row: int = 1) -> None:
    """Until ``in_a_row`` readiness checks in a row said 200: the proxy picks a replica per
    request, so several in a row make it likely that every replica has loaded its model."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    good = 0
    with httpx.Client(base_url=url, timeout=10.0) as http:
        while time.monotonic() < deadline:
            try:
                ok = http.get("/v2/health/ready").status_code == 200
            except httpx.HTTPError:
                ok = False
            good = good + 1 if ok else 0
            if good >= in_a_row:
                return
            if not ok:
                time.sleep(0.5)
    raise SplitServeError(f"the Ray Serve replica at {url} was not ready in {READY_TIMEOUT_S} s")


def _measure(engine: str, url: str, split: str, frame: bytes, n: int, warmup: int
             ) -> list[dict[str, Any]]:
    out = []
    with httpx.Client(base_url=url, timeout=30.0) as http:
        calls: dict[str, Callable[[], httpx.Response]] = {
            "split_infer": lambda: http.post(f"/v2/models/{MODEL}/splits/{split}/infer",
                                             content=frame,
                                             headers={"Content-Type": CONTENT_TYPE}),
            "health_ready": lambda: http.get("/v2/health/ready"),
        }
        for endpoint, call in calls.items():
            times_ms, errors = [], 0
            for i in range(warmup + n):
                started = time.perf_counter()
                ok = call().status_code == 200
                elapsed_ms = (time.perf_counter() - started) * 1e3
                if i >= warmup:
                    times_ms.append(elapsed_ms)
                    errors += not ok
            out.append({"engine": engine, "endpoint": endpoint, "requests": n, "errors": errors,
                        "p50_ms": percentile(times_ms, 50), "p95_ms": percentile(times_ms, 95)})
    return out


def _overhead(results: list[dict[str, Any]]) -> dict[str, float | None]:
    """Per endpoint: the proxy's p50 minus plain uvicorn's, in ms."""
    by = {(r["engine"], r["endpoint"]): r["p50_ms"] for r in results}
    out: dict[str, float | None] = {}
    for endpoint in {r["endpoint"] for r in results}:
        plain, proxied = by.get(("uvicorn", endpoint)), by.get(("ray-serve", endpoint))
        out[endpoint] = None if plain is None or proxied is None else proxied - plain
    return out


def _table(results: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    headers = ["endpoint", "engine", "p50 ms", "p95 ms", "errors"]
    rows = [[r["endpoint"], r["engine"], _ms(r["p50_ms"]), _ms(r["p95_ms"]), str(r["errors"])]
            for r in sorted(results, key=lambda r: (r["endpoint"], r["engine"] != "uvicorn"))]
    return headers, rows


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _markdown(doc: dict[str, Any], headers: list[str], rows: list[list[str]]) -> str:
    lines = [f"Serial requests, {doc['requests']} per endpoint and engine after "
             f"{doc['warmup']} untimed; split `{doc['split']}` ({doc['frame_bytes']} B frame); "
             "Ray Serve with one replica on a local Ray.", "",
             report.markdown_table(headers, rows, align="llrrr"),
             "Proxy overhead (p50, Ray Serve minus uvicorn): " + ", ".join(
                 f"{k} {_ms(v)} ms" for k, v in sorted(doc["overhead_ms"].items()))]
    return "\n".join(lines) + "\n"
