"""What a node's clients live through during an operation: a loop of new TLS connections to
:443 at a fixed pace, and a few long-lived connections that must keep getting answers.

Each new connection is one real client: TCP connect, TLS handshake with the given SNI and CA
(name checked), and for HTTPS a `GET /` whose status line must come back. A connection that is
refused, reset, times out or fails its handshake is a failed connect; the time from the first
SYN to the end of the handshake is its handshake time. The long-lived connections send a
keep-alive request each time `check_long_lived()` is called, as a call's TURN session keeps
talking for hours: an operation that cuts them shows there.

Runs an asyncio loop in a thread of its own, bounded in count and time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

ATTEMPT_TIMEOUT = 5.0


@dataclass(frozen=True)
class Attempt:
    started: float  # monotonic
    handshake: float  # seconds from connect to the end of the TLS handshake (or to the failure)
    error: str  # "" when the client succeeded


@dataclass
class Summary:
    attempts: int
    failed: int
    slowest_handshake: float
    errors: dict[str, int]
    window: float  # longest stretch from a failure to the next success

    def line(self) -> str:
        errors = ",".join(f"{k}:{v}" for k, v in sorted(self.errors.items())) or "-"
        return (f"connects={self.attempts} failed={self.failed} "
                f"slowest_handshake={self.slowest_handshake * 1000:.0f}ms "
                f"failure_window={self.window * 1000:.0f}ms errors={errors}")


def _kind(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError):
        return "reset"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ssl.SSLError):
        return f"tls:{exc.reason or type(exc).__name__}"
    return type(exc).__name__


async def _read_response(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response (Content-Length or chunked); return its status code."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status


@dataclass
class ClientLoop:
    """`with ClientLoop(addr, 443, sni, ca) as loop: ...operation...` then `loop.summary()`."""

    host: str
    port: int
    sni: str
    ca_file: str
    interval: float = 0.005
    long_lived: int = 0
    http: bool = True
    max_seconds: float = 300.0
    max_connects: int = 60000
    attempts: list[Attempt] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._ctx = ssl.create_default_context(cafile=self.ca_file)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="client-loop")
        self._stop = threading.Event()
        self._pacer: concurrent.futures.Future[None] | None = None
        self._held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._inflight: set[asyncio.Task[None]] = set()

    # --- new connections ---------------------------------------------------------------------

    async def _one(self) -> None:
        started = time.monotonic()
        handshake = 0.0
        error = ""
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(ATTEMPT_TIMEOUT):
                reader, writer = await asyncio.open_connection(
                    self.host, self.port, ssl=self._ctx, server_hostname=self.sni)
                handshake = time.monotonic() - started
                if self.http:
                    writer.write(f"GET / HTTP/1.1\r\nHost: {self.sni}\r\n"
                                 "Connection: close\r\n\r\n".encode())
                    status = await _read_response(reader)
                    if status >= 500:
                        error = f"http:{status}"
        except (OSError, ssl.SSLError, TimeoutError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError, ValueError, IndexError) as exc:
            handshake = handshake or time.monotonic() - started
            error = _kind(exc)
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.wait_closed(), 1.0)
        self.attempts.append(Attempt(started, handshake, error))

    async def _pace(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        next_at = time.monotonic()
        while (not self._stop.is_set() and len(self.attempts) + len(self._inflight)
               < self.max_connects and time.monotonic() < deadline):
            task = asyncio.ensure_future(self._one())
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
            next_at += self.interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        if self._inflight:
            await asyncio.wait(list(self._inflight), timeout=ATTEMPT_TIMEOUT + 2)

    # --- long-lived connections --------------------------------------------------------------

    async def _open_held(self) -> None:
        for _ in range(self.long_lived):
            self._held.append(await asyncio.open_connection(
                self.host, self.port, ssl=self._ctx, server_hostname=self.sni))

    async def _ask_held(self) -> list[str]:
        out = []
        for reader, writer in self._held:
            try:
                writer.write(f"GET / HTTP/1.1\r\nHost: {self.sni}\r\n\r\n".encode())
                status = await asyncio.wait_for(_read_response(reader), ATTEMPT_TIMEOUT)
                out.append("" if status < 500 else f"http:{status}")
            except (OSError, ssl.SSLError, TimeoutError,
                    asyncio.IncompleteReadError, ValueError, IndexError) as exc:
                out.append(_kind(exc) or "closed")
        return out

    def check_long_lived(self) -> list[str]:
        """One request on every long-lived connection now: "" per connection that answered,
        else why it did not."""
        return asyncio.run_coroutine_threadsafe(self._ask_held(), self._loop).result(
            ATTEMPT_TIMEOUT * (self.long_lived + 1))

    # --- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> ClientLoop:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._open_held(), self._loop).result(30)
        self._pacer = asyncio.run_coroutine_threadsafe(self._pace(), self._loop)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._pacer is not None:
            with contextlib.suppress(Exception):
                self._pacer.result(ATTEMPT_TIMEOUT + 5)

    def __exit__(self, *exc: object) -> None:
        self.stop()

        async def close_held() -> None:
            # A TLS transport closes only once its close_notify went out, which needs the
            # loop: stopping the loop first would leave the sockets open (and a server's
            # connections with them) until the process exits.
            for _reader, writer in self._held:
                writer.close()
            for _reader, writer in self._held:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.wait_closed(), 1.0)
                with contextlib.suppress(Exception):
                    writer.transport.abort()  # a peer that never answered the close

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close_held(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def summary(self) -> Summary:
        done = sorted(self.attempts, key=lambda a: a.started)
        failed = [a for a in done if a.error]
        window, start = 0.0, None
        for a in done:
            if a.error and start is None:
                start = a.started
            elif not a.error and start is not None:
                window, start = max(window, a.started - start), None
        if start is not None and done:
            window = max(window, done[-1].started - start)
        return Summary(
            attempts=len(done), failed=len(failed),
            slowest_handshake=max((a.handshake for a in done), default=0.0),
            errors=dict(Counter(a.error for a in failed)), window=window)
