"""What a run tells the operator after pyinfra's own output: one line per node saying how it
ended (cut over / rolled back / refused / untouched / failed), and the test-only pause between
two steps. Both hang off pyinfra's state callbacks, so the deploy files list only the
operator's steps.

Operations record a node's verdict with `verdict(...)` as they go (the steps that change a node
say how far it got, so a run stopped half-way by --fail-percent says so); a node that failed at
a step which judged nothing itself is named with that step (from pyinfra's own callback); a
node no step reached is untouched.
"""

from __future__ import annotations

import os
import sys
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

from pyinfra.api.exceptions import PyinfraError
from pyinfra.api.host import Host
from pyinfra.api.state import BaseStateCallback, State
from pyinfra.context import host

PAUSE_LIMIT = 600.0
_LOADED = time.monotonic()  # imported when the deploy file loads: after connecting
PREFIX = "orama-stealth:"

CUT_OVER = "cut over"
ROLLED_BACK = "rolled back"
REFUSED = "refused, untouched"
UNTOUCHED = "untouched"
FAILED = "failed"
HALF_WAY = "stopped half-way"  # the run stopped (e.g. --fail-percent) after this node changed
CADDY = "Caddy alone on :443/:80"
NOT_SERVING = "NOT serving through the router"
# Verdicts recorded by the step that failed the node: they already say why.
JUDGED_FAILURES = (REFUSED, ROLLED_BACK, FAILED, NOT_SERVING)


@dataclass
class RunLog:
    verdicts: dict[str, tuple[str, str]] = field(default_factory=dict)
    failed_at: dict[str, str] = field(default_factory=dict)
    pauses: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    started: float = field(default_factory=lambda: _LOADED)
    printed: bool = False

    def line(self, name: str) -> str:
        outcome, detail = self.verdicts.get(name, ("", ""))
        if name in self.failed_at and outcome not in JUDGED_FAILURES:
            # Failed at a step that judged nothing itself (time-out, lost connection, a later
            # check), whatever an earlier step recorded.
            outcome, detail = FAILED, f"at {self.failed_at[name]}" + (
                f"; {detail}" if detail else "")
        elif not outcome:
            outcome, detail = UNTOUCHED, "not reached: the run stopped before this node"
        return f"{PREFIX} {name}: {outcome}" + (f" ({detail})" if detail else "")

    def summary(self, state: Any) -> str:
        names = [h.name for h in state.inventory if state.is_host_in_limit(h)]
        wall = time.monotonic() - self.started
        head = f"{PREFIX} {len(names)} node(s), {wall:.1f}s since the deploy loaded:"
        return "\n".join([head, *(self.line(n) for n in names)])


_logs: weakref.WeakKeyDictionary[Any, RunLog] = weakref.WeakKeyDictionary()


class _Callbacks(BaseStateCallback):
    """pyinfra calls these for every state; each finds that state's RunLog."""

    @staticmethod
    def operation_host_error(state: State, host: Host, op_hash: Any, retry_count: int = 0,
                             max_retries: int = 0) -> None:
        names = ", ".join(sorted(state.get_op_meta(op_hash).names)) or str(op_hash)
        _logs[state].failed_at.setdefault(host.name, names)

    @staticmethod
    def operation_end(state: State, op_hash: Any) -> None:
        pause = _logs[state].pauses.pop(op_hash, None)
        if pause is not None:
            wait_for_resume(*pause)

    @staticmethod
    def host_disconnect(state: State, host: Host) -> None:
        # pyinfra disconnects only at the very end, after its results or its error ("No hosts
        # remaining!", --fail-percent): the first disconnect prints, once.
        log = _logs[state]
        if log.printed or not state.is_executing:  # --dry and errors before the run: no lines
            return
        log.printed = True
        print(log.summary(state), file=sys.stderr, flush=True)


def attach(state: Any) -> RunLog:
    """The run's log, registered with pyinfra on first use."""
    log = _logs.get(state)
    if log is None:
        log = _logs[state] = RunLog()
        state.add_callback_handler(_Callbacks())
    return log


def verdict(outcome: str, detail: str = "") -> None:
    """Record how the current node ended (the last verdict of a run wins)."""
    attach(host.state).verdicts[host.name] = (outcome, detail)


def pause_here(step: str) -> None:
    """With --data pause_after=<step>, stop the run once every node finished the current
    operation (for tests of an interrupted cutover): see wait_for_resume."""
    if host.data.get("pause_after") != step or host.current_op_hash is None:
        return
    resume = host.data.get("pause_resume_file")
    attach(host.state).pauses[host.current_op_hash] = (step, str(resume) if resume else None)


def wait_for_resume(step: str, resume: str | None) -> None:
    """Wait (bounded) until killed, or until the file `resume` (on this machine) appears, so a
    test can also change a node mid-run and let the run continue."""
    print(f"{PREFIX} paused after step={step}", file=sys.stderr, flush=True)
    deadline = time.monotonic() + PAUSE_LIMIT
    while time.monotonic() < deadline:
        if resume and os.path.exists(resume):
            print(f"{PREFIX} resumed after step={step}", file=sys.stderr, flush=True)
            return
        time.sleep(0.2)
    raise PyinfraError(f"paused after {step} for {PAUSE_LIMIT:.0f}s and nobody resumed it")
