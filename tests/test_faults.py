"""Fault injection: every fault of docs/reliability.md that no other test covers end to end.

Each test drives the real CLI in a subprocess on a real git workspace (the stub trainer of
loopkit, or test_sealed's tiny torch trainer where the sealed evaluator is involved), injects
one fault, and then checks that nothing was lost: the branch and HEAD are where they must be,
the tree is clean, and the record has every experiment once, with its attempt ref.

Kills happen at observable points, never after a sleep: a state.json phase, a marker file
written by the code being held, a request reaching the fake endpoint. The phases are held by
real mechanisms where one exists (a slow endpoint for proposing, a git hook for applying, a
load_model that waits for evaluating); the kill during recording is simulated by writing the
state such a kill leaves behind (see the test's docstring).

Endpoint tests run the CLI through `TUNED_CLI`, which shortens two waits that only set how
long the tool is patient: the pause between agent outages (30 s) and the openai client's own
retries (4, with backoff of up to 8 s). What the tool does is unchanged; the request timeout
is the real `--agent-timeout` setting.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import loopkit
import pytest
from fakellm import FakeLLM
from loopkit import (
    STUB_TRAIN,
    alive,
    cli,
    closed_port,
    fake_prepared_cache,
    git,
    make_workspace,
    reply,
    results_rows,
    stub_bpb,
)

from autoresearch import loop
from autoresearch.agent import ReplayAgent
from autoresearch.display import Display
from autoresearch.ledger import Ledger, LedgerError
from autoresearch.loop import Session
from autoresearch.options import SessionOptions

ROOT = Path(__file__).resolve().parents[1]
TAG = "f"
BRANCH = f"autoresearch/{TAG}"
LINUX = Path("/proc/self/stat").exists()

OUTAGE_WAIT_S = 0.2  # instead of loop.AGENT_OUTAGE_WAIT_S (30 s)
CLIENT_RETRIES = 1  # instead of agent.CLIENT_MAX_RETRIES (4)
TUNED_CLI = (
    "import autoresearch.agent as agent, autoresearch.loop as loop;"
    f"loop.AGENT_OUTAGE_WAIT_S = {OUTAGE_WAIT_S};"
    f"agent.OpenAIAgent.__init__.__kwdefaults__['max_retries'] = {CLIENT_RETRIES};"
    "from autoresearch.cli import main; main()"
)

LR = "LR = {}  # learning rate"
WIDTH = "WIDTH = {}  # model width"
GOOD = reply("Raise LR to 0.06", (LR.format(0.04), LR.format(0.06)))
WIDER = reply("Double WIDTH to 128", (WIDTH.format(64), WIDTH.format(128)))
WORSE = reply("LR to 0.5", (LR.format(0.06), LR.format(0.5)))
STEP_LINE = "step 00000 (1.0%) | loss 5.000000 | dt 10ms | tok/sec 1,000 | mfu 0.0% | remaining 2s"
CRASH_LINES = '    if CRASH:\n        raise RuntimeError("simulated crash in train.py")'


# ------------------------------------------------------------------------------ helpers


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    return make_workspace(tmp_path / "ws")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AUTORESEARCH_", "OPENAI_"))}
    return {
        **base,
        "AUTORESEARCH_CACHE": str(fake_prepared_cache(tmp_path / "cache")),
        "AUTORESEARCH_SEALED": "0",  # the stub prints val_bpb and saves no checkpoint
        "OPENAI_API_KEY": "sk-test-secret",
        "PYTHONPATH": str(ROOT),
    }


def run_args(n: int, *extra: str) -> list[str]:
    return loopkit.run_args(TAG, "--calibrate", "1", *extra, n=n)


def llm_args(server_url: str, n: int, *extra: str) -> list[str]:
    return run_args(n, *loopkit.openai_args(server_url), *extra)


def replay_args(patches: Path, n: int, *extra: str) -> list[str]:
    return run_args(n, *loopkit.replay_args(patches), *extra)


def tuned_cli(
    ws: Path, *args: str, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess, with the outage waits of TUNED_CLI shortened."""
    return subprocess.run(
        [sys.executable, "-c", TUNED_CLI, *args, "--workspace", str(ws)],
        cwd=ws,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start(ws: Path, *args: str, env: dict[str, str]) -> subprocess.Popen:
    """The real CLI in the background, in a process group of its own (to SIGKILL it)."""
    return subprocess.Popen(
        [sys.executable, "-m", "autoresearch", *args, "--workspace", str(ws)],
        cwd=ws,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def kill9(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()  # type: ignore[union-attr]


def wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def write_patches(tmp_path: Path, *replies: str) -> Path:
    patches = tmp_path / "patches"
    patches.mkdir()
    for i, text in enumerate(replies, start=1):
        (patches / f"{i:02d}.txt").write_text(text)
    return patches


def run_dir(ws: Path) -> Path:
    return ws / "runs" / TAG


def records(ws: Path) -> list[dict]:
    path = run_dir(ws) / "experiments.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def state(ws: Path) -> dict:
    try:
        return json.loads((run_dir(ws) / "state.json").read_text()) or {}
    except (OSError, json.JSONDecodeError):
        return {}


def attempt(ws: Path, n: int) -> str | None:
    proc = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", f"refs/autoresearch/{TAG}/attempts/{n:04d}"],
        cwd=ws,
        capture_output=True,
        text=True,
    )
    return proc.stdout.strip() or None


def assert_sound(ws: Path, n: int) -> list[dict]:
    """Nothing lost: experiments 1..n recorded once each, results.tsv follows them, every
    candidate commit has its attempt ref, the branch is checked out at the best commit, the
    tree is clean and nothing is left in flight."""
    recs = records(ws)
    assert [r["id"] for r in recs] == list(range(1, n + 1))
    assert [row[0] for row in results_rows(ws, TAG)] == [(r["commit"] or "-")[:7] for r in recs]
    for r in recs[1:]:
        assert attempt(ws, r["id"]) == r["commit"]  # None for an edit never committed
    keeps = [r for r in recs if r["status"] == "keep"]
    base = json.loads((run_dir(ws) / "session.json").read_text())["base"]
    assert git(ws, "rev-parse", "--abbrev-ref", "HEAD") == BRANCH
    assert git(ws, "rev-parse", "HEAD") == (keeps[-1]["commit"] if keeps else base)
    assert git(ws, "status", "--porcelain") == ""
    assert state(ws) == {}
    return recs


def assert_nothing_written(ws: Path, head: str) -> None:
    assert git(ws, "branch", "--list", "autoresearch/*") == ""
    assert git(ws, "for-each-ref", "refs/autoresearch") == ""
    assert not (ws / "runs").exists()
    assert git(ws, "rev-parse", "HEAD") == head
    assert git(ws, "status", "--porcelain") == ""


# ------------------------------------------------------------------------------ LLM endpoint


# 429 and timeout: the client's handling is test_agent's (retried, AgentError); the session's
# handling of a failed proposal is the same for each kind, and 500 and not-json show it here.
@pytest.mark.parametrize(
    "kind",
    [
        pytest.param("429", marks=pytest.mark.slow),
        "500",
        pytest.param("timeout", marks=pytest.mark.slow),
        "not-json",
    ],
)
def test_endpoint_outage_is_waited_out(ws: Path, env: dict, kind: str) -> None:
    """A whole proposal fails (the client's retries included): the session notes the outage,
    waits, asks again and records the experiment as if nothing happened."""
    with FakeLLM() as server:
        fail, requests = {
            "429": (lambda: server.enqueue_error(429), 1 + CLIENT_RETRIES),
            "500": (lambda: server.enqueue_error(500), 1 + CLIENT_RETRIES),
            "timeout": (lambda: server.enqueue_delay(60, GOOD), 1 + CLIENT_RETRIES),
            "not-json": (lambda: server.enqueue_raw(200, b"<html>a login page</html>"), 1),
        }[kind]
        for _ in range(requests):
            fail()
        server.enqueue(GOOD)
        proc = tuned_cli(
            ws, *llm_args(server.base_url, 2, "--no-overlap", "--agent-timeout", "1"), env=env
        )
        assert proc.returncode == 0, proc.stderr + proc.stdout
        assert len(server.requests) == requests + 1 and server.pending() == 0
    words = {"429": "HTTP 429", "500": "HTTP 500", "timeout": "did not answer within 1.0s"}
    assert "agent error (" in proc.stdout and words.get(kind, "not JSON") in proc.stdout
    recs = assert_sound(ws, 2)
    assert [r["status"] for r in recs] == ["keep", "keep"]
    assert recs[1]["description"] == "Raise LR to 0.06" and recs[1]["agent"]["attempts"] == 1


def test_dead_endpoint_ends_the_session_cleanly(ws: Path, env: dict) -> None:
    """The endpoint dies after the session started (it passed the check before the baseline,
    then drops every chat connection): after AGENT_OUTAGE_RETRIES outages the session ends
    with the reason, exit 1, the baseline recorded and the branch at the base."""
    with FakeLLM() as server:
        server.drop_chat = True
        proc = tuned_cli(ws, *llm_args(server.base_url, 5), env=env)
    assert proc.returncode == 1, proc.stderr + proc.stdout
    assert proc.stderr.startswith("error: agent unavailable:")
    assert proc.stdout.count("retrying in") == loop.AGENT_OUTAGE_RETRIES - 1
    assert "agent unavailable: Could not connect" in proc.stdout
    session = json.loads((run_dir(ws) / "session.json").read_text())
    assert session["end_reason"].startswith("agent unavailable: Could not connect")
    assert [r["status"] for r in assert_sound(ws, 1)] == ["keep"]
    assert "sk-test-secret" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("fault", ["refused", "model", "key"])
def test_wrong_endpoint_model_or_key_stops_before_anything_runs(
    ws: Path, env: dict, fault: str
) -> None:
    """Checked with one cheap request before the baseline: exit 2, one line with the
    endpoint's words and the fix, nothing written or trained."""
    head = git(ws, "rev-parse", "HEAD")
    with FakeLLM(strict_model=True, api_key="sk-test-secret") as server:
        url = server.base_url
        if fault == "refused":
            url = f"http://127.0.0.1:{closed_port()}/v1"
        if fault == "key":
            env = {**env, "OPENAI_API_KEY": "sk-wrong-key"}
        args = llm_args(url, 3)
        if fault == "model":
            args[args.index("fake-model")] = "no-such-model"
        proc = tuned_cli(ws, *args, env=env)
        assert server.pending() == 0 and len(server.requests) <= 1  # at most the probe
    assert proc.returncode == 2, proc.stderr + proc.stdout
    said = {
        "refused": ["Cannot reach", "check --base-url"],
        "model": ["does not serve model 'no-such-model'", "does not exist", "--model"],
        "key": ["rejected the API key (HTTP 401", "OPENAI_API_KEY"],
    }[fault]
    error = " ".join(proc.stderr.split())  # one message, wrapped to the terminal's width
    assert error.startswith("error: ") and error.count("error:") == 1, error
    assert all(words in error for words in said) and "Traceback" not in error, error
    assert "sk-wrong-key" not in proc.stdout + proc.stderr
    assert_nothing_written(ws, head)


def test_unusable_replies_are_recorded_invalid_and_the_session_goes_on(ws: Path, env: dict) -> None:
    """A refusal, an empty reply and an edit that matches nothing: three attempts, then the
    experiment is recorded `invalid` (never committed) with every reply, and the next one runs."""
    malformed = reply("Wider", ("WIDTH = 32  # nowhere in train.py", "WIDTH = 128"))
    with FakeLLM() as server:
        server.enqueue_refusal()
        server.enqueue_empty()
        server.enqueue(malformed)
        server.enqueue(GOOD)
        proc = tuned_cli(ws, *llm_args(server.base_url, 3, "--no-overlap"), env=env)
        assert proc.returncode == 0, proc.stderr + proc.stdout
        corrections = [r["messages"][-1]["content"] for r in server.requests[1:3]]
    assert "You declined" in corrections[0] and "empty" in corrections[1].lower()
    recs = assert_sound(ws, 3)
    assert [r["status"] for r in recs] == ["keep", "invalid", "keep"]
    invalid = recs[1]
    assert invalid["commit"] is None and invalid["agent"]["attempts"] == 3
    assert "does not match" in invalid["extra"]["reason"]
    assert "WIDTH = 32  # nowhere in train.py" in (run_dir(ws) / "0002" / "reply.txt").read_text()
    assert git(ws, "rev-list", "--count", f"{recs[0]['commit']}..HEAD") == "1"  # exp 3 only


def test_context_length_error_trims_the_prompt_in_a_session(ws: Path, env: dict) -> None:
    with FakeLLM() as server:
        server.enqueue(GOOD)
        server.enqueue_context_length_error()
        server.enqueue(WIDER)
        proc = tuned_cli(ws, *llm_args(server.base_url, 3, "--no-overlap"), env=env)
        assert proc.returncode == 0, proc.stderr + proc.stdout
        too_long, trimmed = (r["messages"][1]["content"] for r in server.requests[1:])
    assert "Raise LR to 0.06" in too_long and "Raise LR to 0.06" not in trimmed  # the history
    assert len(trimmed) < len(too_long)
    recs = assert_sound(ws, 3)
    assert [r["status"] for r in recs] == ["keep", "keep", "keep"]
    assert recs[2]["description"] == "Double WIDTH to 128" and recs[2]["agent"]["attempts"] == 1


def test_syntax_error_edit_is_never_trained(ws: Path, env: dict) -> None:
    """An edit that does not compile is sent back with the line, not committed or trained."""
    broken = reply("Raise LR", (LR.format(0.04), "LR = (0.06  # learning rate"))
    with FakeLLM() as server:
        server.enqueue(broken)
        server.enqueue(GOOD)
        proc = tuned_cli(ws, *llm_args(server.base_url, 2, "--no-overlap"), env=env)
        assert proc.returncode == 0, proc.stderr + proc.stdout
        correction = server.requests[1]["messages"][-1]["content"]
    assert "SyntaxError" in correction or "does not compile" in correction
    recs = assert_sound(ws, 2)
    assert [r["status"] for r in recs] == ["keep", "keep"] and recs[1]["agent"]["attempts"] == 2
    assert git(ws, "rev-list", "--count", f"{recs[0]['commit']}..HEAD") == "1"
    assert (
        not list(run_dir(ws).glob("*/run-*.log")) and len(list(run_dir(ws).glob("*/run.log"))) == 2
    )


# ------------------------------------------------------------------------------ training

TRAINING_FAULTS = {
    # name: (lines that replace the CRASH check in main(), extra flags, crash_class)
    "import": ("    import flash_attn_interface_not_installed  # noqa: F401", [], "import"),
    "oom": (
        f'    print("{STEP_LINE}", flush=True)\n'
        '    raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")',
        [],
        "oom",
    ),
    "nan": (
        f'    print("{STEP_LINE.replace("5.000000", "nan")}", flush=True)\n'
        '    print("FAIL: training loss nan at step 0 is nan or above 100.0", flush=True)\n'
        "    sys.exit(3)",
        [],
        "nan",
    ),
    "stall": (
        f'    print("{STEP_LINE}", flush=True)\n    time.sleep(600)',
        ["--stall-timeout", "2"],
        "stall",
    ),
    "timeout": (
        f'    while True:\n        print("{STEP_LINE}", flush=True)\n        time.sleep(0.05)',
        ["--timeout", "3"],
        "timeout",
    ),
}


# Each class is told apart from a real failing child in test_runner (test_crashes_are_data and
# the stall and timeout tests); the session records every class the same way, which oom (a
# crash with an exit code) and stall (a run the harness kills) show here.
@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(f, marks=pytest.mark.slow) if f in ("import", "nan", "timeout") else f
        for f in TRAINING_FAULTS
    ],
)
def test_training_fault_is_recorded_as_crash(
    ws: Path, env: dict, tmp_path: Path, fault: str
) -> None:
    """The candidate's train.py fails one way: recorded `crash` with its class and log tail,
    the branch reset to the best, the candidate kept at its attempt ref."""
    lines, flags, crash_class = TRAINING_FAULTS[fault]
    patches = write_patches(tmp_path, reply(f"inject {fault}", (CRASH_LINES, lines)))
    proc = cli(ws, *replay_args(patches, 2, "--fix-attempts", "0", *flags), env=env)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    recs = assert_sound(ws, 2)
    crash = recs[1]
    assert (crash["status"], crash["crash_class"]) == ("crash", crash_class)
    assert crash["val_bpb"] is None and crash["extra"]["log_tail"]
    assert lines.splitlines()[0] in git(ws, "show", f"{attempt(ws, 2)}:train.py")
    assert results_rows(ws, TAG)[1][1:4] == ["0.000000", "0.0", "crash"]
    if fault in ("stall", "timeout"):
        assert crash["exit_code"] in (-signal.SIGTERM, -signal.SIGKILL)


