"""The pure part of ``bench board``: commands, the parsing of ``infer --json``, the report.

No I/O here: ``bench.board_root`` runs the commands this module builds and ``bench.board`` writes
what it returns. Everything is testable without an arm64 root.

    >>> from bench.board_report import agreement, BoardRun
    >>> agreement([BoardRun("chelsea", "device", "device", 285, "Egyptian cat", 285,
    ...                     "Egyptian cat", 0.61, 0.61, 900.0)])
    (1, 1)
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath
from typing import Any

from bench import report
from shared.errors import ConfigError

__all__ = [
    "EMULATION_NOTE",
    "QEMU_MIN_MAJOR",
    "SETUP_HINT",
    "TABLE_HEADERS",
    "BoardRun",
    "HostFacts",
    "InferAnswer",
    "agreement",
    "board_markdown",
    "build_report",
    "chroot_argv",
    "debootstrap_argv",
    "host_problems",
    "infer_argv",
    "join_runs",
    "parse_infer_json",
    "photo_filename",
    "pip_env",
    "qemu_major",
    "shell_join",
    "table_rows",
]

# qemu-user 7.2 (bookworm's own) dies inside ONNX Runtime's aarch64 kernels; 10.x from
# bookworm-backports runs them.
QEMU_MIN_MAJOR = 10
EMULATION_NOTE = ("Times were taken under qemu-user emulation on an x86 host: they are not a "
                  "board's times, and this run claims none. They are recorded as emulated_ms "
                  "only to show the runs happened.")
TABLE_HEADERS = ("photo", "split", "ran", "board top-1", "x86 torch top-1", "agree")
SETUP_HINT = "bash bench/board_setup.sh (or python -m bench board --setup)"
# Packages the board's Debian root needs besides the minimal base: a Python with venv, and the
# CA bundle for pip's TLS.
ROOT_PACKAGES = ("python3", "python3-venv", "ca-certificates")


@dataclass(frozen=True)
class InferAnswer:
    """One line of ``python -m device_client infer --json``: the fields the board checks."""

    image: str
    split: str
    ran: str
    top1_index: int
    top1_label: str
    top1_prob: float
    fallback: str | None
    total_ms: float


def parse_infer_json(text: str) -> list[InferAnswer]:
    """Each non-blank line of ``infer --json`` output as an ``InferAnswer``.

        >>> line = ('{"image": "/p/a.png", "split": "device", "ran": "device", "top5": '
        ...         '[{"index": 1, "label": "goldfish", "prob": 0.9}], "fallback": null, '
        ...         '"timings_ms": {"total": 3.5}}')
        >>> parse_infer_json(line)[0].top1_label
        'goldfish'
    """
    answers = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            top1 = obj["top5"][0]
            answers.append(InferAnswer(
                image=str(obj["image"]), split=str(obj["split"]), ran=str(obj["ran"]),
                top1_index=int(top1["index"]), top1_label=str(top1["label"]),
                top1_prob=float(top1["prob"]), fallback=obj.get("fallback"),
                total_ms=float(obj.get("timings_ms", {}).get("total", 0.0))))
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise ConfigError(f"infer --json line {n} is not an answer: {line[:120]!r} "
                              f"({type(exc).__name__}: {exc})") from exc
    return answers


@dataclass(frozen=True)
class BoardRun:
    """One photo at one split on the board, beside the x86 torch device's answer for it."""

    photo: str
    split: str
    ran: str
    top1_index: int
    top1_label: str
    ref_index: int
    ref_label: str
    top1_prob: float  # the board's softmax probability of its top-1 ...
    ref_prob: float  # ... and the reference's of its own: how close the numbers are, not only
    emulated_ms: float  # under qemu: not a board's time

    @property
    def agree(self) -> bool:
        return self.top1_index == self.ref_index

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "agree": self.agree}


