"""Real servers for the probe tests: one coturn and one Caddy per module, on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support.servers import CaddyServer, CoturnServer, caddy, coturn

from orama_stealth.lab.pki import TestCA

BASE = "example.test"
CDN = f"cdn.{BASE}"
WWW = f"www.{BASE}"


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA()


@pytest.fixture(scope="module")
def ca_file(ca: TestCA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ca.write_ca(tmp_path_factory.mktemp("ca") / "ca.pem")


@pytest.fixture(scope="module")
def turn_server(ca: TestCA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoturnServer]:
    with coturn(tmp_path_factory.mktemp("turn"), ca, names=(CDN, "127.0.0.1")) as server:
        yield server


@pytest.fixture(scope="module")
def web_server(ca: TestCA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CaddyServer]:
    d = tmp_path_factory.mktemp("web")
    cert = ca.issue([WWW, BASE], d, "web")
    with caddy(d, cert) as server:
        yield server
