"""The device's ONNX bundles: downloaded once from the service and cached, or given locally.

    async with ServiceClient(url) as client:
        path = await fetch_bundle(client, "efficientnet_lite0", fingerprint)
    bundle = use_bundle("/opt/bundles/lite0", fingerprint=fingerprint)  # --bundle DIR

The cache holds one directory per model and weights fingerprint,
``<cache>/bundles/<model>-<fingerprint>/``, where ``<cache>`` is ``$SPLITSERVE_CACHE_DIR``, else
``$XDG_CACHE_HOME/splitserve``, else ``~/.cache/splitserve`` (as the device's profiles). Next to
the bundle's files, ``.etag`` keeps the ETag it came with.

A download (``GET /v2/models/{model}/bundle``, a tar) is streamed to a staging directory beside
the cache entry, unpacked there with nothing but plain files allowed (no absolute paths, no
``..``, no links, no devices), checked with ``shared.bundle.load_bundle`` (format version, model,
fingerprint, every sha256) and only then renamed into place. A download that fails any of that
is refused with one ``BundleError`` line and the cached bundle, if any, is left as it was.

Imports no torch itself (``device_client.client`` still does, through ``shared.wire``: the
torch-free device's work).
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
import tarfile
import time
import zlib
from pathlib import Path, PurePosixPath

from device_client.client import Download, ServiceClient
from shared.bundle import MANIFEST_NAME, Bundle, load_bundle
from shared.errors import (
    BundleError,
    BundleMismatchError,
    BundleVersionError,
    ConfigError,
    ServiceUnavailableError,
)

__all__ = ["CACHE_ENV", "ETAG_NAME", "MAX_ARCHIVE_BYTES", "bundle_cache_dir", "cache_root",
           "extract_archive", "fetch_bundle", "use_bundle"]

CACHE_ENV = "SPLITSERVE_CACHE_DIR"
ETAG_NAME = ".etag"
#: A bundle is one weights file plus graphs: EfficientNet-Lite0 with int8 is about 40 MB.
MAX_ARCHIVE_BYTES = 2 * 2**30
_MAX_MEMBERS = 1000
_MODEL = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
_FINGERPRINT = re.compile(r"[0-9a-f]{32}")


def cache_root() -> Path:
    """``$SPLITSERVE_CACHE_DIR``, else ``$XDG_CACHE_HOME/splitserve``, else ~/.cache/splitserve.

    The convention of ``device_client.profile.cache_dir``, repeated because that module
    imports torch and this one must not.
    """
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "splitserve"


def bundle_cache_dir(model: str, fingerprint: str, root: str | os.PathLike[str] | None = None
                     ) -> Path:
    """Where the bundle of ``model`` with weights ``fingerprint`` is cached; pure.

        >>> bundle_cache_dir("efficientnet_lite0", "0" * 32, "/c")
        PosixPath('/c/bundles/efficientnet_lite0-00000000000000000000000000000000')
    """
    # Both become a path component: nothing in them may climb out of the cache.
    if not _MODEL.fullmatch(model):
        raise ConfigError(f"model name {model!r:.60} cannot name a cache directory")
    if not _FINGERPRINT.fullmatch(fingerprint):
        raise ConfigError(f"fingerprint {fingerprint!r:.60} is not 32 hex digits")
    return Path(root if root is not None else cache_root()) / "bundles" / f"{model}-{fingerprint}"


def use_bundle(directory: str | os.PathLike[str], *, model: str | None = None,
               fingerprint: str | None = None) -> Bundle:
    """A local bundle (``--bundle DIR``), checked as a downloaded one is: format version,
    ``model`` and ``fingerprint`` when given, every sha256. Raises ``BundleError``."""
    return load_bundle(directory, model=model, fingerprint=fingerprint)


async def fetch_bundle(client: ServiceClient, model: str, fingerprint: str, *,
                       root: str | os.PathLike[str] | None = None,
                       max_bytes: int = MAX_ARCHIVE_BYTES, wait_s: float = 300.0) -> Path:
    """The directory of a checked bundle of ``model`` with weights ``fingerprint``.

    With a checked bundle in the cache, asks the service whether it is current (``If-None-Match``
    with its ETag): a 304 costs one round trip and no download, and a service that cannot be
    reached leaves the cached bundle in use. Otherwise downloads, checks and caches the
    service's. While the service is still exporting (503 with Retry-After) it waits, up to
    ``wait_s`` in all.

    Raises ``BundleError`` for a download that is refused (the cached bundle stays as it was),
    ``ServiceUnavailableError`` when there is no cached bundle and the service cannot give one,
    and ``ServiceRejectedError`` for a 4xx (404: the service does not serve ``model``).
    """
    dest = bundle_cache_dir(model, fingerprint, root)
    cached = _checked(dest, model, fingerprint)
    etag = _read_etag(dest) if cached else None
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.parent / f".{dest.name}.fetch-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        archive = staging / "bundle.tar"
        try:
            download = await _download(client, model, archive, etag, max_bytes, wait_s)
        except ServiceUnavailableError:
            if cached:
                return dest  # the service is away: the checked copy serves
            raise
        if not download.modified:
            return dest
        unpacked = staging / "bundle"
        source = f"the bundle from {client.base_url}"
        kept = f"; kept the cached bundle {dest}" if cached else ""
        try:
            extract_archive(archive, unpacked, source=source)
        except BundleError as exc:
            raise BundleError(f"{exc}{kept}") from exc.__cause__
        try:
            load_bundle(unpacked, model=model, fingerprint=fingerprint)
        except BundleError as exc:
            reason = (str(exc).replace(f"bundle {unpacked}", "the archive")
                      .replace(f"{unpacked}/", "").replace(str(unpacked), "the archive"))
            # load_bundle's advice ("export it again") is for whoever exported it; a device
            # can only ask the service for what it serves.
            reason = reason.replace(": export it again from these weights", "").replace(
                ": export it again", "")
            if isinstance(exc, BundleMismatchError):
                reason += f" (the service serves other weights: see GET /v2/models/{model})"
            elif isinstance(exc, BundleVersionError):
                reason += " (update splitserve here or on the service)"
            raise type(exc)(f"refused {source}: {reason}{kept}") from None
        if download.etag:
            (unpacked / ETAG_NAME).write_text(download.etag, encoding="utf-8")
        try:
            _install(unpacked, dest)
        except OSError as exc:
            raise ConfigError(f"cannot write the bundle cache {dest}: {exc}") from exc
        return dest
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def extract_archive(archive: Path, out: Path, *, source: str = "the bundle archive") -> None:
    """Unpack a bundle tar (plain or gzip) into ``out``, a new directory. Only regular files
    with plain names are accepted, within ``_MAX_MEMBERS`` files; anything else (an absolute
    path, ``..``, a subdirectory, a link, a device) refuses the whole archive with
    ``BundleError``, before anything is written."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members: list[tarfile.TarInfo] = []
            for member in tar:
                if len(members) >= _MAX_MEMBERS:
                    raise BundleError(f"refused {source}: over {_MAX_MEMBERS} files")
                _plain(member, source)
                members.append(member)
            names = [m.name for m in members]
            if len(set(names)) != len(names):
                raise BundleError(f"refused {source}: a file appears twice")
            if MANIFEST_NAME not in names:
                raise BundleError(f"refused {source}: it has no {MANIFEST_NAME}")
            out.mkdir()
            # The checks above already allow only plain files; "data" is the second lock where
            # this Python has it (3.11.4+: Debian 12's 3.11.2, a board's Python, has not).
            if hasattr(tarfile, "data_filter"):
                tar.extractall(out, members=members, filter="data")
            else:
                tar.extractall(out, members=members)
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise BundleError(f"refused {source}: not a readable tar ({exc})") from exc
    except OSError as exc:
        raise BundleError(f"cannot unpack {source} into {out}: {exc}") from exc