def photo_filename(name: str) -> str:
    """A file name for a photo's name: ``chelsea/crop003`` -> ``chelsea-crop003.png``."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", name) + ".png"


def join_runs(photos: Sequence[str], split: str, board: Sequence[InferAnswer],
              reference: Sequence[InferAnswer]) -> list[BoardRun]:
    """Pair the board's answers at ``split`` with the reference's, photo by photo.

    Answers are matched by file name (the board sees the photos at another path than the host),
    and a photo either side did not answer is an error, as is an answer that ran elsewhere than
    asked (``infer --no-fallback`` should make that impossible).
    """
    by_file = {photo_filename(p): p for p in photos}

    def index(answers: Sequence[InferAnswer], side: str) -> dict[str, InferAnswer]:
        out = {}
        for a in answers:
            name = by_file.get(PurePosixPath(a.image).name)
            if name is None:
                raise ConfigError(f"{side} answered for an unknown photo {a.image}")
            out[name] = a
        missing = [p for p in photos if p not in out]
        if missing:
            raise ConfigError(f"{side} gave no answer for {', '.join(missing)}")
        return out

    ours, refs = index(board, f"the board at {split}"), index(reference, "the x86 reference")
    expected_ran = "device" if split == "device" else "split"
    runs = []
    for photo in photos:
        a, r = ours[photo], refs[photo]
        if a.ran != expected_ran or a.fallback:
            raise ConfigError(f"{photo} at {split} ran on {a.ran!r}, not {expected_ran!r}"
                              + (f" (fallback: {a.fallback})" if a.fallback else ""))
        runs.append(BoardRun(photo=photo, split=split, ran=a.ran, top1_index=a.top1_index,
                             top1_label=a.top1_label, ref_index=r.top1_index,
                             ref_label=r.top1_label, top1_prob=round(a.top1_prob, 4),
                             ref_prob=round(r.top1_prob, 4), emulated_ms=round(a.total_ms, 1)))
    return runs


def agreement(runs: Iterable[BoardRun]) -> tuple[int, int]:
    """``(agree, total)``."""
    runs = list(runs)
    return sum(r.agree for r in runs), len(runs)


def build_report(*, machine: str, runs: Sequence[BoardRun],
                 meta: Mapping[str, Any]) -> dict[str, Any]:
    """``board.json``: ``machine``, ``agree``, ``total`` and ``runs`` first, then ``meta``."""
    agree, total = agreement(runs)
    gaps = [abs(r.top1_prob - r.ref_prob) for r in runs if r.agree]
    return {"machine": machine, "agree": agree, "total": total,
            "runs": [r.to_json() for r in runs],
            "max_top1_prob_gap": round(max(gaps), 4) if gaps else None,
            "times": EMULATION_NOTE, **meta}


def board_markdown(result: Mapping[str, Any]) -> str:
    """``board.md``: the setting, the verdict and one row per run (no times: they are emulated)."""
    v = result.get("versions", {})
    lines = [
        "# Board: the torch-free device on an emulated arm64 Debian root", "",
        f"`{result.get('command', 'python -m bench board')}`", "",
        f"Machine inside the root: **{result['machine']}** (`uname -m`: "
        f"{result.get('uname_m', '?')}); Debian {v.get('debian', '?')}; "
        f"{v.get('qemu', 'qemu ?')}, CPU {result.get('qemu_cpu', '?')}; "
        f"Python {v.get('python', '?')}, onnxruntime {v.get('onnxruntime', '?')}, "
        f"numpy {v.get('numpy', '?')}; torch importable on the board: "
        f"{'yes' if result.get('torch_on_board') else 'no'}.", "",
        f"Service: x86 `python -m cloud_server` on loopback ({result.get('service_backend', '?')} "
        f"backend). Reference: the x86 torch device (`infer --runtime torch --split device`).",
        "",
        f"**Top-1 agreement with the x86 torch device: {result['agree']}/{result['total']}.** "
        f"Largest gap between the two top-1 probabilities where they agree: "
        f"{result.get('max_top1_prob_gap')}.",
        "", EMULATION_NOTE, "",
    ]
    table = report.markdown_table(TABLE_HEADERS, table_rows(result["runs"]))
    return "\n".join(lines) + "\n" + table


def table_rows(runs: Iterable[Mapping[str, Any]]) -> list[list[str]]:
    """One row per run of ``board.json``'s ``runs``, in ``TABLE_HEADERS`` order (no times)."""
    return [[r["photo"], r["split"], r["ran"],
             f"{r['top1_label']} ({r['top1_index']}) p={r['top1_prob']:.3f}",
             f"{r['ref_label']} ({r['ref_index']}) p={r['ref_prob']:.3f}",
             "yes" if r["agree"] else "NO"]
            for r in runs]


def debootstrap_argv(*, arch: str, suite: str, target: str, mirror: str | None) -> list[str]:
    """The minimal root with ``ROOT_PACKAGES``; no mirror means debootstrap's default."""
    argv = ["debootstrap", f"--arch={arch}", "--variant=minbase",
            f"--include={','.join(ROOT_PACKAGES)}", suite, target]
    return [*argv, mirror] if mirror else argv


