"""The mapped-address verdict: which XOR-MAPPED-ADDRESS values a browser rejects."""

from __future__ import annotations

import pytest

from orama_stealth.probe.mapped import mapped_problem


@pytest.mark.parametrize("mapped", [("127.0.0.1", 55456), ("127.0.0.2", 1), ("::1", 9),
                                    ("::ffff:127.0.0.1", 4000)])
def test_loopback_seen_from_a_remote_prober_fails_naming_firefox_and_the_fix(
    mapped: tuple[str, int],
) -> None:
    problem = mapped_problem(mapped, "10.231.77.1")
    assert problem is not None
    assert "Firefox" in problem and "loopback" in problem and "fix:" in problem
    assert "10.231.77.1" in problem


@pytest.mark.parametrize("mapped", [("0.0.0.0", 443), ("::", 443)])
def test_unspecified_fails(mapped: tuple[str, int]) -> None:
    problem = mapped_problem(mapped, "10.0.0.1")
    assert problem is not None and "unspecified" in problem and "Firefox" in problem


@pytest.mark.parametrize("mapped", [("224.0.0.1", 5000), ("255.255.255.255", 5000),
                                    ("ff02::1", 5000), ("10.0.0.1", 0)])
def test_not_unicast_fails(mapped: tuple[str, int]) -> None:
    problem = mapped_problem(mapped, "10.0.0.1")
    assert problem is not None and "not a unicast address" in problem


def test_missing_or_garbage_fails() -> None:
    assert "no XOR-MAPPED-ADDRESS" in (mapped_problem(None, "10.0.0.1") or "")
    assert "not an IP address" in (mapped_problem(("host", 1), "10.0.0.1") or "")


@pytest.mark.parametrize("mapped", [("10.231.77.1", 40000), ("203.0.113.7", 1),
                                    ("2001:db8::7", 5), ("192.168.1.20", 61000)])
def test_real_client_addresses_pass(mapped: tuple[str, int]) -> None:
    assert mapped_problem(mapped, "10.231.77.1") is None


def test_a_prober_on_loopback_is_rightly_seen_as_loopback() -> None:
    assert mapped_problem(("127.0.0.1", 5000), "127.0.0.1") is None
    assert mapped_problem(("::1", 5000), "::1") is None
