"""Workspaces: the git repository holding program.md, prepare.py and train.py.

Guarantees: `find_workspace` only returns a directory that has all three files and is a git
repository, and finds it from any directory below it too; `init_workspace` never overwrites
an existing file; `data_manifest` reads the prepared dataset's manifest without importing
prepare.py (so no torch import, no side effects), checks that every file it names exists,
and says what to run when the data is missing; `load_prepare` turns prepare.py's own
PrepareError (a bad AUTORESEARCH_TIME_BUDGET, say) into a DataError.
"""

from __future__ import annotations

import ast
import json
import operator
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from .errors import DataError, WorkspaceError
from .gitrepo import init_repository

WORKSPACE_FILES = ("program.md", "prepare.py", "train.py")
TRAIN_FILE = "train.py"
RUNS_DIR = "runs"
TEMPLATES = Path(__file__).parent / "templates"  # shipped as package data

GITIGNORE = """\
__pycache__/
*.pyc
.venv/
runs/
"""


def template_text(name: str) -> str:
    """The pristine copy of a workspace file shipped with the package."""
    return (TEMPLATES / name).read_text(encoding="utf-8")


def stale_prepare(root: Path, *, session_running: bool = False) -> str | None:
    """What to tell the user when the workspace's prepare.py is not the installed tool's
    template (a copy from an older version, or edited by hand): the command that updates it,
    and what the update does to sessions' fingerprints. None when they are the same bytes.

    With `session_running` (a session is running, or is about to start in this process) the
    command is given for after that session: a sealed session fingerprints prepare.py, so
    changing it mid-session stops the session."""
    ours, template = root / "prepare.py", TEMPLATES / "prepare.py"
    if ours.read_bytes() == template.read_bytes():
        return None
    update = (
        f"cp {template.resolve()} {ours} && git -C {root} commit -m 'prepare.py: the installed"
        " template' prepare.py"
    )
    when = (
        "Once the running session has ended (a sealed session fingerprints prepare.py:"
        " changing it now stops the session), update it"
        if session_running
        else "To update it"
    )
    return (
        f"{ours} differs from the installed autoresearch's template (an older copy, or edited"
        " by hand); data prepared or read by it may not match this version. Sealed sessions"
        " started after an update are fingerprinted with the new prepare.py (their val_bpb may not"
        " compare with earlier sessions'); a session started before keeps its copy on its"
        " autoresearch/<tag> branch, and its `--resume` stops if that copy changes, so commit"
        f" the update on the branch you start sessions from. {when}: {update}"
    )


def find_workspace(path: Path | None = None) -> Path:
    """The workspace at `path`, or, without one, the current directory or the nearest
    directory above it that is one (as git finds its repository), checked."""
    if path is not None:
        return _check_workspace(Path(path).resolve())
    here = Path.cwd().resolve()
    for candidate in (here, *here.parents):
        if all((candidate / name).is_file() for name in WORKSPACE_FILES):
            return _check_workspace(candidate)
    return _check_workspace(here)  # none above either: say what the current one lacks


def _check_workspace(root: Path) -> Path:
    if not root.is_dir():
        raise WorkspaceError(f"workspace {root} does not exist")
    missing = [name for name in WORKSPACE_FILES if not (root / name).is_file()]
    if missing:
        raise WorkspaceError(
            f"{root} is not an autoresearch workspace (missing {', '.join(missing)}): "
            "run the command inside one, pass --workspace DIR, or create one with "
            "`autoresearch init DIR`"
        )
    if not (root / ".git").exists():
        raise WorkspaceError(
            f"{root} is not a git repository: run `git init && git add -A && git commit -m init` there"
        )
    return root


# program.md's template for a coding agent that edits train.py and calls `autoresearch try`
EXTERNAL_PROGRAM = "program-external.md"


