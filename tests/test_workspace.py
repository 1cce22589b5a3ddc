"""workspace: one rule for the cache directory and the active dataset, shared by `prepare`,
`run` and prepare.py; the notice for a workspace whose prepare.py is not the installed one."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from loopkit import cli, fake_prepared_cache, git, make_workspace, run_args
from prepare_helpers import write_text_corpus

import prepare
from autoresearch import fingerprint, presets, workspace
from autoresearch.errors import DataError

ROOT = Path(__file__).resolve().parents[1]


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


def _age_prepare_py(ws: Path) -> None:
    """Make the workspace's prepare.py an older copy than the installed template, committed."""
    (ws / "prepare.py").write_text((ws / "prepare.py").read_text() + "# an older copy\n")
    git(ws, "commit", "-qam", "an older prepare.py")


def test_a_prepare_py_unlike_the_template_is_named_with_the_update(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path / "ws")
    assert workspace.stale_prepare(ws) is None
    _age_prepare_py(ws)
    notice = workspace.stale_prepare(ws)
    assert notice is not None and "differs from the installed autoresearch's template" in notice
    assert "fingerprinted with the new prepare.py" in notice
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
    assert (ws / "prepare.py").read_bytes() == (ROOT / "prepare.py").read_bytes()


def test_while_a_session_runs_the_update_is_given_for_after_it(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path / "ws")
    _age_prepare_py(ws)
    notice = workspace.stale_prepare(ws, session_running=True)
    assert notice is not None and "To update it" not in notice
    assert "Once the running session has ended" in notice
    assert notice.split("update it: ", 1)[1].startswith("cp ")


def _stale_env(tmp_path: Path) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AUTORESEARCH_", "OPENAI_"))}
    return {
        **base,
        "AUTORESEARCH_CACHE": str(fake_prepared_cache(tmp_path / "cache")),
        "AUTORESEARCH_SEALED": "0",  # the stub prints val_bpb and saves no checkpoint
    }


def test_run_and_status_tell_of_a_stale_prepare_py(tmp_path: Path) -> None:
    """`run` names the update for after the session it starts; `status` names it plainly once
    the session has ended, and for after it while its process is alive."""
    ws = make_workspace(tmp_path / "ws")
    _age_prepare_py(ws)
    env = _stale_env(tmp_path)
    proc = cli(ws, *run_args("stale", "--agent", "tuner", "--calibrate", "1", n=1), env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    said = " ".join(proc.stdout.split())
    assert "differs from the installed autoresearch's template" in said
    assert "Once the running session has ended" in said and "To update it" not in said

    status = cli(ws, "status", "--tag", "stale", env={**env, "COLUMNS": "400"})
    assert status.returncode == 0, status.stdout + status.stderr
    assert "To update it: cp " in " ".join(status.stdout.split())

    session = ws / "runs" / "stale" / "session.json"
    record = json.loads(session.read_text())
    record.pop("end_reason", None)
    session.write_text(json.dumps({**record, "pid": os.getpid()}))  # alive: "running"
    status = cli(ws, "status", "--tag", "stale", env={**env, "COLUMNS": "400"})
    assert status.returncode == 0, status.stdout + status.stderr
    said = " ".join(status.stdout.split())
    assert "running (pid" in said and "Once the running session has ended" in said
    assert "To update it" not in said


# ------------------------------------------------------------------------------------------------
# templates: the repository's top-level files are the only source
# ------------------------------------------------------------------------------------------------

SOURCES = ("train.py", "prepare.py", "program.md")


@pytest.mark.parametrize("name", SOURCES)
def test_the_package_template_is_the_top_level_file(name: str) -> None:
    """autoresearch/templates/<name> is a link to the top-level file, not a second copy."""
    link = workspace.TEMPLATES / name
    assert link.is_symlink()
    assert link.resolve() == (ROOT / name).resolve()


def test_a_new_workspace_gets_the_top_level_files(tmp_path: Path) -> None:
    ws = workspace.init_workspace(tmp_path / "ws")
    for name in SOURCES:
        assert (ws / name).read_bytes() == (ROOT / name).read_bytes(), name
        assert not (ws / name).is_symlink()
    assert (ws / "program.md").read_bytes() != (
        workspace.TEMPLATES / workspace.EXTERNAL_PROGRAM
    ).read_bytes()


def test_a_wheel_ships_the_templates_contents(tmp_path: Path) -> None:
    """Built from a copy of the source tree (links kept as links), the wheel holds the three
    files as regular files with the top-level contents, so an installed tool can init; and
    every module of the package (a subpackage left out of pyproject.toml installs broken)."""
    src = tmp_path / "src"
    shutil.copytree(
        ROOT / "autoresearch",
        src / "autoresearch",
        symlinks=True,
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    for name in ("pyproject.toml", "README.md", *SOURCES):
        shutil.copy2(ROOT / name, src / name)
    assert (src / "autoresearch" / "templates" / "train.py").is_symlink()
    out = tmp_path / "dist"
    build = (
        "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", build, str(out)], cwd=src, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    wheel = out / done.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(wheel) as z:
        for name in SOURCES:
            info = z.getinfo(f"autoresearch/templates/{name}")
            assert stat.S_ISREG(info.external_attr >> 16), name  # a file, not a link
            assert z.read(info) == (ROOT / name).read_bytes(), name
        shipped = set(z.namelist())
    modules = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "autoresearch").rglob("*.py")
        if "templates" not in p.parts and "__pycache__" not in p.parts
    }
    assert modules and modules <= shipped, sorted(modules - shipped)


