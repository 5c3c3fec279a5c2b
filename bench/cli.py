"""`python3 -m bench`: run every workload against every target, print tables, write JSON."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import basecode, report, routebench, sysinfo, workloads
from bench.origin import Origin, nginx_origin
from bench.settings import FULL, SMOKE, Settings
from bench.targets import ALL_TARGETS, BASE_DIR, TARGETS, Endpoint, start

RESULTS = Path(__file__).resolve().parent / "results"


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m bench", description=__doc__)
    p.add_argument("--smoke", action="store_true", help="tiny durations and sizes, one repetition")
    p.add_argument("--targets", default=",".join(TARGETS),
                   help=f"comma-separated names from {','.join(ALL_TARGETS)}"
                        f" (default: {','.join(TARGETS)})")
    p.add_argument("--base", default=basecode.DEFAULT_BASE, metavar="COMMIT",
                   help="the commit whose router the `base` target runs"
                        f" (default {basecode.DEFAULT_BASE})")
    p.add_argument("--workloads", default=",".join(workloads.WORKLOADS),
                   help=f"comma-separated subset of {','.join(workloads.WORKLOADS)} (default: all)")
    p.add_argument("--repetitions", type=int, help="override the number of repetitions")
    p.add_argument("--out", type=Path,
                   help="JSON result path (default bench/results/<UTC time>.json)")
    p.add_argument("--no-install", action="store_true", help="never apt-get install missing tools")
    a = p.parse_args(argv)
    targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    bad = [t for t in targets if t not in ALL_TARGETS]
    if bad or not targets:
        p.error(f"--targets: unknown {bad or 'empty list'}; "
                f"expected names from {','.join(ALL_TARGETS)}")
    chosen = [w.strip() for w in a.workloads.split(",") if w.strip()]
    unknown = [w for w in chosen if w not in workloads.WORKLOADS]
    if unknown or not chosen:
        p.error(f"--workloads: unknown {unknown or 'empty list'}; "
                f"expected names from {','.join(workloads.WORKLOADS)}")
    # A target's added p50 latency is measured against direct: keep direct when latency runs.
    if "w1_latency" in chosen and "direct" not in targets:
        targets.insert(0, "direct")
    a.workloads = chosen
    if a.repetitions is not None and not 1 <= a.repetitions <= 20:
        p.error(f"--repetitions: expected 1..20, got {a.repetitions}")
    a.targets = targets
    return a


def _log(msg: str) -> None:
    print(f"bench: {msg}", flush=True)


def _record(runs: list[dict[str, Any]], rep: int, target: str, workload: str,
            fn: Callable[[], workloads.Figures], chosen: list[str]) -> None:
    if workload not in chosen:
        return
    t0 = time.monotonic()
    entry: dict[str, Any] = {"rep": rep, "target": target, "workload": workload}
    try:
        entry["figures"] = fn()
    except Exception as e:  # one failed workload must not lose the rest of the run
        entry["figures"] = {}
        entry["error"] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    entry["seconds"] = round(time.monotonic() - t0, 2)
    runs.append(entry)
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in entry["figures"].items())
    _log(f"rep={rep} target={target} workload={workload} {shown or entry.get('error')}")


def _one_target(runs: list[dict[str, Any]], rep: int, target: str, origin: Origin,
                s: Settings, work: Path, chosen: list[str]) -> None:
    tag = f"r{rep}"

    def fail_all(names: tuple[str, ...], e: Exception) -> None:
        for w in names:
            runs.append({"rep": rep, "target": target, "workload": w, "figures": {},
                         "error": f"target did not start: {type(e).__name__}: {e}"})
        _log(f"rep={rep} target={target} failed to start: {e}")

    main = [w for w in workloads.WORKLOADS[:-1] if w in chosen]
    if main:
        try:
            with start(target, origin, work, tag) as ep:
                _run_main(runs, rep, ep, origin, s, chosen)
        except (RuntimeError, TimeoutError, OSError) as e:
            fail_all(tuple(w for w in main if not any(
                r["rep"] == rep and r["target"] == target and r["workload"] == w for r in runs)),
                e)
    if "w4_idle" not in chosen:
        return
    # Memory per idle connection is read from a freshly started proxy, not one that bulk
    # transfers have already grown.
    try:
        with start(target, origin, work, tag + "-idle") as ep:
            _record(runs, rep, target, "w4_idle", lambda: workloads.w4_idle(ep, origin, s),
                    chosen)
    except (RuntimeError, TimeoutError, OSError) as e:
        fail_all(("w4_idle",), e)


def _run_main(runs: list[dict[str, Any]], rep: int, ep: Endpoint, origin: Origin,
              s: Settings, chosen: list[str]) -> None:
    t = ep.target
    _record(runs, rep, t, "w1_new_conns", lambda: workloads.w1_new_conns(ep, s), chosen)
    _record(runs, rep, t, "w1_latency", lambda: workloads.w1_latency(ep, origin, s), chosen)
    _record(runs, rep, t, "w2_keepalive", lambda: workloads.w2_keepalive(ep, s), chosen)
    _record(runs, rep, t, "w3_bulk_1", lambda: workloads.w3_bulk(ep, origin, 1), chosen)
    _record(runs, rep, t, "w3_bulk_n", lambda: workloads.w3_bulk(ep, origin, s.w3_parallel),
            chosen)


def run(argv: list[str] | None = None) -> dict[str, Any]:
    a = _args(argv)
    s = SMOKE if a.smoke else FULL
    if a.repetitions is not None:
        s = dataclasses.replace(s, repetitions=a.repetitions)
    if not a.no_install:
        sysinfo.ensure_tools()
    started = dt.datetime.now(dt.UTC)
    # Read before the run: other commits may land while it runs.
    versions = sysinfo.versions()
    t0 = time.monotonic()
    runs: list[dict[str, Any]] = []
    _log(f"mode={'smoke' if a.smoke else 'full'} targets={','.join(a.targets)} "
         f"workloads={','.join(a.workloads)} repetitions={s.repetitions}")
    with tempfile.TemporaryDirectory(prefix="orama-bench-") as tmp:
        work = Path(tmp)
        if "base" in a.targets:
            versions["base_commit"] = basecode.extract(a.base, work / BASE_DIR)
            _log(f"base target: commit {versions['base_commit']} in {work / BASE_DIR}")
        with nginx_origin(work / "origin", s.big_size) as origin:
            for rep in range(s.repetitions):
                k = rep % len(a.targets)
                for target in a.targets[k:] + a.targets[:k]:  # rotate the order each repetition
                    _one_target(runs, rep, target, origin, s, work, a.workloads)
    _log("route table micro-benchmark")
    routes_ns = routebench.run(s.route_sizes, s.route_lookups)
    summary = report.summarise(runs)
    report.add_derived(summary)
    result: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "mode": "smoke" if a.smoke else "full",
        "settings": dataclasses.asdict(s),
        "machine": sysinfo.machine(),
        "versions": versions,
        "targets": a.targets,
        "workloads": a.workloads,
        "runs": runs,
        "summary": summary,
        "routes_ns": routes_ns,
        "goals": [g.as_dict() for g in report.goals(summary, routes_ns)],
        "errors": [f"rep={r['rep']} target={r['target']} workload={r['workload']}: {r['error']}"
                   for r in runs if "error" in r],
        "wall_seconds": time.monotonic() - t0,
    }
    stamp = started.strftime("%Y%m%dT%H%M%SZ") + ("-smoke" if a.smoke else "")
    out = a.out or RESULTS / f"{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n" + report.render(result) + "\n", flush=True)
    for e in result["errors"]:
        _log(f"error {e}")
    _log(f"results written to {out}")
    return result


def main(argv: list[str] | None = None) -> int:
    result = run(argv)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
