"""Budgets end a session cleanly, and the record says which one did."""

from __future__ import annotations

import json
import os
from pathlib import Path

from fakellm import FakeLLM
from loopkit import STUB_TRAIN, cli, fake_prepared_cache, git, make_workspace, reply, run_args


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTORESEARCH_", "OPENAI_"))}
    env.update(
        AUTORESEARCH_CACHE=str(fake_prepared_cache(tmp_path / "cache")),
        AUTORESEARCH_SEALED="0",  # the stub prints its number; no model to evaluate
        OPENAI_API_KEY="k",
    )
    return env


def _session(ws: Path, tag: str) -> dict:
    return json.loads((ws / "runs" / tag / "session.json").read_text())


def test_max_cost_stops_the_session_and_is_recorded(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path / "ws")
    # A price from the workspace's config: $1000 per 1M tokens, so one proposal costs ~$1.
    (ws / "pyproject.toml").write_text(
        '[tool.autoresearch]\nprices = { "fake-model" = { input = 1000.0, output = 1000.0 } }\n'
    )
    git(ws, "add", "pyproject.toml")
    git(ws, "commit", "-qm", "prices")
    with FakeLLM() as server:
        for lr in ("0.06", "0.07", "0.08"):
            server.enqueue(
                reply(f"LR {lr}", ("LR = 0.04  # learning rate", f"LR = {lr}  # learning rate"))
            )
        # no --agent: a base URL makes the openai agent the default
        endpoint = ["--base-url", server.base_url, "--model", "fake-model"]
        args = run_args("c", *endpoint, "--max-cost", "0.5", "--no-overlap", n=10)
        proc = cli(ws, *args, env=_env(tmp_path))
        assert proc.returncode == 0, proc.stderr + proc.stdout
        assert len(server.requests) == 1  # the budget was spent by the first proposal
    recs = [json.loads(line) for line in (ws / "runs/c/experiments.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and recs[1]["extra"]["cost_usd"] > 0.5
    assert _session(ws, "c")["end_reason"].startswith("reached --max-cost 0.5 USD")
    assert git(ws, "status", "--porcelain") == ""


def test_max_hours_stops_the_session_and_is_recorded(tmp_path: Path) -> None:
    # The baseline trains for 4.5 s, past the 3.6 s that 0.001 hours allow; one run of it (the
    # cpu preset's default calibrates with two, 9 s, which the limit does not need).
    ws = make_workspace(tmp_path / "ws", STUB_TRAIN.replace("SLEEP = 0.0", "SLEEP = 1.5"))
    args = run_args("h", "--agent", "tuner", "--max-hours", "0.001", "--calibrate", "1")
    proc = cli(ws, *args, env=_env(tmp_path))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert len((ws / "runs/h/experiments.jsonl").read_text().splitlines()) == 1  # the baseline
    assert _session(ws, "h")["end_reason"] == "reached --max-hours 0.001"
