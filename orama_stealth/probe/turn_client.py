"""A small blocking STUN/TURN client over one TLS connection, for probing only.

Every failure is a ProbeFailure naming the step (allocate, create-permission, ...) and what
came back, or NotTurnServer when the peer does not speak STUN at all.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from orama_stealth.probe.model import NotTurnServer, ProbeFailure
from orama_stealth.wire import stun

SOFTWARE = b"orama-stealth probe"
# How long to wait for an HTTP server's reply after the probe gave up on a STUN answer.
NUDGE_TIMEOUT = 3.0
AttrsFor = Callable[[bytes], list[tuple[int, bytes]]]


def _status_line(data: bytes) -> str:
    return data[:80].split(b"\r\n", 1)[0].decode("ascii", "replace")


def _what_came_back(data: bytes) -> str:
    head = data[:60]
    if head.startswith(b"HTTP/"):
        return f"it answered with HTTP ({_status_line(data)!r})"
    if head[:1] == b"\x15":
        return "it answered with a TLS alert inside the TLS session"
    return f"it answered {len(data)} bytes that are not STUN ({head[:16].hex()}...)"


class TurnConnection:
    """Requests and indications over one established TLS (or TCP) connection."""

    def __init__(self, sock: socket.socket | ssl.SSLSocket, where: str, timeout: float) -> None:
        self.sock = sock
        self.where = where
        self.timeout = timeout
        self._decoder = stun.StreamDecoder()
        self._pending: deque[stun.Message] = deque()
        self._sent: set[bytes] = set()

    def close(self) -> None:
        self.sock.close()

    def _fill(self, step: str, waiting_for: str, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ProbeFailure(step, f"timeout after {self.timeout}s waiting for {waiting_for}")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            hint = ""
            if self._decoder.received == 0:
                self._nudge(step, waiting_for)
                hint = (f" (not one byte from {self.where}: a TURN server answers in "
                        "milliseconds; wrong route, or a server that speaks neither STUN "
                        "nor HTTP?)")
            raise ProbeFailure(
                step, f"timeout after {self.timeout}s waiting for {waiting_for}{hint}"
            ) from None
        except OSError as e:
            raise ProbeFailure(step, f"connection error waiting for {waiting_for}: {e}") from e
        if not data:
            got = self._decoder.pending
            detail = _what_came_back(got) if got else "it closed the connection without answering"
            raise NotTurnServer(
                step, f"{self.where} is not a TURN/STUN server: expected {waiting_for}, {detail}"
            )
        try:
            self._pending.extend(self._decoder.feed(data))
        except stun.StunError as e:
            raise NotTurnServer(
                step, f"{self.where} is not a TURN/STUN server: expected {waiting_for}, "
                f"{_what_came_back(e.data or data)}"
            ) from e

    def _nudge(self, step: str, waiting_for: str) -> None:
        """Silence after a STUN request: find out whether an HTTP server is waiting for the end
        of a request line (Caddy does), so the report can say what answered on this route."""
        try:
            self.sock.sendall(b"\r\n\r\n")
            self.sock.settimeout(min(self.timeout, NUDGE_TIMEOUT))
            data = self.sock.recv(4096)
        except OSError:
            return
        if data.startswith(b"HTTP/"):
            raise NotTurnServer(
                step, f"{self.where} is not a TURN/STUN server: no answer to the STUN request "
                f"within {self.timeout}s, and a blank line then drew HTTP "
                f"({_status_line(data)!r})"
            )

    def send(self, data: bytes, step: str) -> None:
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise ProbeFailure(step, f"cannot send to {self.where}: {e}") from e

    def transact(self, data: bytes, step: str) -> stun.Message:
        """Send a request; return the response with its transaction id, keep indications."""
        request = stun.decode(data)
        waiting_for = f"the {stun.METHOD_NAMES.get(request.method, 'STUN')} response"
        self.send(data, step)
        self._sent.add(request.txid)
        deadline = time.monotonic() + self.timeout
        while True:
            for _ in range(len(self._pending)):
                m = self._pending.popleft()
                if m.cls in (stun.MessageClass.SUCCESS, stun.MessageClass.ERROR):
                    if m.txid == request.txid:
                        if m.method != request.method:
                            raise ProbeFailure(
                                step, f"expected {waiting_for}, got a {m.describe()}"
                            )
                        return m
                    if m.txid not in self._sent:
                        raise ProbeFailure(
                            step, f"expected {waiting_for} with transaction id "
                            f"{request.txid.hex()}, got a {m.describe()} with transaction id "
                            f"{m.txid.hex()}, which matches no request we sent"
                        )
                    continue  # a late answer to an earlier request
                self._pending.append(m)
            self._fill(step, waiting_for, deadline)

    def wait_indication(self, method: int, step: str, timeout: float) -> stun.Message:
        name = f"a {stun.METHOD_NAMES.get(method, 'STUN')} indication"
        deadline = time.monotonic() + timeout
        while True:
            for _ in range(len(self._pending)):
                m = self._pending.popleft()
                if m.cls == stun.MessageClass.INDICATION and m.method == method:
                    return m
            self._fill(step, name, deadline)


def binding(conn: TurnConnection) -> stun.Message:
    """A Binding request with FINGERPRINT; checks the answer's txid and XOR-MAPPED-ADDRESS."""
    txid = stun.new_transaction_id()
    req = stun.encode(stun.BINDING, stun.MessageClass.REQUEST, txid,
                      [(stun.SOFTWARE, SOFTWARE)], fingerprint=True)
    resp = conn.transact(req, "binding")
    if resp.cls != stun.MessageClass.SUCCESS:
        raise ProbeFailure("binding", f"expected a Binding success, got {resp.describe()}")
    if resp.check_fingerprint() is False:
        raise ProbeFailure("binding", "the Binding response's FINGERPRINT does not match")
    try:
        mapped = resp.xor_address(stun.XOR_MAPPED_ADDRESS)
    except stun.StunError as e:
        raise ProbeFailure("binding", f"bad XOR-MAPPED-ADDRESS: {e}") from e
    if mapped is None:
        raise ProbeFailure("binding", "the Binding success has no XOR-MAPPED-ADDRESS")
    return resp


