"""Reading an exported ONNX bundle: the manifest, checked, and the paths of its graphs.

A bundle is a directory that ``python -m device_client export`` writes (``shared.export``)::

    manifest.json       what follows, plus the sha256 of every other file
    weights.bin         every graph's initializers, each stored once (ONNX external data)
    full.onnx           the whole model: input -> logits             (full.int8.onnx: int8)
    head_NNN.onnx       input -> the tensors crossing split point NNN  (head_NNN.int8.onnx)
    tail_NNN.onnx       those tensors -> logits, float32, dynamic batch dimension

Graphs hold no weights of their own: they point into ``weights.bin`` by offset, so 25 heads and
25 tails cost a few hundred kB of graph on top of one copy of the weights. (All files sit in one
directory: ONNX Runtime refuses external data outside a graph's own directory.)

This module needs no torch and no onnxruntime: it reads JSON and hashes files. Every problem is
one ``BundleError`` subclass with a one-line message.

    bundle = load_bundle("bundles/efficientnet_lite0", fingerprint=runtime.fingerprint)
    bundle.point("_blocks.8").tail           # 'tail_011.onnx'
    bundle.path(bundle.full["fp32"])         # PosixPath('bundles/efficientnet_lite0/full.onnx')
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from shared.errors import (
    BundleError,
    BundleIntegrityError,
    BundleMismatchError,
    BundleVersionError,
    UnknownSplitPointError,
)

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "PRECISIONS",
    "Bundle",
    "BundlePoint",
    "BundlePreprocessing",
    "BundleTensor",
    "Manifest",
    "file_sha256",
    "load_bundle",
    "parse_manifest",
]

#: The manifest layout this code writes and reads. A reader refuses any other: a field whose
#: meaning changed would otherwise be read wrongly, silently.
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
#: ``fp32`` graphs are always there; ``int8`` (static QDQ) heads and whole model are optional.
PRECISIONS: tuple[str, ...] = ("fp32", "int8")
_DTYPES = ("float32", "float16", "bfloat16")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_FINGERPRINT = re.compile(r"[0-9a-f]{32}")
_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class BundleTensor:
    """A named graph input or output: its ONNX value name, shape (batch 1 first) and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self) -> None:
        if not self.name:
            raise BundleError("a tensor in the manifest has no name")
        if not self.shape or any(type(d) is not int or d < 1 for d in self.shape):
            raise BundleError(f"tensor {self.name!r} has a bad shape {self.shape!r:.60}")
        if self.dtype not in _DTYPES:
            raise BundleError(f"tensor {self.name!r} has dtype {self.dtype!r:.30}; "
                              f"known: {', '.join(_DTYPES)}")

    @property
    def float32_bytes(self) -> int:
        return 4 * math.prod(self.shape)


@dataclass(frozen=True)
class BundlePoint:
    """A split point as exported: the same ``name`` and ``index`` as ``shared.partition``'s
    ``SplitPoint``, the tensors its head outputs (in the order the tail takes them), and the
    relative paths of its head per precision and of its float32 tail."""

    name: str
    index: int
    tensors: tuple[BundleTensor, ...]
    head: Mapping[str, str]
    tail: str

    def __post_init__(self) -> None:
        if not self.name or self.index < 0 or not self.tensors:
            raise BundleError(f"split point {self.name!r} needs a name, an index >= 0 and "
                              "at least one tensor")
        if "fp32" not in self.head or set(self.head) - set(PRECISIONS):
            raise BundleError(f"split point {self.name!r}: heads must be fp32 [+ int8], "
                              f"got {sorted(self.head)}")

    @property
    def float32_bytes(self) -> int:
        """Bytes the crossing tensors take as float32, as ``SplitPoint.float32_bytes``."""
        return sum(t.float32_bytes for t in self.tensors)


@dataclass(frozen=True)
class BundlePreprocessing:
    """The fields of ``shared.preprocess.Preprocessing`` (which needs torch), as exported."""

    resize_size: int
    crop_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass(frozen=True)
