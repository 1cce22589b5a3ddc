"""Finding and killing what a run left behind, and reading its CPU time (Linux /proc;
elsewhere the process group only).

Guarantees: a process is found by its process group or by the run's marker variable in its
environment; `kill_orphans` and `kill_leftovers` touch nothing else. What it does not do: find a
descendant that left the group and scrubbed its environment (the box's pid namespace does).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterable
from pathlib import Path

RUN_MARKER_VAR = "AUTORESEARCH_RUN_MARKER"  # set in the child's env to find its descendants
KILL_CONFIRM_S = 5.0  # seconds to wait until killed processes are really gone

PROC = Path("/proc")


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


def cpu_wait(pid: int) -> float:
    """Seconds the run rooted at `pid` was held back by other programs: the most that the main
    thread of any of its processes waited for a CPU while ready to run (the kernel's run
    delay, /proc/PID/task/PID/schedstat), less the CPU time of the run's other threads and
    processes, which may have been what it waited for. So a run slowed by a busy machine gets
    its wait back, and one that makes its own thread wait (busy processes on its own cores)
    gets nothing for it. 0.0 without /proc or the kernel's schedstats."""
    tree = _tree(pid)
    total = sum(cpu for _, cpu in tree) / _TICKS
    best = 0.0
    for current, _ in tree:
        try:
            ran, waited, _ = (
                (PROC / str(current) / "task" / str(current) / "schedstat").read_text().split()
            )
        except (OSError, ValueError):  # gone, or a kernel without schedstats
            continue
        best = max(best, int(waited) / 1e9 - (total - int(ran) / 1e9))
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
