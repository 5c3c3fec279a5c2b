"""The TLS origin every target fronts: nginx with an ECDSA P-256 certificate, TLS 1.3 only.

It serves `/tiny` (a few bytes, for connection and request costs) and `/big` (a sparse file,
for bulk throughput). Session tickets and the session cache are off so every new connection
is a full handshake, the same work whichever proxy sits in front.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.procs import free_port, running, wait_port
from orama_stealth.lab.pki import TestCA

SNI = "localhost"  # wrk sends the URL host as SNI, and "localhost" resolves without DNS
TINY_PATH = "/tiny"
BIG_PATH = "/big"


@dataclass(frozen=True, slots=True)
class Origin:
    host: str
    port: int
    ca_file: Path
    big_size: int
    pid: int


def _nginx_conf(workdir: Path, port: int, cert: Path, key: Path, docroot: Path) -> str:
    user = ""
    if os.geteuid() == 0:
        # As root nginx drops workers to nobody:nobody, and Debian has no "nobody" group.
        pw = pwd.getpwuid(os.getuid())
        user = f"user {pw.pw_name} {grp.getgrgid(pw.pw_gid).gr_name};"
    return f"""
{user}
worker_processes auto;
worker_rlimit_nofile 20000;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 16000; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/tmp-body;
    proxy_temp_path {workdir}/tmp-proxy;
    fastcgi_temp_path {workdir}/tmp-fcgi;
    uwsgi_temp_path {workdir}/tmp-uwsgi;
    scgi_temp_path {workdir}/tmp-scgi;
    keepalive_requests 100000000;
    keepalive_timeout 900s;
    client_header_timeout 900s;
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name {SNI};
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.3;
        ssl_session_tickets off;
        ssl_session_cache off;
        root {docroot};
        location = {TINY_PATH} {{ default_type text/plain; return 200 "ok\\n"; }}
        location = {BIG_PATH} {{ default_type application/octet-stream; try_files /big =404; }}
    }}
}}
"""


@contextlib.contextmanager
def nginx_origin(workdir: Path, big_size: int) -> Iterator[Origin]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    workdir.mkdir(parents=True, exist_ok=True)
    docroot = workdir / "docroot"
    docroot.mkdir(exist_ok=True)
    big = docroot / "big"
    with open(big, "wb") as f:
        f.truncate(big_size)  # sparse: reads are zeros from the page cache, no disk I/O
    ca = TestCA("orama-stealth bench CA")
    ca_file = ca.write_ca(workdir / "ca.pem")
    issued = ca.issue([SNI, "127.0.0.1"], workdir, "origin")
    port = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(_nginx_conf(workdir, port, issued.cert_file, issued.key_file, docroot))
    log = workdir / "nginx.out"
    argv = [nginx, "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "nginx-error.log"),
            "-g", "daemon off; master_process on;"]
    with running(argv, log) as proc:
        wait_port("127.0.0.1", port, proc, workdir / "nginx-error.log")
        yield Origin("127.0.0.1", port, ca_file, big_size, proc.pid)
