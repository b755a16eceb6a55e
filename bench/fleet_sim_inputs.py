"""What the fleet simulation is fed: ``fleet.json``'s ``inputs``, parsed into frozen values.

    inputs = FleetInputs.from_doc(doc["inputs"], service=ServiceTimes.from_json(...))

Service times are per candidate and batch size: lists of measured ms for one forward pass of
that many rows (``batch_ms``), plus what each request costs the service's one core outside its
batch (``request_ms``: the HTTP exchange and the frame or JPEG decode, which the service runs
per request in a thread, beside the compute thread, on the same core).
"""

from __future__ import annotations

import bisect
import random
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from shared.candidates import CLOUD, DEVICE
from shared.errors import ConfigError

__all__ = ["FleetInputs", "LinkSpec", "ServiceTimes", "candidate_of"]

MAX_QUEUE = 256  # SPLITSERVE_MAX_QUEUE's default: the 503 threshold of one replica
REQUEST_TIMEOUT_MS = 30_000.0  # SPLITSERVE_REQUEST_TIMEOUT_S's default


@dataclass(frozen=True)
class LinkSpec:
    """One link profile (``bench.netem.PROFILES``): round trip and both directions' rates."""

    name: str
    rtt_ms: float
    up_bps: float
    down_bps: float

    def up_ms(self, n_bytes: float) -> float:
        return n_bytes * 8 / self.up_bps * 1e3

    def down_ms(self, n_bytes: float) -> float:
        return n_bytes * 8 / self.down_bps * 1e3


