"""Noise-aware acceptance: the record, the sequential test on paired gains, and the loop that
pairs a candidate's runs with the best's runs of the same seeds."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from loopkit import cli, fake_prepared_cache, git, make_workspace, replay_args, reply, run_args

from autoresearch import noise
from autoresearch.agent import ReplayAgent, history_table
from autoresearch.display import Display
from autoresearch.loop import Session
from autoresearch.noise import Measurements, judge, paired_sigma
from autoresearch.options import SessionOptions

ROOT = Path(__file__).resolve().parents[1]

NOISY_STUB = """\
import os

GAIN = 0.0  # how much better than the baseline this train.py is


def main():
    seed = int(os.environ.get("AUTORESEARCH_SEED", "1000"))
    val = 1.0 - GAIN + (seed % 3) * 0.001  # what the seed does: sigma 0.001 over seeds
    print("step 00000 (100.0%) | loss 1.000000 | dt 1ms | tok/sec 1 | mfu 0.0% | remaining 0s")
    print("---")
    print(f"val_bpb: {val:.6f}")


if __name__ == "__main__":
    main()
"""

# The machine changes under the session: from the third run on, every run scores 0.05 better
# (the cpu preset on a laptop whose load fell), whatever the code.
DRIFTING_STUB = """\
import os
from pathlib import Path

GAIN = 0.0  # how much better than the baseline this train.py is


def main():
    seed = int(os.environ.get("AUTORESEARCH_SEED", "1000"))
    counter = Path(os.environ["STUB_COUNTER"])
    runs = int(counter.read_text()) if counter.exists() else 0
    counter.write_text(str(runs + 1))
    drift = -0.05 if runs >= 2 else 0.0
    val = 1.0 - GAIN + drift + (seed % 3) * 0.001
    print("step 00000 (100.0%) | loss 1.000000 | dt 1ms | tok/sec 1 | mfu 0.0% | remaining 0s")
    print("---")
    print(f"val_bpb: {val:.6f}")


if __name__ == "__main__":
    main()
