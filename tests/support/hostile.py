"""Hostile clients for tests/reliability/test_hostile.py: connection floods, amplification
bodies, image makers and an RSS reader. Each builds or measures; the tests decide."""

from __future__ import annotations

import io
import os
import socket
import struct
import threading
import time
import zlib

import httpx
from PIL import Image

__all__ = [
    "Flood",
    "deep_json_body",
    "empty_arrays_frame",
    "empty_maps_frame",
    "eps_bytes",
    "image_bytes",
    "open_fds",
    "png_16bit_rgba",
    "rss_mb",
    "timed_get_ms",
    "wait_rss_settles",
]


def rss_mb(pid: int) -> float:
    """Resident set size of process ``pid`` in MB, from /proc (Linux)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def open_fds(pid: int) -> int:
    """Open descriptors of process ``pid``."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_rss_settles(pid: int, target_mb: float, timeout_s: float) -> float:
    """Poll RSS until it is at most ``target_mb`` or ``timeout_s`` passes; the last reading."""
    deadline = time.monotonic() + timeout_s
    rss = rss_mb(pid)
    while rss > target_mb and time.monotonic() < deadline:
        time.sleep(0.5)
        rss = rss_mb(pid)
    return rss


def timed_get_ms(url: str, timeout_s: float = 10.0) -> tuple[int, float]:
    """``(status, ms)`` of one GET on a fresh connection; status 0 when it failed."""
    started = time.perf_counter()
    try:
        status = httpx.get(url, timeout=timeout_s).status_code
    except httpx.HTTPError:
        status = 0
    return status, (time.perf_counter() - started) * 1e3


class Flood:
    """Hold ``count`` TCP connections to ``host:port`` that send nothing (or trickle a request
    head one byte per 0.2 s with ``trickle=True``); reopen any the server closes, as an attacker
    would. ``with Flood(host, port, 1100) as flood: ... flood.reconnects ...``"""

    def __init__(self, host: str, port: int, count: int, *, trickle: bool = False,
                 reconnect: bool = True) -> None:
        self.host, self.port, self.count = host, port, count
        self.trickle, self.reconnect = trickle, reconnect
        self.reconnects = 0
        self.refused = 0
        self._socks: list[socket.socket | None] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _open(self) -> socket.socket | None:
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect_ex((self.host, self.port))
        except OSError:
            s.close()
            self.refused += 1
            return None
        return s

    def _run(self) -> None:
        head = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 4000
        sent = [0] * self.count
        while not self._stop.wait(0.2):
            for i, s in enumerate(self._socks):
                if s is None:
                    continue
                try:
                    if s.recv(1024, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b"":
                        raise ConnectionResetError
                except BlockingIOError:
                    pass
                except OSError:
                    s.close()
                    self._socks[i] = self._open() if self.reconnect else None
                    sent[i] = 0
                    self.reconnects += 1
                    continue
                if self.trickle and sent[i] < len(head):
                    try:
                        s.send(head[sent[i]:sent[i] + 1])
                        sent[i] += 1
                    except OSError:
                        pass

    def __enter__(self) -> Flood:
        self._socks = [self._open() for _ in range(self.count)]
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for s in self._socks:
            if s is not None:
                s.close()


# --- amplification bodies ----------------------------------------------------------------------


def _array_header(n: int) -> bytes:
    return b"\xdd" + struct.pack(">I", n)  # array 32


def empty_maps_frame(target_bytes: int = 16 * 2**20, inner: int = 2044) -> bytes:
    """The issue's body: a top-level array of arrays of ``inner`` empty maps (0x80 each), about
    ``target_bytes`` long: one byte per decoded object, ~16.7 M objects in 16 MiB."""
    row = _array_header(inner) + b"\x80" * inner
    rows = max(1, target_bytes // len(row))
    return _array_header(rows) + row * rows


def empty_arrays_frame(target_bytes: int = 16 * 2**20, inner: int = 2044) -> bytes:
    """As ``empty_maps_frame`` with empty arrays (0x90): the shape that blocked the event loop."""
    row = _array_header(inner) + b"\x90" * inner
    rows = max(1, target_bytes // len(row))
    return _array_header(rows) + row * rows


def deep_json_body(target_bytes: int = 16 * 2**20) -> bytes:
    """An OIP request whose data is ``target_bytes`` of ``[],``: millions of empty lists."""
    prefix = b'{"inputs": [{"name": "x", "shape": [1, 3, 224, 224], "datatype": "FP32", "data": ['
    n = max(1, (target_bytes - len(prefix)) // 3)
    return prefix + b"[]," * (n - 1) + b"[]]}]}"


# --- images ------------------------------------------------------------------------------------


def image_bytes(fmt: str, size: tuple[int, int] = (64, 64), mode: str = "RGB",
                frames: int = 1, **save: object) -> bytes:
    """An image of ``size`` in format ``fmt`` (Pillow's name: PNG, TIFF, GIF...), mode ``RGB``
    or ``L``, with ``frames`` frames."""
    buf = io.BytesIO()
    img = Image.new(mode, size, 128 if mode == "L" else (200, 100, 50))
    if frames > 1:
        extra = [Image.new(mode, size, i % 250) for i in range(1, frames)]
        img.save(buf, format=fmt, save_all=True, append_images=extra, **save)
    else:
        img.save(buf, format=fmt, **save)
    return buf.getvalue()


def png_16bit_rgba(width: int, height: int) -> bytes:
    """A flat 16-bit RGBA PNG: a few hundred KB on the wire, ``width * height * 8`` bytes as the
    file describes it. Written by hand: Pillow cannot save 16-bit RGBA."""
    row = b"\x00" + b"\x12\x34" * 4 * width
    comp = zlib.compressobj(9)
    data = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 16, 6, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data)
            + chunk(b"IEND", b""))


def eps_bytes() -> bytes:
    """A minimal EPS file: the header Pillow's EPS plugin recognises."""
    return (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
            b"newpath 0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n")
