"""gitrepo: real temporary git repositories (never the project's own)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from loopkit import children_listed, own_children

from autoresearch.errors import WorkspaceError
from autoresearch.gitrepo import GitRepo

IDENTITY = {
    "GIT_AUTHOR_NAME": "Test",
    "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "test@example.com",
}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=repo, check=True, capture_output=True, text=True
    ).stdout.strip()


def history(repo: Path, base: str, head: str) -> list[tuple[str, str]]:
    """(sha, subject) of the commits in base..head, oldest first, as git log reports them."""
    out = git(repo, "log", "--format=%H%x00%s", "--reverse", f"{base}..{head}")
    return [tuple(line.split("\0", 1)) for line in out.splitlines() if line]


def refs(repo: Path, prefix: str) -> dict[str, str]:
    out = git(repo, "for-each-ref", "--format=%(refname) %(objectname)", prefix)
    return dict(line.split() for line in out.splitlines())


@pytest.fixture(autouse=True)
def isolated_git(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No user or system git config (hooks, signing, templates) leaks into the tests."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(home / "gitconfig"))
    for name, value in IDENTITY.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def repo_dir(tmp_path: Path) -> Path:
    path = tmp_path / "ws"
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    (path / "train.py").write_text("lr = 1.0\n")
    (path / "prepare.py").write_text("DATA = 1\n")
    (path / ".gitignore").write_text("runs/\n*.pyc\n")
    git(path, "add", ".")
    git(path, "commit", "-q", "-m", "initial")
    return path


@pytest.fixture
def repo(repo_dir: Path):
    with GitRepo(repo_dir) as r:
        yield r


def test_not_a_repo_and_no_commits(tmp_path: Path) -> None:
    with pytest.raises(WorkspaceError, match="not a git repository.*git init"):
        GitRepo(tmp_path)
    with pytest.raises(WorkspaceError, match="not a git repository"):
        GitRepo(tmp_path / "missing")
    git(tmp_path, "init", "-q")
    with pytest.raises(WorkspaceError, match="no commits yet"):
        GitRepo(tmp_path)


def test_subdirectory_is_refused(repo_dir: Path) -> None:
    (repo_dir / "sub").mkdir()
    with pytest.raises(WorkspaceError):
        GitRepo(repo_dir / "sub")


def test_commit_file_commits_only_that_path(repo: GitRepo, repo_dir: Path) -> None:
    (repo_dir / "prepare.py").write_text("DATA = 2\n")  # modified, not staged
    (repo_dir / "notes.txt").write_text("mine\n")
    git(repo_dir, "add", "notes.txt")  # staged by the user
    (repo_dir / "train.py").write_text("lr = 0.5\n")
    base = repo.head()

    sha = repo.commit_file("train.py", "exp 0002: lower lr")
    assert sha == repo.head() != base
    assert git(repo_dir, "show", "--name-only", "--format=%s", sha).split("\n") == [
        "exp 0002: lower lr",
        "",
        "train.py",
    ]
    assert repo.show_file(sha, "train.py") == "lr = 0.5\n"
    assert repo.dirty_paths() == {"prepare.py", "notes.txt"}
    assert git(repo_dir, "diff", "--cached", "--name-only") == "notes.txt"  # still staged
    assert (repo_dir / "prepare.py").read_text() == "DATA = 2\n"


def test_commit_file_unchanged(repo: GitRepo, repo_dir: Path) -> None:
    base = repo.head()
    with pytest.raises(WorkspaceError, match="nothing to commit"):
        repo.commit_file("train.py", "no change")
    assert repo.head() == base
    sha = repo.commit_file("train.py", "repeat the baseline", allow_empty=True)
    assert sha != base and history(repo_dir, base, sha) == [(sha, "repeat the baseline")]


def test_commit_file_skips_hooks_that_would_veto(repo: GitRepo, repo_dir: Path) -> None:
    hook = repo_dir / ".git" / "hooks" / "pre-commit"
    hook.write_text("#!/bin/sh\nexit 1\n")
    hook.chmod(0o755)
    (repo_dir / "train.py").write_text("lr = 0.1\n")
    repo.commit_file("train.py", "despite the hook")
    assert not repo.is_dirty()


def test_commits_without_a_configured_identity(
    repo: GitRepo, repo_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A machine where git knows nobody still records experiments, under the fallback name;
    an identity the user configured is used as it is."""
    for name in IDENTITY:
        monkeypatch.delenv(name)
    monkeypatch.setenv("EMAIL", "")
    git(repo_dir, "config", "user.useConfigOnly", "true")
    (repo_dir / "train.py").write_text("lr = 0.2\n")
    sha = repo.commit_file("train.py", "who am I")
    assert git(repo_dir, "log", "-1", "--format=%an <%ae>|%cn <%ce>", sha) == (
        "autoresearch <autoresearch@localhost>|autoresearch <autoresearch@localhost>"
    )

    git(repo_dir, "config", "user.name", "Ada")
    git(repo_dir, "config", "user.email", "ada@example.com")
    with GitRepo(repo_dir) as fresh:
        (repo_dir / "train.py").write_text("lr = 0.3\n")
        sha = fresh.commit_file("train.py", "known")
    assert git(repo_dir, "log", "-1", "--format=%an <%ae>", sha) == "Ada <ada@example.com>"


