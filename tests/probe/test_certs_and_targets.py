"""Name matching against certificates and target parsing."""

from __future__ import annotations

import datetime as dt

import pytest

from orama_stealth.probe.certs import CertInfo, covers
from orama_stealth.probe.model import ProbeInputError, parse_target


def info(*names: str, ips: tuple[str, ...] = ()) -> CertInfo:
    now = dt.datetime.now(dt.UTC)
    return CertInfo("leaf", "ca", names, ips, now, 0)


@pytest.mark.parametrize(
    ("names", "name", "want"),
    [
        (("cdn.example.com",), "cdn.example.com", True),
        (("cdn.example.com",), "CDN.Example.com.", True),
        (("*.example.com",), "cdn-abc.example.com", True),
        (("*.example.com",), "example.com", False),
        (("*.example.com",), "a.b.example.com", False),
        (("*.example.com",), "cdn.example.org", False),
        (("f*.example.com",), "foo.example.com", False),
        (("www.example.com",), "cdn.example.com", False),
    ],
)
def test_dns_names(names: tuple[str, ...], name: str, want: bool) -> None:
    assert covers(info(*names), name) is want


def test_ip_addresses() -> None:
    cert = info("cdn.example.com", ips=("127.0.0.1", "::1"))
    assert covers(cert, "127.0.0.1")
    assert covers(cert, "[::1]")
    assert not covers(cert, "127.0.0.2")
    assert not covers(info("127.0.0.1"), "127.0.0.1"), "an IP must be in an IP SAN"


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("node.example.com:443", ("node.example.com", 443)),
        ("node.example.com", ("node.example.com", 443)),
        ("[::1]:8443", ("::1", 8443)),
        ("[2001:db8::1]", ("2001:db8::1", 443)),
    ],
)
def test_targets(text: str, want: tuple[str, int]) -> None:
    assert parse_target(text) == want


@pytest.mark.parametrize(
    ("text", "message"),
    [(":443", "host is empty"), ("h:0", "outside"), ("h:x", "not a number"),
     ("::1", "[addr]:port"), ("[::1", "[IPv6]:port")],
)
def test_bad_targets(text: str, message: str) -> None:
    with pytest.raises(ProbeInputError, match=message.replace("[", r"\[")):
        parse_target(text)
