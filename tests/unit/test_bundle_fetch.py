"""device_client.bundles: a downloaded bundle is checked before it is cached, and a bad one never
replaces a good one. Against a small real HTTP server (tests/support/bundles.py) on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import json
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cloud_server.bundle_archive import build_archive
from device_client.bundles import (
    ETAG_NAME,
    bundle_cache_dir,
    extract_archive,
    fetch_bundle,
    use_bundle,
)
from device_client.client import ServiceClient
from device_client.local_service import free_port
from shared.bundle import MANIFEST_NAME, load_bundle
from shared.errors import (
    BundleError,
    BundleIntegrityError,
    BundleMismatchError,
    BundleVersionError,
    ConfigError,
    ServiceUnavailableError,
)
from tests.support.bundles import (
    TINY_FINGERPRINT,
    TINY_MODEL,
    ArchiveService,
    archive_of,
    tar_of,
    write_tiny_bundle,
)


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    root = tmp_path / "served"
    write_tiny_bundle(root)
    return root


def fetch(url: str, cache: Path, **kwargs: Any) -> Path:
    async def go() -> Path:
        async with ServiceClient(url, timeout_s=5.0) as client:
            return await fetch_bundle(client, TINY_MODEL, TINY_FINGERPRINT, root=cache,
                                      **kwargs)

    return asyncio.run(go())


def test_fetched_once_then_revalidated_with_304(tiny: Path, tmp_path: Path) -> None:
    with ArchiveService(archive_of(tiny), '"v1"') as fake:
        path = fetch(fake.url, tmp_path / "cache")
        assert path == bundle_cache_dir(TINY_MODEL, TINY_FINGERPRINT, tmp_path / "cache")
        assert (path / ETAG_NAME).read_text() == '"v1"'
        load_bundle(path, model=TINY_MODEL, fingerprint=TINY_FINGERPRINT)
        assert fetch(fake.url, tmp_path / "cache") == path
        assert fake.statuses == [200, 304]
    # Nothing left behind but the bundle: no staging directory, no archive.
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_a_gzip_archive_and_a_503_while_exporting_are_fine(tiny: Path, tmp_path: Path) -> None:
    with ArchiveService(archive_of(tiny, gzip=True), '"gz"', busy=2) as fake:
        path = fetch(fake.url, tmp_path / "cache")
        assert fake.statuses == [503, 503, 200]
    load_bundle(path, fingerprint=TINY_FINGERPRINT)


def _wrong_sha(root: Path) -> None:
    (root / "tail_000.onnx").write_bytes(b"tampered")


def _missing(root: Path) -> None:
    (root / "head_000.onnx").unlink()


def _other_fingerprint(root: Path) -> None:
    write_tiny_bundle(root, fingerprint="f" * 32)


def _future_version(root: Path) -> None:
    write_tiny_bundle(root, format_version=99)


@pytest.mark.parametrize(("damage", "error", "says"), [
    (_wrong_sha, BundleIntegrityError, "tail_000.onnx does not match its sha256"),
    (_missing, BundleIntegrityError, "is missing head_000.onnx"),
    (_other_fingerprint, BundleMismatchError, f"not {TINY_FINGERPRINT}"),
    (_future_version, BundleVersionError, "format version 99 is not supported"),
], ids=["wrong-sha256", "missing-file", "other-fingerprint", "unknown-version"])
def test_a_bad_download_is_refused_and_the_cached_bundle_kept(
        damage: Callable[[Path], None], error: type[BundleError], says: str, tiny: Path,
        tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with ArchiveService(archive_of(tiny), '"good"') as fake:
        path = fetch(fake.url, cache)
        bad = tmp_path / "bad"
        write_tiny_bundle(bad)
        damage(bad)
        fake.data, fake.etag = archive_of(bad), '"bad"'
        with pytest.raises(error) as caught:
            fetch(fake.url, cache)
    message = str(caught.value)
    assert "\n" not in message and says in message
    assert message.startswith(f"refused the bundle from {fake.url}: ")
    assert f"kept the cached bundle {path}" in message
    assert ".fetch-" not in message  # no staging path
    load_bundle(path, model=TINY_MODEL, fingerprint=TINY_FINGERPRINT)  # still good
    assert (path / ETAG_NAME).read_text() == '"good"'
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_a_bad_first_download_leaves_nothing(tiny: Path, tmp_path: Path) -> None:
    _wrong_sha(tiny)
    with ArchiveService(archive_of(tiny), '"bad"') as fake, pytest.raises(BundleIntegrityError):
        fetch(fake.url, tmp_path / "cache")
    assert list((tmp_path / "cache" / "bundles").iterdir()) == []


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


@pytest.mark.parametrize(("member", "data", "says"), [
    (_member("../evil"), b"x", "not a plain file name"),
    (_member("/tmp/evil"), b"x", "not a plain file name"),
    (_member("sub/evil"), b"x", "not a plain file name"),
    (_member("evil", tarfile.SYMTYPE, "/etc/passwd"), None, "is a link"),
    (_member("evil", tarfile.LNKTYPE, "manifest.json"), None, "is a link"),
    (_member("evil", tarfile.CHRTYPE), None, "a device or special file"),
    (_member("evil", tarfile.DIRTYPE), None, "is a directory"),
], ids=["dotdot", "absolute", "subdir", "symlink", "hardlink", "device", "directory"])
def test_hostile_members_refuse_the_archive(member: tarfile.TarInfo, data: bytes | None,
                                            says: str, tiny: Path, tmp_path: Path) -> None:
    good = [(tarfile.TarInfo(p.name), p.read_bytes()) for p in sorted(tiny.iterdir())]
    hostile = tar_of([*good, (member, data)])
    cache = tmp_path / "deep" / "cache"
    with ArchiveService(hostile, '"evil"') as fake, pytest.raises(BundleError) as caught:
        fetch(fake.url, cache)
    assert says in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "evil").exists() and not (tmp_path / "deep" / "evil").exists()
    assert list((cache / "bundles").iterdir()) == []


def test_garbage_and_an_archive_without_a_manifest_are_refused(tiny: Path,
                                                               tmp_path: Path) -> None:
    (tmp_path / "a.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(BundleError, match="not a readable tar"):
        extract_archive(tmp_path / "a.tar", tmp_path / "out")
    (tmp_path / "b.tar").write_bytes(archive_of(tiny, skip=[MANIFEST_NAME]))
    with pytest.raises(BundleError, match="has no manifest.json"):
        extract_archive(tmp_path / "b.tar", tmp_path / "out")


def test_the_service_away_leaves_the_cached_bundle_in_use(tiny: Path, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServiceUnavailableError):
        fetch(dead, tmp_path / "cache")
    with ArchiveService(archive_of(tiny), '"v1"') as fake:
        path = fetch(fake.url, tmp_path / "cache")
    assert fetch(dead, tmp_path / "cache") == path


def test_an_oversized_download_is_refused(tiny: Path, tmp_path: Path) -> None:
    with ArchiveService(archive_of(tiny), '"v1"') as fake, \
            pytest.raises(BundleError, match="over the limit"):
        fetch(fake.url, tmp_path / "cache", max_bytes=1000)


def test_the_service_archive_is_deterministic_and_unpacks(tiny: Path, tmp_path: Path) -> None:
    first = build_archive(load_bundle(tiny))
    data = first.path.read_bytes()
    first.path.unlink()
    again = build_archive(load_bundle(tiny))
    assert again.path.read_bytes() == data  # same bytes: the ETag can be strong
    digest = hashlib.sha256((tiny / MANIFEST_NAME).read_bytes()).hexdigest()
    assert again.etag == f'"{digest}"' and again.size_bytes == len(data)
    with tarfile.open(again.path) as tar:
        assert tar.getnames()[0] == MANIFEST_NAME
    extract_archive(again.path, tmp_path / "out")
    assert use_bundle(tmp_path / "out", fingerprint=TINY_FINGERPRINT).manifest.model == TINY_MODEL


def test_it_unpacks_on_a_python_without_tar_filters(tiny: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # Python before 3.11.4 (Debian 12's 3.11.2, as on a board) has no extractall(filter=).
    plain_extractall = tarfile.TarFile.extractall

    def old_extractall(self: tarfile.TarFile, path: Any = ".", members: Any = None, *,
                       numeric_owner: bool = False, **kwargs: Any) -> None:
        if kwargs:
            raise TypeError(f"unexpected keyword argument {next(iter(kwargs))!r}")
        plain_extractall(self, path, members, numeric_owner=numeric_owner, filter="data")

    monkeypatch.delattr(tarfile, "data_filter")
    monkeypatch.setattr(tarfile.TarFile, "extractall", old_extractall)
    extract_archive(build_archive(load_bundle(tiny)).path, tmp_path / "out")
    assert use_bundle(tmp_path / "out", fingerprint=TINY_FINGERPRINT).manifest.model == TINY_MODEL


def test_use_bundle_checks_like_a_download(tiny: Path) -> None:
    _wrong_sha(tiny)
    with pytest.raises(BundleIntegrityError, match="does not match its sha256"):
        use_bundle(tiny)
    manifest = json.loads((tiny / MANIFEST_NAME).read_text())
    with pytest.raises(BundleMismatchError):
        use_bundle(tiny, fingerprint="a" * 32, model=manifest["model"])


@pytest.mark.parametrize(("model", "fingerprint"), [
    ("../x", TINY_FINGERPRINT), ("tiny", "../../etc"), (".hidden", TINY_FINGERPRINT)])
def test_cache_names_cannot_climb_out(model: str, fingerprint: str) -> None:
    with pytest.raises(ConfigError):
        bundle_cache_dir(model, fingerprint, "/c")
