"""Every git command the tool runs: the workspace's creation, its branch, commits, resets and
attempt refs, diffs for the report, and the three-way merge of a proposal onto a new best.

Guarantees:
- no other module runs git;
- every operation on a repository is one `git` command run through GitPython's
  `repo.git` (a short-lived process each time); nothing here touches GitPython's object
  database, so no persistent `git cat-file` helpers are started, and `close()` (or leaving the
  `with` block) releases what GitPython caches. Safe to create and close hundreds of times in
  one long-lived process;
- `commit_file` commits exactly one path: whatever else is staged or modified stays as it was
  and is not part of the commit; hooks that could edit or veto the commit (pre-commit,
  commit-msg) and signing prompts are skipped, since nobody is there to answer at night;
- git's failures become WorkspaceError with git's own message and what to do next.

Not guaranteed: that the caller resets only its own branch (`reset_hard` does what it is told).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from .errors import WorkspaceError

# Without this, a missing git executable makes `import git` fail with an ImportError; quiet,
# it surfaces at the first command, where it becomes a WorkspaceError saying to install git.
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
import git  # noqa: E402

LOCK_RETRIES = 5  # attempts when another git process holds the index lock for a moment
LOCK_RETRY_S = 0.2  # seconds between those attempts
STALE_LOCK_MIN_AGE_S = 2.0  # a lock younger than this may belong to a git that just started
STALE_LOCK_AGE_S = 60.0  # without /proc to check for running git processes: age alone decides

# Set for every git command: stable English messages to match on, no prompts, and `git status`
# must not take the index lock to refresh it (it would race the user's own git).
GIT_ENV = {"LC_ALL": "C", "LANGUAGE": "C", "GIT_TERMINAL_PROMPT": "0", "GIT_OPTIONAL_LOCKS": "0"}

NO_GIT = "git is not installed or not on PATH: install git (e.g. `apt install git`)"

# Who commits when git knows nobody (a fresh machine, a CI container): the tool must still
# record its experiments. A configured identity (git config or GIT_* variables) always wins.
FALLBACK_IDENTITY = {
    "GIT_AUTHOR_NAME": "autoresearch",
    "GIT_AUTHOR_EMAIL": "autoresearch@localhost",
    "GIT_COMMITTER_NAME": "autoresearch",
    "GIT_COMMITTER_EMAIL": "autoresearch@localhost",
}


class GitRepo:
    """A git working tree at `path` (its top level). Use as a context manager, or `close()`."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path).resolve()
        self._identity_known = False
        try:
            self._repo = git.Repo(self.path)
        except (git.InvalidGitRepositoryError, git.NoSuchPathError) as error:
            raise WorkspaceError(
                f"{self.path} is not a git repository: run `git init` there and commit your"
                " files, or create a workspace with `autoresearch init DIR`"
            ) from error
        try:
            if self._repo.bare:
                raise WorkspaceError(f"{self.path} is a bare repository: use a clone with files")
            self._repo.git.update_environment(**GIT_ENV)
            top = Path(self._repo.working_tree_dir or "").resolve()
            if top != self.path:  # GitPython found the repo above `path`
                raise WorkspaceError(
                    f"{self.path} is inside the repository {top}, not its top level: run from {top}"
                )
            if self.ref_sha("HEAD") is None:
                raise WorkspaceError(
                    f"the repository in {self.path} has no commits yet: commit your files"
                    " first (`git add . && git commit -m 'initial'`)"
                )
        except BaseException:
            self.close()
            raise

    # --------------------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Release GitPython's caches and helper processes. Idempotent."""
        self._repo.git.clear_cache()
        self._repo.close()

    def __enter__(self) -> GitRepo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --------------------------------------------------------------------------- running git

    def _run(self, *args: str, ok: tuple[int, ...] = (0,)) -> tuple[int, bytes, str]:
        """Run `git ARGS` in the working tree: (exit status, stdout bytes, stderr text).

        A status outside `ok` raises WorkspaceError; a busy index lock is retried briefly.
        """
        for attempt in range(LOCK_RETRIES):
            try:
                status, out, err = self._repo.git.execute(
                    [git.Git.GIT_PYTHON_GIT_EXECUTABLE or "git", *args],
                    with_extended_output=True,
                    with_exceptions=False,
                    stdout_as_string=False,
                    strip_newline_in_stdout=False,
                )
            except git.GitCommandNotFound as error:
                raise WorkspaceError(NO_GIT) from error
            if status in ok:
                return status, out, err
            if ".lock': File exists" in err and attempt + 1 < LOCK_RETRIES:
                time.sleep(LOCK_RETRY_S)  # another git process holds the lock: wait briefly
                continue
            raise WorkspaceError(_explain(args, status, err))
        raise AssertionError("unreachable")

    def _out(self, *args: str) -> str:
        return self._run(*args)[1].decode("utf-8", errors="replace")

    def _status(self, *args: str) -> int:
        """Exit status of a yes/no command (0 yes, 1 no; anything else raises)."""
        return self._run(*args, ok=(0, 1))[0]

    @staticmethod
    def _rev(rev: str) -> str:
        if not rev or rev.startswith("-"):
            raise ValueError(f"not a revision: {rev!r}")
        return rev

    def _relpath(self, path: Path | str) -> str:
        """`path` relative to the top level, in git's spelling; must lie inside the tree.

        Symlinks are not followed: a link is committed as the link git tracks.
        """
        given = Path(path)
        if given.is_absolute():
            given = Path(os.path.abspath(given))
            if not given.is_relative_to(self.path):  # maybe reached through a linked directory
                given = given.parent.resolve() / given.name
            rel = given.relative_to(self.path) if given.is_relative_to(self.path) else None
        else:
            rel = Path(os.path.normpath(given))
        if rel is None or rel.parts[:1] == ("..",) or str(rel) == ".":
            raise ValueError(f"{path} is not a file inside the repository {self.path}")
        return rel.as_posix()

    # --------------------------------------------------------------------------- state

    def dirty_paths(self, untracked: bool = True) -> set[str]:
        """Paths (relative to the top level) with uncommitted changes, staged or not.

        Untracked files count when `untracked` is true; files git ignores never count.
        """
        mode = "all" if untracked else "no"
        out = self._out("status", "--porcelain=v1", "-z", f"--untracked-files={mode}")
        paths: set[str] = set()
        entries = iter(out.split("\0"))
        for entry in entries:
            if len(entry) < 4:
                continue
            paths.add(entry[3:])
            if entry[0] in "RC":  # a rename or copy: the next entry is its source
                paths.add(next(entries, ""))
        paths.discard("")
        return paths

    def is_dirty(self, untracked: bool = True) -> bool:
        """True when anything is modified, staged, or (with `untracked`) new and not ignored."""
        return bool(self.dirty_paths(untracked=untracked))

    def current_branch(self) -> str | None:
        """The checked-out branch's short name, or None when HEAD is detached."""
        status, out, _ = self._run("symbolic-ref", "--quiet", "--short", "HEAD", ok=(0, 1))
        return out.decode().strip() if status == 0 else None

    def head(self) -> str:
        """Full sha of HEAD."""
        return self.rev_parse("HEAD")

    def rev_parse(self, rev: str) -> str:
        """Full sha of the commit `rev` names; WorkspaceError if it names none."""
        sha = self.ref_sha(rev)
        if sha is None:
            raise WorkspaceError(f"{rev!r} is not a commit in {self.path}")
        return sha

    def ref_sha(self, ref: str) -> str | None:
        """Full sha of the commit `ref` points at, or None if it does not exist."""
        status, out, _ = self._run(
            "rev-parse", "--verify", "--quiet", self._rev(ref) + "^{commit}", ok=(0, 1, 128)
        )
        return out.decode().strip() if status == 0 else None

    def branch_exists(self, name: str) -> bool:
        return self._status("show-ref", "--verify", "--quiet", f"refs/heads/{name}") == 0

    def branch_sha(self, name: str) -> str | None:
        """Full sha at the tip of branch `name`, or None if there is no such branch."""
        return self.ref_sha(f"refs/heads/{name}")

    # --------------------------------------------------------------------------- reading

    def is_ancestor(self, a: str, b: str) -> bool:
        """Whether commit `a` is `b` or one of its ancestors."""
        return self._status("merge-base", "--is-ancestor", self._rev(a), self._rev(b)) == 0

    def diff(self, a: str, b: str | None, path: Path | str) -> str:
        """Unified diff of `path` from commit `a` to commit `b` (None: the working tree)."""
        revs = [self._rev(a)] + ([self._rev(b)] if b is not None else [])
        return self._out("diff", "--no-color", "--no-ext-diff", *revs, "--", self._relpath(path))

    def show_file(self, sha: str, path: Path | str) -> str:
        """The content of `path` at commit `sha`, exactly (decoded as UTF-8)."""
        return self._out("cat-file", "blob", f"{self._rev(sha)}:{self._relpath(path)}")

    # --------------------------------------------------------------------------- writing

    def create_branch(self, name: str, start: str) -> None:
        """Create branch `name` at `start` (without checking it out); it must not exist."""
        if self._run("check-ref-format", "--branch", name, ok=(0, 1, 128))[0] != 0:
            raise WorkspaceError(f"{name!r} is not a valid branch name: choose another tag")
        if self.branch_exists(name):
            raise WorkspaceError(f"branch {name} already exists")
        self._run("branch", "--no-track", name, self._rev(start))

    def checkout(self, name: str, force: bool = False) -> None:
        """Switch to branch `name`; `force` discards local changes that would block it."""
        if not self.branch_exists(name):
            raise WorkspaceError(f"no branch {name} in {self.path}")
        self._run("checkout", "--quiet", *(["--force"] if force else []), name, "--")

    def commit_file(self, relpath: Path | str, message: str, *, allow_empty: bool = False) -> str:
        """Commit the working-tree content of `relpath` alone; returns the new commit's sha.

        Other staged or modified paths are left as they are and not committed. An unchanged
        file raises WorkspaceError unless `allow_empty` (then the commit repeats the tree).
        """
        if not message.strip():
            raise ValueError("a commit needs a message")
        path = self._relpath(relpath)
        self._run("add", "--", path)
        changed = self._status("diff", "--cached", "--quiet", "HEAD", "--", path) == 1
        if not changed and not allow_empty:
            raise WorkspaceError(f"nothing to commit: {path} is the same as in HEAD")
        self._ensure_identity()
        self._run(
            "commit",
            "--quiet",
            "--only",
            "--no-verify",
            "--no-gpg-sign",
            *([] if changed else ["--allow-empty"]),
            "-m",
            message,
            "--",
            path,
        )
        return self.head()

    def _ensure_identity(self) -> None:
        """Commit as FALLBACK_IDENTITY when git cannot name an author or committer itself."""
        if not self._identity_known:
            self._repo.git.update_environment(**fallback_identity(self.path))
            self._identity_known = True

    def reset_hard(self, sha: str) -> None:
        """Point the current branch, index and working tree at `sha` (untracked files stay)."""
        self._run("reset", "--quiet", "--hard", self.rev_parse(sha))

    def update_ref(self, ref: str, sha: str) -> None:
        """Create or move `ref` (a full name under refs/) to commit `sha`."""
        if not ref.startswith("refs/"):
            raise ValueError(f"ref must be a full name under refs/, got {ref!r}")
        self._run("update-ref", "-m", "autoresearch", ref, self.rev_parse(sha))

    def add_worktree(self, path: Path, sha: str) -> None:
        """A linked working tree at `path`, detached at `sha`; one left there (by a killed
        session) is replaced."""
        self.remove_worktree(path)
        self._run("worktree", "add", "--quiet", "--force", "--detach", str(path), self._rev(sha))

    def remove_worktree(self, path: Path) -> None:
        """Remove the linked working tree at `path` (its changes with it), if there is one."""
        if (path / ".git").exists():
            self._run("worktree", "remove", "--force", "--force", str(path), ok=(0, 128))
        self._run("worktree", "prune")

    def clear_stale_lock(self) -> list[Path]:
        """Remove lock files a killed git process left behind; returns the ones removed.

        A lock counts as stale when no git process is running in this repository (checked
        through /proc) and the lock is older than STALE_LOCK_MIN_AGE_S; without /proc, when it
        is older than STALE_LOCK_AGE_S. Locks of a live git process are never touched.
        """
        git_dir = Path(self._repo.git_dir)
        common = Path(self._repo.common_dir)
        candidates = [git_dir / "index.lock", git_dir / "HEAD.lock", git_dir / "ORIG_HEAD.lock"]
        candidates += [common / "packed-refs.lock", *common.glob("refs/**/*.lock")]
        locks = [lock for lock in candidates if lock.is_file()]
        if not locks:
            return []
        proc = Path("/proc")
        if proc.is_dir():
            if _git_running_in({self.path, git_dir.resolve(), common.resolve()}):
                return []
            min_age = STALE_LOCK_MIN_AGE_S
        else:
            min_age = STALE_LOCK_AGE_S
        removed = []
        now = time.time()
        for lock in locks:
            try:
                if now - lock.stat().st_mtime >= min_age:
                    lock.unlink()
                    removed.append(lock)
            except FileNotFoundError:  # its owner finished meanwhile
                continue
        return removed