"""

GAIN_LINE = "GAIN = 0.0  # how much better than the baseline this train.py is"


def test_record_keeps_seed_partner_and_survives_a_torn_line(tmp_path: Path) -> None:
    m = Measurements(tmp_path)
    assert m.sigma() is None
    m.add("a", 1.0, exp_id=1, purpose="calibrate", seed=1000)
    m.add("a", 1.0001, exp_id=1, purpose="pair", seed=1000)  # same seed: not a seed spread
    assert m.sigma() is None
    m.add("a", 1.002, exp_id=1, purpose="calibrate", seed=1001)
    row = m.add("b", 0.9, exp_id=2, purpose="candidate", seed=1000, partner=1)
    assert row["n"] == 3 and m.gains([row]) == [pytest.approx(0.1001)]
    # the latest run per seed: 1.0001 and 1.002
    assert m.sigma() == pytest.approx(math.sqrt((1.002 - 1.0001) ** 2 / 2))
    with open(m.path, "ab") as f:
        f.write(b'{"commit": "b", "val_')  # a kill mid-write
    again = Measurements(tmp_path)
    assert again.values("b") == [0.9]
    again.add("b", 0.91, exp_id=2, purpose="repeat", seed=1001, partner=2)
    rows = Measurements(tmp_path).rows()
    assert [r["n"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[4] == {
        "n": 4,
        "commit": "b",
        "val_bpb": 0.91,
        "exp": 2,
        "purpose": "repeat",
        "seed": 1001,
        "partner": 2,
        "slot": "0",  # the one slot of a session without --workers/--gpus
    }


def test_partner_is_the_latest_run_of_that_seed_within_the_window(tmp_path: Path) -> None:
    m = Measurements(tmp_path)
    m.add("best", 1.0, exp_id=1, purpose="calibrate", seed=1000)
    m.add("best", 1.0, exp_id=1, purpose="calibrate", seed=1001)
    m.add("other", 1.1, exp_id=2, purpose="candidate", seed=1000, partner=0)
    assert m.partner("best", 1000, window=3)["n"] == 0
    assert m.partner("best", 1000, window=2) is None  # two runs came after it: too old
    assert m.partner("best", 1000, window=0)["n"] == 0  # 0: any age
    assert m.partner("best", 1002, window=0) is None


def test_judge_keeps_discards_and_repeats_by_the_sequential_test() -> None:
    s = 0.001
    one = judge([0.003], sigma=s, min_delta=0.0, max_repeats=3)
    bar1 = s * (noise.EFFECT_SIGMAS / 2 + math.log(1 / noise.ALPHA) / noise.EFFECT_SIGMAS)
    assert one.decision == "keep" and one.label == "win"
    assert one.threshold == pytest.approx(bar1)  # 2.59 sigma after one run
    assert judge([0.0], sigma=s, min_delta=0.0, max_repeats=3).decision == "discard"
    middle = judge([0.0015], sigma=s, min_delta=0.0, max_repeats=3)
    assert middle.decision == "repeat" and middle.label == "within-noise"
    # two runs resolve what one could not: the bar on the mean falls with n
    two = judge([0.0015, 0.0025], sigma=s, min_delta=0.0, max_repeats=3)
    assert two.decision == "keep" and two.threshold < bar1
    # after max_repeats runs without crossing a bound: discarded
    assert judge([0.0015] * 2, sigma=s, min_delta=0.0, max_repeats=2).decision == "discard"
    # a clear loss is labelled so by the mirrored test
    assert judge([-0.003], sigma=s, min_delta=0.0, max_repeats=3).label == "loss"
    # min_delta moves the null: a gain of 0.003 must now beat 0.003
    assert judge([0.003], sigma=s, min_delta=0.003, max_repeats=3).decision == "discard"
    # no sigma yet: the fixed min_delta on one run, and no label
    unknown = judge([0.01], sigma=None, min_delta=0.0, max_repeats=3)
    assert unknown.decision == "keep" and unknown.label is None
    assert judge([-0.01], sigma=None, min_delta=0.0, max_repeats=3).decision == "discard"


@pytest.mark.parametrize("max_repeats", [2, 5, 20])
def test_false_keeps_stay_under_alpha_however_many_repeats(max_repeats: int) -> None:
    """A change that gains nothing, judged on Gaussian paired gains of known sigma: the keep
    rate stays under ALPHA at any max_repeats (Ville's inequality; the test draws 20,000)."""
    rng = random.Random(max_repeats)
    trials, keeps = 20_000, 0
    for _ in range(trials):
        gains: list[float] = []
        while True:
            gains.append(rng.gauss(0.0, 1.0))
            verdict = judge(gains, sigma=1.0, min_delta=0.0, max_repeats=max_repeats)
            if verdict.decision != "repeat":
                keeps += verdict.decision == "keep"
                break
    # binomial standard error at 5 %: 0.0015; the bound must hold with room
    assert keeps / trials <= noise.ALPHA


def test_paired_sigma_starts_safe_and_learns_from_repeated_candidates() -> None:
    assert paired_sigma(None, [[0.1, 0.2]]) is None
    prior = paired_sigma(0.003, [])
    assert prior == pytest.approx(math.sqrt(2) * 0.003)  # pairs that share nothing
    # a change that did not change the computation (equal gains) says nothing: skipped
    assert paired_sigma(0.003, [[0.001, 0.001, 0.001], [0.002]]) == pytest.approx(prior)
    # many tight pairs pull the estimate down towards their spread
    tight = [[0.001 + d, 0.001 - d] for d in (0.0002, -0.0003, 0.0001, 0.00025)] * 10
    learned = paired_sigma(0.003, tight)
    assert learned < prior / 3


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTORESEARCH_", "OPENAI_"))}
    env["AUTORESEARCH_CACHE"] = str(fake_prepared_cache(tmp_path / "cache"))
    env["AUTORESEARCH_SEALED"] = "0"  # the stubs print val_bpb and save no checkpoint
    return env


def test_loop_pairs_seeds_and_repeats_within_noise_candidates(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path / "ws", NOISY_STUB)
    patches = tmp_path / "patches"
    patches.mkdir()
    (patches / "1.txt").write_text(reply("tiny gain", (GAIN_LINE, "GAIN = 0.001")))
    (patches / "2.txt").write_text(reply("real gain", (GAIN_LINE, "GAIN = 0.01")))
    (patches / "3.txt").write_text(reply("a loss", ("GAIN = 0.01", "GAIN = -0.01")))
    args = run_args("n", *replay_args(patches), "--calibrate", "3", "--max-repeats", "3")
    proc = cli(ws, *args, env=_env(tmp_path))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    recs = [json.loads(line) for line in (ws / "runs/n/experiments.jsonl").read_text().splitlines()]
    baseline, tiny, real, loss = recs
    assert baseline["extra"]["runs"] == [1.001, 1.002, 1.0]
    assert baseline["extra"]["seeds"] == [1000, 1001, 1002]
    assert baseline["extra"]["sigma"] == pytest.approx(0.001)
    # each run of a candidate met the baseline's run of its seed: the seed's part cancels and
    # the paired gains are exactly the change's 0.001, under the bar at every n
    assert tiny["extra"]["paired_gains"] == pytest.approx([0.001] * 3)
    assert tiny["status"] == "discard" and tiny["extra"]["verdict"] == "within-noise"
    assert tiny["extra"]["seeds"] == [1000, 1001, 1002]
    assert tiny["extra"]["paired_sigma"] == pytest.approx(math.sqrt(2) * 0.001)
    assert real["status"] == "keep" and len(real["extra"]["runs"]) == 1  # one run suffices
    assert real["extra"]["verdict"] == "win"
    assert real["val_bpb"] - real["best_before"] == pytest.approx(-0.01)
    assert loss["status"] == "discard" and loss["extra"]["verdict"] == "loss"
    assert git(ws, "rev-parse", "HEAD") == real["commit"]
    rows = [
        json.loads(line) for line in (ws / "runs/n/measurements.jsonl").read_text().splitlines()
    ]
    assert [r["seed"] for r in rows] == [1000, 1001, 1002, 1000, 1001, 1002, 1000, 1000]
    assert [r["partner"] for r in rows] == [None, None, None, 0, 1, 2, 0, 6]
    assert (ws / "runs/n/0002/run-3.log").is_file()


def test_a_drift_of_the_machine_is_not_kept_as_a_gain(tmp_path: Path) -> None:
    """The machine gets 0.05 faster after the calibration runs. Each candidate run is paired
    with a run of the best made just before it (window 1), so a change that does nothing is
    discarded and a real 0.01 gain is kept, both measured on the changed machine."""
    ws = make_workspace(tmp_path / "ws", DRIFTING_STUB)
    patches = tmp_path / "patches"
    patches.mkdir()
    (patches / "1.txt").write_text(reply("a comment", (GAIN_LINE, GAIN_LINE + " (none)")))
    (patches / "2.txt").write_text(reply("real gain", (GAIN_LINE, "GAIN = 0.01")))
    env = _env(tmp_path)
    env["STUB_COUNTER"] = str(tmp_path / "counter")
    os.environ["STUB_COUNTER"] = env["STUB_COUNTER"]  # the session's runs inherit it
    os.environ["AUTORESEARCH_CACHE"] = env["AUTORESEARCH_CACHE"]
    try:
        opts = SessionOptions(
            tag="d",
            preset="cpu",
            device="cpu",
            time_budget=1.0,
            calibrate=2,
            max_repeats=2,
            pair_window=1,
            warm_start=False,
            overlap=False,
            # the drifting stub counts runs in a file outside the workspace, which the box
            # rightly hides from a run; this test is about the keep rule, not the box
            unsandboxed=True,
            sealed=False,  # the stub prints val_bpb and saves no checkpoint
        )
        session = Session(ws, opts, ReplayAgent(patches), Display(quiet=True))
        session.run()
        history = session._context().history
    finally:
        del os.environ["STUB_COUNTER"], os.environ["AUTORESEARCH_CACHE"]
    recs = [json.loads(line) for line in (ws / "runs/d/experiments.jsonl").read_text().splitlines()]
    _, neutral, real = recs
    assert neutral["status"] == "discard", neutral
    assert neutral["extra"]["paired_gains"] == pytest.approx([0.0])
    assert real["status"] == "keep"
    rows = [
        json.loads(line) for line in (ws / "runs/d/measurements.jsonl").read_text().splitlines()
    ]
    assert [r["purpose"] for r in rows] == [
        "calibrate",
        "calibrate",
        "pair",
        "candidate",
        "pair",
        "candidate",
    ]
    # against the calibration run of its seed, made before the change, the neutral
    # candidate would have gained the drift
    assert rows[0]["val_bpb"] - rows[3]["val_bpb"] == pytest.approx(0.05)
    assert (ws / "runs/d/0002/pair-1.log").is_file()
    # what the agent reads is what the rule decided
    assert [h.verdict for h in history] == [None, "within-noise", "win"]
    table = history_table(history, noise=0.001)
    assert "| within-noise |" in table and "| win |" in table


def _env_cpu(cache: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
    env.update(AUTORESEARCH_CACHE=str(cache), AUTORESEARCH_PRESET="cpu", AUTORESEARCH_DEVICE="cpu")
    return {**env, **extra}


def _train_once(cache: Path, checkpoint: Path, seed: str) -> list[str]:
    """train.py for two steps (a budget shorter than one step) with AUTORESEARCH_SEED=seed,
    its weights saved to `checkpoint`; returns its step lines."""
    env = _env_cpu(
        cache,
        AUTORESEARCH_TIME_BUDGET="0.01",
        AUTORESEARCH_SKIP_EVAL="1",
        AUTORESEARCH_CHECKPOINT=str(checkpoint),
        AUTORESEARCH_SEED=seed,
    )
    proc = subprocess.run(
        [sys.executable, "train.py"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return [line for line in proc.stdout.splitlines() if line.startswith("step ")]


LOSSES = """
import sys, torch, train
from prepare import make_dataloader
x, y, _ = next(make_dataloader(8, 64, split="val", seed=0))
for path in sys.argv[1:]:
    model = train.load_model(path)
    with torch.no_grad():
        print(repr(model(x, y).item()))
"""


@pytest.mark.slow
def test_train_py_follows_the_seed_the_harness_gives_it(
    stdlib_prepared: Path, tmp_path: Path
) -> None:
    """The same AUTORESEARCH_SEED trains the same model on the same batches (the CPU is
    deterministic: the same losses to the last bit); another seed starts from other weights
    and sees other batches, and ends with another loss."""
    paths = [tmp_path / name for name in ("a.pt", "b.pt", "c.pt")]
    steps = [
        _train_once(stdlib_prepared, p, s)
        for p, s in zip(paths, ("1000", "1000", "1001"), strict=True)
    ]
    assert len(steps[0]) == 2  # step 0 and step 1, whatever the machine's speed
    proc = subprocess.run(
        [sys.executable, "-c", LOSSES, *map(str, paths)], cwd=ROOT,
        env=_env_cpu(stdlib_prepared), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b, c = (float(v) for v in proc.stdout.split())
    assert a == b  # same seed: bit for bit
    assert c != a  # other seed: another model
