"""Medians over repetitions, the targets the router must meet, tables and the JSON record."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

# summary[workload][target][metric] = median over repetitions
Summary = dict[str, dict[str, dict[str, float | None]]]


def summarise(runs: list[dict[str, Any]]) -> Summary:
    acc: dict[str, dict[str, dict[str, list[float]]]] = {}
    for r in runs:
        per = acc.setdefault(r["workload"], {}).setdefault(r["target"], {})
        for k, v in r["figures"].items():
            per.setdefault(k, [])
            if v is not None:
                per[k].append(float(v))
    return {w: {t: {k: (statistics.median(v) if v else None) for k, v in m.items()}
                for t, m in ts.items()} for w, ts in acc.items()}


def _get(s: Summary, workload: str, target: str, metric: str) -> float | None:
    return s.get(workload, {}).get(target, {}).get(metric)


@dataclass(frozen=True, slots=True)
class Goal:
    name: str
    rule: str
    router: float | None
    limit: float | None
    unit: str
    met: bool | None  # None: not measured (a target missing from the run)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "rule": self.rule, "router": self.router, "limit": self.limit,
                "unit": self.unit, "met": self.met}


def _le(value: float | None, limit: float | None) -> bool | None:
    return None if value is None or limit is None else value <= limit


def _ge(value: float | None, limit: float | None) -> bool | None:
    return None if value is None or limit is None else value >= limit


def _scaled(v: float | None, k: float, add: float = 0.0) -> float | None:
    return None if v is None else v * k + add


def goals(s: Summary, routes: dict[str, float]) -> list[Goal]:
    def g(w: str, t: str, m: str) -> float | None:
        return _get(s, w, t, m)

    out: list[Goal] = []
    cpu = g("w1_new_conns", "haproxy", "proxy_cpu_us_per_conn")
    r = g("w1_new_conns", "router", "proxy_cpu_us_per_conn")
    out.append(Goal("W1 proxy CPU per new connection", "<= HAProxy", r, cpu, "us", _le(r, cpu)))
    hp = g("w1_latency", "haproxy", "p50_ms")
    dp = g("w1_latency", "direct", "p50_ms")
    rp = g("w1_latency", "router", "p50_ms")
    added = None if rp is None or dp is None else rp - dp
    limit = None if hp is None or dp is None else hp - dp + 0.1
    out.append(Goal("W1 added p50 latency", "<= HAProxy + 0.1 ms", added, limit, "ms",
                     _le(added, limit)))
    cpu = g("w2_keepalive", "haproxy", "proxy_cpu_us_per_req")
    r = g("w2_keepalive", "router", "proxy_cpu_us_per_req")
    out.append(Goal("W2 proxy CPU per request", "<= HAProxy", r, cpu, "us", _le(r, cpu)))
    rate = g("w2_keepalive", "haproxy", "req_per_s")
    r = g("w2_keepalive", "router", "req_per_s")
    out.append(Goal("W2 requests/s", ">= HAProxy", r, rate, "req/s", _ge(r, rate)))
    for w, label in (("w3_bulk_1", "one download"), ("w3_bulk_n", "parallel downloads")):
        lim = _scaled(g(w, "haproxy", "proxy_cpu_s_per_gb"), 0.5)
        r = g(w, "router", "proxy_cpu_s_per_gb")
        out.append(Goal(f"W3 proxy CPU per GB, {label}", "<= 0.5x HAProxy", r, lim, "s",
                        _le(r, lim)))
    lim = _scaled(g("w3_bulk_1", "haproxy", "mb_per_s"), 1.1)
    r = g("w3_bulk_1", "router", "mb_per_s")
    out.append(Goal("W3 MB/s, one download", ">= 1.1x HAProxy", r, lim, "MB/s", _ge(r, lim)))
    lim = _scaled(g("w4_idle", "haproxy", "kib_per_conn"), 0.6)
    r = g("w4_idle", "router", "kib_per_conn")
    out.append(Goal("W4 memory per idle routed connection", "<= 0.6x HAProxy", r, lim, "KiB",
                    _le(r, lim)))
    req = g("w4_idle", "router", "requested")
    held = g("w4_idle", "router", "alive")
    out.append(Goal("W4 idle connections held", "all", held, req, "conns", _ge(held, req)))
    if routes:
        sizes = sorted(routes, key=int)
        small, big = routes[sizes[0]], routes[sizes[-1]]
        out.append(Goal(f"route pick, {sizes[-1]} routes", f"<= 1.5x the {sizes[0]}-route pick",
                        big, small * 1.5, "ns", _le(big, small * 1.5)))
    return out


# workload -> (title, [(metric, header, format, compare-to-direct, compare-to-haproxy)])
COLUMNS: dict[str, tuple[str, list[tuple[str, str, str, bool, bool]]]] = {
    "w1_new_conns": ("W1 new TLS connections (wrk, Connection: close)", [
        ("conns_per_s", "conns/s", "{:.0f}", True, True),
        ("proxy_cpu_us_per_conn", "proxy CPU us/conn", "{:.1f}", False, True),
        ("proxy_sys_share", "kernel share", "{:.0%}", False, False),
        ("errors", "errors", "{:.0f}", False, False)]),
    "w1_latency": ("W1 one connection at a time (connect+handshake+GET)", [
        ("p50_ms", "p50 ms", "{:.3f}", True, True),
        ("added_p50_ms", "added p50 ms", "{:+.3f}", False, False),
        ("p99_ms", "p99 ms", "{:.3f}", True, True),
        ("added_p99_ms", "added p99 ms", "{:+.3f}", False, False),
        ("errors", "errors", "{:.0f}", False, False)]),
    "w2_keepalive": ("W2 keep-alive requests (wrk)", [
        ("req_per_s", "req/s", "{:.0f}", True, True),
        ("proxy_cpu_us_per_req", "proxy CPU us/req", "{:.2f}", False, True),
        ("proxy_sys_share", "kernel share", "{:.0%}", False, False),
        ("errors", "errors", "{:.0f}", False, False)]),
    "w3_bulk_1": ("W3 bulk, one download", [
        ("mb_per_s", "MB/s", "{:.0f}", True, True),
        ("proxy_cpu_s_per_gb", "proxy CPU s/GB", "{:.3f}", False, True),
        ("proxy_sys_share", "kernel share", "{:.0%}", False, False),
        ("errors", "errors", "{:.0f}", False, False)]),
    "w3_bulk_n": ("W3 bulk, parallel downloads", [
        ("mb_per_s", "MB/s", "{:.0f}", True, True),
        ("proxy_cpu_s_per_gb", "proxy CPU s/GB", "{:.3f}", False, True),
        ("proxy_sys_share", "kernel share", "{:.0%}", False, False),
        ("errors", "errors", "{:.0f}", False, False)]),
    "w4_idle": ("W4 idle routed connections", [
        ("alive", "held", "{:.0f}", False, False),
        ("requested", "of", "{:.0f}", False, False),
        ("kib_per_conn", "proxy KiB/conn", "{:.2f}", False, True),
        ("rss_after_kib", "RSS after KiB", "{:.0f}", False, False)]),
}


def add_derived(s: Summary) -> None:
    lat = s.get("w1_latency", {})
    direct = lat.get("direct", {})
    for figures in lat.values():
        for q in ("p50_ms", "p99_ms"):
            v, d = figures.get(q), direct.get(q)
            figures[f"added_{q}"] = None if v is None or d is None else v - d


def _fmt(fmt: str, v: float | None) -> str:
    return "-" if v is None else fmt.format(v)


def _num(v: float | None) -> str:
    """Three significant digits or more, without noise decimals on large figures."""
    if v is None:
        return "-"
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.2f}" if abs(v) >= 1 else f"{v:.3f}"


def _ratio(v: float | None, base: float | None) -> str:
    return "-" if v is None or not base else f"{v / base:.2f}x"


def _table(rows: list[list[str]], left: int = 1) -> str:
    """A Markdown table; the first `left` columns are text, the rest figures."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.rjust(w) if i >= left else c.ljust(w) for i, (c, w) in
                               enumerate(zip(r, widths, strict=True))) + " |" for r in rows]
    rules = ("-" * (w + 1) + ("-" if i < left else ":") for i, w in enumerate(widths))
    sep = "|" + "|".join(rules) + "|"
    return "\n".join([lines[0], sep, *lines[1:]])


