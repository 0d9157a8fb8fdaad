"""``rawpunch lab ...``: list the NAT profiles, self-test them, clean up after dead lab runs.

``up``, ``down``, ``run`` and ``shell`` (persistent labs) live in upcli.py.

The main CLI wires this in with ``add_lab_parser(subparsers)``; the parser sets ``func=run_lab``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any

from rawpunch.lab.matrix_run import add_matrix_parser, run_matrix_command
from rawpunch.lab.nsproc import NeedsRootError
from rawpunch.lab.profiles import PROFILES
from rawpunch.lab.router import add_router_parser, run_router_command
from rawpunch.lab.upcli import COMMANDS as UP_COMMANDS
from rawpunch.lab.upcli import add_up_parsers, run_up_command


def add_lab_parser(subparsers: Any) -> None:
    """Add ``lab`` (``clean [--all]``, ``list [--json]``, ``selftest``) to an argparse subparsers object."""
    lab = subparsers.add_parser(
        "lab",
        help="network-namespace NAT lab",
        description="Network-namespace NAT lab: profiles, their self-test, persistent labs to work in "
        "(up, run, shell, down), the NAT x NAT matrix, clean-up, and `router`, the command of every "
        "docker-compose container (lab/compose/).",
    )
    lab.set_defaults(func=run_lab)
    sub = lab.add_subparsers(
        dest="lab_command", required=True, metavar="{up,down,run,shell,list,clean,selftest,matrix,router}"
    )
    clean = sub.add_parser(
        "clean",
        help="remove namespaces and records of lab runs whose owner died (needs root)",
        description="Remove the namespaces (killing the processes inside) and registry records of lab runs "
        "whose owner process is gone, and rp- namespaces no live run claims.",
    )
    clean.add_argument("--all", dest="all_runs", action="store_true", help="remove every lab, live ones too")
    listing = sub.add_parser(
        "list",
        help="list the NAT profiles and their ground truth",
        description="Every NAT profile with its ground truth (RFC 4787/5382 terms: mapping, filtering, "
        "allocation, unsolicited_syn; flags hairpin, nat, port_overloading) and how the lab builds it.",
    )
    listing.add_argument("--json", action="store_true", help="print a JSON list")
    listing.add_argument("--running", action="store_true", help="list the labs started by `lab up` instead")
    selftest = sub.add_parser(
        "selftest",
        help="check that lab NATs behave as their profiles claim (needs root)",
        description="Build a throwaway lab per profile (a behind the profile's NAT, two probe hosts in the "
        "core) and measure mapping, filtering, allocation, the reaction to an unsolicited SYN and "
        "hairpinning. Exit status 1 if any profile disagrees with its ground truth.",
    )
    selftest.add_argument("profiles", nargs="*", metavar="PROFILE", help="profiles to test (default: all)")
    selftest.add_argument("--json", action="store_true", help="print one JSON object per profile")
    selftest.add_argument(
        "--record", metavar="DIR", help="keep pcaps, conntrack events and the environment in DIR/<profile>/"
    )
    add_matrix_parser(sub)
    add_up_parsers(sub)
    add_router_parser(sub)


def run_lab(args: argparse.Namespace) -> int:
    if args.lab_command == "list":
        running = getattr(args, "running", False)  # namespaces built by hand (tests) may lack it
        return _list_running(json_output=args.json) if running else _list(json_output=args.json)
    if args.lab_command in UP_COMMANDS:
        return run_up_command(args)
    if args.lab_command == "clean":
        return _clean(all_runs=args.all_runs)
    if args.lab_command == "router":
        return run_router_command(args)
    if args.lab_command == "matrix":
        return run_matrix_command(args)
    if args.lab_command == "selftest":
        return _selftest(args.profiles or list(PROFILES), json_output=args.json, record=args.record)
    print(f"rawpunch lab: unknown command {args.lab_command!r}", file=sys.stderr)
    return 2


def _list(json_output: bool) -> int:
    profiles = [p.ground_truth() for p in PROFILES.values()]
    if json_output:
        print(json.dumps(profiles, indent=2))
        return 0
    columns = ("name", "mapping", "filtering", "allocation", "unsolicited_syn", "hairpin", "nat", "backend")
    cells = [
        {c: str(p[c]).lower() if isinstance(p[c], bool) else str(p[c]) for c in columns} for p in profiles
    ]
    widths = {c: max(len(c), *(len(row[c]) for row in cells)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns).rstrip())
    for p, row in zip(profiles, cells, strict=True):
        print("  ".join(row[c].ljust(widths[c]) for c in columns).rstrip())
        layers = f" (layers: {' behind '.join(reversed(p['layers']))})" if p["layers"] else ""
        print(f"    {p['description']}{layers}")
    return 0


def _list_running(json_output: bool) -> int:
    from rawpunch.lab.labspec import format_lab  # noqa: PLC0415
    from rawpunch.lab.persist import running_labs, supervisor_state  # noqa: PLC0415

    labs = running_labs()
    if json_output:
        print(json.dumps([{**r.info, "supervisor_pid": r.owner_pid, "alive": r.owner_alive()} for r in labs]))
        return 0
    for record in labs:
        print(format_lab(record.info, supervisor_state(record)))
    if not labs:
        print("no labs running (`rawpunch lab up` starts one)")
    return 0


def _clean(all_runs: bool) -> int:
    from rawpunch.lab.clean import clean_labs  # noqa: PLC0415 - pulls in pyroute2: only when needed

    try:
        if all_runs:  # a `lab up` supervisor whose lab vanished would sleep for ever: stop it properly first
            from rawpunch.lab.persist import LabError, running_labs, stop  # noqa: PLC0415

            for record in running_labs():
                with contextlib.suppress(LabError):
                    print(stop(record.run_id))
        removed = clean_labs(all_runs=all_runs)
    except NeedsRootError as e:
        print(e, file=sys.stderr)
        return 1
    for item in removed:
        print(item)
    return 0


def _selftest(names: list[str], json_output: bool, record: str | None) -> int:
    # Pulls in pyroute2 and the lab builder: only when needed.
    from pathlib import Path  # noqa: PLC0415

    from rawpunch.lab.netns import Lab  # noqa: PLC0415
    from rawpunch.lab.observe import Recorder  # noqa: PLC0415
    from rawpunch.lab.selftest import run_selftest  # noqa: PLC0415
    from rawpunch.lab.topology import two_nats  # noqa: PLC0415

    unknown = [n for n in names if n not in PROFILES]
    if unknown:
        print(
            f"rawpunch lab selftest: unknown profiles {unknown}; known: {', '.join(PROFILES)}",
            file=sys.stderr,
        )
        return 2
    failed = 0
    for name in names:
        try:
            with Lab(two_nats(hops=1, profile_a=name, probes=True)) as lab:
                if record is None:
                    result = run_selftest(lab, host="a")
                else:
                    with Recorder(lab, Path(record) / name, nats=lab.topology.nat_chain("a")) as recorder:
                        result = run_selftest(lab, host="a")
                        recorder.save("selftest", result.as_dict())
        except NeedsRootError as e:
            print(e, file=sys.stderr)
            return 1
        failed += not result.ok
        print(json.dumps(result.as_dict()) if json_output else result, flush=True)
    return 1 if failed else 0
