"""Noise-aware acceptance: the statistics, and the loop re-running within-noise candidates."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from loopkit import cli, fake_prepared_cache, git, make_workspace, replay_args, reply, run_args

from autoresearch.noise import Measurements, judge, threshold

NOISY_STUB = """\
import os

GAIN = 0.0  # how much better than the baseline this train.py is


def main():
    seed = int(os.environ.get("AUTORESEARCH_SEED", "1000"))
    val = 1.0 - GAIN + (seed % 3) * 0.001  # run-to-run noise of sigma 0.001
    print("step 00000 (100.0%) | loss 1.000000 | dt 1ms | tok/sec 1 | mfu 0.0% | remaining 0s")
    print("---")
    print(f"val_bpb: {val:.6f}")


if __name__ == "__main__":
    main()
"""


def test_pooled_sigma_and_torn_line(tmp_path: Path) -> None:
    m = Measurements(tmp_path)
    assert m.sigma() is None
    for v in (1.0, 1.002):
        m.add("a", v, exp_id=1, purpose="calibrate", seed=0)
    m.add("b", 0.9, exp_id=2, purpose="candidate", seed=0)
    assert m.sigma() == pytest.approx(math.sqrt(0.002**2 / 2))
    with open(m.path, "ab") as f:
        f.write(b'{"commit": "b", "val_')  # a kill mid-write
    again = Measurements(tmp_path)
    assert again.values("b") == [0.9]
    again.add("b", 0.91, exp_id=2, purpose="repeat", seed=1)
    assert Measurements(tmp_path).values("b") == [0.9, 0.91]


def test_judge_rules() -> None:
    incumbent = [1.0, 1.001, 1.002]
    # Unknown noise: the fixed min_delta decides in one run.
    assert judge([0.99], incumbent, sigma=None, min_delta=0.0, max_repeats=3).decision == "keep"
    assert judge([1.01], incumbent, sigma=None, min_delta=0.0, max_repeats=3).decision == "discard"
    # Clear win, clear loss, within noise.
    assert judge([0.99], incumbent, sigma=0.001, min_delta=0.0, max_repeats=3).decision == "keep"
    assert (
        judge([1.003], incumbent, sigma=0.001, min_delta=0.0, max_repeats=3).decision == "discard"
    )
    v = judge([1.0005], incumbent, sigma=0.001, min_delta=0.0, max_repeats=3)
    assert v.decision == "repeat" and v.threshold == pytest.approx(2 * 0.001 * math.sqrt(1 + 1 / 3))
    assert (
        judge([1.0005] * 3, incumbent, sigma=0.001, min_delta=0.0, max_repeats=3).decision
        == "discard"
    )
    # min_delta is a floor on the bar.
    assert threshold(0.0001, 1, 3, 0.05) == 0.05


def test_loop_repeats_within_noise_candidates(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path / "ws", NOISY_STUB)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTORESEARCH_", "OPENAI_"))}
    env["AUTORESEARCH_CACHE"] = str(fake_prepared_cache(tmp_path / "cache"))
    env["AUTORESEARCH_SEALED"] = "0"  # the stub prints val_bpb and saves no checkpoint
    patches = tmp_path / "patches"
    patches.mkdir()
    (patches / "1.txt").write_text(
        reply(
            "tiny gain",
            ("GAIN = 0.0  # how much better than the baseline this train.py is", "GAIN = 0.001"),
        )
    )
    (patches / "2.txt").write_text(
        reply(
            "real gain",
            ("GAIN = 0.0  # how much better than the baseline this train.py is", "GAIN = 0.01"),
        )
    )
    args = run_args("n", *replay_args(patches), "--calibrate", "3", "--max-repeats", "3")
    proc = cli(ws, *args, env=env)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    recs = [json.loads(line) for line in (ws / "runs/n/experiments.jsonl").read_text().splitlines()]
    baseline, tiny, real = recs
    assert baseline["extra"]["runs"] == [1.001, 1.002, 1.0] and baseline[
        "val_bpb"
    ] == pytest.approx(1.001)
    assert baseline["extra"]["sigma"] == pytest.approx(0.001)
    assert tiny["status"] == "discard" and len(tiny["extra"]["runs"]) == 3  # re-run, then refused
    assert tiny["threshold"] == pytest.approx(2 * tiny["extra"]["sigma"] * math.sqrt(2 / 3))
    assert real["status"] == "keep" and len(real["extra"]["runs"]) == 1  # a clear win needs one run
    assert git(ws, "rev-parse", "HEAD") == real["commit"]
    seeds = [
        json.loads(line)["seed"]
        for line in (ws / "runs/n/measurements.jsonl").read_text().splitlines()
    ]
    assert seeds == [1000, 1001, 1002, 1000, 1001, 1002, 1000]
    assert (ws / "runs/n/0002/run-3.log").is_file()