# ------------------------------------------------------------------------------------------------
# prepare.py's presets, read without importing it
# ------------------------------------------------------------------------------------------------


def test_presets_read_from_the_source_are_the_imported_ones() -> None:
    assert workspace.read_presets(ROOT) == workspace.load_prepare(ROOT).PRESETS


def _imported_time_budget(monkeypatch: pytest.MonkeyPatch, value: str) -> float | str:
    """prepare.py's own check: TIME_BUDGET of the real prepare.py imported with `value` set,
    or the message of the error its import raises."""
    monkeypatch.setenv("AUTORESEARCH_TIME_BUDGET", value)
    monkeypatch.setenv("AUTORESEARCH_PRESET", "cpu")
    previous = sys.modules.get("prepare")
    try:
        return workspace.load_prepare(ROOT).TIME_BUDGET
    except DataError as exc:
        return str(exc)
    finally:  # the module imported with this budget must not serve later imports
        if previous is None:
            sys.modules.pop("prepare", None)
        else:
            sys.modules["prepare"] = previous


@pytest.mark.parametrize(
    "value", ["5", " 2.5 ", "1e-3", "300", "soon", "0", "-1", "nan", "inf", "1e400", " "]
)
def test_the_time_budget_read_without_the_import_is_the_imported_one(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """preset_constants checks AUTORESEARCH_TIME_BUDGET without importing prepare.py (and
    torch): the same seconds, or the same message, as prepare.py's check at import."""
    imported = _imported_time_budget(monkeypatch, value)
    try:
        read: float | str = presets.preset_constants(ROOT, "cpu")["TIME_BUDGET"]
    except DataError as exc:
        read = str(exc)
    if not value.strip():  # unset for both: the preset's own
        assert read == imported == prepare.PRESETS["cpu"]["TIME_BUDGET"]
    assert read == imported
    assert isinstance(read, str) == (value.strip() in ("soon", "0", "-1", "nan", "inf", "1e400"))


def test_a_time_budget_is_checked_without_importing_torch() -> None:
    probe = (
        "import sys; from pathlib import Path; from autoresearch.presets import preset_constants;"
        f" c = preset_constants(Path({str(ROOT)!r}), 'cpu');"
        " print(c['TIME_BUDGET'], 'torch' in sys.modules, 'prepare' in sys.modules)"
    )
    env = {**os.environ, "AUTORESEARCH_TIME_BUDGET": "7"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["7.0", "False", "False"], out.stderr


@pytest.mark.parametrize(
    "name",
    [
        '"AUTORESEARCH_" + "TIME_BUDGET"',  # not a literal
        '"ARCH_BUDGET"',  # another variable: this package's check is not that prepare.py's
    ],
)
def test_a_prepare_py_naming_its_budget_otherwise_is_imported_to_check_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    (tmp_path / "prepare.py").write_text(
        f'PRESETS = {{"cpu": {{"TIME_BUDGET": 25}}}}\nTIME_BUDGET_ENV = {name}\n'
        'raise RuntimeError("imported")\n'
    )
    monkeypatch.delenv("AUTORESEARCH_TIME_BUDGET", raising=False)
    assert presets.preset_constants(tmp_path, "cpu") == {"TIME_BUDGET": 25}  # no budget: read
    monkeypatch.setenv("AUTORESEARCH_TIME_BUDGET", "5")
    with pytest.raises(RuntimeError, match="imported"):
        presets.preset_constants(tmp_path, "cpu")


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ('PRESETS: dict = {"cpu": {"A": 2**4, "B": -3 * 2.5}}\n', {"cpu": {"A": 16, "B": -7.5}}),
        ('PRESETS = {"cpu": {"A": 1}}\nPRESETS = {"cpu": {"A": 2}}\n', None),  # assigned again
        ('PRESETS = {"cpu": {"A": 1}}\nPRESETS["cpu"]["A"] = 2\n', None),  # changed after
        ('PRESETS = {"cpu": {"A": 1}}\nPRESETS.update(gpu={"A": 2})\n', None),
        ('PRESETS = {"cpu": {"A": 1}}\ndef f():\n    return PRESETS\n', {"cpu": {"A": 1}}),
        ('PRESETS = dict(cpu={"A": 1})\n', None),  # a call: only importing it can say
        ('N = 3\nPRESETS = {"cpu": {"A": N}}\n', None),  # a name
        ('PRESETS = {"cpu": {"A": True}}\n', None),  # not a number
        ('PRESETS = {"cpu": 1}\n', None),  # not a table of tables
        ("X = 1\n", None),
        ("def broken(:\n", None),
    ],
)
def test_presets_not_plain_numbers_are_left_to_the_import(
    tmp_path: Path, source: str, expected: dict | None
) -> None:
    (tmp_path / "prepare.py").write_text(source)
    assert workspace.read_presets(tmp_path) == expected
