"""runner: real child processes running the stub trainers in tests/stubs/."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from loopkit import alive, children_listed, own_children

from autoresearch import procs, watch
from autoresearch.budget import CPU_GRACE_S, Budget, budget_grace, cpu_clock_available
from autoresearch.childenv import child_env
from autoresearch.crashes import classify_crash
from autoresearch.procs import RUN_MARKER_VAR, CpuWait, kill_orphans, marked_processes
from autoresearch.runner import TAIL_LINES, RunResult, run_training
from autoresearch.trainlog import Step, parse_step, parse_summary
from autoresearch.warm import WARM_COMPILER, Prestarted, WarmChild, warm_preload, warm_start_ok

STUBS = Path(__file__).parent / "stubs"
LINUX = Path("/proc/self/stat").exists()


@pytest.fixture(autouse=True)
def short_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watch, "KILL_GRACE_S", 0.5)


def run_stub(
    tmp_path: Path, stub: str, *args: str, timeout: float = 30.0, **kwargs: object
) -> RunResult:
    env = child_env(os.environ, preset="cpu", device="cpu", gpu=None)
    return run_training(
        tmp_path,
        tmp_path / "run.log",
        command=[sys.executable, str(STUBS / stub), *args],
        env=env,
        timeout=timeout,
        **kwargs,  # type: ignore[arg-type]
    )


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# --- parsing -------------------------------------------------------------------------------


def test_parse_step_contract_line() -> None:
    line = (
        "step 00012 (4.1%) | loss 5.123456 | dt 812ms | tok/sec 20,123 | mfu 1.2% | remaining 23s"
    )
    assert parse_step(line) == Step(12, 4.1, 5.123456, 812.0, 20123.0, 1.2, 23.0)


def test_parse_step_upstream_style_with_colons_and_extra_fields() -> None:
    line = (
        "\rstep 00953 (100.0%) | loss: 3.210000 | lrm: 0.05 | dt: 315ms | tok/sec: 1,663,403"
        " | mfu: 39.8% | epoch: 1 | remaining: 0s    "
    )
    step = parse_step(line)
    assert step is not None
    assert (step.step, step.pct, step.loss, step.tok_per_sec, step.remaining_s) == (
        953,
        100.0,
        3.21,
        1663403.0,
        0.0,
    )


def test_parse_step_nan_loss_and_missing_fields() -> None:
    step = parse_step("step 7 (1.0%) | loss nan")
    assert step is not None and math.isnan(step.loss) and math.isnan(step.dt_ms)


@pytest.mark.parametrize(
    "line", ["", "---", "val_bpb: 1.0", "stepping (1%) | loss 1", "step 3 (2%) | dt 5ms"]
)
def test_parse_step_rejects_other_lines(line: str) -> None:
    assert parse_step(line) is None


def test_parse_summary_takes_the_last_block() -> None:
    text = "---\nval_bpb: 9.0\nrun\n---\nval_bpb:   1.5\nwarning: odd\ndepth: 8\npreset: gpu\n"
    assert parse_summary(text) == {"val_bpb": 1.5, "depth": 8.0}


def test_parse_summary_skips_a_trailing_empty_block_and_reads_nan() -> None:
    assert parse_summary("---\nval_bpb: nan\n---\nTraceback\n").keys() == {"val_bpb"}
    assert parse_summary("no block here\nval_bpb: 1.0") == {}


# --- crash classes -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("log", "exit_code", "expected"),
    [
        ("  File \"train.py\", line 3\n    x = (\nSyntaxError: '(' was never closed", 1, "syntax"),
        ("IndentationError: unexpected indent", 1, "syntax"),
        ("ModuleNotFoundError: No module named 'flash_attn'", 1, "import"),
        ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB", 1, "oom"),
        ("RuntimeError: CUDA error: out of memory", 1, "oom"),
        ("step 5 (1%) | loss nan\nFAIL: training diverged", 3, "nan"),
        ("val_bpb: nan", 0, "nan"),
        ("all good, but no summary", 0, "no_summary"),
        ("step 1 (1%) | loss 3.0", -9, "oom"),
        ("ValueError: shapes (3,) and (4,) not aligned", 1, "other"),
        # the last exception decides, not a warning that mentions another one
        (
            "warning: ImportError for triton, using fallback\nRuntimeError: CUDA error: out of memory",
            1,
            "oom",
        ),
    ],
)
def test_classify_crash_from_log(log: str, exit_code: int, expected: str) -> None:
    flags = {"timed_out": False, "stalled": False, "interrupted": False}
    assert classify_crash(log, exit_code, **flags) == expected


def test_classify_crash_harness_actions_come_first() -> None:
    log = "RuntimeError: CUDA out of memory"
    assert classify_crash(log, -15, timed_out=True, stalled=False, interrupted=False) == "timeout"
    assert classify_crash(log, -15, timed_out=False, stalled=True, interrupted=False) == "stall"
    assert (
        classify_crash(log, -15, timed_out=True, stalled=False, interrupted=True) == "interrupted"
    )


# --- environment ---------------------------------------------------------------------------


def test_child_env_strips_secrets_and_sets_the_contract() -> None:
    base = {
        "PATH": "/bin",
        "OPENAI_API_KEY": "sk-1",
        "AUTORESEARCH_API_KEY": "x",
        "HF_TOKEN": "t",
        "aws_secret_access_key": "s",
        "DB_PASSWORD": "p",
        "GOOGLE_APPLICATION_CREDENTIALS": "/c.json",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env = child_env(
        base, preset="cpu", device="cpu", gpu="3", extra={"GITHUB_TOKEN": "g", "A": "1"}
    )
    assert env == {
        "PATH": "/bin",
        "TOKENIZERS_PARALLELISM": "false",
        "A": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
        "PYTHONUNBUFFERED": "1",
        "AUTORESEARCH_PRESET": "cpu",
        "AUTORESEARCH_DEVICE": "cpu",
        "CUDA_VISIBLE_DEVICES": "3",
    }
    # the user's own OpenMP setting wins
    assert (
        child_env({"OMP_WAIT_POLICY": "ACTIVE"}, preset="cpu", device="cpu", gpu=None)[
            "OMP_WAIT_POLICY"
        ]
        == "ACTIVE"
    )


def test_child_sees_no_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-do-not-leak")
    monkeypatch.setenv("MY_SERVICE_TOKEN", "do-not-leak")
    result = run_stub(tmp_path, "print_env.py")
    assert result.ok
    log = result.log_path.read_text()
    assert "do-not-leak" not in log
    env = json.loads(next(line for line in log.splitlines() if line.startswith("ENV "))[4:])
    assert env["PYTHONUNBUFFERED"] == "1" and env["AUTORESEARCH_PRESET"] == "cpu"


# --- runs ----------------------------------------------------------------------------------


def test_ok_run_is_parsed_and_streamed(tmp_path: Path) -> None:
    steps: list[Step] = []
    lines: list[str] = []
    result = run_stub(tmp_path, "ok_train.py", on_step=steps.append, on_line=lines.append)
    assert result.ok and result.crash_class is None and result.exit_code == 0
    assert result.summary["val_bpb"] == 1.0 and result.summary["peak_vram_mb"] == 2048.0
    assert len(result.summary) == 9
    assert [s.step for s in steps] == [0, 1, 2] and result.last_step == steps[-1]
    assert lines[0].startswith("step 00000") and lines[-1].startswith("depth:")
    assert result.log_path.read_text().splitlines() == lines
    assert result.log_tail.splitlines() == lines[-TAIL_LINES:]
    assert result.wall_seconds > 0


def test_summary_is_the_last_block(tmp_path: Path) -> None:
    result = run_stub(tmp_path, "two_summaries.py")
    assert result.ok
    assert result.summary == {"val_bpb": 1.234567, "peak_vram_mb": 512.0, "depth": 4.0}


def test_carriage_return_progress_is_split_into_lines(tmp_path: Path) -> None:
    steps: list[Step] = []
    result = run_stub(tmp_path, "progress_cr.py", on_step=steps.append)
    assert result.ok and [s.step for s in steps] == [0, 1, 2]
    assert result.log_path.read_bytes().count(b"\r") == 3  # the log keeps the bytes as written


def test_line_breaks_split_across_writes_and_a_last_line_without_newline(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(
        "import sys, time\n"
        "sys.stdout.write('first\\r'); sys.stdout.flush(); time.sleep(0.05)\n"
        "sys.stdout.write('\\n---\\r\\nval_bpb: 1.25'); sys.stdout.flush()\n"
    )
    lines: list[str] = []
    callers: set[int] = set()

    def on_line(line: str) -> None:
        lines.append(line)
        callers.add(threading.get_ident())

    result = run_training(
        tmp_path, tmp_path / "run.log", env=dict(os.environ), timeout=30, on_line=on_line
    )
    assert lines == ["first", "---", "val_bpb: 1.25"]
    assert result.ok and result.summary == {"val_bpb": 1.25}
    assert callers == {threading.get_ident()}  # callbacks run in the caller's thread


def test_syntax_error(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text("print('hi'\n")
    result = run_training(
        tmp_path,
        tmp_path / "run.log",
        env=child_env(os.environ, preset="cpu", device="cpu", gpu=None),
        timeout=30,
    )
    assert not result.ok and result.crash_class == "syntax" and result.exit_code == 1
    assert "SyntaxError" in result.log_tail


@pytest.mark.parametrize(
    ("stub", "crash_class", "exit_code"),
    [
        ("import_error.py", "import", 1),
        ("oom.py", "oom", 1),
        ("nan.py", "nan", 3),
        ("no_summary.py", "no_summary", 0),
        ("sigkill_self.py", "oom", -9),
    ],
)
def test_crashes_are_data(tmp_path: Path, stub: str, crash_class: str, exit_code: int) -> None:
    result = run_stub(tmp_path, stub)
    assert not result.ok
    assert (result.crash_class, result.exit_code) == (crash_class, exit_code)


def test_stall_kills_a_silent_child(tmp_path: Path) -> None:
    result = run_stub(tmp_path, "hang.py", timeout=60, stall_timeout=0.5)
    assert result.crash_class == "stall" and result.exit_code == -15
    assert result.last_step is not None and result.last_step.step == 0
    assert "stall: no output" in result.log_path.read_text()


def test_hard_timeout_kills_a_busy_child(tmp_path: Path) -> None:
    result = run_stub(tmp_path, "chatty.py", timeout=1.0, stall_timeout=30)
    assert result.crash_class == "timeout" and not result.ok
    assert "timeout: still running" in result.log_tail


def test_budget_is_counted_from_the_first_step_line() -> None:
    budget = Budget(10.0, 3.0, 20.0)  # 13 s from the first step line, 33 s from launch
    assert budget.deadline(0.0, 5.0, 6.0) == 18.0
    assert budget.deadline(0.0, None, None) == 33.0  # no step line yet: from launch
    assert budget.stopped(0.0, 5.0) == (
        "over budget: still running 13 s after its first step line (TIME_BUDGET 10 s + 3 s); "
        "killed, the result does not count"
    )
    assert "still running 33 s after launch (TIME_BUDGET 10 s + 23 s)" in budget.stopped(0.0, None)
    assert budget.overrun(0.0, 5.0, 17.0, 17.9) is None
    assert budget.overrun(0.0, 5.0, 17.0, 18.5) == (
        "over budget: 13.5 s from its first step line to its exit, past the 13 s allowed "
        "(TIME_BUDGET 10 s + 3 s); the result does not count"
    )
    assert budget.overrun(0.0, None, None, 32.9) is None
    assert "33.5 s from launch to its exit" in (budget.overrun(0.0, None, None, 33.5) or "")
    # unsealed, train.py evaluates itself after its last step line: that time is not counted,
    # and the run is stopped only once a step line comes past the limit
    unsealed = Budget(10.0, 3.0, 20.0, until_exit=False)
    assert unsealed.deadline(0.0, 5.0, 17.9) is None and unsealed.deadline(0.0, None, None) is None
    assert unsealed.deadline(0.0, 5.0, 18.5) == 18.5  # at once
    assert unsealed.overrun(0.0, 5.0, 17.9, 60.0) is None
    assert "13.5 s from its first step line to its last step line" in (
        unsealed.overrun(0.0, 5.0, 18.5, 19.0) or ""
    )
    assert budget_grace(300.0) == 30.0 and budget_grace(1000.0) == 100.0
    # the time before the first step line is not counted, so at most `startup` (20 s) of it:
    # a first step line later than that stops the run when it comes, sealed or not
    for held in (budget, unsealed):
        assert held.deadline(0.0, 20.0, 20.0) == (33.0 if held.until_exit else None)
        assert held.deadline(0.0, 21.5, 21.5) == 21.5
        assert held.stopped(0.0, 21.5) == (
            "over budget: its first step line came 21.5 s after launch, past the 20 s allowed "
            "for start-up (imports, data, compile), which is not counted as training; killed, "
            "the result does not count"
        )
        assert held.overrun(0.0, 20.0, 21.0, 22.0) is None
        assert "its first step line came 21.5 s after launch" in (
            held.overrun(0.0, 21.5, 21.6, 22.0) or ""
        )
    # train.py must print step lines: without one it is stopped once `startup` has passed, and
    # one that exits without any does not count (another command may print none, as above)
    strict = Budget(10.0, 3.0, 20.0, steps_required=True)
    for held in (strict, Budget(10.0, 3.0, 20.0, until_exit=False, steps_required=True)):
        assert held.deadline(0.0, None, None) == 20.0
        assert held.stopped(0.0, None) == (
            "over budget: no step line within the 20 s allowed for start-up (imports, data, "
            "compile); the clock starts at the first step line, so train.py must print them; "
            "killed, the result does not count"
        )
        assert held.overrun(0.0, None, None, 5.0) == (
            "over budget: it exited without a step line; the clock starts at the first step "
            "line, so train.py must print them; the result does not count"
        )
        assert held.overrun(0.0, 5.0, 6.0, 7.0) is None


@pytest.mark.parametrize(
    ("timing", "until_exit", "stopped"),
    [
        (("0", "0.1", "0"), True, None),
        (("1.5", "0.2", "0"), True, None),  # a slow start (the compile) is not training
        (("2.5", "1", "0"), True, "first step line came"),  # too slow: it could train there
        (("2.5", "1", "0"), False, "first step line came"),
        (("0", "0.1", "2.5"), False, None),  # unsealed: its own evaluation follows
        (("0", "4", "0"), True, "after its first step line"),
        (("0", "0.1", "4"), True, "after its first step line"),  # sealed: nothing after counts
        (("0", "3", "4"), False, "after its first step line"),  # a step line past the limit
        (("1", "4", "0", "--no-steps"), True, "after launch"),
        (("1", "4", "0", "--no-steps", "required"), True, "no step line within the 2 s"),
    ],
    ids=[
        "within",
        "slow-start",
        "late-start",
        "unsealed-late-start",
        "own-eval-after",
        "trained-past",
        "work-after",
        "unsealed-step-past",
        "no-step-lines",
        "no-step-lines-required",
    ],
)
def test_a_run_is_held_to_its_budget(
    tmp_path: Path, timing: tuple[str, ...], until_exit: bool, stopped: str | None
) -> None:
    """Allowed 1.5 s from the first step line, which must come within 2 s of launch (3.5 s
    from launch for a run without step lines, 2 s where step lines are required): a run past
    either is stopped there, `over_budget`, with the harness's line in its log."""
    required = "required" in timing
    budget = Budget(1.0, 0.5, 2.0, until_exit=until_exit, steps_required=required)
    args = [a for a in timing if a != "required"]
    result = run_stub(tmp_path, "slow_train.py", *args, budget=budget)
    if stopped is None:
        assert result.ok and result.crash_class is None and result.summary["val_bpb"] == 1.0
        assert "over budget" not in result.log_path.read_text()
    else:
        assert not result.ok and result.crash_class == "over_budget"
        assert result.exit_code == -15 and "val_bpb" not in result.summary
        assert "[autoresearch] over budget: " in result.log_tail
        assert stopped in result.log_path.read_text()
        assert "---" not in result.log_path.read_text().splitlines()  # stopped, not finished


