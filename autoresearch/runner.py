"""One training child: launch, stream, time out, kill, parse, classify.

Guarantees of `run_training`:
- the child runs in its own session and process group, with stdout and stderr merged into one
  pipe; every byte it writes goes to the log file as written (flushed per chunk), and every
  line (split on \\n, \\r\\n or \\r) goes to the callbacks, which run in the caller's thread;
- a hard timeout, a stall timeout (no output for N seconds) and a cancel event all end the run
  the same way: SIGTERM to the whole group, a short grace, then SIGKILL;
- when it returns, no process of the run is left running: members of the child's process
  group are killed, and on Linux so is any descendant that moved to a new session (found by
  a marker variable in its environment) — a descendant that also scrubbed its environment is
  the one case not covered;
- the child is reaped, and the pipe, selector, threads and log file are closed, also when a
  callback raises or the caller is interrupted (the child is then killed and the exception
  propagates);
- a crashed run is data: `RunResult.crash_class` says what kind of crash, never an exception.

- with `box` (sandbox.py), the child runs in a bubblewrap box of its own, made fresh for the
  run: it sees the train split and copies of train.py and prepare.py, writes only a private
  directory (the checkpoint is moved out of it), and every process it started ends with it;
- with `budget` (Budget), the run is held to its training time: its CPU time on the cpu
  device, wall time on a GPU.

What it does not do: box the child when no `box` is given (it then runs with the user's rights;
`network_isolation` only takes its network away where the OS allows), limit its memory, or
decide whether a result is good.
"""

from __future__ import annotations

import ast
import functools
import json
import math
import os
import queue
import re
import selectors
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from . import sandbox

KILL_GRACE_S = 5.0  # seconds between SIGTERM and SIGKILL: room for the child to flush and exit
DRAIN_S = 2.0  # seconds to wait for the pipe to close once the child and its group are gone
KILL_CONFIRM_S = 5.0  # seconds to wait until killed processes are really gone
CANCEL_POLL_S = 0.2  # seconds: how soon a set cancel event is noticed
MAX_WAIT_S = 60.0  # seconds: the longest single wait for output (bounds any timer arithmetic)
TAIL_LINES = 50  # lines of output kept in RunResult.log_tail
RECENT_LINES = 1000  # lines kept in memory to find the summary block and classify a crash
MAX_LINE_BYTES = 1 << 20  # a "line" longer than this is cut, so a child can't exhaust memory
MAX_KEPT_LINE_CHARS = 4096  # characters of a line kept in memory (the log keeps everything)
READ_CHUNK = 1 << 16  # bytes per read from the child's pipe
CPU_POLL_S = 0.5  # seconds between looks at a run's CPU time (Budget's cpu clock)
# CPU seconds a run may use besides TIME_BUDGET, at least (budget_grace): a cold start-up
# (2.2-2.5 CPU s to import torch, numpy, tiktoken; about 1 more for the data and the model),
# step 0, which train.py does not time, the last step, which ends past the budget (a
# cpu-preset step took 5-6 CPU s on a loaded 2-core machine), and the checkpoint
CPU_GRACE_S = 20.0

RUN_MARKER_VAR = "AUTORESEARCH_RUN_MARKER"  # set in the child's env to find its descendants
HARNESS_PREFIX = "[autoresearch]"  # lines the harness adds to a run's log

CRASH_CLASSES = (
    "syntax",
    "import",
    "oom",
    "nan",
    "timeout",
    "stall",
    "interrupted",
    "over_budget",
    "no_summary",
    "other",
)

# Environment variables never passed to the child: names containing any of these words.
SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL")
SECRET_NAMES = ("OPENAI_API_KEY", "AUTORESEARCH_API_KEY")
# Known names that contain a secret word but hold no secret.
NOT_SECRET_NAMES = ("TOKENIZERS_PARALLELISM",)


@dataclass
class Step:
    """One live progress line of train.py, parsed. Missing fields are NaN."""

    step: int
    pct: float
    loss: float
    dt_ms: float
    tok_per_sec: float
    mfu: float
    remaining_s: float


