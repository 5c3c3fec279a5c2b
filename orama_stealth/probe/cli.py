"""`orama-stealth probe | credentials | stealth-host`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from orama_stealth import turn_secret
from orama_stealth.probe.model import ProbeInputError, ProbeSpec, parse_target
from orama_stealth.probe.output import to_json, to_table
from orama_stealth.probe.runner import run_probe
from orama_stealth.probe.turn_check import PEER_MODES
from orama_stealth.wire import turn_auth

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def register(sub: Any) -> None:
    """Add this area's subcommands; each sets `handler=callable(args) -> int`."""
    p = sub.add_parser(
        "probe", help="speak TLS, HTTPS, STUN and TURN through HOST:PORT",
        description="Check what really answers on HOST:PORT for a given SNI. TLS is always "
        "checked; add --https, --stun, --turn. Exit 0 only when every check passed.",
    )
    p.add_argument("target", metavar="HOST:PORT", help="e.g. node1.example.com:443, [::1]:443")
    p.add_argument("--sni", help="server name to send (default: none, check the host itself)")
    p.add_argument("--alpn", action="append", default=[], metavar="PROTO",
                   help="ALPN protocol to offer (repeatable), e.g. stun.turn")
    p.add_argument("--ca", metavar="FILE", help="CA bundle to verify against (default: system)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per step (default 5)")
    p.add_argument("--min-days", type=int, default=0, metavar="N",
                   help="fail when the certificate expires in fewer than N days (default 0)")
    p.add_argument("--https", action="store_true", help="GET / with the SNI as Host")
    p.add_argument("--path", default="/", help="path for --https (default /)")
    p.add_argument("--expect-server", metavar="TEXT",
                   help="--https fails unless the Server header contains TEXT (e.g. Caddy)")
    p.add_argument("--stun", action="store_true", help="STUN Binding over TLS")
    p.add_argument("--turn", action="store_true",
                   help="TURN Allocate, CreatePermission, Send/Data, Refresh over TLS")
    p.add_argument("--turn-secret-file", metavar="FILE", help="REST shared secret (first line)")
    p.add_argument("--turn-rest-user", default="orama-probe",
                   help="user part of the REST username (default orama-probe)")
    p.add_argument("--turn-user", help="static long-term username")
    p.add_argument("--turn-password", help="static long-term password (visible in ps)")
    p.add_argument("--turn-password-file", metavar="FILE",
                   help="static long-term password from a file (first line)")
    p.add_argument("--peer-mode", choices=PEER_MODES, default="allocation",
                   help="allocation: a second allocation is the peer (default, no NAT issues); "
                   "udp: a local UDP socket is the peer")
    p.add_argument("--peer-bind", metavar="ADDR", help="address for the UDP peer (--peer-mode udp)")
    p.add_argument("--cert-truth", action="store_true",
                   help="report the served leaf (issuer, serial, not-after, days left); fail "
                   "below --cert-min-days or when it is not the leaf of --expect-cert")
    p.add_argument("--expect-cert", metavar="PEM", help="the certificate the server must serve")
    p.add_argument("--cert-min-days", type=float, default=14.0, metavar="N",
                   help="--cert-truth fails with fewer than N days left (default 14)")
    p.add_argument("--cert-fix", metavar="TEXT", help="the fix to print when it is not")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--compare", action="store_true",
                   help="what a censor sees: TLS, ALPN, certificate and HTTP answer of --base "
                   "and each --cdn name side by side (the other checks are not run)")
    p.add_argument("--base", metavar="NAME", help="the base name (Caddy) for --compare")
    p.add_argument("--cdn", action="append", default=[], metavar="NAME",
                   help="a stealth name for --compare (repeatable)")
    p.set_defaults(handler=probe_command)

    c = sub.add_parser(
        "credentials", help="print gateway-style TURN REST credentials as JSON",
        description="Username <expiry>:<user>, password base64(HMAC-SHA1(secret, username)).",
    )
    c.add_argument("--secret-file", required=True, metavar="FILE")
    c.add_argument("--user", required=True)
    c.add_argument("--ttl", type=int, default=600, help="seconds (default 600)")
    c.add_argument("--turn-host", required=True, metavar="HOST")
    c.add_argument("--cdn-host", metavar="HOST", help="stealth name served on :443")
    c.set_defaults(handler=credentials_command)

    s = sub.add_parser("stealth-host", help="the stealth host name for a namespace")
    s.add_argument("--namespace", required=True)
    s.add_argument("--base", required=True, metavar="DOMAIN")
    s.set_defaults(handler=stealth_host_command)