def test_a_run_past_its_budget_is_a_crash(ws: Path, env: dict, tmp_path: Path) -> None:
    """A candidate that computes 3 CPU s after its first step line, against TIME_BUDGET 1 s and
    --budget-grace 0.5 on the cpu clock (unsealed: train.py's own val_bpb would count):
    recorded `crash`, class `over_budget`, the reason in its log tail; the branch back at the
    baseline."""
    slow = (
        f'    print("{STEP_LINE}", flush=True)\n'
        "    end = time.process_time() + 3\n"
        "    while time.process_time() < end:\n"
        "        pass"
    )
    patches = write_patches(tmp_path, reply("train for longer", (CRASH_LINES, slow)))
    env = {**env, "AUTORESEARCH_TIME_BUDGET": "1"}
    args = replay_args(patches, 2, "--fix-attempts", "0", "--budget-grace", "0.5")
    proc = cli(ws, *args, env=env)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    recs = assert_sound(ws, 2)
    assert [r["status"] for r in recs] == ["keep", "crash"]
    over = recs[1]
    assert over["crash_class"] == "over_budget" and over["val_bpb"] is None
    assert "over budget: " in over["extra"]["log_tail"]
    assert "(TIME_BUDGET 1 s + 0.5 s" in over["extra"]["log_tail"]
    assert git(ws, "rev-parse", "HEAD") == recs[0]["commit"]
    row = results_rows(ws, TAG)[1]
    assert (row[1], row[3]) == ("0.000000", "crash")


