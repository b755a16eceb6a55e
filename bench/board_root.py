"""The arm64 Debian root of ``bench board``: check the host, build and cache the root, run in it.

    facts = host_facts("aarch64")            # what the host has; board_report.host_problems
    root = BoardRoot(Path("~/.cache/splitserve/board/arm64").expanduser(), arch="arm64")
    root.ensure(suite="bookworm", mirror=None, log=print)   # debootstrap once, then reused
    with root.mounted():                      # /proc, /dev, /sys; unmounted on any exit
        root.run(["uname", "-m"])

The root runs through qemu-user registered with binfmt_misc with the F flag: the kernel holds the
(static) interpreter open, so nothing of qemu is copied into the root. ``QEMU_CPU`` in a
command's environment picks the emulated CPU (qemu-user reads it at start).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.board_report import HostFacts, chroot_argv, debootstrap_argv, shell_join
from shared.errors import ConfigError

__all__ = ["BINFMT_DIR", "BoardRoot", "default_root", "host_facts", "qemu_version"]

BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
MARKER = ".splitserve-board.json"  # written last: a root without it is half built
SOURCE_DIR = "/opt/splitserve-src"
VENV_DIR = "/opt/splitserve-venv"
HOST_CA = "/etc/ssl/certs/splitserve-host-ca.crt"  # the host's CA bundle, copied in
PACKAGE_FILES = ("pyproject.toml", "README.md", "shared", "device_client", "cloud_server")
BINFMT_NAMES = {"aarch64": "qemu-aarch64"}


def default_root(arch: str) -> Path:
    """``$XDG_CACHE_HOME/splitserve/board/<arch>``, else ``~/.cache/splitserve/board/<arch>``."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "splitserve" / "board" / arch


def qemu_version(machine: str) -> str | None:
    exe = shutil.which(f"qemu-{machine}") or shutil.which(f"qemu-{machine}-static")
    if exe is None:
        return None
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
    return out.stdout.splitlines()[0] if out.stdout else None


def host_facts(machine: str) -> HostFacts:
    entry_path = BINFMT_DIR / BINFMT_NAMES[machine]
    entry = entry_path.read_text() if entry_path.exists() else None
    interpreter = None
    for line in (entry or "").splitlines():
        if line.startswith("interpreter "):
            interpreter = line.split(" ", 1)[1].strip()
    return HostFacts(
        is_root=os.geteuid() == 0,
        debootstrap=shutil.which("debootstrap") is not None,
        qemu_version=qemu_version(machine),
        binfmt_mounted=(BINFMT_DIR / "register").exists(),
        binfmt_entry=entry,
        interpreter_exists=interpreter is None or Path(interpreter).exists(),
    )