@dataclass(frozen=True)
class Budget:
    """The training time a run is held to: `seconds` (TIME_BUDGET) plus `grace`, on one of two
    clocks. The rule, for both: an honest train.py meets it on a loaded machine, and time spent
    training before the first step line or after the budget is counted.

    `clock="cpu"` (a run on the CPU): everything is counted in CPU seconds (user + system, all
    threads) of the run's processes, from launch (a warm child's go: the imports done before it
    are the harness's, measured and left out) to the exit, start-up included; train.py counts
    its own TIME_BUDGET on the same clock (`time.process_time`). A loaded machine stretches
    wall time, not CPU time, so load neither makes an honest run late nor gives one more
    steps; and training before the first step line or after the last is training on this
    clock like any other. `grace` (`budget_grace`) is what start-up (imports, data, the model),
    the checkpoint and the exit take in CPU seconds: the most a cheat can gain. A run past
    seconds + grace is stopped there (sampled every CPU_POLL_S) or judged at its exit.

    `clock="wall"` (a GPU, whose work the host's CPU time does not measure): the clock starts
    at the run's first step line (train.py prints it after step 0, whose compile is not
    training time) and stops at the child's exit (`until_exit`, for a sealed session, whose
    evaluator scores the checkpoint in a process of its own) or else at its last step line
    (train.py's own evaluation follows it). What comes before the first step line is not
    counted, so it may take at most `startup` seconds from launch (imports, data, the model,
    step 0's compile): a first step line later than that makes the run `over_budget`, stopped
    when the line comes; else a run could train there unseen. A GPU host runs one session at
    a time, so its load is the session's own.

    On either clock, with `steps_required` (train.py's contract: it prints step lines) a run
    that exits without a step line does not count, and on the wall clock one with none by
    `startup` is stopped; without it (another command), a run that prints no step line is
    timed from launch, with `startup` more allowed. A run past the limit is `over_budget`,
    whatever it measured: stopped when it gets there (sealed), or when a step line comes past
    it (unsealed), else judged when it exits.
    """

    seconds: float
    grace: float
    startup: float
    until_exit: bool = True
    steps_required: bool = False
    clock: str = "wall"  # "wall" or "cpu"

    def _clock(self, launched: float, first_step: float | None) -> tuple[float, str, float]:
        """(when the clock started, what started it, the seconds allowed from then)."""
        limit = self.seconds + self.grace
        if self.clock == "cpu":
            return launched, "launch", limit
        if first_step is None:
            return launched, "launch", self.startup if self.steps_required else limit + self.startup
        return first_step, "its first step line", limit

    def _slow_start(self, launched: float, first_step: float | None, exited: bool) -> str | None:
        """What the run did wrong before its first step line, None if nothing: the line came
        past `startup` (wall clock); or, steps required, none came before the deadline or the
        exit."""
        if first_step is not None:
            if self.clock == "cpu" or first_step - launched <= self.startup:
                return None
            return (
                f"its first step line came {first_step - launched:.1f} s after launch, past the "
                f"{self.startup:g} s allowed for start-up (imports, data, compile), which is not "
                "counted as training"
            )
        if not self.steps_required or (self.clock == "cpu" and not exited):
            return None
        missing = (
            "it exited without a step line"
            if exited
            else f"no step line within the {self.startup:g} s allowed for start-up (imports, "
            "data, compile)"
        )
        return f"{missing}; the clock starts at the first step line, so train.py must print them"

    def deadline(
        self,
        launched: float,
        first_step: float | None,
        last_step: float | None,
        cpu: float | None = None,
    ) -> float | None:
        """When to stop a run still going (monotonic), or None: not before it exits. `cpu`:
        the CPU seconds the run has used so far (the cpu clock)."""
        if self.clock == "cpu":
            if cpu is not None and cpu > self.seconds + self.grace:
                return launched  # over: at once
            return time.monotonic() + CPU_POLL_S  # look again then
        if first_step is not None and self._slow_start(launched, first_step, False) is not None:
            return first_step  # too late: at once
        start, _, limit = self._clock(launched, first_step)
        if self.until_exit or (first_step is None and self.steps_required):
            return start + limit
        if first_step is not None and last_step is not None and last_step > start + limit:
            return last_step  # a step line past the limit: it is still training
        return None

    def stopped(self, launched: float, first_step: float | None, cpu: float | None = None) -> str:
        """The log line for a run stopped at its deadline."""
        slow = self._slow_start(launched, first_step, exited=False)
        if slow is not None:
            return f"over budget: {slow}; killed, the result does not count"
        _, since, limit = self._clock(launched, first_step)
        if self.clock == "cpu":
            return (
                f"over budget: {cpu or 0.0:.1f} CPU s since launch, past the {limit:g} s allowed "
                f"(TIME_BUDGET {self.seconds:g} s + {self.grace:g} s, all processes of the run, "
                "start-up included); killed, the result does not count"
            )
        return (
            f"over budget: still running {limit:g} s after {since} (TIME_BUDGET "
            f"{self.seconds:g} s + {limit - self.seconds:g} s); killed, the result does not count"
        )

    def overrun(
        self,
        launched: float,
        first_step: float | None,
        last_step: float | None,
        exited: float,
        cpu: float | None = None,
    ) -> str | None:
        """The log line for a run that exited past its limit; None when within it."""
        slow = self._slow_start(launched, first_step, exited=True)
        if slow is not None:
            return f"over budget: {slow}; the result does not count"
        start, since, limit = self._clock(launched, first_step)
        if self.clock == "cpu":
            if cpu is None or cpu <= limit:
                return None
            return (
                f"over budget: {cpu:.1f} CPU s from launch to its exit, past the {limit:g} s "
                f"allowed (TIME_BUDGET {self.seconds:g} s + {self.grace:g} s, all processes of "
                "the run, start-up included); the result does not count"
            )
        if self.until_exit or last_step is None:
            end, until = exited, "its exit"
        else:
            end, until = last_step, "its last step line"
        if end - start <= limit:
            return None
        return (
            f"over budget: {end - start:.1f} s from {since} to {until}, past the {limit:g} s "
            f"allowed (TIME_BUDGET {self.seconds:g} s + {limit - self.seconds:g} s); "
            "the result does not count"
        )


