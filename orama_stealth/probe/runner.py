"""`run_probe(ProbeSpec) -> ProbeReport`: every requested check, in a fixed order."""

from __future__ import annotations

from orama_stealth.probe.cert_truth import check_cert_truth
from orama_stealth.probe.https_check import check_https
from orama_stealth.probe.model import ProbeReport, ProbeSpec
from orama_stealth.probe.tls_check import check_tls
from orama_stealth.probe.turn_check import check_stun, check_turn


def run_probe(spec: ProbeSpec) -> ProbeReport:
    """TLS always (it explains the others' failures), then HTTPS, STUN, TURN as asked.

    Raises ProbeInputError for a spec that cannot be probed (no TURN credentials, bad peer
    mode); network outcomes are never exceptions, they are failed checks."""
    report = ProbeReport(spec.target, spec.sni)
    report.checks.append(check_tls(spec))
    if spec.https:
        report.checks.append(check_https(spec))
    if spec.stun:
        report.checks.append(check_stun(spec))
    if spec.turn:
        report.checks.append(check_turn(spec))
    if spec.cert_truth:
        report.checks.append(check_cert_truth(spec))
    return report
