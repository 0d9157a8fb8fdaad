"""``rawpunch lab up|down|run|shell``: persistent labs for interactive research (see persist.py).

``up`` builds a two-NAT lab (``two_nats``, the demo's profiles by default) that keeps running after the
command returns; ``run`` and ``shell`` work inside its nodes; ``down`` removes it. Wired into ``rawpunch lab``
by cli.py through ``add_up_parsers`` and ``run_up_command``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rawpunch.lab.labspec import LabSpec, format_lab
from rawpunch.lab.nsproc import NeedsRootError
from rawpunch.lab.topology import DEFAULT_HOPS, DEFAULT_PROFILE

COMMANDS = ("up", "down", "run", "shell")
EXIT_FAILED, EXIT_USAGE, EXIT_NOT_ROOT = 1, 2, 3


def add_up_parsers(sub: Any) -> None:
    _add_up(sub)
    down = sub.add_parser(
        "down",
        help="stop a lab started by `lab up` and remove it (needs root)",
        description="Stop the lab's supervisor and wait until its namespaces, processes and record are gone.",
    )
    which = down.add_mutually_exclusive_group(required=True)
    which.add_argument("name", nargs="?", metavar="NAME", help="the lab's name")
    which.add_argument("--all", dest="all_labs", action="store_true", help="every lab started by `lab up`")
    run = sub.add_parser(
        "run",
        help="run a command in a node of a running lab (needs root)",
        description="Run CMD in NODE's network namespace; its exit status is passed through. "
        "Example: rawpunch lab run demo a -- ip -br addr",
    )
    run.add_argument("name", metavar="NAME", help="the lab's name")
    run.add_argument("node", metavar="NODE", help="a node: a, nat-a, r1, ..., server")
    run.add_argument(
        "command", nargs=argparse.REMAINDER, metavar="-- CMD ...", help="the command and its args"
    )
    shell = sub.add_parser(
        "shell",
        help="an interactive shell in a node of a running lab (needs root)",
        description="An interactive shell in NODE's network namespace; the prompt says [lab NAME:NODE].",
    )
    shell.add_argument("name", metavar="NAME", help="the lab's name")
    shell.add_argument("node", metavar="NODE", help="a node: a, nat-a, r1, ..., server")


def _add_up(sub: Any) -> None:
    up = sub.add_parser(
        "up",
        help="build a two-NAT lab that keeps running until `lab down` (needs root)",
        description="Build a two-NAT lab (a -- nat-a -- core routers -- nat-b -- b, server in the core) "
        "owned by a background supervisor, and print its nodes and addresses. Impairment applies to "
        "what the middle core router forwards.",
    )
    up.add_argument("--name", help="lab name: 1-12 lowercase letters and digits (default: lab1, lab2, ...)")
    up.add_argument("--nat-a", default=DEFAULT_PROFILE, metavar="PROFILE", help=f"default {DEFAULT_PROFILE}")
    up.add_argument("--nat-b", default=DEFAULT_PROFILE, metavar="PROFILE", help=f"default {DEFAULT_PROFILE}")
    up.add_argument("--hops", type=int, default=DEFAULT_HOPS, help=f"core routers (default {DEFAULT_HOPS})")
    up.add_argument("--delay", type=float, default=0.0, metavar="MS", help="added one-way delay per packet")
    up.add_argument("--jitter", type=float, default=0.0, metavar="MS", help="the delay varies by +- this")
    up.add_argument(
        "--loss", type=float, default=0.0, metavar="PCT", help="share of packets dropped, percent"
    )
    up.add_argument("--server", action="store_true", help="run `rawpunch server` on 203.0.113.10:3478")
    up.add_argument("--json", action="store_true", help="print the lab's description as JSON")


def spec_from_args(args: argparse.Namespace, taken: set[str]) -> LabSpec:
    """The LabSpec of ``lab up``'s arguments (ValueError says which option is wrong)."""
    name = args.name if args.name is not None else default_name(taken)
    return LabSpec(
        name=name,
        nat_a=args.nat_a,
        nat_b=args.nat_b,
        hops=args.hops,
        delay_ms=args.delay,
        jitter_ms=args.jitter,
        loss_pct=args.loss,
        server=args.server,
    )


def default_name(taken: set[str]) -> str:
    return next(f"lab{i}" for i in range(1, len(taken) + 2) if f"lab{i}" not in taken)


def node_command(remainder: list[str]) -> list[str]:
    """The command of ``lab run NAME NODE [--] CMD ...`` (argparse leaves the ``--`` in some positions)."""
    return remainder[1:] if remainder[:1] == ["--"] else remainder


def run_up_command(args: argparse.Namespace) -> int:
    from rawpunch.lab import persist  # noqa: PLC0415 - pulls in pyroute2: only when needed

    command = args.lab_command
    try:
        if command == "up":
            return _up(args)
        if command == "down":
            if args.all_labs:
                return _down_all()
            print(persist.stop(args.name))
            return 0
        if command == "run":
            argv = node_command(args.command)
            if not argv:
                print(
                    "rawpunch lab run: give the command after the node: lab run NAME NODE -- CMD",
                    file=sys.stderr,
                )
                return EXIT_USAGE
            persist.exec_in_node(args.name, args.node, argv)  # replaces this process
        persist.exec_shell(args.name, args.node)  # "shell"; replaces this process
    except NeedsRootError as e:
        print(e, file=sys.stderr)
        return EXIT_NOT_ROOT
    except persist.LabError as e:
        print(f"rawpunch lab {command}: {e}", file=sys.stderr)
        return EXIT_FAILED


def _down_all() -> int:
    """Every lab, each on its own: one that cannot be stopped does not keep the others up."""
    from rawpunch.lab import persist  # noqa: PLC0415

    failed = 0
    for record in persist.running_labs():
        try:
            print(persist.stop(record.run_id))
        except persist.LabError as e:
            print(f"rawpunch lab down: {e}", file=sys.stderr)
            failed += 1
    return EXIT_FAILED if failed else 0


def _up(args: argparse.Namespace) -> int:
    from rawpunch.lab import persist  # noqa: PLC0415

    taken = {r.run_id for r in persist.running_labs()}
    try:
        spec = spec_from_args(args, taken)
    except ValueError as e:
        print(f"rawpunch lab up: {e}", file=sys.stderr)
        return EXIT_USAGE
    info = persist.start(spec)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(format_lab(info, "up"))
        print(f"  work in it: rawpunch lab shell {spec.name} a | rawpunch lab run {spec.name} NODE -- CMD")
        print(f"  remove it:  rawpunch lab down {spec.name}")
    return 0