def _plain(member: tarfile.TarInfo, source: str) -> None:
    name = member.name
    pure = PurePosixPath(name)
    if (pure.is_absolute() or len(pure.parts) != 1 or name in (".", "..") or "\\" in name
            or str(pure) != name):
        raise BundleError(f"refused {source}: member {name!r:.60} is not a plain file name")
    if not member.isreg():
        kind = ("a link" if member.issym() or member.islnk() else
                "a directory" if member.isdir() else "a device or special file")
        raise BundleError(f"refused {source}: member {name!r:.60} is {kind}, not a file")


async def _download(client: ServiceClient, model: str, archive: Path, etag: str | None,
                    max_bytes: int, wait_s: float) -> Download:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with open(archive, "wb") as f:
                return await client.download_bundle(model, f, etag=etag, max_bytes=max_bytes)
        except ServiceUnavailableError as exc:
            left = deadline - time.monotonic()
            if exc.status != 503 or exc.retry_after_s is None or left <= 0:
                raise
            await asyncio.sleep(min(exc.retry_after_s, left))


def _checked(dest: Path, model: str, fingerprint: str) -> Bundle | None:
    if not (dest / MANIFEST_NAME).is_file():
        return None
    try:
        return load_bundle(dest, model=model, fingerprint=fingerprint)
    except BundleError:
        return None  # a damaged copy: fetched again, and replaced once the new one checks out


def _read_etag(dest: Path) -> str | None:
    try:
        etag = (dest / ETAG_NAME).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    # Sent back as a header: anything odd is dropped rather than sent.
    return etag if etag.isprintable() and len(etag) <= 200 else None


def _install(unpacked: Path, dest: Path) -> None:
    """Rename ``unpacked`` to ``dest``; an old ``dest`` is moved aside first, then removed.
    Each rename is atomic: a reader sees the old bundle or the new one, never a mixture."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        os.replace(dest, old)
    try:
        os.replace(unpacked, dest)
    except OSError:
        # Another process installed one in between: keep that one if it checks out.
        if old is not None and not dest.exists():
            os.replace(old, dest)
            old = None
        if not (dest / MANIFEST_NAME).is_file():
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
