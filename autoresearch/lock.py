"""The workspace lock: one command at a time trains, commits and resets in a working tree.

`run` and `try` both hold it for as long as they may touch git or train.py, so two of them
on one workspace are refused, never interleaved. It is an `fcntl.flock` on a file in the
repository's git directory (never under runs/, which a refused command must leave as it
was): the kernel releases it when the holder's file is closed, so a holder killed with
`kill -9` leaves no stale lock behind. The file's content (pid, command, since when) is only
for the message; the flock is the lock.

Re-entrant within one process: `try` takes it before it reads the working tree and the
session it starts takes it again. What it does not do: lock across machines (flock on a
network file system may not), or stop a person running git by hand.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from .errors import WorkspaceError

LOCK_FILE = "autoresearch.lock"  # in the repository's git directory
BUSY_EXIT = 13  # the exit status of a command refused because another holds the lock

_held: dict[Path, int] = {}  # lock file -> how many times this process holds it


class WorkspaceBusy(WorkspaceError):
    """Another autoresearch command is working in this workspace."""

    exit_code = BUSY_EXIT


def lock_path(root: Path) -> Path:
    """The lock file of the workspace at `root`: in `.git/`, or in the directory a `.git`
    file names (a linked worktree has a git directory of its own)."""
    dot_git = root / ".git"
    if dot_git.is_file():
        text = dot_git.read_text(encoding="utf-8").strip()
        if text.startswith("gitdir:"):
            git_dir = Path(text.removeprefix("gitdir:").strip())
            return (git_dir if git_dir.is_absolute() else root / git_dir) / LOCK_FILE
    return dot_git / LOCK_FILE


@contextmanager
def workspace_lock(root: Path, command: str) -> Iterator[None]:
    """Hold the workspace's lock for `command` (its name, for the message another command
    prints); WorkspaceBusy at once when another process holds it."""
    path = lock_path(root).resolve()
    if _held.get(path):
        _held[path] += 1
        try:
            yield
        finally:
            _held[path] -= 1
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 400, 0).decode("utf-8", errors="replace").strip()
            raise WorkspaceBusy(
                f"another autoresearch command is working in {root} ({holder or 'unknown'}): "
                "wait until it has finished, then run this again"
            ) from None
        since = datetime.now(timezone.utc).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{command}, pid {os.getpid()}, since {since}\n".encode(), 0)
        _held[path] = 1
        try:
            yield
        finally:
            del _held[path]
    finally:
        os.close(fd)  # releases the flock
