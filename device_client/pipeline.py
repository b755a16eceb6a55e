"""One image through the device: preprocess, pick where to cut, run the head, send, answer.

``Device`` is async because the HTTP client is; compute runs inline (the device does one thing at
a time). When the service can't answer (connection error, timeout, 5xx, 503, or the per-request
deadline ``timeout_s`` passes) and fallback is on, the device finishes locally from the
activation it already has: the head is never run twice. A circuit breaker stops it from waiting
on a dead service at every image, and lets one request through after a cool-down.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, Protocol

from PIL import Image

from device_client.auto import AutoSplit
from device_client.breaker import CircuitBreaker
from device_client.client import Reply, ServiceClient
from device_client.options import EncodeOptions
from device_client.profile import ProfiledRuntime
from device_client.results import InferenceResult, Ran, Timings
from shared.candidates import AUTO, CLOUD, DEVICE
from shared.errors import ConfigError, ServiceUnavailableError
from shared.predictions import Prediction, top_k
from shared.preprocess import center_crop, encode_jpeg

__all__ = ["AUTO", "CLOUD", "DEVICE", "Device", "Runtime"]  # AUTO.. re-exported from candidates


class Runtime(ProfiledRuntime, Protocol):
    """What the device runs: ``OnnxDeviceRuntime`` (numpy, the default) or the torch
    ``DeviceRuntime``. Inputs, activations and logits are that runtime's arrays."""

    labels: Any  # a sequence of class names

    def point(self, key: str | int) -> Any: ...

    def middle_point(self) -> Any: ...

    def run_tail(self, point: Any, tensors: Any) -> Any: ...


