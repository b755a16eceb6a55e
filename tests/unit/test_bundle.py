"""shared.bundle: a manifest is read through an allowlist, and every file is checked."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from shared.bundle import MANIFEST_NAME, load_bundle, parse_manifest
from shared.errors import (
    BundleError,
    BundleIntegrityError,
    BundleMismatchError,
    BundleVersionError,
    UnknownSplitPointError,
)
from tests.support.bundles import TINY_FINGERPRINT, write_tiny_bundle

FINGERPRINT = TINY_FINGERPRINT


def _write_bundle(root: Path, **overrides: Any) -> dict[str, Any]:
    """The shared tiny bundle, with an extra manifest field the allowlist must keep aside."""
    return write_tiny_bundle(root, **{"exported_with": {"torch": "2.13"}, **overrides})


def test_a_good_bundle_loads(tmp_path: Path) -> None:
    _write_bundle(tmp_path)
    bundle = load_bundle(tmp_path, model="tiny", fingerprint=FINGERPRINT)
    point = bundle.point("features.3")
    assert bundle.point(0) == bundle.point("0") == point
    assert point.float32_bytes == 4 * 8 * 4 * 4
    assert bundle.path(point.tail) == tmp_path / "tail_000.onnx"
    assert bundle.manifest.precisions == ("fp32",)
    assert bundle.manifest.preprocessing.mean == (1.0, 2.0, 3.0)
    assert bundle.manifest.extra == {"exported_with": {"torch": "2.13"}}
    with pytest.raises(UnknownSplitPointError):
        bundle.point("features.4")


def test_reading_a_bundle_needs_no_torch() -> None:
    import subprocess

    code = ("import sys, shared.bundle, device_client.onnx_runtime; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_a_wrong_sha256_is_refused(tmp_path: Path) -> None:
    _write_bundle(tmp_path)
    (tmp_path / "tail_000.onnx").write_bytes(b"tampered")
    with pytest.raises(BundleIntegrityError, match="tail_000.onnx does not match its sha256"):
        load_bundle(tmp_path)


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    _write_bundle(tmp_path)
    (tmp_path / "weights.bin").unlink()
    with pytest.raises(BundleIntegrityError, match="missing weights.bin"):
        load_bundle(tmp_path)


def test_a_missing_manifest_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BundleIntegrityError, match="not a bundle"):
        load_bundle(tmp_path)


@pytest.mark.parametrize(("field", "value"), [("fingerprint", "f" * 32), ("model", "other")],
                         ids=["fingerprint", "model"])
def test_a_bundle_of_other_weights_or_model_is_refused(tmp_path: Path, field: str,
                                                       value: str) -> None:
    _write_bundle(tmp_path, **{field: value})
    with pytest.raises(BundleMismatchError, match=field if field == "model" else "weights"):
        load_bundle(tmp_path, model="tiny", fingerprint=FINGERPRINT)


@pytest.mark.parametrize("version", [0, 2, "1", None], ids=["0", "2", "string", "absent"])
def test_an_unknown_format_version_is_refused(tmp_path: Path, version: object) -> None:
    _write_bundle(tmp_path, format_version=version)
    with pytest.raises(BundleVersionError, match="format version"):
        load_bundle(tmp_path)


@pytest.mark.parametrize(("field", "value"), [
    ("weights", "../weights.bin"),
    ("weights", "/etc/passwd"),
    ("full", {"fp32": "unlisted.onnx"}),
    ("full", {"int4": "full.onnx"}),
    ("labels", ["just one"]),
    ("fingerprint", "not hex"),
    ("split_points", []),
    ("input", {"name": "input", "shape": [1, 0], "dtype": "float32"}),
    ("input", {"name": "input", "shape": [1, 3], "dtype": "int64"}),
    ("files", {"full.onnx": "abc"}),
], ids=["parent-dir", "absolute", "unlisted", "precision", "labels", "fingerprint",
        "no-points", "zero-dim", "dtype", "bad-sha"])
def test_a_malformed_manifest_is_one_bundle_error(tmp_path: Path, field: str,
                                                  value: object) -> None:
    _write_bundle(tmp_path, **{field: value})
    with pytest.raises(BundleError) as info:
        load_bundle(tmp_path)
    assert "\n" not in str(info.value)


def test_garbage_is_a_bundle_error(tmp_path: Path) -> None:
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(BundleError, match="not JSON"):
        load_bundle(tmp_path)
    garbage: object
    for garbage in ([], "x", {"format_version": 1}):
        with pytest.raises(BundleError):
            parse_manifest(garbage)
