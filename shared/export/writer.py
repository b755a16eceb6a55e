"""``export_bundle``: a registered model and its weights -> a checked bundle directory.

The bundle is built in a hidden sibling directory, checked graph by graph against torch
(``shared.export.check``), and only then given its manifest and moved to ``out``: a bundle that
disagrees with torch is never left behind, not even in part.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
import torch
from PIL import Image, ImageOps

from shared.bundle import FORMAT_VERSION, MANIFEST_NAME, file_sha256, load_bundle
from shared.errors import ConfigError, ImageError
from shared.export.check import Checker
from shared.export.graphs import INPUT_NAME, OPSET, OUTPUT_NAME, export_probe, extract
from shared.export.quantize import (
    EXTRA_BITS,
    FLOAT32_WEIGHTS,
    RESIDUAL_WEIGHTS,
    Rounded,
    quantize,
)
from shared.export.weights import SharedWeights
from shared.models import fingerprint, get_model, get_spec, imagenet_labels
from shared.models.registry import Weights
from shared.partition import Partitioner
from shared.preprocess import Preprocessing, load_image, preprocess, reference_photo

__all__ = ["calibration_images", "export_bundle"]

WEIGHTS_NAME = "weights.bin"
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def export_bundle(model: str, out: str | os.PathLike[str], *, weights: Weights | None = None,
                  int8: bool = False,
                  calibration: str | os.PathLike[str] | Sequence[Image.Image] | None = None
                  ) -> Path:
    """Export ``model`` (with ``weights``, as ``get_model`` takes them) to the bundle ``out``.

    ``int8`` adds int8 heads and whole model, calibrated on ``calibration``: images, or a
    directory of them (default: the reference photo the package ships). An existing bundle at
    ``out`` is replaced; any other non-empty directory is refused. Returns ``out``.

        export_bundle("efficientnet_lite0", "bundles/lite0", int8=True)  # -> Path("bundles/lite0")
    """
    out = Path(out)
    if out.exists() and not (out / MANIFEST_NAME).is_file() and (
            not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} exists and is not a bundle: choose an empty or new --out")
    if calibration is not None and not int8:
        raise ConfigError("--calibration only applies with --int8")
    images: Sequence[Image.Image] = []
    if int8:
        images = (calibration if isinstance(calibration, Sequence) and
                  not isinstance(calibration, str) else calibration_images(calibration))
    spec = get_spec(model)
    torch_model = get_model(model, weights=weights)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Not mkdtemp: its 0700 would become the bundle's mode; a bundle is as readable as the
    # user's umask makes any other directory.
    staging = out.parent / f".{out.name}.export-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        manifest = _build(staging, model, torch_model, spec.preprocessing, spec.num_classes,
                          images)
        (staging / MANIFEST_NAME).write_text(_json(manifest), encoding="utf-8")
        load_bundle(staging, model=model, fingerprint=manifest["fingerprint"])  # reads back
        _replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def calibration_images(directory: str | os.PathLike[str] | None) -> list[Image.Image]:
    """The images of ``directory`` (sorted by name), or the reference photo the package ships.

    (The device CLI adds scikit-image's sample photos to the default.)
    """
    if directory is None:
        return [reference_photo()]
    root = Path(directory)
    if not root.is_dir():
        raise ConfigError(f"--calibration {root} is not a directory")
    paths = sorted(p for p in root.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not paths:
        raise ConfigError(f"--calibration {root} holds no images ({', '.join(_IMAGE_SUFFIXES)})")
    out = []
    for path in paths:
        try:
            out.append(load_image(path))
        except ImageError as exc:
            raise ConfigError(f"--calibration: {path}: {exc}") from exc
    return out


def _build(staging: Path, name: str, model: torch.nn.Module, pre: Preprocessing,
           num_classes: int, images: Sequence[Image.Image]) -> dict[str, Any]:
    example = torch.zeros(1, 3, pre.crop_size, pre.crop_size)
    part = Partitioner(model, example)
    probe = export_probe(part, example)
    extractor = probe.extractor()
    store = SharedWeights(staging / WEIGHTS_NAME)
    calib = [preprocess(view, pre).numpy() for im in images for view in _views(im)]
    rounded: Rounded = {}  # heads share the whole model's weights: round each once

    def save(graph: onnx.ModelProto, file_name: str) -> str:
        store.externalize(graph)
        onnx.save(graph, staging / file_name)
        return file_name

    def save_int8(graph: onnx.ModelProto, file_name: str) -> str:
        with tempfile.TemporaryDirectory(prefix="splitserve-int8-") as scratch:
            int8 = quantize(graph, calib, input_name=INPUT_NAME, workdir=Path(scratch),
                            rounded=rounded)
        return save(int8, file_name)

    full_graph = extract(extractor, [INPUT_NAME], [OUTPUT_NAME])
    full: dict[str, str] = {}
    if calib:
        full["int8"] = save_int8(full_graph, "full.int8.onnx")
    full["fp32"] = save(full_graph, "full.onnx")
    points: list[dict[str, Any]] = []
    for point, names in zip(probe.points, probe.crossing, strict=True):
        stem = f"{point.index:03d}"
        head_graph = extract(extractor, [INPUT_NAME], list(names))
        head: dict[str, str] = {}
        if calib:
            head["int8"] = save_int8(head_graph, f"head_{stem}.int8.onnx")
        head["fp32"] = save(head_graph, f"head_{stem}.onnx")
        tail = save(extract(extractor, list(names), [OUTPUT_NAME]), f"tail_{stem}.onnx")
        points.append({
            "name": point.name, "index": point.index, "head": head, "tail": tail,
            "tensors": [{"name": n, "shape": list(t.shape), "dtype": t.dtype}
                        for n, t in zip(names, point.tensors, strict=True)]})
    del extractor, probe

    checker = Checker(staging, model, preprocess(reference_photo(), pre),
                      input_name=INPUT_NAME, output_name=OUTPUT_NAME)
    for precision, file_name in full.items():
        checker.full(file_name, int8=precision == "int8")
    for entry, point in zip(points, part.points, strict=True):
        head_module, _ = part.split(point)
        tensor_names = [t["name"] for t in entry["tensors"]]
        for precision, file_name in entry["head"].items():
            checker.head_tail(file_name, entry["tail"], head_module, tensor_names,
                              int8=precision == "int8")

    labels = imagenet_labels() if num_classes == 1000 else tuple(
        f"class {i}" for i in range(num_classes))
    files = {p.name: file_sha256(p) for p in sorted(staging.iterdir()) if p.is_file()}
    extra: dict[str, Any] = {"exported_with": _versions()}
    if calib:
        extra["calibration"] = {"images": len(calib), "method": "minmax", "format": "qdq",
                                "weights": "int8 per channel, adaptive rounding",
                                "activations": "uint8",
                                "float32_weights": list(FLOAT32_WEIGHTS),
                                "residual_stream": "float32, int8 GEMMs",
                                "residual_weights": list(RESIDUAL_WEIGHTS),
                                "extra_bits": list(EXTRA_BITS)}
    return {
        "format_version": FORMAT_VERSION, "model": name, "fingerprint": fingerprint(model),
        "opset": OPSET,
        "preprocessing": {"resize_size": pre.resize_size, "crop_size": pre.crop_size,
                          "mean": list(pre.mean), "std": list(pre.std)},
        "labels": list(labels),
        "input": {"name": INPUT_NAME, "shape": list(example.shape), "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": [1, num_classes], "dtype": "float32"},
        "full": full, "split_points": points, "weights": WEIGHTS_NAME, "files": files, **extra}


def _views(img: Image.Image) -> list[Image.Image]:
    """The image, its mirror and its four corners at 80% of each side.

    A handful of photos calibrated as they are gives ranges too narrow for the next photo; on
    the sample photos, corner crops turned a flipped top-1 (chelsea: 0.11 logits between the
    two cat classes) back into agreement with float32.
    """
    w, h = img.size
    cw, ch = max(1, int(w * 0.8)), max(1, int(h * 0.8))
    corners = [(0, 0), (w - cw, 0), (0, h - ch), (w - cw, h - ch)]
    return [img, ImageOps.mirror(img), *(img.crop((x, y, x + cw, y + ch)) for x, y in corners)]


def _replace(staging: Path, out: Path) -> None:
    if not out.exists():
        os.replace(staging, out)
        return
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
        os.replace(staging, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)  # an old bundle: swapped, then removed
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)


def _versions() -> dict[str, str]:
    import onnxruntime

    return {"torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


def _json(obj: dict[str, Any]) -> str:
    import json

    return json.dumps(obj, indent=1) + "\n"