@dataclass(slots=True)
class Allocation:
    conn: TurnConnection
    username: str
    password: str
    realm: str
    nonce: bytes
    relayed: stun.Address
    mapped: stun.Address | None
    lifetime: int | None
    stale_nonces: int = 0

    @property
    def key(self) -> bytes:
        return stun.long_term_key(self.username, self.realm, self.password)

    def request(self, method: int, attrs: AttrsFor, step: str) -> stun.Message:
        """An authenticated request; a 438 (stale nonce) is retried once with the new nonce.

        `attrs` gets the transaction id, which XOR-PEER-ADDRESS depends on."""
        for _ in range(2):
            txid = stun.new_transaction_id()
            auth = [(stun.USERNAME, self.username.encode()), (stun.REALM, self.realm.encode()),
                    (stun.NONCE, self.nonce)]
            data = stun.encode(method, stun.MessageClass.REQUEST, txid,
                               [*attrs(txid), *auth],
                               integrity_key=self.key, fingerprint=True)
            resp = self.conn.transact(data, step)
            err = resp.error
            if resp.cls == stun.MessageClass.ERROR and err is not None and err[0] == 438:
                self.nonce = resp.get(stun.NONCE) or self.nonce
                self.stale_nonces += 1
                continue
            if resp.cls != stun.MessageClass.SUCCESS:
                raise ProbeFailure(step, f"expected a {stun.METHOD_NAMES[method]} success, "
                                         f"got {resp.describe()}")
            if resp.check_integrity(self.key) is False:
                raise ProbeFailure(step, "the response's MESSAGE-INTEGRITY does not match "
                                         "our credentials")
            return resp
        raise ProbeFailure(step, "438 Stale Nonce twice in a row")

    def create_permission(self, peer: stun.Address) -> None:
        self.request(
            stun.CREATE_PERMISSION,
            lambda txid: [(stun.XOR_PEER_ADDRESS, stun.encode_xor_address(peer, txid))],
            "create-permission",
        )

    def send_indication(self, peer: stun.Address, payload: bytes) -> None:
        txid = stun.new_transaction_id()
        data = stun.encode(stun.SEND, stun.MessageClass.INDICATION, txid,
                           [(stun.XOR_PEER_ADDRESS, stun.encode_xor_address(peer, txid)),
                            (stun.DATA_ATTR, payload)], fingerprint=True)
        self.conn.send(data, "send")

    def wait_data(self, timeout: float) -> tuple[stun.Address | None, bytes | None]:
        m = self.conn.wait_indication(stun.DATA, "data", timeout)
        try:
            peer = m.xor_address(stun.XOR_PEER_ADDRESS)
        except stun.StunError as e:
            raise ProbeFailure("data", f"bad XOR-PEER-ADDRESS in the Data indication: {e}") from e
        return peer, m.get(stun.DATA_ATTR)

    def refresh(self, lifetime: int) -> int | None:
        resp = self.request(
            stun.REFRESH, lambda _: [(stun.LIFETIME, stun.encode_u32(lifetime))], "refresh"
        )
        return resp.lifetime