def test_a_crashed_baseline_fails_the_session_and_a_committed_fix_resumes_it(
    tmp_path: Path, env: dict
) -> None:
    """A train.py the person committed that does not parse: the baseline is recorded as a
    `syntax` crash and the session stops with exit status 3, the branch at the base, saying
    where the log is and how to go on. With the fix committed on the branch, `--resume`
    trains the baseline again at the fix and goes on from there."""
    ws = make_workspace(tmp_path / "ws", STUB_TRAIN + "\ndef broken(:\n    pass\n")
    proc = cli(ws, *run_args(2, "--agent", "tuner"), env=env)
    assert proc.returncode == 3, proc.stderr + proc.stdout
    assert "baseline crashed" in proc.stdout
    recs = assert_sound(ws, 1)
    assert (recs[0]["status"], recs[0]["crash_class"]) == ("crash", "syntax")
    assert "SyntaxError" in recs[0]["extra"]["log_tail"]
    said = " ".join(proc.stderr.split())  # the message wraps at the terminal's width
    assert "crashed (syntax)" in said
    log = Path(said.split("its log: ")[1].split(". ")[0].split(";")[0])
    assert log.is_file() and "SyntaxError" in log.read_text()
    assert f"--resume --tag {TAG}" in said

    (ws / "train.py").write_text(STUB_TRAIN, encoding="utf-8")
    git(ws, "commit", "-q", "-am", "fix the syntax error")
    fix = git(ws, "rev-parse", "HEAD")
    proc = cli(ws, *run_args(3, "--agent", "tuner", "--resume"), env=env)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    recs = records(ws)
    assert [r["id"] for r in recs] == [1, 2, 3]
    assert (recs[1]["commit"], recs[1]["status"], recs[1]["parent"]) == (
        fix,
        "keep",
        recs[0]["commit"],
    )  # the new baseline: the fix, measured
    assert recs[2]["parent"] == fix  # the next candidate is built on it
    assert git(ws, "status", "--porcelain") == "" and state(ws) == {}


