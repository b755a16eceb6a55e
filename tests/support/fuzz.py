"""Fuzz the live service and check every answer against the promise.

    report = FuzzReport()
    with httpx.Client(base_url=url, timeout=60) as http:
        send_all(http, report, "frames", frame_cases(frames, model=MODEL, n=300, seed=0))
    fuzz_raw_http(url, report, raw_http_cases(model=MODEL, split="_blocks.9"))
    assert not report.problems, report.summary()

The promise, checked on every answer: no 5xx (a 504 answering the request's own
``X-Request-Timeout-Ms`` is the documented answer, and counted apart), no dropped connection or
timeout, every 4xx/5xx body exactly ``{"error": "<non-empty str>"}`` as JSON, and no traceback
text in any body. ``still_serving`` then checks the service is ready and still right.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from tests.support.mutate import HttpCase

__all__ = [
    "FuzzReport",
    "NeighbourReport",
    "Problem",
    "bad_neighbours",
    "fuzz_raw_http",
    "send_schema_case",
    "send_all",
    "still_serving",
]

_TRACEBACK = re.compile(r'Traceback \(most recent call last\)|File "[^"]*", line \d+')
_SHOWN = 20  # problems kept in full; the rest are only counted
MSGPACK_TYPE = "application/msgpack"


@dataclass(frozen=True)
class Problem:
    """One answer that broke the promise."""

    source: str
    case: str
    status: int | None
    detail: str


@dataclass
class FuzzReport:
    """Counts of what was sent and answered, and every broken promise."""

    tried: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    client_deadline_504: int = 0
    unsendable: int = 0  # schemathesis cases the HTTP client itself refused to send
    slowest_ms: float = 0.0
    slowest_case: str = ""
    problem_count: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.tried.values())

    @property
    def server_errors(self) -> int:
        """5xx answers other than a 504 to the request's own deadline."""
        return sum(n for s, n in self.statuses.items() if s >= 500) - self.client_deadline_504

    def problem(self, source: str, case: str, status: int | None, detail: str) -> None:
        self.problem_count += 1
        if len(self.problems) < _SHOWN:
            self.problems.append(Problem(source, case[:300], status, detail[:300]))

    def check(
        self,
        source: str,
        case: str,
        status: int,
        headers: Mapping[str, str],
        body: bytes,
        *,
        client_deadline: bool = False,
        elapsed_ms: float = 0.0,
    ) -> None:
        """Record one answer and whether it kept the promise."""
        self.tried[source] += 1
        self.statuses[status] += 1
        if elapsed_ms > self.slowest_ms:
            label = case if case.startswith(source) else f"{source}: {case}"
            self.slowest_ms, self.slowest_case = elapsed_ms, label[:200]
        text = body.decode("utf-8", "replace")
        if _TRACEBACK.search(text):
            self.problem(source, case, status, f"traceback text in the body: {text[:200]}")
        if status >= 500:
            if status == 504 and client_deadline:
                self.client_deadline_504 += 1
            else:
                self.problem(source, case, status, f"server error: {text[:200]}")
        if status >= 400:
            detail = _error_body_problem(headers, body)
            if detail:
                self.problem(source, case, status, detail)

    def transport_error(self, source: str, case: str, exc: BaseException) -> None:
        self.tried[source] += 1
        self.problem(source, case, None, f"no answer: {type(exc).__name__}: {exc}")

    def summary(self) -> str:
        lines = [
            f"{self.total} cases, {self.problem_count} problems, statuses "
            f"{dict(sorted(self.statuses.items()))}"
        ]
        lines += [f"  [{p.source}] {p.status} {p.case}: {p.detail}" for p in self.problems]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "cases": self.total,
            "by_source": dict(self.tried),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "server_errors": self.server_errors,
            "client_deadline_504": self.client_deadline_504,
            "unsendable": self.unsendable,
            "slowest_ms": round(self.slowest_ms, 1),
            "slowest_case": self.slowest_case,
            "problems": self.problem_count,
            "problem_examples": [p.__dict__ for p in self.problems],
        }


def _error_body_problem(headers: Mapping[str, str], body: bytes) -> str | None:
    content_type = next((v for k, v in headers.items() if k.lower() == "content-type"), "")
    if not content_type.startswith("application/json"):
        return f"error body is {content_type or 'untyped'}, not JSON: {body[:100]!r}"
    try:
        doc = json.loads(body)
    except ValueError:
        return f"error body is not JSON: {body[:100]!r}"
    if not (
        isinstance(doc, dict)
        and set(doc) == {"error"}
        and isinstance(doc["error"], str)
        and doc["error"]
    ):
        return f'error body is not {{"error": str}}: {body[:100]!r}'
    return None


def send_all(
    http: httpx.Client,
    report: FuzzReport,
    source: str,
    cases: Iterable[HttpCase],
    *,
    on_case: Callable[[], None] | None = None,
) -> None:
    """Send each case over ``http`` (keep-alive, one at a time) and check its answer."""
    previous = "(first case)"
    for case in cases:
        started = time.perf_counter()
        try:
            r = http.request(
                case.method, case.path, content=case.body, headers=case.headers, params=case.params
            )
        except httpx.HTTPError as exc:
            # A dropped keep-alive connection shows on the *next* request: name both.
            report.transport_error(source, f"{case.description} (after: {previous})", exc)
        else:
            report.check(
                source,
                case.description,
                r.status_code,
                r.headers,
                r.content,
                client_deadline=case.client_deadline,
                elapsed_ms=(time.perf_counter() - started) * 1e3,
            )
        previous = case.description
        if on_case is not None:
            on_case()


