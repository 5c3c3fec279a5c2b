"""Choosing the router's TURN TLS backend: never a loopback address (Firefox fails through it)."""

from __future__ import annotations

import pytest

from orama_stealth.deploy.settings import settings_from_data
from orama_stealth.deploy.turn_target import (
    TurnTlsListenersFact,
    choose,
    parse_listeners,
    usable_addresses,
)


def settings(**data: object) -> object:
    return settings_from_data("n1", {"base_domain": "a.test", "probe_address": "203.0.113.7",
                                     **data})


def found(*lines: str) -> object:
    return parse_listeners(list(lines))


def test_the_fact_parses_ss_and_ip_output() -> None:
    fact = TurnTlsListenersFact()
    assert "sport = :5349" in fact.command(5349)
    got = fact.process(["listen=127.0.0.1:5349", "listen=10.0.0.2:5349",
                        "listen=[::1]:5349", "addr=10.0.0.2/24", "addr=2001:db8::2/64"])
    assert got.listen == ["127.0.0.1", "10.0.0.2", "::1"]
    assert got.node_addrs == ["10.0.0.2", "2001:db8::2"]


def test_auto_picks_the_non_loopback_listener() -> None:
    s = settings()
    addr, problem = choose(s, found("listen=127.0.0.1:5349", "listen=10.231.77.2:5349",
                                    "addr=10.231.77.2/24"))
    assert (addr, problem) == ("10.231.77.2:5349", None)


def test_a_wildcard_listener_uses_the_node_address_preferring_the_probe_address() -> None:
    s = settings()
    lines = ("listen=*:5349", "addr=10.0.0.9/24", "addr=203.0.113.7/24", "addr=2001:db8::7/64")
    assert choose(s, found(*lines)) == ("203.0.113.7:5349", None)
    assert usable_addresses(found("listen=0.0.0.0:5349", "addr=2001:db8::7/64",
                                  "addr=10.0.0.9/24")) == ["10.0.0.9"]
    assert choose(s, found("listen=[::]:5349", "addr=2001:db8::7/64")) == (
        "[2001:db8::7]:5349", None)


def test_loopback_only_is_refused_with_the_fix() -> None:
    addr, problem = choose(settings(), found("listen=127.0.0.1:5349", "listen=[::1]:5349",
                                             "addr=10.0.0.2/24"))
    assert addr is None and problem is not None
    assert "loopback only (127.0.0.1, ::1)" in problem
    assert "Firefox" in problem and "listening-ip=<node address>" in problem


def test_nothing_listening_is_refused() -> None:
    addr, problem = choose(settings(), found("addr=10.0.0.2/24"))
    assert addr is None and "is not listening" in (problem or "")


@pytest.mark.parametrize("explicit", ["127.0.0.1:5349", "[::1]:5349", "0.0.0.0:5349"])
def test_an_explicit_loopback_backend_is_refused(explicit: str) -> None:
    addr, problem = choose(settings(turn_tls_addr=explicit), found("listen=*:5349"))
    assert addr is None and "is a loopback address" in (problem or "")
    assert "auto:5349" in (problem or "")


def test_an_explicit_address_is_kept() -> None:
    s = settings(turn_tls_addr="10.1.2.3:5350")
    assert choose(s, found()) == ("10.1.2.3:5350", None)
    assert s.turn_tls_port == 5350


def test_the_default_is_auto() -> None:
    assert settings().turn_tls_addr == "auto:5349"


def test_after_preflight_a_vanished_listener_still_gets_the_node_address() -> None:
    s = settings()
    lines = ("addr=10.0.0.9/24", "addr=203.0.113.7/24")
    assert choose(s, found(*lines), strict=False) == ("203.0.113.7:5349", None)
    assert choose(s, found(*lines))[0] is None


def test_the_refusal_names_each_listening_address_once() -> None:
    _, problem = choose(settings(), found("listen=127.0.0.1:5349", "listen=127.0.0.1:5349"))
    assert "loopback only (127.0.0.1):" in (problem or "")