def budget_grace(seconds: float, clock: str = "wall") -> float:
    """What a run may take past TIME_BUDGET. Wall clock, between its first step line and its
    exit: the untimed steps after the first, saving the checkpoint, the interpreter's exit.
    CPU clock, from launch to exit: start-up, step 0, the last step's overrun and the
    checkpoint (CPU_GRACE_S), or 10 % of a long budget."""
    if clock == "cpu":
        return max(CPU_GRACE_S, 0.1 * seconds)
    return max(30.0, 0.1 * seconds)


def cpu_clock_available() -> bool:
    """Whether the CPU time of a run's processes can be read here (Linux /proc)."""
    return (_PROC / "self" / "task").is_dir()


@dataclass
class RunResult:
    """What one training child did. A crash is described here, never raised."""

    exit_code: int | None  # negative: killed by that signal; None: it never started
    summary: dict[str, float]  # the last `---` block; empty when there was none
    crash_class: str | None  # one of CRASH_CLASSES; None when the run is ok
    wall_seconds: float  # from launch until the child exited, measured by the harness
    log_path: Path
    log_tail: str  # the last TAIL_LINES lines of output
    last_step: Step | None

    @property
    def ok(self) -> bool:
        """Exit 0, not killed by the harness, and a finite val_bpb in the summary."""
        val_bpb = self.summary.get("val_bpb")
        return (
            self.crash_class is None
            and self.exit_code == 0
            and val_bpb is not None
            and math.isfinite(val_bpb)
        )


# ---------------------------------------------------------------------------------------------
# Parsing train.py's output contract

_NUMBER = r"[-+]?(?:nan|inf|[\d,]*\.?\d+(?:[eE][-+]?\d+)?)"
_STEP_HEAD = re.compile(rf"^step\s*:?\s*(\d+)\s*\(\s*({_NUMBER})\s*%\s*\)", re.IGNORECASE)
_STEP_FIELD = re.compile(rf"^\s*([a-z_/]+)\s*:?\s*({_NUMBER})\s*(ms|s|%)?\s*$", re.IGNORECASE)
_STEP_KEYS = {
    "loss": "loss",
    "dt": "dt_ms",
    "tok/sec": "tok_per_sec",
    "tok/s": "tok_per_sec",
    "mfu": "mfu",
    "remaining": "remaining_s",
}
_SUMMARY_ITEM = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*:\s*(\S+)\s*$")


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def parse_step(line: str) -> Step | None:
    """Parse a live line such as
    `step 00012 (4.1%) | loss 5.123456 | dt 812ms | tok/sec 20,123 | mfu 1.2% | remaining 23s`.

    Also accepts `key: value` fields and extra fields (upstream's `lrm`, `epoch`), which are
    ignored. Returns None unless the line has a step number, a percentage and a loss.
    """
    head, *fields = line.strip().split("|")
    match = _STEP_HEAD.match(head.strip())
    if match is None:
        return None
    values: dict[str, float] = {}
    for field in fields:
        item = _STEP_FIELD.match(field)
        if item is None or item.group(1).lower() not in _STEP_KEYS:
            continue
        key, value, unit = _STEP_KEYS[item.group(1).lower()], _number(item.group(2)), item.group(3)
        if key == "dt_ms" and unit == "s":
            value *= 1000.0
        values[key] = value
    if "loss" not in values:
        return None
    return Step(
        step=int(match.group(1)),
        pct=_number(match.group(2)),
        loss=values["loss"],
        dt_ms=values.get("dt_ms", math.nan),
        tok_per_sec=values.get("tok_per_sec", math.nan),
        mfu=values.get("mfu", math.nan),
        remaining_s=values.get("remaining_s", math.nan),
    )


def parse_summary(text: str) -> dict[str, float]:
    """The `key: value` lines after the last `---` line that has any, as floats.

    Lines in the block that are not `key: numeric value` are skipped (a stray warning does not
    end the block); the first occurrence of a key wins. `nan` and `inf` are kept as floats.
    Returns {} when no `---` line is followed by a numeric item.
    """
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == "---"]
    for start in reversed(starts):
        end = next((j for j in starts if j > start), len(lines))
        summary: dict[str, float] = {}
        for line in lines[start + 1 : end]:
            item = _SUMMARY_ITEM.match(line.strip())
            if item is None or item.group(1) in summary:
                continue
            try:
                summary[item.group(1)] = _number(item.group(2))
            except ValueError:
                continue
        if summary:
            return summary
    return {}


# ---------------------------------------------------------------------------------------------
# Crash classes

_EXCEPTION_LINE = re.compile(
    r"^(?:[A-Za-z_][\w]*\.)*([A-Za-z_]\w*(?:Error|Exception))\b(?::\s*(.*))?$", re.MULTILINE
)
_EXCEPTION_CLASSES = {
    "SyntaxError": "syntax",
    "IndentationError": "syntax",
    "TabError": "syntax",
    "ImportError": "import",
    "ModuleNotFoundError": "import",
    "OutOfMemoryError": "oom",
    "MemoryError": "oom",
    "FloatingPointError": "nan",
}
_OOM_TEXT = re.compile(
    r"out of memory|OutOfMemoryError|\bMemoryError\b|Cannot allocate memory"
    r"|CUBLAS_STATUS_ALLOC_FAILED|killed by signal: Killed",
    re.IGNORECASE,
)
_NAN_TEXT = re.compile(
    r"\bNaN\b|(?:loss|bpb)\b[^\n]{0,40}?\b(?:nan|inf)\b|diverg|explo(?:de|ded|ding|sion)"
    r"|non-finite|not finite|FloatingPointError",
)
_NAN_TEXT_ANYCASE = re.compile(r"(?:loss|bpb)\b[^\n]{0,40}?\b(?:nan|inf)\b", re.IGNORECASE)
_TEXT_CLASSES = (
    ("syntax", re.compile(r"^\s*(?:SyntaxError|IndentationError|TabError)\b", re.MULTILINE)),
    ("import", re.compile(r"^\s*(?:ModuleNotFoundError|ImportError)\b", re.MULTILINE)),
    ("oom", _OOM_TEXT),
    ("nan", _NAN_TEXT),
    ("nan", _NAN_TEXT_ANYCASE),
)
_SIGKILL_CODES = (-signal.SIGKILL, 128 + signal.SIGKILL)  # 137: SIGKILL seen through a shell