class Manifest:
    """``manifest.json``, parsed and checked. ``files`` maps every relative path to its sha256."""

    format_version: int
    model: str
    fingerprint: str
    opset: int
    preprocessing: BundlePreprocessing
    labels: tuple[str, ...]
    input: BundleTensor
    output: BundleTensor
    full: Mapping[str, str]
    points: tuple[BundlePoint, ...]
    weights: str
    files: Mapping[str, str]
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def precisions(self) -> tuple[str, ...]:
        return tuple(p for p in PRECISIONS if p in self.full)


@dataclass(frozen=True)
class Bundle:
    """A bundle on disk whose files have been checked against its manifest."""

    root: Path
    manifest: Manifest

    @property
    def points(self) -> tuple[BundlePoint, ...]:
        return self.manifest.points

    @property
    def full(self) -> Mapping[str, str]:
        return self.manifest.full

    def point(self, key: str | int) -> BundlePoint:
        """A split point by name or index (an int or a string of digits), as
        ``Partitioner.point``; raises ``UnknownSplitPointError``."""
        points = self.manifest.points
        if isinstance(key, int) or (key.isascii() and key.isdigit()):
            if 0 <= int(key) < len(points):
                return points[int(key)]
        else:
            for point in points:
                if point.name == key:
                    return point
        raise UnknownSplitPointError(f"no split point {key!r} in the bundle; valid: "
                                     f"0..{len(points) - 1} or a name such as {points[0].name!r}")

    def path(self, relative: str) -> Path:
        """The absolute path of a file the manifest lists."""
        return self.root / relative


