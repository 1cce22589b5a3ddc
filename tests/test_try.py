"""`autoresearch try` driven through the real CLI in subprocesses, as a coding agent drives it:
edit train.py in the working tree, call `try`, read the verdict. Real git, the stub trainer,
real processes; the session's record is the one `run` writes, so `status`, `show`, `log` and
`run --resume` read and continue it."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from loopkit import (
    STUB_TRAIN,
    cli,
    git,
    make_workspace,
    run_args,
    stub_bpb,
    stub_cli_env,
)

from autoresearch.lock import lock_path

TAG = "t"
LR = "LR = 0.04  # learning rate"


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    return make_workspace(tmp_path / "ws")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """stub_cli_env on the cpu device, as the other commands' tests pass `--device cpu`: left
    to the hardware, every `try` imports torch to ask for a GPU (2 CPU s). The first `try` of
    test_keep_discard_crash_and_the_session_is_runs leaves it to the hardware."""
    return {**stub_cli_env(tmp_path), "AUTORESEARCH_DEVICE": "cpu"}


def edit(ws: Path, old: str, new: str) -> None:
    """What the outside agent does: edit train.py in place."""
    path = ws / "train.py"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def try_json(ws: Path, description: str, env: dict, *extra: str) -> tuple[int, dict]:
    proc = cli(ws, "try", "-m", description, "--tag", TAG, "--json", *extra, env=env)
    assert proc.stdout.strip(), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def records(ws: Path) -> list[dict]:
    path = ws / "runs" / TAG / "experiments.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def attempt(ws: Path, exp_id: int) -> str | None:
    ref = f"refs/autoresearch/{TAG}/attempts/{exp_id:04d}"
    proc = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", ref], cwd=ws, capture_output=True, text=True
    )
    return proc.stdout.strip() or None


def at_best(ws: Path) -> None:
    """The branch is the session's, at the best commit, with nothing uncommitted."""
    best = [r for r in records(ws) if r["status"] == "keep"][-1]
    assert git(ws, "rev-parse", "--abbrev-ref", "HEAD") == f"autoresearch/{TAG}"
    assert git(ws, "rev-parse", "HEAD") == best["commit"]
    assert git(ws, "status", "--porcelain") == ""