def init_workspace(target: Path, *, program: str = "program.md") -> Path:
    """Create a new workspace: a git repository with the three files and a .gitignore;
    program.md is copied from the template named `program` (EXTERNAL_PROGRAM: the brief for
    an outside coding agent)."""
    target = target.resolve()
    existing = [n for n in (*WORKSPACE_FILES, ".gitignore") if (target / n).exists()]
    if existing:
        raise WorkspaceError(
            f"{target} already has {', '.join(existing)}: choose an empty or new directory"
        )
    if shutil.which("git") is None:
        raise WorkspaceError(
            "git is not installed: install git, then run `autoresearch init` again"
        )
    target.mkdir(parents=True, exist_ok=True)
    for name in WORKSPACE_FILES:
        source = program if name == "program.md" else name
        (target / name).write_text(template_text(source), encoding="utf-8")
    (target / ".gitignore").write_text(GITIGNORE, encoding="utf-8")
    init_repository(
        target,
        [*WORKSPACE_FILES, ".gitignore"],
        "autoresearch workspace: program.md, prepare.py, train.py",
    )
    return target


CACHE_ENV = "AUTORESEARCH_CACHE"  # root of all prepared data
DATASET_ENV = "AUTORESEARCH_DATASET"  # the dataset in use, overriding <cache>/ACTIVE
ACTIVE_FILE = "ACTIVE"
MANIFEST_FILE = "manifest.json"


def cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where prepared data lives: AUTORESEARCH_CACHE (`~` expanded), else ~/.cache/autoresearch.

    The one rule for the tool; prepare.py's `cache_root` follows the same one (a test holds
    them together), so what `prepare` writes is what `run` and train.py read.
    """
    env = os.environ if env is None else env
    root = env.get(CACHE_ENV, "").strip()
    return Path(root).expanduser() if root else Path.home() / ".cache" / "autoresearch"


PREPARE_HINT = (
    "run `autoresearch prepare` (or `autoresearch prepare --source stdlib` offline) first"
)


def active_dataset(env: Mapping[str, str] | None = None) -> Path:
    """The directory of the dataset in use: AUTORESEARCH_DATASET, else the name in
    <cache>/ACTIVE; DataError saying what to run when there is none or it has no manifest."""
    env = os.environ if env is None else env
    root = cache_dir(env)
    name = env.get(DATASET_ENV, "").strip()
    if not name:
        try:
            name = (root / ACTIVE_FILE).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            name = ""
    if not name:
        raise DataError(f"no prepared data in {root}: {PREPARE_HINT}")
    if "/" in name or "\\" in name or name in (".", ".."):
        raise DataError(f"bad dataset name {name!r}: expected a directory name in {root}")
    if not (root / name / MANIFEST_FILE).is_file():
        raise DataError(f"no prepared data in {root / name} (no manifest): {PREPARE_HINT}")
    return root / name


def _manifest_path(env: Mapping[str, str]) -> Path:
    return active_dataset(env) / MANIFEST_FILE


def _load(manifest: Path) -> dict:
    try:
        return json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {manifest} ({exc}): {PREPARE_HINT}") from exc


def read_manifest(env: Mapping[str, str] | None = None) -> dict:
    """The active dataset's manifest as written; DataError saying what to run when there is none."""
    return _load(_manifest_path(os.environ if env is None else env))


def data_manifest(env: Mapping[str, str] | None = None) -> dict:
    """The active dataset's manifest, once every file it names is there."""
    manifest = _manifest_path(os.environ if env is None else env)
    data = _load(manifest)
    for file in _named_files(data):
        if not (manifest.parent / file).is_file():
            raise DataError(
                f"{manifest.parent / file} is missing: run `autoresearch prepare --force` "
                "(it rebuilds the active dataset from its recorded source and options)"
            )
    return data


def _named_files(manifest: dict) -> list[str]:
    """The files a manifest names: tokenizer, token_bytes and every split's shards."""
    entries = [manifest.get("tokenizer"), manifest.get("token_bytes")]
    for split in (manifest.get("splits") or {}).values():
        entries += split.get("shards", []) if isinstance(split, dict) else []
    return [e["file"] for e in entries if isinstance(e, dict) and isinstance(e.get("file"), str)]


