"""A run dies with the process that started it (runner.run_training, procs.Guard).

Real processes: a harness process starts a training run through the runner; the training child
starts a grandchild in its process group and another that moves to a session of its own (as a
compile worker may), writes their pids, and waits. The harness is then killed with SIGKILL, as
a slot's Ray actor is when it is lost; every one of those processes must be gone. Linux only (the
parent-death signal and /proc).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from autoresearch import procs, runner

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")

GONE_DEADLINE_S = 60.0  # generous: the machine may be busy; the test waits, it never times

CHILD = textwrap.dedent(
    """
    import os, subprocess, sys, time
    from pathlib import Path
    wait = [sys.executable, "-c", "import time; time.sleep(600)"]
    in_group = subprocess.Popen(wait)
    own_session = subprocess.Popen(wait, start_new_session=True)
    pids = f"{os.getpid()} {in_group.pid} {own_session.pid}"
    Path(sys.argv[1] + ".tmp").write_text(pids)
    os.replace(sys.argv[1] + ".tmp", sys.argv[1])
    print("step 1 | loss 1.0", flush=True)
    time.sleep(600)
    """
)

HARNESS = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from autoresearch import runner
    work = Path(sys.argv[1])
    runner.run_training(
        work, work / "run.log", command=[sys.executable, "child.py", str(work / "pids")],
        env=dict(os.environ), timeout=600,
    )
    """
)


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for its new parent to reap it."""
    state = procs._proc_state(pid)
    return state is not None and state[0] not in "ZX"


def _wait_for(path: Path, harness: subprocess.Popen) -> str:
    deadline = time.monotonic() + GONE_DEADLINE_S
    while not path.exists():
        assert harness.poll() is None, "the harness ended before its run started"
        assert time.monotonic() < deadline, "the training child never wrote its pids"
        time.sleep(0.05)
    return path.read_text()


def _wait_gone(pids: list[int]) -> list[int]:
    deadline = time.monotonic() + GONE_DEADLINE_S
    while (alive := [pid for pid in pids if _alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


def _start_harness(work: Path) -> subprocess.Popen:
    (work / "child.py").write_text(CHILD)
    return subprocess.Popen([sys.executable, "-c", HARNESS, str(work)], cwd=work)


def test_run_dies_with_a_harness_killed_with_sigkill(tmp_path: Path) -> None:
    harness = _start_harness(tmp_path)
    try:
        pids = [int(p) for p in _wait_for(tmp_path / "pids", harness).split()]
        assert all(_alive(pid) for pid in pids)
    finally:
        harness.kill()
        harness.wait()
    alive = _wait_gone(pids)
    for pid in alive:  # leave nothing behind on the machine, whatever the result
        os.kill(pid, signal.SIGKILL)
    assert alive == [], f"left running after the harness died: {alive}"


def test_a_run_that_ends_normally_ends_and_reaps_its_guard(tmp_path: Path) -> None:
    """When the run is over the guard is ended and reaped before run_training returns, so it
    never mistakes the end of a run for the harness's death, and no process of it is left."""
    marker = "orphans-test-" + tmp_path.name
    script = tmp_path / "quick.py"
    script.write_text("print('---'); print('val_bpb: 1.0')\n")
    result = runner.run_training(
        tmp_path,
        tmp_path / "run.log",
        command=[sys.executable, str(script)],
        env=dict(os.environ),
        timeout=120,
        marker=marker,
    )
    assert result.ok, result.log_tail
    # the guard carries the marker on its command line, not in its environment
    assert not [
        entry.name
        for entry in procs.PROC.iterdir()
        if entry.name.isdigit() and _has_arg(int(entry.name), marker)
    ]


def _has_arg(pid: int, arg: str) -> bool:
    try:
        return arg.encode() in (procs.PROC / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False


def test_die_with_parent_arms_the_signal_in_the_child() -> None:
    """The child reads its own parent-death signal back from the kernel (PR_GET_PDEATHSIG)."""
    code = (
        "import ctypes, signal; v = ctypes.c_int(); "
        "ctypes.CDLL(None).prctl(2, ctypes.byref(v), 0, 0, 0); print(v.value)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        preexec_fn=procs.die_with_parent(),
        capture_output=True,
        text=True,
        check=True,
    )
    assert int(out.stdout) == signal.SIGKILL


def test_adopting_orphans_finds_a_daemon_among_this_process_descendants_and_ends_it() -> None:
    """The tests' way to find what a run left behind without looking at other processes: a
    shell that starts a sleeper in the background and exits leaves an orphan, re-parented to
    this process while it adopts orphans, and killed when it stops."""
    from loopkit import adopting_orphans, alive, cmdline, own_descendants

    token = f"adopted-{os.getpid()}-{time.monotonic_ns()}"
    sleeper = f"import time; time.sleep(600)  # {token}"
    with adopting_orphans():
        shell = subprocess.run(
            ["/bin/sh", "-c", f'{sys.executable} -c "{sleeper}" >/dev/null 2>&1 & echo $!'],
            capture_output=True,
            text=True,
            check=True,
        )
        orphan = int(shell.stdout.split()[0])  # its parent, the shell, has exited
        assert orphan in own_descendants()
        assert token.encode() in cmdline(orphan)
    assert not alive(orphan)
    assert orphan not in own_descendants()
