"""Remove what dead lab runs left behind: namespaces (and the processes in them) and registry records.

A run is dead when its owner process is gone: the pid no longer exists or now belongs to another process
(the start time differs). An ``rp-`` namespace that no record of a live run claims is a leftover too. Live
runs are left alone unless ``all_runs`` is set, so the cleaner is safe to call while other labs (another
test worker) are running.

Ordering matters against a lab being built concurrently: a lab writes its record before creating namespaces,
so the namespaces are listed *first* and the records read *second*; any namespace seen then already has its
record.
"""

from __future__ import annotations

import logging

from rawpunch.lab.nsproc import kill_netns_processes, list_netns, remove_netns, require_root
from rawpunch.lab.registry import read_records, remove_record

log = logging.getLogger(__name__)


def clean_labs(all_runs: bool = False) -> list[str]:
    """Remove dead runs' namespaces and records (every lab's with *all_runs*); return what was removed.

    The result lists namespace names and registry file paths, in that order.
    """
    require_root("rawpunch lab clean")
    namespaces = list_netns()  # first: see the module docstring
    records, broken = read_records()
    live = [] if all_runs else [r for r in records if r.owner_alive()]
    protected = {ns for r in live for ns in r.namespaces}
    dead = [r for r in records if r not in live]

    doomed = [ns for ns in namespaces if ns not in protected]
    kill_netns_processes(doomed)
    removed: list[str] = [ns for ns in doomed if remove_netns(ns)]
    for record in dead:
        path = str(record.path)
        if remove_record(record.run_id):
            removed.append(path)
    for bad in broken:
        log.warning("removing unreadable lab record %s", bad)
        bad.unlink(missing_ok=True)
        removed.append(str(bad))
    return removed