def _classify_message(name: str, message: str) -> str | None:
    if name in _EXCEPTION_CLASSES:
        return _EXCEPTION_CLASSES[name]
    if _OOM_TEXT.search(message):
        return "oom"
    if _NAN_TEXT.search(message) or _NAN_TEXT_ANYCASE.search(message):
        return "nan"
    return None


def classify_crash(
    log_text: str,
    exit_code: int | None,
    *,
    timed_out: bool,
    stalled: bool,
    interrupted: bool,
) -> str:
    """Name what kind of crash a run that is not ok was (one of CRASH_CLASSES).

    Order of evidence: what the harness did (interrupted, timeout, stall); then the last Python
    exception line in the log (its type and message); then known messages anywhere in the log
    (syntax, import, out of memory, NaN/diverged/exploded); then the exit code: 0 means the run
    finished without a valid val_bpb ("no_summary"), SIGKILL that the harness did not send is
    most often the kernel's OOM killer ("oom"); anything else is "other".
    """
    if interrupted:
        return "interrupted"
    if timed_out:
        return "timeout"
    if stalled:
        return "stall"
    exceptions = _EXCEPTION_LINE.findall(log_text)
    if exceptions:
        name, message = exceptions[-1]
        found = _classify_message(name, message)
        if found is not None:
            return found
    for crash_class, pattern in _TEXT_CLASSES:
        if pattern.search(log_text):
            return crash_class
    if exit_code == 0:
        return "no_summary"
    if exit_code in _SIGKILL_CODES:
        return "oom"
    return "other"


# ---------------------------------------------------------------------------------------------
# The child's environment


def _is_secret(name: str) -> bool:
    upper = name.upper()
    if upper in NOT_SECRET_NAMES:
        return False
    return upper in SECRET_NAMES or any(word in upper for word in SECRET_WORDS)