@pytest.mark.skipif(not LINUX, reason="descendants are found through /proc")
def test_grandchildren_of_a_run_are_killed(ws: Path, env: dict, tmp_path: Path) -> None:
    """train.py starts two processes (one in a new session) and exits: the run is judged and
    both are killed before the next step. Unsandboxed: in the box its pid namespace ends
    them, and it could not write their pids here (tests/test_box.py)."""
    pids = tmp_path / "pids"
    spawn = (
        "    import subprocess\n"
        '    same = subprocess.Popen(["sleep", "600"])\n'
        '    away = subprocess.Popen(["sleep", "600"], start_new_session=True)\n'
        f'    open("{pids}", "w").write(f"{{same.pid}} {{away.pid}}")'
    )
    patches = write_patches(tmp_path, reply("spawn helpers", (CRASH_LINES, spawn)))
    proc = cli(ws, *replay_args(patches, 2), "--unsandboxed", env=env)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    children = [int(p) for p in pids.read_text().split()]
    assert len(children) == 2 and [p for p in children if alive(p)] == []
    recs = assert_sound(ws, 2)
    assert recs[1]["status"] == "discard" and recs[1]["val_bpb"] == pytest.approx(stub_bpb())
    assert "killed 2 leftover process(es)" in (run_dir(ws) / "0002" / "run.log").read_text()


