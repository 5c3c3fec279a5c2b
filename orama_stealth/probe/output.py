"""The probe report as a table for people or JSON for machines."""

from __future__ import annotations

import json

from orama_stealth.probe.model import ProbeReport


def to_json(report: ProbeReport) -> str:
    return json.dumps(report.to_dict(), indent=2, sort_keys=False, default=str)


def to_table(report: ProbeReport) -> str:
    head = f"probe {report.target}" + (f" sni={report.sni}" if report.sni else "")
    lines = [head, f"{'CHECK':<6} {'RESULT':<6} DETAIL"]
    for c in report.checks:
        lines.append(f"{c.name:<6} {'ok' if c.ok else 'FAIL':<6} {c.summary}")
        if c.error:
            lines.append(f"{'':<13}error: {c.error}")
        if c.name == "tls":
            for i, cert in enumerate(c.details.get("chain", [])):
                lines.append(
                    f"{'':<13}chain[{i}]: {cert['subject']} (issuer {cert['issuer']}, "
                    f"{cert['days_left']}d left)"
                )
        for key in ("relayed", "peer_relayed", "peer", "mapped", "realm", "username"):
            if c.details.get(key):
                lines.append(f"{'':<13}{key}: {c.details[key]}")
    lines.append("result: " + ("ok" if report.ok else "FAILED"))
    return "\n".join(lines)
