"""Tests for bench.cpulimit: a process in a 20 % group gets 20 % of a core, and nothing leaks.

The real tests use whichever cgroup version holds the cpu controller here; cgroup v2's files
are also checked in a fake tree under a temporary directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.cpulimit import (
    CgroupCpu,
    CpuLimit,
    CpuLimitUnavailable,
    cgroup_of,
    cpu_cgroup_mount,
    find_cpu_cgroup,
    parse_cpu_stat,
)

# Busy-loops for ``seconds`` of wall time once told to start, then prints its CPU time.
_BUSY = """
import json, sys, time
sys.stdin.readline()
wall0, cpu0 = time.perf_counter(), time.process_time()
while time.perf_counter() - wall0 < float(sys.argv[1]):
    pass
print(json.dumps({"wall": time.perf_counter() - wall0, "cpu": time.process_time() - cpu0}))
"""


@pytest.fixture
def limit() -> Iterator[CpuLimit]:
    try:
        made = CpuLimit.create(0.2)
    except CpuLimitUnavailable as exc:
        pytest.skip(f"cgroups are not writable here: {exc}")
    yield made
    assert made.remove()


def test_a_limited_process_gets_its_share_of_one_core(limit: CpuLimit) -> None:
    assert limit.quota_us == round(0.2 * limit.period_us)
    proc = subprocess.Popen(
        [sys.executable, "-c", _BUSY, "1.0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        limit.add(proc.pid)
        assert cgroup_of(proc.pid) is not None and cgroup_of(proc.pid).endswith(limit.path.name)
        os.sched_setaffinity(proc.pid, {sorted(os.sched_getaffinity(0))[0]})
        out, _ = proc.communicate("go\n", timeout=20)
    finally:
        proc.kill()
        proc.wait()
    used = json.loads(out)
    share = used["cpu"] / used["wall"]
    # Up to 20 %; less only if other jobs crowd the core, and never near a whole core.
    assert 0.12 < share < 0.24, used
    assert limit.stats()["nr_throttled"] > 0


def test_remove_deletes_the_group(limit: CpuLimit) -> None:
    assert limit.path.is_dir()
    assert limit.remove()
    assert not limit.path.exists()
    assert limit.remove()  # twice is fine


def test_remove_moves_a_process_left_behind_out(limit: CpuLimit) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        limit.add(proc.pid)
        assert limit.remove(timeout_s=0.2)
        assert not limit.path.exists()
        assert not (cgroup_of(proc.pid) or "").endswith(limit.path.name)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("fraction", [0.0, -1.0, 0.01], ids=["zero", "negative", "under-1ms"])
def test_rejects_impossible_fractions(fraction: float) -> None:
    with pytest.raises(ValueError):
        CpuLimit.create(fraction)


def test_finds_a_v1_cpu_mount_in_a_mounts_table(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n"
        "cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,nosuid,cpu,cpuacct 0 0\n"
    )
    assert cpu_cgroup_mount(str(mounts)) == Path("/sys/fs/cgroup/cpu,cpuacct")
    mounts.write_text("cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n")
    assert cpu_cgroup_mount(str(mounts)) is None


def test_a_weight_only_group_has_no_quota() -> None:
    try:
        group = CpuLimit.create(None, shares=4096, suffix="-weight")
    except CpuLimitUnavailable as exc:
        pytest.skip(f"cgroups are not writable here: {exc}")
    try:
        assert group.quota_us == -1
        assert (group.path / "cpu.shares").read_text().strip() == "4096"
        group.add(os.getpid())
        assert (cgroup_of(os.getpid()) or "").endswith(group.path.name)
        group.release(os.getpid())
        assert not (cgroup_of(os.getpid()) or "").endswith(group.path.name)
    finally:
        group.release(os.getpid())
        assert group.remove()


def test_the_real_group_names_its_interface(limit: CpuLimit) -> None:
    found = find_cpu_cgroup()
    assert found is not None and limit.version == found.version
    assert limit.interface.startswith(f"cgroup v{found.version}")


def _fake_v2(tmp_path: Path, controllers: str = "cpu io memory") -> CgroupCpu:
    root = tmp_path / "cgroup"
    (root / "box").mkdir(parents=True)
    (root / "cgroup.controllers").write_text(controllers + "\n")
    (root / "box" / "cgroup.subtree_control").write_text("\n")
    (tmp_path / "mounts").write_text(f"cgroup2 {root} cgroup2 rw,nosuid 0 0\n")
    (tmp_path / "self").write_text("0::/box\n")
    found = find_cpu_cgroup(tmp_path / "mounts", tmp_path / "self")
    assert found == CgroupCpu(2, root, "/box")
    return found


def test_finds_a_v2_cpu_controller(tmp_path: Path) -> None:
    _fake_v2(tmp_path)
    (tmp_path / "cgroup" / "cgroup.controllers").write_text("io memory\n")
    assert find_cpu_cgroup(tmp_path / "mounts", tmp_path / "self") is None


def test_v1_wins_on_a_hybrid_host(tmp_path: Path) -> None:
    _fake_v2(tmp_path)
    mounts = tmp_path / "mounts"
    mounts.write_text(mounts.read_text() + "cgroup /v1/cpu cgroup rw,cpu 0 0\n")
    (tmp_path / "self").write_text("1:cpu:/mine\n0::/box\n")
    assert find_cpu_cgroup(mounts, tmp_path / "self") == CgroupCpu(1, Path("/v1/cpu"), "/mine")


def test_writes_cpu_max_and_weight_in_a_v2_tree(tmp_path: Path) -> None:
    where = _fake_v2(tmp_path)
    limit = CpuLimit.create(0.2, period_us=10_000, shares=8192, cgroup=where)
    assert limit.version == 2 and limit.interface == "cgroup v2 (cpu.max)"
    assert limit.path.parent == tmp_path / "cgroup" / "box"
    assert (limit.path / "cpu.max").read_text() == "2000 10000"
    assert (limit.path / "cpu.weight").read_text() == "313"
    assert (limit.path.parent / "cgroup.subtree_control").read_text() == "+cpu"
    assert limit.quota_us == 2000
    (limit.path / "cpu.stat").write_text("usage_usec 9\nnr_periods 5\nnr_throttled 2\n"
                                         "throttled_usec 40\n")
    assert limit.stats()["throttled_time"] == 40_000
    for name in ("cpu.max", "cpu.weight", "cpu.stat"):  # a real group's files go with it
        (limit.path / name).unlink()
    assert limit.remove()
    assert not limit.path.exists()


def test_a_v2_group_without_a_quota(tmp_path: Path) -> None:
    limit = CpuLimit.create(None, cgroup=_fake_v2(tmp_path), suffix="-service")
    assert (limit.path / "cpu.max").read_text() == "max 10000"
    assert limit.quota_us == -1


def test_cpu_stat_reads_alike_on_v1_and_v2() -> None:
    v1 = parse_cpu_stat("nr_periods 10\nnr_throttled 3\nthrottled_time 7000\n")
    v2 = parse_cpu_stat("nr_periods 10\nnr_throttled 3\nthrottled_usec 7\n")
    assert v1["throttled_time"] == v2["throttled_time"] == 7000


def test_a_v2_group_that_cannot_hand_down_cpu_falls_back_to_the_root(tmp_path: Path) -> None:
    where = _fake_v2(tmp_path)
    control = tmp_path / "cgroup" / "box" / "cgroup.subtree_control"
    control.unlink()
    control.mkdir()  # writing it fails, as the kernel's EBUSY would
    (tmp_path / "cgroup" / "cgroup.subtree_control").write_text("\n")
    limit = CpuLimit.create(0.5, cgroup=where)
    assert limit.path.parent == tmp_path / "cgroup"
    assert (limit.path / "cpu.max").read_text() == "5000 10000"