def _usage_error(message: str) -> int:
    print(f"orama-stealth: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def spec_from_args(args: argparse.Namespace) -> ProbeSpec:
    host, port = parse_target(args.target)
    secret = None
    if args.turn_password_file:
        if args.turn_password:
            raise ProbeInputError("give --turn-password or --turn-password-file, not both")
        args.turn_password = turn_secret.read_secret(args.turn_password_file)
    if args.turn:
        if args.turn_secret_file:
            if args.turn_user or args.turn_password:
                raise ProbeInputError("give --turn-secret-file or --turn-user/--turn-password, "
                                      "not both")
            secret = turn_secret.read_secret(args.turn_secret_file)
        elif not (args.turn_user and args.turn_password):
            raise ProbeInputError("--turn needs --turn-secret-file FILE, or --turn-user with "
                                  "--turn-password or --turn-password-file")
    if args.timeout <= 0:
        raise ProbeInputError(f"--timeout must be positive, got {args.timeout}")
    return ProbeSpec(
        host=host, port=port, sni=args.sni, alpn=tuple(args.alpn), ca_file=args.ca,
        timeout=args.timeout, min_days=args.min_days, https=args.https, https_path=args.path,
        expect_server=args.expect_server, stun=args.stun, turn=args.turn,
        turn_user=args.turn_user, turn_password=args.turn_password, turn_secret=secret,
        turn_rest_user=args.turn_rest_user, peer_mode=args.peer_mode, peer_bind=args.peer_bind,
        cert_truth=args.cert_truth or bool(args.expect_cert), expect_cert_file=args.expect_cert,
        cert_min_days=args.cert_min_days, cert_fix=args.cert_fix,
    )


def compare_command(args: argparse.Namespace) -> int:
    from orama_stealth.probe import compare

    try:
        host, port = parse_target(args.target)
    except ProbeInputError as e:
        return _usage_error(str(e))
    if not args.base or not args.cdn:
        return _usage_error("--compare needs --base NAME and at least one --cdn NAME")
    rows = compare.compare(host, port, args.base, args.cdn, args.ca, args.timeout)
    if args.json:
        print(json.dumps({"rows": rows, "differences": compare.differences(rows)}, indent=2))
    else:
        print(compare.to_table(rows))
    return EXIT_FAILED if any("error" in r for r in rows) else EXIT_OK


def probe_command(args: argparse.Namespace) -> int:
    if args.compare:
        return compare_command(args)
    try:
        report = run_probe(spec_from_args(args))
    except (ProbeInputError, turn_auth.CredentialError) as e:
        return _usage_error(str(e))
    print(to_json(report) if args.json else to_table(report))
    return EXIT_OK if report.ok else EXIT_FAILED


def credentials_command(args: argparse.Namespace) -> int:
    try:
        secret = turn_secret.read_secret(args.secret_file)
        cred = turn_auth.rest_credential(secret, args.user, now=time.time(), ttl=args.ttl)
        body = turn_auth.gateway_response(cred, args.turn_host, args.cdn_host)
    except turn_auth.CredentialError as e:
        return _usage_error(str(e))
    print(json.dumps(body, indent=2))
    return EXIT_OK


def stealth_host_command(args: argparse.Namespace) -> int:
    try:
        print(turn_auth.stealth_host(args.namespace, args.base))
    except turn_auth.CredentialError as e:
        return _usage_error(str(e))
    return EXIT_OK
