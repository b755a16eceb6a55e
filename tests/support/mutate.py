"""Hostile frames for the fuzz run: real frames mutated at the byte and msgpack level, named
attacks (zstd bombs, extreme values, pickles) and bad URLs, headers and query parameters.
``tests.support.bodies`` does the same for images, OIP JSON and HTTP itself.

Every generator is seeded and yields ``HttpCase`` objects that say what they did, so a failing
case can be rebuilt from its seed and index.

    cases = list(frame_cases({"_blocks.9": frame}, model="efficientnet_lite0", n=300, seed=0))
    cases[0].description   # 'frame _blocks.9: scale=[nan] + flip 3 bits'
"""

from __future__ import annotations

import functools
import io
import json
import math
import pickle
import random
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
import zstandard

__all__ = [
    "HttpCase",
    "extreme_frame",
    "frame_cases",
    "flip_bits",
    "insert_bytes",
    "short",
    "truncate",
    "zstd_bomb",
]

MSGPACK = "application/msgpack"


@dataclass
class HttpCase:
    """One request to send, and what was done to make it."""

    description: str
    path: str
    body: bytes
    headers: dict[str, str]
    params: dict[str, str] = field(default_factory=dict)
    method: str = "POST"

    @property
    def client_deadline(self) -> bool:
        """Whether the request asks for its own deadline (a 504 is then the right answer)."""
        return any(k.lower() == "x-request-timeout-ms" for k in self.headers)


# --- zstd payloads ------------------------------------------------------------------------------


@functools.cache
def zstd_bomb(size: int = 2**30, *, declare_size: bool = True) -> bytes:
    """``size`` zero bytes as one small zstd frame (~32 KiB per GiB), streamed, never in memory."""
    out = io.BytesIO()
    chunk = bytes(min(size, 2**24))
    cctx = zstandard.ZstdCompressor(level=1)
    with cctx.stream_writer(out, size=size if declare_size else -1, closefd=False) as w:
        left = size
        while left > 0:
            w.write(chunk[: min(left, len(chunk))])
            left -= len(chunk)
    return out.getvalue()


def _lying_zstd(declared: int, actual: int) -> bytes | None:
    """A zstd frame whose header declares ``declared`` bytes but that inflates to ``actual``."""
    data = bytearray(zstandard.ZstdCompressor(level=1).compress(bytes(actual)))
    fhd = data[4]
    fcs_flag, single_segment, dict_flag = fhd >> 6, (fhd >> 5) & 1, fhd & 3
    offset = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[dict_flag]
    width = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    value = declared - 256 if width == 2 else declared
    if width == 0 or not 0 <= value < 256**width:
        return None
    data[offset : offset + width] = value.to_bytes(width, "little")
    return bytes(data)


# --- frames -------------------------------------------------------------------------------------

Doc = Any
_HUGE_SHAPES = ([1, 2**40], [2**31] * 4, [2**62, 2], [2**64 - 1], [1, 2**28 + 1])
_BAD_SCALES: tuple[Any, ...] = (
    [math.nan], [math.inf], [-math.inf], [0.0], [-0.0], [-1.0], [1e-45], [1e39], [], [0.5] * 9,
    ["1"], None, [True], 0.5,
)  # fmt: skip


def _f32(x: float) -> float:
    """``x`` rounded to float32: frames carry float32 scales, and refuse any other value."""
    value: float = struct.unpack("<f", struct.pack("<f", x))[0]
    return value


def _tensor(doc: Doc, rng: random.Random) -> dict[str, Any] | None:
    if isinstance(doc, dict) and isinstance(doc.get("t"), list) and doc["t"]:
        t = rng.choice(doc["t"])
        return t if isinstance(t, dict) else None
    return None


def _set_tensor(key: str, values: Callable[[random.Random, dict[str, Any]], Any]) -> Callable:
    def mutate(doc: Doc, rng: random.Random) -> tuple[Doc, str]:
        t = _tensor(doc, rng)
        if t is None:
            return doc, f"{key}: no tensor"
        t[key] = values(rng, t)
        return doc, f"{key}={short(t[key])}"

    return mutate


def _set_top(key: str, choices: tuple[Any, ...]) -> Callable:
    def mutate(doc: Doc, rng: random.Random) -> tuple[Doc, str]:
        if not isinstance(doc, dict):
            return doc, f"{key}: not a map"
        doc[key] = rng.choice(choices)
        return doc, f"{key}={short(doc[key])}"

    return mutate