def test_reset_diff_and_history(repo: GitRepo, repo_dir: Path) -> None:
    base = repo.head()
    (repo_dir / "train.py").write_text("lr = 2.0\n")
    first = repo.commit_file("train.py", "first")
    (repo_dir / "train.py").write_text("lr = 3.0\n")
    second = repo.commit_file("train.py", "second")
    assert history(repo_dir, base, second) == [(first, "first"), (second, "second")]
    diff = repo.diff(base, second, "train.py")
    assert "-lr = 1.0\n+lr = 3.0\n" in diff and diff.endswith("\n")
    assert repo.is_ancestor(base, second) and repo.is_ancestor(second, second)
    assert not repo.is_ancestor(second, first)

    (repo_dir / "scratch.txt").write_text("untracked stays\n")
    repo.reset_hard(first)
    assert repo.head() == first and (repo_dir / "train.py").read_text() == "lr = 2.0\n"
    assert (repo_dir / "scratch.txt").exists()
    (repo_dir / "train.py").write_text("lr = 9.0\n")
    assert "+lr = 9.0" in repo.diff(first, None, "train.py")
    with pytest.raises(WorkspaceError, match="not a commit"):
        repo.rev_parse("no-such-rev")


def test_branches_and_detached_head(repo: GitRepo, repo_dir: Path) -> None:
    assert repo.current_branch() == "main"
    head = repo.head()
    assert (
        not repo.branch_exists("autoresearch/nov26")
        and repo.branch_sha("autoresearch/nov26") is None
    )
    repo.create_branch("autoresearch/nov26", head)
    assert repo.branch_exists("autoresearch/nov26") and repo.current_branch() == "main"
    repo.checkout("autoresearch/nov26")
    assert repo.current_branch() == "autoresearch/nov26"
    assert repo.branch_sha("autoresearch/nov26") == head
    with pytest.raises(WorkspaceError, match="already exists"):
        repo.create_branch("autoresearch/nov26", head)
    with pytest.raises(WorkspaceError, match="not a valid branch name"):
        repo.create_branch("bad..name", head)
    with pytest.raises(WorkspaceError, match="no branch"):
        repo.checkout("nope")

    (repo_dir / "train.py").write_text("dirty\n")
    repo.checkout("main", force=True)
    assert repo.current_branch() == "main" and not repo.is_dirty()

    git(repo_dir, "checkout", "-q", "--detach", "HEAD")
    assert repo.current_branch() is None and repo.head() == head


