"""Shared fixtures. Test modules import their helpers (loopkit, fakellm, prepare_helpers)
from this directory, which pytest puts on sys.path."""

from __future__ import annotations

import subprocess
import sys
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


@pytest.fixture(scope="session", autouse=True)
def stdlib_preparing(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """Starts `python prepare.py --source stdlib` (the real prepare.py, tokenizer training and
    token shards included) when the first test starts, if a selected test needs it: its CPU
    time then overlaps the tests that come before the first one that uses it, instead of
    adding to the suite's time. (cache, the child, its log) or None when none needs it."""
    if not any("stdlib_prepared" in item.fixturenames for item in request.session.items):
        yield None
        return
    cache = tmp_path_factory.mktemp("stdlib-cache")
    log = tmp_path_factory.mktemp("stdlib-prepare") / "prepare.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "prepare.py", "--source", "stdlib"],
            cwd=ROOT,
            env={"AUTORESEARCH_CACHE": str(cache), "PATH": "/usr/bin:/bin"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    yield cache, proc, log
    if proc.poll() is None:  # never waited for: the run was cut short
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def stdlib_prepared(stdlib_preparing: tuple[Path, subprocess.Popen, Path] | None) -> Path:
    """A cache with the offline stdlib corpus, prepared once per test session by the real
    prepare.py (started ahead by stdlib_preparing)."""
    assert stdlib_preparing is not None, "stdlib_preparing saw no test that needs the corpus"
    cache, proc, log = stdlib_preparing
    code = proc.wait(timeout=PREPARE_TIMEOUT_S)
    assert code == 0, log.read_text()
    return cache