PRESETS_NAME = "PRESETS"  # prepare.py's table of presets: {name: {constant: number}}
_ARITHMETIC = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Pow: operator.pow,
}


def prepare_assignment(root: Path, name: str) -> ast.expr | None:
    """The expression prepare.py assigns to `name`, read from its source without running it:
    None unless exactly one module-level statement names `name` (function bodies only run when
    called) and that statement is `name = <expr>` (so nothing changes it after). The caller
    then imports prepare.py, which also says what is wrong with a file that does not parse."""
    try:
        tree = ast.parse((root / "prepare.py").read_bytes())
    except (OSError, SyntaxError, ValueError):
        return None
    naming = [
        node
        for node in tree.body
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        and any(isinstance(n, ast.Name) and n.id == name for n in ast.walk(node))
    ]
    if len(naming) != 1 or not isinstance(naming[0], (ast.Assign, ast.AnnAssign)):
        return None  # changed or used after its assignment, or never assigned
    node = naming[0]
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    if len(targets) != 1 or not isinstance(targets[0], ast.Name) or targets[0].id != name:
        return None
    return node.value


def read_presets(root: Path) -> dict[str, dict[str, int | float]] | None:
    """prepare.py's PRESETS read from its source without running it (running it imports
    torch, two CPU seconds a command that only needs the table does not have to spend).

    Reads the module-level `PRESETS = {...}` of string keys and numbers, with + - * / // **
    between numbers (`40 * 524288`, `2**16`), when no other module-level statement names
    PRESETS (so nothing changes it after). None otherwise: the caller then imports prepare.py
    (`load_prepare`), as for any other name.
    """
    value = prepare_assignment(root, PRESETS_NAME)
    if value is None:
        return None
    try:
        table = _constant(value)
    except ValueError:
        return None
    ok = isinstance(table, dict) and all(
        isinstance(name, str) and isinstance(values, dict) for name, values in table.items()
    )
    return table if ok else None


def _constant(node: ast.expr) -> object:
    """The value of a literal of dicts, strings and numbers with arithmetic; ValueError for
    anything else (a name, a call)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float)):
        if isinstance(node.value, bool):
            raise ValueError("not a number")
        return node.value
    if isinstance(node, ast.Dict) and None not in node.keys:
        return {_constant(k): _constant(v) for k, v in zip(node.keys, node.values, strict=True)}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _number(_constant(node.operand))
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
        left, right = _number(_constant(node.left)), _number(_constant(node.right))
        return _ARITHMETIC[type(node.op)](left, right)
    raise ValueError(f"not a constant: {ast.dump(node)[:80]}")


def _number(value: object) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("not a number")
    return value


def load_prepare(root: Path):
    """Import the workspace's prepare.py (the trusted side) as a module.

    Only the harness and train.py import it; it has no side effects at import. Importing it
    imports torch, so commands call this only when they need the preset's constants.
    """
    import importlib.util
    import sys

    path = root / "prepare.py"
    spec = importlib.util.spec_from_file_location("prepare", path)
    if spec is None or spec.loader is None:
        raise WorkspaceError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    previous = sys.modules.get("prepare")
    sys.modules["prepare"] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        # a module that failed half-way must not stand in for prepare.py afterwards
        if previous is None:
            sys.modules.pop("prepare", None)
        else:
            sys.modules["prepare"] = previous
        # prepare.py checks its environment at import (AUTORESEARCH_TIME_BUDGET, ...) and
        # raises its own PrepareError, a class this package cannot import beforehand: that
        # one is the user's to fix and joins the error family; anything else is a bug.
        prepare_error = getattr(module, "PrepareError", None)
        if isinstance(prepare_error, type) and isinstance(exc, prepare_error):
            raise DataError(f"{path}: {exc}") from exc
        raise
    return module
