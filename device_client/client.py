"""The HTTP side of the device: one keep-alive connection to the service, errors translated.

Async at the core (``ServiceClient``). It takes an httpx transport, so unit tests run it against
the app in-process (``httpx.ASGITransport``) and integration tests against a real uvicorn.
Every httpx error becomes a splitserve error here: ``ServiceUnavailableError`` when the device
may fall back (connect error, timeout, 5xx, 503, a body that is not JSON), ``ServiceRejectedError``
/ ``AuthError`` when the request itself is wrong (4xx). Every answer is parsed through the
contract (``shared.schemas``): JSON that breaks it is a ``ServiceError`` naming the field.

The client also keeps what every answer said about the service's load, for ``--split auto``:
``last_load`` (an answer's or the metadata's ``load``) and ``last_refusal`` (the last 503, with
its ``Retry-After``), each with a count that grows when a new one arrives, so that a planner
holding the client learns from every answer without the pipeline handing them over.
"""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO, NoReturn, TypeVar

import httpx
from pydantic import BaseModel

from shared.errors import (
    AuthError,
    BundleError,
    ConfigError,
    ServiceRejectedError,
    ServiceUnavailableError,
)
from shared.predictions import Prediction
from shared.schemas import (
    ErrorBody,
    InferResponse,
    LoadBody,
    ModelMetadata,
    ProbeResponse,
    parse,
)
from shared.wire import CONTENT_TYPE

__all__ = ["API_KEY_ENV", "Download", "Reply", "ServiceClient", "tls_verify"]

API_KEY_ENV = "SPLITSERVE_API_KEY"

Body = TypeVar("Body", bound=BaseModel)


@dataclass(frozen=True)
class Download:
    """What a bundle download did: ``modified`` False for a 304 (nothing written), the ETag the
    service sent, and the bytes written."""

    modified: bool
    etag: str | None
    size_bytes: int


@dataclass(frozen=True)
class Reply:
    """What the service answered to one inference request, and how long the round trip took."""

    predictions: tuple[Prediction, ...]
    decode_ms: float
    queue_ms: float
    compute_ms: float
    batch_size: int
    round_trip_ms: float
    bytes_sent: int
    load: LoadBody | None = None  # the service's load as the answer left

    @property
    def server_ms(self) -> float:
        return self.decode_ms + self.queue_ms + self.compute_ms

    @property
    def network_ms(self) -> float:
        """Round trip minus the server's own time: what the link cost."""
        return max(0.0, self.round_trip_ms - self.server_ms)