def allocate(conn: TurnConnection, username: str, password: str, lifetime: int = 600) -> Allocation:
    """Allocate a UDP relay with long-term credentials (RFC 8656 6.2, RFC 8489 9.2)."""
    base = [(stun.REQUESTED_TRANSPORT, stun.requested_transport()),
            (stun.LIFETIME, stun.encode_u32(lifetime)), (stun.SOFTWARE, SOFTWARE)]
    txid = stun.new_transaction_id()
    first = conn.transact(
        stun.encode(stun.ALLOCATE, stun.MessageClass.REQUEST, txid, base, fingerprint=True),
        "allocate",
    )
    if first.cls == stun.MessageClass.SUCCESS:
        raise ProbeFailure("allocate", "the server allocated without asking for credentials "
                                       "(expected 401 with REALM and NONCE): an open relay")
    err = first.error
    realm, nonce = first.text(stun.REALM), first.get(stun.NONCE)
    if err is None or err[0] != 401 or realm is None or nonce is None:
        raise ProbeFailure("allocate", f"expected 401 with REALM and NONCE, got {first.describe()}")
    alloc = Allocation(conn, username, password, realm, nonce, ("", 0), None, None)
    for _ in range(3):
        txid = stun.new_transaction_id()
        auth = [(stun.USERNAME, username.encode()), (stun.REALM, alloc.realm.encode()),
                (stun.NONCE, alloc.nonce)]
        resp = conn.transact(
            stun.encode(stun.ALLOCATE, stun.MessageClass.REQUEST, txid, [*base, *auth],
                        integrity_key=alloc.key, fingerprint=True),
            "allocate",
        )
        err = resp.error
        if resp.cls == stun.MessageClass.ERROR and err is not None and err[0] == 438:
            alloc.nonce = resp.get(stun.NONCE) or alloc.nonce
            alloc.realm = resp.text(stun.REALM) or alloc.realm
            alloc.stale_nonces += 1
            continue
        if resp.cls == stun.MessageClass.ERROR and err is not None and err[0] == 401:
            raise ProbeFailure(
                "allocate", f"401 {err[1]!r} for username {username!r} in realm {realm!r}: "
                "the server rejected the credentials (wrong password or shared secret?)"
            )
        if resp.cls != stun.MessageClass.SUCCESS:
            raise ProbeFailure("allocate", f"expected an Allocate success, got {resp.describe()}")
        if resp.check_integrity(alloc.key) is False:
            raise ProbeFailure("allocate", "the Allocate success's MESSAGE-INTEGRITY does not "
                                           "match our credentials")
        try:
            relayed = resp.xor_address(stun.XOR_RELAYED_ADDRESS)
            alloc.mapped = resp.xor_address(stun.XOR_MAPPED_ADDRESS)
            alloc.lifetime = resp.lifetime
        except stun.StunError as e:
            raise ProbeFailure("allocate", f"bad attribute in the Allocate success: {e}") from e
        if relayed is None:
            raise ProbeFailure("allocate", "the Allocate success has no XOR-RELAYED-ADDRESS")
        alloc.relayed = relayed
        return alloc
    raise ProbeFailure("allocate", "438 Stale Nonce three times in a row")
