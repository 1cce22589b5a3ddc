"""Finding and killing what a run left behind, and reading its CPU time (Linux /proc;
elsewhere the process group only); and making a run die with the process that started it.

Guarantees: a process is found by its process group or by the run's marker variable in its
environment; `kill_orphans` and `kill_leftovers` touch nothing else.

Dying with the parent (Linux): a child started with `die_with_parent()` as its preexec_fn is
sent SIGKILL by the kernel when the thread that started it ends (PR_SET_PDEATHSIG), and exits
at once if that parent was gone before the signal was armed. The kernel sends it to that one
process, not to what it started, so a `Guard` watches the rest: a small process of its own
session, started from this file before the run, that holds the read end of a pipe whose write
end only the harness holds. When the harness dies, however it dies (kill -9, a slot's Ray
actor killed), the pipe reaches end of file, and the guard SIGKILLs the run's process group and
every process carrying the run's marker, then exits. A run that ends normally ends its guard
first (a SIGKILL to a child not yet reaped, so never to another process).

What it does not do: find a descendant that left the group and scrubbed its environment (the
box's pid namespace does); outlive a kill of its own (someone who kills the guard too leaves
the run to `kill_orphans` on `--resume`); guard a run where /proc is missing (not Linux).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

RUN_MARKER_VAR = "AUTORESEARCH_RUN_MARKER"  # set in the child's env to find its descendants
KILL_CONFIRM_S = 5.0  # seconds to wait until killed processes are really gone

PROC = Path("/proc")
PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h): the signal a process gets when its parent dies


def _proc_state(pid: int) -> tuple[str, int] | None:
    """(state letter, process group) of a live process, or None if it is gone."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[0], int(fields[2])


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100  # /proc's time unit


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) used so far by `pid` and its descendants:
    each live (or not yet reaped) process's own time plus that of the children it reaped.
    A boxed run's init reaps every process of the box, so at the exit of the box's outer
    process its own figures hold the whole run. 0.0 without /proc."""
    return sum(cpu for _, cpu in _tree(pid)) / _TICKS


class CpuWait:
    """Seconds the run rooted at `pid` was held back by other programs, so far: each call looks
    again. The most that the main thread of any of its processes waited for a CPU while ready
    to run, less the CPU time of the run's other threads and processes, which may have been what
    it waited for. So a run slowed by a busy machine gets its wait back, and one that makes its
    own thread wait (busy processes on its own cores) gets nothing for it.

    The kernel's run delay (/proc/PID/task/PID/schedstat) grows only when a waiting thread gets
    a CPU, so a thread starved for seconds shows none of that wait until it runs. A wait in
    progress is added: from the first of this meter's looks that found the thread ready to run
    (state R) with the CPU time and run delay it still has, to now. A thread that is R at one
    look and has not run by the next cannot have slept in between (sleeping takes running), so
    that time was all waiting. Looks must come often (watch asks a run's deadline every
    DEADLINE_POLL_S) for a long wait to be seen whole; a wait is never overcounted. 0.0 without
    /proc or the kernel's schedstats."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._last: dict[int, tuple[str, int, int]] = {}  # pid: (state, ran ns, delay ns)
        self._since: dict[int, float] = {}  # pid: the first look that found its last sample

    def __call__(self) -> float:
        now = time.monotonic()
        tree = _tree(self.pid)
        total = sum(cpu for _, cpu in tree) / _TICKS
        best = 0.0
        for current, _ in tree:
            task = PROC / str(current) / "task" / str(current)
            try:
                ran, delay, _ = (int(f) for f in (task / "schedstat").read_text().split())
                stat = (task / "stat").read_text()
            except (OSError, ValueError):  # gone, or a kernel without schedstats
                continue
            sample = (stat[stat.rfind(")") + 2 :].split()[0], ran, delay)
            if self._last.get(current) != sample:
                self._last[current], self._since[current] = sample, now
            # ready to run at an earlier look and not run since: waiting all along
            pending = now - self._since[current] if sample[0] == "R" else 0.0
            best = max(best, (delay / 1e9 + pending) - (total - ran / 1e9))
        return best


def _tree(pid: int) -> list[tuple[int, int]]:
    """(pid, CPU ticks of it and the children it reaped) for `pid` and each live descendant."""
    found, pending, seen = [], [pid], set()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            stat = (PROC / str(current) / "stat").read_text()
            tasks = list((PROC / str(current) / "task").iterdir())
        except OSError:  # gone
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        found.append((current, sum(int(f) for f in fields[11:15])))  # u/s time, cu/cs time
        for task in tasks:
            try:
                pending += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
    return found


