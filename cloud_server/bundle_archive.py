"""A bundle as one download: a plain tar of its files, built once and kept on disk.

    archive = build_archive(bundle)          # <bundles>/<model>-<fp>.<sha16>.tar, or the one there
    archive.etag                             # '"<sha256 of manifest.json>"'
    etag_matches('W/"abc", "def"', '"def"')  # If-None-Match, compared as RFC 9110 says

The archive holds the bundle's files at its top level (``manifest.json`` first, then the rest by
name): regular files only, mode 0644, owner 0, mtime 0. Those fixed headers make it a pure
function of the files, so the same bundle gives the same bytes on every service and after every
restart, which is what a strong ETag promises. The ETag is the sha256 of ``manifest.json``:
the manifest holds the sha256 of every other file, so it names the whole content.

Uncompressed on purpose: ``weights.bin`` (float32, or int8 scales and values) is nearly all
of it and barely compresses; gzip would cost the service seconds per build and the device the
same again per download for a few percent.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import tarfile
from dataclasses import dataclass
from pathlib import Path

from shared.bundle import MANIFEST_NAME, Bundle

__all__ = ["CONTENT_TYPE", "Archive", "build_archive", "etag_matches"]

CONTENT_TYPE = "application/x-tar"


@dataclass(frozen=True)
class Archive:
    """A built archive: where it is, its strong ETag (quoted) and its size."""

    path: Path
    etag: str
    size_bytes: int


def build_archive(bundle: Bundle) -> Archive:
    """The archive of ``bundle`` (a checked one, from ``shared.bundle.load_bundle``), built next
    to the bundle directory unless an archive of this manifest is already there.

    Built under a temporary name and renamed, so a reader never sees half of one; archives of
    other manifests of the same bundle directory are removed.
    """
    root = bundle.root
    manifest = (root / MANIFEST_NAME).read_bytes()
    digest = hashlib.sha256(manifest).hexdigest()
    path = root.parent / f"{root.name}.{digest[:16]}.tar"
    if not path.is_file():
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}")
        try:
            with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
                for name in [MANIFEST_NAME, *sorted(bundle.manifest.files)]:
                    _add(tar, root / name, name)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        for old in root.parent.glob(f"{root.name}.*.tar"):
            if old != path:
                old.unlink(missing_ok=True)
    return Archive(path, f'"{digest}"', path.stat().st_size)


def _add(tar: tarfile.TarFile, source: Path, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.size = source.stat().st_size
    info.mode = 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    with open(source, "rb") as f:
        tar.addfile(info, f)


def etag_matches(if_none_match: str, etag: str) -> bool:
    """Whether an ``If-None-Match`` header names ``etag``: ``*``, or one of a comma-separated
    list, compared weakly (RFC 9110 13.1.2: a ``W/`` prefix is ignored for this header).

        >>> etag_matches('W/"a", "b"', '"b"'), etag_matches('"a"', '"b"'), etag_matches("*", '"b"')
        (True, False, True)
    """
    wanted = etag.removeprefix("W/")
    for tag in if_none_match.split(","):
        tag = tag.strip()
        if tag == "*" or tag.removeprefix("W/") == wanted:
            return True
    return False
