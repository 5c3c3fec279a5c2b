"""Process and port helpers shared by the tests: start real servers, always stop them."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

# One implementation of port picking and stop-by-PID for the bench and the tests.
from bench.procs import free_port, stop

__all__ = ["free_port", "running", "stop", "wait_port"]


def wait_port(
    host: str, port: int, timeout: float = 10.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Wait until something accepts TCP connections on host:port."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"process {proc.args!r} exited with {proc.returncode} before listening on {port}"
            )
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s") from None
            time.sleep(0.02)


@contextlib.contextmanager
def running(
    argv: Sequence[str | Path],
    *,
    log: Path,
    wait_for: tuple[str, int] | None = None,
    timeout: float = 15.0,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run argv with output to `log`; wait for its port; stop it afterwards even on failure."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [str(a) for a in argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
        )
    try:
        if wait_for is not None:
            try:
                wait_port(*wait_for, timeout=timeout, proc=proc)
            except Exception as e:
                raise RuntimeError(
                    f"{e}\n--- {log} ---\n{log.read_text(errors='replace')[-4000:]}"
                ) from e
        yield proc
    finally:
        stop(proc)
