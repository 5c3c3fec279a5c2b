"""Acceptance: real clients (Python ssl, curl, openssl) reach the backend their SNI names."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from support.router import Router, router
from support.tls_backends import Backend, Pki, backends, hello, parse_ident


@pytest.fixture(scope="module")
def farm(pki: Pki) -> Iterator[dict[str, Backend]]:
    with backends(pki, "caddy", "turn", "wild", "exact-under-wild") as b:
        yield b


@pytest.fixture(scope="module")
def rt(
    tmp_path_factory: pytest.TempPathFactory, farm: dict[str, Backend], event_loop_name: str
) -> Iterator[Router]:
    routes = [
        ("cdn.example.test", ("turn", farm["turn"].addr)),
        ("*.cdn.example.test", ("wild", farm["wild"].addr)),
        ("pinned.cdn.example.test", ("exact-under-wild", farm["exact-under-wild"].addr)),
    ]
    with router(
        tmp_path_factory.mktemp("rt"),
        routes=routes,
        fallback=("caddy", farm["caddy"].addr),
        workers=2,
    ) as r:
        yield r


@pytest.mark.parametrize(
    ("sni", "backend"),
    [
        ("cdn.example.test", "turn"),
        ("CDN.Example.Test", "turn"),
        ("a.cdn.example.test", "wild"),
        ("pinned.cdn.example.test", "exact-under-wild"),
        ("a.b.cdn.example.test", "caddy"),  # a wildcard covers exactly one label
        ("www.example.test", "caddy"),
    ],
)
def test_python_ssl_reaches_the_backend_its_sni_names(
    rt: Router, pki: Pki, sni: str, backend: str
) -> None:
    got = hello(rt.port, sni, pki)
    assert got["backend"] == backend
    assert got["sni"] == sni  # the router never rewrites the hello


def test_no_sni_reaches_the_fallback(rt: Router, pki: Pki) -> None:
    got = hello(rt.port, None, pki)
    assert (got["backend"], got["sni"]) == ("caddy", "-")


def test_acme_tls_alpn_goes_to_the_fallback_even_for_a_routed_name(rt: Router, pki: Pki) -> None:
    got = hello(rt.port, "cdn.example.test", pki, alpn=["acme-tls/1"])
    assert (got["backend"], got["alpn"]) == ("caddy", "acme-tls/1")
    # The same name without acme-tls/1 still goes to its route.
    assert hello(rt.port, "cdn.example.test", pki, alpn=["http/1.1"])["backend"] == "turn"


def test_curl_with_resolve_and_cacert(rt: Router, pki: Pki) -> None:
    for name, backend in (("cdn.example.test", "turn"), ("x.cdn.example.test", "wild")):
        out = subprocess.run(
            [
                "curl",
                "-sS",
                "--max-time",
                "20",
                "--http1.1",
                "--cacert",
                str(pki.ca_file),
                "--resolve",
                f"{name}:{rt.port}:127.0.0.1",
                f"https://{name}:{rt.port}/",
            ],
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert out.returncode == 0, out.stderr.decode()
        ident = parse_ident(out.stdout)
        assert (ident["backend"], ident["sni"]) == (backend, name)


@pytest.mark.parametrize("frag", [None, "512"])
def test_openssl_s_client(rt: Router, pki: Pki, frag: str | None) -> None:
    argv = [
        "openssl",
        "s_client",
        "-connect",
        f"127.0.0.1:{rt.port}",
        "-servername",
        "cdn.example.test",
        "-CAfile",
        str(pki.ca_file),
        "-verify_return_error",
        "-quiet",
        "-ign_eof",
    ]
    if frag:
        # Long ALPN names make the hello exceed 512 bytes, so it really spans records.
        argv += ["-max_send_frag", frag, "-alpn", ",".join(c * 200 for c in "xyz")]
    out = subprocess.run(argv, input=b"HELLO\n", capture_output=True, timeout=30, check=False)
    assert b"backend=" in out.stdout, out.stderr.decode()
    ident = parse_ident(out.stdout)
    assert (ident["backend"], ident["sni"]) == ("turn", "cdn.example.test")


def test_connections_are_counted_by_backend(rt: Router, pki: Pki) -> None:
    before = rt.settled_metric('connections_total{backend="turn"}')
    for _ in range(3):
        hello(rt.port, "cdn.example.test", pki)
    assert rt.wait_metric('connections_total{backend="turn"}', before + 3) == before + 3


def test_route_table_printed_by_check(rt: Router) -> None:
    from support.router import router_argv

    out = subprocess.run(
        [*router_argv(), "check", "--config", str(rt.config)],
        capture_output=True,
        timeout=30,
        check=False,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "cdn.example.test" in out.stdout and "turn" in out.stdout


def test_check_rejects_a_bad_file_with_its_line(tmp_path: Path) -> None:
    from support.router import router_argv

    bad = tmp_path / "bad.yaml"
    bad.write_text('listen: "127.0.0.1:1"\nfallback:\n  name: c\n  addr: "nope"\nroutes: []\n')
    out = subprocess.run(
        [*router_argv(), "check", "--config", str(bad)],
        capture_output=True,
        timeout=30,
        check=False,
        text=True,
    )
    assert out.returncode == 2
    assert "bad.yaml:4" in out.stderr and "fallback.addr" in out.stderr


def test_concurrent_clients_each_reach_their_own_backend(rt: Router, pki: Pki) -> None:
    names = {
        "cdn.example.test": "turn",
        "q.cdn.example.test": "wild",
        "pinned.cdn.example.test": "exact-under-wild",
        "w.example.test": "caddy",
    }
    jobs = [list(names)[i % len(names)] for i in range(160)]

    def one(sni: str) -> tuple[str, str, str]:
        got = hello(rt.port, sni, pki)
        return sni, got["backend"], got["sni"]

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(one, jobs, timeout=120))
    assert len(results) == len(jobs)
    for sni, backend, seen_sni in results:
        assert (backend, seen_sni) == (names[sni], sni)


def test_ready_line_names_the_event_loop_it_runs(rt: Router, event_loop_name: str) -> None:
    line = rt.wait_log("event=ready")
    assert f" loop={event_loop_name} " in line
