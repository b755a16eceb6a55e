"""Bundles and bundle archives for tests: a tiny well-formed bundle, tar archives built member by
member (hostile ones too), and a real HTTP server that hands an archive out as the service does.

    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp()) / "tiny"
    >>> sorted(write_tiny_bundle(root)["files"])
    ['full.onnx', 'head_000.onnx', 'tail_000.onnx', 'weights.bin']
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from shared.bundle import FORMAT_VERSION, MANIFEST_NAME
from tests.support.fake_service import LoopbackServer

__all__ = ["TINY_FINGERPRINT", "TINY_MODEL", "ArchiveService", "archive_of", "tar_of",
           "write_tiny_bundle"]

TINY_MODEL = "tiny"
TINY_FINGERPRINT = "0123456789abcdef0123456789abcdef"


def write_tiny_bundle(root: Path, **overrides: Any) -> dict[str, Any]:
    """A tiny well-formed bundle (fake graph bytes, one split point, two classes); returns its
    manifest. ``overrides`` replace manifest fields after the sha256s are computed."""
    root.mkdir(parents=True, exist_ok=True)
    contents = {"weights.bin": b"\0" * 64, "full.onnx": b"full", "head_000.onnx": b"head",
                "tail_000.onnx": b"tail"}
    for name, data in contents.items():
        (root / name).write_bytes(data)
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION, "model": TINY_MODEL, "fingerprint": TINY_FINGERPRINT,
        "opset": 18,
        "preprocessing": {"resize_size": 256, "crop_size": 224, "mean": [1, 2, 3],
                          "std": [4.0, 5.0, 6.0]},
        "labels": ["cat", "dog"],
        "input": {"name": "input", "shape": [1, 3, 224, 224], "dtype": "float32"},
        "output": {"name": "logits", "shape": [1, 2], "dtype": "float32"},
        "full": {"fp32": "full.onnx"},
        "split_points": [{"name": "features.3", "index": 0, "head": {"fp32": "head_000.onnx"},
                          "tail": "tail_000.onnx",
                          "tensors": [{"name": "x3", "shape": [1, 8, 4, 4],
                                       "dtype": "float32"}]}],
        "weights": "weights.bin",
        "files": {n: hashlib.sha256(d).hexdigest() for n, d in contents.items()},
    }
    manifest.update(overrides)
    (root / MANIFEST_NAME).write_text(json.dumps(manifest))
    return manifest


def tar_of(members: Sequence[tuple[tarfile.TarInfo, bytes | None]], *, gzip: bool = False
           ) -> bytes:
    """A tar (or tar.gz) of exactly these members: hostile names, links and devices included."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz" if gzip else "w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def archive_of(root: Path, *, skip: Sequence[str] = (), gzip: bool = False) -> bytes:
    """The files of a bundle directory as a tar, as the service would send them."""
    members = []
    for path in sorted(root.iterdir()):
        if path.is_file() and path.name not in skip:
            members.append((tarfile.TarInfo(path.name), path.read_bytes()))
    return tar_of(members, gzip=gzip)


class ArchiveService(LoopbackServer):
    """``with ArchiveService(data, etag) as fake:`` serves ``GET /v2/models/*/bundle`` on
    127.0.0.1 as the real service does: the bytes with their ETag, 304 when If-None-Match names
    it, and first ``busy`` answers of 503 with ``Retry-After: 0``. Set ``fake.data`` and
    ``fake.etag`` to change what it serves; ``fake.statuses`` lists what it answered."""

    def __init__(self, data: bytes, etag: str, *, busy: int = 0) -> None:
        self.data, self.etag, self.busy = data, etag, busy
        self.statuses: list[int] = []
        super().__init__(_handler(self))


def _handler(fake: ArchiveService) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            if not self.path.endswith("/bundle"):
                self._send(404, b'{"error": "no such path"}', "application/json")
            elif fake.busy > 0:
                fake.busy -= 1
                self._send(503, b'{"error": "being exported"}', "application/json",
                           {"Retry-After": "0"})
            elif self.headers.get("If-None-Match") == fake.etag:
                self._send(304, b"", None, {"ETag": fake.etag})
            else:
                self._send(200, fake.data, "application/x-tar", {"ETag": fake.etag})

        def _send(self, status: int, body: bytes, content_type: str | None,
                  headers: dict[str, str] | None = None) -> None:
            fake.statuses.append(status)
            self.send_response(status)
            if content_type:
                self.send_header("Content-Type", content_type)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            if status != 304:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler
