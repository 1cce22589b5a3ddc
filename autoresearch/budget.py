"""The training time a run is held to (`Budget`), on the CPU clock or the wall clock.

Guarantees: an honest train.py meets its budget on a loaded machine, and training before the
first step line or after the budget is counted. What it does not do: watch the run (runner.py
asks `deadline` after every line and at each CPU_POLL_S) or read CPU time (procs.tree_cpu).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .procs import PROC

CPU_POLL_S = 0.5  # seconds between looks at a run's CPU time (Budget's cpu clock)
# CPU seconds a run may use besides TIME_BUDGET, at least (budget_grace): a cold start-up
# (2.2-2.5 CPU s to import torch, numpy, tiktoken; about 1 more for the data and the model),
# step 0, which train.py does not time, the last step, which ends past the budget (a
# cpu-preset step took 5-6 CPU s on a loaded 2-core machine), and the checkpoint
CPU_GRACE_S = 20.0


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
    when the line comes; else a run could train there unseen. Time the run spent held back by
    other programs is not counted in that (`waited`, procs.CpuWait: its main thread ready to
    run and waiting for a CPU, less what the run's own other processes used), so a busy
    machine does not make an honest start-up late, while time spent sleeping, on the GPU or
    computing before the first step line is counted.

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

    def _clock(
        self, launched: float, first_step: float | None, waited: float = 0.0
    ) -> tuple[float, str, float]:
        """(when the clock started, what started it, the seconds allowed from then)."""
        limit = self.seconds + self.grace
        launched += (
            waited  # wall clock from launch: time held back by other programs is not counted
        )
        if self.clock == "cpu":
            return launched, "launch", limit
        if first_step is None:
            return launched, "launch", self.startup if self.steps_required else limit + self.startup
        return first_step, "its first step line", limit

    def _slow_start(
        self, launched: float, first_step: float | None, exited: bool, waited: float = 0.0
    ) -> str | None:
        """What the run did wrong before its first step line, None if nothing: the line came
        past `startup` (wall clock); or, steps required, none came before the deadline or the
        exit."""
        if first_step is not None:
            if self.clock == "cpu" or first_step - launched - waited <= self.startup:
                return None
            held = f" ({waited:.1f} s of it waiting for a CPU, not counted)" if waited else ""
            return (
                f"its first step line came {first_step - launched:.1f} s after launch{held}, "
                f"past the {self.startup:g} s allowed for start-up (imports, data, compile), "
                "which is not counted as training"
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
        waited: float = 0.0,
    ) -> float | None:
        """When to stop a run still going (monotonic), or None: not before it exits. `cpu`:
        the CPU seconds the run has used so far (the cpu clock); `waited`: the seconds it was
        held back by other programs before its first step line (the wall clock; a deadline
        moves when it grows, so ask again)."""
        if self.clock == "cpu":
            if cpu is not None and cpu > self.seconds + self.grace:
                return launched  # over: at once
            return time.monotonic() + CPU_POLL_S  # look again then
        if first_step is not None and self._slow_start(launched, first_step, False, waited):
            return first_step  # too late: at once
        start, _, limit = self._clock(launched, first_step, waited)
        if self.until_exit or (first_step is None and self.steps_required):
            return start + limit
        if first_step is not None and last_step is not None and last_step > start + limit:
            return last_step  # a step line past the limit: it is still training
        return None

    def stopped(
        self,
        launched: float,
        first_step: float | None,
        cpu: float | None = None,
        waited: float = 0.0,
    ) -> str:
        """The log line for a run stopped at its deadline."""
        slow = self._slow_start(launched, first_step, False, waited)
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
        waited: float = 0.0,
    ) -> str | None:
        """The log line for a run that exited past its limit; None when within it."""
        slow = self._slow_start(launched, first_step, True, waited)
        if slow is not None:
            return f"over budget: {slow}; the result does not count"
        start, since, limit = self._clock(launched, first_step, waited)
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
    return (PROC / "self" / "task").is_dir()
