"""A phone-class CPU for the device process: a cgroup CPU quota (v1 or v2), plus core pinning.

    >>> limit = CpuLimit.create(0.2)            # or raises CpuLimitUnavailable with the reason
    >>> limit.add(worker_pid)                   # the worker now gets 20 % of one core
    >>> limit.remove()                          # at exit (after the worker has exited)

The group is ``<cpu controller mount>/<our own cpu cgroup>/splitserve-bench-<pid>`` with
``cpu.cfs_quota_us = fraction * cpu.cfs_period_us`` on cgroup v1, or ``cpu.max`` ("2000 10000")
on v2, whichever holds the cpu controller (v1's on a hybrid host; ``limit.interface`` says
which). A quota is a duty cycle, not a slower CPU:
the group runs at full speed until its budget for the period is spent, then stalls until the
next period. So the period is 10 ms (2 ms of CPU, then an 8 ms stall), not the kernel's default
100 ms: with 100 ms a device that was idle (waiting for the network) gets its next 20 ms of CPU
at full speed, so a 5 ms head runs in 5 ms after a pause but takes ~25 ms back to back in the
profile; with 20 ms the 16 ms stalls were as large as the gaps between candidates on a LAN.
Shorter periods cost cache and TLB refills after every stall: on the benchmark machine
EfficientNet-Lite0's CPU time per inference grew from 29 ms unthrottled to ~35 ms at 20 ms
periods, ~37-44 ms at 10 ms and ~57 ms at 5 ms.

A group without a quota (``fraction=None``) but with a high ``cpu.shares`` weight serves the
other side: on a machine other jobs share, the service and the link emulation then get their
core when they need it, so a contended machine doesn't show up as a slow cloud.

Pinning uses ``os.sched_setaffinity`` (what ``taskset`` does): the device on one core, the
service and the link emulation on another, so they never compete for the device's core.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from shared.cpu import CpuQuota, format_cpu_max, parse_cfs, parse_cpu_max, shares_to_weight

__all__ = [
    "PERIOD_US",
    "CgroupCpu",
    "CpuLimit",
    "CpuLimitUnavailable",
    "cgroup_of",
    "cpu_cgroup_mount",
    "find_cpu_cgroup",
    "parse_cpu_stat",
    "pick_cores",
]

PERIOD_US = 10_000
PREFIX = "splitserve-bench-"


class CpuLimitUnavailable(RuntimeError):
    """The quota can't be set here (not root, no cpu controller...): the reason."""


@dataclass(frozen=True)
class CgroupCpu:
    """Where the cpu controller lives: ``version`` 1 (its own mount) or 2 (the unified tree),
    the mount, and this process's own group in it (``/`` or ``/user.slice``...)."""

    version: int
    mount: Path
    own: str


def cpu_cgroup_mount(mounts: str = "/proc/mounts") -> Path | None:
    """Where the cgroup v1 ``cpu`` controller is mounted (``/sys/fs/cgroup/cpu`` or
    ``/sys/fs/cgroup/cpu,cpuacct``), or None."""
    found = find_cpu_cgroup(mounts)
    return found.mount if found is not None and found.version == 1 else None


def find_cpu_cgroup(
    mounts: str | Path = "/proc/mounts", proc_cgroup: str | Path = "/proc/self/cgroup"
) -> CgroupCpu | None:
    """The cpu controller: v1's ``cpu`` mount if there is one (on a hybrid host the unified
    tree then has no cpu controller), else a cgroup2 mount whose ``cgroup.controllers`` lists
    ``cpu``; None if neither. ``mounts`` and ``proc_cgroup`` point at a fake tree in tests."""
    try:
        lines = Path(mounts).read_text().splitlines()
    except OSError:
        return None
    v2: Path | None = None
    for line in lines:
        fields = line.split()
        if len(fields) < 4:
            continue
        if fields[2] == "cgroup" and "cpu" in fields[3].split(","):
            return CgroupCpu(1, Path(fields[1]), _own_group(proc_cgroup, version=1))
        if fields[2] == "cgroup2" and v2 is None:
            try:
                if "cpu" in (Path(fields[1]) / "cgroup.controllers").read_text().split():
                    v2 = Path(fields[1])
            except OSError:
                pass
    return None if v2 is None else CgroupCpu(2, v2, _own_group(proc_cgroup, version=2))