def init_repository(target: Path, paths: Sequence[str], message: str) -> None:
    """Make `target` a git repository (unless it is one) whose first commit holds `paths`.

    Commits as FALLBACK_IDENTITY where git knows nobody, so a fresh machine can start.
    """
    if not (target / ".git").exists():
        _plain_git(target, "init", "-q", "-b", "main")
    _plain_git(target, "add", "--", *paths)
    identity = fallback_identity(target)
    _plain_git(target, "commit", "-q", "--no-verify", "--no-gpg-sign", "-m", message, **identity)


def fallback_identity(cwd: Path) -> dict[str, str]:
    """The FALLBACK_IDENTITY variables to set for a commit in `cwd`: none when git can name
    the author and committer itself (from its configuration or the environment)."""
    env = {**os.environ, **GIT_ENV}
    for who in ("GIT_AUTHOR_IDENT", "GIT_COMMITTER_IDENT"):
        try:
            done = subprocess.run(["git", "var", who], cwd=cwd, env=env, capture_output=True)
        except FileNotFoundError as error:
            raise WorkspaceError(NO_GIT) from error
        if done.returncode != 0:
            return {k: v for k, v in FALLBACK_IDENTITY.items() if not os.environ.get(k)}
    return {}


def _plain_git(cwd: Path, *args: str, **env: str) -> None:
    """`git ARGS` in `cwd`, outside any GitRepo (there is none yet), with `env` added."""
    try:
        proc = subprocess.run(
            ["git", *args],
            cwd=cwd,
            env={**os.environ, **GIT_ENV, **env},
            capture_output=True,
            text=True,
        )
    except FileNotFoundError as error:
        raise WorkspaceError(NO_GIT) from error
    if proc.returncode != 0:
        raise WorkspaceError(f"{_explain(args, proc.returncode, proc.stderr)} (in {cwd})")


