"""``bench.fleet_records``: a fleet run's records saved beside fleet.json and summarised again
for the simulation. No network."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from bench import fleet_records
from bench.fleet_device import Record
from bench.fleet_run import FleetRun, RunSpec
from bench.fleet_sim_served import run_summary

SPLIT = "_blocks.9"


def _record(device: int, photo_s: float) -> Record:
    return Record(device, "lan", photo_s, photo_s, photo_s + 0.06, SPLIT, "ok", served=True,
                  batch_size=1, decode_ms=1.0, queue_ms=0.1, compute_ms=5.0,
                  round_trip_ms=20.0, request_bytes=1000, sent_s=photo_s + 0.04)


def test_saved_runs_load_as_they_were_and_summarise_again(tmp_path: Path) -> None:
    spec = RunSpec(policy=SPLIT, devices=2, link_mix=("lan",), period_s=0.5, warmup_s=0.0,
                   duration_s=2.0, timeout_s=10.0, rounds=2)
    run = FleetRun([_record(0, 0.1 * k) for k in range(10)], 1.0, "metrics", 5.0,
                   windows=((0.0, 1.0), (2.0, 3.0)))
    row = {"engine": "uvicorn", "replicas": 1, "policy": SPLIT, "devices": 2, "served": {}}
    path = fleet_records.save(tmp_path / fleet_records.RECORDS_NAME, [(row, spec, run)])
    (saved,) = fleet_records.load(path)
    assert saved.spec == spec and saved.windows == run.windows
    assert list(saved.records) == run.records
    doc = {"inputs": {"head_ms": {SPLIT: 40.0}}, "runs": [row, {**row, "devices": 8}]}
    again = fleet_records.resummarized(doc, path)
    heads = SimpleNamespace(head_ms={SPLIT: 40.0}.__getitem__)
    assert again["runs"][0]["served"] == run_summary(run.records, spec, heads,
                                                     windows=run.windows)
    assert again["runs"][1]["served"] == {}  # no records saved for it: left as it was
    assert doc["runs"][0]["served"] == {}  # the document itself is untouched