def _shape(rng: random.Random, t: dict[str, Any]) -> Any:
    shape = list(t["shape"]) if isinstance(t.get("shape"), list) else [1, 8]
    kind = rng.randrange(11)
    if kind == 0:
        return rng.choice(_HUGE_SHAPES)
    if kind == 1:
        shape[rng.randrange(len(shape))] = rng.choice([-1, -(2**31), 0])
    elif kind == 2:
        return shape[:-1] or [1]
    elif kind == 3:
        return [*shape, 1]
    elif kind == 4:
        shape[0] = rng.choice([0, 17, 1000, 2**20])
    elif kind == 5:
        return [float(d) for d in shape]
    elif kind == 6:
        return [shape, 1]
    elif kind == 7:
        return rng.choice(["1,3,224,224", [], [1] * 9, None, {"n": 1}])
    elif kind == 8 and len(shape) > 2:  # same element count, wrong layout: passes the codec
        shape[1], shape[-1] = shape[-1], shape[1]
    elif kind == 9:
        return [True, *shape[1:]]
    else:
        shape[0] = 2
    return shape


def _numel(t: dict[str, Any], default: int = 1280) -> int:
    """The tensor's element count, if its shape is sane enough to build data for."""
    shape = t.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d > 0 for d in shape):
        return default
    n = math.prod(shape)
    return n if n <= 2**24 else default


def _data(rng: random.Random, t: dict[str, Any]) -> Any:
    data = t.get("data") if isinstance(t.get("data"), bytes) else b""
    raw = _numel(t)
    kind = rng.randrange(12)
    if kind == 0:
        return b""
    if kind == 1:
        return data[: rng.randrange(max(1, len(data)))]
    if kind == 2:
        return data + rng.randbytes(rng.randrange(1, 64))
    if kind == 3:
        return rng.randbytes(len(data))
    if kind == 4:
        return rng.choice(["\x00" * 16, [0] * 16, 0, None])
    if kind == 5:
        return zstd_bomb(declare_size=True)  # 1 GiB declared: refused from the header
    if kind == 6:
        return zstd_bomb(declare_size=False)  # no declared size: refused from the header
    if kind == 7:
        lie = _lying_zstd(raw, raw * 64 if raw * 64 < 2**32 else raw + 4096)
        return lie if lie is not None else zstd_bomb(declare_size=False)
    if kind == 8:
        return zstandard.ZstdCompressor(write_content_size=False).compress(bytes(raw))
    if kind == 9:
        return b"\x50\x2a\x4d\x18\x04\x00\x00\x00abcd" + data  # a skippable frame first
    if kind == 10:
        return zstandard.ZstdCompressor().compress(bytes(raw + rng.choice([-1, 1, 4096])))
    return data + data  # two frames back to back


def _extreme_values(doc: Doc, rng: random.Random) -> tuple[Doc, str]:
    """Legal fields, absurd values: a float32-max scale on every byte drives the tail to inf."""
    t = _tensor(doc, rng)
    if t is None:
        return doc, "extreme values: no tensor"
    n = _numel(t)
    scale = _f32(rng.choice([3.0e38, 1.0e30, 1.0e20]))
    negative = rng.random() < 0.5
    t.update(
        q="affine_u8",
        scale=[scale],
        zp=[255 if negative else 0],
        axis=None,
        codec="none",
        data=(b"\x00" if negative else b"\xff") * n,
    )
    return doc, f"extreme values scale={scale:g}{' negative' if negative else ''}"


def _extra_key(doc: Doc, rng: random.Random) -> tuple[Doc, str]:
    target = _tensor(doc, rng) if rng.random() < 0.5 else doc
    if not isinstance(target, dict):
        return doc, "extra key: not a map"
    key = rng.choice(["pickle", "__reduce__", "extra", "V", "code"])
    target[key] = rng.choice([b"cos\nsystem\n(S'touch /tmp/pwned'\ntR.", 1, None, "x"])
    return doc, f"extra key {key!r}"


def _missing_key(doc: Doc, rng: random.Random) -> tuple[Doc, str]:
    target = _tensor(doc, rng) if rng.random() < 0.5 else doc
    if not isinstance(target, dict) or not target:
        return doc, "missing key: not a map"
    key = rng.choice(sorted(target))
    del target[key]
    return doc, f"missing key {key!r}"


def _nested(rng: random.Random, depth: int) -> Any:
    value: Any = rng.choice([1, "x", None, b"\x00"])
    for _ in range(depth):
        value = [value] if rng.random() < 0.5 else {"k": value}
    return value


