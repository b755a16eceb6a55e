"""Tests for shared.cpu: cgroup v1 and v2 quota files, parsed and read from a fake tree."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.cpu import (
    CpuQuota,
    cgroup_quota,
    cpu_limit,
    format_cpu_max,
    parse_cfs,
    parse_cpu_max,
    shares_to_weight,
)


@pytest.mark.parametrize(
    ("text", "quota"),
    [
        ("20000 100000\n", CpuQuota(20000, 100000)),
        ("max 100000\n", CpuQuota(None, 100000)),
        ("2000 10000", CpuQuota(2000, 10000)),
        ("50000", CpuQuota(50000, 100000)),
    ],
)
def test_parse_cpu_max(text: str, quota: CpuQuota) -> None:
    assert parse_cpu_max(text) == quota


@pytest.mark.parametrize("text", ["", "1 2 3", "lots 100000", "0 100000", "100 -5"])
def test_parse_cpu_max_refuses_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        parse_cpu_max(text)


@pytest.mark.parametrize("quota", [CpuQuota(2000, 10000), CpuQuota(None, 100000)])
def test_format_cpu_max_round_trips(quota: CpuQuota) -> None:
    assert parse_cpu_max(format_cpu_max(quota)) == quota


def test_parse_cfs() -> None:
    assert parse_cfs("-1\n", "100000\n") == CpuQuota(None, 100000)
    assert parse_cfs("2000\n", "10000\n").cores == 0.2


def test_shares_map_onto_weights() -> None:
    assert shares_to_weight(2) == 1
    assert shares_to_weight(262_144) == 10_000
    assert shares_to_weight(1024) == 39  # what runc writes for the default weight
    with pytest.raises(ValueError):
        shares_to_weight(1)


def _tree(tmp_path: Path, own: str, files: dict[str, str], v1: bool = False) -> Path:
    (tmp_path / "self").write_text(f"1:cpu,cpuacct:{own}\n0::/\n" if v1 else f"0::{own}\n")
    for rel, text in files.items():
        path = tmp_path / "fs" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path / "fs"


def test_reads_a_v2_quota(tmp_path: Path) -> None:
    root = _tree(tmp_path, "/box", {"box/cpu.max": "150000 100000\n"})
    assert cgroup_quota(tmp_path / "self", root) == 1.5


def test_a_v2_parents_quota_holds_below_it(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        "/slice/box",
        {"slice/cpu.max": "50000 100000\n", "slice/box/cpu.max": "max 100000\n"},
    )
    assert cgroup_quota(tmp_path / "self", root) == 0.5


def test_no_v2_quota_is_none(tmp_path: Path) -> None:
    root = _tree(tmp_path, "/box", {"box/cpu.max": "max 100000\n"})
    assert cgroup_quota(tmp_path / "self", root) is None


def test_reads_a_hybrid_hosts_v2_tree(tmp_path: Path) -> None:
    root = _tree(tmp_path, "/box", {"unified/box/cpu.max": "20000 10000\n"})
    assert cgroup_quota(tmp_path / "self", root) == 2.0


def test_reads_a_v1_quota(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        "/box",
        {
            "cpu,cpuacct/box/cpu.cfs_quota_us": "20000\n",
            "cpu,cpuacct/box/cpu.cfs_period_us": "10000\n",
        },
        v1=True,
    )
    assert cgroup_quota(tmp_path / "self", root) == 2.0


def test_nothing_readable_is_none(tmp_path: Path) -> None:
    assert cgroup_quota(tmp_path / "missing", tmp_path) is None


def test_cpu_limit_is_at_least_one() -> None:
    assert cpu_limit() >= 1
