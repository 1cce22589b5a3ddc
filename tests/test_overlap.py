"""Proposing while training: the next edit is asked for during the current run, re-applied to
a new best when the run is kept, and asked for again when it no longer applies."""

from __future__ import annotations

import json
import os
from pathlib import Path

from fakellm import FakeLLM
from loopkit import (
    STUB_TRAIN,
    cli,
    fake_prepared_cache,
    git,
    make_workspace,
    openai_args,
    reply,
    run_args,
)

LR = "LR = {}  # learning rate"
WIDTH = "WIDTH = {}  # model width"


def test_next_edit_is_prepared_during_training_and_rebased(tmp_path: Path) -> None:
    # A line between LR and WIDTH: a three-way merge treats edits of adjacent lines as a conflict.
    stub = STUB_TRAIN.replace("SLEEP = 0.0", "SLEEP = 0.3")
    stub = stub.replace(LR.format(0.04) + "\n", LR.format(0.04) + "\n# size\n")
    ws = make_workspace(tmp_path / "ws", stub)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTORESEARCH_", "OPENAI_"))}
    env.update(
        AUTORESEARCH_CACHE=str(fake_prepared_cache(tmp_path / "cache")),
        OPENAI_API_KEY="k",
        AUTORESEARCH_SEALED="0",  # the stub prints its number; no model to evaluate
    )
    with FakeLLM() as server:
        # exp 2, asked while the baseline trains.
        server.enqueue(reply("LR to 0.06", (LR.format(0.04), LR.format(0.06))))
        # exp 3, asked while exp 2 trains, against the baseline; re-applied onto exp 2.
        server.enqueue(reply("WIDTH to 128", (WIDTH.format(64), WIDTH.format(128))))
        # exp 4, asked while exp 3 trains, against exp 2: conflicts with exp 3's WIDTH line.
        server.enqueue(reply("WIDTH to 256", (WIDTH.format(64), WIDTH.format(256))))
        # ... so it is asked again, against exp 3.
        server.enqueue(reply("WIDTH to 256 again", (WIDTH.format(128), WIDTH.format(256))))
        args = run_args("o", *openai_args(server.base_url), "--calibrate", "1", n=4)
        proc = cli(ws, *args, env=env)
        assert proc.returncode == 0, proc.stderr + proc.stdout
        assert server.pending() == 0 and len(server.requests) == 4
        prompts = [json.dumps(r["messages"]) for r in server.requests]
    assert "(training now)" not in prompts[0]  # the baseline is not a candidate
    assert "(training now)" in prompts[1] and "(training now)" in prompts[2]
    assert "(training now)" not in prompts[3]  # asked after exp 3 finished
    assert "no longer applies" in proc.stdout
    recs = [json.loads(line) for line in (ws / "runs/o/experiments.jsonl").read_text().splitlines()]
    assert [r["status"] for r in recs] == ["keep", "keep", "keep", "keep"]
    assert [r["description"] for r in recs[1:]] == [
        "LR to 0.06",
        "WIDTH to 128",
        "WIDTH to 256 again",
    ]
    assert recs[2]["agent"]["rebased_from"] == recs[0]["commit"]
    source = git(ws, "show", f"{recs[2]['commit']}:train.py")
    assert LR.format(0.06) in source and WIDTH.format(128) in source
    assert recs[3]["agent"]["rebased_from"] is None
    assert git(ws, "rev-parse", "HEAD") == recs[3]["commit"]
