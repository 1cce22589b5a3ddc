"""Shared fixtures. Test modules import their helpers (loopkit, fakellm, prepare_helpers)
from this directory, which pytest puts on sys.path."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def no_user_git_config(tmp_path_factory: pytest.TempPathFactory):
    """No test sees the developer's git configuration (identity, hooks, signing, templates):
    git reads an empty global file and no system file. The tool's own commits then run with
    whatever identity git can find, or its fallback; tests that commit by hand name their own
    (loopkit.git)."""
    config = tmp_path_factory.mktemp("git-config") / "gitconfig"
    config.write_text("")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GIT_CONFIG_GLOBAL", str(config))
        patch.setenv("GIT_CONFIG_NOSYSTEM", "1")
        for name in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME",
                     "GIT_COMMITTER_EMAIL", "EMAIL"):  # fmt: skip
            patch.delenv(name, raising=False)
        yield


PREPARE_TIMEOUT_S = 600  # a hang guard for the stdlib preparation (about 12 CPU s)


def _shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder every process of this test session sees: the session's base temporary folder,
    or with pytest-xdist the folder above the workers' own (they share one parent)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session", autouse=True)
def stdlib_preparing(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """Starts `python prepare.py --source stdlib` (the real prepare.py, tokenizer training and
    token shards included) when the first test starts, if a selected test needs it: its CPU
    time then overlaps the tests that come before the first one that uses it, instead of
    adding to the suite's time. With pytest-xdist the first worker to claim it starts it and
    the others wait for its exit code. The shared folder it prepares into, or None when no test
    needs it."""
    if not any("stdlib_prepared" in item.fixturenames for item in request.session.items):
        yield None
        return
    shared = _shared_dir(tmp_path_factory) / "stdlib"
    shared.mkdir(exist_ok=True)
    try:  # the claim: exactly one process of the session creates this file
        os.close(os.open(shared / "claimed", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        yield shared
        return
    # the exit code is written by the child's shell, so a worker that did not start it can read
    # it; written to a temporary name and renamed, so it is never read half-written
    script = (
        '"$0" prepare.py --source stdlib >"$1/prepare.log" 2>&1; '
        'echo $? >"$1/rc.tmp"; mv "$1/rc.tmp" "$1/rc"'
    )
    proc = subprocess.Popen(
        ["/bin/sh", "-c", script, sys.executable, str(shared)],
        cwd=ROOT,
        env={"AUTORESEARCH_CACHE": str(shared / "cache"), "PATH": "/usr/bin:/bin"},
        start_new_session=True,  # its own process group: the shell and prepare.py end together
    )
    yield shared
    if proc.poll() is None and os.environ.get("PYTEST_XDIST_WORKER"):
        try:  # another worker may be waiting for it
            proc.wait(timeout=PREPARE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
    if proc.poll() is None:  # never waited for (the run was cut short), or hung
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="session")
def stdlib_prepared(stdlib_preparing: Path | None) -> Path:
    """A cache with the offline stdlib corpus, prepared once per test session by the real
    prepare.py (started ahead by stdlib_preparing, in whichever worker claimed it)."""
    assert stdlib_preparing is not None, "stdlib_preparing saw no test that needs the corpus"
    rc = stdlib_preparing / "rc"
    deadline = time.monotonic() + PREPARE_TIMEOUT_S  # a hang guard, not a speed assert
    while not rc.exists():
        assert time.monotonic() < deadline, "the stdlib preparation did not finish"
        time.sleep(0.1)
    code = rc.read_text().strip()
    assert code == "0", (
        f"prepare.py exited {code}:\n" + (stdlib_preparing / "prepare.log").read_text()
    )
    return stdlib_preparing / "cache"
