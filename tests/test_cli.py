"""The CLI as a newcomer meets it, in process through Typer's CliRunner (and `main`, which
turns the error family into one line): --version, help without `<bool>` and with its literal
brackets, `config`, and one-line errors that keep every character of their message."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from loopkit import make_workspace
from typer.testing import CliRunner

from autoresearch import __version__, cli
from autoresearch.agent import agent_names
from autoresearch.ledger import Experiment, Ledger

runner = CliRunner(env={"COLUMNS": "200"})  # help and tables unwrapped
TABLE = "[tool.autoresearch]"


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    return make_workspace(tmp_path / "ws")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith(("AUTORESEARCH_", "OPENAI_")):
            monkeypatch.delenv(key)


def test_version() -> None:
    done = runner.invoke(cli.app, ["--version"])
    assert done.exit_code == 0
    assert done.stdout.strip() == f"autoresearch {__version__}"


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["status", "--help"]])
def test_help_shows_no_type_after_flags(args: list[str]) -> None:
    done = runner.invoke(cli.app, args)
    assert done.exit_code == 0
    assert "--help" in done.stdout
    assert "<bool>" not in done.stdout


def test_run_help_keeps_its_brackets_and_groups_its_options() -> None:
    done = runner.invoke(cli.app, ["run", "--help"])
    assert done.exit_code == 0
    text = " ".join(done.stdout.split())
    assert f"then from {TABLE} in the workspace's pyproject.toml" in text
    for panel in (cli.AGENT_PANEL, cli.LIMITS_PANEL, cli.HARDWARE_PANEL, cli.KEEP_PANEL):
        assert re.search(rf"─ {panel} ─", done.stdout), panel
    # an Enum choice, shown as such: every registered agent
    assert f"<{'|'.join(agent_names())}>" in text.replace(" ", "")


def test_config_shows_the_table_name(ws: Path, clean_env: None) -> None:
    (ws / "pyproject.toml").write_text(f'{TABLE}\nmax_hours = 8\nmodel = "[x] model"\n')
    done = runner.invoke(cli.app, ["config", "--workspace", str(ws)])
    assert done.exit_code == 0, done.stdout
    rows = {line.split("│")[1].strip(): line for line in done.stdout.splitlines() if "│" in line}
    assert f"pyproject.toml {TABLE}" in rows["max_hours"]
    assert "[x] model" in rows["model"]  # a value is shown as written, brackets and all
    assert f"pyproject.toml {TABLE} > default." in done.stdout


def main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str):
    """`autoresearch ARGS` through the real entry point: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["autoresearch", *args])
    with pytest.raises(SystemExit) as stopped:
        cli.main()
    out = capsys.readouterr()
    return stopped.value.code, out.out, out.err


def test_an_error_is_one_line_with_its_brackets(
    ws: Path, clean_env: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    (ws / "pyproject.toml").write_text(f"{TABLE}\nmax_hours = -1\n")
    code, _, err = main(monkeypatch, capsys, "config", "--workspace", str(ws))
    assert code == 2
    assert err.strip().splitlines() == [
        f"error: max_hours = -1 from pyproject.toml {TABLE}: expected a number > 0"
    ]


def test_a_bad_time_budget_is_an_error_not_a_traceback(
    ws: Path, clean_env: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """prepare.py refuses it at import with its own PrepareError: one line, exit 2."""
    monkeypatch.setenv("AUTORESEARCH_TIME_BUDGET", "soon")
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(ws.parent / "cache"))
    code, _, err = main(
        monkeypatch, capsys, "prepare", "--source", "stdlib", "--workspace", str(ws)
    )
    assert code == 2
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert "AUTORESEARCH_TIME_BUDGET='soon' is not a positive number of seconds" in err


def test_commands_find_the_workspace_from_a_subdirectory(
    ws: Path, clean_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    deep = ws / "notes" / "ideas"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    done = runner.invoke(cli.app, ["config"])
    assert done.exit_code == 0, done.stdout
    assert f"settings for {ws}" in done.stdout


def test_outside_a_workspace_the_error_says_what_to_do(
    tmp_path: Path, clean_env: None, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = main(monkeypatch, capsys, "status")
    assert code == 1
    assert "is not an autoresearch workspace" in err and "autoresearch init DIR" in err


def test_readme_gives_the_cpu_torch_command_before_the_install() -> None:
    """A copy-paster on a laptop meets the CPU build's command before `pip install -e .`, and
    the quick start still has exactly its two commands: the one line that installs and runs,
    and the tests."""
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", quick_start, re.S)
    assert len(blocks) == 2
    cpu = "pip install torch --index-url https://download.pytorch.org/whl/cpu"
    assert quick_start.index(cpu) < quick_start.index("pip install -e .")
    quick = blocks[0].strip()
    assert quick.startswith("python3 -m venv .venv && .venv/bin/pip install -e . && ")
    assert "prepare --source stdlib" in quick and "run --max-experiments 5" in quick
    assert blocks[1].strip().endswith("python -m pytest")


def test_status_tells_a_killed_session_from_a_live_one(ws: Path, clean_env: None) -> None:
    """No end reason recorded: the session's process alive means running; gone, killed."""
    run_dir = ws / "runs" / "t1"
    Ledger(run_dir).append(
        Experiment(1, "keep", "baseline", "a" * 40, "a" * 40, 1.0, 0.0, None, 0.0)
    )
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # reaped: its pid names no process now
    for pid, said in (
        (os.getpid(), f"running (pid {os.getpid()})"),
        (gone.pid, "the session was killed; continue it with `autoresearch run --resume --tag t1`"),
    ):
        Ledger(run_dir).update_session(tag="t1", preset="cpu", pid=pid, end_reason=None)
        done = runner.invoke(cli.app, ["status", "--workspace", str(ws)])
        assert done.exit_code == 0, done.stdout
        assert said in done.stdout
    Ledger(run_dir).update_session(end_reason="reached --max-experiments 1")
    done = runner.invoke(cli.app, ["status", "--json", "--workspace", str(ws)])
    assert json.loads(done.stdout)["state"] == "ended"
