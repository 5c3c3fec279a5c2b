"""`python3 -m fuzz` in CI: each target for a short budget, no failure; a failure is not missed.

The long runs (10 million executions a target) are recorded in docs/fuzzing.md; here the same
command runs each target from the repo corpus for a few seconds, as a subprocess, and any failing
input (an undocumented exception, a broken property, a crash of the interpreter) fails the test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TARGETS = ["clienthello", "proxyproto", "stun"]
SECONDS = 4


def fuzz(target: str, budget: list[str], artifacts: Path,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fuzz", target, *budget, "--artifacts", str(artifacts)],
        cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
        timeout=120,
    )


def executions(output: str) -> int:
    m = re.search(r"^stat::number_of_executed_units:\s+(\d+)", output, re.M)
    return int(m.group(1)) if m else 0


@pytest.mark.parametrize("target", TARGETS)
def test_target_runs_its_budget_without_a_failure(target: str, tmp_path: Path) -> None:
    got = fuzz(target, ["--seconds", str(SECONDS)], tmp_path)
    output = got.stdout + got.stderr
    assert got.returncode == 0, f"fuzz {target} failed (exit {got.returncode}):\n{output[-4000:]}"
    assert not list(tmp_path.iterdir()), f"failing inputs written: {list(tmp_path.iterdir())}"
    # It really fuzzed: the whole seed corpus and then mutations, not a start-up and an exit.
    seeds = len(list((ROOT / "fuzz" / "corpus" / target).iterdir()))
    assert executions(output) > max(1000, seeds), output[-2000:]


def test_a_failing_target_makes_the_command_fail(tmp_path: Path) -> None:
    got = fuzz("proxyproto", ["--runs", "100000"], tmp_path, {"ORAMA_FUZZ_BREAK": "proxyproto"})
    output = got.stdout + got.stderr
    assert got.returncode != 0, output[-2000:]
    assert "deliberately broken harness" in output
    crashes = list(tmp_path.glob("proxyproto-crash-*"))
    assert len(crashes) == 1, list(tmp_path.iterdir())


def test_the_break_switch_names_one_target(tmp_path: Path) -> None:
    # The switch for one target leaves the others alone, so the smoke runs above cannot pass
    # merely because it is never read.
    got = fuzz("stun", ["--runs", "2000"], tmp_path, {"ORAMA_FUZZ_BREAK": "proxyproto"})
    assert got.returncode == 0, (got.stdout + got.stderr)[-2000:]
