"""The service times a measured fleet run saw, from the service's own answers: the simulation's
inputs when ``fleet.json`` has them.

    row["served"] = run_summary(result.records, spec, inputs, windows=result.windows)
    groups = pooled(doc)                                 # {"uvicorn/1": summary, ...}
    times = service_times(groups["uvicorn/1"])           # what bench.fleet_sim simulates with

Every answer carries what the service spent on it (``timings_ms``: decode, queue, compute) and
the batch it rode in, and the device timed its round trip (``bench.fleet_device.Record``). Per
run, as histograms on a log scale (``BINS_PER_DECADE``; counts and exact sums, so runs pool
exactly):

* ``compute_ms[candidate][batch size]``: one forward pass, counted once per batch;
* ``compute_drain_ms[candidate][batch size]``: the forward passes that started after their
  window closed (arrival at the service, decode and queue after), while a backlog drained
  with nothing new arriving, on a core no HTTP work or decode shares: 128 devices' ``cloud``
  ran 16 rows in ~205 ms while requests kept arriving, and its drain faster. Every answer of
  a window's span counts (``bench.fleet_rounds.answer_spans``: to its photos' last answer);
  the simulation draws a batch that starts between windows from this class;
* ``compute_warmup_ms[candidate][batch size]``: the forward passes answered before the first
  window, in the warm-up: on a fresh deployment its passes in batches of 2-5 took 32-85 ms a
  row against 24-31 in the 16-row batches after (likely onnxruntime's first pass at each new
  batch size), and
  one Ray Serve replica's ``cloud`` at 32 devices, the first policy of its size, carried the
  backlog they built into its first window (p95 1,663 ms there, 650-870 in the next three);
  the simulation draws a batch that starts in the warm-up from this class;
* ``decode_ms[candidate][batch size]``: each request's decode (frame unpack, or JPEG decode
  and crop), by the size of the batch it then rode in;
* ``overhead_ms[candidate][batch size]``: the round trip less the service's three times and
  less the emulated link's own time (RTT, the body and ``HTTP_OVERHEAD_BYTES`` up, the answer
  down): HTTP parsing and answering, the event loop's backlog, thread hand-offs, a proxy;
* ``compute_alone_ms``, ``decode_alone_ms``, ``overhead_alone_ms`` (``[candidate]``): the
  three times of the requests (not cold) that had the service to themselves, no other request
  in flight at any point of theirs (seen from the devices, as the cold class is), and so left
  out of batch size 1: a core, a Serve proxy and an event loop with nothing else to do. A lone
  batch among 32 devices shares the core with other requests' HTTP work and decodes (on Ray
  Serve 1 replica, 32 devices' batch-1 compute averaged 17.6 ms, p95 32; a single device's
  10.3 ms, p95 12.6), which a single device never meets: pooled into one class, they made
  single-device runs simulate 18-51% slow. The simulation draws a request that arrives at an
  empty service from this class (its compute, if the service is still empty when its batch
  starts), and every other batch-1 request from batch size 1;
* ``queue_ms[candidate][batch size]``: kept to compare with the simulation's, never fed to it;
* batch size ``0`` stands for a request that found the service idle for ``IDLE_S`` or more
  (nothing else in flight): such a request is slower in all three of its times. Measured on
  the uvicorn runs of ``bench/results/fleet.json``: a single device a photo every 0.5 s (every
  request after a gap of 0.4 s or more) saw decode 1.5-2.8x, compute 1.2-1.9x and overhead
  +3-6 ms against the same candidates' lone requests from 8 and 32 devices (gaps of 0.05-0.2 s),
  6-11 ms a request in all; after 1 s, more still (the service gives its heap back,
  ``cloud_server.memory.IdleTrimmer``). Likely the core's caches and branch predictors, which
  whatever else this shared machine runs takes over while the service sleeps. The class is by
  the gap, pooled over every run (a request at the start of a round counts in it too), never
  by run;
* ``device_lag_ms[fleet size]``: the emulated device's own lateness per photo, over every
  photo: how late it started (after the photo, or after its previous answer when busy) plus how
  far its head's wait overran the profiled head time (asyncio timers on one core shared by N
  emulated devices). Not the service's, but part of every measured latency; a projection to
  real devices, each on its own CPU, leaves it out.

These are wall-clock times on the service's own loaded core, taken in the same run as the
latencies they are checked against, so they already hold the core's sharing between HTTP work,
decodes and the compute thread, and whatever else the machine ran that minute: the simulation
takes them as they are (``ServiceTimes.in_service``). They are pooled per engine and replica
count over all of a document's runs (``pooled``: what the projection draws from), and each
measured run is checked with its own over its group's (``overlaid``); no end-to-end latency
enters them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from bench.fleet_rounds import answer_spans
from bench.fleet_sim_inputs import ServiceTimes
from bench.netem import PROFILES, LinkShape
from shared.planner import HTTP_OVERHEAD_BYTES, RESPONSE_BYTES

__all__ = ["BINS_PER_DECADE", "device_lag", "draws", "group_key", "link_ms", "overlaid",
           "pooled", "run_summary", "service_times", "summary_json"]

ALONE_PARTS = ("compute_alone_ms", "decode_alone_ms", "overhead_alone_ms")
SIZED_PARTS = ("compute_ms", "compute_drain_ms", "compute_warmup_ms", "decode_ms", "overhead_ms",
               "queue_ms")
IDLE_S = 0.3  # idle this long (no request in flight), the next request runs cold (above)
BINS_PER_DECADE = 40  # bins 6% wide: a drawn time is within 3% of the one measured
MIN_BATCHES = 3  # a batch size seen fewer times is interpolated from its neighbours
DRAWS = 64  # quantiles kept per distribution for the simulation to draw from
_FLOOR_MS = 0.01

Hist = dict[str, Any]  # {"count": int, "sum_ms": float, "bins": {str(bin): count}}


def group_key(engine: str, replicas: int) -> str:
    """``"uvicorn/1"``: the runs whose answers pool together."""
    return f"{engine}/{int(replicas)}"


def _bin(ms: float) -> int:
    return round(math.log10(max(ms, _FLOOR_MS)) * BINS_PER_DECADE)


def _add(hist: Hist, ms: float) -> None:
    hist["count"] += 1
    hist["sum_ms"] += ms
    key = str(_bin(ms))
    hist["bins"][key] = hist["bins"].get(key, 0) + 1


def _new() -> Hist:
    return {"count": 0, "sum_ms": 0.0, "bins": {}}


def _merge(into: Hist, other: Mapping[str, Any]) -> None:
    into["count"] += int(other["count"])
    into["sum_ms"] += float(other["sum_ms"])
    for key, n in other["bins"].items():
        into["bins"][key] = into["bins"].get(key, 0) + int(n)


def link_ms(link: LinkShape, request_bytes: float) -> float:
    """What the emulated link alone adds to a round trip (``bench.fleet_device.LinkTransport``):
    the RTT, the body and its headers up, the answer down.

        >>> round(link_ms(PROFILES["3g"], 19_650), 1)   # 150 + 100 + 3.5
        253.5
    """
    to_ms, from_ms = _one_way_ms(link, request_bytes)
    return to_ms + from_ms


def _one_way_ms(link: LinkShape, request_bytes: float) -> tuple[float, float]:
    """``link_ms`` in its two halves: half the RTT and the body up, half the RTT and the answer
    down."""
    up_ms = (request_bytes + HTTP_OVERHEAD_BYTES) * 8 / link.uplink_bps * 1e3
    down_ms = RESPONSE_BYTES * 8 / link.downlink_bps * 1e3
    return link.one_way_ms + up_ms, link.one_way_ms + down_ms


def run_summary(records: Iterable[Any], spec: Any, inputs: Any,
                windows: Sequence[tuple[float, float]] | None = None) -> dict[str, Any]:
    """One run's answers (``Record``s with the service's timings) in its measuring ``windows``
    (a policy's rounds pooled on one time line, ``FleetRun.windows``; default ``spec.window``),
    by arrival, as histograms (module docstring); ``inputs`` (the run's
    ``bench.fleet_device.FleetInputs``) gives the profiled head times."""
    windows = tuple(windows or (spec.window,))
    records = list(records)
    compute: dict[str, dict[str, Hist]] = {}
    decode: dict[str, dict[str, Hist]] = {}
    overhead: dict[str, dict[str, Hist]] = {}
    queue: dict[str, dict[str, Hist]] = {}
    batches: set[tuple[str | int | float, ...]] = set()
    cold = _cold(records, inputs)
    alone = _alone(records, inputs)
    compute_alone: dict[str, Hist] = {}
    decode_alone: dict[str, Hist] = {}
    overhead_alone: dict[str, Hist] = {}
    compute_drain: dict[str, dict[str, Hist]] = {}
    compute_warmup: dict[str, dict[str, Hist]] = {}
    spans = list(zip(windows, answer_spans(records, windows), strict=True))
    for i, r in enumerate(records):
        if not r.served or r.compute_ms is None:
            continue
        # the window whose span (its drain included) the answer arrived in
        window = next(((w0, w1) for (w0, w1), (a, b) in spans if a <= r.done_s <= b), None)
        if window is None:
            warm = (r.candidate, int(r.batch_size or 1), r.compute_ms)
            if windows and r.done_s < windows[0][0] and ("warm-up", *warm) not in batches:
                batches.add(("warm-up", *warm))  # before the first window: the warm-up's
                _add(compute_warmup.setdefault(warm[0], {}).setdefault(str(warm[1]), _new()),
                     r.compute_ms)
            continue
        cand, n = r.candidate, 0 if i in cold else int(r.batch_size or 1)
        _add(queue.setdefault(cand, {}).setdefault(str(n), _new()), r.queue_ms)
        lone = n == 1 and i in alone
        # every request of a batch reports the batch's compute: count the batch once
        if lone:
            _add(compute_alone.setdefault(cand, _new()), r.compute_ms)
        elif (cand, n, r.compute_ms) not in batches:
            batches.add((cand, n, r.compute_ms))
            # started after its window closed (its arrival at the service, decode and queue
            # after): the drain
            drained = n > 0 and r.link in PROFILES and _at_service(r, inputs)[0] + (
                r.decode_ms + r.queue_ms) / 1e3 >= window[1]
            _add((compute_drain if drained else compute).setdefault(cand, {})
                 .setdefault(str(n), _new()), r.compute_ms)
        _add(decode_alone.setdefault(cand, _new()) if lone
             else decode.setdefault(cand, {}).setdefault(str(n), _new()), r.decode_ms)
        if r.round_trip_ms is not None and r.link in PROFILES:
            server_ms = r.decode_ms + r.queue_ms + r.compute_ms
            extra = r.round_trip_ms - server_ms - link_ms(PROFILES[r.link], r.request_bytes or 0)
            _add(overhead_alone.setdefault(cand, _new()) if lone
                 else overhead.setdefault(cand, {}).setdefault(str(n), _new()), max(0.0, extra))
    return {"compute_ms": compute, "compute_drain_ms": compute_drain,
            "compute_warmup_ms": compute_warmup, "decode_ms": decode,
            "overhead_ms": overhead, "compute_alone_ms": compute_alone,
            "decode_alone_ms": decode_alone, "overhead_alone_ms": overhead_alone,
            "queue_ms": queue,
            "device_lag_ms": {str(spec.devices): _lag(records, windows, inputs)},
            "idle_s": IDLE_S}


def _at_service(r: Any, inputs: Any) -> tuple[float, float]:
    """When an answered request (on an emulated link of ``PROFILES``) reached the service and
    when its answer left it, on the device's clock: from the request leaving, plus its link's
    one-way time and the body's upload, to the answer, less the one-way time and the answer's
    download (``link_ms``'s parts)."""
    sent_s = r.sent_s if r.sent_s is not None else r.start_s + inputs.head_ms(r.candidate) / 1e3
    to_ms, from_ms = _one_way_ms(PROFILES[r.link], r.request_bytes or 0)
    return sent_s + to_ms / 1e3, r.done_s - from_ms / 1e3


def _spans(records: list[Any], inputs: Any) -> list[tuple[float, float, int]]:
    """(arrive_s, leave_s, index) of each answered request at the service, by arrival
    (``_at_service``)."""
    return sorted((*_at_service(r, inputs), i) for i, r in enumerate(records)
                  if r.served and r.link in PROFILES)


def _alone(records: list[Any], inputs: Any) -> set[int]:
    """Indices of the answered requests no other request overlapped at the service."""
    spans = _spans(records, inputs)
    out, busy_until = set(), -math.inf
    for k, (arrive_s, leave_s, i) in enumerate(spans):
        follows = spans[k + 1][0] if k + 1 < len(spans) else math.inf
        if arrive_s >= busy_until and follows >= leave_s:
            out.add(i)
        busy_until = max(busy_until, leave_s)
    return out


def _cold(records: list[Any], inputs: Any) -> set[int]:
    """Indices of the answered requests that reached a service with nothing in flight for
    ``IDLE_S`` (``_spans``)."""
    spans = _spans(records, inputs)
    out, busy_until = set(), -math.inf
    for arrive_s, leave_s, i in spans:
        if arrive_s - busy_until >= IDLE_S:
            out.add(i)
        busy_until = max(busy_until, leave_s)
    return out


def _within(t: float, windows: Sequence[tuple[float, float]]) -> bool:
    return any(start <= t < end for start, end in windows)


def _lag(records: list[Any], windows: Sequence[tuple[float, float]], inputs: Any) -> Hist:
    """``device_lag_ms`` (module docstring) over the photos taken in the windows."""
    hist = _new()
    by_device: dict[int, list[Any]] = {}
    for r in records:
        by_device.setdefault(r.device, []).append(r)
    for mine in by_device.values():
        mine.sort(key=lambda r: r.photo_s)
        free_s = -math.inf
        for r in mine:
            due_s = max(r.photo_s, free_s)
            free_s = r.done_s
            if not _within(r.photo_s, windows):
                continue
            lag_ms = (r.start_s - due_s) * 1e3
            if r.sent_s is not None:  # the head's wait overran
                lag_ms += (r.sent_s - r.start_s) * 1e3 - inputs.head_ms(r.candidate)
            elif not r.served and r.outcome == "ok" and not r.fallback:  # ran on the device
                lag_ms += (r.done_s - r.start_s) * 1e3 - inputs.head_ms(r.candidate)
            _add(hist, max(0.0, lag_ms))
    return hist


def pooled(doc: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per ``group_key``: ``doc["inputs"]["served"]`` when the document has it pooled, else
    every run's ``served`` summed."""
    given = doc.get("inputs", {}).get("served")
    if given:
        return {str(k): dict(v) for k, v in given.items()}
    out: dict[str, dict[str, Any]] = {}
    for run in doc.get("runs", []):
        served = run.get("served")
        if not served:
            continue
        served = _reclassed(run, served)
        group = out.setdefault(group_key(run.get("engine", "uvicorn"), run.get("replicas", 1)),
                               {part: {} for part in SIZED_PARTS})
        for part in SIZED_PARTS:
            for cand, sizes in served.get(part, {}).items():
                for n, hist in sizes.items():
                    _merge(group[part].setdefault(cand, {}).setdefault(n, _new()), hist)
        for part in ALONE_PARTS:
            for cand, hist in served.get(part, {}).items():
                _merge(group.setdefault(part, {}).setdefault(cand, _new()), hist)
        for n, hist in served.get("device_lag_ms", {}).items():
            _merge(group.setdefault("device_lag_ms", {}).setdefault(n, _new()), hist)
    return out


def overlaid(run: Mapping[str, Any], group: Mapping[str, Any]) -> dict[str, Any]:
    """One run's own answers (its ``fleet.json`` row's ``served``) over its group's pool
    (``pooled``): per part, candidate and class (batch size, cold, alone), the run's histogram
    where it holds ``MIN_BATCHES`` answers or more, else the group's (what ``auto`` never
    chose, a cold start a busy run never had). The emulator's lateness stays the group's (per
    fleet size already).

        >>> few = {"count": 1, "sum_ms": 9.0, "bins": {"38": 1}}
        >>> many = {"count": 3, "sum_ms": 60.0, "bins": {"52": 3}}
        >>> run = {"served": {"idle_s": IDLE_S, "compute_ms": {"cloud": {"1": many, "2": few}}}}
        >>> group = {"compute_ms": {"cloud": {"1": few, "2": many}}}
        >>> mixed = overlaid(run, group)["compute_ms"]["cloud"]
        >>> mixed["1"]["sum_ms"], mixed["2"]["sum_ms"]
        (60.0, 60.0)
    """
    own = _reclassed(run, run.get("served") or {})
    out: dict[str, Any] = {k: v for k, v in group.items()
                           if k not in (*SIZED_PARTS, *ALONE_PARTS)}
    for part in SIZED_PARTS:
        mine, pool = own.get(part, {}), group.get(part, {})
        out[part] = {cand: {n: _either(mine.get(cand, {}).get(n), pool.get(cand, {}).get(n))
                            for n in {*mine.get(cand, {}), *pool.get(cand, {})}}
                     for cand in {*mine, *pool}}
    for part in ALONE_PARTS:
        mine, pool = own.get(part, {}), group.get(part, {})
        out[part] = {cand: _either(mine.get(cand), pool.get(cand)) for cand in {*mine, *pool}}
    return out


def _either(mine: Hist | None, pool: Hist | None) -> Hist:
    """The run's histogram if it has enough answers, else the pool's (else the run's few)."""
    if mine is not None and int(mine["count"]) >= MIN_BATCHES or pool is None:
        assert mine is not None
        return mine
    return pool


def _reclassed(run: Mapping[str, Any], served: Mapping[str, Any]) -> Mapping[str, Any]:
    """A run summarised before ``IDLE_S`` was 0.3 s (no ``idle_s`` in it; the cold class then
    needed 1 s idle): a single device whose photo period less its p95 leaves the service idle
    ``IDLE_S`` before every request ran every one of them cold, so its batch size 1 joins 0.
    Larger fleets' requests after shorter gaps cannot be told apart afterwards and stay put.

        >>> h = {"count": 1, "sum_ms": 9.0, "bins": {"38": 1}}
        >>> run = {"devices": 1, "period_ms": 500.0, "p95_ms": 80.0}
        >>> _reclassed(run, {"decode_ms": {"cloud": {"1": h}}})["decode_ms"]["cloud"]["0"]["count"]
        1
    """
    if "idle_s" in served or run.get("devices") != 1 or (
            float(run.get("period_ms", 0.0)) - float(run.get("p95_ms", math.inf))
            < IDLE_S * 1e3):
        return served
    out: dict[str, Any] = dict(served)
    for part in ("compute_ms", "decode_ms", "overhead_ms", "queue_ms"):
        moved: dict[str, dict[str, Hist]] = {}
        for cand, sizes in served.get(part, {}).items():
            sizes = {n: {**h, "bins": dict(h["bins"])} for n, h in sizes.items()}
            lone = sizes.pop("1", None)
            if lone is not None:
                _merge(sizes.setdefault("0", _new()), lone)
            moved[cand] = sizes
        out[part] = moved
    return out


def draws(hist: Mapping[str, Any], k: int = DRAWS) -> tuple[float, ...]:
    """Up to ``k`` equally likely values of a histogram (its quantiles at (i + 0.5) / k, from
    bin centres), scaled so that their mean is the measured mean: a saturated service's
    throughput is set by the mean.

        >>> h = {"count": 2, "sum_ms": 30.0, "bins": {}}
        >>> for ms in (10.0, 20.0):
        ...     h["bins"][str(_bin(ms))] = h["bins"].get(str(_bin(ms)), 0) + 1
        >>> [round(x, 1) for x in draws(h)]
        [10.0, 20.0]
    """
    count = int(hist["count"])
    if count <= 0:
        raise ValueError("an empty histogram has no draws")
    cells = sorted((int(b), int(n)) for b, n in hist["bins"].items())
    k = min(k, count)
    out, seen, i = [], 0, 0
    for j in range(k):
        rank = (j + 0.5) / k * count
        while seen + cells[i][1] < rank:
            seen += cells[i][1]
            i += 1
        out.append(10 ** (cells[i][0] / BINS_PER_DECADE))
    mean = float(hist["sum_ms"]) / count
    scale = mean / (sum(out) / len(out)) if sum(out) > 0 else 1.0
    return tuple(round(x * scale, 3) for x in out)


def service_times(group: Mapping[str, Any]) -> ServiceTimes:
    """The simulation's ``ServiceTimes`` from one pooled group (``in_service``: the times are
    taken as they are, with their spread). A candidate whose runs never saw a warm shared batch
    of one (a single device: every request alone, or cold) simulates it with its lone, else
    its cold requests' times."""
    alone = {part: {c: h for c, h in group.get(part, {}).items() if int(h["count"]) > 0}
             for part in ALONE_PARTS}
    parts = {}
    for part, alone_part in zip(("compute_ms", "decode_ms", "overhead_ms"), ALONE_PARTS,
                                strict=True):
        parts[part] = {c: _with_lone(sizes, alone[alone_part].get(c))
                       for c, sizes in group.get(part, {}).items()}
        for c, hist in alone[alone_part].items():  # a candidate seen only alone
            parts[part].setdefault(c, {"1": hist})
    # cold (batch size 0) is a class of its own, however few: not a batch size to interpolate
    cold = {c: draws(sizes["0"]) for c, sizes in parts["compute_ms"].items()
            if int(sizes.get("0", {"count": 0})["count"]) > 0}
    batch_ms = {c: d for c, sizes in parts["compute_ms"].items()
                if (d := _sized({n: h for n, h in sizes.items() if n != "0"}) or
                    ({1: cold[c]} if c in cold else {}))}
    decode = {c: d for c, sizes in parts["decode_ms"].items()
              if c in batch_ms and (d := _sized(sizes))}
    overhead = {c: d for c, sizes in parts["overhead_ms"].items()
                if c in batch_ms and (d := _sized(sizes))}
    lone = {part: {c: draws(h) for c, h in alone[part].items()
                   if c in batch_ms and int(h["count"]) >= MIN_BATCHES} for part in ALONE_PARTS}
    # a drain's batch sizes as measured, none interpolated: the others run as in the window
    drain = {c: {int(n): draws(h) for n, h in sizes.items() if int(h["count"]) >= MIN_BATCHES}
             for c, sizes in group.get("compute_drain_ms", {}).items() if c in batch_ms}
    # the warm-up's every batch size seen, however few: a fresh deployment's first passes
    warmup = {c: {int(n): draws(h) for n, h in sizes.items() if int(h["count"]) > 0}
              for c, sizes in group.get("compute_warmup_ms", {}).items() if c in batch_ms}
    return ServiceTimes(batch_ms, {c: _mean(sizes) for c, sizes in decode.items()},
                        spread=True, in_service=True, decode_draws=decode,
                        overhead_draws=overhead, cold_draws=cold,
                        drain_compute_draws={c: d for c, d in drain.items() if d},
                        warmup_compute_draws={c: d for c, d in warmup.items() if d},
                        alone_compute_draws=lone["compute_alone_ms"],
                        alone_decode_draws=lone["decode_alone_ms"],
                        alone_overhead_draws=lone["overhead_alone_ms"])


def _with_lone(sizes: Mapping[str, Hist], lone: Hist | None) -> dict[str, Hist]:
    """``sizes`` with the lone requests' histogram as batch size 1 when it has too few."""
    out = dict(sizes)
    if lone is not None and int(out.get("1", {"count": 0})["count"]) < MIN_BATCHES:
        out["1"] = lone
    return out


def _sized(sizes: Mapping[str, Mapping[str, Any]]) -> dict[int, tuple[float, ...]]:
    """Draws per batch size, for the sizes seen at least ``MIN_BATCHES`` times (all of them if
    none was)."""
    seen = {int(n): h for n, h in sizes.items() if int(h["count"]) > 0}
    kept = {n: h for n, h in seen.items() if int(h["count"]) >= MIN_BATCHES} or seen
    return {n: draws(h) for n, h in sorted(kept.items())}


def _mean(sizes: Mapping[int, tuple[float, ...]]) -> float:
    xs = [x for d in sizes.values() for x in d]
    return sum(xs) / len(xs)


def summary_json(groups: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """A readable digest of the pooled groups: per candidate, answers, mean decode, overhead
    and queue ms, mean compute ms per batch size (with the batches seen), and the lone
    requests' mean compute ms (with their count)."""
    out: dict[str, Any] = {}
    for key, group in groups.items():
        cands: dict[str, Any] = {}
        lone = group.get("compute_alone_ms", {})
        for cand in sorted({*group.get("compute_ms", {}), *lone}):
            sizes = group.get("compute_ms", {}).get(cand, {})
            row: dict[str, Any] = {"compute_ms_by_batch": {
                n: _mean_count(h)
                for n, h in sorted(sizes.items(), key=lambda kv: int(kv[0])) if h["count"]}}
            if int(lone.get(cand, {"count": 0})["count"]):
                row["compute_ms_alone"] = _mean_count(lone[cand])
            for part in ("decode_ms", "overhead_ms", "queue_ms"):
                hists = list(group.get(part, {}).get(cand, {}).values())
                lone_part = group.get(part.replace("_ms", "_alone_ms"), {})  # none for queue
                if cand in lone_part:
                    hists.append(lone_part[cand])
                count = sum(int(h["count"]) for h in hists)
                if count:
                    row[part] = round(sum(float(h["sum_ms"]) for h in hists) / count, 2)
                    row["answers"] = count
            cands[cand] = row
        out[key] = cands
    return out


def _mean_count(hist: Hist) -> list[float]:
    return [round(hist["sum_ms"] / hist["count"], 2), hist["count"]]


def device_lag(group: Mapping[str, Any]) -> dict[int, tuple[float, ...]]:
    """The group's ``device_lag_ms`` draws per fleet size (empty without any)."""
    return {int(n): draws(h) for n, h in group.get("device_lag_ms", {}).items()
            if int(h["count"]) > 0}
