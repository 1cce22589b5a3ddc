"""The research loop end to end: real git, real CLI subprocesses, the real openai client
against a fake endpoint over HTTP, and a stub trainer standing in for the GPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakellm import FakeLLM
from loopkit import (
    STUB_TRAIN,
    adopting_orphans,
    alive,
    children_listed,
    cli,
    cmdline,
    git,
    make_workspace,
    openai_args,
    own_children,
    own_descendants,
    replay_args,
    reply,
    results_rows,
    run_args,
    stub_bpb,
    stub_cli_env,
)

from autoresearch import commands
from autoresearch.errors import UsageError

TAG = "t1"
BRANCH = f"autoresearch/{TAG}"


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    return make_workspace(tmp_path / "ws")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return stub_cli_env(tmp_path)


def run_llm(
    ws: Path, env: dict, server: FakeLLM, n: int, *extra: str
) -> subprocess.CompletedProcess:
    # --no-overlap: one request at a time, so the script's order is the loop's order
    args = run_args(TAG, *openai_args(server.base_url), "--no-overlap", *extra, n=n)
    return cli(ws, *args, env={**env, "OPENAI_API_KEY": "sk-test-secret"})


def assert_consistent(ws: Path, expected_head: str) -> None:
    """Branch checked out at the expected commit, working tree clean."""
    assert git(ws, "rev-parse", "--abbrev-ref", "HEAD") == BRANCH
    assert git(ws, "rev-parse", "HEAD") == expected_head
    assert git(ws, "status", "--porcelain") == ""


def attempt(ws: Path, n: int) -> str:
    return git(ws, "rev-parse", f"refs/autoresearch/{TAG}/attempts/{n:04d}")


def records(ws: Path) -> list[dict]:
    path = ws / "runs" / TAG / "experiments.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow  # whole sessions with real children: minutes on two cores
def test_scripted_session_step_by_step(ws: Path, env: dict) -> None:
    """A good edit, a malformed reply then a fix, a crash and its repair, a worse result."""
    base = git(ws, "rev-parse", "HEAD")
    with FakeLLM() as server:
        # 1. baseline + a good edit: kept.
        server.enqueue(
            reply("Raise LR to 0.06", ("LR = 0.04  # learning rate", "LR = 0.06  # learning rate"))
        )
        proc = run_llm(ws, env, server, 2)
        assert proc.returncode == 0, proc.stderr + proc.stdout
        head = git(ws, "rev-parse", "HEAD")
        assert git(ws, "log", "-1", "--format=%s") == "exp 0002: Raise LR to 0.06"
        assert git(ws, "rev-parse", "HEAD~1") == base
        assert_consistent(ws, head)
        assert attempt(ws, 2) == head
        rows = results_rows(ws, TAG)
        assert [(r[3], r[4]) for r in rows] == [("keep", "baseline"), ("keep", "Raise LR to 0.06")]
        assert float(rows[0][1]) == pytest.approx(stub_bpb(0.04, 64))
        assert float(rows[1][1]) == pytest.approx(stub_bpb(0.06, 64))
        assert rows[1][0] == head[:7] and rows[1][2] == "1.0"

        # 2. a malformed reply, then a corrected one: one experiment, kept.
        server.enqueue(reply("Wider", ("WIDTH = 32  # nowhere in train.py", "WIDTH = 128")))
        server.enqueue(
            reply(
                "Double WIDTH to 128", ("WIDTH = 64  # model width", "WIDTH = 128  # model width")
            )
        )
        proc = run_llm(ws, env, server, 3, "--resume")
        assert proc.returncode == 0, proc.stderr + proc.stdout
        retry_prompt = json.dumps(server.requests[-1]["messages"])
        assert "WIDTH = 32" in retry_prompt and "WIDTH = 64  # model width" in retry_prompt
        head = git(ws, "rev-parse", "HEAD")
        assert_consistent(ws, head)
        assert [r[3] for r in results_rows(ws, TAG)] == ["keep", "keep", "keep"]
        assert records(ws)[2]["agent"]["attempts"] == 2

        # 3. a crash, then the agent's repair: crash recorded, repair kept.
        server.enqueue(
            reply(
                "Try crashing",
                ("CRASH = False  # raise before training", "CRASH = True  # raise before training"),
            )
        )
        server.enqueue(
            reply(
                "Undo the crash and raise LR to 0.07",
                ("CRASH = True  # raise before training", "CRASH = False  # raise before training"),
                ("LR = 0.06  # learning rate", "LR = 0.07  # learning rate"),
            )
        )
        proc = run_llm(ws, env, server, 5, "--resume")
        assert proc.returncode == 0, proc.stderr + proc.stdout
        assert "simulated crash in train.py" in json.dumps(server.requests[-1]["messages"])
        rows = results_rows(ws, TAG)
        assert [r[3] for r in rows] == ["keep", "keep", "keep", "crash", "keep"]
        assert rows[3][1] == "0.000000"
        recs = records(ws)
        assert recs[3]["crash_class"] == "other" and recs[4]["fix_of"] == 4
        assert "CRASH = True" in git(ws, "show", f"{attempt(ws, 4)}:train.py")
        head = git(ws, "rev-parse", "HEAD")
        assert head == attempt(ws, 5)
        assert_consistent(ws, head)

        # 4. a worse result: discarded, branch back at the best, attempt still reachable.
        server.enqueue(
            reply("LR to 0.5", ("LR = 0.07  # learning rate", "LR = 0.5  # learning rate"))
        )
        proc = run_llm(ws, env, server, 6, "--resume")
        assert proc.returncode == 0, proc.stderr + proc.stdout
        assert_consistent(ws, head)
        assert [r[3] for r in results_rows(ws, TAG)][-1] == "discard"
        assert "LR = 0.5" in git(ws, "show", f"{attempt(ws, 6)}:train.py")
        assert "LR = 0.07" in (ws / "train.py").read_text()
        assert server.pending() == 0
    # Nothing secret reached the record.
    assert "sk-test-secret" not in "".join(
        p.read_text() for p in (ws / "runs").rglob("*") if p.is_file()
    )
    # The per-experiment artifacts exist.
    exp6 = ws / "runs" / TAG / "0006"
    assert {"patch.diff", "run.log", "prompt.json", "reply.txt"} <= {p.name for p in exp6.iterdir()}
    assert "+LR = 0.5" in (exp6 / "patch.diff").read_text()


def test_status_log_show(ws: Path, env: dict, tmp_path: Path) -> None:
    patches = tmp_path / "patches"
    patches.mkdir()
    (patches / "01.txt").write_text(
        reply("LR to 0.06", ("LR = 0.04  # learning rate", "LR = 0.06  # learning rate"))
    )
    (patches / "02.txt").write_text(
        reply("LR to 0.5", ("LR = 0.06  # learning rate", "LR = 0.5  # learning rate"))
    )
    proc = cli(ws, *run_args(TAG, *replay_args(patches)), env=env)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "agent has no more proposals" in proc.stdout
    status = cli(ws, "status", "--json", env=env)
    data = json.loads(status.stdout)
    assert data["counts"] == {"keep": 2, "discard": 1}
    assert data["best"]["id"] == 2 and data["best"]["val_bpb"] == pytest.approx(stub_bpb(0.06))
    log = cli(ws, "log", env=env).stdout
    assert f"{stub_bpb(0.04):.6f} → {stub_bpb(0.06):.6f}" in log and "LR to 0.5" not in log
    show = cli(ws, "show", "3", env=env).stdout
    assert "+LR = 0.5" in show and "val_bpb" in show and "discard" in show


@pytest.mark.slow  # whole sessions with real children: minutes on two cores
def test_refusals_write_nothing(ws: Path, env: dict, tmp_path: Path) -> None:
    base_args = run_args(TAG, "--agent", "tuner")
    # Dirty tree.
    (ws / "train.py").write_text(STUB_TRAIN + "\n# local change\n")
    proc = cli(ws, *base_args, env=env)
    assert proc.returncode == 1 and "uncommitted changes" in proc.stderr
    git(ws, "checkout", "train.py")
    # Missing data.
    proc = cli(ws, *base_args, env={**env, "AUTORESEARCH_CACHE": str(tmp_path / "empty")})
    assert proc.returncode == 2 and "autoresearch prepare" in proc.stderr
    # Bad flags.
    for bad in (
        ["--agent", "gpt"],
        ["--preset", "tpu"],
        ["--max-experiments", "0"],
        ["--timeout", "-5"],
    ):
        proc = cli(ws, "run", "--tag", TAG, *bad, env=env)
        assert proc.returncode == 2, (bad, proc.stderr)
    proc = cli(ws, "run", "--tag", TAG, "--device", "cuda", env=env)
    assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr
    proc = cli(ws, "run", "--tag", "bad/tag", "--agent", "tuner", env=env)
    assert proc.returncode == 2
    # Resume of a session that never started.
    proc = cli(ws, *base_args, "--resume", env=env)
    assert proc.returncode == 1 and "nothing to resume" in proc.stderr
    assert git(ws, "branch", "--list", "autoresearch/*") == ""
    assert not (ws / "runs").exists() or not any((ws / "runs").iterdir())
    assert git(ws, "status", "--porcelain") == ""
    # An existing branch is refused without --resume.
    proc = cli(ws, *base_args, "--max-experiments", "1", env=env)
    assert proc.returncode == 0, proc.stderr
    proc = cli(ws, *base_args, env=env)
    assert proc.returncode == 1 and "--resume" in proc.stderr


def _wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def _state(ws: Path) -> dict:
    try:
        return json.loads((ws / "runs" / TAG / "state.json").read_text()) or {}
    except (OSError, json.JSONDecodeError):
        return {}


def _start(ws: Path, env: dict, patches: Path, n: int, log: Path | None = None) -> subprocess.Popen:
    """The CLI running a replay session in its own process group; output to `log` if given."""
    command = [sys.executable, "-m", "autoresearch", *run_args(TAG, *replay_args(patches), n=n)]
    command += ["--workspace", str(ws)]
    if log is None:
        return subprocess.Popen(
            command,
            cwd=ws,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    with open(log, "wb") as out:
        return subprocess.Popen(
            command,
            cwd=ws,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _patches(tmp_path: Path) -> Path:
    patches = tmp_path / "patches"
    patches.mkdir()
    (patches / "01.txt").write_text(
        reply("LR to 0.06", ("LR = 0.04  # learning rate", "LR = 0.06  # learning rate"))
    )
    (patches / "02.txt").write_text(
        reply("WIDTH to 128", ("WIDTH = 64  # model width", "WIDTH = 128  # model width"))
    )
    (patches / "03.txt").write_text(
        reply("LR to 0.07", ("LR = 0.06  # learning rate", "LR = 0.07  # learning rate"))
    )
    return patches


def _resume(ws: Path, env: dict, patches: Path, n: int) -> subprocess.CompletedProcess:
    return cli(ws, *run_args(TAG, *replay_args(patches), n=n), "--resume", env=env)


def _check_final(ws: Path, n: int) -> None:
    recs = records(ws)
    assert [r["id"] for r in recs] == list(range(1, n + 1))  # nothing lost, nothing twice
    assert len(results_rows(ws, TAG)) == n
    best = [r for r in recs if r["status"] == "keep"][-1]
    assert git(ws, "rev-parse", "HEAD") == best["commit"]
    assert git(ws, "status", "--porcelain") == ""
    for r in recs[1:]:
        if r["commit"]:
            assert attempt(ws, r["id"]) == r["commit"]


@pytest.mark.slow  # whole sessions with real children: minutes on two cores
def test_sigkill_mid_training_then_resume(ws: Path, env: dict, tmp_path: Path) -> None:
    (ws / "train.py").write_text(STUB_TRAIN.replace("SLEEP = 0.0", "SLEEP = 0.5"))
    git(ws, "commit", "-qam", "slow stub")
    proc = _start(ws, env, _patches(tmp_path), 3)
    _wait_for(lambda: _state(ws).get("phase") == "training" and _state(ws).get("id") == 2)
    _wait_for(lambda: "run_marker" in _state(ws))  # what a resume uses to kill leftovers
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(records(ws)) == 1
    done = _resume(ws, env, tmp_path / "patches", 3)
    assert done.returncode == 0, done.stderr + done.stdout
    assert "re-running experiment 0002" in done.stdout
    _check_final(ws, 3)
    assert [r["description"] for r in records(ws)] == ["baseline", "LR to 0.06", "WIDTH to 128"]


@pytest.mark.slow  # whole sessions with real children: minutes on two cores
def test_sigkill_mid_commit_then_resume(ws: Path, env: dict, tmp_path: Path) -> None:
    """Kill the tool while git is writing the candidate commit (a hook holds it there)."""
    hook = ws / ".git" / "hooks" / "reference-transaction"
    entered = tmp_path / "hook-entered"
    hook.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = prepared ] && grep -q committing "{ws}/runs/{TAG}/state.json" 2>/dev/null; then\n'
        f'  touch "{entered}"; sleep 60\n'
        "fi\n"
    )
    hook.chmod(0o755)
    proc = _start(ws, env, _patches(tmp_path), 3)
    _wait_for(entered.exists)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    hook.unlink()
    assert _state(ws).get("phase") == "committing"
    locks = list((ws / ".git").rglob("*.lock"))
    assert locks  # git died holding its locks
    past = time.time() - 60  # the user resumes a while later: the locks are old by then
    for lock in locks:
        os.utime(lock, (past, past))
    done = _resume(ws, env, tmp_path / "patches", 3)
    assert done.returncode == 0, done.stderr + done.stdout
    _check_final(ws, 3)
    assert [r["description"] for r in records(ws)] == ["baseline", "LR to 0.06", "WIDTH to 128"]


def test_ctrl_c_once_finishes_the_experiment_then_stops(
    ws: Path, env: dict, tmp_path: Path
) -> None:
    patches = tmp_path / "patches"
    patches.mkdir()
    slow = ("SLEEP = 0.0  # seconds per step", "SLEEP = 0.5  # seconds per step")  # not the base
    (patches / "01.txt").write_text(
        reply("slow LR 0.06", ("LR = 0.04  # learning rate", "LR = 0.06  # learning rate"), slow)
    )
    log = tmp_path / "out.log"
    proc = _start(ws, env, patches, 3, log)
    _wait_for(lambda: _state(ws).get("phase") == "training" and _state(ws).get("id") == 2)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0, log.read_text()
    recs = records(ws)
    assert [r["id"] for r in recs] == [1, 2] and recs[1]["status"] == "keep"
    assert "stopped by Ctrl-C" in log.read_text()
    assert git(ws, "rev-parse", "HEAD") == recs[1]["commit"]
    assert git(ws, "status", "--porcelain") == ""


def test_ctrl_c_twice_kills_the_run_resets_and_records(ws: Path, env: dict, tmp_path: Path) -> None:
    base = git(ws, "rev-parse", "HEAD")
    patches = tmp_path / "patches"
    patches.mkdir()
    slow = ("SLEEP = 0.0  # seconds per step", "SLEEP = 5.0  # seconds per step")
    (patches / "01.txt").write_text(
        reply("slow LR 0.06", ("LR = 0.04  # learning rate", "LR = 0.06  # learning rate"), slow)
    )
    log = tmp_path / "out.log"
    proc = _start(ws, env, patches, 3, log)
    _wait_for(lambda: _state(ws).get("phase") == "training" and _state(ws).get("id") == 2)
    proc.send_signal(signal.SIGINT)
    _wait_for(lambda: "Ctrl-C" in log.read_text())
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130, log.read_text()
    recs = records(ws)
    assert [r["status"] for r in recs] == ["keep", "interrupted"]
    assert recs[1]["crash_class"] == "interrupted"
    assert git(ws, "rev-parse", "HEAD") == base  # reset to the best: the baseline
    assert git(ws, "status", "--porcelain") == ""
    assert attempt(ws, 2) == recs[1]["commit"]  # the interrupted idea is still reachable
    assert not _state(ws)


WARM_BOOT_MARK = "runpy.run_path(sys.argv[0]"  # in the command line of a warm child only


def _warm_descendants() -> list[int]:
    """Warm children among this process's descendants that still run (in adopting_orphans,
    one the CLI left behind is re-parented here)."""
    return [
        pid for pid in own_descendants() if WARM_BOOT_MARK.encode() in cmdline(pid) and alive(pid)
    ]


@pytest.mark.slow  # whole sessions with real children: minutes on two cores
@pytest.mark.skipif(not children_listed(), reason="lists /proc/self/task/*/children")
@pytest.mark.parametrize("warm_flag", ["--warm-start", "--no-warm-start"])
def test_later_runs_start_warm_and_no_warm_child_outlives_the_session(
    tmp_path: Path, env: dict, warm_flag: str
) -> None:
    """A train.py that imports numpy: numpy is already imported when its first line runs
    (the CLI started the first run's interpreter before its own `import torch`, the session
    each later one while the last run finished), unless --no-warm-start; a train.py that sets
    an environment variable always starts cold."""
    preloaded = (
        "import sys\nPRELOADED = 'numpy' in sys.modules\nimport numpy  # noqa: E402\n"
        + STUB_TRAIN.replace(
            "    for i in range(3):", '    print(f"preloaded: {PRELOADED}")\n    for i in range(3):'
        )
    )
    with adopting_orphans():
        seen = _preloaded_per_run(make_workspace(tmp_path / "ws", preloaded), env, 3, warm_flag)
        assert _warm_descendants() == []  # the last warm child was discarded
    assert len(seen) >= 3
    if warm_flag == "--warm-start":
        assert set(seen) == {True}  # the first run too
    else:
        assert set(seen) == {False}

    setenv = preloaded.replace(
        "import numpy  # noqa: E402\n",
        "import numpy  # noqa: E402\nimport os\nos.environ['X'] = '1'\n",
    )
    seen = _preloaded_per_run(make_workspace(tmp_path / "ws2", setenv), env, 2, warm_flag)
    assert len(seen) >= 2 and set(seen) == {False}


@pytest.mark.skipif(not children_listed(), reason="lists /proc/self/task/*/children")
def test_an_error_before_the_first_run_leaves_no_warm_child(
    tmp_path: Path, env: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI starts the first run's interpreter before it picks the device; a usage error
    found after that (here --device cuda on a machine without one) ends it at once. In this
    process, so that a child left waiting would still have its stdin open and be found among
    this process's own children."""
    if _torch_sees_cuda():
        pytest.skip("this machine has a CUDA device")
    preloaded = "import numpy  # noqa: F401\n" + STUB_TRAIN
    ws = make_workspace(tmp_path / "ws", preloaded)
    monkeypatch.setattr(os, "environ", dict(env))
    with pytest.raises(UsageError, match="no CUDA GPU"):
        commands.run_session(
            workspace=ws,
            tag=TAG,
            flags={"agent": "tuner", "device": "cuda"},
            patches=None,
            gpu=None,
            resume=False,
            overlap=True,
            quiet=True,
        )
    assert _own_warm_children() == []


def _own_warm_children() -> list[int]:
    """This process's children that are warm children and still run."""
    found = []
    for pid in own_children():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:  # reaped meanwhile
            continue
        if WARM_BOOT_MARK.encode() in cmdline and alive(pid):
            found.append(pid)
    return found


def _torch_sees_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _preloaded_per_run(ws: Path, env: dict, n: int, *flags: str) -> list[bool]:
    """Run a tuner session of `n` experiments; what each run printed on `preloaded: `."""
    result = cli(
        ws, "run", "--tag", TAG, "--agent", "tuner", "--max-experiments", str(n),
        "--calibrate", "1", *flags, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return [
        line == "preloaded: True"
        for log in sorted((ws / "runs" / TAG).glob("*/run*.log"))
        for line in log.read_text().splitlines()
        if line.startswith("preloaded: ")
    ]