def child_env(
    base: Mapping[str, str],
    *,
    preset: str,
    device: str,
    gpu: str | None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment for a training child: `base` plus `extra`, minus anything secret.

    Dropped: every variable whose name contains KEY, TOKEN, SECRET, PASSWORD, PASSWD or
    CREDENTIAL (any case), also when it comes from `extra` (TOKENIZERS_PARALLELISM is kept).
    Set: PYTHONUNBUFFERED=1 (so lines arrive as they are printed), AUTORESEARCH_PRESET,
    AUTORESEARCH_DEVICE, CUDA_VISIBLE_DEVICES when `gpu` is given (otherwise as in base), and
    OMP_WAIT_POLICY=PASSIVE unless given: the cpu clock counts the run's CPU time, and
    OpenMP's default of spinning while a thread waits for a core another program holds burned
    CPU time without work on a loaded machine (a 10 CPU s run at load ~5 took 4 steps where
    it took 7 with PASSIVE, one run each; 7 is what the same budget gives on an idle machine).
    """
    merged = {**base, **(extra or {})}
    env = {name: value for name, value in merged.items() if not _is_secret(name)}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env["PYTHONUNBUFFERED"] = "1"
    env["AUTORESEARCH_PRESET"] = preset
    env["AUTORESEARCH_DEVICE"] = device
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


# ---------------------------------------------------------------------------------------------
# Network isolation


@dataclass(frozen=True)
class Isolation:
    """How training children are cut off from the network on this machine."""

    prefix: tuple[str, ...]  # put in front of the child's command; () when unavailable
    note: str  # what was found, for session.json and the display


NO_NETWORK = ("unshare", "--net", "--map-root-user")  # util-linux: a new, empty network namespace
PROBE_TIMEOUT_S = 10.0


@functools.cache
def network_isolation() -> Isolation:
    """Probe once whether this OS lets an unprivileged process drop its network.

    On Linux with unprivileged user namespaces, `unshare --net --map-root-user CMD` runs CMD in
    a network namespace of its own, with no interface but a down loopback: no connection in
    or out, also to localhost. The command keeps the pid (unshare execs it), so the process
    group, signals and /proc bookkeeping of `run_training` work unchanged. Elsewhere (macOS,
    containers without user namespaces, no util-linux) the child keeps the network.
    """
    if not sys.platform.startswith("linux"):
        return Isolation((), f"network isolation unavailable on {sys.platform}")
    if shutil.which(NO_NETWORK[0]) is None:
        return Isolation((), "network isolation unavailable: no `unshare` (util-linux)")
    try:
        proc = subprocess.run(
            [*NO_NETWORK, "true"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=PROBE_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return Isolation((), f"network isolation unavailable: {error}")
    if proc.returncode != 0:
        reason = proc.stderr.decode(errors="replace").strip().splitlines()
        return Isolation(
            (), f"network isolation unavailable: {reason[-1] if reason else proc.returncode}"
        )
    return Isolation(NO_NETWORK, "training runs without network (unshare --net)")


# ---------------------------------------------------------------------------------------------
# Finding and killing what a run left behind (Linux /proc; elsewhere the process group only)

_PROC = Path("/proc")


def _proc_state(pid: int) -> tuple[str, int] | None:
    """(state letter, process group) of a live process, or None if it is gone."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
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
    ticks, pending, seen = 0, [pid], set()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            stat = (_PROC / str(current) / "stat").read_text()
            tasks = list((_PROC / str(current) / "task").iterdir())
        except OSError:  # gone
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        ticks += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
        for task in tasks:
            try:
                pending += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
    return ticks / _TICKS


def _has_marker(pid: int, marker: bytes) -> bool:
    try:
        return marker in (_PROC / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:  # gone, or another user's process
        return False


def _run_processes(pgid: int, marker: bytes) -> set[int]:
    """Live (non-zombie) processes in the group `pgid` or carrying `marker` in their env."""
    if not _PROC.is_dir():
        return set()
    found = set()
    me = os.getpid()
    for entry in _PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        pid = int(entry.name)
        state = _proc_state(pid)
        if state is None or state[0] in "ZX":
            continue
        if state[1] == pgid or _has_marker(pid, marker):
            found.add(pid)
    return found


def _signal_group(pgid: int, sig: int) -> None:
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


def _kill_leftovers(pgid: int, marker: bytes) -> int:
    """SIGKILL the group and every marked process; returns how many were found alive."""
    alive = _run_processes(pgid, marker)
    _signal_group(pgid, signal.SIGKILL)
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
    return _kill_until_gone(_marked_processes(tag), lambda: _marked_processes(tag))


def _marked_processes(tag: bytes) -> set[int]:
    if not _PROC.is_dir():
        return set()
    me = os.getpid()
    found = set()
    for entry in _PROC.iterdir():
        if entry.name.isdigit() and int(entry.name) != me:
            state = _proc_state(int(entry.name))
            if state is not None and state[0] not in "ZX" and _has_marker(int(entry.name), tag):
                found.add(int(entry.name))
    return found


# ---------------------------------------------------------------------------------------------
# The child and its two helper threads

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


class _Run:
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
        _signal_group(self.proc.pid, signal.SIGTERM)

    def kill_leftovers(self) -> None:
        self.leftovers += _kill_leftovers(self.proc.pid, self.marker)

    def finish(self) -> None:
        """Kill whatever is left, reap the child, stop the threads, close the pipe."""
        if not self.exited:
            _signal_group(self.proc.pid, signal.SIGKILL)
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


def _watch(
    run: _Run,
    *,
    started: float,
    timeout: float,
    stall_timeout: float | None,
    cancel: threading.Event | None,
    on_line: Callable[[str], None],
    deadline: Callable[[], float | None] | None = None,
) -> None:
    """Pass lines on until the child has exited and its output has ended; enforce the limits
    (`deadline`: when the run is over its training budget, asked again after every line)."""
    killed_at: float | None = None
    drain_until: float | None = None
    while not (run.exited and run.eof):
        now = time.monotonic()
        waits = []
        if not run.exited and run.kill_reason is None:
            reason = None
            over_at = deadline() if deadline is not None else None
            if cancel is not None and cancel.is_set():
                reason = "interrupted"
            elif now >= started + timeout:
                reason = "timeout"
            elif stall_timeout is not None and now >= run.reader.last_output + stall_timeout:
                reason = "stall"
            elif over_at is not None and now >= over_at:
                reason = "over_budget"
            if reason is not None:
                run.terminate(reason)
                killed_at = now
            else:
                waits.append(started + timeout - now)
                if over_at is not None:
                    waits.append(over_at - now)
                if stall_timeout is not None:
                    waits.append(run.reader.last_output + stall_timeout - now)
                if cancel is not None:
                    waits.append(CANCEL_POLL_S)
        if killed_at is not None and not run.exited:
            if now >= killed_at + KILL_GRACE_S:
                _signal_group(run.proc.pid, signal.SIGKILL)
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


# ---------------------------------------------------------------------------------------------
# Warm starts: the interpreter and its slow imports, started before the run is due
# ---------------------------------------------------------------------------------------------

WARM_PRELOAD = ("torch", "numpy")  # packages worth importing ahead (torch: ~5 s on a GPU host)
# imported ahead too when train.py calls torch.compile (the first compile imports them)
WARM_COMPILER = ("torch._dynamo", "torch._inductor.compile_fx")
WARM_DISCARD_S = 2.0  # after closing its stdin, how long a discarded warm child may take to exit
_WARM_BOOT = """\
import json, os, sys
for _name in json.loads(sys.argv[1]):
    try:
        __import__(_name)
    except Exception:  # the script's own import will say what is wrong
        pass
_line = sys.stdin.readline()
if not _line.strip():
    os._exit(0)
_go = json.loads(_line)
_null = os.open(os.devnull, os.O_RDONLY)
os.dup2(_null, 0)
os.close(_null)
os.environ.clear()
os.environ.update(_go["env"])
sys.argv = [_go["script"]]
del json, _name, _line, _go, _null
import runpy
runpy.run_path(sys.argv[0], run_name="__main__")
"""


class Prestarted:
    """A child started before it is due, in its own session with the run marker it will keep
    (`marker`), that does its slow start-up and then waits for one JSON line on its stdin: the
    go. Its stdin closing before a go (`discard`, or the harness dying) makes it exit.
    `run_training(warm=...)` sends the go with `launch` and watches the child from there;
    `message` is what `launch` sends unless a subclass builds it from the run's command.
    The child stands in for a run whose command starts with `stands_for` (default: `command`)
    and whose environment is `env`; `launch` refuses any other run (WarmChild's takes any
    environment: its go carries the whole of it).
    `first`: a JSON line written at start-up, before the go (what the child needs to start);
    `key`: what it was started for, for its user to compare before using it."""

    def __init__(
        self,
        command: Sequence[str],
        workdir: Path,
        env: Mapping[str, str],
        *,
        stands_for: Sequence[str] | None = None,
        marker: str | None = None,
        first: Mapping | None = None,
        key: object = None,
    ) -> None:
        self.key = key
        self.cell: sandbox.Cell | None = None  # the box it runs in, if any (WarmChild)
        self.workdir = Path(workdir)
        self.env = dict(env)  # as given: without the marker variable added below
        self.stands_for = list(stands_for if stands_for is not None else command)
        self.marker = marker or uuid.uuid4().hex
        self.message: Mapping | None = None
        self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            list(command),
            cwd=workdir,
            env={**env, RUN_MARKER_VAR: self.marker},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
        if first is not None and not self._write(first, close=False):
            self.discard()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def launch(
        self, command: Sequence[str], env: Mapping[str, str]
    ) -> subprocess.Popen[bytes] | None:
        """Send the go (`message`); the child is the caller's from here on. None, and the child
        discarded, when `env` is not the environment it was started with, when `command` does
        not start with `stands_for` (the child would run something other than what the caller
        asked for), or when it died before it could be told."""
        assert self.message is not None, "set the go message first"
        if dict(env) != self.env or list(command[: len(self.stands_for)]) != self.stands_for:
            self.discard()
            return None
        return self._go(self.message)

    def _go(self, message: Mapping) -> subprocess.Popen[bytes] | None:
        assert self.proc is not None and self.proc.stdin is not None, "a warm child runs once"
        if not self._write(message, close=True):
            self.discard()
            return None
        proc, self.proc = self.proc, None
        return proc

    def _write(self, message: Mapping, *, close: bool) -> bool:
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps(message) + "\n").encode())
            if close:
                self.proc.stdin.close()
            else:
                self.proc.stdin.flush()
        except OSError:  # BrokenPipeError: it is gone
            return False
        return True

    def discard(self, grace: float = WARM_DISCARD_S) -> None:
        """End the child if it was not used: close its stdin (it exits), kill it if it lingers
        `grace` s, and anything it started (found by its marker)."""
        proc, self.proc = self.proc, None
        cell, self.cell = self.cell, None
        try:
            self._end(proc, grace)
        finally:
            if cell is not None:
                cell.close()

    def _end(self, proc: subprocess.Popen[bytes] | None, grace: float) -> None:
        if proc is None:
            return
        try:
            if proc.stdin is not None:
                proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)  # not reaped yet: the group id is its own
            proc.wait()
        kill_orphans(self.marker)  # a process a preloaded module started, if any (Linux)
        if proc.stdout is not None:
            proc.stdout.close()


