"""workspace: one rule for the cache directory and the active dataset, shared by `prepare`,
`run` and prepare.py; the notice for a workspace whose prepare.py is not the installed one."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from loopkit import cli, fake_prepared_cache, git, make_workspace, run_args
from prepare_helpers import write_text_corpus

import prepare
from autoresearch import fingerprint, workspace
from autoresearch.errors import DataError


@pytest.mark.parametrize("value", ["~/arcache", " ~/arcache ", "relative/cache", "", "/abs/c"])
def test_prepare_py_and_the_tool_resolve_the_cache_alike(
    value: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("AUTORESEARCH_CACHE", value)
    assert prepare.cache_root() == workspace.cache_dir()
    if value.strip().startswith("~"):
        assert workspace.cache_dir() == tmp_path / "home" / "arcache"


def test_a_cache_under_home_written_by_prepare_is_read_by_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AUTORESEARCH_CACHE='~/arcache': what `prepare` writes under the expanded path is the
    dataset the tool (and prepare.py) then finds."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("AUTORESEARCH_CACHE", "~/arcache")
    monkeypatch.delenv("AUTORESEARCH_DATASET", raising=False)
    corpus = tmp_path / "corpus"
    write_text_corpus(corpus, 6)
    built = prepare.run_prepare(f"files:{corpus}", log=lambda _: None)
    assert built.parent == tmp_path / "home" / "arcache"
    assert workspace.active_dataset() == built == prepare.active_dataset_dir()
    assert fingerprint.active_dataset() == built
    assert workspace.data_manifest()["name"] == built.name


def test_the_active_dataset_is_explained_when_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    env = {"AUTORESEARCH_CACHE": str(cache)}
    with pytest.raises(DataError, match="no prepared data in .*autoresearch prepare"):
        workspace.active_dataset(env)
    with pytest.raises(DataError, match="bad dataset name"):
        workspace.active_dataset({**env, "AUTORESEARCH_DATASET": ".."})
    fake_prepared_cache(cache)
    assert workspace.active_dataset(env) == cache / "stub"
    with pytest.raises(DataError, match="no manifest"):
        workspace.active_dataset({**env, "AUTORESEARCH_DATASET": "other"})


def test_a_prepare_py_unlike_the_template_is_named_with_the_update(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path / "ws")
    assert workspace.stale_prepare(ws) is None
    (ws / "prepare.py").write_text((ws / "prepare.py").read_text() + "# an older copy\n")
    git(ws, "commit", "-qam", "an older prepare.py")
    notice = workspace.stale_prepare(ws)
    assert notice is not None and "differs from the installed autoresearch's template" in notice
    command = notice.split("To update it: ", 1)[1]
    identity = {
        f"GIT_{who}_{what}": "t" for who in ("AUTHOR", "COMMITTER") for what in ("NAME", "EMAIL")
    }
    done = subprocess.run(
        command, shell=True, capture_output=True, text=True, env={**os.environ, **identity}
    )
    assert done.returncode == 0, done.stderr
    assert workspace.stale_prepare(ws) is None
    assert git(ws, "status", "--porcelain") == ""


def test_run_tells_of_a_stale_prepare_py(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path / "ws")
    (ws / "prepare.py").write_text((ws / "prepare.py").read_text() + "# an older copy\n")
    git(ws, "commit", "-qam", "an older prepare.py")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AUTORESEARCH_", "OPENAI_"))}
    env = {
        **base,
        "AUTORESEARCH_CACHE": str(fake_prepared_cache(tmp_path / "cache")),
        "AUTORESEARCH_SEALED": "0",  # the stub prints val_bpb and saves no checkpoint
    }
    proc = cli(ws, *run_args("stale", "--agent", "tuner", "--calibrate", "1", n=1), env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "differs from the installed autoresearch's template" in " ".join(proc.stdout.split())