# ------------------------------------------------------------------------------ harness


def test_sigkill_while_proposing_then_resume(ws: Path, env: dict) -> None:
    """Killed while the endpoint thinks (a reply that never comes in time): nothing was
    committed for the experiment; --resume asks again under the same id."""
    with FakeLLM() as server:
        server.enqueue(GOOD)
        server.enqueue_delay(600, WIDER)  # exp 3: the session waits here
        proc = start(ws, *llm_args(server.base_url, 3, "--no-overlap"), env=env)
        try:
            wait_for(lambda: len(server.requests) == 2 and state(ws).get("phase") == "proposing")
        finally:
            kill9(proc)
        assert state(ws) == {"phase": "proposing", "id": 3}
        assert [r["id"] for r in records(ws)] == [1, 2] and attempt(ws, 3) is None
        server.enqueue(WIDER)
        done = cli(ws, *llm_args(server.base_url, 3, "--no-overlap", "--resume"), env=env)
        assert done.returncode == 0, done.stderr + done.stdout
    recs = assert_sound(ws, 3)
    assert [r["description"] for r in recs] == [
        "baseline",
        "Raise LR to 0.06",
        "Double WIDTH to 128",
    ]


def test_sigkill_while_applying_then_resume(ws: Path, env: dict, tmp_path: Path) -> None:
    """Killed after the edit was written to train.py and staged, before the commit exists
    (git's post-index-change hook, run by `git add`, holds the session there)."""
    hook = ws / ".git" / "hooks" / "post-index-change"
    entered = tmp_path / "hook-entered"
    hook.write_text(
        "#!/bin/sh\n"
        f'if grep -q committing "{run_dir(ws)}/state.json" 2>/dev/null; then\n'
        f'  touch "{entered}"; sleep 60\n'
        "fi\n"
    )
    hook.chmod(0o755)
    patches = write_patches(tmp_path, GOOD, WIDER)
    base = git(ws, "rev-parse", "HEAD")
    proc = start(ws, *replay_args(patches, 3), env=env)
    try:
        wait_for(entered.exists)
    finally:
        kill9(proc)
    hook.unlink()
    assert state(ws)["phase"] == "committing" and state(ws)["id"] == 2
    assert git(ws, "diff", "--cached", "--name-only") == "train.py"  # applied, not committed
    assert git(ws, "rev-parse", "HEAD") == base and attempt(ws, 2) is None
    done = cli(ws, *replay_args(patches, 3, "--resume"), env=env)
    assert done.returncode == 0, done.stderr + done.stdout
    recs = assert_sound(ws, 3)
    assert [r["description"] for r in recs] == [
        "baseline",
        "Raise LR to 0.06",
        "Double WIDTH to 128",
    ]


