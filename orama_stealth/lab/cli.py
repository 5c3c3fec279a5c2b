"""Subcommands of `orama-stealth` for this area."""

from __future__ import annotations

import argparse
from typing import Any

Subparsers = "argparse._SubParsersAction[argparse.ArgumentParser]"


def register(sub: Any) -> None:
    """Add this area's subcommands; each sets `handler=callable(args) -> int`."""
    del sub
