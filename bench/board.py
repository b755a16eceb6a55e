"""The torch-free device on an arm64 Debian root (qemu-user), against the x86 service.

    python -m bench board --arch arm64 --out bench/results     # board.json + board.md
    python -m bench board --setup ...                           # first: host packages, binfmt

Builds (once, cached under ~/.cache/splitserve/board/arm64) an arm64 Debian root with
debootstrap, runs it through qemu-user 10.x registered with binfmt_misc (``QEMU_CPU`` picks the
emulated CPU, cortex-a72 by default), pip-installs this repository's device package into a venv
in it (no torch), starts ``python -m cloud_server`` on loopback, and runs
``python -m device_client infer --json`` in the root on the sample photos and augmented crops,
at ``--split device`` and at the model's middle split point. Every answer is compared with the
x86 torch device's top-1 for the same photo. Host setup (root only): ``bench/board_setup.sh``.

Times under emulation are not a board's: the output records them as ``emulated_ms`` and claims
none. Exit 0 only when every run agrees, there are at least 12 and the root says aarch64.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from bench import report
from bench.board_report import (
    EMULATION_NOTE,
    SETUP_HINT,
    TABLE_HEADERS,
    BoardRun,
    board_markdown,
    build_report,
    host_problems,
    infer_argv,
    join_runs,
    parse_infer_json,
    photo_filename,
    pip_env,
    table_rows,
)
from bench.board_root import VENV_DIR, BoardRoot, default_root, host_facts, qemu_version
from bench.images import evaluation_images
from device_client.local_service import LocalService
from shared import cliargs
from shared.errors import ConfigError
from shared.models import list_models

__all__ = ["MIN_RUNS", "add_arguments", "run"]

ARCHES = {"arm64": "aarch64"}  # Debian's name -> the kernel's
MIN_RUNS = 12
REPO = Path(__file__).resolve().parents[1]
PHOTO_DIR = "/tmp/splitserve-board/photos"  # inside the root
PROBE = ("import importlib.util, json, os, platform, numpy, onnxruntime; print(json.dumps("
         "{'machine': platform.machine(), 'python': platform.python_version(), "
         "'onnxruntime': onnxruntime.__version__, 'numpy': numpy.__version__, "
         "'torch': importlib.util.find_spec('torch') is not None}))")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", choices=sorted(ARCHES), default="arm64")
    p.add_argument("--out", type=Path, default=Path("bench/results"),
                   help="output directory for board.json and board.md (default bench/results)")
    p.add_argument("--root", type=Path, default=None,
                   help="the cached Debian root (default ~/.cache/splitserve/board/ARCH)")
    p.add_argument("--suite", default="bookworm", help="Debian release of the root")
    p.add_argument("--mirror", default=None, help="Debian mirror (default: debootstrap's)")
    p.add_argument("--cpu", default="cortex-a72", help="QEMU_CPU: the emulated CPU")
    p.add_argument("--model", default="efficientnet_lite0", choices=list_models())
    p.add_argument("--split-point", default=None,
                   help="the middle split point (default: the model's middle one, "
                        "_blocks.9 for efficientnet_lite0)")
    p.add_argument("--crops", type=cliargs.integer(at_least=0), default=7,
                   help="augmented crops besides the 5 photos (default 7: 12 photos, 24 runs)")
    p.add_argument("--setup", action="store_true",
                   help="first run bench/board_setup.sh: apt-get installs qemu-user-static "
                        "and debootstrap from bookworm-backports, mounts binfmt_misc and "
                        "registers qemu-aarch64 (root only; says each step)")


def run(args: argparse.Namespace) -> int:
    machine = ARCHES[args.arch]
    console = report.make_console()
    if args.setup:
        if subprocess.run(["bash", str(REPO / "bench" / "board_setup.sh")]).returncode != 0:
            raise ConfigError("bench/board_setup.sh failed (its own message is above)")
    problems = host_problems(host_facts(machine))
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ConfigError(f"{problems[0]}{more}; all at once: {SETUP_HINT}")
    root_path = args.root or default_root(args.arch)
    config = _pip_config()
    root = BoardRoot(root_path, arch=args.arch,
                     env={"QEMU_CPU": args.cpu,
                          **pip_env(os.environ, config, cert="/etc/ssl/certs/"
                                    "splitserve-host-ca.crt")})
    started = time.perf_counter()
    built = root.ensure(suite=args.suite, mirror=args.mirror, log=console.print)
    split_point = args.split_point or _middle_point(args.model)
    photos = _write_photos(root, args.crops)
    args.out.mkdir(parents=True, exist_ok=True)
    with _sigterm_as_interrupt(), root.mounted():
        installed = root.install_package(REPO, log=console.print)
        probe = json.loads(root.run([root.venv_python, "-c", PROBE]).stdout)
        uname_m = root.run(["uname", "-m"]).stdout.strip()
        console.print(f"root: {uname_m}, Python {probe['python']}, onnxruntime "
                      f"{probe['onnxruntime']}, torch importable: {probe['torch']}")
        with LocalService(models=[args.model]) as service:
            files = [f"{PHOTO_DIR}/{photo_filename(p)}" for p in photos]
            host_files = [str(root.inside(f)) for f in files]
            with console.status("x86 reference: infer --runtime torch --split device"):
                reference = parse_infer_json(_host(infer_argv(
                    sys.executable, server=service.url, split="device", photos=host_files,
                    runtime="torch", model=args.model)))
            runs: list[BoardRun] = []
            for split in ("device", split_point):
                with console.status(f"{args.arch} root: infer --split {split} on "
                                    f"{len(files)} photos (emulated)"):
                    done = root.run(infer_argv(root.venv_python, server=service.url,
                                               split=split, photos=files, model=args.model),
                                    timeout_s=3600)
                runs += join_runs(photos, split, parse_infer_json(done.stdout), reference)
    elapsed = time.perf_counter() - started
    result = build_report(machine=probe["machine"], runs=runs, meta={
        "command": _command(args),
        "uname_m": uname_m,
        "model": args.model,
        "splits": ["device", split_point],
        "photos": photos,
        "qemu_cpu": args.cpu,
        "versions": {"debian": _debian_version(root), "qemu": qemu_version(machine),
                     "python": probe["python"], "onnxruntime": probe["onnxruntime"],
                     "numpy": probe["numpy"], "host_machine": platform.machine()},
        "torch_on_board": probe["torch"],
        "venv_bytes": _tree_bytes(root.inside(VENV_DIR)),
        "service_backend": os.environ.get("SPLITSERVE_BACKEND", "onnxruntime (default)"),
        "reference": "x86 torch device: python -m device_client infer --runtime torch "
                     "--split device",
        "root_built_this_run": built, "package_installed_this_run": installed,
        "elapsed_s": round(elapsed, 1),
    })
    paths = [report.write_json(args.out / "board.json", result),
             report.write_text(args.out / "board.md", board_markdown(result))]
    report.print_table(f"{args.model} on {result['machine']} (qemu {args.cpu}) vs x86 torch",
                       TABLE_HEADERS, table_rows(result["runs"]), console=console)
    ms = [r.emulated_ms for r in runs]
    console.print(f"{EMULATION_NOTE} (emulated median {statistics.median(ms):.0f} ms an image)")
    verdict = (result["agree"] == result["total"] and result["total"] >= MIN_RUNS
               and result["machine"] == machine)
    console.print(f"agree {result['agree']}/{result['total']} on {result['machine']}: "
                  f"{'bar met' if verdict else 'BAR NOT MET'}; wrote "
                  + ", ".join(map(str, paths)))
    return 0 if verdict else 1


def _pip_config() -> dict[str, str]:
    # `pip config list` lines: key='value'
    done = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                          text=True, check=False)
    out = {}
    for line in done.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep and not key.startswith(":env:"):
            out[key.strip()] = value.strip().strip("'\"")
    return out


def _middle_point(model: str) -> str:
    from device_client.runtime import DeviceRuntime  # torch: the host's, not the board's

    return str(DeviceRuntime(model).middle_point().name)


def _write_photos(root: BoardRoot, crops: int) -> list[str]:
    folder = root.inside(PHOTO_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    names = []
    for name, image in evaluation_images(crops):
        image.save(folder / photo_filename(name))
        names.append(name)
    return names


def _host(argv: Sequence[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:]) or "(no output)"
        raise ConfigError(f"the x86 reference run failed ({done.returncode}): {tail}")
    return done.stdout


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    # SIGTERM's default kills without running `finally`: the root's mounts would stay.
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _debian_version(root: BoardRoot) -> str:
    try:
        version = root.inside("/etc/debian_version").read_text().strip()
    except OSError:
        return "?"
    fields = {}
    for line in root.inside("/etc/os-release").read_text().splitlines():
        key, _, value = line.partition("=")
        fields[key] = value.strip('"')
    codename = fields.get("VERSION_CODENAME")
    return f"{version} ({codename})" if codename else version


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _command(args: argparse.Namespace) -> str:
    parts = ["python -m bench board", f"--arch {args.arch}", f"--out {args.out}"]
    if args.crops != 7:
        parts.append(f"--crops {args.crops}")
    if args.split_point:
        parts.append(f"--split-point {args.split_point}")
    if args.cpu != "cortex-a72":
        parts.append(f"--cpu {args.cpu}")
    return " ".join(parts)

