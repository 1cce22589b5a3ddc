"""bench/keep_rule.py and bench/noise.py: the simulation drives the real keep rule, and the
noise table computes its spreads from the runs it is given."""

from __future__ import annotations

import math
import random
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
