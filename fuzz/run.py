"""The fuzzing process itself: `python3 -m fuzz.run <target> <libFuzzer argv...>`.

Started by `python3 -m fuzz`, which owns the directories; libFuzzer ends this process with
exit() when the budget runs out or an input fails, so nothing here runs after `atheris.Fuzz()`.
"""

from __future__ import annotations

import importlib
import os
import shlex
import sys
from collections.abc import Callable

import atheris

from fuzz.targets import TARGETS

# The test of the smoke test: with this set to a target's name, that target fails on any input.
BREAK_ENV = "ORAMA_FUZZ_BREAK"


def load(target: str) -> Callable[[bytes], None]:
    # Only the parser under test is instrumented: coverage of the harness and of the standard
    # library would dilute the signal and slow every execution.
    with atheris.instrument_imports(include=[TARGETS[target]]):
        importlib.import_module(TARGETS[target])
    check: Callable[[bytes], None] = importlib.import_module(f"fuzz.targets.{target}").check
    if os.environ.get(BREAK_ENV) == target:

        def broken(data: bytes) -> None:
            raise RuntimeError(f"{BREAK_ENV}={target}: deliberately broken harness")

        return broken
    return check


def main() -> None:
    target, flags = sys.argv[1], sys.argv[2:]
    # libFuzzer's merge (and -fork/-jobs) re-runs argv[0] through the shell with its own flags:
    # give it the command line that starts this module again (the parent sets the directory).
    argv0 = f"{shlex.quote(sys.executable)} -m fuzz.run {target}"
    atheris.Setup([argv0, *flags], load(target))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