def test_keep_discard_crash_and_the_session_is_runs(ws: Path, env: dict) -> None:
    """Each verdict with its exit status; the working tree ends at the best each time; then
    `status`, `show`, `log` read the session and `run --resume` continues it."""
    base = git(ws, "rev-parse", "HEAD")
    edit(ws, LR, "LR = 0.06  # learning rate")
    auto = {k: v for k, v in env.items() if k != "AUTORESEARCH_DEVICE"}  # as a user runs it
    code, v = try_json(ws, "LR to 0.06", auto)
    assert (code, v["status"], v["id"]) == (0, "keep", 2), v
    assert v["val_bpb"] == pytest.approx(stub_bpb(lr=0.06))
    assert v["best_before"] == pytest.approx(stub_bpb())
    assert v["delta"] == pytest.approx(stub_bpb(lr=0.06) - stub_bpb())
    assert v["sigma"] == 0.0 and v["noise_bar"] == 0.0  # the stub is deterministic
    recs = records(ws)
    assert [r["status"] for r in recs] == ["keep", "keep"]
    assert recs[0]["description"] == "baseline" and recs[0]["commit"] == base
    assert [e["id"] for e in v["recorded_first"]] == [1]  # the new session's baseline
    assert len(recs[0]["extra"]["runs"]) == 2  # calibrated as `run` would on the cpu preset
    assert recs[1]["agent"]["name"] == "external" and recs[1]["parent"] == base
    assert git(ws, "log", "-1", "--format=%s") == "exp 0002: LR to 0.06"
    at_best(ws)

    edit(ws, "LR = 0.06", "LR = 0.2")
    code, v = try_json(ws, "LR to 0.2", env)
    assert (code, v["status"], v["id"]) == (10, "discard", 3), v
    assert v["delta"] > 0 and v["best"]["id"] == 2
    assert "LR = 0.06" in (ws / "train.py").read_text()  # reset to the best
    assert git(ws, "show", f"{attempt(ws, 3)}:train.py").count("LR = 0.2") == 1
    at_best(ws)

    edit(ws, "CRASH = False", "CRASH = True")
    proc = cli(ws, "try", "-m", "crash on purpose", "--tag", TAG, env=env)
    assert proc.returncode == 11, proc.stdout + proc.stderr
    assert "exp 0004 crash: crash on purpose" in proc.stdout
    assert "simulated crash in train.py" in proc.stdout  # the log tail, for the agent to read
    assert attempt(ws, 4) is not None
    at_best(ws)

    status = json.loads(cli(ws, "status", "--tag", TAG, "--json", env=env).stdout)
    assert [e["status"] for e in status["experiments"]] == ["keep", "keep", "discard", "crash"]
    assert status["best"]["id"] == 2
    shown = cli(ws, "show", "3", "--tag", TAG, env=env)
    assert shown.returncode == 0 and "LR = 0.2" in shown.stdout
    assert "LR to 0.06" in cli(ws, "log", "--tag", TAG, env=env).stdout
    report = cli(ws, "report", "--tag", TAG, env=env)
    assert report.returncode == 0 and "LR to 0.2" in (ws / "runs" / TAG / "report.html").read_text()

    # `run` continues the same session with its own agent, then `try` again after it.
    done = cli(ws, *run_args(TAG, "--agent", "tuner", "--resume", n=5), env=env)
    assert done.returncode == 0, done.stderr + done.stdout
    assert len(records(ws)) == 5 and records(ws)[4]["agent"]["name"] == "tuner"
    at_best(ws)
    edit(ws, "WIDTH = 64", "WIDTH = 128")
    code, v = try_json(ws, "WIDTH to 128", env)
    assert v["id"] == 6 and code in (0, 10) and v["status"] in ("keep", "discard")
    assert [r["id"] for r in records(ws)] == [1, 2, 3, 4, 5, 6]
    rows = (ws / "runs" / TAG / "results.tsv").read_text().splitlines()
    assert len(rows) == 7  # the header and one row per experiment
    at_best(ws)


def test_refused_edit_to_prepare_py(ws: Path, env: dict) -> None:
    """prepare.py is the trusted side: a try with it edited is refused, naming it, and
    nothing is written (no branch, no record, the edits left in place)."""
    edit(ws, LR, "LR = 0.06  # learning rate")
    (ws / "prepare.py").write_text((ws / "prepare.py").read_text() + "\nEVAL_TOKENS = 1\n")
    code, v = try_json(ws, "cheat", env)
    assert (code, v["status"], v["files"]) == (12, "refused", ["prepare.py"]), v
    assert "prepare.py changed" in v["reason"] and "git checkout -- prepare.py" in v["reason"]
    assert git(ws, "branch", "--list", "autoresearch/*") == ""
    assert not (ws / "runs").exists()
    assert sorted(git(ws, "status", "--porcelain").split()) == ["M", "M", "prepare.py", "train.py"]


def test_refused_other_dirty_file_and_unchanged_train_py(ws: Path, env: dict) -> None:
    """Any other file that differs from the best commit is named; an untouched train.py is
    refused too; neither writes anything."""
    edit(ws, LR, "LR = 0.06  # learning rate")
    (ws / "notes.md").write_text("ideas\n")
    edit_readme = ws / ".gitignore"
    edit_readme.write_text(edit_readme.read_text() + "scratch/\n")
    proc = cli(ws, "try", "-m", "LR", "--tag", TAG, env=env)
    assert proc.returncode == 12, proc.stdout + proc.stderr
    assert "only train.py may differ from the best commit, but so do: .gitignore, notes.md" in (
        proc.stdout
    )
    assert not (ws / "runs").exists()
    git(ws, "checkout", "--", ".gitignore", "train.py")
    (ws / "notes.md").unlink()
    code, v = try_json(ws, "nothing", env)
    assert (code, v["status"]) == (12, "refused") and "train.py is unchanged" in v["reason"]
    assert not (ws / "runs").exists()


