"""`python3 -m fuzz <target> [--runs N | --seconds S]`: run one fuzz target under atheris.

The repo corpus (fuzz/corpus/<target>/) seeds the run and is never written to; new inputs go to
a work directory (a temporary one unless --work is given), crashes to --artifacts. Exit status 0
means the budget ran out with no crash; anything else is a finding (its input is in artifacts).
`--minimize DIR` folds a long run's work directory into the repo corpus, keeping only inputs
that add coverage.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from fuzz.targets import TARGETS

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fuzz" / "corpus"
# Longest input libFuzzer builds per target: enough for several records, a v2 header with TLVs,
# a STUN message with many attributes, while keeping each execution cheap.
MAX_LEN = {"clienthello": 4096, "proxyproto": 512, "stun": 2048}
# The test of the smoke test: with this set to a target's name, that target fails on any input.
BREAK_ENV = "ORAMA_FUZZ_BREAK"


def _load(target: str) -> Callable[[bytes], None]:
    import atheris  # imported here so `--help` works without it

    # Only the parser under test is instrumented: coverage of the harness and of the standard
    # library would only dilute the signal and slow every execution.
    with atheris.instrument_imports(include=[TARGETS[target]]):
        importlib.import_module(TARGETS[target])
    check: Callable[[bytes], None] = importlib.import_module(f"fuzz.targets.{target}").check
    if os.environ.get(BREAK_ENV) == target:

        def broken(data: bytes) -> None:
            raise RuntimeError(f"{BREAK_ENV}={target}: deliberately broken harness")

        return broken
    return check


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("target", choices=sorted(TARGETS))
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--runs", type=int, help="stop after N executions")
    budget.add_argument("--seconds", type=int, help="stop after S seconds")
    budget.add_argument("--minimize", type=Path, metavar="DIR",
                        help="merge DIR into the repo corpus, keeping inputs that add coverage")
    p.add_argument("--work", type=Path, help="directory new inputs are written to (kept)")
    p.add_argument("--artifacts", type=Path, default=ROOT / "build" / "fuzz" / "artifacts",
                   help="directory crashing inputs are written to (default build/fuzz/artifacts)")
    p.epilog = "Extra libFuzzer flags go after --, e.g. -- -max_total_time=600 -jobs=1."
    extra: list[str] = []
    if "--" in argv:
        argv, extra = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    ns = p.parse_args(argv)
    ns.libfuzzer = extra
    if ns.runs is None and ns.seconds is None and ns.minimize is None:
        ns.seconds = 60
    return ns


def main(argv: list[str] | None = None) -> None:
    ns = _args(sys.argv[1:] if argv is None else argv)
    import atheris

    seeds = CORPUS / ns.target
    seeds.mkdir(parents=True, exist_ok=True)
    ns.artifacts.mkdir(parents=True, exist_ok=True)
    flags = [
        f"-artifact_prefix={ns.artifacts}/{ns.target}-",
        f"-max_len={MAX_LEN[ns.target]}",
        "-timeout=10",  # seconds for one input: a parser that slow is a finding too
        "-rss_limit_mb=1024",
        "-print_final_stats=1",
        *ns.libfuzzer,
    ]
    if ns.minimize is not None:
        merged = Path(tempfile.mkdtemp(prefix=f"fuzz-{ns.target}-merge-"))
        # Exits the process when done, so the swap happens in a child's exit hook below.
        atheris.Setup([sys.argv[0], "-merge=1", *flags, str(merged), str(seeds),
                       str(ns.minimize)], _load(ns.target))
        _swap_on_exit(merged, seeds)
        atheris.Fuzz()
    work = ns.work or Path(tempfile.mkdtemp(prefix=f"fuzz-{ns.target}-"))
    work.mkdir(parents=True, exist_ok=True)
    if ns.work is None:
        _remove_on_exit(work)
    budget = [f"-atheris_runs={ns.runs}"] if ns.runs is not None else [
        f"-max_total_time={ns.seconds}"
    ]
    atheris.Setup([sys.argv[0], *flags, *budget, str(work), str(seeds)], _load(ns.target))
    atheris.Fuzz()


def _remove_on_exit(path: Path) -> None:
    import atexit

    atexit.register(shutil.rmtree, path, True)


def _swap_on_exit(merged: Path, seeds: Path) -> None:
    import atexit

    def swap() -> None:
        if any(merged.iterdir()):
            shutil.rmtree(seeds)
            shutil.move(merged, seeds)

    atexit.register(swap)


if __name__ == "__main__":
    main()
