"""Connection admission: `max_concurrent_conns` for the whole router, `max_conns_per_ip` per client.

Across worker processes, admission lives in shared memory (a memfd mapped before the fork).

The global count costs no lock and no system call: each worker owns one counter that only it
writes, and the live total is their sum. A worker adds its connection first and reads the sum
after, so two workers racing for the last place see each other and do not both get in; since
nothing orders a store before a later load across CPUs, the guarantee is that the total never
exceeds the cap by more than workers - 1, and only while that many admissions race in the same
instant. A dead worker's counter is reset by the supervisor before its replacement starts.

The per-address cap (off unless configured) needs one table that every worker updates, guarded
by one POSIX record lock on the memfd; with it on, the global check runs under that lock too,
so both caps are exact. A record lock (fcntl) rather than a semaphore because the kernel drops
it when its holder dies, so a crashed worker can never wedge admission for the others.

The per-address table is open addressing with linear probing and backward-shift deletion: an
address's slot is freed when its last connection closes, so memory is fixed (sized from
`max_concurrent_conns`, which bounds the number of distinct live addresses) and never grows with
the number of distinct clients ever seen. Each slot keeps one count per worker, so when a worker
dies the supervisor subtracts exactly what that worker held.

With one worker there is nothing to share: `LocalAdmission` does the same with two dicts.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import socket
import struct

ADMITTED = 0
REFUSED_GLOBAL = 1
REFUSED_PER_IP = 2

_HEADER = struct.Struct("=QQQ")  # magic, tracked addresses, capacity
_MAGIC = 0x4F52414D41444D31
_KEY = 16
_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")


def address_key(ip: str) -> bytes:
    """16 bytes per client address; IPv4 and IPv4-mapped IPv6 give the same key."""
    if ":" in ip:
        return socket.inet_pton(socket.AF_INET6, ip.split("%", 1)[0])
    return b"\0" * 10 + b"\xff\xff" + socket.inet_aton(ip)


def table_capacity(max_total: int) -> int:
    """A power of two at least twice the most addresses that can be live at once."""
    cap = 16
    while cap < 2 * max_total:
        cap *= 2
    return cap


class LocalAdmission:
    """One worker: plain dicts, no lock, no shared memory."""

    __slots__ = ("counts", "live", "max_per_ip", "max_total")

    def __init__(self, max_total: int, max_per_ip: int) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.live = 0
        self.counts: dict[bytes, int] = {}

    def set_limits(self, max_total: int, max_per_ip: int) -> int:
        self.max_total, self.max_per_ip = max_total, max_per_ip
        return max_total

    def admit(self, key: bytes) -> tuple[int, bool]:
        """(ADMITTED or a REFUSED_* reason, whether the address is tracked for release).

        The per-address cap is checked first: REFUSED_GLOBAL means this client would get in if
        there were room, which is when the worker may make room (see worker.admit)."""
        if self.max_per_ip <= 0:
            if self.live >= self.max_total:
                return REFUSED_GLOBAL, False
            self.live += 1
            return ADMITTED, False
        n = self.counts.get(key, 0)
        if n >= self.max_per_ip:
            return REFUSED_PER_IP, False
        if self.live >= self.max_total:
            return REFUSED_GLOBAL, False
        self.counts[key] = n + 1
        self.live += 1
        return ADMITTED, True

    def release(self, key: bytes, tracked: bool) -> None:
        self.live -= 1
        if tracked:
            n = self.counts[key] - 1
            if n:
                self.counts[key] = n
            else:
                del self.counts[key]

    def tracked(self) -> int:
        return len(self.counts)

    def total(self) -> int:
        return self.live

    def mine(self) -> int:
        return self.live

    @property
    def share(self) -> int:
        """This worker's fair part of max_total: all of it."""
        return self.max_total