def test_time_held_back_by_other_programs_is_not_start_up() -> None:
    """On the wall clock, the seconds a run waited for a CPU before its first step line
    (`waited`) are not counted against the start-up limit; everything else is."""
    budget = Budget(10.0, 3.0, 20.0, steps_required=True)
    assert budget.deadline(0.0, None, None, waited=5.0) == 25.0  # none yet: later by the wait
    assert budget.deadline(0.0, 24.0, 24.0, waited=5.0) == 37.0  # 19 s of start-up: in time
    assert budget.overrun(0.0, 24.0, 30.0, 31.0, waited=5.0) is None
    assert budget.overrun(0.0, 26.0, 30.0, 31.0, waited=5.0) == (
        "over budget: its first step line came 26.0 s after launch (5.0 s of it waiting for a "
        "CPU, not counted), past the 20 s allowed for start-up (imports, data, compile), which "
        "is not counted as training; the result does not count"
    )
    assert budget.deadline(0.0, 26.0, 26.0, waited=5.0) == 26.0  # too late: at once
    # the cpu clock counts CPU time from launch, start-up included: a wait changes nothing
    cpu = Budget(10.0, 3.0, 20.0, steps_required=True, clock="cpu")
    assert cpu.overrun(0.0, 90.0, 95.0, 96.0, cpu=12.0, waited=0.0) is None


