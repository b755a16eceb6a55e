"""ONNX bundles end to end: ``device_client export`` as a user runs it, then the ONNX Runtime
device against the torch device on the sample photos."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from device_client import cli
from device_client.onnx_runtime import OnnxDeviceRuntime
from device_client.profile import load_or_measure
from device_client.runtime import DeviceRuntime, EncodeOptions
from shared import codec_torch, wire
from shared.bundle import MANIFEST_NAME, load_bundle
from shared.candidates import CLOUD, DEVICE
from shared.errors import ConfigError
from shared.export import check
from shared.models import get_spec
from shared.preprocess import preprocess

pytestmark = pytest.mark.slow
MODEL = "efficientnet_lite0"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "device_client", *args], capture_output=True,
                          text=True, timeout=900, check=False)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "lite0"
    done = _cli("export", "--model", MODEL, "--int8", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout
    return out


@pytest.fixture(scope="module")
def inputs(photos: dict[str, Image.Image]) -> dict[str, torch.Tensor]:
    pre = get_spec(MODEL).preprocessing
    return {name: preprocess(image, pre) for name, image in photos.items()}


def test_the_manifest_describes_the_torch_partition(bundle_dir: Path,
                                                    device_runtime: DeviceRuntime) -> None:
    bundle = load_bundle(bundle_dir, model=MODEL, fingerprint=device_runtime.fingerprint)
    manifest = bundle.manifest
    assert manifest.precisions == ("fp32", "int8")
    assert manifest.opset >= 17
    assert len(manifest.labels) == 1000 and manifest.labels == device_runtime.labels
    assert [p.name for p in bundle.points] == [p.name for p in device_runtime.points]
    for exported, traced in zip(bundle.points, device_runtime.points, strict=True):
        assert [t.shape for t in exported.tensors] == [s.shape for s in traced.tensors]
        assert exported.float32_bytes == traced.float32_bytes
    raw = json.loads((bundle_dir / MANIFEST_NAME).read_text())
    on_disk = {p.name for p in bundle_dir.iterdir()} - {MANIFEST_NAME}
    assert set(raw["files"]) == on_disk


def test_the_bundle_stays_within_3x_the_whole_model(bundle_dir: Path) -> None:
    # The whole model as one self-contained ONNX file: full.onnx with its weights inline.
    whole_bytes = len(onnx.load(str(bundle_dir / "full.onnx")).SerializeToString())
    bundle_bytes = sum(p.stat().st_size for p in bundle_dir.iterdir())
    assert whole_bytes > 10_000_000  # the real weights, not a stub
    assert bundle_bytes <= 3 * whole_bytes, (bundle_bytes, whole_bytes)


def test_fp32_top1_matches_torch_whole_and_split(bundle_dir: Path, device_runtime: DeviceRuntime,
                                                 inputs: dict[str, torch.Tensor],
                                                 local_top1: dict[str, int]) -> None:
    rt = OnnxDeviceRuntime(bundle_dir, precision="fp32", model=MODEL,
                           fingerprint=device_runtime.fingerprint)
    point = rt.middle_point()
    assert point.name == device_runtime.middle_point().name
    for name, x in inputs.items():
        xn = x.numpy()
        assert int(rt.run_full(xn).argmax()) == local_top1[name], name
        split = rt.run_tail(point, rt.run_head(point, xn))
        assert int(split.argmax()) == local_top1[name], name
        ok, diff = check.close_enough(split, device_runtime.run_full(x).numpy())
        assert ok, (name, diff)


def test_int8_top1_agrees_with_fp32_on_the_photos(bundle_dir: Path,
                                                  inputs: dict[str, torch.Tensor],
                                                  local_top1: dict[str, int]) -> None:
    rt = OnnxDeviceRuntime(bundle_dir, precision="int8")
    point = rt.middle_point()
    for name, x in inputs.items():
        assert int(rt.run_full(x.numpy()).argmax()) == local_top1[name], name
        split = rt.run_tail(point, rt.run_head(point, x.numpy()))
        assert int(split.argmax()) == local_top1[name], name


def test_tails_take_any_batch_size(bundle_dir: Path, inputs: dict[str, torch.Tensor]) -> None:
    rt = OnnxDeviceRuntime(bundle_dir)
    point = rt.point(3)
    batch = np.concatenate([x.numpy() for x in inputs.values()])
    logits = rt.run_tail(point, rt.run_head(point, batch))
    one_by_one = np.concatenate([rt.run_full(x.numpy()) for x in inputs.values()])
    assert logits.shape == (len(inputs), 1000)
    assert np.array_equal(logits.argmax(1), one_by_one.argmax(1))


def test_frames_decode_like_the_torch_devices(bundle_dir: Path, device_runtime: DeviceRuntime,
                                              inputs: dict[str, torch.Tensor]) -> None:
    rt = OnnxDeviceRuntime(bundle_dir)
    x = inputs["chelsea"]
    point = rt.middle_point()
    frame = wire.decode(rt.encode(point, rt.run_head(point, x.numpy()), request_id="r1"))
    assert (frame.model, frame.fingerprint, frame.split) == (
        MODEL, device_runtime.fingerprint, point.name)
    want = device_runtime.run_head(device_runtime.point(point.name), x)
    for enc, ref in zip(frame.tensors, want, strict=True):
        got = codec_torch.decode_tensor(enc)
        assert got.shape == ref.shape
        assert float((got - ref).abs().max()) <= max(enc.scale) + 1e-3


def test_the_onnx_device_runs_without_torch(bundle_dir: Path) -> None:
    code = (
        "import sys, numpy as np\n"
        "from device_client.onnx_runtime import OnnxDeviceRuntime\n"
        f"rt = OnnxDeviceRuntime({str(bundle_dir)!r}, precision='int8')\n"
        "p = rt.middle_point(); x = np.zeros(rt.input_shape, np.float32)\n"
        "rt.run_tail(p, rt.run_head(p, x)); rt.run_full(x)\n"
        "sys.exit(11 if 'torch' in sys.modules else 0)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False, timeout=300)
    assert done.returncode == 0, done.stderr


def test_a_missing_precision_or_bad_threads_say_what_to_do(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    fp32_only = dataclasses.replace(bundle, manifest=dataclasses.replace(
        bundle.manifest, full={"fp32": bundle.full["fp32"]}))
    with pytest.raises(ConfigError, match="export it with --int8"):
        OnnxDeviceRuntime(fp32_only, precision="int8")
    with pytest.raises(ConfigError, match="threads"):
        OnnxDeviceRuntime(bundle_dir, threads=0)


def test_export_refuses_a_bundle_that_disagrees(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    # A negative tolerance: every float32 graph now "disagrees" with torch.
    monkeypatch.setattr(check, "ATOL", -1.0)
    out = tmp_path / "bad"
    assert cli.main(["export", "--model", MODEL, "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "disagrees with torch" in err and "no bundle" in err
    assert list(tmp_path.iterdir()) == []  # neither the bundle nor its staging directory


@pytest.mark.parametrize("args", [["--calibration", "."], []], ids=["calibration", "not-empty"])
def test_export_usage_errors_are_one_line(tmp_path: Path, args: list[str]) -> None:
    (tmp_path / "something.txt").write_text("not a bundle")
    done = _cli("export", "--model", MODEL, "--out", str(tmp_path), *args)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("device_client: error: ")


def test_export_of_a_users_checkpoint(tmp_path: Path) -> None:
    from shared.models import fingerprint, get_model

    model = get_model("resnet18", weights="random", seed=5)
    checkpoint = tmp_path / "r18.pth"
    torch.save(model.state_dict(), checkpoint)
    out = tmp_path / "r18"
    done = _cli("export", "--model", "resnet18", "--weights", str(checkpoint), "--out", str(out))
    assert done.returncode == 0, done.stderr
    bundle = load_bundle(out, model="resnet18", fingerprint=fingerprint(model))
    rt = OnnxDeviceRuntime(bundle)
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        want = model(x).numpy()
    ok, diff = check.close_enough(rt.run_full(x.numpy()), want)
    assert ok, diff


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_the_profiler_runs_on_the_onnx_device(bundle_dir: Path, precision: str,
                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                              ) -> None:
    monkeypatch.setenv("SPLITSERVE_CACHE_DIR", str(tmp_path))
    runtime = OnnxDeviceRuntime(bundle_dir, precision=precision)  # type: ignore[arg-type]
    profile, path, measured = load_or_measure(runtime, options=EncodeOptions(), repeats=2)
    heads = [c.head_ms for c in profile.costs if c.split not in (DEVICE, CLOUD)]
    assert measured and len(heads) == len(runtime.points)
    assert all(a <= b for a, b in zip(heads, heads[1:], strict=False))
    assert all(0 < ms <= profile.cost(DEVICE).head_ms for ms in heads)
    key = json.loads(path.read_text())["key"]
    assert (key["runtime"], key["precision"], key["threads"]) == ("onnx", precision, 1)
    assert key["runtime_version"] != "unknown"


def test_a_service_with_bundle_int8_hands_devices_int8_graphs(
        bundle_dir: Path, photos: dict[str, Image.Image], local_top1: dict[str, int],
        tmp_path: Path) -> None:
    # The service reuses the module's int8 export as its own cached bundle (same weights, so
    # same fingerprint): no second calibration. The device downloads it and runs int8 heads.
    from device_client.local_service import LocalService

    fp = load_bundle(bundle_dir, model=MODEL).manifest.fingerprint
    root = tmp_path / "service-bundles"
    shutil.copytree(bundle_dir, root / f"{MODEL}-{fp}")
    names = list(photos)[:3]
    files = []
    for name in names:
        files.append(str(tmp_path / f"{name}.jpg"))
        photos[name].convert("RGB").save(files[-1], quality=95)
    env = {"SPLITSERVE_BUNDLE_DIR": str(root), "SPLITSERVE_PROFILE_REPEATS": "1"}
    device_env = {**os.environ, "SPLITSERVE_CACHE_DIR": str(tmp_path / "device-cache")}
    with LocalService(models=[MODEL], env={**env, "SPLITSERVE_BUNDLE_INT8": "1"}) as service:
        done = subprocess.run(
            [sys.executable, "-m", "device_client", "infer", *files, "--server", service.url,
             "--split", "_blocks.9", "--precision", "int8", "--json"],
            capture_output=True, text=True, timeout=300, check=False, env=device_env)
    assert done.returncode == 0, done.stderr
    answers = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(a["split"], a["ran"]) for a in answers] == [("_blocks.9", "split")] * len(names)
    assert [a["top5"][0]["index"] for a in answers] == [local_top1[n] for n in names]

    # Without the setting the service's bundle (the session's fp32 one) has no int8 graphs,
    # and the device says what to do.
    with LocalService(models=[MODEL], env={"SPLITSERVE_PROFILE_REPEATS": "1"}) as service:
        refused = subprocess.run(
            [sys.executable, "-m", "device_client", "infer", files[0], "--server", service.url,
             "--split", "device", "--precision", "int8"],
            capture_output=True, text=True, timeout=300, check=False,
            env={**device_env, "SPLITSERVE_CACHE_DIR": str(tmp_path / "device-cache-2")})
    assert refused.returncode == 1
    assert len(refused.stderr.splitlines()) == 1 and "SPLITSERVE_BUNDLE_INT8=1" in refused.stderr