def test_second_command_is_refused_while_the_lock_is_held(ws: Path, env: dict) -> None:
    """While another process holds the workspace lock (this test, standing in for a `try`
    in flight), `try` and `run` are refused with exit status 13 and touch nothing; once it
    is released, `try` proceeds."""
    edit(ws, LR, "LR = 0.06  # learning rate")
    fd = os.open(lock_path(ws), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, b"try --tag t, pid 4242")
        code, v = try_json(ws, "LR to 0.06", env)
        assert (code, v["status"]) == (13, "busy"), v
        assert "try --tag t, pid 4242" in v["reason"]
        proc = cli(ws, *run_args(TAG, "--agent", "tuner", n=1), env=env)
        assert proc.returncode == 13 and "another autoresearch command" in proc.stderr
        assert git(ws, "branch", "--list", "autoresearch/*") == ""
        assert not (ws / "runs").exists()
    finally:
        os.close(fd)
    code, v = try_json(ws, "LR to 0.06", env)
    assert (code, v["status"]) == (0, "keep"), v


# ------------------------------------------------------------------ kill -9

# The candidate's train.py blocks until the test creates the gate: the try is killed there.
# The gate and the file that says the run reached it live outside the workspace, where the box
# would hide them from the run, so every command of these tests runs unboxed.
UNBOXED = "--unsandboxed"
GATED = """def main():
    import os
    if not os.path.exists({gate!r}):
        open({entered!r}, "w").close()
        time.sleep(600)
"""


