"""Where the router spends its CPU under one workload: py-spy samples of every worker.

`python3 -m bench.profile [--workload w1_new_conns|w2_keepalive|w3_bulk_1] [--seconds 10]`
starts the origin and orama-sni-router as the benchmark does, samples the router's process
tree with py-spy while the workload runs, and prints the functions with the most samples
(self and inclusive). py-spy is not a project dependency: `pip install py-spy`. Needs
permission to ptrace the router (root, or kernel.yama.ptrace_scope=0).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import workloads
from bench.origin import nginx_origin
from bench.settings import FULL
from bench.targets import start

CHOICES = ("w1_new_conns", "w2_keepalive", "w3_bulk_1")
# With --native py-spy cannot tell a worker blocked in epoll from one running: those samples
# are waiting, not work, and are left out of the shares.
_WAITING = ("epoll_wait", "epoll_pwait", "epoll_pwait2")


def _frame(f: str) -> str:
    # py-spy raw frames look like "func (path/to/file.py:123)"; keep function and file name.
    name, _, where = f.partition(" (")
    file = where.rstrip(")").rsplit("/", 1)[-1].split(":", 1)[0]
    return f"{name} ({file})" if file else name


def top(raw: Path, n: int = 25) -> str:
    self_t: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    waiting = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        c = int(count)
        frames = [_frame(f) for f in stack.split(";")]
        if frames[-1].split(" ", 1)[0] in _WAITING:
            waiting += c
            continue
        total += c
        self_t[frames[-1]] += c
        for f in set(frames):
            incl[f] += c
    if not total:
        return "no samples (is py-spy allowed to ptrace the router?)"
    out = [f"{total} samples at work ({waiting} more waiting in epoll, left out)"]
    for title, counter in (("self", self_t), ("inclusive", incl)):
        out.append(f"\ntop {n} by {title} samples:")
        out += [f"{c / total:6.1%}  {f}" for f, c in counter.most_common(n)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench.profile", description=__doc__)
    p.add_argument("--workload", choices=CHOICES, default="w1_new_conns")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--raw", type=Path, help="keep py-spy's collapsed stacks here")
    p.add_argument("--native", action="store_true",
                   help="also sample C frames (libpython, libc system calls)")
    a = p.parse_args(argv)
    spy = shutil.which("py-spy")
    if spy is None:
        p.error("py-spy not found; install it with: pip install py-spy")
    s = dataclasses.replace(FULL, w1_seconds=a.seconds, w2_seconds=a.seconds, warmup_seconds=0)
    with tempfile.TemporaryDirectory(prefix="orama-bench-profile-") as tmp:
        work = Path(tmp)
        raw = a.raw or work / "stacks.txt"
        with nginx_origin(work / "origin", FULL.big_size) as origin, \
                start("router", origin, work, "profile") as ep:
            assert ep.pid is not None
            argv = [spy, "record", "--pid", str(ep.pid), "--subprocesses", "--format", "raw",
                    "--rate", "250", "--duration", str(int(a.seconds) + 1), "--output", str(raw)]
            # Native unwinding needs the process paused per sample; Python-only does not.
            argv += ["--native"] if a.native else ["--nonblocking"]
            rec = subprocess.Popen(
                argv,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            )
            try:
                if a.workload == "w1_new_conns":
                    figures = workloads.w1_new_conns(ep, s)
                elif a.workload == "w2_keepalive":
                    figures = workloads.w2_keepalive(ep, s)
                else:
                    figures = workloads.w3_bulk(ep, origin, 1)
            finally:
                try:
                    _, err = rec.communicate(timeout=a.seconds + 60)
                except subprocess.TimeoutExpired:
                    rec.kill()
                    _, err = rec.communicate()
            print(f"{a.workload}: {figures}")
            if rec.returncode != 0:
                print(f"py-spy failed ({rec.returncode}): {err.strip()[-1000:]}", file=sys.stderr)
                return 1
        print(top(raw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
