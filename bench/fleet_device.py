"""One emulated device of ``bench fleet``: no compute, an emulated link, the real client.

    client = ServiceClient(url, transport=LinkTransport(PROFILES["lte"]))   # the product's client
    device = FleetDevice(index=3, link_name="lte", policy="auto", client=client,
                         inputs=inputs, period_s=1.2, phase_s=0.4, timeout_s=10.0,
                         auto=AutoSplit(client, inputs.profile, seed=3))
    records = await device.run(origin_s, end_s)

What is emulated, and how:

* **Compute.** The device waits (``asyncio.sleep``) its head time for the candidate it sends,
  taken from a profile measured under the board-class CPU limit (``FleetInputs.head_ms``:
  head + encode, the whole model for ``device``); the frames it sends were encoded beforehand
  with the product's codec, so the service gets exactly what a real device would send. A
  stand-in runtime whose ``run_head`` sleeps cannot serve here: ``Device`` runs heads
  synchronously (a real head holds the CPU), and a blocking sleep would stall every other
  emulated device in the same event loop. So this module keeps ``Device``'s steps (plan,
  head, send, fall back on ``ServiceUnavailableError``, ``observe``) with an awaited head.
* **The link.** ``LinkTransport`` wraps httpx's real loopback transport and waits out the
  link's serialization (bytes * 8 / bps, FIFO per direction, as ``bench.netem`` does) and
  half its RTT each way. The product's ``ServiceClient`` times the round trip around it, so
  auto's link estimator measures the emulated link from its own requests and probes, as it
  would a real one. No proxy process, no extra copy of the bytes: 128 devices and the service
  fit on two cores.
* **The photos.** Open loop per device: a photo every ``period_s`` from a seeded phase; at most
  one request in flight, so a photo taken while the device is busy waits its turn, and that
  wait is part of its latency (photo taken -> answer).

``auto`` is the product's own ``AutoSplit`` (shared.planner, the live link estimator, the
service's ``load`` from every answer, ``Retry-After``), fed the emulated device's profile.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import httpx

from bench.netem import LinkShape
from device_client.auto import AutoSplit
from device_client.breaker import CircuitBreaker
from device_client.client import Reply, ServiceClient
from device_client.results import InferenceResult, Ran, Timings
from shared.candidates import AUTO, CLOUD, DEVICE
from shared.errors import ServiceUnavailableError, SplitServeError
from shared.planner import DeviceProfile

__all__ = [
    "FleetDevice",
    "FleetInputs",
    "LinkTransport",
    "Payload",
    "Record",
    "photo_times",
    "transmit",
]


def transmit(now_s: float, free_at_s: float, n_bytes: int, bps: float, one_way_s: float
             ) -> tuple[float, float]:
    """One message on one direction of a FIFO link: ``(delivered_at_s, link_free_at_s)``.

    It starts when the link is free (after the previous message left it), takes
    ``n_bytes * 8 / bps`` to leave, and arrives ``one_way_s`` later.

        >>> transmit(0.0, 0.0, 1_000, 8e6, 0.025)   # 1 ms on the wire + 25 ms
        (0.026, 0.001)
        >>> transmit(0.0, 0.5, 1_000, 8e6, 0.025)   # queued behind a message still leaving
        (0.526, 0.501)
    """
    leaves_at = max(now_s, free_at_s) + n_bytes * 8 / bps
    return round(leaves_at + one_way_s, 9), round(leaves_at, 9)


def _head_bytes(start_line: str, headers: httpx.Headers) -> int:
    """Bytes of an HTTP/1.1 request or status line and its headers, as sent."""
    return len(start_line) + 2 + sum(len(k) + len(v) + 4 for k, v in headers.raw) + 2


class LinkTransport(httpx.AsyncBaseTransport):
    """httpx's own loopback transport, behind an emulated link: each request waits its
    serialization up and half the RTT before it is sent, each answer its serialization down
    and the other half once it is read. One device's directions are FIFO: a metadata refresh
    sent beside an inference queues behind it on the uplink, as on a real link."""

    def __init__(self, link: LinkShape, inner: httpx.AsyncBaseTransport | None = None) -> None:
        self.link = link
        self.inner = inner or httpx.AsyncHTTPTransport()
        self._up_free_s = self._down_free_s = 0.0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        line = f"{request.method} {request.url.raw_path.decode()} HTTP/1.1"
        one_way_s = self.link.one_way_ms / 1e3
        arrive_s, self._up_free_s = transmit(
            time.perf_counter(), self._up_free_s,
            _head_bytes(line, request.headers) + len(body), self.link.uplink_bps, one_way_s)
        await _sleep_until(arrive_s)
        response = await self.inner.handle_async_request(request)
        try:
            content = await response.aread()
        finally:
            await response.aclose()
        status = f"HTTP/1.1 {response.status_code} {response.reason_phrase}"
        arrive_s, self._down_free_s = transmit(
            time.perf_counter(), self._down_free_s,
            _head_bytes(status, response.headers) + len(content), self.link.downlink_bps, one_way_s)
        await _sleep_until(arrive_s)
        return httpx.Response(response.status_code, headers=response.headers, content=content,
                              extensions=response.extensions, request=request)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def _sleep_until(at_s: float) -> None:
    delay_s = at_s - time.perf_counter()
    if delay_s > 0:
        await asyncio.sleep(delay_s)


def photo_times(period_s: float, phase_s: float, start_s: float, end_s: float
                ) -> Iterator[float]:
    """When one device takes its photos: ``phase_s + k * period_s`` within [start_s, end_s).

        >>> list(photo_times(1.0, 0.25, 0.0, 3.0))
        [0.25, 1.25, 2.25]
    """
    if period_s <= 0 or not 0 <= phase_s < period_s:
        raise ValueError(f"need period_s > 0 and 0 <= phase_s < period_s, got {period_s}, "
                         f"{phase_s}")
    k = max(0, int((start_s - phase_s) // period_s))
    while (t := phase_s + k * period_s) < end_s:
        if t >= start_s:
            yield t
        k += 1


@dataclass(frozen=True)
class Payload:
    """One pre-encoded request body (a frame, or a JPEG for ``cloud``) and the top-1 class the
    service must answer for it."""

    name: str
    body: bytes
    expected: int


@dataclass(frozen=True)
class FleetInputs:
    """What every emulated device of one run shares: the model, the device profile measured
    under the CPU limit, each candidate's wait before sending, and the bodies to send."""

    model: str
    profile: DeviceProfile
    payloads: Mapping[str, Sequence[Payload]]  # candidate -> one body per photo (not `device`)

    def head_ms(self, candidate: str) -> float:
        """Device compute before sending: head + encode (the whole model for ``device``)."""
        cost = self.profile.cost(candidate)
        return cost.head_ms + cost.encode_ms

    def tail_ms(self, candidate: str) -> float:
        """Device compute to finish ``candidate`` locally after the service failed: the whole
        model less the head already run (all of it for ``cloud``)."""
        whole_ms = self.profile.cost(DEVICE).head_ms
        done_ms = 0.0 if candidate == CLOUD else self.profile.cost(candidate).head_ms
        return max(0.0, whole_ms - done_ms)


