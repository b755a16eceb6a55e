"""Hostile bodies for the other endpoints: broken and bomb images for ``/classify``, broken Open
Inference Protocol JSON for ``/infer``, and requests that break HTTP/1.1 itself.

    cases = list(image_cases({"coffee.jpg": jpeg}, model="efficientnet_lite0", n=60, seed=0))

Seeded like ``tests.support.mutate``, whose ``HttpCase`` they yield.
"""

from __future__ import annotations

import functools
import io
import json
import random
import struct
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

from hypothesis import strategies as st
from PIL import Image

from tests.support.mutate import MSGPACK, HttpCase, flip_bits, insert_bytes, short, truncate

__all__ = [
    "image_cases",
    "oip_cases",
    "oip_documents",
    "png_bomb_under_limit",
    "png_header_bomb",
    "raw_http_cases",
]


# --- images -------------------------------------------------------------------------------------


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    )


def png_header_bomb(
    width: int, height: int, *, idat: bytes | None = None, extra: bytes = b""
) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` 8-bit grey pixels, with a tiny body."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = idat if idat is not None else zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + extra
        + _png_chunk(b"IDAT", body)
        + _png_chunk(b"IEND", b"")
    )


@functools.cache
def png_bomb_under_limit(side: int = 7000) -> bytes:
    """A real ``side`` x ``side`` grey PNG (49 Mpx, just under the service's 50 Mpx limit) of
    zeros: ~50 KB that decodes to ~150 MB of RGB. The limit must make this cost bounded."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + pixels
    parts = [comp.compress(row) for _ in range(side)]
    return png_header_bomb(side, side, idat=b"".join(parts) + comp.flush())


def _jpeg_sof_dims(jpeg: bytes, width: int, height: int) -> bytes:
    """``jpeg`` with its SOF0 header rewritten to claim ``width`` x ``height``."""
    pos = jpeg.find(b"\xff\xc0")
    if pos < 0:
        return jpeg
    return jpeg[: pos + 5] + struct.pack(">HH", height, width) + jpeg[pos + 9 :]


def _exif_garbage(jpeg: bytes, rng: random.Random) -> bytes:
    order = rng.choice([b"II*\x00", b"MM\x00*"])
    tiff = order + rng.randbytes(rng.randint(4, 200))
    payload = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def image_cases(
    photos: Mapping[str, bytes], *, model: str, n: int, seed: int, big_bomb: bool = True
) -> Iterator[HttpCase]:
    """Broken images for ``/classify``: fixed bombs first, then ``n`` random mutations of
    ``photos`` (name -> encoded bytes, JPEG or PNG)."""
    path = f"/v2/models/{model}/classify"
    rng = random.Random(seed)
    tiny = io.BytesIO()
    Image.new("RGB", (1, 1)).save(tiny, format="PNG")
    ztxt = _png_chunk(b"zTXt", b"k\x00\x00" + zlib.compress(b"\x00" * (64 * 2**20), 9))
    fixed: list[tuple[str, bytes, str]] = [
        ("png header 100000x100000", png_header_bomb(100_000, 100_000), "image/png"),
        ("png header 65535x65535", png_header_bomb(65_535, 65_535), "image/png"),
        ("png header 2^31-1 square", png_header_bomb(2**31 - 1, 2**31 - 1), "image/png"),
        ("png header 1x60000000", png_header_bomb(1, 60_000_000), "image/png"),
        ("png header 0x0", png_header_bomb(0, 0), "image/png"),
        ("png with a 64 MiB zTXt chunk", png_header_bomb(1, 1, extra=ztxt), "image/png"),
        ("1x1 png", tiny.getvalue(), "image/png"),
        ("empty body", b"", "image/jpeg"),
    ]
    if big_bomb:
        fixed.append(
            ("png 7000x7000 zeros (49 Mpx, under the limit)", png_bomb_under_limit(), "image/png")
        )
    jpeg = next((b for b in photos.values() if b[:2] == b"\xff\xd8"), None)
    if jpeg is not None:
        fixed += [
            ("jpeg SOF claims 65535x65535", _jpeg_sof_dims(jpeg, 65_535, 65_535), "image/jpeg"),
            ("jpeg SOF claims 0x0", _jpeg_sof_dims(jpeg, 0, 0), "image/jpeg"),
        ]
    for description, body, content_type in fixed:
        yield HttpCase(description, path, body, {"Content-Type": content_type})
    names = sorted(photos)
    for _ in range(n):
        name = rng.choice(names)
        data = photos[name]
        content_type = "image/png" if data[:4] == b"\x89PNG" else "image/jpeg"
        kind = rng.randrange(8)
        if kind == 0:
            data, what = truncate(data, rng)
        elif kind == 1:
            data, what = flip_bits(data, rng)
        elif kind == 2:  # corrupt the headers, where the parsers make their decisions
            head = bytearray(data[:256])
            for _ in range(rng.randint(1, 4)):
                head[rng.randrange(len(head))] = rng.randrange(256)
            data, what = bytes(head) + data[256:], "corrupt header bytes"
        elif kind == 3:
            data, what = insert_bytes(data, rng)
        elif kind == 4:
            data, what = rng.randbytes(rng.randint(1, 4096)), "random bytes"
        elif kind == 5 and content_type == "image/jpeg":
            data, what = _exif_garbage(data, rng), "garbage EXIF"
        elif kind == 6:
            content_type = rng.choice(["image/webp", "image/gif", "text/plain", ""])
            what = f"content-type {content_type or 'none'}"
        else:
            data, what = data[: len(data) // 2] + rng.randbytes(64), "half, then noise"
        headers = {"Content-Type": content_type} if content_type else {}
        yield HttpCase(f"image {name}: {what}", path, data, headers)


# --- Open Inference Protocol JSON ---------------------------------------------------------------

_OIP_SHAPES: tuple[Any, ...] = (
    [1, 3, 224], [0, 3, 224, 224], [17, 3, 224, 224], [-1, 3, 224, 224], [1, 3, 224, 224, 1],
    [2**63, 3, 224, 224], [1.0, 3, 224, 224], ["1", 3, 224, 224], [1, 224, 224, 3], [], None,
    [1] * 9,
)  # fmt: skip


def _oip(data: Any, shape: Any = (1, 3, 224, 224), **extra: Any) -> dict[str, Any]:
    tensor = {
        "name": "input",
        "shape": list(shape) if isinstance(shape, tuple) else shape,
        "datatype": "FP32",
        "data": data,
    }
    return {"inputs": [tensor], **extra}


def _numbers(count: int, token: str) -> bytes:
    return ("[" + ",".join([token] * count) + "]").encode()


def oip_cases(*, model: str, n: int, seed: int) -> Iterator[HttpCase]:
    """Broken ``/infer`` bodies: fixed large and deep ones first, then ``n`` random ones of the
    kinds a JSON strategy does not write (bodies that are not JSON, huge and deep arrays,
    headers). Wrong documents, values and datatypes come from the strategy ``oip_documents``."""
    path = f"/v2/models/{model}/infer"
    json_type = {"Content-Type": "application/json"}
    numel = 3 * 224 * 224
    head = b'{"inputs":[{"name":"input","shape":[%d,3,224,224],"datatype":"FP32","data":'
    fixed = [
        ("extreme values 3e38", head % 1 + _numbers(numel, "3e38") + b"}]}"),
        ("extreme values -3e38", head % 1 + _numbers(numel, "-3e38") + b"}]}"),
        ("16 images of zeros (a large valid body)", head % 16 + _numbers(16 * numel, "0") + b"}]}"),
        ("17 images (over the batch limit)", head % 17 + _numbers(17 * numel, "0") + b"}]}"),
        ("one value short", head % 1 + _numbers(numel - 1, "0") + b"}]}"),
        ("NaN token", head % 1 + _numbers(numel, "NaN") + b"}]}"),
        ("Infinity token", head % 1 + b"[Infinity," + _numbers(numel - 1, "0")[1:] + b"}]}"),
        ("1e999", head % 1 + b"[1e999," + _numbers(numel - 1, "0")[1:] + b"}]}"),
        ("nested depth 100000", head % 1 + b"[" * 100_000 + b"]" * 100_000 + b"}]}"),
        ("nested depth 900", head % 1 + b"[" * 900 + b"0" + b"]" * 900 + b"}]}"),
        ("unclosed nesting", head % 1 + b"[" * 50_000),
        ("top-level array nested 100000", b"[" * 100_000 + b"]" * 100_000),
    ]
    for description, body in fixed:
        yield HttpCase(f"oip: {description}", path, body, dict(json_type))
    rng = random.Random(seed)
    kinds = (0, 2, 5, 6, 7, 8, 9)  # bad values, datatypes and documents: ``oip_documents``
    for _ in range(n):
        kind = rng.choice(kinds)
        headers = dict(json_type)
        if kind == 0:
            shape = rng.choice(_OIP_SHAPES)
            body, what = json.dumps(_oip([0.0] * 8, shape)).encode(), f"shape {short(shape)}"
        elif kind == 2:
            depth = rng.choice([10, 200, 999, 1001, 5000])
            body = head % 1 + b"[" * depth + b"1" + b"]" * depth + b"}]}"
            what = f"nested depth {depth}"
        elif kind == 5:
            body = rng.choice(
                [
                    b"",
                    b"{",
                    b"null",
                    b"1",
                    b'"s"',
                    b"\xff\xfe{}",
                    b"\xef\xbb\xbf{}",
                    b'{"inputs": [] , "inputs": 1}',
                    rng.randbytes(64),
                ]
            )
            what = f"body {short(body)}"
        elif kind == 6:
            headers = rng.choice(
                [
                    {"Content-Type": "text/plain"},
                    {},
                    {"Content-Type": "application/json; charset=latin-1"},
                    {"Content-Type": MSGPACK},
                ]
            )
            body, what = json.dumps(_oip([0.0])).encode(), f"headers {headers}"
        elif kind == 7:
            count = rng.choice([10, numel // 2, numel * 2])
            body, what = head % 1 + _numbers(count, "0.5") + b"}]}", f"{count} values"
        elif kind == 8:
            body = json.dumps(_oip([0.0] * 4, [1, 3, 224, 224])).encode()
            headers["X-Request-Timeout-Ms"] = rng.choice(["0", "-1", "nan", "1e-12", "x"])
            what = f"timeout {headers['X-Request-Timeout-Ms']}"
        else:
            body = json.dumps(_oip([rng.uniform(-1e38, 1e38) for _ in range(16)])).encode()
            what = "random huge floats"
        yield HttpCase(f"oip: {what}", path, body, headers)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=24,
)
_OIP_TENSOR = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["input", "", "x"]) | st.text(max_size=8),
        "shape": st.sampled_from([[1, 3, 224, 224], [2, 3, 224, 224], [1, 3, 2, 2]])
        | st.lists(st.integers(min_value=-2, max_value=2**40), max_size=6)
        | JSON_VALUES,
        "datatype": st.sampled_from(["FP32", "FP64", "INT8", "BYTES", "fp32", ""]) | JSON_VALUES,
        "data": st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False)
                         | JSON_VALUES, max_size=12)
        | JSON_VALUES,
    },
    optional={"parameters": JSON_VALUES},
)
#: Open Inference Protocol documents, right-shaped or not, down to arbitrary JSON: what the
#: ``/infer`` endpoint must answer with 200 or a JSON 4xx, never anything else.
oip_documents = (
    st.fixed_dictionaries(
        {"inputs": st.lists(_OIP_TENSOR, max_size=3) | JSON_VALUES},
        optional={"id": JSON_VALUES, "parameters": JSON_VALUES, "outputs": JSON_VALUES},
    )
    | JSON_VALUES
)


# --- malformed HTTP -----------------------------------------------------------------------------


def raw_http_cases(*, model: str, split: str) -> list[tuple[str, bytes]]:
    """Requests that break HTTP/1.1 itself, for a raw socket. uvicorn's parser answers most of
    them before the app runs, so only "no 5xx, no traceback, still serving" applies."""
    target = f"/v2/models/{model}/splits/{split}/infer"
    head = f"POST {target} HTTP/1.1\r\nHost: x\r\nContent-Type: {MSGPACK}\r\n"
    return [
        ("content-length not a number", f"{head}Content-Length: abc\r\n\r\n".encode()),
        ("negative content-length", f"{head}Content-Length: -1\r\n\r\n".encode()),
        ("two content-lengths", f"{head}Content-Length: 1\r\nContent-Length: 2\r\n\r\nab".encode()),
        (
            "content-length and chunked",
            f"{head}Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".encode(),
        ),
        (
            "bad chunk size",
            f"{head}Transfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n".encode(),
        ),
        ("garbage request line", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64)),
        ("HTTP/9.9", f"GET {target} HTTP/9.9\r\nHost: x\r\n\r\n".encode()),
        ("header without colon", b"GET /v2/health/ready HTTP/1.1\r\nHost x\r\n\r\n"),
        (
            "100 KB header",
            b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
        ),
        ("NUL in the path", b"GET /v2/health/\x00ready HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("non-ASCII path", "GET /v2/models/é/ready HTTP/1.1\r\nHost: x\r\n\r\n".encode()),
        ("headers never finish", b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n"),
        (
            "body shorter than declared, then close",
            f"{head}Content-Length: 100\r\n\r\nabc".encode(),
        ),
    ]