class BoardRoot:
    """A cached Debian root for ``arch`` at ``path``, with ``env`` for every command in it."""

    def __init__(self, path: Path, *, arch: str, env: Mapping[str, str]) -> None:
        self.path = path
        self.arch = arch
        self.env = {"HOME": "/root", "LANG": "C.UTF-8",
                    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    **env}
        self._mounts: list[Path] = []

    @property
    def venv_python(self) -> str:
        return f"{VENV_DIR}/bin/python"

    def inside(self, path: str) -> Path:
        """The host path of ``path`` inside the root."""
        return self.path / path.lstrip("/")

    # -- building -----------------------------------------------------------------------------

    def marker(self) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads((self.path / MARKER).read_text())
        except (OSError, ValueError):
            return None
        return data

    def ensure(self, *, suite: str, mirror: str | None, log: Callable[[str], None]) -> bool:
        """Build the root unless a finished one of ``suite`` is there; True when it built one.

        debootstrap writes to ``<path>.partial``, renamed only when it finished, so a root
        interrupted half way is never taken for a built one.
        """
        mark = self.marker()
        if mark is not None:
            if mark.get("suite") != suite or mark.get("arch") != self.arch:
                raise ConfigError(f"{self.path} holds a {mark.get('arch')} {mark.get('suite')} "
                                  f"root, not {self.arch} {suite}: pass another --root or "
                                  f"remove it")
            return False
        if self.path.exists():
            raise ConfigError(f"{self.path} exists and is not a finished board root: remove it")
        partial = self.path.with_name(self.path.name + ".partial")
        if partial.exists():
            shutil.rmtree(partial)
        partial.parent.mkdir(parents=True, exist_ok=True)
        argv = debootstrap_argv(arch=self.arch, suite=suite, target=str(partial), mirror=mirror)
        log(f"building the {self.arch} root (several minutes under emulation): "
            f"{shell_join(argv)}")
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = " | ".join((done.stdout + done.stderr).strip().splitlines()[-3:])
            raise ConfigError(f"debootstrap failed ({done.returncode}): {tail}")
        self.finish(partial, suite=suite)
        return True

    def finish(self, partial: Path, *, suite: str) -> None:
        """Mark a finished debootstrap in ``partial`` and move it to ``path``."""
        (partial / MARKER).write_text(json.dumps({"arch": self.arch, "suite": suite}) + "\n")
        partial.rename(self.path)

    # -- mounts -------------------------------------------------------------------------------

    @contextmanager
    def mounted(self) -> Iterator[BoardRoot]:
        """/proc, /sys and /dev in the root, plus the host's DNS and CA bundle; unmounted on
        every way out (an exception, Ctrl-C, SIGTERM turned into one by the caller)."""
        self._unmount_stale()
        try:
            self._mount(["-t", "proc", "proc"], "/proc")
            self._mount(["--bind", "/sys"], "/sys")
            self._mount(["--bind", "/dev"], "/dev")
            # pip resolves names and meets the host's TLS the way the host does.
            for src, dest in (("/etc/resolv.conf", "/etc/resolv.conf"),
                              ("/etc/hosts", "/etc/hosts"),
                              ("/etc/ssl/certs/ca-certificates.crt", HOST_CA)):
                if Path(src).exists():
                    target = self.inside(dest)
                    target.unlink(missing_ok=True)  # resolv.conf may be a dangling symlink
                    shutil.copyfile(src, target)
            yield self
        finally:
            self.unmount()

    def _mount(self, how: Sequence[str], where: str) -> None:
        target = self.inside(where)
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", *how, str(target)], check=True, capture_output=True)
        self._mounts.append(target)

    def unmount(self) -> None:
        while self._mounts:
            target = self._mounts.pop()
            if subprocess.run(["umount", str(target)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(target)], capture_output=True)

    def _unmount_stale(self) -> None:
        # A run killed by SIGKILL leaves its mounts: take them down before mounting again.
        root = str(self.path.resolve())
        with open("/proc/mounts") as f:
            stale = [line.split()[1] for line in f if line.split()[1].startswith(root + "/")]
        for target in sorted(stale, key=len, reverse=True):
            subprocess.run(["umount", "-l", target], capture_output=True)

    # -- running ------------------------------------------------------------------------------

    def run(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
            check: bool = True, timeout_s: float | None = None) -> subprocess.CompletedProcess[str]:
        """``argv`` inside the root (mounted) with ``self.env`` (+ ``env``), output captured."""
        full = chroot_argv(str(self.path), argv, {**self.env, **(env or {})})
        done = subprocess.run(full, capture_output=True, text=True, check=False,
                              timeout=timeout_s)
        if check and done.returncode != 0:
            tail = " | ".join(done.stderr.strip().splitlines()[-3:]) or "(no output)"
            raise ConfigError(f"in the {self.arch} root, {shell_join(argv)[:120]} exited "
                              f"{done.returncode}: {tail}")
        return done

    def install_package(self, repo: Path, *, log: Callable[[str], None]) -> bool:
        """The torch-free ``pip install .`` of ``repo`` into a venv in the root; True when it
        (re)installed. Skipped when the installed copy came from the same sources."""
        digest = source_digest(repo)
        stamp = self.inside(VENV_DIR) / "splitserve-source.sha256"
        if stamp.exists() and stamp.read_text().strip() == digest:
            return False
        src = self.inside(SOURCE_DIR)
        if src.exists():
            shutil.rmtree(src)
        src.mkdir(parents=True)
        for name in PACKAGE_FILES:
            path = repo / name
            if path.is_dir():
                shutil.copytree(path, src / name,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(path, src / name)
        if not self.inside(self.venv_python).exists():
            log(f"creating {VENV_DIR} in the root")
            self.run(["python3", "-m", "venv", VENV_DIR])
        log("pip install . in the root (aarch64 wheels; minutes under emulation)")
        pip = [self.venv_python, "-m", "pip", "install", "--no-cache-dir"]
        self.run([*pip, SOURCE_DIR])  # new dependencies, if the sources name any
        if stamp.exists():  # an older copy is installed: replace it whatever its version says
            self.run([*pip, "--force-reinstall", "--no-deps", SOURCE_DIR])
        stamp.write_text(digest + "\n")
        return True


def source_digest(repo: Path) -> str:
    """sha256 over the package's files: the root reinstalls only when they changed."""
    h = hashlib.sha256()
    for name in PACKAGE_FILES:
        base = repo / name
        files = sorted(p for p in base.rglob("*") if p.is_file()) if base.is_dir() else [base]
        for p in files:
            if "__pycache__" in p.parts or p.suffix == ".pyc":
                continue
            h.update(str(p.relative_to(repo)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()