@dataclass(frozen=True)
class Record:
    """One photo: when it was taken, started and answered (seconds since the run began), what
    was sent, and how it ended. ``outcome``: ``ok`` (answered, by the service or by the device,
    fallbacks included), ``timeout`` (the service missed the deadline; the device finished it),
    ``error`` (no answer, or a wrong one)."""

    device: int
    link: str
    photo_s: float
    start_s: float
    done_s: float
    candidate: str
    outcome: str
    served: bool = False  # the service answered it
    rejected_503: bool = False
    fallback: bool = False  # finished on the device because the service could not answer
    batch_size: int | None = None
    error: str | None = None
    # What the service reported with its answer (``Reply``: timings_ms) and the round trip the
    # client timed around it, link emulation included; None when the service did not answer.
    # The simulation's service times come from these (``bench.fleet_sim_served``).
    decode_ms: float | None = None
    queue_ms: float | None = None
    compute_ms: float | None = None
    round_trip_ms: float | None = None
    request_bytes: int | None = None  # the body sent (the link's share of the round trip)
    sent_s: float | None = None  # when the head's wait ended and the request left

    @property
    def latency_ms(self) -> float:
        return (self.done_s - self.photo_s) * 1e3


@dataclass
class FleetDevice:
    """One emulated device on one link, sending ``policy`` (a candidate, or ``auto``)."""

    index: int
    link_name: str
    policy: str
    client: ServiceClient | None
    inputs: FleetInputs
    period_s: float
    phase_s: float
    timeout_s: float
    auto: AutoSplit | None = None
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    records: list[Record] = field(default_factory=list)
    taken: int = 0  # photos taken so far, over every window: the next one's sample photo

    async def run(self, origin_s: float, end_s: float) -> list[Record]:
        """Take photos from ``origin_s`` (perf_counter) until ``end_s`` seconds after it; every
        photo taken is answered before this returns. Called again (the next round's window),
        the device goes on from where it was: its photos, breaker and ``auto`` carry over."""
        for at_s in photo_times(self.period_s, self.phase_s, 0.0, end_s):
            await _sleep_until(origin_s + at_s)
            start_s = time.perf_counter() - origin_s
            k, self.taken = self.taken, self.taken + 1
            record = await self._photo(k, at_s, start_s, origin_s)
            self.records.append(record)
        return self.records

    async def _photo(self, k: int, photo_s: float, start_s: float, origin_s: float) -> Record:
        chosen, missed = self.policy, None
        if self.policy == AUTO:
            assert self.auto is not None
            if self.breaker.state == "open":
                chosen = DEVICE
            else:
                plan = await self.auto.plan()
                chosen, missed = plan.chosen, self.auto.unreachable
        started = time.perf_counter()
        head_ms = self.inputs.head_ms(chosen)
        await asyncio.sleep(head_ms / 1e3)
        head_done = time.perf_counter()
        if chosen == DEVICE:
            self._observe(chosen, head_ms=(head_done - started) * 1e3, bytes_sent=0)
            return Record(self.index, self.link_name, photo_s, start_s, head_done - origin_s,
                          chosen, "ok", fallback=missed is not None)
        payload = self._payload(chosen, k)
        outcome, error, reply, rejected = "ok", None, None, False
        try:
            reply = await self._send(chosen, payload, started)
            if reply.predictions[0].index != payload.expected:
                outcome, error = "error", "wrong_answer"
        except ServiceUnavailableError as exc:
            rejected = exc.status == 503
            if exc.reason in ("deadline", "timeout"):
                outcome = "timeout"
            await asyncio.sleep(self.inputs.tail_ms(chosen) / 1e3)  # finish it on the device
            error = exc.reason
        except SplitServeError as exc:  # a 4xx: the request itself is wrong
            outcome, error = "error", type(exc).__name__
        done = time.perf_counter()
        head_ms = (head_done - started) * 1e3
        if reply is not None:
            self._observe(chosen, head_ms=head_ms, bytes_sent=len(payload.body), reply=reply,
                          total_ms=(done - started) * 1e3)
        elif self.auto is not None:
            self.auto.observe(InferenceResult(
                payload.name, chosen, DEVICE, (), len(payload.body),
                Timings(head=head_ms, total=(done - started) * 1e3), AUTO, fallback=error))
        return Record(self.index, self.link_name, photo_s, start_s, done - origin_s, chosen,
                      outcome, served=reply is not None, rejected_503=rejected,
                      fallback=(reply is None and outcome != "error") or missed is not None,
                      batch_size=None if reply is None else reply.batch_size, error=error,
                      decode_ms=None if reply is None else reply.decode_ms,
                      queue_ms=None if reply is None else reply.queue_ms,
                      compute_ms=None if reply is None else reply.compute_ms,
                      round_trip_ms=None if reply is None else round(reply.round_trip_ms, 3),
                      request_bytes=None if reply is None else reply.bytes_sent,
                      sent_s=head_done - origin_s)

    def _payload(self, candidate: str, k: int) -> Payload:
        bodies = self.inputs.payloads[candidate]
        return bodies[(self.index + k) % len(bodies)]  # devices start on different photos

    async def _send(self, candidate: str, payload: Payload, started: float) -> Reply:
        """The request within what is left of the deadline, recorded by the breaker, as
        ``Device._call`` does."""
        client = self.client
        if client is None:
            raise SplitServeError(f"policy {self.policy!r} needs a service")
        if not self.breaker.allow():
            raise ServiceUnavailableError("circuit open", reason="circuit_open")
        remaining_s = max(self.timeout_s - (time.perf_counter() - started), 1e-3)
        try:
            if candidate == CLOUD:
                call = client.classify(self.inputs.model, payload.body, timeout_s=remaining_s)
            else:
                call = client.infer_split(self.inputs.model, candidate, payload.body,
                                          timeout_s=remaining_s)
            reply = await asyncio.wait_for(call, remaining_s)
        except TimeoutError as exc:
            self.breaker.record_failure()
            raise ServiceUnavailableError(f"no answer within {self.timeout_s:g} s",
                                          reason="deadline") from exc
        except ServiceUnavailableError:
            self.breaker.record_failure()
            raise
        finally:
            self.breaker.abandon_trial()
        self.breaker.record_success()
        return reply

    def _observe(self, candidate: str, *, head_ms: float, bytes_sent: int,
                 reply: Reply | None = None, total_ms: float | None = None) -> None:
        """What ``Device`` hands auto after a run: where it ran and how long each part took."""
        if self.auto is None:
            return
        if reply is None:
            self.auto.observe(InferenceResult("photo", DEVICE, DEVICE, (), 0,
                                              Timings(head=head_ms, total=head_ms), AUTO))
            return
        encode_ms = self.inputs.profile.cost(candidate).encode_ms
        timings = Timings(head=max(0.0, head_ms - encode_ms), encode=encode_ms,
                          network=reply.network_ms, server=reply.server_ms,
                          total=total_ms or head_ms + reply.round_trip_ms)
        ran: Ran = "cloud" if candidate == CLOUD else "split"
        self.auto.observe(InferenceResult("photo", candidate, ran, reply.predictions,
                                          bytes_sent, timings, AUTO))