def test_refs(repo: GitRepo, repo_dir: Path) -> None:
    head = repo.head()
    ref = "refs/autoresearch/nov26/attempts/0001"
    assert repo.ref_sha(ref) is None
    repo.update_ref(ref, head)
    repo.update_ref("refs/autoresearch/nov26/attempts/0002", "HEAD")
    repo.update_ref("refs/autoresearch/other/attempts/0001", head)
    assert repo.ref_sha(ref) == head
    assert refs(repo_dir, "refs/autoresearch/nov26/attempts") == {
        ref: head,
        "refs/autoresearch/nov26/attempts/0002": head,
    }
    with pytest.raises(ValueError):
        repo.update_ref("autoresearch/x", head)
    with pytest.raises(ValueError):
        repo.ref_sha("--all")


def test_dirty_detection_ignores_gitignored_files(repo: GitRepo, repo_dir: Path) -> None:
    assert not repo.is_dirty()
    (repo_dir / "runs").mkdir()
    (repo_dir / "runs" / "results.tsv").write_text("x\n")
    (repo_dir / "cache.pyc").write_bytes(b"\0")
    assert not repo.is_dirty() and repo.dirty_paths() == set()
    (repo_dir / "new dir").mkdir()
    (repo_dir / "new dir" / "idea.py").write_text("\n")
    assert repo.is_dirty() and not repo.is_dirty(untracked=False)
    assert repo.dirty_paths() == {"new dir/idea.py"}
    git(repo_dir, "mv", "prepare.py", "prepare2.py")
    assert repo.dirty_paths(untracked=False) == {"prepare.py", "prepare2.py"}


def test_clear_stale_lock(repo: GitRepo, repo_dir: Path) -> None:
    lock = repo_dir / ".git" / "index.lock"
    lock.write_text("")
    (repo_dir / "train.py").write_text("lr = 4.0\n")
    with pytest.raises(WorkspaceError, match="lock"):
        repo.commit_file("train.py", "blocked")
    assert repo.clear_stale_lock() == []  # too fresh: it may belong to a git that just started
    old = time.time() - 60
    os.utime(lock, (old, old))
    assert repo.clear_stale_lock() == [lock] and not lock.exists()
    repo.commit_file("train.py", "unblocked")


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts /proc/self/fd")
@pytest.mark.skipif(not children_listed(), reason="lists /proc/self/task/*/children")
def test_no_fd_or_process_leak_over_many_sessions(repo_dir: Path) -> None:
    def one(i: int) -> None:
        with GitRepo(repo_dir) as repo:
            (repo_dir / "train.py").write_text(f"lr = {i}\n")
            repo.commit_file("train.py", f"exp {i:04d}")
            repo.update_ref(f"refs/autoresearch/t/attempts/{i:04d}", repo.head())

    one(0)  # warm up GitPython's lazily created state
    fds, children = _open_fds(), own_children()
    for i in range(1, 201):
        one(i)
    assert _open_fds() == fds
    assert own_children() == children
    assert len(refs(repo_dir, "refs/autoresearch/t/attempts")) == 201


def test_non_ascii_messages_and_content_round_trip(repo: GitRepo, repo_dir: Path) -> None:
    source = "# Lernrate halbiert — λ = 0.5\nlr = 0.5\n"
    (repo_dir / "train.py").write_text(source, encoding="utf-8")
    sha = repo.commit_file("train.py", "exp 0003: λ halbiert, ☃")
    assert repo.show_file(sha, "train.py") == source
    assert history(repo_dir, f"{sha}~1", sha) == [(sha, "exp 0003: λ halbiert, ☃")]


def test_paths_are_relative_to_the_top_level(repo: GitRepo, repo_dir: Path) -> None:
    (repo_dir / "train.py").write_text("lr = 0.3\n")
    sha = repo.commit_file(repo_dir / "train.py", "absolute path")
    assert repo.show_file(sha, "./train.py") == "lr = 0.3\n"
    for outside in ("../elsewhere.py", repo_dir.parent / "x.py", "."):
        with pytest.raises(ValueError):
            repo.commit_file(outside, "outside")


def test_missing_git_executable_says_what_to_do(
    repo_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import git as gitpython

    monkeypatch.setattr(gitpython.Git, "GIT_PYTHON_GIT_EXECUTABLE", "/nonexistent/git")
    with pytest.raises(WorkspaceError, match="install git"):
        GitRepo(repo_dir)