def _nested_garbage(doc: Doc, rng: random.Random) -> tuple[Doc, str]:
    target = _tensor(doc, rng) if rng.random() < 0.5 else doc
    if not isinstance(target, dict) or not target:
        return doc, "nested garbage: not a map"
    key = rng.choice(sorted(target))
    kind = rng.randrange(3)
    if kind == 0:
        depth = rng.choice([10, 100, 400])  # the packer's own limit is 511
        target[key] = _nested(rng, depth)
        return doc, f"{key}=nested depth {depth}"
    if kind == 1:
        target[key] = list(range(rng.choice([9000, 20000])))  # over the array length limit
        return doc, f"{key}=long array"
    target[key] = {str(i): i for i in range(40)}  # over the map length limit
    return doc, f"{key}=map of 40"


def _tensors(doc: Doc, rng: random.Random) -> tuple[Doc, str]:
    if not isinstance(doc, dict) or not isinstance(doc.get("t"), list) or not doc["t"]:
        return doc, "tensors: none"
    t0 = doc["t"][0]
    doc["t"] = rng.choice([[], [t0] * 17, [t0, t0], t0, "t", [1], [[t0]]])
    return doc, f"t={short(doc['t'])}"


def _whole_doc(doc: Doc, rng: random.Random) -> tuple[Doc, str]:
    other = rng.choice(
        [
            [doc],
            1,
            "frame",
            None,
            b"frame",
            msgpack.ExtType(1, b"x" * 8),
            {"v": 1},
            {1: doc},
            msgpack.Timestamp(0),
        ]
    )
    return other, f"whole frame replaced by {type(other).__name__}"


DOC_MUTATIONS: dict[str, Callable[[Doc, random.Random], tuple[Doc, str]]] = {
    "version": _set_top("v", (0, 2, -1, 2**63 - 1, 2**64 - 1, "1", None, 1.5, True, [1])),
    "model": _set_top("model", ("resnet18", "", "../../etc/passwd", "m" * 200, "ré", 1)),
    "fingerprint": _set_top("fp", ("ab" * 16, "0" * 32, "XYZ", "", "a" * 65, None, 7)),
    "split": _set_top("split", ("_blocks.0", "flatten", "", "x" * 300, "\x00", "ř", 3)),
    "id": _set_top("id", ("r" * 200, "", "\x00", "ré", None, 5)),
    "dtype": _set_tensor(
        "dtype",
        lambda r, t: r.choice(
            ["float64", "int8", "uint8", "", "FLOAT32", None, 7, "float16", "bfloat16", "object"]
        ),
    ),
    "quant": _set_tensor("q", lambda r, t: r.choice(["int8", "none", None, 1, "AFFINE_U8"])),
    "codec": _set_tensor(
        "codec", lambda r, t: r.choice(["lz4", "gzip", "none", "pickle", None, "zstd", "ZSTD"])
    ),
    "shape": _set_tensor("shape", _shape),
    "scale": _set_tensor("scale", lambda r, t: r.choice(_BAD_SCALES)),
    "zero_point": _set_tensor(
        "zp", lambda r, t: r.choice([[256], [-1], [], [0.0], [True], [2**64 - 1], None, [0] * 9])
    ),
    "axis": _set_tensor("axis", lambda r, t: r.choice([0, 1, 3, 99, -1, "1", 0.5, None, True])),
    "data": _set_tensor("data", _data),
    "extreme_values": _extreme_values,
    "extra_key": _extra_key,
    "missing_key": _missing_key,
    "nested_garbage": _nested_garbage,
    "tensors": _tensors,
    "whole_doc": _whole_doc,
}


def flip_bits(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    if not data:
        return data, "flip: empty"
    out = bytearray(data)
    n = rng.randint(1, 8)
    for _ in range(n):
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out), f"flip {n} bits"


