"""Run registry: one small JSON file per live lab under /run/rawpunch/labs/<run id>.json.

A lab writes its record *before* it creates any namespace and removes it *after* the last namespace is gone,
so at any instant every ``rp-`` namespace of a live run is covered by a record. The record names the owner
process by pid and start time (pids are reused; the pair is not), which lets a cleaner tell a run whose
owner was SIGKILLed from one that is still running. A zombie owner counts as dead: it can no longer clean
up, and where nothing reaps orphans (a container's init that does not wait) it would otherwise look alive
for ever. /run is a tmpfs: after a reboot there are neither namespaces nor records.

``info`` is free-form data the owner may add once the lab is up (``rawpunch lab up`` stores the spec, the
nodes' addresses and the rendezvous server there), so a record removed by the cleaner takes it along.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rawpunch.lab.nsproc import RUN_DIR, proc_start_time, process_alive

REGISTRY_DIR = RUN_DIR / "labs"


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    owner_pid: int
    owner_start_time: int
    namespaces: tuple[str, ...]
    created: float
    info: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def path(self) -> Path:
        return record_path(self.run_id)

    def owner_alive(self) -> bool:
        """True while the process that built the lab still runs (same pid *and* start time, not a zombie)."""
        return process_alive(self.owner_pid, self.owner_start_time)


def record_path(run_id: str) -> Path:
    return REGISTRY_DIR / f"{run_id}.json"


def new_record(run_id: str, namespaces: tuple[str, ...]) -> RunRecord:
    """A record naming this process as the owner."""
    pid = os.getpid()
    start = proc_start_time(pid)
    if start is None:  # pragma: no cover - /proc/self always exists on Linux
        raise RuntimeError("cannot read /proc/self/stat")
    return RunRecord(run_id, pid, start, namespaces, time.time())


def write_record(record: RunRecord) -> None:
    """Write atomically (temp file + rename): a cleaner never reads half a record."""
    REGISTRY_DIR.mkdir(parents=True, exist_ok=True)
    tmp = REGISTRY_DIR / f".{record.run_id}.json.tmp"
    tmp.write_text(json.dumps(asdict(record), indent=2) + "\n")
    os.replace(tmp, record.path)


def remove_record(run_id: str) -> bool:
    try:
        record_path(run_id).unlink()
    except FileNotFoundError:
        return False
    return True


def read_records() -> tuple[list[RunRecord], list[Path]]:
    """(records, unreadable files). Dot files are temporaries of a write in progress and are skipped."""
    records: list[RunRecord] = []
    broken: list[Path] = []
    with contextlib.suppress(FileNotFoundError):
        for path in sorted(REGISTRY_DIR.glob("*.json")):
            try:
                data = json.loads(path.read_text())
                records.append(
                    RunRecord(
                        run_id=str(data["run_id"]),
                        owner_pid=int(data["owner_pid"]),
                        owner_start_time=int(data["owner_start_time"]),
                        namespaces=tuple(str(n) for n in data["namespaces"]),
                        created=float(data["created"]),
                        info=dict(data.get("info") or {}),
                    )
                )
            except FileNotFoundError:
                continue  # removed by its owner while we listed
            except (ValueError, KeyError, TypeError):
                broken.append(path)
    return records, broken


def read_record(run_id: str) -> RunRecord | None:
    """The record of *run_id*, or None if there is none (or it cannot be read)."""
    records, _ = read_records()
    return next((r for r in records if r.run_id == run_id), None)
