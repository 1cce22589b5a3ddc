"""Warm starts: a child whose interpreter and slow imports are started before its run is due.

Guarantees: a warm child runs nothing of the run's before its go; one not used is ended, with
anything it started (its marker); its stdin closing (the harness dying) makes it exit. What it
does not do: decide when a warm start is worth it (the session does) or watch the run
(runner.run_training takes it from the go).
"""

from __future__ import annotations

import ast
import json
import signal
import subprocess
import sys
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

from . import sandbox
from .procs import RUN_MARKER_VAR, kill_orphans, signal_group

WARM_PRELOAD = ("torch", "numpy")  # packages worth importing ahead (torch: ~5 s on a GPU host)
# imported ahead too when train.py calls torch.compile (the first compile imports them)
WARM_COMPILER = ("torch._dynamo", "torch._inductor.compile_fx")
WARM_DISCARD_S = 2.0  # after closing its stdin, how long a discarded warm child may take to exit
_WARM_BOOT = """\
import json, os, sys
for _name in json.loads(sys.argv[1]):
    try:
        __import__(_name)
    except Exception:  # the script's own import will say what is wrong
        pass
_line = sys.stdin.readline()
if not _line.strip():
    os._exit(0)
_go = json.loads(_line)
_null = os.open(os.devnull, os.O_RDONLY)
os.dup2(_null, 0)
os.close(_null)
os.environ.clear()
os.environ.update(_go["env"])
sys.argv = [_go["script"]]
del json, _name, _line, _go, _null
import runpy
runpy.run_path(sys.argv[0], run_name="__main__")
"""


class Prestarted:
    """A child started before it is due, in its own session with the run marker it will keep
    (`marker`), that does its slow start-up and then waits for one JSON line on its stdin: the
    go. Its stdin closing before a go (`discard`, or the harness dying) makes it exit.
    `run_training(warm=...)` sends the go with `launch` and watches the child from there;
    `message` is what `launch` sends unless a subclass builds it from the run's command.
    The child stands in for a run whose command starts with `stands_for` (default: `command`)
    and whose environment is `env`; `launch` refuses any other run (WarmChild's takes any
    environment: its go carries the whole of it).
    `first`: a JSON line written at start-up, before the go (what the child needs to start);
    `key`: what it was started for, for its user to compare before using it."""

    def __init__(
        self,
        command: Sequence[str],
        workdir: Path,
        env: Mapping[str, str],
        *,
        stands_for: Sequence[str] | None = None,
        marker: str | None = None,
        first: Mapping | None = None,
        key: object = None,
    ) -> None:
        self.key = key
        self.cell: sandbox.Cell | None = None  # the box it runs in, if any (WarmChild)
        self.workdir = Path(workdir)
        self.env = dict(env)  # as given: without the marker variable added below
        self.stands_for = list(stands_for if stands_for is not None else command)
        self.marker = marker or uuid.uuid4().hex
        self.message: Mapping | None = None
        self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            list(command),
            cwd=workdir,
            env={**env, RUN_MARKER_VAR: self.marker},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
        if first is not None and not self._write(first, close=False):
            self.discard()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def launch(
        self, command: Sequence[str], env: Mapping[str, str]
    ) -> subprocess.Popen[bytes] | None:
        """Send the go (`message`); the child is the caller's from here on. None, and the child
        discarded, when `env` is not the environment it was started with, when `command` does
        not start with `stands_for` (the child would run something other than what the caller
        asked for), or when it died before it could be told."""
        assert self.message is not None, "set the go message first"
        if dict(env) != self.env or list(command[: len(self.stands_for)]) != self.stands_for:
            self.discard()
            return None
        return self._go(self.message)

    def _go(self, message: Mapping) -> subprocess.Popen[bytes] | None:
        assert self.proc is not None and self.proc.stdin is not None, "a warm child runs once"
        if not self._write(message, close=True):
            self.discard()
            return None
        proc, self.proc = self.proc, None
        return proc

    def _write(self, message: Mapping, *, close: bool) -> bool:
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps(message) + "\n").encode())
            if close:
                self.proc.stdin.close()
            else:
                self.proc.stdin.flush()
        except OSError:  # BrokenPipeError: it is gone
            return False
        return True

    def discard(self, grace: float = WARM_DISCARD_S) -> None:
        """End the child if it was not used: close its stdin (it exits), kill it if it lingers
        `grace` s, and anything it started (found by its marker)."""
        proc, self.proc = self.proc, None
        cell, self.cell = self.cell, None
        try:
            self._end(proc, grace)
        finally:
            if cell is not None:
                cell.close()

    def _end(self, proc: subprocess.Popen[bytes] | None, grace: float) -> None:
        if proc is None:
            return
        try:
            if proc.stdin is not None:
                proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            signal_group(proc.pid, signal.SIGKILL)  # not reaped yet: the group id is its own
            proc.wait()
        kill_orphans(self.marker)  # a process a preloaded module started, if any (Linux)
        if proc.stdout is not None:
            proc.stdout.close()