class Device:
    """The device side of splitserve for one model and one service.

    In a coroutine::

        async with ServiceClient(url) as client:
            device = Device(OnnxDeviceRuntime(bundle_dir), client)
            result = await device.infer(load_image("cat.jpg"), split="_blocks.5")
    """

    def __init__(self, runtime: Runtime, client: ServiceClient | None, *,
                 options: EncodeOptions | None = None, jpeg_quality: int = 90,
                 timeout_s: float = 30.0, fallback: bool = True,
                 auto: AutoSplit | None = None, breaker: CircuitBreaker | None = None) -> None:
        self.runtime = runtime
        self.client = client
        self.auto = auto
        self.breaker = breaker or CircuitBreaker()
        self.options = options or EncodeOptions()
        self.jpeg_quality = jpeg_quality
        self.timeout_s = timeout_s
        self.fallback = fallback
        self._checked = False

    async def check_service(self) -> None:
        """Fail early and clearly if the service serves different weights or split points."""
        if self._checked or self.client is None:
            return
        meta = await self.client.metadata(self.runtime.name)
        if meta.fingerprint != self.runtime.fingerprint:
            raise ConfigError(
                f"the service's {self.runtime.name} weights ({meta.fingerprint}) differ "
                f"from this device's ({self.runtime.fingerprint}); deploy the same checkpoint")
        self._checked = True

    def resolve(self, split: str) -> str:
        """``device``, ``cloud``, ``auto`` or a split point name, from what the user asked for.

        Raises ``UnknownSplitPointError`` or ``ConfigError`` before any work is done."""
        if split == AUTO and (self.auto is None or self.client is None):
            raise ConfigError("--split auto needs a service and a device profile")
        if split in (DEVICE, CLOUD, AUTO):
            return split
        name: str = self.runtime.point(split).name
        return name

    async def infer(self, image: Image.Image, *, split: str, name: str = "") -> InferenceResult:
        """Classify one image, cutting the network at ``split`` (``auto``: the planner's pick)."""
        chosen = self.resolve(split)
        predicted_ms, missed = None, None
        if chosen == AUTO and self.breaker.state == "open":
            # The service is known to be down: don't even plan against it.
            chosen, missed = DEVICE, ServiceUnavailableError(self._open_message(),
                                                             reason="circuit_open")
        elif chosen == AUTO:
            assert self.auto is not None
            plan = await self.auto.plan()
            chosen, predicted_ms = plan.chosen, plan.estimate(plan.chosen).total_ms
            missed = self.auto.unreachable
        if missed is not None and not self.fallback:
            raise missed
        result = await self._run(image, chosen, name, split)
        if self.auto is not None:
            self.auto.observe(result)  # a device run it chose: nothing failed in it to forget
        if missed is not None:  # planned without the service: say so, as a fixed split does
            result = replace(result, fallback=f"{missed.reason}: {missed}")
        return replace(result, predicted_ms=predicted_ms) if predicted_ms is not None else result

    async def _run(self, image: Image.Image, chosen: str, name: str, requested: str
                   ) -> InferenceResult:
        crop = center_crop(image, self.runtime.preprocessing)
        if chosen == DEVICE:
            return self._local(crop, name, requested)
        if self.client is None:
            raise ConfigError(f"split {requested!r} needs a service; pass --server")
        if not self.breaker.allow():
            if not self.fallback:
                raise ServiceUnavailableError(self._open_message(), reason="circuit_open")
            return self._local(crop, name, requested, split=chosen,
                               fallback=f"circuit_open: {self._open_message()}")
        try:
            if chosen == CLOUD:
                return await self._cloud(crop, name, requested)
            return await self._split(crop, self.runtime.point(chosen), name, requested)
        finally:
            self.breaker.abandon_trial()  # no-op unless we never got as far as the service

    def _local(self, crop: Image.Image, name: str, requested: str, *, split: str = DEVICE,
               fallback: str | None = None) -> InferenceResult:
        x = self.runtime.prepare(crop)
        started = time.perf_counter()
        logits = self.runtime.run_full(x)
        head_ms = (time.perf_counter() - started) * 1e3
        return InferenceResult(name, split, DEVICE, self._top5(logits), 0,
                               Timings(head=head_ms, total=head_ms), requested, fallback)

    async def _cloud(self, crop: Image.Image, name: str, requested: str) -> InferenceResult:
        started = time.perf_counter()
        jpeg = encode_jpeg(crop, quality=self.jpeg_quality)
        encode_ms = (time.perf_counter() - started) * 1e3
        client = self.client
        assert client is not None
        try:
            reply = await self._call(lambda t: client.classify(self.runtime.name, jpeg,
                                                               timeout_s=t), started)
        except ServiceUnavailableError as exc:
            x = self.runtime.prepare(crop)
            return self._fall_back(exc, name, CLOUD, requested, len(jpeg), started,
                                   Timings(encode=encode_ms), lambda: self.runtime.run_full(x))
        return self._answered(name, CLOUD, CLOUD, requested, reply, 0.0, encode_ms, started)

    async def _split(self, crop: Image.Image, point: Any, name: str, requested: str
                     ) -> InferenceResult:
        x = self.runtime.prepare(crop)
        started = time.perf_counter()
        acts = self.runtime.run_head(point, x)
        head_done = time.perf_counter()
        frame = self.runtime.encode(point, acts, uuid.uuid4().hex[:16], self.options)
        encoded = time.perf_counter()
        head_ms, encode_ms = (head_done - started) * 1e3, (encoded - head_done) * 1e3
        client = self.client
        assert client is not None
        try:
            reply = await self._call(lambda t: client.infer_split(
                self.runtime.name, point.name, frame, timeout_s=t), started)
        except ServiceUnavailableError as exc:
            # The head's output is still here: finish from it, never run the head twice.
            return self._fall_back(exc, name, point.name, requested, len(frame), started,
                                   Timings(head=head_ms, encode=encode_ms),
                                   lambda: self.runtime.run_tail(point, acts))
        return self._answered(name, point.name, "split", requested, reply, head_ms, encode_ms,
                              started)

    async def _call(self, send: Callable[[float], Awaitable[Reply]], started: float) -> Reply:
        """One request to the service within what is left of the deadline, recorded by the
        breaker: any ``ServiceUnavailableError`` is a failure, any answer a success."""
        remaining_s = self.timeout_s - (time.perf_counter() - started)
        try:
            if remaining_s <= 0:
                raise ServiceUnavailableError(
                    f"deadline of {self.timeout_s:g} s spent before sending", reason="deadline")
            await asyncio.wait_for(self.check_service(), remaining_s)
            remaining_s = self.timeout_s - (time.perf_counter() - started)
            reply = await asyncio.wait_for(send(max(remaining_s, 1e-3)), max(remaining_s, 1e-3))
        except TimeoutError as exc:
            self.breaker.record_failure()
            raise ServiceUnavailableError(f"no answer within the {self.timeout_s:g} s deadline",
                                          reason="deadline") from exc
        except ServiceUnavailableError:
            self.breaker.record_failure()
            raise
        except Exception:
            self.breaker.record_success()  # it answered (a 4xx): it is up, the request is wrong
            raise
        self.breaker.record_success()
        return reply

    def _answered(self, name: str, split: str, ran: Ran, requested: str, reply: Reply,
                  head_ms: float, encode_ms: float, started: float) -> InferenceResult:
        total_ms = (time.perf_counter() - started) * 1e3
        timings = Timings(head=head_ms, encode=encode_ms, network=reply.network_ms,
                          server=reply.server_ms, total=total_ms)
        return InferenceResult(name, split, ran, reply.predictions, reply.bytes_sent, timings,
                               requested)

    def _fall_back(self, exc: ServiceUnavailableError, name: str, split: str, requested: str,
                   bytes_sent: int, started: float, partial: Timings,
                   finish: Callable[[], Any]) -> InferenceResult:
        """Finish locally after the service failed, or re-raise if fallback is off."""
        if not self.fallback:
            raise exc
        waited_ms = (time.perf_counter() - started) * 1e3 - partial.head - partial.encode
        tail_started = time.perf_counter()
        logits = finish()
        tail_ms = (time.perf_counter() - tail_started) * 1e3
        total_ms = (time.perf_counter() - started) * 1e3
        timings = Timings(head=partial.head, encode=partial.encode, tail=tail_ms,
                          network=max(0.0, waited_ms), total=total_ms)
        return InferenceResult(name, split, DEVICE, self._top5(logits), bytes_sent, timings,
                               requested, fallback=f"{exc.reason}: {exc}")

    def _open_message(self) -> str:
        return (f"the service failed {self.breaker.failure_threshold} times in a row; "
                f"next try in {self.breaker.seconds_until_retry():.1f} s")

    def _top5(self, logits: Any) -> tuple[Prediction, ...]:
        return top_k(logits, self.runtime.labels, 5)[0]

