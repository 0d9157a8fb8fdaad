"""``rawpunch lab ...``: list the NAT profiles, clean up after dead lab runs.

The main CLI wires this in with ``add_lab_parser(subparsers)``; the parser sets ``func=run_lab``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rawpunch.lab.nsproc import NeedsRootError
from rawpunch.lab.profiles import PROFILES


def add_lab_parser(subparsers: Any) -> None:
    """Add ``lab`` (with ``clean [--all]`` and ``list [--json]``) to an argparse subparsers object."""
    lab = subparsers.add_parser(
        "lab",
        help="network-namespace NAT lab",
        description="Network-namespace NAT lab: profiles and clean-up.",
    )
    lab.set_defaults(func=run_lab)
    sub = lab.add_subparsers(dest="lab_command", required=True, metavar="{clean,list}")
    clean = sub.add_parser(
        "clean",
        help="remove namespaces and records of lab runs whose owner died (needs root)",
        description="Remove the namespaces (killing the processes inside) and registry records of lab runs "
        "whose owner process is gone, and rp- namespaces no live run claims.",
    )
    clean.add_argument("--all", dest="all_runs", action="store_true", help="remove every lab, live ones too")
    listing = sub.add_parser("list", help="list the NAT profiles and their ground truth")
    listing.add_argument("--json", action="store_true", help="print a JSON list")


def run_lab(args: argparse.Namespace) -> int:
    if args.lab_command == "list":
        return _list(json_output=args.json)
    if args.lab_command == "clean":
        return _clean(all_runs=args.all_runs)
    print(f"rawpunch lab: unknown command {args.lab_command!r}", file=sys.stderr)
    return 2


def _list(json_output: bool) -> int:
    profiles = [p.ground_truth() for p in PROFILES.values()]
    if json_output:
        print(json.dumps(profiles, indent=2))
        return 0
    columns = ("name", "mapping", "filtering", "allocation", "unsolicited_syn")
    widths = {c: max(len(c), *(len(p[c]) for p in profiles)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for p in profiles:
        print("  ".join(p[c].ljust(widths[c]) for c in columns).rstrip())
        print(f"    {p['description']}")
    return 0


def _clean(all_runs: bool) -> int:
    from rawpunch.lab.clean import clean_labs  # noqa: PLC0415 - pulls in pyroute2: only when needed

    try:
        removed = clean_labs(all_runs=all_runs)
    except NeedsRootError as e:
        print(e, file=sys.stderr)
        return 1
    for item in removed:
        print(item)
    return 0
