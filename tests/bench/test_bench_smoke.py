"""The benchmark harness runs end to end in smoke mode and records every target and workload."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.report import goals, summarise

ROOT = Path(__file__).resolve().parents[2]
TARGETS = ("direct", "haproxy", "router", "floor")
WORKLOADS = ("w1_new_conns", "w1_latency", "w2_keepalive", "w3_bulk_1", "w3_bulk_n", "w4_idle")
# The figure each workload must report, and the proxy-only figure (None for direct).
KEY_FIGURE = {
    "w1_new_conns": ("conns_per_s", "proxy_cpu_us_per_conn"),
    "w1_latency": ("p50_ms", None),
    "w2_keepalive": ("req_per_s", "proxy_cpu_us_per_req"),
    "w3_bulk_1": ("mb_per_s", "proxy_cpu_s_per_gb"),
    "w3_bulk_n": ("mb_per_s", "proxy_cpu_s_per_gb"),
    "w4_idle": ("alive", "kib_per_conn"),
}


@pytest.mark.slow
def test_smoke_run_records_every_target_and_workload(tmp_path: Path) -> None:
    missing = [t for t in ("haproxy", "nginx", "wrk", "curl")
               if shutil.which(t) is None and not Path(f"/usr/sbin/{t}").exists()]
    assert not missing, f"scripts/bootstrap.sh installs these, missing here: {missing}"
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--no-install", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=280, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["mode"] == "smoke"
    assert result["errors"] == []
    assert result["targets"] == list(TARGETS)
    for key in ("cpu_model", "cores", "kernel"):
        assert result["machine"][key]
    for key in ("python", "orama_stealth", "haproxy", "nginx", "openssl"):
        assert result["versions"][key]
    for w in WORKLOADS:
        for t in TARGETS:
            runs = [r for r in result["runs"] if r["workload"] == w and r["target"] == t]
            assert len(runs) == 1, (w, t, runs)
            figures = runs[0]["figures"]
            main, proxy_only = KEY_FIGURE[w]
            assert figures[main] > 0, (w, t, figures)
            assert figures.get("errors", 0) == 0, (w, t, figures)
            if proxy_only is not None:
                assert (figures[proxy_only] is None) == (t == "direct"), (w, t, figures)
            assert result["summary"][w][t][main] == pytest.approx(figures[main])
    for t in TARGETS:
        idle = next(r["figures"] for r in result["runs"]
                    if r["workload"] == "w4_idle" and r["target"] == t)
        count = result["settings"]["idle_count"]
        assert idle["held"] == idle["alive"] == idle["requested"] == count, (t, idle)
    assert set(result["routes_ns"]) == {"10", "1000", "10000"}
    assert all(g["met"] in (True, False) for g in result["goals"]), result["goals"]
    assert "Targets (router against the rule)" in proc.stdout


def _run(target: str, workload: str, **figures: float | None) -> dict[str, object]:
    return {"rep": 0, "target": target, "workload": workload, "figures": figures}


def test_goals_compare_router_with_haproxy_medians() -> None:
    runs = [_run("haproxy", "w2_keepalive", proxy_cpu_us_per_req=v, req_per_s=40000.0)
            for v in (10.0, 30.0, 20.0)]
    runs += [_run("router", "w2_keepalive", proxy_cpu_us_per_req=v, req_per_s=39000.0)
             for v in (19.0, 100.0, 1.0)]
    by_name = {g.name: g for g in goals(summarise(runs), {"10": 100.0, "10000": 160.0})}
    cpu = by_name["W2 proxy CPU per request"]
    assert (cpu.router, cpu.limit, cpu.met) == (19.0, 20.0, True)
    assert by_name["W2 requests/s"].met is False
    assert by_name["route pick, 10000 routes"].met is False
    assert by_name["W1 proxy CPU per new connection"].met is None


@pytest.mark.slow
def test_base_and_asyncio_targets_run_their_own_code(tmp_path: Path) -> None:
    """`base` runs a commit's router extracted into the run's directory (HEAD here: always
    there, even in a shallow clone), `router-asyncio` this checkout's on the stdlib loop."""
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--no-install", "--out", str(out),
         "--targets", "base,router-asyncio", "--workloads", "w1_new_conns", "--base", "HEAD"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["errors"] == []
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert result["versions"]["base_commit"] == head
    assert "orama-bench-" in proc.stdout and "base-code" in proc.stdout
    for t in ("base", "router-asyncio"):
        figures = result["summary"]["w1_new_conns"][t]
        assert figures["conns_per_s"] > 0 and figures["proxy_cpu_us_per_conn"] > 0, (t, figures)
