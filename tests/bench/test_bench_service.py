"""Tests for the pure parts of ``bench service``: classifying answers, aggregating a level, the
JSON document and table, the CPU split, and the load loop against an in-process transport."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from bench.service_compute import cpu_layout
from bench.service_http import Connection, HttpError
from bench.service_load import (
    FAST_REJECT_S,
    Classified,
    LevelRun,
    LoadFrame,
    Sample,
    classify,
    histogram_mean,
    run_level,
    summarize,
)
from bench.service_report import check_bar, plot, table_rows, to_json
from bench.stats import percentile


def _answer(index: int = 7, batch_size: int = 4) -> bytes:
    return json.dumps(
        {
            "top_k": [[{"index": index, "label": "x", "prob": 0.9}]],
            "timings_ms": {"decode": 1.0, "queue": 2.0, "compute": 30.0},
            "batch_size": batch_size,
        }
    ).encode()


@pytest.mark.parametrize(
    ("status", "headers", "body", "elapsed_s", "error", "outcome", "reason"),
    [
        (200, {}, _answer(7), 0.05, None, "ok", ""),
        (200, {}, _answer(8), 0.05, None, "error", "wrong class"),
        (200, {}, b"not json", 0.05, None, "error", "unreadable 200 body"),
        (200, {}, b'{"top_k": []}', 0.05, None, "error", "unreadable 200 body"),
        (503, {"Retry-After": "1"}, b"{}", 0.01, None, "rejected", ""),
        (503, {"retry-after": "2.5"}, b"{}", 0.01, None, "rejected", ""),
        (503, {"Retry-After": "1"}, b"{}", FAST_REJECT_S + 0.5, None, "error", "slow 503"),
        (503, {}, b"{}", 0.01, None, "error", "503 without Retry-After"),
        (503, {"Retry-After": "soon"}, b"{}", 0.01, None, "error", "503 without Retry-After"),
        (504, {}, b"{}", 30.0, None, "error", "status 504"),
        (400, {}, b"{}", 0.01, None, "error", "status 400"),
        (None, {}, b"", 30.0, "timeout", "error", "timeout"),
        (None, {}, b"", 0.0, "ConnectError", "error", "ConnectError"),
    ],
    ids=[
        "ok",
        "wrong-class",
        "not-json",
        "no-top-k",
        "fast-503",
        "fast-503-lowercase-header",
        "slow-503",
        "503-without-retry-after",
        "503-with-unreadable-retry-after",
        "504",
        "400",
        "timeout",
        "connect-error",
    ],
)
def test_classify(
    status: int | None,
    headers: dict[str, str],
    body: bytes,
    elapsed_s: float,
    error: str | None,
    outcome: str,
    reason: str,
) -> None:
    got = classify(status, headers=headers, body=body, expected=7, elapsed_s=elapsed_s, error=error)
    assert (got.outcome, got.reason) == (outcome, reason)


def test_classify_keeps_batch_size_timings_and_retry_after() -> None:
    ok = classify(200, headers={}, body=_answer(7, batch_size=5), expected=7, elapsed_s=0.1)
    assert ok.batch_size == 5 and ok.server_ms == {"decode": 1.0, "queue": 2.0, "compute": 30.0}
    rejected = classify(503, headers={"Retry-After": "3"}, body=b"", expected=7, elapsed_s=0.0)
    assert rejected.retry_after_s == 3.0


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([], 50, None),
        ([5.0], 99, 5.0),
        ([1.0, 2.0, 3.0, 4.0], 50, 2.5),
        ([4.0, 1.0, 3.0, 2.0], 0, 1.0),
        ([4.0, 1.0, 3.0, 2.0], 100, 4.0),
        (list(map(float, range(1, 101))), 99, 99.01),
    ],
    ids=["empty", "one", "median-even", "min-unsorted", "max", "p99-of-100"],
)
def test_percentile(values: list[float], q: float, expected: float | None) -> None:
    got = percentile(values, q)
    assert got == pytest.approx(expected) if expected is not None else got is None


def test_percentile_rejects_out_of_range() -> None:
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def _sample(sent: float, done: float, outcome: str, reason: str = "", batch: int = 4) -> Sample:
    server = {"decode": 1.0, "queue": 2.0, "compute": 10.0} if outcome == "ok" else None
    size = batch if outcome == "ok" else None
    return Sample(sent, done, Classified(outcome, reason, size, server))  # type: ignore[arg-type]


def test_summarize_counts_the_window_but_every_error() -> None:
    samples = [
        _sample(0.0, 0.5, "ok"),  # warm-up: not counted
        _sample(0.5, 0.9, "error", "timeout"),  # warm-up error: counted anyway
        _sample(1.0, 1.01, "ok", batch=2),
        _sample(1.0, 1.03, "ok", batch=6),
        _sample(1.5, 1.51, "rejected"),
        _sample(2.0, 2.2, "error", "status 504"),
        _sample(2.9, 3.5, "ok"),  # answered after the window: not counted
        _sample(2.9, 3.6, "error", "status 504"),  # drain error: counted
    ]
    stats = summarize(16, samples, window=(1.0, 3.0))
    assert (stats.ok, stats.rejected_503, stats.errors) == (2, 1, 3)
    assert stats.error_kinds == {"timeout": 1, "status 504": 2}
    assert stats.throughput_rps == pytest.approx(1.0)  # 2 ok in 2 s
    assert stats.p50_ms == pytest.approx(20.0)
    assert stats.mean_batch_size == stats.mean_batch_size_per_request == pytest.approx(4.0)
    assert stats.server_ms == {"decode": 1.0, "queue": 2.0, "compute": 10.0}
    assert stats.efficiency(2.0) == pytest.approx(0.5)
    assert stats.service_cpu_utilization is None


def test_summarize_service_cpu() -> None:
    samples = [_sample(1.0, 1.5, "ok"), _sample(1.0, 1.6, "rejected"), _sample(2, 3.5, "ok")]
    stats = summarize(4, samples, window=(1.0, 3.0), service_cpu_s=3.0, service_cores=2)
    assert stats.service_cpu_ms_per_answer == pytest.approx(1500.0)  # 3 s over 2 answers
    assert stats.service_cpu_utilization == pytest.approx(0.75)  # 3 s of 2 cores x 2 s


def test_summarize_prefers_the_metrics_batch_size_and_handles_no_answers() -> None:
    assert (
        summarize(1, [_sample(1, 2, "ok")], window=(0, 3), mean_batch_size=3.5).mean_batch_size
        == 3.5
    )
    empty = summarize(4, [], window=(0.0, 1.0))
    assert empty.ok == 0 and empty.p50_ms is None and empty.mean_batch_size is None
    with pytest.raises(ValueError):
        summarize(4, [], window=(1.0, 1.0))


def test_histogram_mean_from_two_scrapes() -> None:
    def scrape(total: float, count: float) -> str:
        return (
            "# HELP splitserve_batch_size Requests per forward pass\n"
            f'splitserve_batch_size_bucket{{le="16.0",model="m",split="s"}} {count}\n'
            f'splitserve_batch_size_count{{model="m",split="s"}} {count}\n'
            f'splitserve_batch_size_sum{{model="m",split="s"}} {total}\n'
            'splitserve_batch_size_count{model="m",split="other"} 100.0\n'
            'splitserve_batch_size_sum{model="m",split="other"} 1600.0\n'
        )

    labels = {"model": "m", "split": "s"}
    assert histogram_mean(scrape(10, 5), scrape(130, 15), "splitserve_batch_size", labels) == 12
    assert histogram_mean(scrape(10, 5), scrape(10, 5), "splitserve_batch_size", labels) is None


def _runs() -> list:
    samples = [_sample(1.0, 1.0 + i / 100, "ok", batch=8) for i in range(1, 9)]
    return [
        summarize(16, samples, window=(1.0, 2.0), mean_batch_size=8.0, service_cpu_s=0.9),
        summarize(64, [*samples, _sample(1.0, 1.5, "rejected")], window=(1.0, 2.0)),
    ]


def test_json_document_shape() -> None:
    doc = to_json(
        _runs(),
        10.0,
        "python -m bench service",
        raw_nearby=[8.0, 10.0],
        settings={"max_batch_size": 16},
    )
    assert doc["raw_compute_rps"] == 10.0
    assert doc["command"] == "python -m bench service"
    assert doc["settings"] == {"max_batch_size": 16}
    keys = {"concurrency", "throughput_rps", "p50_ms", "p99_ms", "mean_batch_size", "ok"}
    keys |= {"rejected_503", "errors", "efficiency"}
    for run in doc["runs"]:
        assert keys <= run.keys()
    first = doc["runs"][0]
    assert (first["concurrency"], first["ok"], first["throughput_rps"]) == (16, 8, 8.0)
    assert first["efficiency"] == 0.8
    assert (first["raw_compute_rps_nearby"], first["efficiency_nearby"]) == (8.0, 1.0)
    assert first["service_cpu_utilization"] == 0.9
    with pytest.raises(ValueError):
        to_json(_runs(), 10.0, "cmd", raw_nearby=[1.0])
    assert doc["bar"]["efficiency_met"] is True and doc["bar"]["no_errors_met"] is True
    json.dumps(doc, allow_nan=False)  # plain JSON: no NaN, no objects


def test_bar_reports_misses_and_missing_levels() -> None:
    runs = _runs()
    assert check_bar(runs, 20.0)["efficiency_met"] is False  # 8 / 20 = 40%
    failing = summarize(64, [_sample(0.0, 30.0, "error", "timeout")], window=(1.0, 2.0))
    assert check_bar([runs[0], failing], 10.0)["no_errors_met"] is False
    only_one = check_bar(runs[1:], 10.0)
    assert only_one["efficiency"] is None and only_one["efficiency_met"] is None


def test_table_rows_and_chart(tmp_path: Path) -> None:
    rows = table_rows(_runs(), 10.0)
    assert rows[0] == ["16", "8", "0", "0", "8.0", "80.0%", "8.00", "45.0", "79.3", "90%"]
    assert rows[1][2] == "1"  # one fast 503
    path = plot(_runs(), 10.0, tmp_path / "service.png", "test")
    assert path.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("available", "service", "client", "shared"),
    [({0, 1}, {0}, {1}, False), ({0, 1, 2, 3}, {0, 1, 2}, {3}, False), ({5}, {5}, {5}, True)],
    ids=["two-cores", "four-cores", "one-core"],
)
def test_cpu_layout(available: set[int], service: set[int], client: set[int], shared: bool) -> None:
    layout = cpu_layout(available)
    assert (layout.service, layout.client, layout.shared) == (service, client, shared)


Handler = Callable[[str, str, bytes], tuple[int, dict[str, str], bytes]]


@asynccontextmanager
async def _server(handler: Handler, *, chunked: bool = False) -> AsyncIterator[int]:
    """A loopback HTTP/1.1 server answering ``handler(method, path, body)``; yields its port."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
                method, path, _ = head[0].split(" ")
                fields = dict(line.lower().split(": ", 1) for line in head[1:] if line)
                body = await reader.readexactly(int(fields.get("content-length", "0")))
                status, headers, payload = handler(method, path, body)
                if status == 0:  # hang: the client must time out
                    await asyncio.sleep(10)
                if chunked:
                    headers = {**headers, "Transfer-Encoding": "chunked"}
                    half = len(payload) // 2
                    chunks = [payload[:half], payload[half:]]
                    payload = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks if c)
                    payload += b"0\r\n\r\n"
                else:
                    headers = {**headers, "Content-Length": str(len(payload))}
                lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
                writer.write(f"HTTP/1.1 {status} X\r\n{lines}\r\n".encode() + payload)
                await writer.drain()
                if headers.get("Connection") == "close":
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


