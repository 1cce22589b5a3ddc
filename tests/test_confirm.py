"""`autoresearch confirm --horizon K`: the baseline and the best trained again for K x
TIME_BUDGET with the same seeds, evaluated on val and test, the answer recorded.

Uses test_sealed's real tiny trainer on the prepared stdlib data (real subprocesses for the
runs and the sealed evaluator)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_sealed import MORE_STEPS, TAG, Scripted, cache, edit, session, ws  # noqa: F401  (fixtures)

from autoresearch.horizon import FILE, verdict

SEEDED = (
    'def build_model(device="cpu"):\n    torch.manual_seed(SEED)\n',
    'def build_model(device="cpu"):\n'
    "    print('seed', os.environ.get('AUTORESEARCH_SEED'), 'budget',"
    " os.environ.get('AUTORESEARCH_TIME_BUDGET'))\n"
    "    torch.manual_seed(SEED)\n",
)


@pytest.mark.slow
def test_confirm_horizon_trains_both_with_paired_seeds_and_records_the_answer(
    cache: Path,  # noqa: F811
    ws: Path,  # noqa: F811
) -> None:
    steps = [("more steps", lambda s: edit(s, MORE_STEPS, SEEDED))]
    # generous limits: 40 steps on a busy machine must not become over_budget here
    session(ws, Scripted(steps), time_budget=5.0, budget_grace=300.0, startup_limit=600.0).run()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "COLUMNS": "120"}
    proc = subprocess.run(
        [sys.executable, "-m", "autoresearch", "confirm", "--tag", TAG, "--horizon", "2",
         "--seeds", "2", "--workspace", str(ws)],
        cwd=ws, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads((ws / "runs" / TAG / FILE).read_text())
    assert record["horizon"] == 2 and record["time_budget"] == 10.0  # 2 x the session's 5 s
    assert [(r["role"], r["seed"]) for r in record["runs"]] == [
        ("baseline", 1000),
        ("best", 1000),
        ("baseline", 1001),
        ("best", 1001),
    ]
    assert all(r["status"] == "ok" for r in record["runs"])
    # the best (40 steps against 6) is better on both splits: the gain holds
    assert record["val_gain"] > 0 and record["test_gain"] > 0 and record["holds"] is True
    assert record["session_gain"] > 0
    assert "holds" in proc.stdout
    # the child saw the seed and the longer budget
    log = (ws / "runs" / TAG / "confirm" / "horizon-best-1001.log").read_text()
    assert "seed 1001 budget 10" in log


def test_verdict_needs_both_splits_and_every_run() -> None:
    def run(role: str, seed: int, val: float, test: float, status: str = "ok") -> dict:
        return {"role": role, "seed": seed, "status": status, "val_bpb": val, "test_bpb": test}

    runs = [run("baseline", 1000, 1.0, 1.1), run("best", 1000, 0.9, 1.0)]
    assert verdict(runs, 1.0, 0.95) == {
        "session_gain": pytest.approx(0.05),
        "val_gain": pytest.approx(0.1),
        "test_gain": pytest.approx(0.1),
        "holds": True,
    }
    reversed_test = [run("baseline", 1000, 1.0, 1.0), run("best", 1000, 0.9, 1.05)]
    assert verdict(reversed_test, 1.0, 0.95)["holds"] is False
    failed = [run("baseline", 1000, 1.0, 1.0), run("best", 1000, 0.0, 0.0, status="crash")]
    assert verdict(failed, 1.0, 0.95)["holds"] is None
