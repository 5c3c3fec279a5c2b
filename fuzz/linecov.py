"""`python3 -m fuzz.linecov <target> [DIR...]`: which lines of the parser a corpus reaches.

Replays every input of the repo corpus (and of each DIR) through the target's check and prints
the parser module's executed / executable lines and the lines never reached, with the standard
library's tracing hook, so the figure needs nothing beyond the fuzz dependencies.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import types
from pathlib import Path
from typing import Any

from fuzz.targets import TARGETS

ROOT = Path(__file__).resolve().parent.parent


def _executable(code: types.CodeType) -> set[int]:
    """Lines of the functions in `code`: module and class bodies run at import, so they say
    nothing about the inputs; a function's own first line is its `def` (or decorator)."""
    lines: set[int] = set()
    if code.co_flags & inspect.CO_NEWLOCALS:
        lines = {line for _, _, line in code.co_lines() if line is not None}
        lines.discard(code.co_firstlineno)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            lines |= _executable(const)
    return lines


def main() -> None:
    target, dirs = sys.argv[1], [ROOT / "fuzz" / "corpus" / sys.argv[1], *map(Path, sys.argv[2:])]
    module = importlib.import_module(TARGETS[target])
    check = importlib.import_module(f"fuzz.targets.{target}").check
    path = str(Path(module.__file__ or "").resolve())
    source = Path(path).read_text()
    executable = _executable(compile(source, path, "exec"))
    hit: set[int] = set()

    def tracer(frame: types.FrameType, event: str, arg: Any) -> Any:
        if frame.f_code.co_filename != path:
            return None
        if event == "line":
            hit.add(frame.f_lineno)
        return tracer

    inputs = [f for d in dirs for f in sorted(d.iterdir()) if f.is_file()]
    sys.settrace(tracer)
    try:
        for f in inputs:
            check(f.read_bytes())
    finally:
        sys.settrace(None)
    missed = sorted(executable - hit)
    print(f"target={target} inputs={len(inputs)} module={TARGETS[target]} "
          f"lines={len(executable & hit)}/{len(executable)} missed={missed}")


if __name__ == "__main__":
    main()
