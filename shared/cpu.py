"""How many CPUs this process may use: its cgroup's quota, else its affinity mask.

Both sides size torch's thread pool with it, and the device keys its profile on it: a container
capped at ``cpus: 2`` (or a board emulated at 20% of a core) still sees every host core in
``os.cpu_count()``, and torch would start that many spinning threads and thrash.

Two kernels' worth of files say the same thing:

    cgroup v2   cpu.max            "20000 100000" (quota and period in us), "max 100000": none
    cgroup v1   cpu.cfs_quota_us   "20000", -1: none;  cpu.cfs_period_us "100000"

The parsers and the formatter are pure, so both layouts are tested without a v2 host:

    >>> parse_cpu_max("20000 100000")
    CpuQuota(quota_us=20000, period_us=100000)
    >>> parse_cpu_max("max 100000").cores is None
    True
    >>> format_cpu_max(CpuQuota(2000, 10000))
    '2000 10000'
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CpuQuota",
    "cgroup_quota",
    "cpu_limit",
    "format_cpu_max",
    "parse_cfs",
    "parse_cpu_max",
    "shares_to_weight",
]

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class CpuQuota:
    """``quota_us`` of CPU time per ``period_us`` (None: no quota)."""

    quota_us: int | None
    period_us: int

    def __post_init__(self) -> None:
        if self.period_us <= 0 or (self.quota_us is not None and self.quota_us <= 0):
            raise ValueError(f"a quota and period must be > 0, got {self}")

    @property
    def cores(self) -> float | None:
        """CPUs the quota allows, ``2000/10000 -> 0.2``, or None without a quota."""
        return None if self.quota_us is None else self.quota_us / self.period_us


def parse_cpu_max(text: str) -> CpuQuota:
    """cgroup v2 ``cpu.max``: ``"$MAX $PERIOD"``, ``$MAX`` being ``max`` for none. The period
    may be left out when written; the kernel always prints it, 100000 by default."""
    fields = text.split()
    if not 1 <= len(fields) <= 2:
        raise ValueError(f"cpu.max must be 'QUOTA PERIOD', got {text!r}")
    period_us = int(fields[1]) if len(fields) == 2 else 100_000
    return CpuQuota(None if fields[0] == "max" else int(fields[0]), period_us)


def format_cpu_max(quota: CpuQuota) -> str:
    """What to write to cgroup v2's ``cpu.max`` for ``quota``."""
    return f"{'max' if quota.quota_us is None else quota.quota_us} {quota.period_us}"


def parse_cfs(quota_text: str, period_text: str) -> CpuQuota:
    """cgroup v1's ``cpu.cfs_quota_us`` (-1: none) and ``cpu.cfs_period_us``."""
    quota_us = int(quota_text)
    return CpuQuota(None if quota_us < 0 else quota_us, int(period_text))


def shares_to_weight(shares: int) -> int:
    """v1 ``cpu.shares`` (2..262144, 1024 an ordinary process) as v2 ``cpu.weight``
    (1..10000, 100 an ordinary process), the mapping runc and systemd use."""
    if not 2 <= shares <= 262_144:
        raise ValueError(f"shares must be in [2, 262144], got {shares}")
    return 1 + (shares - 2) * 9999 // 262_142


def cpu_limit() -> int:
    """Cores this process may use: the cgroup v2/v1 CPU quota, else the affinity mask.

    Containers capped with ``cpus: 2`` still see every host core in ``os.cpu_count()``; torch
    would start that many threads and thrash, so the quota wins.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    quota = cgroup_quota()
    if quota is not None:
        cores = min(cores or 1, max(1, int(quota + 0.5)))
    return max(1, cores or 1)


def cgroup_quota(
    proc_cgroup: str | Path = "/proc/self/cgroup", root: str | Path = CGROUP_ROOT
) -> float | None:
    """CPUs allowed by this process's cgroup (v2 ``cpu.max`` or v1 CFS quota), or None.

    The tightest quota from the process's own group up to the root: a limit set on a parent
    (a container's group, a systemd slice) holds for every group below it. ``proc_cgroup`` and
    ``root`` point elsewhere in tests (a fake tree in a temporary directory)."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    root = Path(root)
    found: list[float] = []
    for line in lines:
        try:
            _, controllers, path = line.split(":", 2)
        except ValueError:
            continue
        if controllers == "":  # v2: one unified tree, at the root or (hybrid) under unified/
            bases = [root, root / "unified"]
            names: tuple[str, ...] = ("cpu.max",)
        elif "cpu" in controllers.split(","):  # v1: the cpu controller's own mount
            bases = [root / controllers, root / "cpu", root / "cpu,cpuacct"]
            names = ("cpu.cfs_quota_us", "cpu.cfs_period_us")
        else:
            continue
        for base in bases:
            cores = _tightest(base, path, names)
            if cores is not None:
                found.append(cores)
                break
    return min(found) if found else None


def _tightest(base: Path, path: str, names: tuple[str, ...]) -> float | None:
    """The smallest quota in ``base/path`` and its ancestors up to ``base``, or None."""
    parts = [p for p in path.split("/") if p]
    quotas = []
    for depth in range(len(parts), -1, -1):
        group = base.joinpath(*parts[:depth])
        try:
            texts = [(group / name).read_text() for name in names]
            quota = parse_cpu_max(texts[0]) if len(texts) == 1 else parse_cfs(*texts)
        except (OSError, ValueError):
            continue
        if quota.cores is not None:
            quotas.append(quota.cores)
    return min(quotas) if quotas else None