def _own_group(proc_cgroup: str | Path, *, version: int) -> str:
    """Our own group in the cpu hierarchy: v1's ``N:cpu,...:/path`` line or v2's ``0::/path``."""
    try:
        for line in Path(proc_cgroup).read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if (controllers == "") if version == 2 else "cpu" in controllers.split(","):
                return path
    except (OSError, ValueError):
        pass
    return "/"


def cgroup_of(pid: int) -> str | None:
    """The cpu-controller cgroup path ``pid`` is in now (read back, never assumed): the v1
    cpu line, else the v2 line."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    unified = None
    for line in lines:
        try:
            _, controllers, path = line.split(":", 2)
        except ValueError:
            continue
        if "cpu" in controllers.split(","):
            return path
        if controllers == "":
            unified = path
    return unified


def parse_cpu_stat(text: str) -> dict[str, int]:
    """``cpu.stat`` as a dict, with ``throttled_time`` in ns on v1 and v2 alike."""
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            out[key] = int(value)
    if "throttled_usec" in out and "throttled_time" not in out:
        out["throttled_time"] = out["throttled_usec"] * 1000
    return out


def _v2_parent(own: Path, root: Path) -> Path:
    """Where a v2 group can get the cpu controller: under our own group if it can hand the
    controller down, else under the root (exempt from the "no internal processes" rule; a
    systemd session's own group holds processes, so it cannot)."""
    reasons = []
    for parent in dict.fromkeys((own, root)):
        try:
            _enable_cpu_controller(parent)
            return parent
        except CpuLimitUnavailable as exc:
            reasons.append(str(exc))
    raise CpuLimitUnavailable("; ".join(reasons))


def _enable_cpu_controller(parent: Path) -> None:
    """v2 hands a controller to a group's children only when the group lists it in
    ``cgroup.subtree_control``; the kernel refuses while the group itself holds processes
    (the "no internal processes" rule), which we report."""
    control = parent / "cgroup.subtree_control"
    try:
        if "cpu" in control.read_text().split():
            return
        control.write_text("+cpu")
    except OSError as exc:
        raise CpuLimitUnavailable(
            f"cannot enable the cpu controller in {control}: {exc.strerror} (a v2 group that "
            "holds processes cannot hand controllers down; run from a group of its own)"
        ) from exc


def pick_cores() -> tuple[int, int] | None:
    """``(device core, service core)``: two different cores we may run on, or None if we may
    only use one (then pinning can't keep the two apart)."""
    cores = sorted(os.sched_getaffinity(0))
    return (cores[0], cores[1]) if len(cores) >= 2 else None


@dataclass
class CpuLimit:
    """A cgroup with a CPU quota of ``fraction`` of one core (None: no quota) and a weight
    (``shares`` in v1's units; v2 gets the same as ``cpu.weight``). Create with
    ``CpuLimit.create``; ``version`` says which interface holds it."""

    path: Path
    fraction: float | None
    period_us: int
    shares: int | None = None
    version: int = 1

    @classmethod
    def create(
        cls,
        fraction: float | None,
        *,
        period_us: int = PERIOD_US,
        shares: int | None = None,
        suffix: str = "",
        cgroup: CgroupCpu | None = None,
    ) -> CpuLimit:
        """Make the group ``splitserve-bench-<pid><suffix>``; ``CpuLimitUnavailable`` says why
        not (never half-made). ``cgroup``: where (default: ``find_cpu_cgroup()``).

        ``shares`` (default 1024, the weight of one ordinary process) decides who runs when the
        core is contended, never more than the quota: a high weight keeps unrelated jobs on a
        shared machine from eating into the device's 20 %."""
        if fraction is not None and not 0 < fraction <= 64:
            raise ValueError(f"fraction must be in (0, 64], got {fraction}")
        quota = CpuQuota(None if fraction is None else round(fraction * period_us), period_us)
        if quota.quota_us is not None and quota.quota_us < 1000:  # the kernel's minimum
            raise ValueError(f"{fraction} of a {period_us} us period is under the 1 ms minimum")
        weight = None if shares is None else shares_to_weight(shares)  # ValueError if out of range
        where = cgroup or find_cpu_cgroup()
        if where is None:
            raise CpuLimitUnavailable("no cpu controller is mounted (neither cgroup v1 nor v2)")
        parent = where.mount / where.own.lstrip("/")
        if where.version == 2:
            parent = _v2_parent(parent, where.mount)
        path = parent / f"{PREFIX}{os.getpid()}{suffix}"
        try:
            path.mkdir(exist_ok=True)
        except OSError as exc:
            raise CpuLimitUnavailable(f"cannot create {path}: {exc.strerror}") from exc
        limit = cls(path, fraction, period_us, shares, where.version)
        try:
            if where.version == 2:
                (path / "cpu.max").write_text(format_cpu_max(quota))
                if weight is not None:
                    (path / "cpu.weight").write_text(str(weight))
            else:
                # The group is new (quota -1), so the period can change before the quota.
                (path / "cpu.cfs_period_us").write_text(str(period_us))
                (path / "cpu.cfs_quota_us").write_text(str(quota.quota_us or -1))
                if shares is not None:
                    (path / "cpu.shares").write_text(str(shares))
        except OSError as exc:
            limit.remove()
            raise CpuLimitUnavailable(f"cannot set up {path}: {exc.strerror}") from exc
        return limit

    @property
    def interface(self) -> str:
        """Which kernel interface holds the quota, for the benchmark's output."""
        return "cgroup v2 (cpu.max)" if self.version == 2 else "cgroup v1 (cpu.cfs_quota_us)"

    @property
    def quota_us(self) -> int:
        """The quota read back from the group: -1 for none, as v1 writes it."""
        if self.version == 2:
            quota = parse_cpu_max((self.path / "cpu.max").read_text())
        else:
            quota = parse_cfs(
                (self.path / "cpu.cfs_quota_us").read_text(),
                (self.path / "cpu.cfs_period_us").read_text(),
            )
        return -1 if quota.quota_us is None else quota.quota_us

    def add(self, pid: int) -> None:
        """Move ``pid`` (all its threads) into the group, and check that it got there."""
        try:
            (self.path / "cgroup.procs").write_text(str(pid))
        except OSError as exc:
            raise CpuLimitUnavailable(f"cannot move {pid} into {self.path}: {exc}") from exc
        where = cgroup_of(pid)
        if where is None or not where.endswith(self.path.name):
            raise CpuLimitUnavailable(f"{pid} is in {where!r} after moving it to {self.path}")

    def stats(self) -> dict[str, int]:
        """``cpu.stat``: ``nr_periods``, ``nr_throttled``, ``throttled_time`` (ns)... v2's
        ``throttled_usec`` is also given as v1's ``throttled_time``, so both read alike."""
        out = {}
        with contextlib.suppress(OSError):
            out = parse_cpu_stat((self.path / "cpu.stat").read_text())
        return out

    def remove(self, timeout_s: float = 5.0) -> bool:
        """Delete the group; True if it is gone. Its processes must have exited: waits up to
        ``timeout_s`` for them, then moves any left to the parent group and tries once more."""
        deadline = time.monotonic() + timeout_s
        evicted = False
        while True:
            try:
                self.path.rmdir()
                return True
            except FileNotFoundError:
                return True
            except OSError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                elif not evicted:
                    self._evict()
                    evicted, deadline = True, time.monotonic() + 1.0
                else:
                    return False

    def release(self, pid: int) -> None:
        """Move ``pid`` back to the parent group (before ``remove``, for a process that lives
        on, such as the benchmark itself)."""
        with contextlib.suppress(OSError):
            (self.path.parent / "cgroup.procs").write_text(str(pid))

    def _evict(self) -> None:
        with contextlib.suppress(OSError):
            for pid in (self.path / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    (self.path.parent / "cgroup.procs").write_text(pid)
