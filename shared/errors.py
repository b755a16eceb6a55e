"""The one exception hierarchy of splitserve.

Every error that crosses a module boundary is one of these. Third-party errors (zstd, msgpack,
torch, httpx, Pillow) are translated where they are caught, with ``raise ... from exc``, so callers
catch ``SplitServeError`` and nothing else. The cloud service maps each class to one HTTP status
in one exception handler; the device CLI turns each into a one-line message.

    SplitServeError
    ├── ConfigError                  bad settings or arguments
    ├── ModelError
    │   ├── UnknownModelError        registry has no such name          (HTTP 404)
    │   ├── DuplicateModelError      registry already has that name
    │   └── WeightsError             checkpoint unreadable or wrong keys
    ├── ImageError                   undecodable or oversized image     (HTTP 400)
    ├── PartitionError               not fx-traceable, or no legal cut
    │   └── UnknownSplitPointError   no split point of that name/index  (HTTP 404)
    ├── PayloadError                 bytes received are not acceptable  (HTTP 400)
    │   ├── CodecError               bad quantization params, corrupt zstd data
    │   ├── WireError                malformed msgpack frame
    │   │   └── VersionError         frame written by an unknown wire version
    │   ├── ShapeMismatchError       tensors don't fit the split point
    │   ├── PayloadTooLargeError     over a size limit, checked before work  (HTTP 413)
    │   ├── RequestTimeoutError      the body took too long to arrive    (HTTP 408)
    │   └── UnsupportedMediaTypeError  wrong Content-Type                   (HTTP 415)
    ├── FingerprintMismatchError     frame's weights differ from the server's (HTTP 409)
    ├── OverloadedError              queue full; retry later             (HTTP 503)
    │   └── NotReadyError            still loading models                (HTTP 503)
    ├── DeadlineExceededError        the request's deadline passed       (HTTP 504)
    ├── BundleError                  an exported ONNX bundle is unusable
    │   ├── BundleIntegrityError     a file is missing, or its sha256 differs
    │   ├── BundleVersionError       written by a bundle format this side does not read
    │   ├── BundleMismatchError      for another model, or other weights
    │   └── ExportError              exported graphs disagree with torch: nothing written
    └── ClientError                  raised by the device client only
        ├── ServiceUnavailableError  connect error, timeout, 5xx, 503 or a body that is not
        │                            JSON: the device may fall back
        ├── ServiceRejectedError     a 4xx: the request itself is wrong; falling back won't help
        │   └── AuthError            401 or 403
        └── ServiceError             JSON outside the contract (shared.schemas): a wrong server
                                     or another version; falling back won't fix it
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "BundleError",
    "BundleIntegrityError",
    "BundleMismatchError",
    "BundleVersionError",
    "ClientError",
    "CodecError",
    "ConfigError",
    "DeadlineExceededError",
    "DuplicateModelError",
    "ExportError",
    "FingerprintMismatchError",
    "ImageError",
    "ModelError",
    "NotReadyError",
    "OverloadedError",
    "PartitionError",
    "PayloadError",
    "PayloadTooLargeError",
    "RequestTimeoutError",
    "ServiceError",
    "ServiceRejectedError",
    "ServiceUnavailableError",
    "ShapeMismatchError",
    "SplitServeError",
    "UnknownModelError",
    "UnknownSplitPointError",
    "UnsupportedMediaTypeError",
    "VersionError",
    "WeightsError",
    "WireError",
]


class SplitServeError(Exception):
    """Base class of every error splitserve raises on purpose."""


class ConfigError(SplitServeError):
    """A setting or argument is invalid."""


class ModelError(SplitServeError):
    """A model cannot be found, built or loaded."""


class UnknownModelError(ModelError, LookupError):
    """The model registry has no model of that name."""


class DuplicateModelError(ModelError):
    """A model of that name is already registered."""


class WeightsError(ModelError):
    """A checkpoint cannot be read, or its keys or shapes don't fit the model."""


class ImageError(SplitServeError):
    """An image cannot be decoded, or is too large to decode safely."""


class PartitionError(SplitServeError):
    """A model cannot be traced or cut."""


class UnknownSplitPointError(PartitionError, LookupError):
    """No split point has that name or index."""


class PayloadError(SplitServeError):
    """Bytes received from a peer are malformed or not acceptable."""


class CodecError(PayloadError):
    """Quantization parameters are invalid, or compressed data is corrupt."""


class WireError(PayloadError):
    """A frame is not a well-formed splitserve frame."""


class VersionError(WireError):
    """A frame was written by a wire version this side does not speak."""


class ShapeMismatchError(PayloadError):
    """The tensors in a frame don't match the split point they claim."""


class PayloadTooLargeError(PayloadError):
    """A body, a frame or a decompressed tensor exceeds its limit."""


class RequestTimeoutError(PayloadError):
    """The request body did not arrive within the service's time limit."""


class UnsupportedMediaTypeError(PayloadError):
    """The request body has a Content-Type this endpoint does not take."""


class FingerprintMismatchError(SplitServeError):
    """The frame was produced by different weights from the ones serving it."""


class OverloadedError(SplitServeError):
    """The service's queue is full. Retry after ``retry_after_s`` seconds."""

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotReadyError(OverloadedError):
    """The service is still loading or profiling its models."""


class DeadlineExceededError(SplitServeError):
    """A request's deadline passed before it could be answered."""


class ClientError(SplitServeError):
    """Raised by the device client when talking to the service fails."""


class ServiceUnavailableError(ClientError):
    """The service could not answer: connection error, timeout, 5xx or 503.

    The device can still finish the inference locally.
    """

    def __init__(self, message: str, *, status: int | None = None, reason: str = "error",
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.retry_after_s = retry_after_s  # the service's Retry-After, when it sent one


class ServiceRejectedError(ClientError):
    """The service answered with a 4xx: the request is wrong, so a retry won't help."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


class AuthError(ServiceRejectedError):
    """The service refused the API key (401 missing, 403 wrong)."""


class ServiceError(ClientError):
    """The service answered JSON that breaks the HTTP contract (``shared.schemas``): a missing or
    wrongly-typed field. The message names the field. ``--server`` points at something that is
    not a splitserve service, or at another version of it: a configuration error, so the device
    does not fall back and hide it."""


class BundleError(SplitServeError):
    """An ONNX bundle (``shared.bundle``) cannot be used: its manifest is malformed."""


class BundleIntegrityError(BundleError):
    """A file the manifest lists is missing, or its sha256 is not the one recorded."""


class BundleVersionError(BundleError):
    """The manifest was written by a bundle format version this side does not read."""


class BundleMismatchError(BundleError):
    """The bundle is for another model, or was exported from other weights."""


class ExportError(BundleError):
    """An exported graph disagrees with torch, so the bundle was not written."""