def _has_marker(pid: int, marker: bytes) -> bool:
    try:
        return marker in (PROC / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:  # gone, or another user's process
        return False


def _run_processes(pgid: int, marker: bytes) -> set[int]:
    """Live (non-zombie) processes in the group `pgid` or carrying `marker` in their env."""
    if not PROC.is_dir():
        return set()
    found = set()
    me = os.getpid()
    for entry in PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        pid = int(entry.name)
        state = _proc_state(pid)
        if state is None or state[0] in "ZX":
            continue
        if state[1] == pgid or _has_marker(pid, marker):
            found.add(pid)
    return found


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):  # nobody left in the group
        pass


def _wait_gone(pids: Iterable[int], timeout: float) -> None:
    """Wait (bounded) until SIGKILLed processes are gone or zombies."""
    deadline = time.monotonic() + timeout
    pending = set(pids)
    while pending and time.monotonic() < deadline:
        pending = {pid for pid in pending if (_proc_state(pid) or ("Z", 0))[0] not in "ZX"}
        if pending:
            time.sleep(0.01)  # SIGKILL is asynchronous; this is a short bounded confirmation


def kill_leftovers(pgid: int, marker: bytes) -> int:
    """SIGKILL the group and every marked process; returns how many were found alive."""
    alive = _run_processes(pgid, marker)
    signal_group(pgid, signal.SIGKILL)
    return _kill_until_gone(alive, lambda: _run_processes(pgid, marker))


def _kill_until_gone(alive: set[int], find: Callable[[], set[int]]) -> int:
    """SIGKILL `alive`, then whatever `find` still finds, a few rounds (a process may fork
    between a scan and the kill); returns how many were killed."""
    killed: set[int] = set()
    for _ in range(5):
        if not alive:
            break
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                continue
        killed |= alive
        _wait_gone(alive, KILL_CONFIRM_S)
        alive = find()
    return len(killed)


def kill_orphans(marker: str) -> int:
    """SIGKILL every live process of an earlier run started with `marker`; returns how many.

    For a harness killed with -9 mid-run: its children sit in their own process group and
    would keep the GPU until their next print. Only processes whose environment carries this
    run's marker are touched (Linux /proc; elsewhere nothing is found).
    """
    tag = f"{RUN_MARKER_VAR}={marker}".encode()
    return _kill_until_gone(marked_processes(tag), lambda: marked_processes(tag))


def marked_processes(tag: bytes) -> set[int]:
    if not PROC.is_dir():
        return set()
    me = os.getpid()
    found = set()
    for entry in PROC.iterdir():
        if entry.name.isdigit() and int(entry.name) != me:
            state = _proc_state(int(entry.name))
            if state is not None and state[0] not in "ZX" and _has_marker(int(entry.name), tag):
                found.add(int(entry.name))
    return found


# ------------------------------------------------------------------- dying with the parent


def die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn for Popen that has the kernel SIGKILL the child when the thread calling
    Popen ends (so call it from the thread that waits for the child), and makes the child exit
    if its parent died before that was armed; None where prctl is missing (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, not in the fork
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def arm() -> None:
        if prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0 or os.getppid() != parent:
            os._exit(70)  # no signal armed, or the parent is gone already: run nothing

    return arm


class Guard:
    """Kills a run's processes if the harness dies before the run is over (module docstring).

    Start it before the child, `watch(pgid)` once the child started, `release()` when the run
    is over and its processes are dealt with. Without /proc it does nothing.
    """

    def __init__(self, marker: str) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._write: int | None = None
        if not PROC.is_dir():
            return
        read, write = os.pipe()  # not inheritable: no other child holds the write end
        try:
            # -I -S: no site, no user paths; this file imports the standard library only
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", __file__, marker],
                stdin=read,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # a kill of the harness's group spares it
                close_fds=True,
            )
        except OSError:  # no process could be started: the run goes unguarded
            os.close(write)
            return
        finally:
            os.close(read)
        self._write = write

    def watch(self, pgid: int) -> None:
        """Tell the guard the run's process group."""
        if self._write is None:
            return
        try:
            os.write(self._write, f"{pgid}\n".encode())
        except OSError:  # the guard is gone: its marker scan still finds the run
            pass

    def release(self) -> None:
        """The run is over: end the guard before it sees the pipe close, and reap it."""
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait()
        if self._write is not None:
            os.close(self._write)
            self._write = None


def _guard(marker: str) -> None:
    """The guard's body: wait until the pipe on stdin closes, which, as the harness ends its
    guard first when a run is over, means the harness died; then kill the run's group and
    its marked processes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the harness
    received = b""
    while chunk := os.read(0, 4096):
        received += chunk
    for line in received.split(b"\n"):
        if line.isdigit():
            signal_group(int(line), signal.SIGKILL)
    kill_orphans(marker)


if __name__ == "__main__":  # started by Guard, as a script
    _guard(sys.argv[1])