@dataclass(frozen=True)
class ServiceTimes:
    """Measured service costs. ``batch_ms[candidate][batch size]``: samples of one forward
    pass (drawn from, or their median taken: ``spread``); batch sizes not measured are
    interpolated between the nearest measured ones (the nearest one's samples, scaled by the
    ratio of interpolated means). ``request_ms`` is each
    request's own CPU on the replica (``overhead_ms`` for every request, plus the candidate's
    ``decode_ms`` when decode was measured apart from the batch)."""

    batch_ms: Mapping[str, Mapping[int, tuple[float, ...]]]
    decode_ms: Mapping[str, float] = field(default_factory=dict)
    overhead_ms: float = 0.0
    # Draw each forward pass from the samples (True), or take their median (False): on a
    # shared machine most of the measured spread is other processes' load, not the service's.
    spread: bool = False
    # True: wall-clock times the service reported in a measured fleet run
    # (``bench.fleet_sim_served``). They already hold the core's sharing between requests'
    # work and the compute thread, so decode and ``overhead_draws`` are delays that share no
    # core in the simulation. False: CPU times measured in-process, which share it.
    in_service: bool = False
    # candidate -> batch size -> draws: a request's decode, and its time outside the service's
    # own timings and the link (HTTP, the event loop's backlog, hand-offs), by the size of the
    # batch it rode in (the batch size stands for how busy the service was)
    decode_draws: Mapping[str, Mapping[int, tuple[float, ...]]] = field(default_factory=dict)
    overhead_draws: Mapping[str, Mapping[int, tuple[float, ...]]] = field(default_factory=dict)
    # candidate -> one forward pass of a request that found the replica idle (batch size 0 of
    # decode_draws and overhead_draws: its other two times); see bench.fleet_sim_served.IDLE_S
    cold_draws: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    # candidate -> the forward pass, decode and overhead of a warm lone request that had the
    # service to itself (bench.fleet_sim_served: ``compute_alone_ms`` ...); empty: batch size 1
    alone_compute_draws: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    alone_decode_draws: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    alone_overhead_draws: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    # candidate -> batch size -> a forward pass that started after its window closed, while a
    # backlog drained with nothing new arriving (``compute_drain_ms``); sizes not measured run
    # as ``batch_ms``
    drain_compute_draws: Mapping[str, Mapping[int, tuple[float, ...]]] = field(
        default_factory=dict)
    # candidate -> batch size -> a forward pass of the warm-up, before the first window
    # (``compute_warmup_ms``); sizes not measured run as ``batch_ms``
    warmup_compute_draws: Mapping[str, Mapping[int, tuple[float, ...]]] = field(
        default_factory=dict)

    def __post_init__(self) -> None:
        for cand, sizes in self.batch_ms.items():
            if not sizes or any(not s for s in sizes.values()):
                raise ConfigError(f"service times of {cand!r} have an empty batch size")

    @classmethod
    def from_json(cls, service_ms: Mapping[str, Mapping[str, Sequence[float]]], *,
                  decode_ms: Mapping[str, float] | None = None,
                  overhead_ms: float = 0.0, spread: bool = False) -> ServiceTimes:
        batch = {cand: {int(b): tuple(float(x) for x in xs) for b, xs in sizes.items()}
                 for cand, sizes in service_ms.items()}
        return cls(batch, dict(decode_ms or {}), overhead_ms, spread)

    def with_overhead(self, overhead_ms: float) -> ServiceTimes:
        return replace(self, overhead_ms=overhead_ms)

    def request_ms(self, cand: str) -> float:
        return self.overhead_ms + self.decode_ms.get(cand, 0.0)

    def mean_ms(self, cand: str, rows: int) -> float:
        """Mean ms of a forward pass of ``rows`` rows (interpolated)."""
        sizes = self.typical(cand)
        keys = sorted(sizes)
        means = [sum(sizes[k]) / len(sizes[k]) for k in keys]
        if rows in sizes:
            return means[keys.index(rows)]
        i = bisect.bisect_left(keys, rows)
        if i == 0:  # below the smallest measured: scale it per row
            return means[0] * rows / keys[0]
        if i == len(keys):  # beyond the largest: its per-row cost
            return means[-1] * rows / keys[-1]
        lo, hi = keys[i - 1], keys[i]
        return means[i - 1] + (means[i] - means[i - 1]) * (rows - lo) / (hi - lo)

    def typical(self, cand: str) -> Mapping[int, tuple[float, ...]]:
        """The samples the simulation draws from: all of them, or only their median."""
        sizes = self.batch_ms[cand]
        if self.spread:
            return sizes
        return {b: (statistics.median(xs),) for b, xs in sizes.items()}

    def sampler(self, cand: str, batch_max: int) -> list[tuple[tuple[float, ...], float]]:
        """Per batch size 1..batch_max: (samples, scale) such that ``choice(samples) * scale``
        draws a forward pass of that size."""
        sizes = self.typical(cand)
        keys = sorted(sizes)
        out: list[tuple[tuple[float, ...], float]] = [((0.0,), 0.0)]
        for rows in range(1, batch_max + 1):
            near = min(keys, key=lambda k: (abs(k - rows), k))
            base = sum(sizes[near]) / len(sizes[near])
            out.append((sizes[near], self.mean_ms(cand, rows) / base if base > 0 else 1.0))
        return out

    def server_ms(self, cand: str) -> float:
        """What the service would publish for ``cand`` at start-up: decode + batch-1 compute."""
        return self.decode_ms.get(cand, 0.0) + self.mean_ms(cand, 1)

    def to_json(self) -> dict[str, Any]:
        return {"service_ms": {c: {str(b): list(xs) for b, xs in sorted(s.items())}
                               for c, s in self.batch_ms.items()},
                "decode_ms": dict(self.decode_ms), "overhead_ms": self.overhead_ms,
                "spread": self.spread, "in_service": self.in_service,
                **({"decode_draws": _sizes_json(self.decode_draws),
                    "overhead_draws": _sizes_json(self.overhead_draws),
                    "drain_compute_draws": _sizes_json(self.drain_compute_draws),
                    "warmup_compute_draws": _sizes_json(self.warmup_compute_draws),
                    "cold_draws": {c: list(xs) for c, xs in self.cold_draws.items()},
                    **{name: {c: list(xs) for c, xs in getattr(self, name).items()}
                       for name in ("alone_compute_draws", "alone_decode_draws",
                                    "alone_overhead_draws")}}
                   if self.in_service else {})}

    def by_size(self, draws: Mapping[int, tuple[float, ...]] | None, batch_max: int,
                default: float) -> list[tuple[float, ...]]:
        """Index 1..batch_max: the draws of the nearest batch size measured."""
        if not draws:
            return [(default,)] * (batch_max + 1)
        keys = sorted(draws)
        return [draws[min(keys, key=lambda k: (abs(k - n), k))] for n in range(batch_max + 1)]


def _sizes_json(d: Mapping[str, Mapping[int, tuple[float, ...]]]) -> dict[str, Any]:
    return {c: {str(n): list(xs) for n, xs in sorted(s.items())} for c, s in d.items()}


STARTUP_KEYS = ("metadata_ms", "probe_small_ms", "probe_large_ms")