class WarmChild(Prestarted):
    """A Python child started before its run is due: it imports `preload` (torch, for a
    train.py that imports it), then waits for one line on its stdin that names the script and
    the whole environment to run it with, and runs it as `__main__` (`runpy`), so train.py's
    first line runs seconds after the go instead of after the imports.

    What differs from `python script`: the preloaded modules are imported before the script's
    first line, under the environment given here at start-up (`go` replaces the rest); so
    `warm_start_ok` refuses a script that sets environment variables (which torch may read at
    import). Tracebacks show two runpy frames above the script's.
    """

    def __init__(
        self,
        workdir: Path,
        env: Mapping[str, str],
        *,
        preload: Sequence[str] = WARM_PRELOAD,
        prefix: Sequence[str] = (),
        cell: sandbox.Cell | None = None,
    ) -> None:
        if cell is not None:  # boxed: the run's box, made now (its files are staged at the go)
            prefix, env = cell.prefix, cell.env(env)
        self.prefix = tuple(prefix)
        boot = [*prefix, sys.executable, "-c", _WARM_BOOT, json.dumps(list(preload))]
        try:
            super().__init__(boot, workdir, env)
        except BaseException:
            if cell is not None:
                cell.close()
            raise
        self.cell = cell

    def go(self, script: str, env: Mapping[str, str]) -> subprocess.Popen[bytes] | None:
        """Run `script` with `env` (the whole environment)."""
        return self._go({"script": script, "env": {**env, RUN_MARKER_VAR: self.marker}})

    def launch(
        self, command: Sequence[str], env: Mapping[str, str]
    ) -> subprocess.Popen[bytes] | None:
        assert list(command[:-1]) == [*self.prefix, sys.executable], "warm runs `python script`"
        return self.go(command[-1], env)


