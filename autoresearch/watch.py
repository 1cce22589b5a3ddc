"""Watching one child: its pipe copied to the log and split into lines by a reader thread,
its exit seen by a waiter thread, the limits (timeout, stall, cancel, budget) enforced in the
caller's thread, and whatever is left killed at the end.

Guarantees: every byte the child writes goes to the log as written; `Run.finish` leaves no
process of the group or marker alive, reaps the child and closes the pipe and threads. What it
does not do: start the child, or parse what it says (runner.py).
"""

from __future__ import annotations

import os
import queue
import re
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from typing import BinaryIO

from .procs import KILL_CONFIRM_S, kill_leftovers, signal_group
from .status import CrashClass

KILL_GRACE_S = 5.0  # seconds between SIGTERM and SIGKILL: room for the child to flush and exit
DRAIN_S = 2.0  # seconds to wait for the pipe to close once the child and its group are gone
CANCEL_POLL_S = 0.2  # seconds: how soon a set cancel event is noticed
# seconds between askings of a run's deadline while no line comes: it moves as what the run
# waited for a CPU grows (procs.CpuWait, which sees a long wait in progress only by looking)
DEADLINE_POLL_S = 0.5
MAX_WAIT_S = 60.0  # seconds: the longest single wait for output (bounds any timer arithmetic)
MAX_LINE_BYTES = 1 << 20  # a "line" longer than this is cut, so a child can't exhaust memory
READ_CHUNK = 1 << 16  # bytes per read from the child's pipe
HARNESS_PREFIX = "[autoresearch]"  # lines the harness adds to a run's log

_EXITED = object()  # queue item: the child has exited (not yet reaped)
_EOF = object()  # queue item: the reader has finished
_LINE_BREAK = re.compile(rb"\r\n|\n|\r")


class _Reader(threading.Thread):
    """Copies the child's pipe to the log file and hands complete lines to a queue."""

    def __init__(self, fd: int, log: BinaryIO, lines: queue.Queue[object]) -> None:
        super().__init__(name="autoresearch-run-reader", daemon=True)
        self._fd = fd
        self._log = log
        self._lines = lines
        self._wake_r, self._wake_w = os.pipe()
        self.last_output = time.monotonic()
        self.log_error: OSError | None = None

    def stop(self) -> None:
        """Make the reader finish now, even if someone still holds the pipe open."""
        try:
            os.write(self._wake_w, b"x")
        except OSError:  # already closed: the reader is done
            pass

    def close(self) -> None:
        os.close(self._wake_r)
        os.close(self._wake_w)

    def run(self) -> None:
        pending = b""
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self._fd, selectors.EVENT_READ)
                selector.register(self._wake_r, selectors.EVENT_READ)
                while True:
                    ready = {key.fd for key, _ in selector.select()}
                    if self._wake_r in ready:
                        break
                    chunk = os.read(self._fd, READ_CHUNK)
                    if not chunk:
                        break
                    self.last_output = time.monotonic()
                    self._write_log(chunk)
                    pending = self._emit_lines(pending + chunk)
            if pending.rstrip(b"\r"):
                self._emit(pending.rstrip(b"\r"))
        finally:
            self._lines.put(_EOF)

    def _write_log(self, chunk: bytes) -> None:
        if self.log_error is not None:
            return
        try:
            self._log.write(chunk)
            self._log.flush()
        except OSError as error:
            self.log_error = error
            self._lines.put(f"{HARNESS_PREFIX} could not write the log: {error}")

    def _emit_lines(self, data: bytes) -> bytes:
        hold = b""
        if data.endswith(b"\r"):  # maybe the first half of \r\n: wait for the next chunk
            data, hold = data[:-1], b"\r"
        *lines, rest = _LINE_BREAK.split(data)
        for line in lines:
            self._emit(line)
        while len(rest) > MAX_LINE_BYTES:
            self._emit(rest[:MAX_LINE_BYTES])
            rest = rest[MAX_LINE_BYTES:]
        return rest + hold

    def _emit(self, line: bytes) -> None:
        self._lines.put(line.decode("utf-8", errors="replace"))


def _wait_exit(proc: subprocess.Popen[bytes], events: queue.Queue[object]) -> None:
    """Report the child's exit without reaping it, so its pid (= the group id) stays taken
    until the leftovers of its group are killed."""
    try:
        if hasattr(os, "waitid"):
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        else:  # macOS before Python 3.13: reap now, a negligible pgid-reuse window remains
            proc.wait()
    except ChildProcessError:  # reaped elsewhere; it has exited either way
        pass
    finally:
        events.put(_EXITED)


