"""The README's first quick-start command, minus the install: a fresh workspace, the offline
stdlib corpus, and five experiments of the real train.py on the CPU with the tuner agent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from loopkit import git, results_rows

from autoresearch.workspace import init_workspace


@pytest.mark.slow
def test_tuner_session_on_cpu_completes_unattended(tmp_path: Path, stdlib_prepared: Path) -> None:
    ws = init_workspace(tmp_path / "ws")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTORESEARCH_", "OPENAI_"))}
    env["AUTORESEARCH_CACHE"] = str(stdlib_prepared)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "autoresearch",
            "run",
            "--agent",
            "tuner",
            "--preset",
            "cpu",
            "--max-experiments",
            "5",
            "--tag",
            "qs",
        ],
        cwd=ws,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = results_rows(ws, "qs")
    assert len(rows) == 5
    assert rows[0][3] == "keep" and rows[0][4] == "baseline"
    statuses = [r[3] for r in rows]
    assert set(statuses) <= {"keep", "discard", "crash"}
    baseline = float(rows[0][1])
    assert 0.5 < baseline < 4.0  # a real model's val_bpb, well below the uniform model's
    status = json.loads(
        subprocess.run(
            [sys.executable, "-m", "autoresearch", "status", "--json"],
            cwd=ws,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert status["baseline_bpb"] == pytest.approx(baseline, abs=1e-6)  # the tsv rounds to 6 places
    assert status["best"]["val_bpb"] <= status["baseline_bpb"]
    assert git(ws, "rev-parse", "HEAD") == status["best"]["commit"]
    assert git(ws, "status", "--porcelain") == ""
