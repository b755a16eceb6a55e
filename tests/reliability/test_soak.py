"""Steady load: thousands of requests to the real service, zero errors and flat memory.

CI-sized (2,000 requests after a 500-request warm-up); ``python -m bench reliability`` runs
10,000 (``tests.support.sizes``) and charts the RSS from the figures recorded here.
"""

from __future__ import annotations

import pytest
from PIL import Image

from device_client.runtime import DeviceRuntime
from tests.support import figures, sizes
from tests.support.soak import rss_bytes, soak_frames, soak_local_service

MODEL = "efficientnet_lite0"
SPLIT = "_blocks.14"  # late and cheap: the soak measures the service, not the model


@pytest.mark.slow
def test_soak_has_no_errors_and_flat_memory(
    device_runtime: DeviceRuntime, photos: dict[str, Image.Image]
) -> None:
    frames = soak_frames(device_runtime, photos, SPLIT)
    requests = sizes.soak_requests()
    report, alive = soak_local_service(
        MODEL, SPLIT, frames, requests=requests, concurrency=sizes.soak_concurrency()
    )
    doc = report.to_json()
    samples = doc.pop("samples")
    figures.record("soak", "soak", split=SPLIT, alive_after=alive, **sizes.flat(doc))
    for done, seconds, rss in samples:
        figures.record("soak_rss", str(done), seconds=seconds, rss_bytes=rss)
    assert alive
    assert report.errors == 0, report.error_examples
    assert report.rss_growth < 0.10, (report.rss_start, report.rss_end)
    assert len(report.samples) > 100 and report.samples[-1][0] == requests


def test_rss_reads_proc_status() -> None:
    import os

    assert 10 * 2**20 < rss_bytes(os.getpid()) < 64 * 2**30