def warm_preload(source: str) -> tuple[str, ...]:
    """What a warm child imports for this train.py: the modules of WARM_PRELOAD's packages it
    imports at module level (dotted, in its order), plus WARM_COMPILER when it calls
    torch.compile; () when there is nothing worth preloading."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return ()
    modules: list[str] = []
    for stmt in tree.body:
        if isinstance(stmt, ast.Import):
            modules += [alias.name for alias in stmt.names]
        elif isinstance(stmt, ast.ImportFrom) and stmt.module and not stmt.level:
            modules.append(stmt.module)
    picked = [m for m in modules if m.split(".")[0] in WARM_PRELOAD]
    if any(m.split(".")[0] == "torch" for m in picked) and "torch.compile" in source:
        picked += WARM_COMPILER
    return tuple(dict.fromkeys(picked))


_ENV_WRITERS = {"putenv", "unsetenv", "update", "setdefault", "pop", "popitem", "clear"}


def warm_start_ok(source: str) -> bool:
    """Whether a train.py may run in a WarmChild: it parses and never writes the environment
    (`os.environ[...] = `, `del os.environ[...]`, `os.environ.update(...)`, `os.putenv(...)`
    and the like, anywhere in the file), since a variable it sets before `import torch` would
    come too late for a preloaded torch."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, (ast.Store, ast.Del)):
            if _names_environ(node.value):
                return False
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in ("putenv", "unsetenv"):
                return False
            if node.func.attr in _ENV_WRITERS and _names_environ(node.func.value):
                return False
    return True


def _names_environ(node: ast.expr) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "environ") or (
        isinstance(node, ast.Name) and node.id == "environ"
    )


def run_training(
    workdir: Path,
    log_path: Path,
    *,
    command: Sequence[str] | None = None,
    env: Mapping[str, str],
    timeout: float,
    stall_timeout: float | None = None,
    on_step: Callable[[Step], None] | None = None,
    on_line: Callable[[str], None] | None = None,
    cancel: threading.Event | None = None,
    marker: str | None = None,
    warm: Prestarted | None = None,
    budget: Budget | None = None,
    box: sandbox.Box | None = None,
) -> RunResult:
    """Run one training child in `workdir` and describe what happened.

    `command` defaults to `[sys.executable, "train.py"]`; `env` is used as given (build it
    with `child_env`), plus a marker variable used to find the run's descendants. `timeout` is
    the hard wall-clock limit from launch in seconds, startup included; `stall_timeout` the
    longest silence allowed. The log file is created (truncated) at `log_path`. Callbacks run
    in this thread; if one raises, the run is killed and cleaned up and the exception
    propagates. A child that cannot be started is a result with exit_code None. `marker`
    (default: a fresh random one) is the value of the marker variable; a caller that records
    it can find and kill the run's processes after its own death (`kill_orphans`).

    `warm`: a child started ahead in `workdir` (a WarmChild, or another Prestarted) that runs
    the command instead of a new process (for a WarmChild, `command` must be
    `[*warm.prefix, sys.executable, script]`); `marker` must be None or the warm child's. Time
    counts from the go. A warm child that has died or was started in another directory is
    discarded and `command` launched as usual; so is one whose `launch` refuses the run (a
    Prestarted refuses an `env` other than its own and a `command` that does not start with
    its `stands_for`), with the warm child's marker, and time counts from that launch.

    `budget`: the training time the run is held to (see Budget); a run past it is stopped or
    judged as Budget says, the crash class `over_budget`, with a line in its log saying why.

    `box`: run the command in a box (sandbox.Cell): a warm child's own cell when it has one
    (a warm child started without one is not used), else a new one for `workdir` and the
    dataset `env` names. train.py and prepare.py are copied in at launch; the checkpoint the
    run leaves in the box's private directory is moved to `env`'s AUTORESEARCH_CHECKPOINT; the
    cell is removed when the run is over.
    """
    command = list(command) if command is not None else [sys.executable, "train.py"]
    if warm is not None:
        assert marker in (None, warm.marker), "a warm run keeps the warm child's marker"
        unfit = (box is not None) != (warm.cell is not None)
        if unfit or not warm.alive() or warm.workdir != Path(workdir):
            warm.discard()
            warm = None
        else:
            marker = warm.marker

    def train(cmd: list[str], run_env: Mapping[str, str]) -> RunResult:
        return _run_training(
            workdir,
            log_path,
            cmd,
            run_env,
            timeout,
            stall_timeout,
            on_step,
            on_line,
            cancel,
            marker,
            warm,
            budget,
        )

    if box is None:
        return train(command, env)
    cell = warm.cell if warm is not None else box.cell(workdir, dataset=sandbox.dataset_of(env))
    if warm is not None:
        warm.cell = None  # the run owns it now
    try:
        cell.stage()
        result = train([*cell.prefix, *command], cell.env(env))
        cell.take_checkpoint(env.get("AUTORESEARCH_CHECKPOINT"))
        return result
    finally:
        cell.close()