def send_schema_case(base_url: str, report: FuzzReport, case: Any) -> None:
    """Send one schemathesis ``case`` to ``base_url`` and check its answer (source ``schema``).

    Cases that the HTTP library itself refuses to build (a header it cannot encode, a URL it
    cannot parse) were never sent: they count as ``unsendable``, not as answers.
    """
    from requests.exceptions import ConnectionError as RequestsConnectionError
    from requests.exceptions import InvalidHeader, InvalidURL, Timeout

    label = f"{case.operation.method.upper()} {case.operation.path}: {_curl(case)}"
    headers = {k.lower(): v for k, v in (case.headers or {}).items()}
    started = time.perf_counter()
    try:
        r = case.call(base_url=base_url, timeout=60)
    except (InvalidHeader, InvalidURL, UnicodeError, ValueError):
        report.unsendable += 1
        return
    except (RequestsConnectionError, Timeout) as exc:
        report.transport_error("schema", label, exc)
        return
    flat = {k: v[0] if isinstance(v, list) else v for k, v in r.headers.items()}
    report.check(
        "schema",
        label,
        r.status_code,
        flat,
        r.content,
        client_deadline="x-request-timeout-ms" in headers,
        elapsed_ms=(time.perf_counter() - started) * 1e3,
    )


def _curl(case: Any) -> str:
    try:
        return str(case.as_curl_command())[:300]
    except Exception:  # the reproduction line is a courtesy; a case that can't print still ran
        return repr(case)[:300]


def fuzz_raw_http(
    base_url: str,
    report: FuzzReport,
    cases: Sequence[tuple[str, bytes]],
    *,
    timeout_s: float = 10.0,
) -> None:
    """Send malformed HTTP over raw sockets. uvicorn answers most before the app runs (plain
    text, which is fine at that level); a closed connection is fine too. A 5xx, a traceback or a
    hang is not."""
    parts = urlsplit(base_url)
    for description, payload in cases:
        report.tried["http"] += 1
        try:
            with socket.create_connection((parts.hostname, parts.port), timeout=timeout_s) as s:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
                answer = b""
                while chunk := s.recv(65536):
                    answer += chunk
        except TimeoutError as exc:
            report.problem("http", description, None, f"hung: {exc}")
            continue
        except OSError:
            report.statuses[0] += 1  # reset by the server: refused at the protocol level
            continue
        match = re.match(rb"HTTP/1\.[01] (\d{3})", answer)
        status = int(match.group(1)) if match else 0
        report.statuses[status] += 1
        text = answer.decode("utf-8", "replace")
        if status >= 500 or _TRACEBACK.search(text):
            report.problem("http", description, status, text[:200])


@dataclass
class NeighbourReport:
    good: int
    good_right: int  # 200 with the expected top-1
    bad: int
    bad_400: int
    shared: int  # good answers whose forward pass held more than one request

    @property
    def ok(self) -> bool:
        return self.good == self.good_right and self.bad == self.bad_400


def bad_neighbours(
    base_url: str,
    path: str,
    good: bytes,
    expected_top1: int,
    bad: Sequence[bytes],
    *,
    rounds: int = 10,
) -> NeighbourReport:
    """Good and hostile frames for one split point sent together, ``rounds`` times, so the
    batcher stacks them into one forward pass: the hostile ones must get 400 and the good ones
    their right answer."""
    headers = {"Content-Type": MSGPACK_TYPE}

    async def scenario() -> tuple[list[httpx.Response], list[httpx.Response]]:
        n = 2 + len(bad)
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        goods: list[httpx.Response] = []
        bads: list[httpx.Response] = []
        async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as http:
            for _ in range(rounds):
                answers = await asyncio.gather(
                    *(http.post(path, content=body, headers=headers) for body in (good, *bad, good))
                )
                goods += [answers[0], answers[-1]]
                bads += answers[1:-1]
        return goods, bads

    goods, bads = asyncio.run(scenario())
    right = [
        r
        for r in goods
        if r.status_code == 200 and r.json()["top_k"][0][0]["index"] == expected_top1
    ]
    return NeighbourReport(
        len(goods),
        len(right),
        len(bads),
        sum(r.status_code == 400 for r in bads),
        sum(r.json()["batch_size"] > 1 for r in right),
    )


def still_serving(http: httpx.Client, path: str, frame: bytes, expected_top1: int) -> str | None:
    """``None`` if the service is ready and answers ``frame`` with ``expected_top1``; else why."""
    try:
        ready = http.get("/v2/health/ready")
        if ready.status_code != 200:
            return f"not ready: {ready.status_code} {ready.text[:100]}"
        r = http.post(path, content=frame, headers={"Content-Type": MSGPACK_TYPE})
    except httpx.HTTPError as exc:
        return f"no answer: {type(exc).__name__}: {exc}"
    if r.status_code != 200:
        return f"a good frame got {r.status_code}: {r.text[:100]}"
    top1 = r.json()["top_k"][0][0]["index"]
    return None if top1 == expected_top1 else f"top-1 {top1}, expected {expected_top1}"
