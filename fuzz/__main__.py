"""`python3 -m fuzz <target> [--runs N | --seconds S]`: run one fuzz target under atheris.

The repo corpus (fuzz/corpus/<target>/) seeds the run and is never written to; new inputs go to
a work directory (a temporary one unless --work is given), failing inputs to --artifacts. Exit
status 0 means the budget ran out with no failure; anything else is a finding, its input saved
in the artifacts directory. `--minimize DIR` folds a long run's work directory into the repo
corpus, keeping only inputs that add coverage.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from fuzz.targets import TARGETS

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fuzz" / "corpus"
# Longest input libFuzzer builds per target: several records, a v2 header with TLVs, a STUN
# message with many attributes, while each execution stays cheap.
MAX_LEN = {"clienthello": 4096, "proxyproto": 512, "stun": 2048}


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python3 -m fuzz",
        description="Fuzz one parser with atheris (see docs/fuzzing.md).",
        epilog="Extra libFuzzer flags go after --, e.g. -- -max_total_time=600.",
    )
    p.add_argument("target", choices=sorted(TARGETS))
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--runs", type=int, help="stop after N executions")
    budget.add_argument("--seconds", type=int, help="stop after S seconds (default 60)")
    budget.add_argument("--minimize", type=Path, metavar="DIR",
                        help="merge DIR into the repo corpus, keeping inputs that add coverage")
    p.add_argument("--work", type=Path, help="directory new inputs are written to (kept)")
    p.add_argument("--artifacts", type=Path, default=ROOT / "build" / "fuzz" / "artifacts",
                   help="directory failing inputs are written to (default build/fuzz/artifacts)")
    extra: list[str] = []
    if "--" in argv:
        argv, extra = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    ns = p.parse_args(argv)
    ns.libfuzzer = extra
    if ns.runs is None and ns.seconds is None and ns.minimize is None:
        ns.seconds = 60
    return ns


def _fuzz(target: str, flags: list[str]) -> int:
    return subprocess.call([sys.executable, "-m", "fuzz.run", target, *flags], cwd=ROOT)


def main(argv: list[str] | None = None) -> int:
    ns = _args(sys.argv[1:] if argv is None else argv)
    seeds = CORPUS / ns.target
    seeds.mkdir(parents=True, exist_ok=True)
    ns.artifacts.mkdir(parents=True, exist_ok=True)
    flags = [
        f"-artifact_prefix={ns.artifacts.resolve()}/{ns.target}-",
        f"-max_len={MAX_LEN[ns.target]}",
        "-timeout=10",  # seconds for one input: a parser that slow is a finding too
        "-rss_limit_mb=1024",
        "-print_final_stats=1",
        *ns.libfuzzer,
    ]
    if ns.minimize is not None:
        merged = Path(tempfile.mkdtemp(prefix=f"fuzz-{ns.target}-merge-"))
        try:
            rc = _fuzz(ns.target, ["-merge=1", *flags, str(merged), str(seeds),
                                   str(ns.minimize.resolve())])
            if rc == 0 and any(merged.iterdir()):
                shutil.rmtree(seeds)
                shutil.copytree(merged, seeds)
            return rc
        finally:
            shutil.rmtree(merged, ignore_errors=True)
    budget = (
        [f"-atheris_runs={ns.runs}"] if ns.runs is not None else [f"-max_total_time={ns.seconds}"]
    )
    if ns.work is not None:
        ns.work.mkdir(parents=True, exist_ok=True)
        return _fuzz(ns.target, [*flags, *budget, str(ns.work.resolve()), str(seeds)])
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{ns.target}-") as work:
        return _fuzz(ns.target, [*flags, *budget, work, str(seeds)])


if __name__ == "__main__":
    sys.exit(main())
