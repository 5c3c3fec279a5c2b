"""`orama-stealth`: the operator's command for probes, credentials and the lab node.

Each area registers its own subcommands, so this file stays a table of contents.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from orama_stealth import __version__
from orama_stealth.lab import cli as lab_cli
from orama_stealth.probe import cli as probe_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orama-stealth",
        description="Probes, TURN credentials and the lab node for the :443 stealth path.",
    )
    parser.add_argument("--version", action="version", version=f"orama-stealth {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    probe_cli.register(sub)
    lab_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = args.handler
    code: int = handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
