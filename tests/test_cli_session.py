"""A newcomer's first sessions through the real CLI in subprocesses (real git, the stub
trainer, the replay agent or a fake endpoint over HTTP): why each session ended, Ctrl-C twice
then --resume, an endpoint that dies in the night, what `status` and `show` say, and the
files the user reads with other tools."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakellm import FakeLLM
from loopkit import (
    git,
    make_workspace,
    openai_args,
    replay_args,
    reply,
    run_args,
    stub_cli_env,
)

TAG = "t1"
LR = ("LR = 0.04  # learning rate", "LR = 0.06  # learning rate")
WIDTH = ("WIDTH = 64  # model width", "WIDTH = 128  # model width")
# The replay agent proposes these in order.
# The first's description is markup to rich, and must be shown as written.
PATCHES = {"01.txt": reply("LR [bold]0.06[/bold]", LR), "02.txt": reply("WIDTH to 128", WIDTH)}


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    return make_workspace(tmp_path / "ws")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return stub_cli_env(tmp_path)


@pytest.fixture
def patches(tmp_path: Path) -> Path:
    folder = tmp_path / "patches"
    folder.mkdir()
    for name, text in PATCHES.items():
        (folder / name).write_text(text)
    return folder


def autoresearch(
    cwd: Path, *args: str, env: dict[str, str], umask: int = 0o022
) -> subprocess.CompletedProcess:
    """The CLI as typed in `cwd` (no --workspace: it finds the workspace itself)."""
    return subprocess.run(
        [sys.executable, "-m", "autoresearch", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        preexec_fn=lambda: os.umask(umask),
    )


def run_dir(ws: Path) -> Path:
    return ws / "runs" / TAG


def session_json(ws: Path) -> dict:
    return json.loads((run_dir(ws) / "session.json").read_text())


def records(ws: Path) -> list[dict]:
    lines = (run_dir(ws) / "experiments.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def state(ws: Path) -> dict:
    try:
        return json.loads((run_dir(ws) / "state.json").read_text()) or {}
    except (OSError, json.JSONDecodeError):
        return {}


def wait_for(predicate, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_untracked_files_are_named_and_nothing_is_written(
    ws: Path, env: dict, patches: Path
) -> None:
    (ws / "notes.txt").write_text("my notes\n")
    (ws / "scratch").mkdir()
    (ws / "scratch" / "idea.py").write_text("x = 1\n")
    done = autoresearch(ws, *run_args(TAG, *replay_args(patches), n=1), env=env)
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert "uncommitted changes (notes.txt, scratch/idea.py)" in line
    assert not run_dir(ws).exists()


def test_a_first_session_from_a_subdirectory_and_what_it_says(
    ws: Path, env: dict, patches: Path
) -> None:
    """Two experiments run from a subdirectory of the workspace; the record's files get the
    umask's permissions; `status` and `show` say which device was busy, which run each
    number comes from, and why the session ended."""
    sub = ws / "notes"
    sub.mkdir()
    (sub / "plan.md").write_text("try LR\n")
    git(ws, "add", "notes")
    git(ws, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "notes")

    done = autoresearch(sub, *run_args(TAG, *replay_args(patches), n=2), env=env)
    assert done.returncode == 0, done.stderr + done.stdout
    assert "session ended: reached --max-experiments 2. 2 experiments (2 keep)" in done.stdout
    assert "experiments." not in done.stdout.replace("experiments.jsonl", "")  # no doubled dot

    for name in ("results.tsv", "session.json", "experiments.jsonl"):
        mode = stat.S_IMODE((run_dir(ws) / name).stat().st_mode)
        assert mode == 0o644, f"{name}: {oct(mode)}"

    status = autoresearch(sub, "status", env={**env, "COLUMNS": "200"})
    assert status.returncode == 0, status.stderr
    assert "2 experiments: 2 keep" in status.stdout
    assert "LR [bold]0.06[/bold]" in status.stdout
    assert "CPU busy training" in status.stdout and "GPU" not in status.stdout
    assert "ended: reached --max-experiments 2" in status.stdout
    as_json = json.loads(autoresearch(sub, "status", "--json", env=env).stdout)
    assert as_json["state"] == "ended"
    assert as_json["busy"]["device"] == "CPU" and as_json["gpu_busy_percent"] is None
    assert as_json["busy"]["percent"] is not None and 0 < as_json["busy"]["percent"] <= 100

    # The baseline: calibrated with two runs; every number says which run it comes from.
    show = autoresearch(sub, "show", "1", env=env)
    assert show.returncode == 0, show.stderr
    baseline = records(ws)[0]
    first, second = (f"{v:.6f}" for v in baseline["extra"]["runs"])
    assert f"run 1  seed 1000  val_bpb {first}  (calibrate; log run.log)" in show.stdout
    assert f"run 2  seed 1001  val_bpb {second}  (calibrate; log run-2.log)" in show.stdout
    assert f"val_bpb {baseline['val_bpb']:.6f} is the mean of runs 1–2" in show.stdout
    assert "metrics: train.py's summary of the last run, run 2" in show.stdout
    assert "log tail: run-2.log" in show.stdout
    assert "why: the baseline, the first best (2 runs" in show.stdout

    show2 = autoresearch(sub, "show", "2", env=env)
    assert show2.returncode == 0, show2.stderr
    (agent_line,) = [line for line in show2.stdout.splitlines() if line.startswith("agent ")]
    assert "None" not in agent_line  # e.g. no `rebased_from None`
    assert "why: kept: gain" in show2.stdout
    # the candidate's run, and the best's run of the same seed it was paired with
    seed = records(ws)[1]["extra"]["seeds"][0]
    paired = f"run 1  seed {seed}  val_bpb {records(ws)[1]['extra']['runs'][0]:.6f}  (candidate"
    assert paired in show2.stdout
    assert f"the best, same seed: {first}" in show2.stdout
    assert "LR [bold]0.06[/bold]" in show2.stdout


def test_one_experiment_is_one_experiment(ws: Path, env: dict, patches: Path) -> None:
    done = autoresearch(ws, *run_args(TAG, *replay_args(patches), n=1), env=env)
    assert done.returncode == 0, done.stderr + done.stdout
    assert "1 experiment (1 keep)" in done.stdout
    assert "LR [bold]0.06[/bold]" not in done.stdout  # one experiment: the baseline
    assert "1 experiments" not in done.stdout
    status = autoresearch(ws, "status", env=env)
    assert "1 experiment: 1 keep" in status.stdout


def test_ctrl_c_twice_records_why_and_resume_trains_the_experiment_again(
    ws: Path, env: dict, tmp_path: Path
) -> None:
    """Ctrl-C twice kills experiment 2 mid-run: session.json says why, `status` says it
    ended, and --resume trains the same commit again as experiment 3."""
    folder = tmp_path / "patches"
    folder.mkdir()
    slower = ("SLEEP = 0.0  # seconds per step", "SLEEP = 2.0  # seconds per step")  # not the base
    (folder / "01.txt").write_text(reply("LR to 0.06, slowly", LR, slower))
    log = tmp_path / "out.log"
    command = [sys.executable, "-m", "autoresearch", *run_args(TAG, *replay_args(folder), n=3)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command, cwd=ws, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_for(lambda: state(ws).get("phase") == "training" and state(ws).get("id") == 2)
        proc.send_signal(signal.SIGINT)
        wait_for(lambda: "Ctrl-C" in log.read_text())
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130, log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    interrupted = records(ws)[1]
    assert interrupted["status"] == "interrupted"
    reason = session_json(ws)["end_reason"]
    assert reason.startswith("interrupted by Ctrl-C twice: experiment 0002 killed")
    status = autoresearch(ws, "status", env=env)
    assert f"ended: {reason}" in status.stdout

    resumed = autoresearch(ws, *run_args(TAG, *replay_args(folder), "--resume", n=3), env=env)
    assert resumed.returncode == 0, resumed.stderr + resumed.stdout
    assert "re-running experiment 0003 (experiment 0002, interrupted)" in resumed.stdout
    recs = records(ws)
    assert [r["status"] for r in recs[:2]] == ["keep", "interrupted"]
    again = recs[2]
    assert again["id"] == 3 and again["commit"] == interrupted["commit"]
    assert again["description"] == interrupted["description"]
    assert again["status"] in ("keep", "discard") and again["val_bpb"] is not None
    ref = f"refs/autoresearch/{TAG}/attempts/0003"
    assert git(ws, "rev-parse", ref) == interrupted["commit"]
    assert (run_dir(ws) / "0003" / "patch.diff").read_text() == (
        run_dir(ws) / "0002" / "patch.diff"
    ).read_text()
    assert session_json(ws)["end_reason"] == "reached --max-experiments 3"
    assert git(ws, "status", "--porcelain") == ""


TUNED = (  # the real CLI, the 30 s pause between agent outages shortened
    "import autoresearch.loop as loop; loop.AGENT_OUTAGE_WAIT_S = 0.1;"
    "from autoresearch.cli import main; main()"
)


def test_an_endpoint_that_dies_in_the_night_ends_the_session_with_exit_1(
    ws: Path, env: dict
) -> None:
    """One good reply, then the endpoint fails every request: after the outages are waited
    out the session ends, records why, and exits 1 with one line saying what to do."""
    with FakeLLM() as server:
        server.enqueue(reply("LR to 0.06", LR))  # then every request gets an HTTP 500
        args = run_args(TAG, *openai_args(server.base_url), "--no-overlap", n=5)
        done = subprocess.run(
            [sys.executable, "-c", TUNED, *args],
            cwd=ws,
            env={**env, "OPENAI_API_KEY": "sk-test-secret"},
            capture_output=True,
            text=True,
            timeout=180,
        )
    assert done.returncode == 1, done.stdout + done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: agent unavailable:")
    assert line.endswith(f"continue with `autoresearch run --resume --tag {TAG}`")
    assert ".." not in line
    assert session_json(ws)["end_reason"].startswith("agent unavailable:")
    assert [r["status"] for r in records(ws)] == ["keep", "keep"]
    assert "sk-test-secret" not in done.stdout + done.stderr