def _run_training(
    workdir: Path,
    log_path: Path,
    command: list[str],
    env: Mapping[str, str],
    timeout: float,
    stall_timeout: float | None,
    on_step: Callable[[Step], None] | None,
    on_line: Callable[[str], None] | None,
    cancel: threading.Event | None,
    marker: str | None,
    warm: Prestarted | None,
    budget: Budget | None,
) -> RunResult:
    marker = marker or uuid.uuid4().hex
    log_path.parent.mkdir(parents=True, exist_ok=True)
    recent: deque[str] = deque(maxlen=RECENT_LINES)
    last_step: Step | None = None
    first_step_at: float | None = None  # monotonic times of the first and the last step line
    last_step_at: float | None = None

    def handle_line(line: str) -> None:
        nonlocal last_step, first_step_at, last_step_at
        recent.append(line[:MAX_KEPT_LINE_CHARS])
        if on_line is not None:
            on_line(line)
        step = parse_step(line)
        if step is not None:
            last_step = step
            last_step_at = time.monotonic()
            first_step_at = first_step_at or last_step_at
            if on_step is not None:
                on_step(step)

    with open(log_path, "wb") as log:
        started = time.monotonic()
        try:
            proc = warm.launch(command, env) if warm is not None else None
            if proc is None:
                if warm is not None:  # its discard may have taken up to WARM_DISCARD_S
                    started = time.monotonic()
                proc = subprocess.Popen(
                    command,
                    cwd=workdir,
                    env={**env, RUN_MARKER_VAR: marker},
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                )
        except OSError as error:
            message = f"{HARNESS_PREFIX} could not start {command!r} in {workdir}: {error}"
            log.write((message + "\n").encode())
            return RunResult(None, {}, "other", 0.0, log_path, message, None)
        try:
            run = _Run(proc, log, f"{RUN_MARKER_VAR}={marker}".encode())
        except BaseException:  # e.g. no thread could be started: never leave the child behind
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stdout.close()  # type: ignore[union-attr]
            raise
        # the cpu clock starts at the go: what a warm child used before it is its imports
        cpu_before = tree_cpu(proc.pid) if budget is not None and budget.clock == "cpu" else 0.0
        cpu_seen = 0.0  # the most seen while it ran: counts processes no one reaps too

        def cpu_used() -> float:
            nonlocal cpu_seen
            cpu_seen = max(cpu_seen, tree_cpu(proc.pid) - cpu_before)
            return cpu_seen

        try:
            _watch(
                run,
                started=started,
                timeout=timeout,
                stall_timeout=stall_timeout,
                cancel=cancel,
                on_line=handle_line,
                deadline=None
                if budget is None
                else lambda: budget.deadline(
                    started,
                    first_step_at,
                    last_step_at,
                    cpu_used() if budget.clock == "cpu" else None,
                ),
            )
        finally:
            run.finish()
        cpu = max(cpu_seen, run.reaped_cpu - cpu_before)
        exited = run.exited_at or time.monotonic()
        wall = exited - started
        text = "\n".join(recent)
        footer = _footer(run, timeout=timeout, stall_timeout=stall_timeout, wall=wall)
        overrun = None
        if budget is not None and run.kill_reason == "over_budget":
            overrun = budget.stopped(started, first_step_at, cpu)
        elif budget is not None and run.kill_reason is None and proc.returncode == 0:
            overrun = budget.overrun(started, first_step_at, last_step_at, exited, cpu)
        if overrun is not None:
            footer.append(f"{HARNESS_PREFIX} {overrun}")
        if footer and run.reader.log_error is None:
            log.write(("\n" + "\n".join(footer) + "\n").encode())
    recent.extend(footer)

    summary = parse_summary(text)
    exit_code = proc.returncode
    val_bpb = summary.get("val_bpb")
    crash_class = "over_budget" if overrun is not None else None
    if crash_class is None and (
        run.kill_reason is not None
        or exit_code != 0
        or val_bpb is None
        or not math.isfinite(val_bpb)
    ):
        crash_class = classify_crash(
            text,
            exit_code,
            timed_out=run.kill_reason == "timeout",
            stalled=run.kill_reason == "stall",
            interrupted=run.kill_reason == "interrupted",
        )
    return RunResult(
        exit_code=exit_code,
        summary=summary,
        crash_class=crash_class,
        wall_seconds=wall,
        log_path=log_path,
        log_tail="\n".join(list(recent)[-TAIL_LINES:]),
        last_step=last_step,
    )


def _footer(run: _Run, *, timeout: float, stall_timeout: float | None, wall: float) -> list[str]:
    """Harness lines appended to the log saying what the harness did to the run."""
    lines = []
    if run.kill_reason == "timeout":
        lines.append(f"{HARNESS_PREFIX} timeout: still running after {timeout:g} s; killed")
    elif run.kill_reason == "stall":
        lines.append(f"{HARNESS_PREFIX} stall: no output for {stall_timeout:g} s; killed")
    elif run.kill_reason == "interrupted":
        lines.append(f"{HARNESS_PREFIX} interrupted after {wall:.1f} s; killed")
    if run.leftovers:
        lines.append(
            f"{HARNESS_PREFIX} killed {run.leftovers} leftover process(es) of the run"
            " after the child exited"
        )
    return lines
