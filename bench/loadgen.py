"""Client-side load: wrk for request rates, curl for bulk downloads, each bounded in time."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench.origin import BIG_PATH, SNI, TINY_PATH


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    seconds: float
    req_per_s: float
    errors: int  # socket errors plus non-2xx/3xx responses


_REQS = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m)", re.M)
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_SOCKERR = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def parse_wrk(text: str) -> WrkResult:
    m = _REQS.search(text)
    r = _RPS.search(text)
    if m is None or r is None:
        raise ValueError(f"wrk output without a request count or rate:\n{text[-2000:]}")
    errors = 0
    if (e := _SOCKERR.search(text)) is not None:
        errors += sum(int(g) for g in e.groups())
    if (n := _NON2XX.search(text)) is not None:
        errors += int(n.group(1))
    seconds = float(m.group(2)) * _UNIT[m.group(3)]
    return WrkResult(int(m.group(1)), seconds, float(r.group(1)), errors)


def wrk(port: int, *, connections: int, seconds: float, close: bool) -> WrkResult:
    argv = [shutil.which("wrk") or "/usr/bin/wrk", "-t", str(min(2, connections)),
            "-c", str(connections), "-d", f"{max(1, round(seconds))}s", "--timeout", "5s"]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(f"https://{SNI}:{port}{TINY_PATH}")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr.strip()[-500:]}")
    return parse_wrk(out.stdout)


@dataclass(frozen=True, slots=True)
class BulkResult:
    bytes: int
    seconds: float
    mb_per_s: float  # aggregate, 10^6 bytes per second
    failures: int


def curl_parallel(port: int, ca_file: Path, streams: int, size: int, timeout: float) -> BulkResult:
    """`streams` simultaneous downloads of the big file to /dev/null; wall time of the set."""
    argv = [shutil.which("curl") or "/usr/bin/curl", "-sS", "-o", "/dev/null", "--cacert",
            str(ca_file), "-w", "%{size_download}\n", "--max-time", str(int(timeout)),
            f"https://{SNI}:{port}{BIG_PATH}"]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(streams)]
    total = 0
    failures = 0
    try:
        for p in procs:
            out, _err = p.communicate(timeout=timeout + 10)
            got = int(out.strip() or 0) if p.returncode == 0 else 0
            if got != size:
                failures += 1
            total += got
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
    elapsed = time.perf_counter() - t0
    return BulkResult(total, elapsed, total / elapsed / 1e6, failures)
