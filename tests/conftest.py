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


@pytest.fixture(scope="session")
def stdlib_prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache with the offline stdlib corpus, prepared once per test session by the real
    prepare.py (tokenizer training and token shards included)."""
    cache = tmp_path_factory.mktemp("stdlib-cache")
    proc = subprocess.run(
        [sys.executable, "prepare.py", "--source", "stdlib"],
        cwd=ROOT,
        env={"AUTORESEARCH_CACHE": str(cache), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return cache