def workload_table(s: Summary, workload: str, targets: list[str]) -> str:
    title, cols = COLUMNS[workload]
    head = ["target"]
    for _m, h, _f, vs_d, vs_h in cols:
        head.append(h)
        if vs_d:
            head.append("vs direct")
        if vs_h:
            head.append("vs haproxy")
    rows = [head]
    data = s.get(workload, {})
    for t in targets:
        row = [t]
        for m, _h, f, vs_d, vs_h in cols:
            v = data.get(t, {}).get(m)
            row.append(_fmt(f, v))
            if vs_d:
                row.append(_ratio(v, data.get("direct", {}).get(m)))
            if vs_h:
                row.append(_ratio(v, data.get("haproxy", {}).get(m)))
        rows.append(row)
    return f"{title}\n{_table(rows)}"


def goals_table(gs: list[Goal]) -> str:
    rows = [["target", "rule", "router", "limit", "met"]]
    for g in gs:
        met = "n/a" if g.met is None else ("yes" if g.met else "NO")
        rows.append([g.name, g.rule, f"{_num(g.router)} {g.unit}", f"{_num(g.limit)} {g.unit}",
                     met])
    return "Targets (router against the rule)\n" + _table(rows, left=2)


def routes_table(routes: dict[str, float]) -> str:
    rows = [["routes", "ns per pick", "vs smallest"]]
    base = routes[min(routes, key=int)] if routes else None
    for n in sorted(routes, key=int):
        rows.append([n, f"{routes[n]:.0f}", _ratio(routes[n], base)])
    return "RouteTable.pick() micro-benchmark\n" + _table(rows)


def render(result: dict[str, Any]) -> str:
    s: Summary = result["summary"]
    targets: list[str] = result["targets"]
    m, v = result["machine"], result["versions"]
    parts = [
        f"machine: {m['cpu_model']}, {m['cores']} cores, kernel {m['kernel']}, {m['os']}",
        "versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"mode: {result['mode']}, {result['settings']['repetitions']} repetition(s), medians; "
        f"wall time {result['wall_seconds']:.0f} s",
    ]
    parts += [workload_table(s, w, targets) for w in COLUMNS if w in s]
    if result["routes_ns"]:
        parts.append(routes_table(result["routes_ns"]))
    parts.append(goals_table([Goal(**g) for g in result["goals"]]))
    return "\n\n".join(parts)