class ServiceClient:
    """Talks to one splitserve service over one pooled connection.

    In a coroutine::

        async with ServiceClient("http://127.0.0.1:8000") as client:
            meta = await client.metadata("efficientnet_lite0")
    """

    def __init__(self, base_url: str, *, api_key: str | None = None,
                 transport: httpx.AsyncBaseTransport | None = None, timeout_s: float = 30.0,
                 verify: Any = True) -> None:
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.base_url = base_url.rstrip("/")
        # A typo in the URL must fail now, not read as "service down" and fall back forever.
        try:
            url = httpx.URL(self.base_url)
        except (httpx.InvalidURL, TypeError) as exc:
            raise ConfigError(f"invalid service URL {base_url!r}: {exc}") from exc
        if url.scheme not in ("http", "https") or not url.host:
            raise ConfigError(f"invalid service URL {base_url!r}: expected http(s)://host[:port]")
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=headers, transport=transport, verify=verify,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0)),
            limits=httpx.Limits(max_connections=4, max_keepalive_connections=4))
        self.last_load: LoadBody | None = None  # from the latest answer or metadata carrying one
        self.loads_seen = 0  # grows with every load received
        self.last_reply: Reply | None = None  # the latest inference answer ...
        self.replies_seen = 0  # ... and how many there were
        self.last_refusal: ServiceUnavailableError | None = None  # the latest 503
        self.refusals_seen = 0

    async def __aenter__(self) -> ServiceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def ready(self) -> bool:
        try:
            response = await self._http.get("/v2/health/ready")
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def metadata(self, model: str, *, timeout_s: float | None = None) -> ModelMetadata:
        response = await self._request("GET", f"/v2/models/{model}", timeout_s=timeout_s)
        meta = self._parse(ModelMetadata, response)
        self._saw_load(meta.load)
        return meta

    async def infer_split(self, model: str, split: str, frame: bytes, *,
                          timeout_s: float | None = None, top_k: int = 5) -> Reply:
        """POST a wire frame to the tail of ``split``."""
        return await self._infer(f"/v2/models/{model}/splits/{split}/infer", frame,
                                 CONTENT_TYPE, timeout_s, top_k)

    async def classify(self, model: str, image: bytes, *, timeout_s: float | None = None,
                       top_k: int = 5, content_type: str = "image/jpeg") -> Reply:
        """POST an encoded image to the whole model (the `cloud` candidate)."""
        return await self._infer(f"/v2/models/{model}/classify", image, content_type,
                                 timeout_s, top_k)

    async def probe(self, model: str, payload: bytes, *, timeout_s: float | None = None
                    ) -> tuple[float, float]:
        """Upload ``payload`` to the probe sink: (round trip ms, server ms)."""
        started = time.perf_counter()
        response = await self._request(
            "POST", f"/v2/models/{model}/probe", content=payload, timeout_s=timeout_s,
            headers={"Content-Type": "application/octet-stream"})
        round_trip_ms = (time.perf_counter() - started) * 1e3
        return round_trip_ms, self._parse(ProbeResponse, response).server_ms

    async def download_bundle(self, model: str, into: BinaryIO, *, etag: str | None = None,
                              max_bytes: int) -> Download:
        """Stream ``GET /v2/models/{model}/bundle`` into ``into``, sending ``If-None-Match``
        with ``etag`` when given. At most ``max_bytes`` are written (``BundleError``
        past that, before or while reading). A 304 writes nothing."""
        headers = {"If-None-Match": etag} if etag else {}
        with self._unreachable_as_unavailable():
            async with self._http.stream("GET", f"/v2/models/{model}/bundle",
                                         headers=headers) as response:
                if response.status_code == 304:
                    return Download(modified=False, etag=etag, size_bytes=0)
                if response.status_code >= 400:
                    await response.aread()
                    self._raise_for(response)
                declared = response.headers.get("content-length")
                if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                    raise BundleError(f"the bundle from {self.base_url} is "
                                               f"{int(declared):,} bytes, over the limit of "
                                               f"{max_bytes:,}")
                size = 0
                async for chunk in response.aiter_raw():
                    size += len(chunk)
                    if size > max_bytes:
                        raise BundleError(f"the bundle from {self.base_url} exceeds "
                                                   f"the limit of {max_bytes:,} bytes")
                    into.write(chunk)
                return Download(modified=True, etag=response.headers.get("etag"),
                                size_bytes=size)

    async def _infer(self, path: str, body: bytes, content_type: str, timeout_s: float | None,
                     top_k: int) -> Reply:
        headers = {"Content-Type": content_type}
        if timeout_s is not None:
            headers["X-Request-Timeout-Ms"] = f"{timeout_s * 1e3:.0f}"
        started = time.perf_counter()
        response = await self._request("POST", path, content=body, headers=headers,
                                       params={"top_k": top_k}, timeout_s=timeout_s)
        round_trip_ms = (time.perf_counter() - started) * 1e3
        answer = self._parse(InferResponse, response)
        timings = answer.timings_ms
        predictions = tuple(Prediction(p.index, p.label, p.prob) for p in answer.top_k[0])
        self._saw_load(answer.load)
        reply = Reply(predictions, timings.decode, timings.queue, timings.compute,
                      answer.batch_size, round_trip_ms, len(body), answer.load)
        self.last_reply, self.replies_seen = reply, self.replies_seen + 1
        return reply

    def _saw_load(self, load: LoadBody | None) -> None:
        if load is not None:
            self.last_load, self.loads_seen = load, self.loads_seen + 1

    def _parse(self, body: type[Body], response: httpx.Response) -> Body:
        """The answer as ``body``: ``ServiceError`` naming the field if it breaks the contract."""
        return parse(body, self._json(response), source=f"service answer from {self.base_url}")

    def _json(self, response: httpx.Response) -> Any:
        """The body as JSON. A body that isn't JSON is the service failing, not the request."""
        try:
            return response.json()
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep to parse
            raise self._malformed(response, exc) from exc

    def _malformed(self, response: httpx.Response, why: object) -> ServiceUnavailableError:
        return ServiceUnavailableError(f"malformed answer from {self.base_url}: {why}",
                                       status=response.status_code, reason="bad_response")

    async def _request(self, method: str, path: str, *, timeout_s: float | None = None,
                       **kwargs: Any) -> httpx.Response:
        if timeout_s is not None:
            kwargs["timeout"] = httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0))
        with self._unreachable_as_unavailable():
            response = await self._http.request(method, path, **kwargs)
        if response.status_code < 400:
            return response
        self._raise_for(response)

    @contextmanager
    def _unreachable_as_unavailable(self) -> Iterator[None]:
        """httpx's timeouts and transport errors as the ``ServiceUnavailableError`` the device
        may fall back on."""
        try:
            yield
        except httpx.TimeoutException as exc:
            raise ServiceUnavailableError(f"{self.base_url} did not answer in time",
                                          reason="timeout") from exc
        except httpx.TransportError as exc:
            detail = str(exc) or type(exc).__name__
            raise ServiceUnavailableError(f"cannot reach {self.base_url}: {detail}",
                                          reason="connection") from exc

    def _raise_for(self, response: httpx.Response) -> NoReturn:
        """The error a 4xx or 5xx answer stands for."""
        message = _error_message(response)
        status = response.status_code
        if status in (401, 403):
            raise AuthError(f"{self.base_url} refused the API key ({status}): {message}",
                            status=status)
        if status >= 500:
            reason = "overloaded" if status == 503 else f"http_{status}"
            error = ServiceUnavailableError(f"{self.base_url} answered {status}: {message}",
                                            status=status, reason=reason,
                                            retry_after_s=_retry_after_s(response))
            if status == 503:
                self.last_refusal, self.refusals_seen = error, self.refusals_seen + 1
            raise error
        raise ServiceRejectedError(f"{self.base_url} answered {status}: {message}", status=status)


def tls_verify(ca_cert: str | None) -> ssl.SSLContext | bool:
    """``verify=`` for ``ServiceClient``: trust the PEM certificate(s) in ``ca_cert`` (a private
    CA, or a self-signed service), or the system's CAs when None.

        ServiceClient("https://10.0.0.5:8443", verify=tls_verify("service-ca.pem"))
    """
    if ca_cert is None:
        return True
    try:
        return ssl.create_default_context(cafile=ca_cert)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot use CA certificate {ca_cert!r}: {exc}") from exc


def _retry_after_s(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    # Seconds only: the HTTP-date form would need the two clocks to agree.
    return float(value) if value.isdigit() else None


def _error_message(response: httpx.Response) -> str:
    try:
        return ErrorBody.model_validate_json(response.content, strict=True).error
    except ValueError:  # pydantic's ValidationError too: not an error body, show what came
        return response.text[:200] or response.reason_phrase
