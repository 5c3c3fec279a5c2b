"""STUN Binding and a full TURN relay round trip over TLS through host:port."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

from orama_stealth.probe.mapped import mapped_problem
from orama_stealth.probe.model import (
    CheckResult,
    NotTurnServer,
    ProbeFailure,
    ProbeInputError,
    ProbeSpec,
)
from orama_stealth.probe.tls_check import connect_tls
from orama_stealth.probe.turn_client import Allocation, TurnConnection, allocate, binding
from orama_stealth.wire import stun, turn_auth

PEER_MODES = ("allocation", "udp")


def _where(spec: ProbeSpec) -> str:
    return f"{spec.target} (SNI {spec.sni!r})" if spec.sni else spec.target


@contextlib.contextmanager
def _connection(spec: ProbeSpec, step: str) -> Iterator[TurnConnection]:
    # TURN clients (browsers) verify the chain; the name is the TLS check's business.
    conn = TurnConnection(connect_tls(spec, step), _where(spec), spec.timeout)
    try:
        yield conn
    finally:
        conn.close()


def credentials(spec: ProbeSpec) -> tuple[str, str]:
    if spec.turn_secret is not None:
        cred = turn_auth.rest_credential(
            spec.turn_secret, spec.turn_rest_user, now=time.time(), ttl=600
        )
        return cred.username, cred.password
    if spec.turn_user is not None and spec.turn_password is not None:
        return spec.turn_user, spec.turn_password
    raise ProbeInputError(
        "the TURN check needs a REST shared secret or a static user and password"
    )


def _failed(name: str, e: ProbeFailure, details: dict[str, Any]) -> CheckResult:
    summary = "not a TURN/STUN server" if isinstance(e, NotTurnServer) else f"failed at {e.step}"
    details["not_turn_server"] = isinstance(e, NotTurnServer)
    return CheckResult(name, False, summary, e.message, e.step, details)


def check_stun(spec: ProbeSpec) -> CheckResult:
    details: dict[str, Any] = {}
    try:
        with _connection(spec, "connect") as conn:
            local_ip = conn.sock.getsockname()[0]
            resp = binding(conn)
    except ProbeFailure as e:
        return _failed("stun", e, details)
    except stun.StunError as e:
        return _failed("stun", ProbeFailure("binding", f"malformed STUN answer: {e}"), details)
    mapped = resp.xor_address(stun.XOR_MAPPED_ADDRESS)
    details.update(mapped=_fmt(mapped), software=resp.text(stun.SOFTWARE),
                   fingerprint=resp.check_fingerprint())
    problem = mapped_problem(mapped, local_ip)
    if problem:
        return _failed("stun", ProbeFailure("mapped-address", problem), details)
    return CheckResult("stun", True, f"Binding ok, mapped address {_fmt(mapped)}", None, None,
                       details)


def _fmt(addr: stun.Address | None) -> str | None:
    if addr is None:
        return None
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"


def _release(alloc: Allocation, details: dict[str, Any], key: str) -> None:
    lifetime = alloc.refresh(0)
    details[key] = lifetime if lifetime is not None else 0


def _via_second_allocation(
    spec: ProbeSpec, a: Allocation, user: str, password: str, details: dict[str, Any]
) -> None:
    """Relay A sends to relay B on the same server: no NAT between the prober and the relay."""
    with _connection(spec, "peer-connect") as conn_b:
        b = allocate(conn_b, user, password)
        details["peer_relayed"] = _fmt(b.relayed)
        b.create_permission(a.relayed)
        a.create_permission(b.relayed)
        payload = b"orama-probe " + os.urandom(8).hex().encode()
        a.send_indication(b.relayed, payload)
        peer, data = b.wait_data(spec.timeout)
        if data != payload:
            raise ProbeFailure("data", f"expected a Data indication with our {len(payload)} "
                                       f"bytes on the peer allocation, got {data!r}")
        if peer is not None and peer[1] != a.relayed[1]:
            raise ProbeFailure("data", f"Data indication from {_fmt(peer)}, expected it from "
                                       f"our relayed address {_fmt(a.relayed)}")
        reply = b"orama-probe-reply " + os.urandom(4).hex().encode()
        b.send_indication(a.relayed, reply)
        _, back = a.wait_data(spec.timeout)
        if back != reply:
            raise ProbeFailure("data", f"expected the reply {reply!r} back, got {back!r}")
        details["relay_round_trip"] = True
        _release(b, details, "peer_refresh_lifetime")


def _via_udp_peer(spec: ProbeSpec, a: Allocation, local_ip: str, details: dict[str, Any]) -> None:
    """The probe's own UDP socket is the peer: proves the relay reaches out to the internet."""
    bind = spec.peer_bind or local_ip
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as udp:
        try:
            udp.bind((bind, 0))
        except OSError as e:
            raise ProbeInputError(f"--peer-bind {bind!r}: cannot bind a UDP socket: {e}") from e
        peer: stun.Address = udp.getsockname()[:2]
        details["peer"] = _fmt(peer)
        a.create_permission(peer)
        payload = b"orama-probe " + os.urandom(8).hex().encode()
        a.send_indication(peer, payload)
        udp.settimeout(spec.timeout)
        try:
            data, source = udp.recvfrom(65536)
        except TimeoutError:
            raise ProbeFailure(
                "data", f"timeout after {spec.timeout}s waiting for the relay's UDP datagram "
                f"on {_fmt(peer)} (NAT or a firewall in front of the prober? try "
                "peer mode 'allocation')"
            ) from None
        if data != payload:
            raise ProbeFailure("data", f"the UDP peer got {data!r}, expected {payload!r}")
        details["peer_saw_relay_as"] = _fmt(source[:2])
        reply = b"orama-probe-reply " + os.urandom(4).hex().encode()
        udp.sendto(reply, source)
        _, back = a.wait_data(spec.timeout)
        if back != reply:
            raise ProbeFailure("data", f"expected the reply {reply!r} back, got {back!r}")
        details["relay_round_trip"] = True


def check_turn(spec: ProbeSpec) -> CheckResult:
    if spec.peer_mode not in PEER_MODES:
        raise ProbeInputError(f"peer mode {spec.peer_mode!r}: expected one of {PEER_MODES}")
    user, password = credentials(spec)
    details: dict[str, Any] = {"username": user, "peer_mode": spec.peer_mode}
    try:
        with _connection(spec, "connect") as conn:
            local_ip = conn.sock.getsockname()[0]
            details["local"] = _fmt(conn.sock.getsockname()[:2])
            a = allocate(conn, user, password)
            details.update(realm=a.realm, relayed=_fmt(a.relayed), mapped=_fmt(a.mapped),
                           lifetime=a.lifetime)
            problem = mapped_problem(a.mapped, local_ip)
            if problem:
                # Released first: the failure must not leave an allocation behind.
                _release(a, details, "refresh_lifetime")
                raise ProbeFailure("mapped-address", problem)
            if spec.peer_mode == "allocation":
                _via_second_allocation(spec, a, user, password, details)
            else:
                _via_udp_peer(spec, a, local_ip, details)
            _release(a, details, "refresh_lifetime")
            details["stale_nonces"] = a.stale_nonces
    except ProbeFailure as e:
        return _failed("turn", e, details)
    except stun.StunError as e:
        return _failed("turn", ProbeFailure("turn", f"malformed STUN answer: {e}"), details)
    summary = (f"Allocate ok (realm {details['realm']!r}), relayed {details['relayed']}, "
               f"CreatePermission, Send/Data round trip via {spec.peer_mode}, Refresh 0")
    return CheckResult("turn", True, summary, None, None, details)