def truncate(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    if not data:
        return data, "truncate: empty"
    end = rng.randrange(len(data))
    return data[:end], f"truncate to {end}"


def insert_bytes(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    pos, extra = rng.randrange(len(data) + 1), rng.randbytes(rng.randint(1, 16))
    return data[:pos] + extra + data[pos:], f"insert {len(extra)} bytes at {pos}"


def _delete(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    if not data:
        return data, "delete: empty"
    pos, n = rng.randrange(len(data)), rng.randint(1, 16)
    return data[:pos] + data[pos + n :], f"delete {n} bytes at {pos}"


def _overwrite(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    if not data:
        return data, "overwrite: empty"
    pos, n = rng.randrange(len(data)), rng.randint(1, 8)
    fill = rng.choice([b"\xff", b"\x00", b"\xc1", b"\xdd"]) * n
    return data[:pos] + fill + data[pos + n :], f"overwrite {n} bytes at {pos}"


def _append(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    extra = rng.choice([data, b"\x00", rng.randbytes(32), b"\xc0" * 100])
    return data + extra, f"append {len(extra)} bytes"


BYTE_MUTATIONS: dict[str, Callable[[bytes, random.Random], tuple[bytes, str]]] = {
    "flip_bits": flip_bits,
    "truncate": truncate,
    "insert": insert_bytes,
    "delete": _delete,
    "overwrite": _overwrite,
    "append": _append,
}

_REQUEST_MUTATIONS: tuple[tuple[str, dict[str, str], dict[str, str]], ...] = (
    ("content-type text/plain", {"Content-Type": "text/plain"}, {}),
    ("content-type json", {"Content-Type": "application/json"}, {}),
    ("content-type with charset", {"Content-Type": f"{MSGPACK}; charset=utf-8"}, {}),
    ("no content-type", {}, {}),
    ("top_k=0", {"Content-Type": MSGPACK}, {"top_k": "0"}),
    ("top_k=1001", {"Content-Type": MSGPACK}, {"top_k": "1001"}),
    ("top_k=abc", {"Content-Type": MSGPACK}, {"top_k": "abc"}),
    ("top_k=1000", {"Content-Type": MSGPACK}, {"top_k": "1000"}),
    ("timeout=0", {"Content-Type": MSGPACK, "X-Request-Timeout-Ms": "0"}, {}),
    ("timeout=-5", {"Content-Type": MSGPACK, "X-Request-Timeout-Ms": "-5"}, {}),
    ("timeout=nan", {"Content-Type": MSGPACK, "X-Request-Timeout-Ms": "nan"}, {}),
    ("timeout=inf", {"Content-Type": MSGPACK, "X-Request-Timeout-Ms": "inf"}, {}),
    ("timeout=abc", {"Content-Type": MSGPACK, "X-Request-Timeout-Ms": "abc"}, {}),
    ("timeout=1e-9", {"Content-Type": MSGPACK, "X-Request-Timeout-Ms": "1e-9"}, {}),
    ("timeout=1e300", {"Content-Type": MSGPACK, "X-Request-Timeout-Ms": "1e300"}, {}),
    ("request id header", {"Content-Type": MSGPACK, "X-Request-Id": "r" * 500}, {}),
)
_URL_SPLITS = ("-1", "99", "²", "٣", " 3", "3 ", "+3", "1_0", "0x3", "%00", "..", "_blocks.9/..")


def extreme_frame(frame: bytes, *, negative: bool = False) -> bytes:
    """``frame`` with every byte of its first tensor at the end of the range and a float32-max
    scale: legal fields that drive a tail to inf and NaN (the server must say 400, and only to
    this request, whoever shares its batch)."""
    doc = msgpack.unpackb(frame, raw=False)
    t = doc["t"][0]
    n = math.prod(t["shape"])
    t.update(
        q="affine_u8",
        scale=[_f32(3.0e38)],
        zp=[255 if negative else 0],
        axis=None,
        codec="none",
        data=(b"\x00" if negative else b"\xff") * n,
    )
    return _pack(doc)


def _fixed_frame_cases(split: str, frame: bytes, other: str, model: str) -> Iterator[HttpCase]:
    """The named attacks, on every split point, whatever the random draw."""
    path = f"/v2/models/{model}/splits/{split}/infer"
    headers = {"Content-Type": MSGPACK}
    t0 = msgpack.unpackb(frame, raw=False)["t"][0]
    raw = math.prod(t0["shape"])

    def tensor(**fields: Any) -> bytes:
        doc = msgpack.unpackb(frame, raw=False)
        doc["t"][0].update(fields)
        return _pack(doc)

    def top(**fields: Any) -> bytes:
        doc = msgpack.unpackb(frame, raw=False)
        doc.update(fields)
        return _pack(doc)

    lie = _lying_zstd(raw, raw * 64 if raw * 64 < 2**32 else raw + 4096)
    cases: list[tuple[str, bytes]] = [
        ("extreme values 3e38", extreme_frame(frame)),
        ("extreme values -3e38", extreme_frame(frame, negative=True)),
        ("zstd bomb, 1 GiB declared", tensor(codec="zstd", data=zstd_bomb(declare_size=True))),
        ("zstd bomb, size undeclared", tensor(codec="zstd", data=zstd_bomb(declare_size=False))),
        ("zstd frame lying about its size", tensor(codec="zstd", data=lie or b"\x28\xb5")),
        ("version 2", top(v=2)),
        ("shape [1, 2^40]", tensor(shape=[1, 2**40])),
        ("negative shape", tensor(shape=[1, -t0["shape"][1], *t0["shape"][2:]])),
        ("scale NaN", tensor(scale=[math.nan] * len(t0["scale"]))),
        ("scale inf", tensor(scale=[math.inf] * len(t0["scale"]))),
        ("scale 0", tensor(scale=[0.0] * len(t0["scale"]))),
        ("scale negative", tensor(scale=[-1.0] * len(t0["scale"]))),
        ("dtype float64", tensor(dtype="float64")),
        ("codec lz4", tensor(codec="lz4")),
        ("extra key", top(extra=1)),
        (
            "missing key",
            _pack({k: v for k, v in msgpack.unpackb(frame, raw=False).items() if k != "fp"}),
        ),
        ("wrong fingerprint", top(fp="ab" * 16)),
        ("another model's frame", top(model="resnet18")),
        (f"frame of {other} (another split point)", top(split=other)),
        ("a pickle of the frame", pickle.dumps(msgpack.unpackb(frame, raw=False))),
        ("JSON body", json.dumps({"v": 1, "model": model}).encode()),
        ("empty body", b""),
    ]
    packer = msgpack.Packer(use_bin_type=True)
    doc = msgpack.unpackb(frame, raw=False)
    deep = packer.pack_map_header(len(doc)) + b"".join(
        packer.pack(k) + (b"\x91" * 100_000 + b"\xc0" if k == "id" else packer.pack(v))
        for k, v in doc.items()
    )
    cases.append(("id nested 100000 deep", deep))
    for description, body in cases:
        yield HttpCase(f"frame {split}: {description}", path, body, dict(headers))
    for bad in ("²", "-1", "99"):
        yield HttpCase(
            f"frame {split}: sent to split {bad!r}",
            f"/v2/models/{model}/splits/{bad}/infer",
            frame,
            dict(headers),
        )


def frame_cases(
    frames: Mapping[str, bytes], *, model: str, n: int, seed: int
) -> Iterator[HttpCase]:
    """The named attacks on every frame, then ``n`` random mutations of the real ``frames``
    (split point name -> frame bytes): one to three msgpack-level and/or byte-level mutations
    each, or a bad URL, header or query parameter."""
    rng = random.Random(seed)
    splits = sorted(frames)
    for i, split in enumerate(splits):
        yield from _fixed_frame_cases(split, frames[split], splits[(i + 1) % len(splits)], model)
    for _ in range(n):
        split = rng.choice(splits)
        body = frames[split]
        path_split = split
        headers = {"Content-Type": MSGPACK}
        params: dict[str, str] = {}
        steps: list[str] = []
        roll = rng.random()
        if roll < 0.08:
            path_split = rng.choice([*_URL_SPLITS, *(s for s in splits if s != split)])
            steps.append(f"sent to split {path_split!r}")
        elif roll < 0.16:
            label, headers, params = rng.choice(_REQUEST_MUTATIONS)
            headers, params = dict(headers), dict(params)
            steps.append(label)
        if roll >= 0.16 or rng.random() < 0.5:
            n_doc = rng.choice([0, 1, 1, 2, 3])
            n_bytes = rng.choice([0, 0, 1, 2]) if n_doc else rng.choice([1, 2])
            doc = msgpack.unpackb(body, raw=False)
            for _ in range(n_doc):
                doc, what = DOC_MUTATIONS[rng.choice(sorted(DOC_MUTATIONS))](doc, rng)
                steps.append(what)
            body = _pack(doc) if n_doc else body
            for _ in range(n_bytes):
                body, what = BYTE_MUTATIONS[rng.choice(sorted(BYTE_MUTATIONS))](body, rng)
                steps.append(what)
        if rng.random() < 0.02:
            body, steps = pickle.dumps(msgpack.unpackb(frames[split])), ["a pickle of the frame"]
        yield HttpCase(
            f"frame {split}: {' + '.join(steps) or 'unchanged'}",
            f"/v2/models/{model}/splits/{path_split}/infer",
            body,
            headers,
            params,
        )


def _pack(doc: Doc) -> bytes:
    if isinstance(doc, bytes):
        return doc
    # Doubles, not single floats: a mutated scale must reach the server exactly as chosen.
    packed: bytes = msgpack.packb(doc, use_bin_type=True, use_single_float=False)
    return packed


def short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
