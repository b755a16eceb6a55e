"""How many CPUs this process may use: its cgroup's quota, else its affinity mask.

Both sides size torch's thread pool with it, and the device keys its profile on it: a container
capped at ``cpus: 2`` (or a board emulated at 20% of a core) still sees every host core in
``os.cpu_count()``, and torch would start that many spinning threads and thrash.
"""

from __future__ import annotations

import os

__all__ = ["cgroup_quota", "cpu_limit"]


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


def cgroup_quota() -> float | None:
    """CPUs allowed by this process's own cgroup (v2 ``cpu.max`` or v1 CFS quota), or None."""
    try:
        with open("/proc/self/cgroup") as f:
            entries = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        return None
    for _, controllers, path in entries:
        rel = path.lstrip("/")
        try:
            if controllers == "":  # cgroup v2: "0::/path", quota as "max 100000" or "50000 100000"
                for root in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
                    cpu_max = os.path.join(root, rel, "cpu.max")
                    if os.path.exists(cpu_max):
                        with open(cpu_max) as f:
                            quota, period = f.read().split()[:2]
                        return None if quota == "max" else int(quota) / int(period)
            elif "cpu" in controllers.split(","):  # cgroup v1: cfs_quota_us is -1 when unlimited
                base = os.path.join("/sys/fs/cgroup", controllers, rel)
                if not os.path.isdir(base):
                    base = os.path.join("/sys/fs/cgroup/cpu", rel)
                with open(os.path.join(base, "cpu.cfs_quota_us")) as fq, \
                        open(os.path.join(base, "cpu.cfs_period_us")) as fp:
                    q, p = int(fq.read()), int(fp.read())
                return None if q <= 0 else q / p
        except (OSError, ValueError):
            continue
    return None
