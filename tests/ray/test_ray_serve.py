"""The service as a Ray Serve application: two replicas on a local Ray, the real device client
through the Serve proxy, one replica killed mid-run, and no result lost."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from device_client.client import ServiceClient
from device_client.local_service import free_port
from device_client.pipeline import Device
from device_client.results import InferenceResult
from device_client.runtime import DeviceRuntime

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
splitserve = pytest.importorskip("cloud_server.serve")

pytestmark = pytest.mark.slow

MODEL = "efficientnet_lite0"
APP = "splitserve"
READY_TIMEOUT_S = 600.0  # two replicas export and load the model on 2 shared cores


def _replica_env(bundle_dir: str) -> dict[str, str]:
    return {
        "SPLITSERVE_MODELS": MODEL,
        "SPLITSERVE_PROFILE_REPEATS": "0",  # no start-up timing runs: a fast start
        "SPLITSERVE_BUNDLE_DIR": bundle_dir,  # the session's cache: each model exported once
        "SPLITSERVE_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        # The replicas import this tree's code, not the venv's editable install.
        "PYTHONPATH": os.environ.get("PYTHONPATH", os.getcwd()),
    }


@pytest.fixture(scope="module")
def serve_url(bundle_dir: str) -> Iterator[str]:
    """``http://127.0.0.1:<port>``: the Serve proxy in front of two replicas."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        deployment = splitserve.SplitServe.options(
            num_replicas=2,
            # Half a CPU each: the replacement of a killed replica fits beside the survivor.
            ray_actor_options={"num_cpus": 0.5,
                               "runtime_env": {"env_vars": _replica_env(bundle_dir)}})
        serve.run(deployment.bind(), name=APP, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        _wait_all_ready(url)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def _wait_all_ready(url: str) -> None:
    # Readiness is per replica and the proxy picks one per request: ten 200s in a row make it
    # very likely that both loaded their model.
    deadline = time.monotonic() + READY_TIMEOUT_S
    in_a_row = 0
    with httpx.Client(base_url=url, timeout=10.0) as http:
        while in_a_row < 10:
            assert time.monotonic() < deadline, "the Serve replicas never became ready"
            try:
                ok = http.get("/v2/health/ready").status_code == 200
            except httpx.HTTPError:
                ok = False
            in_a_row = in_a_row + 1 if ok else 0
            if not ok:
                time.sleep(1.0)


def _replica_names() -> list[str]:
    # Serve names each replica actor SERVE_REPLICA::<app>#<deployment>#<id> in namespace
    # "serve"; the GCS lists named actors without the dashboard's state API.
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == "serve" and a["name"].startswith("SERVE_REPLICA::")
                  and f"{APP}#" in a["name"])


def test_every_endpoint_answers_through_the_serve_proxy(serve_url: str) -> None:
    with httpx.Client(base_url=serve_url, timeout=60.0) as http:
        assert http.get("/v2/health/live").status_code == 200
        assert http.get("/v2/health/ready").status_code == 200
        meta = http.get(f"/v2/models/{MODEL}")
        assert meta.status_code == 200 and meta.json()["name"] == MODEL
        bundle = http.get(f"/v2/models/{MODEL}/bundle")
        assert bundle.status_code == 200 and len(bundle.content) > 1_000_000
        metrics = http.get("/metrics")
        assert metrics.status_code == 200 and "splitserve_requests" in metrics.text
        missing = http.get("/v2/models/no_such_model")
        assert missing.status_code == 404 and "error" in missing.json()


async def _run_fleet(url: str, runtime: DeviceRuntime, photos: dict[str, Image.Image],
                     split: str, rounds: int, kill_after: int) -> tuple[list[InferenceResult],
                                                                        str]:
    """Two devices' worth of requests at once; one replica is killed after ``kill_after``
    results, while the others are in flight."""
    jobs = [(r, name) for r in range(rounds) for name in photos]
    done: list[InferenceResult] = []
    killed: list[str] = []
    async with ServiceClient(url) as client:
        device = Device(runtime, client, fallback=True)
        lane = asyncio.Semaphore(2)

        async def one(job: tuple[int, str]) -> None:
            async with lane:
                done.append(await device.infer(photos[job[1]], split=split, name=job[1]))
            if len(done) == kill_after and not killed:
                victim = _replica_names()[0]
                ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
                killed.append(victim)

        await asyncio.gather(*(one(job) for job in jobs))
    assert killed, "the run ended before a replica was killed"
    return done, killed[0]


def test_a_killed_replica_loses_no_result(serve_url: str, device_runtime: DeviceRuntime,
                                          photos: dict[str, Image.Image],
                                          local_top1: dict[str, int]) -> None:
    assert len(_replica_names()) == 2
    split = device_runtime.points[len(device_runtime.points) // 2].name
    rounds = 4
    results, victim = asyncio.run(
        _run_fleet(serve_url, device_runtime, photos, split, rounds, kill_after=len(photos)))

    assert len(results) == rounds * len(photos)  # every photo of every round has its answer
    wrong = [(r.image, r.top5[0].index) for r in results
             if r.top5[0].index != local_top1[r.image]]
    assert not wrong
    # The surviving replica kept serving: most answers were split, not the device's fallback.
    served = [r for r in results if r.ran == "split"]
    fallbacks = [r.fallback for r in results if r.fallback]
    print(f"{len(served)} split, {len(fallbacks)} fallbacks: {fallbacks}")
    assert len(served) > len(results) // 2, fallbacks
    # Serve replaces the killed replica; the new one has a new name.
    assert victim not in _replica_names()


def test_serve_config_is_valid_and_the_rayservice_embeds_it() -> None:
    yaml = pytest.importorskip("yaml")
    schema = pytest.importorskip("ray.serve.schema")
    deploy = Path(__file__).resolve().parents[2] / "deploy"
    config = yaml.safe_load((deploy / "serve.yaml").read_text())
    parsed = schema.ServeDeploySchema.model_validate(config)
    (application,) = parsed.applications
    assert application.import_path == "cloud_server.serve:app"
    assert application.deployments[0].name == splitserve.DEPLOYMENT_NAME
    assert {"min_replicas", "max_replicas", "target_ongoing_requests"} <= set(
        application.deployments[0].autoscaling_config)
    service = yaml.safe_load((deploy / "rayservice.yaml").read_text())
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == config