def load_bundle(root: str | os.PathLike[str], *, model: str | None = None,
                fingerprint: str | None = None, verify: bool = True) -> Bundle:
    """Read ``root/manifest.json``, check it is for ``model`` and ``fingerprint`` (when given),
    and (``verify``) that every file it lists exists with its recorded sha256.

    Raises ``BundleVersionError``, ``BundleMismatchError``, ``BundleIntegrityError`` or
    ``BundleError``, each with a one-line message naming the bundle.
    """
    root = Path(root)
    manifest_path = root / MANIFEST_NAME
    try:
        text = manifest_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BundleIntegrityError(f"{root} is not a bundle: it has no {MANIFEST_NAME}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"cannot read {manifest_path}: {exc}") from exc
    try:
        manifest = parse_manifest(json.loads(text))
    except json.JSONDecodeError as exc:
        raise BundleError(f"{manifest_path} is not JSON: {exc}") from exc
    if model is not None and manifest.model != model:
        raise BundleMismatchError(f"bundle {root} is for model {manifest.model!r}, "
                                  f"not {model!r}")
    if fingerprint is not None and manifest.fingerprint != fingerprint:
        raise BundleMismatchError(
            f"bundle {root} was exported from weights {manifest.fingerprint}, not "
            f"{fingerprint}: export it again from these weights")
    if verify:
        for relative, digest in manifest.files.items():
            path = root / relative
            if not path.is_file():
                raise BundleIntegrityError(f"bundle {root} is missing {relative}")
            if file_sha256(path) != digest:
                raise BundleIntegrityError(f"bundle {root}: {relative} does not match its "
                                           "sha256 in the manifest (corrupt or altered)")
    return Bundle(root, manifest)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def parse_manifest(data: Any) -> Manifest:
    """Check a decoded ``manifest.json`` field by field; raises ``BundleError``.

    The version is checked first, so a future format fails as ``BundleVersionError`` whatever
    else changed.
    """
    if not isinstance(data, dict):
        raise BundleError("manifest.json must hold a JSON object")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleVersionError(f"bundle format version {version!r:.20} is not supported "
                                 f"(this splitserve reads {FORMAT_VERSION}): export it again")
    try:
        return _parse(data)
    except (KeyError, TypeError, ValueError) as exc:
        what = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
        raise BundleError(f"manifest.json is malformed: {what}") from exc


def _parse(data: dict[str, Any]) -> Manifest:
    files = _mapping(data["files"], "files")
    for relative, digest in files.items():
        _relative(relative)
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise ValueError(f"files[{relative!r}] is not a sha256")
    full = {str(k): _listed(v, files) for k, v in _mapping(data["full"], "full").items()}
    if "fp32" not in full or set(full) - set(PRECISIONS):
        raise ValueError(f"full must be fp32 [+ int8], got {sorted(full)}")
    points = tuple(_point(p, files) for p in _list(data["split_points"], "split_points"))
    if not points or [p.index for p in points] != list(range(len(points))):
        raise ValueError("split_points must be listed in index order 0..n-1")
    fingerprint = data["fingerprint"]
    if not isinstance(fingerprint, str) or not _FINGERPRINT.fullmatch(fingerprint):
        raise ValueError("fingerprint must be 32 hex digits")
    pre = _mapping(data["preprocessing"], "preprocessing")
    labels = tuple(str(s) for s in _list(data["labels"], "labels"))
    output = _tensor(data["output"])
    if len(labels) != output.shape[-1]:
        raise ValueError(f"{len(labels)} labels for {output.shape[-1]} outputs")
    extra = {k: v for k, v in data.items() if k not in _FIELDS}
    return Manifest(
        format_version=FORMAT_VERSION, model=_str(data["model"], "model"),
        fingerprint=fingerprint, opset=_int(data["opset"], "opset"),
        preprocessing=BundlePreprocessing(
            _int(pre["resize_size"], "resize_size"), _int(pre["crop_size"], "crop_size"),
            _floats3(pre["mean"], "mean"), _floats3(pre["std"], "std")),
        labels=labels, input=_tensor(data["input"]), output=output, full=full, points=points,
        weights=_listed(data["weights"], files), files=files, extra=extra)


_FIELDS = frozenset({"format_version", "model", "fingerprint", "opset", "preprocessing",
                     "labels", "input", "output", "full", "split_points", "weights", "files"})


def _point(data: Any, files: Mapping[str, str]) -> BundlePoint:
    d = _mapping(data, "split point")
    head = {str(k): _listed(v, files) for k, v in _mapping(d["head"], "head").items()}
    return BundlePoint(
        name=_str(d["name"], "name"), index=_int(d["index"], "index"),
        tensors=tuple(_tensor(t) for t in _list(d["tensors"], "tensors")),
        head=head, tail=_listed(d["tail"], files))


def _tensor(data: Any) -> BundleTensor:
    d = _mapping(data, "tensor")
    shape = tuple(_int(x, "shape") for x in _list(d["shape"], "shape"))
    return BundleTensor(_str(d["name"], "name"), shape, _str(d["dtype"], "dtype"))


def _listed(value: Any, files: Mapping[str, str]) -> str:
    # Every graph the manifest names must be covered by a sha256, or verification means nothing.
    path = _relative(value)
    if path not in files:
        raise ValueError(f"{path!r} has no sha256 in files")
    return path


def _relative(value: Any) -> str:
    # A manifest must not point outside its own directory.
    if not isinstance(value, str) or not value:
        raise ValueError(f"a file name must be a non-empty string, got {value!r:.60}")
    pure = PurePosixPath(value)
    if pure.is_absolute() or ".." in pure.parts or "\\" in value or str(pure) != value:
        raise ValueError(f"file name {value!r:.60} is not a plain relative path")
    return value


def _mapping(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"{what} must be an object")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"{what} must be a list")
    return value


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(f"{what} must be a non-empty string")
    return value


def _int(value: Any, what: str) -> int:
    if type(value) is not int:
        raise TypeError(f"{what} must be an integer")
    return value


def _floats3(value: Any, what: str) -> tuple[float, float, float]:
    items = _list(value, what)
    if len(items) != 3 or any(type(x) not in (int, float) for x in items):
        raise TypeError(f"{what} must be three numbers")
    return (float(items[0]), float(items[1]), float(items[2]))
