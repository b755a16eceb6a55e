"""A phone-class CPU for the device process: a cgroup v1 CPU quota, plus core pinning.

    >>> limit = CpuLimit.create(0.2)            # or raises CpuLimitUnavailable with the reason
    >>> limit.add(worker_pid)                   # the worker now gets 20 % of one core
    >>> limit.remove()                          # at exit (after the worker has exited)

The group is ``<cpu controller mount>/<our own cpu cgroup>/splitserve-bench-<pid>`` with
``cpu.cfs_quota_us = fraction * cpu.cfs_period_us``. A quota is a duty cycle, not a slower CPU:
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

__all__ = ["PERIOD_US", "CpuLimit", "CpuLimitUnavailable", "cpu_cgroup_mount", "pick_cores"]

PERIOD_US = 10_000
PREFIX = "splitserve-bench-"


class CpuLimitUnavailable(RuntimeError):
    """The quota can't be set here (not root, no cgroup v1 cpu controller...): the reason."""


def cpu_cgroup_mount(mounts: str = "/proc/mounts") -> Path | None:
    """Where the cgroup v1 ``cpu`` controller is mounted (``/sys/fs/cgroup/cpu`` or
    ``/sys/fs/cgroup/cpu,cpuacct``), or None."""
    try:
        lines = Path(mounts).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) >= 4 and fields[2] == "cgroup" and "cpu" in fields[3].split(","):
            return Path(fields[1])
    return None


def _own_cpu_cgroup() -> str:
    """Our own cgroup in the v1 cpu hierarchy, e.g. ``/`` or ``/user.slice``."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "cpu" in controllers.split(","):
                return path
    except (OSError, ValueError):
        pass
    return "/"


def cgroup_of(pid: int) -> str | None:
    """The cpu-controller cgroup path ``pid`` is in now (read back, never assumed)."""
    try:
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "cpu" in controllers.split(","):
                return path
    except (OSError, ValueError):
        pass
    return None


def pick_cores() -> tuple[int, int] | None:
    """``(device core, service core)``: two different cores we may run on, or None if we may
    only use one (then pinning can't keep the two apart)."""
    cores = sorted(os.sched_getaffinity(0))
    return (cores[0], cores[1]) if len(cores) >= 2 else None


@dataclass
class CpuLimit:
    """A cgroup v1 group with a CPU quota of ``fraction`` of one core (None: no quota) and a
    ``cpu.shares`` weight. Create with ``CpuLimit.create``."""

    path: Path
    fraction: float | None
    period_us: int
    shares: int | None = None

    @classmethod
    def create(
        cls,
        fraction: float | None,
        *,
        period_us: int = PERIOD_US,
        shares: int | None = None,
        suffix: str = "",
    ) -> CpuLimit:
        """Make the group ``splitserve-bench-<pid><suffix>``; ``CpuLimitUnavailable`` says why
        not (never half-made).

        ``shares`` (default 1024, the weight of one ordinary process) decides who runs when the
        core is contended, never more than the quota: a high weight keeps unrelated jobs on a
        shared machine from eating into the device's 20 %."""
        if fraction is not None and not 0 < fraction <= 64:
            raise ValueError(f"fraction must be in (0, 64], got {fraction}")
        quota_us = -1 if fraction is None else round(fraction * period_us)
        if fraction is not None and quota_us < 1000:  # the kernel's minimum quota
            raise ValueError(f"{fraction} of a {period_us} us period is under the 1 ms minimum")
        if shares is not None and not 2 <= shares <= 262_144:
            raise ValueError(f"shares must be in [2, 262144], got {shares}")
        mount = cpu_cgroup_mount()
        if mount is None:
            raise CpuLimitUnavailable("no cgroup v1 cpu controller is mounted (cgroup v2 only?)")
        parent = mount / _own_cpu_cgroup().lstrip("/")
        path = parent / f"{PREFIX}{os.getpid()}{suffix}"
        try:
            path.mkdir(exist_ok=True)
        except OSError as exc:
            raise CpuLimitUnavailable(f"cannot create {path}: {exc.strerror}") from exc
        limit = cls(path, fraction, period_us, shares)
        try:
            # The group is new (quota -1), so the period can change before the quota.
            (path / "cpu.cfs_period_us").write_text(str(period_us))
            (path / "cpu.cfs_quota_us").write_text(str(quota_us))
            if shares is not None:
                (path / "cpu.shares").write_text(str(shares))
        except OSError as exc:
            limit.remove()
            raise CpuLimitUnavailable(f"cannot set up {path}: {exc.strerror}") from exc
        return limit

    @property
    def quota_us(self) -> int:
        return int((self.path / "cpu.cfs_quota_us").read_text())

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
        """``cpu.stat``: ``nr_periods``, ``nr_throttled``, ``throttled_time`` (ns)..."""
        out = {}
        with contextlib.suppress(OSError):
            for line in (self.path / "cpu.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                out[key] = int(value)
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
