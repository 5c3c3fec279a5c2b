"""`python3 -m bench.show RESULT.json`: print the tables of a stored result again."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.report import render


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python3 -m bench.show bench/results/<time>.json", file=sys.stderr)
        return 2
    path = Path(argv[0])
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        print(f"{path}: cannot read a bench result: {e}", file=sys.stderr)
        return 2
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