class WarmChild(Prestarted):
    """A Python child started before its run is due: it imports `preload` (torch, for a
    train.py that imports it), then waits for one line on its stdin that names the script and
    the whole environment to run it with, and runs it as `__main__` (`runpy`), so train.py's
    first line runs seconds after the go instead of after the imports.

    What differs from `python script`: the preloaded modules are imported before the script's
    first line, under the environment given here at start-up (`go` replaces the rest); so
    `warm_start_ok` refuses a script that sets environment variables (which torch may read at
    import). Tracebacks show two runpy frames above the script's.
    """

    def __init__(
        self,
        workdir: Path,
        env: Mapping[str, str],
        *,
        preload: Sequence[str] = WARM_PRELOAD,
        prefix: Sequence[str] = (),
        cell: sandbox.Cell | None = None,
    ) -> None:
        if cell is not None:  # boxed: the run's box, made now (its files are staged at the go)
            prefix, env = cell.prefix, cell.env(env)
        self.prefix = tuple(prefix)
        boot = [*prefix, sys.executable, "-c", _WARM_BOOT, json.dumps(list(preload))]
        try:
            super().__init__(boot, workdir, env)
        except BaseException:
            if cell is not None:
                cell.close()
            raise
        self.cell = cell

    def go(self, script: str, env: Mapping[str, str]) -> subprocess.Popen[bytes] | None:
        """Run `script` with `env` (the whole environment)."""
        return self._go({"script": script, "env": {**env, RUN_MARKER_VAR: self.marker}})

    def launch(
        self, command: Sequence[str], env: Mapping[str, str]
    ) -> subprocess.Popen[bytes] | None:
        assert list(command[:-1]) == [*self.prefix, sys.executable], "warm runs `python script`"
        return self.go(command[-1], env)


def warm_preload(source: str) -> tuple[str, ...]:
    """What a warm child imports for this train.py: the modules of WARM_PRELOAD's packages it
    imports at module level (dotted, in its order), plus WARM_COMPILER when it calls
    torch.compile; () when there is nothing worth preloading."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return ()
    modules: list[str] = []
    for stmt in tree.body:
        if isinstance(stmt, ast.Import):
            modules += [alias.name for alias in stmt.names]
        elif isinstance(stmt, ast.ImportFrom) and stmt.module and not stmt.level:
            modules.append(stmt.module)
    picked = [m for m in modules if m.split(".")[0] in WARM_PRELOAD]
    if any(m.split(".")[0] == "torch" for m in picked) and "torch.compile" in source:
        picked += WARM_COMPILER
    return tuple(dict.fromkeys(picked))


_ENV_WRITERS = {"putenv", "unsetenv", "update", "setdefault", "pop", "popitem", "clear"}


def warm_start_ok(source: str) -> bool:
    """Whether a train.py may run in a WarmChild: it parses and never writes the environment
    (`os.environ[...] = `, `del os.environ[...]`, `os.environ.update(...)`, `os.putenv(...)`
    and the like, anywhere in the file), since a variable it sets before `import torch` would
    come too late for a preloaded torch."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, (ast.Store, ast.Del)):
            if _names_environ(node.value):
                return False
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in ("putenv", "unsetenv"):
                return False
            if node.func.attr in _ENV_WRITERS and _names_environ(node.func.value):
                return False
    return True


def _names_environ(node: ast.expr) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "environ") or (
        isinstance(node, ast.Name) and node.id == "environ"
    )
