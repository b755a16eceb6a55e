"""The latency model and the choice of where to cut: pure functions of measured profiles.

Every candidate for one inference is costed end to end, and the cheapest one wins:

    device   whole model on the device, nothing sent   total = head
    cloud    JPEG of the crop, the service runs it all  total = encode + rtt + transfer + server
    <split>  head on the device, tail in the service    total = head + encode + rtt + transfer
                                                                + server (decode + tail + queue)

where queue is the service's load as it reported it per candidate (``ServerProfile.load_ms``:
the whole-model wait for ``cloud``, a tail's wait for a split point, nothing for ``device``),
so a busy service makes ``cloud`` dearer than a late split, and both dearer than the device.

Anti-stampede: a fleet of devices sees the same load step at once, and a fixed hysteresis would
flip them all at the same request: the load then drops, and they all flip back. Two defences,
both pure here and fed by the device: each device draws its own ``hysteresis`` once
(``draw_hysteresis``, seeded, in [0.05, 0.3]: jittered hysteresis, so devices disagree about
when a gain is worth it), and past its threshold it switches with a probability that grows with
the gain (``switch_probability``, capped at 0.5 per request), from a uniform ``draw`` it passes
to ``choose``. A small gain moves a few devices; the load they take off the service is seen by
the rest before they move, and even a huge step spreads the flips over several requests.

from measurements: ``DeviceProfile`` (timed on the device), ``ServerProfile`` (the service's
``GET /v2/models/{model}`` metadata, ``shared.schemas.ModelMetadata``) and ``LinkEstimate``
(``device_client.link``).

    >>> device = DeviceProfile("efficientnet_lite0", "0123abcd", (
    ...     DeviceCost(DEVICE, head_ms=400.0, encode_ms=0.0, payload_bytes=0),
    ...     DeviceCost(CLOUD, head_ms=0.0, encode_ms=3.0, payload_bytes=18_000),
    ...     DeviceCost("_blocks.5", head_ms=100.0, encode_ms=2.0, payload_bytes=2_000)))
    >>> server = ServerProfile.of({CLOUD: 8.0, "_blocks.5": 6.0})
    >>> choose(device, server, LinkEstimate(uplink_bps=0.5e6, rtt_ms=60.0)).chosen
    '_blocks.5'

Errors: a malformed dataclass is a programmer error and raises ``ValueError`` (as ``SplitPoint``
and ``TensorSpec`` do); metadata that came over the network and doesn't parse raises
``ServiceError``; looking up a candidate that isn't there raises ``UnknownSplitPointError``.

What the model ignores, on purpose:
  * TCP slow start. The connection is kept alive, but after ~1 RTO idle (Linux's
    ``tcp_slow_start_after_idle``) the congestion window restarts at 10 segments (~14 KB), so
    on a high bandwidth-delay link a large payload after a pause costs extra RTTs. The model
    underestimates big uploads then; the link estimator's samples include what it costs.
  * Per-packet TCP/IP/TLS overhead (~4 %). ``uplink_bps`` is goodput as the link estimator
    measures it, so the overhead is already folded in.
  * Jitter and tail latency: this is a model of typical (median) latency.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, TypeGuard

from shared.candidates import CLOUD, DEVICE
from shared.errors import UnknownSplitPointError
from shared.schemas import LoadBody, ModelMetadata, parse

__all__ = [
    "CLOUD",
    "DEVICE",
    "HTTP_OVERHEAD_BYTES",
    "RESPONSE_BYTES",
    "DeviceCost",
    "DeviceProfile",
    "Estimate",
    "LinkEstimate",
    "Plan",
    "ServerProfile",
    "choose",
    "draw_hysteresis",
    "estimate",
    "load_figures",
    "serialization_ms",
    "switch_probability",
    "switch_threshold_ms",
    "transfer_ms",
]

# Request line and headers httpx sends with each upload (Host, Accept*, Connection, User-Agent,
# Content-Type, Content-Length, X-Request-Timeout-Ms, a 32-character bearer key): 364 B measured
# with httpx 0.28, a little less without a key. Noise next to a 20 KB JPEG, but 15-30 % of the
# upload of a 1-2 KB activation, which is what a slow link compares: so it is counted.
HTTP_OVERHEAD_BYTES = 350

# The answer: an InferResponse with top-5 predictions (labels average 9.5 characters, probs in
# full float repr) and the timings serializes to 480-560 B of JSON, plus ~160 B of status line
# and response headers.
RESPONSE_BYTES = 700

LINK_SOURCES = ("given", "measured", "probe")


def serialization_ms(n_bytes: float, bps: float) -> float:
    """Time to push ``n_bytes`` onto a link of ``bps`` bits/s, in ms: ``(1_000, 8e6) -> 1.0``."""
    return n_bytes * 8 / bps * 1e3


@dataclass(frozen=True)
class DeviceCost:
    """One candidate as the device measured it: compute before the cut (the whole model for
    ``device``, 0 for ``cloud``), quantize+compress+frame (or JPEG) time, and the body size."""

    split: str
    head_ms: float
    encode_ms: float
    payload_bytes: int

    def __post_init__(self) -> None:
        _check_name(self.split)
        _check_finite(head_ms=self.head_ms, encode_ms=self.encode_ms)
        _check_bytes(self.payload_bytes)
        if self.split == DEVICE and (self.encode_ms or self.payload_bytes):
            raise ValueError("the device candidate encodes and sends nothing")


@dataclass(frozen=True)
class DeviceProfile:
    """Everything measured on the device for one model. ``costs`` must include ``DEVICE``; it is
    stored in candidate order: device, cloud, then split points in the order given (execution
    order)."""

    model: str
    fingerprint: str
    costs: tuple[DeviceCost, ...]

    def __post_init__(self) -> None:
        if DEVICE not in _check_unique([c.split for c in self.costs]):
            raise ValueError("a device profile must include the device candidate")
        rank = {DEVICE: 0, CLOUD: 1}
        ordered = tuple(sorted(self.costs, key=lambda c: rank.get(c.split, 2)))  # stable
        object.__setattr__(self, "costs", ordered)

    def cost(self, split: str) -> DeviceCost:
        """The measured cost of one candidate; ``UnknownSplitPointError`` if there is none."""
        for c in self.costs:
            if c.split == split:
                return c
        raise UnknownSplitPointError(f"the device profile of {self.model} has no {split!r}")


@dataclass(frozen=True)
class ServerProfile:
    """What the service reported: decode + compute ms at batch 1 per candidate it offers
    (``CLOUD`` and split point names, as sorted ``(name, ms)`` pairs), its recent mean queueing
    delay, and its load: the expected wait per candidate (sorted pairs; a candidate without one
    waits ``queue_ms``, as with a service that reports no load)."""

    server_ms: tuple[tuple[str, float], ...]
    queue_ms: float = 0.0
    load_ms: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if DEVICE in _check_unique([name for name, _ in self.server_ms]):
            raise ValueError("the service cannot offer the device candidate")
        for pairs, what in ((self.server_ms, "server_ms"), (self.load_ms, "load_ms")):
            for name, ms in pairs:
                _check_name(name)
                _check_finite(**{f"{what}[{name!r}]": ms})
        if DEVICE in _check_unique([name for name, _ in self.load_ms]):
            raise ValueError("the device candidate waits for no service")
        _check_finite(queue_ms=self.queue_ms)
        object.__setattr__(self, "server_ms", tuple(sorted(self.server_ms)))
        object.__setattr__(self, "load_ms", tuple(sorted(self.load_ms)))

    @classmethod
    def of(cls, server_ms: Mapping[str, float], *, queue_ms: float = 0.0,
           load_ms: Mapping[str, float] | None = None) -> ServerProfile:
        """Build from mappings: ``ServerProfile.of({CLOUD: 8.0, "_blocks.5": 6.0})``."""
        return cls(tuple(server_ms.items()), queue_ms, tuple((load_ms or {}).items()))

    def with_load(self, load_ms: Mapping[str, float]) -> ServerProfile:
        """The same costs with another view of the load (the device's, from its answers)."""
        return ServerProfile(self.server_ms, self.queue_ms, tuple(load_ms.items()))

    def wait_ms(self, split: str) -> float:
        """The expected queueing delay of ``split``: its load figure, else ``queue_ms``;
        0 for ``device``."""
        if split == DEVICE:
            return 0.0
        return dict(self.load_ms).get(split, self.queue_ms)

    @classmethod
    def from_metadata(
        cls, meta: ModelMetadata | Mapping[str, Any], *, missing_ms: float | None = None
    ) -> ServerProfile:
        """The service's costs from its model metadata (``ServiceClient.metadata``, or decoded
        JSON, parsed through the contract: ``ServiceError`` naming the field if it breaks it).

        ``server_ms`` is the whole-model (cloud) figure, each of ``split_points`` carries its
        ``name`` and ``server_ms``, ``queue_ms`` is the recent mean queueing. A candidate without
        a figure is not offered, unless ``missing_ms`` is given: a service started without
        profiling publishes none, and would otherwise never be tried. For example
        ``ServerProfile.from_metadata(await client.metadata(model)).ms("_blocks.5")``.
        """
        body = meta if isinstance(meta, ModelMetadata) else parse(ModelMetadata, meta)
        pairs = {CLOUD: body.server_ms, **{p.name: p.server_ms for p in body.split_points}}
        fill = {k: v if v is not None else missing_ms for k, v in pairs.items()}
        return cls.of({k: v for k, v in fill.items() if v is not None}, queue_ms=body.queue_ms,
                      load_ms=load_figures(body.load, [p.name for p in body.split_points]))

    def ms(self, split: str) -> float | None:
        """Decode + compute ms for ``split``, or None if the service does not offer it."""
        return dict(self.server_ms).get(split)


@dataclass(frozen=True)
class LinkEstimate:
    """The link as seen by the device: uplink goodput, round trip time, and the downlink
    if known (else the uplink is assumed: pessimistic on asymmetric ADSL/LTE links).

        >>> LinkEstimate(uplink_bps=1.6e6, rtt_ms=60.0).source
        'given'
    """

    uplink_bps: float
    rtt_ms: float
    downlink_bps: float | None = None
    source: str = "given"

    def __post_init__(self) -> None:
        for name, bps in (("uplink_bps", self.uplink_bps), ("downlink_bps", self.downlink_bps)):
            if (bps is not None or name == "uplink_bps") and not (_is_number(bps) and bps > 0):
                raise ValueError(f"{name} must be a number > 0, got {bps!r}")
        _check_finite(rtt_ms=self.rtt_ms, uplink_bps=self.uplink_bps)
        if self.source not in LINK_SOURCES:
            raise ValueError(f"source must be one of {LINK_SOURCES}, got {self.source!r}")


@dataclass(frozen=True)
class Estimate:
    """One row of the plan table: the terms of a candidate's expected latency, and their sum
    (``server_ms`` includes the service's queueing delay)."""

    split: str
    head_ms: float
    encode_ms: float
    payload_bytes: int
    transfer_ms: float
    rtt_ms: float
    server_ms: float
    total_ms: float

    def __post_init__(self) -> None:
        _check_name(self.split)
        _check_bytes(self.payload_bytes)
        ms = ("head_ms", "encode_ms", "transfer_ms", "rtt_ms", "server_ms", "total_ms")
        _check_finite(**{name: getattr(self, name) for name in ms})


@dataclass(frozen=True)
class Plan:
    """The chosen candidate and the estimate of every offered one, in candidate order."""

    chosen: str
    candidates: tuple[Estimate, ...]

    def __post_init__(self) -> None:
        if self.chosen not in _check_unique([e.split for e in self.candidates]):
            raise ValueError(f"chosen {self.chosen!r} is not among the candidates")

    def estimate(self, split: str) -> Estimate:
        """The row of one candidate; ``UnknownSplitPointError`` if it was not offered."""
        for e in self.candidates:
            if e.split == split:
                return e
        raise UnknownSplitPointError(f"the plan has no candidate {split!r}")

    def to_json(self) -> dict[str, Any]:
        """``{"chosen": NAME, "candidates": [{"split": NAME, "head_ms": ..., ...}, ...]}``."""
        return {"chosen": self.chosen, "candidates": [asdict(e) for e in self.candidates]}


def transfer_ms(payload_bytes: int, link: LinkEstimate) -> float:
    """Serialization delay of the request (body + HTTP headers) up and the answer down.

    >>> transfer_ms(4_650, LinkEstimate(uplink_bps=1e6, rtt_ms=50.0, downlink_bps=8e6))
    40.7
    """
    up_ms = serialization_ms(payload_bytes + HTTP_OVERHEAD_BYTES, link.uplink_bps)
    down_ms = serialization_ms(RESPONSE_BYTES, link.downlink_bps or link.uplink_bps)
    return up_ms + down_ms


def estimate(cost: DeviceCost, server: ServerProfile, link: LinkEstimate) -> Estimate:
    """Expected end-to-end latency of one candidate, term by term.

    ``UnknownSplitPointError`` if the service does not offer ``cost.split``.
    """
    if cost.split == DEVICE:
        return Estimate(DEVICE, cost.head_ms, 0.0, 0, 0.0, 0.0, 0.0, cost.head_ms)
    compute_ms = server.ms(cost.split)
    if compute_ms is None:
        raise UnknownSplitPointError(f"the service does not offer {cost.split!r}")
    # One RTT: request and answer ride one exchange on the kept-alive connection (no handshake).
    # Queueing: the service's load as the device last saw it (the whole-model wait for cloud, a
    # tail's for a split), else its recent mean wait for a batch; added to decode + compute.
    server_ms = compute_ms + server.wait_ms(cost.split)
    wire_ms = transfer_ms(cost.payload_bytes, link)
    total_ms = cost.head_ms + cost.encode_ms + link.rtt_ms + wire_ms + server_ms
    terms = (cost.head_ms, cost.encode_ms, cost.payload_bytes, wire_ms, link.rtt_ms, server_ms)
    return Estimate(cost.split, *terms, total_ms)


def switch_threshold_ms(current_total_ms: float, hysteresis: float, min_gain_ms: float) -> float:
    """How much faster the best candidate must be before leaving the current one."""
    return max(hysteresis * current_total_ms, min_gain_ms)


def load_figures(load: LoadBody | None, split_points: Iterable[str]) -> dict[str, float]:
    """A ``LoadBody`` (an answer's or the metadata's) as ``{candidate: wait ms}``, for
    ``ServerProfile.load_ms``; ``{}`` for a service that reports none.

        >>> load_figures(LoadBody(queue_ms_whole=90.0, queue_ms_tail=20.0,
        ...                       queue_ms_splits={"b": 25.0}), ["a", "b"])
        {'cloud': 90.0, 'a': 20.0, 'b': 25.0}
    """
    if load is None:
        return {}
    return {CLOUD: load.queue_ms_whole,
            **{name: load.queue_ms_splits.get(name, load.queue_ms_tail) for name in split_points}}


HYSTERESIS_RANGE = (0.05, 0.3)
MAX_SWITCH_PROBABILITY = 0.5


def draw_hysteresis(seed: int | None = None) -> float:
    """One device's own hysteresis, drawn once, uniform in ``HYSTERESIS_RANGE``: devices that
    see the same load disagree about when moving pays, so they do not all move at once.

        >>> draw_hysteresis(7) == draw_hysteresis(7)
        True
    """
    low, high = HYSTERESIS_RANGE
    return random.Random(seed).uniform(low, high)


def switch_probability(gain_ms: float, threshold_ms: float) -> float:
    """The chance of leaving the current candidate at one request when the best is faster by
    ``gain_ms``: 0 up to the threshold, then growing with the excess gain, at most
    ``MAX_SWITCH_PROBABILITY``, so that even a large step moves only part of a fleet per request.

        >>> switch_probability(5.0, 10.0), switch_probability(15.0, 10.0)
        (0.0, 0.25)
        >>> switch_probability(1e6, 10.0)
        0.5
    """
    if gain_ms <= threshold_ms:
        return 0.0
    excess = (gain_ms - threshold_ms) / max(threshold_ms, 1e-9)
    return min(MAX_SWITCH_PROBABILITY, excess / 2)


def choose(
    device: DeviceProfile,
    server: ServerProfile,
    link: LinkEstimate,
    *,
    current: str | None = None,
    hysteresis: float = 0.1,
    min_gain_ms: float = 1.0,
    draw: float | None = None,
) -> Plan:
    """Cost every candidate both sides offer (``device`` always) and pick the fastest.

    Ties go to the earliest in candidate order (device, cloud, split points). With ``current``
    still offered, it is kept unless the best is faster by more than
    ``max(hysteresis * current_total, min_gain_ms)``: estimates are noisy, and flapping between
    two near-equal cuts costs cold caches on both sides for nothing. With ``draw`` (a uniform
    number in [0, 1) the caller drew), a switch past the threshold happens only when ``draw <
    switch_probability(gain, threshold)``: the fleet's anti-stampede rule (module docstring).

    With ``device`` and ``server`` the two sides' profiles::

        link = LinkEstimate(uplink_bps=0.5e6, rtt_ms=60.0)
        choose(device, server, link, current=CLOUD).chosen  # '_blocks.5': 159 ms faster
    """
    _check_finite(hysteresis=hysteresis, min_gain_ms=min_gain_ms)
    rows = tuple(estimate(c, server, link) for c in _offered(device.costs, server))
    best = min(rows, key=lambda e: e.total_ms)  # min() keeps the first of equal totals
    kept = next((e for e in rows if e.split == current), None)
    if kept is not None:
        gain_ms = kept.total_ms - best.total_ms
        threshold_ms = switch_threshold_ms(kept.total_ms, hysteresis, min_gain_ms)
        if gain_ms <= threshold_ms or (
                draw is not None and draw >= switch_probability(gain_ms, threshold_ms)):
            best = kept
    return Plan(best.split, rows)


def _offered(costs: Iterable[DeviceCost], server: ServerProfile) -> Iterable[DeviceCost]:
    return (c for c in costs if c.split == DEVICE or server.ms(c.split) is not None)


def _is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_finite(**values: object) -> None:
    for name, value in values.items():
        if not _is_number(value) or not 0 <= value < math.inf:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_bytes(n_bytes: object) -> None:
    if type(n_bytes) is not int or n_bytes < 0:
        raise ValueError(f"payload_bytes must be an int >= 0, got {n_bytes!r}")


def _check_unique(names: list[str]) -> list[str]:
    if len(set(names)) != len(names):
        raise ValueError(f"candidate names must be unique, got {names}")
    return names


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"a candidate needs a non-empty name, got {name!r}")