class SharedTable:
    """The shared-memory table; create it in the supervisor before forking workers."""

    def __init__(self, max_total: int, workers: int, fd: int | None = None) -> None:
        """A new table, or (`fd`) the memfd of an existing one, handed over across an exec."""
        self.workers = workers
        if fd is not None:
            head = mmap.mmap(fd, _HEADER.size, mmap.MAP_SHARED, mmap.PROT_READ)
            magic, _tracked, capacity = _HEADER.unpack_from(head, 0)
            head.close()
            if magic != _MAGIC:
                raise ValueError("not an admission table")
            self.capacity = int(capacity)
        else:
            self.capacity = table_capacity(max_total)
        self.mask = self.capacity - 1
        # Per slot: address, total count, then one count per worker.
        self.slot = struct.Struct(f"={_KEY}sI{workers}I")
        # One 8-byte live-connection counter per worker, aligned so each load and store of one
        # is a single machine access.
        self.totals_off = 64
        self.table_off = self.totals_off + 8 * workers
        size = self.table_off + self.capacity * self.slot.size
        if fd is None:
            fd = os.memfd_create("orama-sni-admission", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
            self.fd = fd
            self.mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            _HEADER.pack_into(self.mm, 0, _MAGIC, 0, self.capacity)
        else:
            self.fd = fd
            self.mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.counts = memoryview(self.mm)[self.totals_off : self.table_off].cast("Q")

    def forget(self, index: int) -> None:
        """A worker of a draining generation exited: drop its global count only.

        Unlike `reap`, the per-address slots are left alone: they are placed by a hash whose
        seed is the generation's own (the supervisor that created the table may have been
        replaced since), and nobody admits into a draining generation's table anyway.
        """
        self.counts[index] = 0

    def close(self) -> None:
        self.counts.release()
        self.mm.close()
        os.close(self.fd)

    def lock(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_EX)

    def unlock(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def live(self) -> int:
        return sum(self.counts)

    def tracked(self) -> int:
        return int(_U64.unpack_from(self.mm, 8)[0])

    def for_worker(self, index: int, max_total: int, max_per_ip: int) -> SharedAdmission:
        return SharedAdmission(self, index, max_total, max_per_ip)

    def _find(self, key: bytes) -> tuple[int, bool]:
        """(slot offset, found). Not found: the empty slot where the key would go."""
        mm, size, base, mask = self.mm, self.slot.size, self.table_off, self.mask
        i = hash(key) & mask
        while True:
            off = base + i * size
            if _U32.unpack_from(mm, off + _KEY)[0] == 0:
                return off, False
            if mm[off : off + _KEY] == key:
                return off, True
            i = (i + 1) & mask

    def _delete(self, off: int) -> None:
        """Backward-shift deletion: no tombstones, so probes stay short forever."""
        mm, size, base, mask = self.mm, self.slot.size, self.table_off, self.mask
        hole = (off - base) // size
        i = hole
        while True:
            i = (i + 1) & mask
            ioff = base + i * size
            if _U32.unpack_from(mm, ioff + _KEY)[0] == 0:
                break
            home = hash(bytes(mm[ioff : ioff + _KEY])) & mask
            # Move the entry back into the hole unless its home lies cyclically in (hole, i].
            if (i - home) & mask >= (i - hole) & mask:
                hoff = base + hole * size
                mm[hoff : hoff + size] = mm[ioff : ioff + size]
                hole = i
        hoff = base + hole * size
        mm[hoff : hoff + size] = bytes(size)

    def reap(self, index: int) -> int:
        """Forget everything a dead worker held; returns how many connections that was."""
        held = int(self.counts[index])
        self.counts[index] = 0
        self.lock()
        try:
            mm, slot, base = self.mm, self.slot, self.table_off
            entries: list[tuple[bytes, int, list[int]]] = []
            for i in range(self.capacity):
                off = base + i * slot.size
                if _U32.unpack_from(mm, off + _KEY)[0] == 0:
                    continue
                key, _total, *counts = slot.unpack_from(mm, off)
                counts[index] = 0
                if sum(counts):
                    entries.append((key, sum(counts), counts))
            mm[base : base + self.capacity * slot.size] = bytes(self.capacity * slot.size)
            for key, total, counts in entries:
                off, _found = self._find(key)
                slot.pack_into(mm, off, key, total, *counts)
            _U64.pack_into(mm, 8, len(entries))
            return held
        finally:
            self.unlock()


class SharedAdmission:
    """One worker's handle on the shared table."""

    __slots__ = ("_count_off", "_counts", "_index", "max_per_ip", "max_total", "t")

    def __init__(self, table: SharedTable, index: int, max_total: int, max_per_ip: int) -> None:
        self.t = table
        self._counts = table.counts
        self._index = index
        self._count_off = _KEY + 4 + 4 * index  # this worker's count within a slot
        self.max_total = 0
        self.max_per_ip = 0
        self.set_limits(max_total, max_per_ip)

    def set_limits(self, max_total: int, max_per_ip: int) -> int:
        """The table was sized at start; a larger total needs a restart, so clamp to its size."""
        self.max_total = min(max_total, self.t.capacity // 2)
        self.max_per_ip = max_per_ip
        return self.max_total

    def admit(self, key: bytes) -> tuple[int, bool]:
        if self.max_per_ip > 0:
            return self._admit_tracked(key)
        counts, i = self._counts, self._index
        counts[i] += 1  # first count ourselves in, then look at the total (see the module doc)
        if sum(counts) > self.max_total:
            counts[i] -= 1
            return REFUSED_GLOBAL, False
        return ADMITTED, False

    def _admit_tracked(self, key: bytes) -> tuple[int, bool]:
        t = self.t
        mm = t.mm
        counts, i = self._counts, self._index
        t.lock()
        try:
            off, found = t._find(key)
            total = _U32.unpack_from(mm, off + _KEY)[0] if found else 0
            if total >= self.max_per_ip:
                return REFUSED_PER_IP, False
            if sum(counts) >= self.max_total:
                return REFUSED_GLOBAL, False
            if found:
                _U32.pack_into(mm, off + _KEY, total + 1)
                mine = _U32.unpack_from(mm, off + self._count_off)[0]
                _U32.pack_into(mm, off + self._count_off, mine + 1)
            else:
                mm[off : off + _KEY] = key
                _U32.pack_into(mm, off + _KEY, 1)
                _U32.pack_into(mm, off + self._count_off, 1)
                _U64.pack_into(mm, 8, _U64.unpack_from(mm, 8)[0] + 1)
            counts[i] += 1
            return ADMITTED, True
        finally:
            t.unlock()

    def release(self, key: bytes, tracked: bool) -> None:
        if not tracked:
            self._counts[self._index] -= 1
            return
        t = self.t
        mm = t.mm
        t.lock()
        try:
            self._counts[self._index] -= 1
            off, found = t._find(key)
            if not found:
                return
            total = _U32.unpack_from(mm, off + _KEY)[0] - 1
            mine = _U32.unpack_from(mm, off + self._count_off)[0]
            _U32.pack_into(mm, off + self._count_off, max(0, mine - 1))
            if total > 0:
                _U32.pack_into(mm, off + _KEY, total)
            else:
                t._delete(off)
                _U64.pack_into(mm, 8, _U64.unpack_from(mm, 8)[0] - 1)
        finally:
            t.unlock()

    def tracked(self) -> int:
        return self.t.tracked()

    def total(self) -> int:
        return self.t.live()

    def mine(self) -> int:
        """This worker's live connections."""
        return int(self._counts[self._index])

    @property
    def share(self) -> int:
        """This worker's fair part of max_total (rounded up)."""
        return -(-self.max_total // self.t.workers)


Admission = LocalAdmission | SharedAdmission
