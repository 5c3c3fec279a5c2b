"""probe --compare's report: differences marked against the base name."""

from __future__ import annotations

from orama_stealth.probe.compare import ROWS, differences, to_table

BASE = {"name": "a.test", "tls version": "TLSv1.3", "cipher": "TLS_AES_128_GCM_SHA256",
        "alpn (offered h2,http/1.1)": "h2", "certificate in clear": "no",
        "leaf names": "a.test, *.a.test", "issuer": "CA", "chain": "a.test <- CA",
        "http request over tls": "HTTP/1.1 200 OK"}


def test_same_answers_show_no_difference() -> None:
    rows = [BASE, {**BASE, "name": "cdn.a.test"}]
    assert differences(rows) == []
    assert "*" not in to_table(rows).splitlines()[1]


def test_each_differing_row_is_marked() -> None:
    cdn = {**BASE, "name": "cdn.a.test", "tls version": "TLSv1.2",
           "http request over tls": "closed without a byte (close_notify)"}
    rows = [BASE, cdn]
    assert differences(rows) == ["tls version", "http request over tls"]
    lines = to_table(rows).splitlines()
    marked = {line.split()[1] for line in lines[1:len(ROWS) + 1] if line.startswith("*")}
    assert marked == {"tls", "http"}
    assert "cdn.a.test" in lines[0]


def test_a_name_that_failed_shows_its_error() -> None:
    rows = [BASE, {"name": "cdn.a.test", "error": "cannot connect"}]
    assert "cannot connect" in to_table(rows)
    assert set(differences(rows)) == set(ROWS)
