"""Command line: `rawpunch server|peer|lab|cleanup`."""

from __future__ import annotations

import argparse
import sys

from rawpunch import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rawpunch", description=__doc__)
    parser.add_argument("--version", action="version", version=f"rawpunch {__version__}")
    parser.add_subparsers(dest="command", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    del args
    return 0


if __name__ == "__main__":
    sys.exit(main())
