"""`GET /metrics` on `metrics_listen`: the standard library's HTTP server on one thread of the
supervisor (never in a worker: nothing here is on the data path).

The thread only reads: it renders whatever `collect()` returns (the supervisor sums the
workers' shared-memory slots). It never writes to stderr, so a fork of the supervisor can never
inherit a half-written log line or a held stream lock from it.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
CLIENT_TIMEOUT = 5.0


class _Server(HTTPServer):
    def __init__(
        self, addr: tuple[str, int], render: Callable[[], str],
        sock: socket.socket | None = None,
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        self.render = render
        super().__init__(addr, _Handler, bind_and_activate=sock is None)
        if sock is not None:
            # Handed over across an exec, already listening: whatever queued meanwhile is
            # answered now instead of refused.
            self.socket.close()
            self.socket = sock
            self.server_address = sock.getsockname()[:2]
            self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def server_bind(self) -> None:
        # HTTPServer's own server_bind looks up the host's FQDN, a name lookup nobody needs.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = CLIENT_TIMEOUT  # a client that never finishes its request is dropped
    protocol_version = "HTTP/1.1"

    def _answer(self, body_too: bool) -> None:
        if self.path.split("?", 1)[0] != "/metrics":
            self._send(404, "text/plain", b"not found; try /metrics\n", body_too)
            return
        self._send(200, CONTENT_TYPE, self.server.render().encode(), body_too)

    def _send(self, code: int, ctype: str, body: bytes, body_too: bool) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if body_too:
            self.wfile.write(body)
        self.close_connection = True

    def do_GET(self) -> None:
        self._answer(True)

    def do_HEAD(self) -> None:
        self._answer(False)

    def log_message(self, format: str, *args: object) -> None:
        pass  # no access log, and no stderr writes from this thread


class MetricsServer:
    def __init__(
        self, addr: tuple[str, int], render: Callable[[], str],
        sock: socket.socket | None = None,
    ) -> None:
        """Binds at once (so a busy port fails the start), or takes `sock`, a listening socket
        handed over by the previous image; serves once `start()` is called."""
        self._server = _Server(addr, render, sock)
        self._thread: threading.Thread | None = None

    def fileno(self) -> int:
        return self._server.socket.fileno()

    def pause(self) -> None:
        """Stop the thread, keep the listening socket (for a handover; `start()` resumes)."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
            self._thread = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.5},
            name="orama-metrics", daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
            self._thread = None
        self._server.server_close()

    def close_in_child(self) -> None:
        """After a fork: the thread does not exist in the child, only the socket does."""
        self._server.socket.close()