def _fake_proc(root: Path, pid: int, state: str, ran: float, delay: float, ticks: int) -> None:
    """One process of a /proc tree as CpuWait reads it: its stat (state, CPU ticks), its main
    thread's stat and schedstat (ns run, ns waited), no children."""
    task = root / str(pid) / "task" / str(pid)
    task.mkdir(parents=True, exist_ok=True)
    fields = [state, *["0"] * 10, str(ticks), "0", "0", "0"]
    (root / str(pid) / "stat").write_text(f"{pid} (python) {' '.join(fields)}\n")
    (task / "stat").write_text(f"{pid} (python) {' '.join(fields)}\n")
    (task / "schedstat").write_text(f"{int(ran * 1e9)} {int(delay * 1e9)} 7\n")
    (task / "children").write_text("")


def test_a_wait_in_progress_counts_from_the_first_look_that_saw_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel adds a wait for a CPU to the run delay only when the thread gets one, so a
    thread starved for seconds shows no wait. CpuWait counts one in progress: ready to run (R)
    at a look and neither run nor waited-counted since, it was waiting all along, from that
    look. Not when it sleeps (S), and never from before its first such look."""
    now = [100.0]
    monkeypatch.setattr(procs, "PROC", tmp_path)
    monkeypatch.setattr(procs, "time", type("Clock", (), {"monotonic": lambda: now[0]}))
    ticks = os.sysconf("SC_CLK_TCK")
    _fake_proc(tmp_path, 7, "R", ran=0.05, delay=0.2, ticks=int(0.05 * ticks))
    wait = CpuWait(7)
    assert wait() == pytest.approx(0.2)  # what the kernel says, nothing in progress seen yet
    now[0] = 101.5
    assert wait() == pytest.approx(1.7)  # R and unchanged: 1.5 s more, waiting
    now[0] = 102.0
    assert wait() == pytest.approx(2.2)
    _fake_proc(tmp_path, 7, "R", ran=0.06, delay=2.3, ticks=int(0.06 * ticks))  # it ran
    assert wait() == pytest.approx(2.3)  # the kernel's figure now holds that wait
    now[0] = 103.0
    _fake_proc(tmp_path, 7, "S", ran=0.07, delay=2.3, ticks=int(0.07 * ticks))
    assert wait() == pytest.approx(2.3)
    now[0] = 104.0  # asleep and unchanged: sleeping is not waiting for a CPU
    assert wait() == pytest.approx(2.3)


SCHEDSTAT = Path("/proc/self/task") / str(os.getpid()) / "schedstat"


@pytest.fixture
def competitor() -> Iterator[int]:
    """A busy process pinned to one CPU, started by the test: the core it returns is busy."""
    if not SCHEDSTAT.exists() or not hasattr(os, "sched_setaffinity"):
        pytest.skip("needs Linux's per-task schedstat and CPU affinity")
    core = min(os.sched_getaffinity(0))
    hog = subprocess.Popen(
        [sys.executable, "-c", f"import os\nos.sched_setaffinity(0, {{{core}}})\nwhile True: pass"],
        start_new_session=True,  # a scheduling group (autogroup) of its own, as another program's
    )
    try:
        yield core
    finally:
        hog.kill()
        hog.wait()


def test_a_start_up_slowed_by_a_busy_machine_is_not_over_budget(
    tmp_path: Path, competitor: int
) -> None:
    """0.2 CPU s of start-up at a low priority, on a core a competitor keeps busy: more than the
    2 s start-up limit in wall time (it gets a few percent of the core; without the rule this
    run was `over_budget`), but the waiting is the machine's, not the run's, so it counts."""
    budget = Budget(1.0, 0.5, 2.0, steps_required=True)
    result = run_stub(
        tmp_path, "contended_start.py", str(competitor), "10", "0.2", budget=budget, timeout=300
    )
    assert result.ok and result.crash_class is None, result.log_tail
    assert "over budget" not in result.log_path.read_text()


@pytest.mark.parametrize("steps", [True, False], ids=["late-step-line", "no-step-line"])
def test_a_start_up_spent_computing_is_over_budget_on_a_busy_machine_too(
    tmp_path: Path, competitor: int, steps: bool
) -> None:
    """3 CPU s of work before the first step line (or with none), past the 2 s start-up limit:
    over budget, though a competitor on its core makes it wait too; the run's own computing
    is counted, only its waiting is not."""
    budget = Budget(1.0, 0.5, 2.0, steps_required=True)
    args = [str(competitor), "0", "3.0", *([] if steps else ["--no-steps"])]
    result = run_stub(tmp_path, "contended_start.py", *args, budget=budget, timeout=300)
    assert not result.ok and result.crash_class == "over_budget"
    assert "[autoresearch] over budget: " in result.log_tail


def test_a_run_without_step_lines_does_not_count_where_they_are_required(tmp_path: Path) -> None:
    """train.py's contract: the clock starts at its first step line, so a run that exits 0
    with a val_bpb but never printed one is `over_budget`; another command may print none."""
    args = ("0.2", "0", "0", "--no-steps")
    budget = Budget(1.0, 0.5, 2.0, steps_required=True)
    result = run_stub(tmp_path, "slow_train.py", *args, budget=budget)
    assert result.exit_code == 0 and result.summary["val_bpb"] == 1.0
    assert not result.ok and result.crash_class == "over_budget"
    assert "[autoresearch] over budget: it exited without a step line" in result.log_tail
    lenient = Budget(1.0, 0.5, 2.0)
    result = run_stub(tmp_path, "slow_train.py", *args, budget=lenient)
    assert result.ok and result.crash_class is None


def test_the_cpu_clock_counts_from_launch_to_exit() -> None:
    """The cpu clock: CPU seconds of the whole run, start-up and the time after the last step
    line included; wall time does not count."""
    budget = Budget(10.0, 3.0, 20.0, steps_required=True, clock="cpu")
    assert budget.deadline(0.0, None, None, cpu=13.5) == 0.0  # over: at once
    assert budget.deadline(0.0, 500.0, 900.0, cpu=12.9) > 0.0  # not over, however late
    assert budget.overrun(0.0, 500.0, 600.0, 900.0, cpu=12.9) is None  # an hour of wall: fine
    assert budget.overrun(0.0, 1.0, 5.0, 6.0, cpu=13.4) == (
        "over budget: 13.4 CPU s from launch to its exit, past the 13 s allowed (TIME_BUDGET "
        "10 s + 3 s, all processes of the run, start-up included); the result does not count"
    )
    assert "13.5 CPU s since launch" in budget.stopped(0.0, 1.0, 13.5)
    assert "exited without a step line" in (budget.overrun(0.0, None, None, 5.0, cpu=1.0) or "")
    assert budget_grace(25.0, "cpu") == CPU_GRACE_S
    assert budget_grace(1000.0, "cpu") == 100.0


@pytest.mark.skipif(not cpu_clock_available(), reason="reads CPU time from /proc")
@pytest.mark.parametrize(
    ("phases", "stopped"),
    [
        (("0", "0.2", "0", "--idle", "3"), None),  # 3 s of wall past 1.5 s: load, not work
        (("0", "0.2", "0", "--late", "3"), None),  # a first step line 3 s late: load too
        (("3", "0.1", "0"), "CPU s"),  # computes before its first step line
        (("0", "0.1", "3"), "CPU s"),  # computes after its last: the grace stretched
    ],
    ids=["idle-wall-time", "slow-start", "before-first-step", "after-last-step"],
)
def test_a_run_on_the_cpu_clock(tmp_path: Path, phases: tuple[str, ...], stopped: str | None):
    """Allowed 1.5 CPU s from launch, and 2 s of start-up on the wall clock: a run that waits
    (wall time without CPU time, what a loaded machine does to an honest run), even before its
    first step line, is within it; one that computes 3 CPU s before its first step line or
    after its last is `over_budget`."""
    budget = Budget(1.0, 0.5, 2.0, steps_required=True, clock="cpu")
    result = run_stub(tmp_path, "cpu_train.py", *phases, budget=budget, timeout=120)
    if stopped is None:
        assert result.ok and result.crash_class is None, result.log_tail
    else:
        assert result.crash_class == "over_budget" and not result.ok
        assert stopped in result.log_tail and "[autoresearch] over budget: " in result.log_tail


def test_sigterm_ignored_escalates_to_sigkill(tmp_path: Path) -> None:
    result = run_stub(tmp_path, "ignore_sigterm.py", timeout=0.5)
    assert result.crash_class == "timeout" and result.exit_code == -9


def test_cancel_interrupts(tmp_path: Path) -> None:
    cancel = threading.Event()
    result = run_stub(
        tmp_path, "hang.py", timeout=60, cancel=cancel, on_line=lambda _: cancel.set()
    )
    assert result.crash_class == "interrupted" and not result.ok


@pytest.mark.skipif(not LINUX, reason="descendants outside the group are found through /proc")
@pytest.mark.parametrize("mode", ["exit", "hang"])
def test_grandchildren_are_killed(tmp_path: Path, mode: str) -> None:
    pid_file = tmp_path / "pids"
    result = run_stub(tmp_path, "spawn_children.py", str(pid_file), mode, timeout=2.0)
    pids = [int(line) for line in pid_file.read_text().split()]
    assert len(pids) == 3
    assert [pid for pid in pids if alive(pid)] == []
    if mode == "exit":
        assert result.ok and result.summary == {"val_bpb": 1.5}
        assert "killed 3 leftover process(es)" in result.log_path.read_text()
    else:
        assert result.crash_class == "timeout"


def test_a_raising_callback_kills_the_child_and_propagates(tmp_path: Path) -> None:
    def boom(line: str) -> None:
        raise KeyError(line)

    pid_file = tmp_path / "pids"
    with pytest.raises(KeyError):
        run_stub(tmp_path, "spawn_children.py", str(pid_file), "hang", on_line=boom)
    if LINUX:
        assert [pid for pid in map(int, pid_file.read_text().split()) if alive(pid)] == []


def test_a_child_that_cannot_start_is_a_result(tmp_path: Path) -> None:
    result = run_training(
        tmp_path / "missing",
        tmp_path / "run.log",
        env={},
        command=[sys.executable, "train.py"],
        timeout=5,
    )
    assert result.exit_code is None and result.crash_class == "other" and not result.ok
    assert "could not start" in (tmp_path / "run.log").read_text()


@pytest.mark.skipif(not LINUX, reason="counts /proc/self/fd")
@pytest.mark.skipif(not children_listed(), reason="lists /proc/self/task/*/children")
def test_many_runs_leak_no_fds_threads_or_children(tmp_path: Path) -> None:
    run_stub(tmp_path, "ok_train.py")  # warm up lazily created resources
    fds, threads, children = open_fds(), threading.active_count(), own_children()
    for _ in range(15):
        assert run_stub(tmp_path, "ok_train.py").ok
    run_stub(tmp_path, "hang.py", stall_timeout=0.2)
    assert open_fds() == fds and threading.active_count() == threads
    assert own_children() == children  # none left running, none left unreaped


def test_an_untraceable_escapee_holding_the_pipe_does_not_hang_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # New session and a scrubbed environment: the one descendant the harness cannot find.
    # It keeps the pipe open; the run must still end once the child has exited.
    monkeypatch.setattr(watch, "DRAIN_S", 0.3)
    (tmp_path / "train.py").write_text(
        "import os, subprocess, sys\n"
        "p = subprocess.Popen(['sleep', '1000'], start_new_session=True,"
        " env={'PATH': os.environ['PATH']})\n"
        "open('pid', 'w').write(str(p.pid))\n"
        "print('---'); print('val_bpb: 1.0')\n"
    )
    try:
        result = run_training(tmp_path, tmp_path / "run.log", env=dict(os.environ), timeout=30)
        assert result.ok and result.summary == {"val_bpb": 1.0}
    finally:
        os.kill(int((tmp_path / "pid").read_text()), 9)


def test_kill_orphans_finds_the_runs_of_a_killed_harness(tmp_path: Path) -> None:
    """A harness killed with -9 leaves a marked child running where no guard watches it (a
    warm child waiting for its run, the evaluator; run_training's runs die with the harness,
    tests/test_orphans.py); the marker it recorded finds it."""
    harness = tmp_path / "harness.py"
    harness.write_text(
        "import os, subprocess, sys\n"
        "from autoresearch import runner\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'],\n"
        "    env={'PATH': '/usr/bin:/bin', runner.RUN_MARKER_VAR: sys.argv[2]},\n"
        "    start_new_session=True).wait()\n"
    )
    marker = "orphan-test-" + os.urandom(4).hex()
    proc = subprocess.Popen(
        [sys.executable, str(harness), str(tmp_path), marker],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    tag = f"{RUN_MARKER_VAR}={marker}".encode()
    deadline = time.monotonic() + 120  # a guard against a hang, not a speed limit
    while not marked_processes(tag):
        assert time.monotonic() < deadline, "the child never started"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    orphans = marked_processes(tag)
    assert orphans  # the child outlived its harness
    assert kill_orphans(marker) == len(orphans)
    assert not marked_processes(tag)
    assert kill_orphans(marker) == 0


# ---------------------------------------------------------------------------------------------
# Warm starts: the same run, from an interpreter started (and its imports done) beforehand
# ---------------------------------------------------------------------------------------------


def warm_child(tmp_path: Path, preload: tuple[str, ...] = ("json",)) -> WarmChild:
    env = child_env(os.environ, preset="cpu", device="cpu", gpu=None, extra={"SPAWN_ONLY": "1"})
    return WarmChild(tmp_path, env, preload=preload)


def run_warm(tmp_path: Path, stub: str, warm: WarmChild, **extra: str) -> RunResult:
    env = child_env(os.environ, preset="cpu", device="cpu", gpu=None, extra=extra)
    return run_training(
        tmp_path,
        tmp_path / "run.log",
        command=[sys.executable, str(STUBS / stub)],
        env=env,
        timeout=30,
        marker=warm.marker,
        warm=warm,
    )


def printed(result: RunResult, key: str) -> object:
    line = next(x for x in result.log_path.read_text().splitlines() if x.startswith(key + " "))
    return json.loads(line[len(key) + 1 :])


def test_a_warm_run_runs_the_script_as_main_with_the_go_environment(tmp_path: Path) -> None:
    warm = warm_child(tmp_path)
    result = run_warm(tmp_path, "preloaded.py", warm, AT_GO="yes")
    assert result.ok and result.summary["val_bpb"] == 1.0
    assert printed(result, "PRELOADED") == ["json"]  # imported before the script's first line
    run = printed(result, "RUN")
    assert run == {"name": "__main__", "argv": [str(STUBS / "preloaded.py")], "stdin": ""}
    env = printed(result, "ENV")
    assert env["AT_GO"] == "yes" and "SPAWN_ONLY" not in env  # the go's environment, whole
    assert env[RUN_MARKER_VAR] == warm.marker
    assert env["PYTHONUNBUFFERED"] == "1"
    assert warm.proc is None  # the run owns the process now


def test_without_warm_start_the_same_stub_sees_nothing_preloaded(tmp_path: Path) -> None:
    result = run_stub(tmp_path, "preloaded.py")
    assert result.ok and printed(result, "PRELOADED") == []
    assert printed(result, "RUN")["name"] == "__main__"


@pytest.mark.parametrize(
    ("stub", "crash_class", "exit_code"),
    [
        ("ok_train.py", None, 0),
        ("import_error.py", "import", 1),
        ("oom.py", "oom", 1),
        ("nan.py", "nan", 3),
        ("no_summary.py", "no_summary", 0),
        ("sigkill_self.py", "oom", -9),
    ],
)
def test_a_warm_run_ends_and_is_classified_as_a_cold_one(
    tmp_path: Path, stub: str, crash_class: str | None, exit_code: int
) -> None:
    cold = run_stub(tmp_path, stub)
    warm = run_warm(tmp_path, stub, warm_child(tmp_path))
    assert (cold.crash_class, cold.exit_code) == (crash_class, exit_code)
    assert (warm.crash_class, warm.exit_code) == (crash_class, exit_code)
    assert warm.summary == cold.summary


def test_a_dead_warm_child_means_a_cold_launch(tmp_path: Path) -> None:
    warm = warm_child(tmp_path)
    assert warm.proc is not None
    warm.proc.kill()
    warm.proc.wait()
    result = run_warm(tmp_path, "preloaded.py", warm)
    assert result.ok and printed(result, "PRELOADED") == []  # a fresh interpreter ran it
    assert printed(result, "ENV")[RUN_MARKER_VAR] == warm.marker  # the recorded marker
    assert warm.proc is None


def test_a_warm_child_for_another_directory_is_not_used(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    warm = warm_child(other)
    pid = warm.proc.pid
    result = run_warm(tmp_path, "preloaded.py", warm)
    assert result.ok and printed(result, "PRELOADED") == []
    assert warm.proc is None and not alive(pid)


def test_a_discarded_or_orphaned_warm_child_exits(tmp_path: Path) -> None:
    warm = warm_child(tmp_path, preload=("numpy",))
    pid = warm.proc.pid
    warm.discard()
    assert warm.proc is None and not alive(pid)
    # the harness dies: the child's stdin closes before any go, and it exits by itself
    orphan = warm_child(tmp_path)
    orphan.proc.stdin.close()
    assert orphan.proc.wait(10) == 0
    orphan.proc.stdout.close()


# A stand-in for the sealed evaluator: with --wait it waits for the go and prints it; without,
# it is the cold run and prints its arguments. Both print the variable WHICH and the marker.
PRESTARTED = f"""\
import json, os, sys
if "--wait" in sys.argv:
    line = sys.stdin.readline()
    if not line.strip():
        sys.exit(0)
    print("WARM", line.strip())
