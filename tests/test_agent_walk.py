"""The walk "a new agent backend": an agent class defined in this file alone, registered by its
`name`, is an `--agent` choice, a valid `agent` setting, and runs a real session through the
CLI (in process, Typer's CliRunner) on a stub workspace: nothing else was edited for it. And a
built-in one: a module added to a copy of the package is a choice of that copy's CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from loopkit import fake_prepared_cache, make_workspace, results_rows, stub_bpb
from typer.testing import CliRunner

import autoresearch
from autoresearch import cli
from autoresearch.agent import (
    AgentExhausted,
    Context,
    Proposal,
    RegisteredAgent,
    agent_names,
    register,
    unregister,
)
from autoresearch.config import resolve


class HalvingAgent(RegisteredAgent):
    """Moves LR halfway to 0.08 each time; a new backend in a dozen lines."""

    name = "halving-test"
    model = "halving"
    summary = "a test agent: LR halfway to 0.08"

    def __init__(self) -> None:
        self.proposals = 0

    def propose(self, ctx: Context) -> Proposal:
        if self.proposals >= 2:
            raise AgentExhausted("two proposals are all this agent has")
        self.proposals += 1
        line = next(x for x in ctx.train_py.splitlines() if x.startswith("LR = "))
        lr = float(line.split()[2])
        new = f"LR = {lr + (0.08 - lr) / 2:.4f}  # learning rate"
        return Proposal(
            description=f"LR {lr:g} -> {new.split()[2]}",
            source=ctx.train_py.replace(line, new),
            messages=[],
            reply=new,
            model=self.model,
            attempts=1,
            tokens_in=0,
            tokens_out=0,
            seconds=0.0,
            agent=self.name,
        )

    def fix(self, ctx: Context, failed_source: str, crash_tail: str) -> Proposal:
        raise AgentExhausted("no repairs")


# Defining the class registered it; the registry is global, so it is a choice only while a
# test of this file runs (other files' tests see the built-in agents alone).
unregister(HalvingAgent.name)


@pytest.fixture
def registered() -> Iterator[str]:
    register(HalvingAgent)
    yield HalvingAgent.name
    unregister(HalvingAgent.name)  # the registry is global: leave it as found


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith(("AUTORESEARCH_", "OPENAI_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(fake_prepared_cache(tmp_path / "cache")))
    monkeypatch.setenv("AUTORESEARCH_SEALED", "0")  # the stub prints val_bpb, no checkpoint
    monkeypatch.setenv("AUTORESEARCH_TIME_BUDGET", "2")


def test_an_agent_defined_in_a_test_is_a_choice_and_a_setting(
    registered: str, tmp_path: Path
) -> None:
    assert registered in agent_names()
    assert resolve({"agent": registered}, tmp_path, env={}).agent_name == registered
    help_text = CliRunner(env={"COLUMNS": "250"}).invoke(cli.app, ["run", "--help"]).stdout
    assert registered in help_text


def test_an_agent_defined_in_a_test_runs_a_session_through_the_cli(
    registered: str, env: None, tmp_path: Path
) -> None:
    ws = make_workspace(tmp_path / "ws")
    args = ["run", "--tag", "walk", "--agent", registered, "--preset", "cpu", "--device", "cpu"]
    args += ["--calibrate", "1", "--no-warm-start", "--no-overlap", "--workspace", str(ws)]
    done = CliRunner().invoke(cli.app, args)
    assert done.exit_code == 0, (done.output, done.exception)

    rows = results_rows(ws, "walk")
    assert [r[3] for r in rows] == ["keep", "keep", "keep"]
    assert [float(r[1]) for r in rows] == [stub_bpb(0.04), stub_bpb(0.06), stub_bpb(0.07)]
    records = [json.loads(x) for x in (ws / "runs/walk/experiments.jsonl").read_text().splitlines()]
    assert [r["agent"].get("name") for r in records[1:]] == [registered, registered]
    # a session of one slot records its clocks (record.session_extra), and no slot or card
    assert {"session_s", "gpu_busy_s"} <= records[1]["extra"].keys()
    assert not {"slot", "card"} & records[1]["extra"].keys()
    session = json.loads((ws / "runs/walk/session.json").read_text())
    assert "two proposals are all this agent has" in session["end_reason"]


def test_defining_a_subclass_with_a_name_registers_it_and_a_taken_name_is_refused() -> None:
    class Quiet(RegisteredAgent):
        name = "quiet-test"

    try:
        assert agent_names()[-1] == "quiet-test"

        class Heir(Quiet):  # keeps its parent's name: not a second registration
            pass

        assert agent_names().count("quiet-test") == 1
        with pytest.raises(TypeError, match="taken"):

            class Impostor(RegisteredAgent):
                name = "tuner"
    finally:
        unregister("quiet-test")
    assert "quiet-test" not in agent_names() and "tuner" in agent_names()


BUILT_IN = """
from .base import RegisteredAgent


class ModuleWalkAgent(RegisteredAgent):
    name = "module-walk-test"
    summary = "a built-in agent added as one module"
"""


def test_a_module_added_to_the_agent_package_is_a_built_in_agent(tmp_path: Path) -> None:
    """The package copied, one module added to its agent/ and nothing else edited: the copy's
    registry and `run --help` have the agent, and the CLI still starts without the openai SDK
    (imported only when an agent is made)."""
    package = Path(autoresearch.__file__).parent
    copy = tmp_path / "autoresearch"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "agent" / "module_walk_test.py").write_text(BUILT_IN, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "COLUMNS": "250"}
    code = (
        "import sys, autoresearch, autoresearch.cli, autoresearch.agent as agent; "
        "print(autoresearch.__file__); print('|'.join(agent.agent_names())); "
        "print('openai' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    where, names, openai_loaded = done.stdout.splitlines()
    assert Path(where) == copy / "__init__.py"  # the copy, not the installed package
    assert names.split("|")[: len(agent_names())] == list(agent_names())
    assert names.split("|")[len(agent_names()) :] == ["module-walk-test"]
    assert openai_loaded == "False"
    shown = subprocess.run(
        [sys.executable, "-m", "autoresearch", "run", "--help"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert shown.returncode == 0, shown.stderr
    assert f"<{names}>" in shown.stdout.replace(" ", "")