def start_try(ws: Path, description: str, env: dict) -> subprocess.Popen:
    """`try` in the background, in a process group of its own (to SIGKILL it and its run)."""
    return subprocess.Popen(
        [sys.executable, "-m", "autoresearch", "try", "-m", description, "--tag", TAG, UNBOXED],
        cwd=ws,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def wait_for(path: Path, proc: subprocess.Popen) -> None:
    """Until `path` exists; fails if the process ended first (polls, asserts no timing)."""
    while not path.exists():
        assert proc.poll() is None, "try ended before its run reached the gate"
        time.sleep(0.05)


@pytest.mark.parametrize("then", ["try", "run-resume", "try-a-new-edit"])
def test_kill_9_during_try(ws: Path, env: dict, tmp_path: Path, then: str) -> None:
    """kill -9 of a `try` (and its run) mid-training; another `try` (train.py as the kill
    left it) or `run --resume` finishes that experiment under its id: recorded once, the
    lock released, git at the best with the attempt ref in place. A `try` of a further edit
    finishes it first, then tries the edit on top of it as the next experiment."""
    gate, entered = tmp_path / "gate", tmp_path / "entered"
    lines = GATED.format(gate=str(gate), entered=str(entered))
    edit(ws, "def main():\n", lines)  # the candidate blocks; the baseline (the stub) does not
    edit(ws, LR, "LR = 0.07  # learning rate")
    proc = start_try(ws, "LR to 0.07", env)
    try:
        wait_for(entered, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    state = json.loads((ws / "runs" / TAG / "state.json").read_text())
    assert (state["phase"], state["id"]) == ("training", 2)
    assert [r["id"] for r in records(ws)] == [1]
    assert attempt(ws, 2) == git(ws, "rev-parse", "HEAD")  # the candidate, checked out
    gate.touch()
    if then == "try":
        code, v = try_json(ws, "LR to 0.07", env, UNBOXED)
        assert (code, v["status"], v["id"], v["recorded_first"]) == (0, "keep", 2, []), v
    elif then == "run-resume":
        done = cli(ws, *run_args(TAG, "--agent", "tuner", "--resume", UNBOXED, n=2), env=env)
        assert done.returncode == 0, done.stderr + done.stdout
    else:
        edit(ws, "WIDTH = 64", "WIDTH = 128")  # built on the unfinished candidate
        code, v = try_json(ws, "WIDTH to 128", env, UNBOXED)
        assert (v["id"], [e["id"] for e in v["recorded_first"]]) == (3, [2]), v
        third = records(ws)[2]
        assert third["description"] == "WIDTH to 128" and third["parent"] == attempt(ws, 2)
        source = git(ws, "show", f"{attempt(ws, 3)}:train.py")
        assert "LR = 0.07" in source and "WIDTH = 128" in source
    recs = records(ws)[:2]
    assert [(r["id"], r["status"]) for r in recs] == [(1, "keep"), (2, "keep")]
    assert recs[1]["description"] == "LR to 0.07" and recs[1]["commit"] == attempt(ws, 2)
    assert recs[1]["val_bpb"] == pytest.approx(stub_bpb(lr=0.07))
    assert not (ws / "runs" / TAG / "state.json").exists()
    at_best(ws)


def test_kill_9_during_the_baseline_of_a_new_tag(tmp_path: Path, env: dict) -> None:
    """kill -9 while a new tag's baseline trains (train.py restored to the base for it): the
    candidate was saved in runs/<tag>/, and the next `try` (train.py unchanged, as the kill
    left it) finishes the baseline and tries that candidate; nothing recorded twice."""
    gate, entered = tmp_path / "gate", tmp_path / "entered"
    gated = STUB_TRAIN.replace("def main():\n", GATED.format(gate=str(gate), entered=str(entered)))
    ws = make_workspace(tmp_path / "ws", gated)  # the baseline itself blocks
    edit(ws, LR, "LR = 0.06  # learning rate")
    proc = start_try(ws, "LR to 0.06", env)
    try:
        wait_for(entered, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert git(ws, "status", "--porcelain") == ""  # train.py is the base's, for the baseline
    saved = json.loads((ws / "runs" / TAG / "try-candidate.json").read_text())
    assert "LR = 0.06" in saved["source"] and saved["description"] == "LR to 0.06"
    gate.touch()
    code, v = try_json(ws, "LR to 0.06", env, UNBOXED)
    assert (code, v["status"], v["id"]) == (0, "keep", 2), v
    recs = records(ws)
    assert [(r["id"], r["description"]) for r in recs] == [(1, "baseline"), (2, "LR to 0.06")]
    assert len(recs[0]["extra"]["runs"]) == 2
    assert not (ws / "runs" / TAG / "try-candidate.json").exists()
    at_best(ws)


def test_stub_is_unchanged() -> None:
    """The gated edit above relies on the stub's `def main():` line and LR constant."""
    assert STUB_TRAIN.count("def main():\n") == 1 and STUB_TRAIN.count(LR) == 1


# ------------------------------------------------------------------ MCP


def test_mcp_server_over_stdio_runs_one_experiment(ws: Path, env: dict) -> None:
    """`autoresearch mcp` in a subprocess, driven by the MCP SDK's own client over stdio:
    the four tools are listed, try_experiment runs one experiment (the baseline first) and
    status, history and show read it back."""
    mcp = pytest.importorskip("mcp")
    import anyio

    edit(ws, LR, "LR = 0.06  # learning rate")
    params = mcp.StdioServerParameters(
        command=sys.executable,
        args=["-m", "autoresearch", "mcp", "--tag", TAG, "--workspace", str(ws)],
        env=env,
        cwd=str(ws),
    )

    async def session() -> dict:
        async with mcp.Client(params, read_timeout_seconds=600) as client:
            tools = {t.name for t in (await client.list_tools()).tools}
            calls = {}
            calls["try"] = await client.call_tool("try_experiment", {"description": "LR to 0.06"})
            calls["status"] = await client.call_tool("status", {})
            calls["history"] = await client.call_tool("history", {})
            calls["show"] = await client.call_tool("show", {"experiment_id": 2})
            return {"tools": tools, **{k: _payload(v) for k, v in calls.items()}}

    got = anyio.run(session)
    assert got["tools"] == {"try_experiment", "status", "show", "history"}
    v = got["try"]
    assert (v["status"], v["exit_code"], v["id"]) == ("keep", 0, 2), v
    assert v["val_bpb"] == pytest.approx(stub_bpb(lr=0.06))
    assert got["status"]["best"]["id"] == 2 and got["status"]["counts"] == {"keep": 2}
    assert [h["description"] for h in got["history"]["result"]] == ["baseline", "LR to 0.06"]
    assert "LR = 0.06" in got["show"]["diff"] and got["show"]["status"] == "keep"
    assert [r["id"] for r in records(ws)] == [1, 2]
    at_best(ws)


def _payload(result) -> dict:
    """A tool's result as data: its structured content (a list comes wrapped in `result`),
    else the JSON text it returned."""
    assert not result.is_error, result.content
    if result.structured_content is not None:
        return result.structured_content
    return json.loads(result.content[0].text)


def test_mcp_without_the_sdk_says_how_to_install_it(ws: Path, env: dict) -> None:
    """With the SDK not importable (blocked in sys.modules), `autoresearch mcp` exits 2 with
    the install command instead of a traceback."""
    script = (
        "import sys; sys.modules['mcp'] = None; sys.argv = ['autoresearch'] + sys.argv[1:]; "
        "from autoresearch.cli import main; main()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, "mcp", "--workspace", str(ws)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'autoresearch[mcp]'" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------ the brief

ROOT = Path(__file__).resolve().parents[1]


def test_init_agent_external_writes_the_coding_agent_brief(tmp_path: Path, env: dict) -> None:
    """`init --agent-external` commits program.md from the coding agent's template, which
    says to loop forever over `try`, never to touch prepare.py or git; the README quotes its
    loop word for word."""
    proc = subprocess.run(
        [sys.executable, "-m", "autoresearch", "init", str(tmp_path / "lab"), "--agent-external"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lab = tmp_path / "lab"
    template = (ROOT / "autoresearch" / "templates" / "program-external.md").read_text()
    assert (lab / "program.md").read_text() == template
    assert git(lab, "status", "--porcelain") == ""
    for line in (
        "LOOP FOREVER:",
        'autoresearch try -m "<one line: what you changed>" --json',
        "NEVER STOP.",
        "Never edit `prepare.py`.",
        "Never run git yourself",
    ):
        assert line in template, line
    loop = template[template.index("LOOP FOREVER:") : template.index("## Rules")].rstrip()
    assert loop in (ROOT / "README.md").read_text()
    assert "Read program.md and follow it." in proc.stdout


def test_a_session_that_refuses_to_start_gives_the_edit_back(
    ws: Path, env: dict, tmp_path: Path
) -> None:
    """No prepared data: the new session refuses to start after `try` restored train.py for
    the baseline; the agent's edit is put back in train.py and no trace is left."""
    edit(ws, LR, "LR = 0.06  # learning rate")
    edited = (ws / "train.py").read_text()
    proc = cli(
        ws,
        "try",
        "-m",
        "LR",
        "--tag",
        TAG,
        env={**env, "AUTORESEARCH_CACHE": str(tmp_path / "none")},
    )
    assert proc.returncode == 2 and "autoresearch prepare" in proc.stderr, proc.stderr
    assert (ws / "train.py").read_text() == edited
    assert git(ws, "status", "--porcelain") == "M train.py"
    assert git(ws, "branch", "--list", "autoresearch/*") == ""
    assert not (ws / "runs").exists() or not any((ws / "runs").iterdir())