class Run:
    """State of one run while the caller's thread watches it."""

    def __init__(self, proc: subprocess.Popen[bytes], log: BinaryIO, marker: bytes) -> None:
        self.proc = proc
        self.marker = marker
        # Unbounded: the reader must never block on a slow callback, or the log would lag.
        self.events: queue.Queue[object] = queue.Queue()
        assert proc.stdout is not None
        self.reader = _Reader(proc.stdout.fileno(), log, self.events)
        self.waiter = threading.Thread(
            target=_wait_exit, args=(proc, self.events), name="autoresearch-run-wait", daemon=True
        )
        self.reader.start()
        self.waiter.start()
        self.exited = False
        self.eof = False
        self.exited_at: float | None = None
        self.reaped_cpu = 0.0  # CPU s of the child and the children it reaped (wait4)
        self.kill_reason: str | None = None
        self.leftovers = 0

    def _reap(self) -> None:
        """Reap the child, keeping its resource usage (what it and the children it waited for
        used: a box's whole run, its main process being the box's pid 1)."""
        if self.proc.returncode is not None or not hasattr(os, "wait4"):
            self.proc.wait()
            return
        try:
            _, status, usage = os.wait4(self.proc.pid, 0)
        except ChildProcessError:  # reaped elsewhere
            self.proc.wait()
            return
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.reaped_cpu = usage.ru_utime + usage.ru_stime

    def next_event(self, timeout: float) -> object | None:
        try:
            item = self.events.get(timeout=max(timeout, 0.001))
        except queue.Empty:
            return None
        if item is _EXITED:
            self.exited = True
            self.exited_at = time.monotonic()
        elif item is _EOF:
            self.eof = True
        return item

    def terminate(self, reason: str) -> None:
        self.kill_reason = reason
        signal_group(self.proc.pid, signal.SIGTERM)

    def kill_leftovers(self) -> None:
        self.leftovers += kill_leftovers(self.proc.pid, self.marker)

    def finish(self) -> None:
        """Kill whatever is left, reap the child, stop the threads, close the pipe."""
        if not self.exited:
            signal_group(self.proc.pid, signal.SIGKILL)
            self.waiter.join(KILL_CONFIRM_S)
        self.kill_leftovers()
        self._reap()
        if not self.eof:
            self.reader.stop()
        self.reader.join(DRAIN_S)
        self.waiter.join(DRAIN_S)
        if not self.reader.is_alive():
            self.reader.close()
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def watch(
    run: Run,
    *,
    started: float,
    timeout: float,
    stall_timeout: float | None,
    cancel: threading.Event | None,
    on_line: Callable[[str], None],
    deadline: Callable[[], float | None] | None = None,
) -> None:
    """Pass lines on until the child has exited and its output has ended; enforce the limits
    (`deadline`: when the run is over its training budget, asked again after every line and
    every DEADLINE_POLL_S)."""
    killed_at: float | None = None
    drain_until: float | None = None
    while not (run.exited and run.eof):
        now = time.monotonic()
        waits = []
        if not run.exited and run.kill_reason is None:
            reason = None
            over_at = deadline() if deadline is not None else None
            if cancel is not None and cancel.is_set():
                reason = CrashClass.interrupted
            elif now >= started + timeout:
                reason = CrashClass.timeout
            elif stall_timeout is not None and now >= run.reader.last_output + stall_timeout:
                reason = CrashClass.stall
            elif over_at is not None and now >= over_at:
                reason = CrashClass.over_budget
            if reason is not None:
                run.terminate(reason)
                killed_at = now
            else:
                waits.append(started + timeout - now)
                if over_at is not None:
                    waits.append(min(over_at - now, DEADLINE_POLL_S))
                if stall_timeout is not None:
                    waits.append(run.reader.last_output + stall_timeout - now)
                if cancel is not None:
                    waits.append(CANCEL_POLL_S)
        if killed_at is not None and not run.exited:
            if now >= killed_at + KILL_GRACE_S:
                signal_group(run.proc.pid, signal.SIGKILL)
            waits.append(max(killed_at + KILL_GRACE_S - now, CANCEL_POLL_S))
        if run.exited and not run.eof:
            # The child is gone but the pipe is still open: a descendant holds it.
            if drain_until is None:
                run.kill_leftovers()
                drain_until = now + DRAIN_S
            elif now >= drain_until:
                run.reader.stop()
            waits.append(max(drain_until - now, CANCEL_POLL_S))
        item = run.next_event(min([*waits, MAX_WAIT_S]))
        if isinstance(item, str):
            on_line(item)
