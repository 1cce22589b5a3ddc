"""bench/keep_rule.py and bench/noise.py: the simulation drives the real keep rule, and the
noise table computes its spreads from the runs it is given."""

from __future__ import annotations

import json
import math
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import keep_rule  # noqa: E402
import noise as bench_noise  # noqa: E402

from autoresearch import noise  # noqa: E402


def test_the_simulation_judges_with_the_loops_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = noise.judge

    def spy(gains, **kwargs):
        calls.append(list(gains))
        return real(gains, **kwargs)

    monkeypatch.setattr(noise, "judge", spy)
    out = keep_rule.session_paired(keep_rule.Model(), [0.0, 0.05], random.Random(1))
    assert calls and out[1][0] == "keep"  # a 0.05 gain is ~12 sigma of a paired gain
    assert out[-1][1] >= 3 + 2  # the calibration runs and at least one run per candidate


def test_a_large_effect_is_always_kept_and_none_is_rarely() -> None:
    model = keep_rule.Model(sigma_run=0.001, sigma_seed=0.001)
    rows = keep_rule.keep_rates(model, "paired", sessions=5, candidates=10, seed=3)
    by_effect = {r["effect"]: r["keep_rate"] for r in rows}
    assert by_effect[0.02] == 1.0 and by_effect[0.0] <= 0.1
    assert keep_rule.smallest_kept(rows) is not None


def test_a_change_moves_each_seed_by_its_own_gain_and_keeps_it() -> None:
    """The interaction term: drawn once per change and seed, inherited by changes on top."""
    model = keep_rule.Model(sigma_run=0.0, sigma_seed=0.0, interaction=0.5)
    machine = keep_rule.Machine(model, random.Random(7), seeds_work=True)
    machine.change(1, 0, 0.01)  # sd 0.005 over seeds
    machine.change(2, 1, 0.0)  # a change that does nothing: no interaction of its own
    gains = [machine.run(0, 0.0, s) - machine.run(1, -0.01, s) for s in range(1000, 1200)]
    assert statistics.stdev(gains) == pytest.approx(0.005, rel=0.25)
    assert machine.run(1, -0.01, 1003) == machine.run(1, -0.01, 1003)  # once per seed
    assert all(machine.run(2, -0.01, s) == machine.run(1, -0.01, s) for s in range(1000, 1010))


def test_noise_table_reports_tokens_per_training_second() -> None:
    assert bench_noise.tokens_per_second({"total_tokens_M": 3.0, "training_seconds": 2.0}) == (
        1_500_000
    )
    assert bench_noise.tokens_per_second({"val_bpb": 1.0}) is None  # an old log: no figure


def test_noise_table_separates_paired_from_unpaired_spread() -> None:
    # version B is A minus 0.1 on every seed, and the seed moves both by up to 0.3
    runs = []
    for seed, shift in ((1000, 0.0), (1001, 0.3), (1002, -0.2)):
        for version, level in (("A:a.py", 3.0), ("B:b.py", 2.9)):
            runs.append(
                {"ok": True, "version": version, "seed": seed, "repeat": 0,
                 "val_bpb": level + shift, "num_steps": 2}
            )  # fmt: skip
    summary = bench_noise.summarize(runs, ["A:a.py", "B:b.py"])
    paired = summary["paired"]
    assert paired["mean_difference"] == pytest.approx(-0.1)
    assert paired["paired_sd"] == pytest.approx(0.0, abs=1e-12)
    assert paired["unpaired_sd"] == pytest.approx(math.sqrt(2) * 0.25166, rel=1e-3)
    assert summary["versions"]["A:a.py"]["same_seed_sd"] is None  # one run per seed


def test_goal_table_has_every_scenario_and_rule(tmp_path: Path) -> None:
    out = tmp_path / "goal.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench/keep_rule.py"), "--goal", "--sessions", "1",
         "--candidates", "3", "--json", str(out)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    names = [s["name"] for s in results]
    assert names[0] == "measured" and "null interaction 0.001" in names and len(names) == 9
    assert all(set(s["rules"]) == {"today", "paired"} for s in results)
    summary = proc.stdout.split("## Summary")[1]
    assert summary.count("| measured |") == 2  # one row per rule
    assert all(0.0015 in {m["effect"] for m in s["rules"]["paired"]["mixed"]} for s in results)
