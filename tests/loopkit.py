"""Helpers for loop tests: a real workspace whose train.py is a fast stub trainer.

The stub prints train.py's output contract in well under a second, with a val_bpb that is a
smooth function of its constants, so the loop, git and the record are exercised for real
while training costs nothing. The prepared-data check only needs a manifest to exist, so the
cache holds a manifest and nothing else.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from autoresearch.workspace import init_workspace

STUB_TRAIN = '''\
"""Stub trainer: prints the output contract; val_bpb depends on the constants below."""
import math
import sys
import time

LR = 0.04  # learning rate
WIDTH = 64  # model width
CRASH = False  # raise before training
SLEEP = 0.0  # seconds per step


def main():
    if CRASH:
        raise RuntimeError("simulated crash in train.py")
    for i in range(3):
        time.sleep(SLEEP)
        print(f"step {i:05d} ({(i + 1) * 33.3:.1f}%) | loss {5 - i:.6f} | dt 10ms | "
              f"tok/sec 1,000 | mfu 0.0% | remaining {2 - i}s", flush=True)
    val = 1.0 + 10 * (LR - 0.08) ** 2 + abs(math.log2(WIDTH / 256)) / 100
    print("---")
    print(f"val_bpb:          {val:.6f}")
    print("training_seconds: 0.1")
    print("total_seconds:    0.2")
    print("peak_vram_mb:     1024.0")
    print("mfu_percent:      0.00")
    print("total_tokens_M:   0.1")
    print("num_steps:        3")
    print(f"num_params_M:     {WIDTH / 100:.1f}")
    print("depth:            2")


if __name__ == "__main__":
    main()
'''


def stub_bpb(lr: float = 0.04, width: int = 64) -> float:
    """What the stub prints for these constants (rounded as printed)."""
    import math

    return round(1.0 + 10 * (lr - 0.08) ** 2 + abs(math.log2(width / 256)) / 100, 6)


def git(cwd: Path, *args: str) -> str:
    """`git ARGS` in `cwd`, committing (when it commits) as a test identity of its own."""
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


PR_SET_CHILD_SUBREAPER = 36  # prctl option (linux/prctl.h)


def alive(pid: int) -> bool:
    """True while the process runs; zombies (dead, awaiting their reaper) count as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


def own_children() -> list[int]:
    """The processes this test process started and has not reaped (zombies included: `alive`
    tells them apart), read from its own /proc/self/task/*/children: no other process on the
    machine is looked at, so another suite running beside this one cannot change the answer."""
    pids = []
    for task in Path("/proc/self/task").iterdir():
        try:
            pids += [int(pid) for pid in (task / "children").read_text().split()]
        except FileNotFoundError:  # the thread ended meanwhile
            continue
    return sorted(pids)


def own_descendants() -> list[int]:
    """own_children, their children, and so on: read from the /proc entries of this process
    and of its descendants only."""
    found, todo = [], own_children()
    while todo:
        pid = todo.pop()
        found.append(pid)
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except FileNotFoundError:  # gone meanwhile
            continue
        for task in tasks:
            try:
                todo += [int(p) for p in (task / "children").read_text().split()]
            except FileNotFoundError:
                continue
    return sorted(found)


def cmdline(pid: int) -> bytes:
    """A process's command line (b"" once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return b""


@contextlib.contextmanager
def adopting_orphans() -> Iterator[None]:
    """While inside, this process is a child subreaper (prctl PR_SET_CHILD_SUBREAPER): a
    descendant whose parent exits (a daemon, a child its parent left behind) is re-parented
    to this process rather than to init, so own_descendants() finds it without looking at any
    other process of the machine. On the way out every process adopted or started inside that
    is still there is killed and reaped, and the flag is cleared."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    before = set(own_children())
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        for pid in set(own_children()) - before:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def children_listed() -> bool:
    """Whether own_children can answer here (Linux built with CONFIG_PROC_CHILDREN)."""
    return Path(f"/proc/self/task/{os.getpid()}/children").exists()


def closed_port() -> int:
    """A localhost TCP port that nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_workspace(root: Path, train_source: str = STUB_TRAIN) -> Path:
    """A real workspace (git repo from `autoresearch init`) with `train_source` committed."""
    ws = init_workspace(root)
    (ws / "train.py").write_text(train_source, encoding="utf-8")
    git(ws, "add", "train.py")
    git(ws, "commit", "-q", "-m", "stub trainer")
    return ws


def fake_prepared_cache(cache: Path) -> Path:
    """A cache whose active dataset has a manifest (enough for the loop's data check)."""
    (cache / "stub").mkdir(parents=True, exist_ok=True)
    (cache / "stub" / "manifest.json").write_text(json.dumps({"source": "stub"}))
    (cache / "ACTIVE").write_text("stub\n")
    return cache


def stub_cli_env(tmp_path: Path) -> dict[str, str]:
    """The environment for the CLI run in a subprocess over a stub workspace: this checkout's
    package, a fake prepared cache, unsealed (the stub prints val_bpb and saves no
    checkpoint), and none of the developer's AUTORESEARCH_ or OPENAI_ settings."""
    cache = fake_prepared_cache(tmp_path / "cache")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AUTORESEARCH_", "OPENAI_"))}
    return {
        **base,
        "AUTORESEARCH_CACHE": str(cache),
        "AUTORESEARCH_SEALED": "0",
        "PYTHONPATH": str(Path(__file__).parents[1]),
    }


def reply(description: str, *edits: tuple[str, str]) -> str:
    """An LLM reply: a description line and one SEARCH/REPLACE block per (search, replace)."""
    blocks = "".join(
        f"train.py\n```python\n<<<<<<< SEARCH\n{s}\n=======\n{r}\n>>>>>>> REPLACE\n```\n"
        for s, r in edits
    )
    return f"{description}\n\n{blocks}"


def results_rows(ws: Path, tag: str) -> list[list[str]]:
    lines = (ws / "runs" / tag / "results.tsv").read_text().splitlines()
    assert lines[0] == "commit\tval_bpb\tmemory_gb\tstatus\tdescription"
    return [line.split("\t") for line in lines[1:]]


def run_args(tag: str, *extra: str, n: int | None = None) -> list[str]:
    """`autoresearch run` tagged `tag` on the cpu preset and device, then `extra`; with n, for
    at most n experiments."""
    limit = [] if n is None else ["--max-experiments", str(n)]
    return ["run", "--tag", tag, *limit, "--preset", "cpu", "--device", "cpu", *extra]


def openai_args(base_url: str) -> list[str]:
    """The openai agent, talking to a fake endpoint."""
    return ["--agent", "openai", "--base-url", base_url, "--model", "fake-model"]


def replay_args(patches: Path) -> list[str]:
    """The replay agent, proposing the patch files in `patches` in order."""
    return ["--agent", "replay", "--patches", str(patches)]


def cli(
    ws: Path, *args: str, env: dict[str, str], timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run the real `autoresearch` CLI in a subprocess (`timeout` guards against a hang; a busy
    machine may be slow)."""
    return subprocess.run(
        [sys.executable, "-m", "autoresearch", *args, "--workspace", str(ws)],
        cwd=ws,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