def _fake_service(method: str, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
    if path == "/metrics":
        return 200, {}, b"# metrics"
    if body == b"busy":
        return 503, {"Retry-After": "1"}, b'{"error": "full"}'
    return 200, {}, _answer(7, batch_size=2)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_connection_keeps_alive_and_reads_both_framings(chunked: bool) -> None:
    async def main() -> list[tuple[int, dict[str, str], bytes]]:
        async with _server(_fake_service, chunked=chunked) as port:
            conn = Connection("127.0.0.1", port)
            got = [
                await conn.post("/infer", b"x" * 5000, content_type="a/b", timeout_s=5),
                await conn.post("/infer", b"busy", content_type="a/b", timeout_s=5),
                await conn.get("/metrics", timeout_s=5),
            ]
            await conn.close()
            return got

    ok, busy, metrics = asyncio.run(main())
    assert ok[0] == 200 and json.loads(ok[2])["batch_size"] == 2
    assert busy[0] == 503 and busy[1]["retry-after"] == "1"
    assert metrics == (200, metrics[1], b"# metrics")


def test_connection_reconnects_after_connection_close() -> None:
    def closing(method: str, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        return 200, {"Connection": "close"}, b"{}"

    async def main() -> list[int]:
        async with _server(closing) as port:
            conn = Connection("127.0.0.1", port)
            return [(await conn.post("/", b"", content_type="a/b", timeout_s=5))[0] for _ in "ab"]

    assert asyncio.run(main()) == [200, 200]


def test_connection_errors() -> None:
    def hang(method: str, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        return 0, {}, b""

    async def main() -> None:
        async with _server(hang) as port:
            with pytest.raises(TimeoutError):
                await Connection("127.0.0.1", port).post(
                    "/", b"", content_type="a/b", timeout_s=0.1
                )
        with pytest.raises(HttpError) as refused:
            await Connection("127.0.0.1", port).post("/", b"", content_type="a/b", timeout_s=5)
        assert refused.value.kind == "ConnectError"

    asyncio.run(main())


def test_run_level_against_a_fake_service() -> None:
    """Two clients for ~0.3 s over loopback: every request is answered, frames alternate, and
    a 503 makes the client back off instead of spinning."""

    async def level(frames: list[LoadFrame], concurrency: int, metrics: bool) -> LevelRun:
        async with _server(_fake_service) as port:
            return await run_level(
                f"http://127.0.0.1:{port}/infer",
                frames,
                concurrency=concurrency,
                warmup_s=0.1,
                duration_s=0.2,
                timeout_s=5,
                metrics_url=f"http://127.0.0.1:{port}/metrics" if metrics else None,
                cpu_probe=(lambda: 1.5) if metrics else None,
            )

    frames = [LoadFrame("a", b"a", expected=7), LoadFrame("b", b"b", expected=8)]
    run = asyncio.run(level(frames, 2, metrics=True))
    assert run.metrics == ("# metrics", "# metrics") and run.cpu_s == (1.5, 1.5)
    reasons = {(s.result.outcome, s.result.reason) for s in run.samples}
    assert reasons == {("ok", ""), ("error", "wrong class")}  # frame b expects class 8
    assert all(s.done_s >= s.sent_s for s in run.samples)

    rejected = asyncio.run(level([LoadFrame("busy", b"busy", expected=7)], 1, metrics=False))
    assert rejected.metrics is None and rejected.cpu_s is None
    assert [s.result.outcome for s in rejected.samples] == ["rejected"]  # then a 1 s back-off


@pytest.mark.parametrize(
    ("name", "value"),
    [("MALLOC_TRIM_THRESHOLD_", "131072"), ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1")],
    ids=["malloc-env", "glibc-tunables"],
)
def test_allocator_tuning_defers_to_the_operator(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    """The benchmark found glibc's defaults page-faulting every forward pass back in; the
    service (and the raw ceiling, through the same load_runtime) tune malloc unless told how."""
    from cloud_server.runtime import keep_freed_memory

    monkeypatch.setenv(name, value)
    assert keep_freed_memory() is False


@pytest.mark.parametrize(
    ("text", "expected"),
    [("torch", ["torch"]), ("torch,onnxruntime", ["torch", "onnxruntime"])],
    ids=["one", "two"],
)
def test_backend_flag_takes_one_or_several(text: str, expected: list[str]) -> None:
    from bench.service import _backends

    assert _backends(text) == expected


@pytest.mark.parametrize("text", ["tensorrt", "torch,torch", ""], ids=["unknown", "twice", "none"])
def test_backend_flag_refuses_bad_lists(text: str) -> None:
    import argparse

    from bench.service import _backends

    with pytest.raises(argparse.ArgumentTypeError):
        _backends(text)


def test_backends_compared_at_the_bar_concurrency() -> None:
    from bench.service import _compare

    def doc(raw: float, rps: float, eff: float) -> dict[str, object]:
        return {
            "raw_compute_rps": raw,
            "runs": [{"concurrency": 16, "throughput_rps": rps}],
            "bar": {"efficiency": eff},
            "load_average_1m_at_start": 0.1,
        }

    out = _compare({"torch": doc(90, 70, 0.78), "onnxruntime": doc(150, 126, 0.84)})
    assert out["speedup"] == 1.8 and out["speedup_met"] is True
    assert out["backends"]["onnxruntime"]["throughput_rps"] == 126
