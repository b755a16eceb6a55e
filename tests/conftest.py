"""Fixtures shared by every test area: the sample photos, the device model, a live service."""

from __future__ import annotations

import os
from collections.abc import Iterator

# The tests, the services they start and the CLIs they run share two cores. torch's default of
# one spinning thread per core in each process oversubscribes them, and a busy-waiting thread
# pool on an oversubscribed CPU runs 10-100x slower. One thread each; set before torch loads.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("SPLITSERVE_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image

from device_client.local_service import LocalService  # noqa: E402
from device_client.runtime import DeviceRuntime
from device_client.samples import sample_photos
from shared.models import get_spec
from shared.predictions import top_k
from shared.preprocess import preprocess

MODEL = "efficientnet_lite0"
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One ONNX bundle cache for the session's services (``SPLITSERVE_BUNDLE_DIR``), so the
    onnxruntime backend exports each model once per session and never into the user's cache."""
    old = os.environ.get("SPLITSERVE_BUNDLE_DIR")
    path = old or str(tmp_path_factory.mktemp("bundles"))
    os.environ["SPLITSERVE_BUNDLE_DIR"] = path
    yield path
    if old is None:
        os.environ.pop("SPLITSERVE_BUNDLE_DIR", None)


@pytest.fixture(scope="session")
def photos() -> dict[str, Image.Image]:
    """scikit-image's bundled photos: chelsea, coffee, astronaut, rocket, motorcycle."""
    return sample_photos()


@pytest.fixture(scope="session")
def device_runtime() -> DeviceRuntime:
    return DeviceRuntime(MODEL)


@pytest.fixture(scope="session")
def local_top1(device_runtime: DeviceRuntime, photos: dict[str, Image.Image]) -> dict[str, int]:
    """Top-1 class of unsplit float32 inference on the device, per photo."""
    pre = get_spec(MODEL).preprocessing
    out = {}
    for name, image in photos.items():
        logits = device_runtime.run_full(preprocess(image, pre))
        out[name] = top_k(logits, device_runtime.labels, 1)[0][0].index
    return out


@pytest.fixture(scope="session")
def live_service() -> Iterator[LocalService]:
    """The real service, ``python -m cloud_server --host 127.0.0.1 --port <free>``, for the
    whole session. Tests that break or stop a service start their own."""
    with LocalService(models=[MODEL], env={"SPLITSERVE_PROFILE_REPEATS": "1"}) as service:
        yield service