def diffs(
    workspace: Path, path: str, pairs: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], str]:
    """`git diff a b -- path` in `workspace` for each (a, b) git can answer; the others (and
    all of them, when `workspace` is no repository with commits) are left out."""
    try:
        repo = GitRepo(workspace)
    except WorkspaceError:
        return {}
    found = {}
    with repo:
        for a, b in pairs:
            try:
                found[(a, b)] = repo.diff(a, b, path)
            except (WorkspaceError, ValueError):  # an unknown commit, or no commit name at all
                continue
    return found


def merge_texts(base: str, ours: str, theirs: str) -> str | None:
    """`theirs`' changes to `base` applied to `ours` (git merge-file); None on a conflict."""
    with tempfile.TemporaryDirectory(prefix="autoresearch-merge-") as tmp:
        paths = []
        for name, text in (("ours", ours), ("base", base), ("theirs", theirs)):
            path = Path(tmp) / name
            path.write_text(text, encoding="utf-8")
            paths.append(str(path))
        proc = subprocess.run(
            ["git", "merge-file", "-p", "--quiet", *paths],
            capture_output=True,
            encoding="utf-8",
            env={**os.environ, **GIT_ENV},
        )
    return proc.stdout if proc.returncode == 0 else None


def _git_running_in(dirs: set[Path]) -> bool:
    """True if a process named git* has its working directory in (or under) one of `dirs`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if not (entry / "comm").read_text().startswith("git"):
                continue
            cwd = Path(os.readlink(entry / "cwd"))
        except OSError:  # gone, or not ours to inspect
            continue
        if any(cwd == d or d in cwd.parents for d in dirs):
            return True
    return False


def _explain(args: tuple[str, ...], status: int, err: str) -> str:
    """A WorkspaceError message for a failed git command: git's words and what to do next."""
    command = "git " + " ".join(args[:2])
    detail = err.strip() or f"exit status {status}"
    if "Please tell me who you are" in err or "empty ident" in err:
        return (
            f"{command} failed: git does not know who you are; set it with"
            " `git config --global user.name 'Your Name'` and"
            " `git config --global user.email you@example.com`"
        )
    if ".lock': File exists" in err:
        return (
            f"{command} failed: another git process holds a lock ({detail}); wait for it, or if"
            " no git is running, remove the lock file named above"
        )
    return f"{command} failed: {detail}"