else:
    print("COLD", json.dumps(sys.argv[1:]))
print("WHICH", json.dumps(os.environ.get("WHICH")))
print("MARKER", os.environ.get("{RUN_MARKER_VAR}"))
"""
PRESTARTED_FOR = [sys.executable, "-c", PRESTARTED, "--for", "a"]


def prestarted(tmp_path: Path) -> Prestarted:
    env = child_env(os.environ, preset="cpu", device="cpu", gpu=None, extra={"WHICH": "start"})
    warm = Prestarted([*PRESTARTED_FOR, "--wait"], tmp_path, env, stands_for=PRESTARTED_FOR)
    warm.message = {"go": "yes"}
    return warm


def run_prestarted(
    tmp_path: Path, warm: Prestarted, *, which: str = "start", run_for: str = "a"
) -> str:
    """The log of a run of `PRESTARTED --for run_for --run` with WHICH=which, given `warm`."""
    env = child_env(os.environ, preset="cpu", device="cpu", gpu=None, extra={"WHICH": which})
    run_training(
        tmp_path,
        tmp_path / "run.log",
        command=[sys.executable, "-c", PRESTARTED, "--for", run_for, "--run"],
        env=env,
        timeout=30,
        marker=warm.marker,
        warm=warm,
    )
    return (tmp_path / "run.log").read_text()


def test_a_prestarted_child_takes_the_run_it_stands_for(tmp_path: Path) -> None:
    warm = prestarted(tmp_path)
    pid = warm.proc.pid
    log = run_prestarted(tmp_path, warm)
    assert 'WARM {"go": "yes"}' in log and "COLD" not in log
    assert 'WHICH "start"' in log and f"MARKER {warm.marker}" in log
    assert warm.proc is None and not alive(pid)  # it ran, and the run saw it exit


@pytest.mark.parametrize(
    ("which", "run_for"),
    [("changed", "a"), ("start", "b")],
    ids=["another-environment", "another-command"],
)
def test_a_prestarted_child_refuses_another_run_and_it_starts_cold(
    tmp_path: Path, which: str, run_for: str
) -> None:
    warm = prestarted(tmp_path)
    pid = warm.proc.pid
    log = run_prestarted(tmp_path, warm, which=which, run_for=run_for)
    assert f'COLD ["--for", "{run_for}", "--run"]' in log and "WARM" not in log
    assert f'WHICH "{which}"' in log  # the caller's environment, not the child's
    assert f"MARKER {warm.marker}" in log  # the marker the caller recorded
    assert warm.proc is None and not alive(pid)  # discarded, not left waiting
    assert not marked_processes(f"{RUN_MARKER_VAR}={warm.marker}".encode())


def test_warm_preload_reads_module_level_imports() -> None:
    assert warm_preload("import torch\nimport numpy as np\nimport math\n") == (
        "torch",
        "numpy",
    )
    assert warm_preload("import torch.nn as nn\nfrom torch.nn import functional\n") == ("torch.nn",)
    compiled = "import torch\nmodel = torch.compile(model)\n"
    assert warm_preload(compiled) == ("torch", *WARM_COMPILER)
    assert warm_preload("import math\nfrom .x import torch\n") == ()
    assert warm_preload("def f():\n    import torch\n") == ()  # not at module level
    assert warm_preload("import torch(\n") == ()


def test_a_preload_that_fails_to_import_still_runs_the_script(tmp_path: Path) -> None:
    warm = warm_child(tmp_path, preload=("json", "no_such_module_here"))
    result = run_warm(tmp_path, "preloaded.py", warm)
    assert result.ok and printed(result, "PRELOADED") == ["json"]


@pytest.mark.parametrize(
    ("source", "ok"),
    [
        ("import os\nx = os.environ.get('A', '1')\n", True),
        ("import os\nif 'A' in os.environ: pass\n", True),
        ("import os\nos.environ['A'] = '1'\nimport torch\n", False),
        ("from os import environ\nenviron['A'] = '1'\n", False),
        ("import os\nos.environ.update(A='1')\n", False),
        ("import os\nos.environ.setdefault('A', '1')\n", False),
        ("import os\ndel os.environ['A']\n", False),
        ("import os\nos.putenv('A', '1')\n", False),
        ("def main():\n    import os\n    os.environ.pop('A', None)\n", False),
        ("syntax error(\n", False),
    ],
)
def test_warm_start_ok_refuses_a_train_py_that_sets_the_environment(source: str, ok: bool) -> None:
    assert warm_start_ok(source) is ok