def chroot_argv(root: str, argv: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """``argv`` in ``root`` with exactly ``env``: nothing of the host's environment leaks in.

        >>> chroot_argv("/r", ["uname", "-m"], {"QEMU_CPU": "cortex-a72"})
        ['chroot', '/r', '/usr/bin/env', '-i', 'QEMU_CPU=cortex-a72', 'uname', '-m']
    """
    return ["chroot", root, "/usr/bin/env", "-i", *(f"{k}={v}" for k, v in env.items()), *argv]


def infer_argv(python: str, *, server: str, split: str, photos: Sequence[str],
               runtime: str = "onnx", model: str = "efficientnet_lite0",
               timeout_s: float = 300.0) -> list[str]:
    """``device_client infer --json --no-fallback``: a run that cannot reach the service fails
    instead of quietly finishing on the device."""
    return [python, "-m", "device_client", "infer", "--server", server, "--model", model,
            "--runtime", runtime, "--split", split, "--timeout", f"{timeout_s:g}", "--json",
            "--no-fallback", *photos]


def pip_env(environ: Mapping[str, str], config: Mapping[str, str], *,
            cert: str | None) -> dict[str, str]:
    """The ``PIP_*`` settings pip inside the root needs to reach the host's package index.

    ``environ`` is the host's environment and ``config`` its ``pip config list`` (``key:
    value``). Index URLs over http(s) carry over; local ``file://`` indexes and ``find-links``
    folders hold x86 wheels on paths the root does not have, and constraints name the host's
    torch, so they stay behind. ``cert`` is the host's CA bundle as seen from inside the root
    (an intercepting proxy's CA is in it).

        >>> pip_env({"PIP_FIND_LINKS": "/opt/wheels", "PIP_DEFAULT_TIMEOUT": "180"},
        ...         {"global.extra-index-url": "file:///opt/pypi/simple"}, cert="/ca.crt")
        {'PIP_DEFAULT_TIMEOUT': '180', 'PIP_CERT': '/ca.crt', 'PIP_DISABLE_PIP_VERSION_CHECK': '1'}
    """
    settings: dict[str, str] = {}
    for key, value in config.items():  # "global.index-url" -> PIP_INDEX_URL; env wins below
        name = key.split(".", 1)[-1]
        settings["PIP_" + name.upper().replace("-", "_")] = value
    settings.update({k: v for k, v in environ.items() if k.startswith("PIP_")})
    out: dict[str, str] = {}
    for key in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST"):
        urls = [u for u in settings.get(key, "").split() if not u.startswith("file:")]
        if urls:
            out[key] = " ".join(urls)
    if "PIP_DEFAULT_TIMEOUT" in settings:
        out["PIP_DEFAULT_TIMEOUT"] = settings["PIP_DEFAULT_TIMEOUT"]
    if cert:
        out["PIP_CERT"] = cert
    out["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return out


def qemu_major(version_text: str) -> int | None:
    """``qemu-aarch64 version 10.0.2 (Debian ...)`` -> 10; None when it does not say.

        >>> qemu_major("qemu-aarch64 version 7.2.15 (Debian 1:7.2+dfsg-7+deb12u18)")
        7
    """
    m = re.search(r"version (\d+)\.", version_text)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class HostFacts:
    """What the host has for running an arm64 root, as ``board_root.host_facts`` found it."""

    is_root: bool
    debootstrap: bool
    qemu_version: str | None  # `qemu-aarch64 --version`'s first line; None: not installed
    binfmt_mounted: bool
    binfmt_entry: str | None  # /proc/sys/fs/binfmt_misc/qemu-aarch64; None: not registered
    interpreter_exists: bool = True


def host_problems(facts: HostFacts) -> list[str]:
    """One line per missing piece, each with the command that fixes it; [] when all is there.

        >>> host_problems(HostFacts(True, True, "qemu-aarch64 version 10.0.2", True,
        ...                         "enabled\\ninterpreter /q\\nflags: POF\\n"))
        []
    """
    problems = []
    backports = ("apt-get install -t bookworm-backports qemu-user-static debootstrap "
                 "(after adding bookworm-backports to the apt sources)")
    if not facts.is_root:
        problems.append("not root: debootstrap, chroot and mount need it; run as root")
    if not facts.debootstrap:
        problems.append(f"debootstrap is not installed; fix: {backports}")
    major = qemu_major(facts.qemu_version or "")
    if facts.qemu_version is None:
        problems.append(f"qemu-aarch64 is not installed; fix: {backports}")
    elif major is None or major < QEMU_MIN_MAJOR:
        problems.append(f"qemu-aarch64 is too old ({facts.qemu_version.strip()}; "
                        f"{QEMU_MIN_MAJOR}.x needed, 7.2 crashes inside ONNX Runtime); "
                        f"fix: {backports}")
    if not facts.binfmt_mounted:
        problems.append("binfmt_misc is not mounted; fix: "
                        "mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc")
    elif facts.binfmt_entry is None:
        problems.append("qemu-aarch64 is not registered with binfmt_misc; fix: "
                        "cat /usr/lib/binfmt.d/qemu-aarch64.conf > "
                        "/proc/sys/fs/binfmt_misc/register")
    else:
        entry = facts.binfmt_entry
        flags = re.search(r"^flags:\s*(\S*)", entry, re.M)
        if not entry.startswith("enabled"):
            problems.append("the qemu-aarch64 binfmt entry is disabled; fix: "
                            "echo 1 > /proc/sys/fs/binfmt_misc/qemu-aarch64")
        if flags is None or "F" not in flags.group(1):
            problems.append("the qemu-aarch64 binfmt entry lacks the F (fix-binary) flag, so the "
                            "root would need qemu inside; fix: echo -1 > "
                            "/proc/sys/fs/binfmt_misc/qemu-aarch64 && cat "
                            "/usr/lib/binfmt.d/qemu-aarch64.conf > "
                            "/proc/sys/fs/binfmt_misc/register")
        if not facts.interpreter_exists:
            problems.append("the binfmt entry's qemu interpreter is missing; fix: "
                            f"{backports}")
    return problems


def shell_join(argv: Sequence[str]) -> str:
    """A command as one would type it (for the report and the logs)."""
    return shlex.join(argv)