def _simulate_kill_while_recording(ws: Path, torn: bool) -> dict:
    """Rewind a finished session to the moment experiment 3's record was being written."""
    recs = records(ws)
    third = recs[2]
    lines = (run_dir(ws) / "experiments.jsonl").read_text().splitlines(keepends=True)
    (run_dir(ws) / "experiments.jsonl").write_text(
        "".join(lines[:2]) + (lines[2][: len(lines[2]) // 2] if torn else lines[2])
    )
    tsv = (run_dir(ws) / "results.tsv").read_text().splitlines(keepends=True)
    (run_dir(ws) / "results.tsv").write_text("".join(tsv[:3]))  # not yet rebuilt
    (run_dir(ws) / "state.json").write_text(
        json.dumps(
            {
                "phase": "training",
                "id": 3,
                "commit": third["commit"],
                "description": third["description"],
                "parent": third["parent"],
                "fix_of": None,
                "agent": third["agent"],
            }
        )
    )
    git(ws, "reset", "-q", "--hard", third["commit"])  # the reset to the best comes after
    return third


@pytest.mark.parametrize("moment", ["torn-jsonl-line", "before-tsv-and-reset"])
def test_sigkill_while_recording_then_resume(
    ws: Path, env: dict, tmp_path: Path, moment: str
) -> None:
    """Simulated: no mechanism can hold the process inside Ledger.append, so the files are put
    in the state a kill there leaves (the real kill -9 of an appending process is
    test_ledger.py::test_real_kill_9_while_appending): experiment 3 trained and measured, its
    jsonl line torn (or whole), results.tsv stale, the branch still at the candidate."""
    patches = write_patches(tmp_path, GOOD, WORSE)
    proc = cli(ws, *replay_args(patches, 3), env=env)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    before = assert_sound(ws, 3)
    assert before[2]["status"] == "discard"
    third = _simulate_kill_while_recording(ws, torn=moment == "torn-jsonl-line")
    done = cli(ws, *replay_args(patches, 3, "--resume"), env=env)
    assert done.returncode == 0, done.stderr + done.stdout
    recs = assert_sound(ws, 3)
    assert {k: recs[2][k] for k in ("status", "commit", "val_bpb")} == {
        k: third[k] for k in ("status", "commit", "val_bpb")
    }
    assert (run_dir(ws) / "experiments.jsonl.torn").exists() == (moment == "torn-jsonl-line")
    assert not (run_dir(ws) / "0003" / "run-2.log").exists()  # measured once, never re-run


def _enospc(*args: object, **kwargs: object) -> int:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_recording_then_resume(
    ws: Path, env: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills up while experiment 3 is appended to the record (os.write fails with
    ENOSPC, in-process): the session stops with a message, the record holds experiments 1-2
    whole, and a --resume after space is back records experiment 3 from its measurement."""
    patches = write_patches(tmp_path, GOOD, WORSE)
    monkeypatch.setenv("AUTORESEARCH_CACHE", env["AUTORESEARCH_CACHE"])
    real_append = Ledger.append

    def append(self: Ledger, exp) -> None:
        if exp.id != 3:
            return real_append(self, exp)
        with monkeypatch.context() as m:
            m.setattr(os, "write", _enospc)
            return real_append(self, exp)

    monkeypatch.setattr(Ledger, "append", append)
    opts = SessionOptions(
        tag=TAG, preset="cpu", device="cpu", time_budget=1.0, max_experiments=3, fix_attempts=0,
        calibrate=1, max_repeats=3, sealed=False,  # the stub prints val_bpb, saves no checkpoint
    )  # fmt: skip
    with pytest.raises(LedgerError) as full:
        Session(ws, opts, ReplayAgent(patches), Display(quiet=True)).run()
    monkeypatch.undo()
    assert "disk full" in str(full.value) and f"--resume --tag {TAG}" in str(full.value)
    assert [r["id"] for r in records(ws)] == [1, 2] and len(results_rows(ws, TAG)) == 2
    in_flight = state(ws)
    assert in_flight["phase"] == "training" and in_flight["id"] == 3
    assert attempt(ws, 3) == in_flight["commit"] == git(ws, "rev-parse", "HEAD")
    assert git(ws, "status", "--porcelain") == ""

    done = cli(ws, *replay_args(patches, 3, "--resume"), env=env)
    assert done.returncode == 0, done.stderr + done.stdout
    recs = assert_sound(ws, 3)
    assert recs[2]["status"] == "discard" and recs[2]["commit"] == in_flight["commit"]


def test_detached_head_is_refused_and_nothing_written(ws: Path, env: dict) -> None:
    git(ws, "checkout", "-q", "--detach")
    head = git(ws, "rev-parse", "HEAD")
    proc = cli(ws, *run_args(2, "--agent", "tuner"), env=env)
    assert proc.returncode == 1 and "HEAD is detached" in proc.stderr
    assert "git checkout" in proc.stderr  # says what to do next
    assert_nothing_written(ws, head)
    assert git(ws, "rev-parse", "--abbrev-ref", "HEAD") == "HEAD"  # still detached


@pytest.mark.parametrize("how", ["commit-on-the-branch", "branch-f-elsewhere"])
def test_branch_moved_by_hand_refuses_resume(ws: Path, env: dict, tmp_path: Path, how: str) -> None:
    """The session's branch points at a commit the session did not make: --resume refuses,
    changes nothing, and following its advice lets the session continue."""
    patches = write_patches(tmp_path, GOOD, WIDER)
    proc = cli(ws, *replay_args(patches, 2), env=env)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    best = assert_sound(ws, 2)[1]["commit"]
    if how == "branch-f-elsewhere":
        git(ws, "checkout", "-q", "main")
    (ws / "program.md").write_text("# my own brief\n")
    git(ws, "-c", "user.name=p", "-c", "user.email=p@p", "commit", "-qam", "by hand")
    if how == "branch-f-elsewhere":
        git(ws, "branch", "-f", BRANCH, "main")
    moved, head = git(ws, "rev-parse", BRANCH), git(ws, "rev-parse", "HEAD")
    jsonl = (run_dir(ws) / "experiments.jsonl").read_bytes()
    tsv = (run_dir(ws) / "results.tsv").read_bytes()

    refused = cli(ws, *replay_args(patches, 3, "--resume"), env=env)
    assert refused.returncode == 1, refused.stderr + refused.stdout
    message = " ".join(refused.stderr.split())
    assert "a commit this session did not make" in message and moved[:12] in message
    assert git(ws, "rev-parse", BRANCH) == moved and git(ws, "rev-parse", "HEAD") == head
    assert (run_dir(ws) / "experiments.jsonl").read_bytes() == jsonl
    assert (run_dir(ws) / "results.tsv").read_bytes() == tsv
    assert git(ws, "status", "--porcelain") == ""

    advice = message.split("`")[1]  # the first command the message quotes
    assert best[:12] in advice
    subprocess.run(advice, shell=True, cwd=ws, check=True, capture_output=True)
    assert git(ws, "rev-parse", f"{TAG}-by-hand") == moved  # the person's commit is kept
    done = cli(ws, *replay_args(patches, 3, "--resume"), env=env)
    assert done.returncode == 0, done.stderr + done.stdout
    assert_sound(ws, 3)


# ------------------------------------------------------------------------------ bad input


NONSENSE = {
    # test id: (flags, environment, the name the message must give)
    "max-hours=-1": (["--max-hours", "-1"], {}, "--max-hours"),
    "max-cost=abc": (["--max-cost", "abc"], {}, "--max-cost"),
    "calibrate=0": (["--calibrate", "0"], {}, "--calibrate"),
    "max-repeats=0": (["--max-repeats", "0"], {}, "--max-repeats"),
    "stall-timeout=0": (["--stall-timeout", "0"], {}, "--stall-timeout"),
    "fix-attempts=11": (["--fix-attempts", "11"], {}, "--fix-attempts"),
    "min-delta=-0.5": (["--min-delta", "-0.5"], {}, "--min-delta"),
    "agent-timeout=0": (["--agent-timeout", "0"], {}, "--agent-timeout"),
    "budget-grace=-1": (["--budget-grace", "-1"], {}, "--budget-grace"),
    "startup-limit=0": (["--startup-limit", "0"], {}, "--startup-limit"),
    "env-startup-limit=0": ([], {"AUTORESEARCH_STARTUP_LIMIT": "0"}, "AUTORESEARCH_STARTUP_LIMIT"),
    "env-max-cost=abc": ([], {"AUTORESEARCH_MAX_COST": "abc"}, "AUTORESEARCH_MAX_COST"),
    "env-max-hours=nan": ([], {"AUTORESEARCH_MAX_HOURS": "nan"}, "AUTORESEARCH_MAX_HOURS"),
}


@pytest.mark.parametrize("case", list(NONSENSE))
def test_nonsense_numbers_are_refused(ws: Path, env: dict, case: str) -> None:
    args, extra_env, words = NONSENSE[case]
    head = git(ws, "rev-parse", "HEAD")
    proc = cli(ws, *loopkit.run_args(TAG, "--agent", "tuner", *args), env={**env, **extra_env})
    assert proc.returncode == 2, proc.stderr + proc.stdout
    assert words in proc.stderr and "Traceback" not in proc.stderr
    assert_nothing_written(ws, head)


# ------------------------------------------------------------------------------ exploits
# The evaluator-level exploits are in test_sealed.py; these two are refused before training.


def test_seed_only_and_duplicate_edits_are_refused(tmp_path: Path, env: dict) -> None:
    """Fishing for a lucky number: a candidate that only changes the seed, and one whose
    train.py is identical to an earlier experiment's, are recorded `invalid`, never trained."""
    seeded = STUB_TRAIN.replace(
        "SLEEP = 0.0  # seconds per step", "SLEEP = 0.0  # seconds per step\nSEED = 42  # init"
    )
    ws = make_workspace(tmp_path / "ws", seeded)
    patches = write_patches(
        tmp_path,
        reply("a luckier seed", ("SEED = 42  # init", "SEED = 7  # init")),
        GOOD,
        reply("back to LR 0.04", (LR.format(0.06), LR.format(0.04))),
    )
    proc = cli(ws, *replay_args(patches, 4), env=env)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    recs = assert_sound(ws, 4)
    assert [r["status"] for r in recs] == ["keep", "invalid", "keep", "invalid"]
    assert "only the random seed changed (SEED)" in recs[1]["extra"]["reason"]
    assert "identical to experiment 0001" in recs[3]["extra"]["reason"]
    assert not (run_dir(ws) / "0002" / "run.log").exists()
    assert not (run_dir(ws) / "0004" / "run.log").exists()


# ------------------------------------------------------------------------------ sealed runs
# test_sealed.py's tiny torch trainer on the real prepared stdlib data; sealed evaluation on.


@pytest.fixture
def sealed_ws(tmp_path: Path) -> Path:
    from test_sealed import STUB

    return make_workspace(tmp_path / "ws", STUB)


@pytest.fixture
def sealed_env(env: dict, stdlib_prepared: Path) -> dict[str, str]:
    sealed = {k: v for k, v in env.items() if k != "AUTORESEARCH_SEALED"}  # the default: on
    # Far from the start-up limit: a busy machine's slow `import torch` is not what these test.
    return {
        **sealed,
        "AUTORESEARCH_CACHE": str(stdlib_prepared),
        "AUTORESEARCH_STARTUP_LIMIT": "600",
    }


@pytest.mark.slow  # whole sessions with real children: minutes on two cores
def test_fake_summary_is_not_the_measurement(
    sealed_ws: Path, sealed_env: dict, tmp_path: Path
) -> None:
    """train.py trains as before but prints `val_bpb: 0.1`: the sealed evaluator's number is
    recorded, the printed one kept aside as reported_val_bpb, and the candidate discarded."""
    from test_sealed import FAKE_NUMBER

    fake = reply("print a great number", tuple(s.rstrip("\n") for s in FAKE_NUMBER))
    patches = write_patches(tmp_path, fake)
    proc = cli(sealed_ws, *replay_args(patches, 2, "--max-repeats", "1"), env=sealed_env)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    baseline, faked = assert_sound(sealed_ws, 2)
    assert faked["status"] == "discard"
    assert faked["val_bpb"] == pytest.approx(baseline["val_bpb"], abs=1e-3)
    assert faked["metrics"]["reported_val_bpb"] == 0.1
    assert "the sealed evaluator measured" in faked["extra"]["reported_disagrees"]
    assert results_rows(sealed_ws, TAG)[1][1] != "0.100000"


@pytest.mark.slow  # whole sessions with real children: minutes on two cores
@pytest.mark.skipif(not LINUX, reason="the held evaluator is found by its pid")
def test_sigkill_while_evaluating_then_resume(
    sealed_ws: Path, sealed_env: dict, tmp_path: Path
) -> None:
    """Killed while the sealed evaluator measures the candidate (its load_model waits while a
    file exists): --resume trains and evaluates the candidate again and records it once.
    Unsandboxed, so that the model process can see the file outside its box."""
    hold = tmp_path / "hold"
    hold.mkdir()
    (hold / "hold").touch()
    waiting = (
        'def load_model(path, device="cpu"):\n'
        "    import pathlib\n"
        "    import time\n\n"
        f'    pathlib.Path("{hold}/evaluating").write_text(str(os.getpid()))\n'
        f'    while pathlib.Path("{hold}/hold").exists():\n'
        "        time.sleep(0.05)"
    )
    patches = write_patches(
        tmp_path, reply("a slow load_model", ('def load_model(path, device="cpu"):', waiting))
    )
    args = replay_args(patches, 2, "--max-repeats", "1", "--unsandboxed")
    proc = start(sealed_ws, *args, env=sealed_env)
    try:
        wait_for(lambda: (hold / "evaluating").exists(), timeout=300)
    finally:
        kill9(proc)
    in_flight = state(sealed_ws)
    assert in_flight["phase"] == "training" and in_flight["id"] == 2
    assert git(sealed_ws, "rev-parse", "HEAD") == in_flight["commit"] == attempt(sealed_ws, 2)
    assert [r["id"] for r in records(sealed_ws)] == [1]
    # The evaluator runs in a process group of its own, so it outlives the session it
    # belonged to (see docs/reliability.md); end it before resuming.
    evaluator_pid = int((hold / "evaluating").read_text())
    if alive(evaluator_pid):
        os.kill(evaluator_pid, signal.SIGKILL)
    (hold / "hold").unlink()

    done = cli(sealed_ws, *args, "--resume", env=sealed_env, timeout=300)
    assert done.returncode == 0, done.stderr + done.stdout
    assert "re-running experiment 0002" in done.stdout
    baseline, candidate = assert_sound(sealed_ws, 2)
    assert candidate["status"] == "discard"
    assert candidate["val_bpb"] == pytest.approx(baseline["val_bpb"], abs=1e-3)
    assert sorted(p.name for p in (run_dir(sealed_ws) / "checkpoints").iterdir()) == ["0001.pt"]
    assert not list(run_dir(sealed_ws).glob("*/checkpoint.pt"))


@pytest.mark.slow  # whole sessions with real children: minutes on two cores
@pytest.mark.parametrize("sealed", ["1", "0"])
def test_missing_tokenizer_is_refused_and_nothing_written(
    ws: Path, env: dict, tmp_path: Path, stdlib_prepared: Path, sealed: str
) -> None:
    """A prepared dataset whose tokenizer file is gone: exit 2 before anything is written,
    sealed or not, with what to run."""
    import shutil

    cache = tmp_path / "damaged-cache"
    shutil.copytree(stdlib_prepared, cache, ignore=shutil.ignore_patterns("downloads"))
    dataset = cache / (cache / "ACTIVE").read_text().strip()
    tokenizer = json.loads((dataset / "manifest.json").read_text())["tokenizer"]["file"]
    (dataset / tokenizer).unlink()
    head = git(ws, "rev-parse", "HEAD")
    proc = cli(
        ws,
        *run_args(2, "--agent", "tuner"),
        env={**env, "AUTORESEARCH_CACHE": str(cache), "AUTORESEARCH_SEALED": sealed},
    )
    assert proc.returncode == 2, proc.stderr + proc.stdout
    message = " ".join(proc.stderr.split())
    assert tokenizer in message and "autoresearch prepare --force" in message
    assert_nothing_written(ws, head)
    if sealed == "1":  # the advice works (with the dataset's source, as the message says)
        fix = cli(
            ws,
            "prepare",
            "--source",
            "stdlib",
            "--force",
            env={**env, "AUTORESEARCH_CACHE": str(cache)},
        )
        assert fix.returncode == 0, fix.stderr + fix.stdout
        assert (dataset / tokenizer).is_file()
