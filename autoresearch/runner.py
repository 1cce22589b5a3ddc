"""One training run: launch the child, watch it to its end, and say what happened (`RunResult`).

The parts it is made of live in modules of their own: the watching (watch.py), the processes
and their CPU time (procs.py), the budget (budget.py), train.py's output (trainlog.py), crash
classes (crashes.py), the child's environment (childenv.py), warm children (warm.py).

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
- on Linux the run dies with the process that started it, also when that process is killed
  with -9 mid-run (a slot's Ray actor lost): the child by the kernel's parent-death signal, its
  group and marked descendants by a guard process (procs.Guard); call it from a thread that
  lives until it returns (it does: it waits for the run);
- the child is reaped, and the pipe, selector, threads and log file are closed, also when a
  callback raises or the caller is interrupted (the child is then killed and the exception
  propagates);
- a crashed run is data: `RunResult.crash_class` says what kind of crash, never an exception;
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

import math
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import sandbox
from .budget import Budget
from .crashes import classify_crash
from .procs import RUN_MARKER_VAR, CpuWait, Guard, die_with_parent, signal_group, tree_cpu
from .trainlog import Step, parse_step, parse_summary
from .warm import Prestarted
from .watch import HARNESS_PREFIX, Run, watch

TAIL_LINES = 50  # lines of output kept in RunResult.log_tail
RECENT_LINES = 1000  # lines kept in memory to find the summary block and classify a crash
MAX_KEPT_LINE_CHARS = 4096  # characters of a line kept in memory (the log keeps everything)


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
    proc: subprocess.Popen[bytes] | None = None
    wait_before = waited = 0.0
    cpu_wait: CpuWait | None = None

    def waited_before_step() -> float:
        """Seconds the run was held back by other programs, until its first step line."""
        nonlocal waited
        if cpu_wait is not None and first_step_at is None:
            waited = max(waited, cpu_wait() - wait_before)
        return waited

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
            if first_step_at is None:
                waited_before_step()  # what it waited for a CPU until now, then no more
                first_step_at = last_step_at
            if on_step is not None:
                on_step(step)

    with open(log_path, "wb") as log:
        # the run dies with this process: the child by the kernel's parent-death signal (this
        # thread waits for it to the end), what it starts by the guard (procs.py)
        guard = Guard(marker)
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
                    preexec_fn=die_with_parent(),
                )
        except OSError as error:
            guard.release()
            message = f"{HARNESS_PREFIX} could not start {command!r} in {workdir}: {error}"
            log.write((message + "\n").encode())
            return RunResult(None, {}, "other", 0.0, log_path, message, None)
        guard.watch(proc.pid)
        try:
            run = Run(proc, log, f"{RUN_MARKER_VAR}={marker}".encode())
        except BaseException:  # e.g. no thread could be started: never leave the child behind
            signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stdout.close()  # type: ignore[union-attr]
            guard.release()
            raise
        # the cpu clock starts at the go: what a warm child used before it is its imports
        cpu_before = tree_cpu(proc.pid) if budget is not None and budget.clock == "cpu" else 0.0
        cpu_seen = 0.0  # the most seen while it ran: counts processes no one reaps too
        # the wall clock's start-up: seconds held back by other programs (procs.CpuWait),
        # from the go (a warm child's waits during its imports are not the run's)
        if budget is not None and budget.clock == "wall":
            cpu_wait = CpuWait(proc.pid)
            wait_before = cpu_wait()

        def cpu_used() -> float:
            nonlocal cpu_seen
            cpu_seen = max(cpu_seen, tree_cpu(proc.pid) - cpu_before)
            return cpu_seen

        try:
            watch(
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
                    waited_before_step(),
                ),
            )
        finally:
            run.finish()
            guard.release()
        cpu = max(cpu_seen, run.reaped_cpu - cpu_before)
        exited = run.exited_at or time.monotonic()
        wall = exited - started
        text = "\n".join(recent)
        footer = _footer(run, timeout=timeout, stall_timeout=stall_timeout, wall=wall)
        overrun = None
        if budget is not None and run.kill_reason == "over_budget":
            overrun = budget.stopped(started, first_step_at, cpu, waited)
        elif budget is not None and run.kill_reason is None and proc.returncode == 0:
            overrun = budget.overrun(started, first_step_at, last_step_at, exited, cpu, waited)
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


def _footer(run: Run, *, timeout: float, stall_timeout: float | None, wall: float) -> list[str]:
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


# Names other modules reach as `runner.<name>`, kept importable from here for now; new code
# imports them from the module that defines them.
from .budget import CPU_GRACE_S, budget_grace, cpu_clock_available  # noqa: E402
from .childenv import Isolation, child_env, network_isolation  # noqa: E402
from .crashes import CRASH_CLASSES  # noqa: E402
from .procs import kill_orphans  # noqa: E402
from .warm import WARM_COMPILER, WarmChild, warm_preload, warm_start_ok  # noqa: E402

__all__ = [
    "CPU_GRACE_S",
    "CRASH_CLASSES",
    "RUN_MARKER_VAR",
    "TAIL_LINES",
    "WARM_COMPILER",
    "Budget",
    "Isolation",
    "Prestarted",
    "RunResult",
    "Step",
    "WarmChild",
    "budget_grace",
    "child_env",
    "classify_crash",
    "cpu_clock_available",
    "kill_orphans",
    "network_isolation",
    "parse_step",
    "parse_summary",
    "run_training",
    "warm_preload",
    "warm_start_ok",
]
