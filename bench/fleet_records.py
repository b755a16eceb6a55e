"""Every measured run's records, kept beside ``fleet.json``, so the simulation's inputs
(``bench.fleet_sim_served.run_summary``) can be classed again without measuring again.

    save(out / RECORDS_NAME, runs)          # [(row, spec, FleetRun), ...] of one fleet run
    for saved in load(out / RECORDS_NAME):  # SavedRun: the row's key, spec, windows, records
        ...

One JSON object per line (gzip): the run's key (engine, replicas, policy, devices), its
``RunSpec`` and windows, and its ``Record``s as lists in ``Record``'s field order.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.fleet_device import Record
from bench.fleet_run import FleetRun, RunSpec

__all__ = ["RECORDS_NAME", "SavedRun", "load", "save"]

RECORDS_NAME = "fleet-records.jsonl.gz"
_FIELDS = tuple(f.name for f in dataclasses.fields(Record))


@dataclass(frozen=True)
class SavedRun:
    """One run as saved: ``key`` holds engine, replicas, policy and devices as in its row."""

    key: Mapping[str, Any]
    spec: RunSpec
    windows: tuple[tuple[float, float], ...]
    records: tuple[Record, ...]


def save(path: Path, runs: Iterable[tuple[Mapping[str, Any], RunSpec, FleetRun]]) -> Path:
    """Write ``runs`` (each a fleet.json row, its spec and what it measured) to ``path``."""
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for row, spec, result in runs:
            key = {k: row[k] for k in ("engine", "replicas", "policy", "devices")}
            line = {"key": key, "spec": dataclasses.asdict(spec),
                    "windows": [list(w) for w in result.windows], "fields": _FIELDS,
                    "records": [[getattr(r, name) for name in _FIELDS]
                                for r in result.records]}
            f.write(json.dumps(line, separators=(",", ":")) + "\n")
    return path


def load(path: Path) -> Iterator[SavedRun]:
    """The runs ``save`` wrote, in order."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for text in f:
            line = json.loads(text)
            spec = line["spec"]
            spec["link_mix"] = tuple(spec["link_mix"])
            fields = line["fields"]
            yield SavedRun(line["key"], RunSpec(**spec),
                           tuple((float(a), float(b)) for a, b in line["windows"]),
                           tuple(Record(**dict(zip(fields, values, strict=True)))
                                 for values in line["records"]))


class _Heads:
    """``head_ms(candidate)`` from a fleet.json's ``inputs.head_ms`` (what ``run_summary``
    reads of the run's ``FleetInputs``)."""

    def __init__(self, head_ms: Mapping[str, float]) -> None:
        self._head_ms = dict(head_ms)

    def head_ms(self, candidate: str) -> float:
        return float(self._head_ms[candidate])


def resummarized(doc: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """``doc`` (a fleet.json) with each run's ``served`` summarised again from the records
    saved at ``path``, by ``bench.fleet_sim_served.run_summary`` as it classes them now."""
    from bench.fleet_sim_served import run_summary

    heads = _Heads(doc["inputs"]["head_ms"])
    by_key = {_key(s.key): s for s in load(path)}
    runs = []
    for row in doc.get("runs", []):
        saved = by_key.get(_key(row))
        if saved is not None:
            row = {**row, "served": run_summary(saved.records, saved.spec, heads,
                                                windows=saved.windows)}
        runs.append(row)
    return {**doc, "runs": runs}


def _key(row: Mapping[str, Any]) -> tuple[str, int, str, int]:
    return (str(row["engine"]), int(row["replicas"]), str(row["policy"]), int(row["devices"]))
