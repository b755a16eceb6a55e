"""The service's own ONNX bundles: one per (model, weights fingerprint), exported once, cached.

    path = service_bundle("efficientnet_lite0", runtime.fingerprint, weights=None,
                          root=settings.bundle_root())
    bundle = load_bundle(path, model="efficientnet_lite0", fingerprint=runtime.fingerprint)

The layout is ``<root>/<model>-<fingerprint>/`` (``shared.bundle`` describes what is inside),
with ``<root>`` from ``SPLITSERVE_BUNDLE_DIR`` (default ``$XDG_CACHE_HOME/splitserve/bundles``,
i.e. ``~/.cache/splitserve/bundles``). The ONNX Runtime backend runs its tails and whole model
from it, and the bundle download endpoint hands the same directory out, so a device runs exactly
the graphs the service checked.

A cached bundle is reused when ``load_bundle`` accepts it (format version, model, fingerprint,
every sha256) and it has every precision asked for; anything else is exported again over it.
Exporting is serialized by a lock file next to the bundle, so two services starting at once
export it once, and a bundle appears whole or not at all (``export_bundle`` writes to a
staging directory and renames it).
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from pathlib import Path

from shared.bundle import Bundle, load_bundle
from shared.errors import BundleError

__all__ = ["bundle_path", "default_root", "service_bundle"]

log = logging.getLogger("cloud_server")


def default_root() -> Path:
    """``$XDG_CACHE_HOME/splitserve/bundles``, else ``~/.cache/splitserve/bundles``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "splitserve" / "bundles"


def bundle_path(root: str | os.PathLike[str], model: str, fingerprint: str) -> Path:
    """Where the bundle of ``model`` with weights ``fingerprint`` lives under ``root``; pure.

        >>> bundle_path("/srv/bundles", "efficientnet_lite0", "0123")
        PosixPath('/srv/bundles/efficientnet_lite0-0123')
    """
    return Path(root) / f"{model}-{fingerprint}"


def service_bundle(model: str, fingerprint: str, *, weights: str | None = None,
                   root: str | os.PathLike[str] | None = None, int8: bool = False) -> Bundle:
    """The checked bundle of ``model`` (weights ``fingerprint``, loaded from ``weights``: a
    checkpoint path, or None for the registry's weights) under ``root`` (default
    ``default_root()``), exporting it first when there is no valid one. ``int8`` also requires
    (and exports) the int8 heads and whole model.

    Blocks for the export (about 10 s for EfficientNet-Lite0 in fp32): call it from the
    service's loader thread, never from the event loop. Raises ``BundleError`` (``ExportError``
    when the export fails or disagrees with torch, ``BundleMismatchError`` when ``weights`` are
    not the weights of ``fingerprint``).
    """
    path = bundle_path(root if root is not None else default_root(), model, fingerprint)
    cached = _valid(path, model, fingerprint, int8)
    if cached is not None:
        return cached
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        cached = _valid(path, model, fingerprint, int8)  # another process may have made it
        if cached is not None:
            return cached
        from shared.export import export_bundle  # torch and onnx: only when exporting

        started = time.perf_counter()
        log.info("exporting the %s bundle to %s", model, path)
        export_bundle(model, path, weights=weights, int8=int8)
        bundle = load_bundle(path, model=model, fingerprint=fingerprint)
        log.info("exported %s in %.1f s", path, time.perf_counter() - started)
        return bundle


def _valid(path: Path, model: str, fingerprint: str, int8: bool) -> Bundle | None:
    if not path.exists():
        return None
    try:
        bundle = load_bundle(path, model=model, fingerprint=fingerprint)
    except BundleError as exc:
        log.warning("cached bundle not usable, exporting again: %s", exc)
        return None
    if int8 and "int8" not in bundle.manifest.precisions:
        log.info("cached bundle %s has no int8 graphs, exporting again", path)
        return None
    return bundle