@dataclass(frozen=True)
class FleetInputs:
    """Devices, links and service of one fleet (``fleet.json``'s ``inputs``)."""

    period_ms: float
    duration_s: float
    link_mix: tuple[str, ...]
    links: Mapping[str, LinkSpec]
    head_ms: Mapping[str, float]
    request_bytes: Mapping[str, float]
    response_bytes: float
    split_points: Mapping[str, str]
    batch_max: int
    batch_wait_ms: float
    service: ServiceTimes
    max_queue: int = MAX_QUEUE
    model: str = "efficientnet_lite0"
    warmup_s: float = 4.0
    timeout_ms: float = 10_000.0  # the device's deadline per request; then it finishes locally
    tail_ms: Mapping[str, float] = field(default_factory=dict)  # device time to finish locally
    # engine -> per-request delay that costs the replica no CPU (fitted: bench.fleet_sim)
    proxy_ms: Mapping[str, float] = field(default_factory=dict)
    # engine -> mean of an exponential extra delay on top (the spread of that delay: a shared
    # machine's scheduling jitter), fitted with it
    jitter_ms: Mapping[str, float] = field(default_factory=dict)
    # fleet size -> the emulated devices' own lateness per photo, drawn at the nearest size
    # measured (bench.fleet_sim_served); empty: none (real devices, each on its own CPU)
    device_lag_ms: Mapping[int, tuple[float, ...]] = field(default_factory=dict)
    # deployment ("uvicorn/1", "ray-serve/2") -> a device's start-up, each request's round
    # trip timed alone: metadata_ms, probe_small_ms, probe_large_ms (bench.fleet_startup)
    startup_ms: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    # deployment -> what its idle service published per candidate (metadata server_ms): the
    # start-up profile each simulated replica publishes until answers move it
    published_ms: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.period_ms <= 0 or self.batch_max < 1 or self.batch_wait_ms < 0:
            raise ConfigError("period_ms must be > 0, batch_max >= 1, batch_wait_ms >= 0")
        missing = [n for n in self.link_mix if n not in self.links]
        if missing or not self.link_mix:
            raise ConfigError(f"link_mix names links without a profile: {missing}")
        if DEVICE not in self.head_ms:
            raise ConfigError("inputs.head_ms needs the device candidate (the whole model)")

    @classmethod
    def from_doc(cls, inputs: Mapping[str, Any], *, service: ServiceTimes | None = None
                 ) -> FleetInputs:
        """Parse ``fleet.json``'s ``inputs``; ``service`` replaces (or stands in for) its
        ``service.service_ms``. ``ConfigError`` naming what is missing."""
        try:
            svc = inputs["service"]
            if service is None:
                if "service_ms" not in svc:
                    raise ConfigError("inputs.service.service_ms is absent: measure it")
                service = ServiceTimes.from_json(
                    svc["service_ms"], overhead_ms=float(svc.get("http_cpu_ms", 0.0)))
            links = {name: LinkSpec(name, float(v["rtt_ms"]), float(v["up_bps"]),
                                    float(v["down_bps"]))
                     for name, v in inputs["links"].items()}
            return cls(
                period_ms=float(inputs["period_ms"]),
                duration_s=float(inputs.get("duration_s", 20.0)),
                link_mix=tuple(inputs["link_mix"]), links=links,
                head_ms={k: float(v) for k, v in inputs["head_ms"].items()},
                request_bytes={k: float(v) for k, v in inputs["request_bytes"].items()},
                response_bytes=float(inputs.get("response_bytes", 700.0)),
                split_points=dict(inputs.get("split_points", {})),
                batch_max=int(svc["batch_max"]), batch_wait_ms=float(svc["batch_wait_ms"]),
                service=service, max_queue=int(svc.get("max_queue", MAX_QUEUE)),
                model=str(inputs.get("model", "efficientnet_lite0")),
                warmup_s=float(inputs.get("warmup_s", 4.0)),
                timeout_ms=float(inputs.get("timeout_s", 10.0)) * 1e3,
                tail_ms={k: float(v) for k, v in inputs.get("tail_ms", {}).items()},
                startup_ms={group: {k: float(v) for k, v in costs.items() if k in STARTUP_KEYS}
                            for group, costs in inputs.get("startup_ms", {}).items()},
                published_ms={group: {k: float(v) for k, v in costs.get("server_ms", {}).items()}
                              for group, costs in inputs.get("startup_ms", {}).items()})
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"fleet inputs: missing or bad {exc}") from exc

    def finish_ms(self, cand: str) -> float:
        """Device time to finish ``cand`` locally once the service failed it (a fallback)."""
        if cand in self.tail_ms:
            return self.tail_ms[cand]
        return max(0.0, self.head_ms[DEVICE] - (0.0 if cand == CLOUD else self.head_ms[cand]))

    def candidates(self) -> list[str]:
        """What a device can run: ``device`` and every candidate the service has times for."""
        return [DEVICE] + [c for c in self.head_ms if c != DEVICE and c in self.service.batch_ms]

    def policies(self) -> list[str]:
        """The policies of the fleet benchmark: cloud, device, the named split points, auto."""
        return [CLOUD, DEVICE, *self.split_points, "auto"]


def candidate_of(inputs: FleetInputs, policy: str) -> str:
    """The candidate a fixed policy sends: a split point's short name (``middle``) or its own
    name; ``ConfigError`` when the inputs have nothing for it."""
    cand = inputs.split_points.get(policy, policy)
    if cand != DEVICE and cand not in inputs.service.batch_ms:
        raise ConfigError(f"no service times for policy {policy!r} ({cand!r})")
    if cand not in inputs.head_ms:
        raise ConfigError(f"no head time for policy {policy!r} ({cand!r})")
    return cand


def seeded_phases(n: int, period_ms: float, seed: int) -> list[float]:
    """Each device's first photo, uniform over one period: ``bench fleet``'s draw
    (``bench.fleet_run.device_phase_s``), so a simulated device starts where the measured one
    did."""
    return [random.Random(seed * 1_000_003 + i).uniform(0.0, period_ms) % period_ms
            for i in range(n)]
