"""`--workers N`: several candidates trained at once, one coordinator deciding.

Real git (a worktree per slot), the real CLI in subprocesses, the replay agent, and a stub
trainer with a gate: a candidate whose GATE names a file prints its first step line, then
waits for that file before it finishes. The test opens a gate when the record says so, so the
order in which slots finish is the test's, not the machine's.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from fakellm import FakeLLM
from loopkit import (
    STUB_TRAIN,
    alive,
    cli,
    git,
    make_workspace,
    openai_args,
    replay_args,
    reply,
    results_rows,
    run_args,
    stub_bpb,
    stub_cli_env,
)

from autoresearch import commands, noise, runner, slot
from autoresearch.errors import UsageError
from autoresearch.options import SessionOptions

TAG = "w2"

GATED_TRAIN = (
    STUB_TRAIN.replace(
        "LR = 0.04  # learning rate\n",
        # two unchanged lines between LR and WIDTH: edits of each merge (diff3 needs a gap)
        "LR = 0.04  # learning rate\nEPOCHS = 1  # unused\nNOTE = ''  # unused\n",
    )
    .replace(
        "SLEEP = 0.0  # seconds per step\n",
        'SLEEP = 0.0  # seconds per step\nGATE = ""  # a file to wait for after the first step\n',
    )
    .replace("import time\n", "import os\nimport time\nfrom pathlib import Path\n")
    .replace(
        "        time.sleep(SLEEP)\n",
        "        time.sleep(SLEEP)\n"
        "        if GATE and i == 1:\n"
        "            with open(GATE + '.pids', 'a') as f:\n"
        "                f.write(f'{os.getpid()}\\n')\n"
        "            while not Path(GATE).exists():\n"
        "                time.sleep(0.05)\n",
    )
)


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    return make_workspace(tmp_path / "ws", GATED_TRAIN)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return stub_cli_env(tmp_path)


def _gate_edit(gate: Path) -> tuple[str, str]:
    line = 'GATE = ""  # a file to wait for after the first step'
    return line, line.replace('""', repr(str(gate)))


def _lr(old: str, new: str) -> tuple[str, str]:
    return f"LR = {old}  # learning rate", f"LR = {new}  # learning rate"


def _patches(tmp_path: Path, *replies: str) -> Path:
    patches = tmp_path / "patches"
    patches.mkdir()
    for i, text in enumerate(replies, 1):
        (patches / f"{i:02d}.txt").write_text(text)
    return patches


def _records(ws: Path) -> list[dict]:
    path = ws / "runs" / TAG / "experiments.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _measurements(ws: Path) -> list[dict]:
    path = ws / "runs" / TAG / "measurements.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _state(ws: Path) -> dict:
    try:
        return json.loads((ws / "runs" / TAG / "state.json").read_text()) or {}
    except (OSError, json.JSONDecodeError):
        return {}


def _wait_for(
    predicate, what: str, proc: subprocess.Popen, log: Path, timeout: float = 300.0
) -> None:
    """Polls an event of the session `proc` (a record, a state); fails at once when the
    session ended without it. The timeout only guards a hang."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None and not predicate():
            raise AssertionError(f"the session ended before: {what}\n{log.read_text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached: {what}\n{log.read_text()}")
        time.sleep(0.05)


def _start(ws: Path, env: dict, patches: Path, n: int, log: Path, *extra: str) -> subprocess.Popen:
    # unsandboxed: the box would hide the gate (a file of the test's) from the candidate
    args = run_args(TAG, *replay_args(patches), "--workers", "2", "--unsandboxed", *extra, n=n)
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "autoresearch", *args, "--workspace", str(ws)],
            cwd=ws,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _check_consistent(ws: Path, n: int) -> list[dict]:
    """Every id once, the branch at the best, the working tree clean, pairs within a slot."""
    recs = _records(ws)
    assert sorted(r["id"] for r in recs) == list(range(1, n + 1))
    assert len(results_rows(ws, TAG)) == n
    best = [r for r in recs if r["status"] == "keep"][-1]
    assert git(ws, "rev-parse", "HEAD") == best["commit"]
    assert git(ws, "rev-parse", "--abbrev-ref", "HEAD") == f"autoresearch/{TAG}"
    assert git(ws, "status", "--porcelain") == ""
    rows = _measurements(ws)
    for row in rows:
        # where every run trained: this host, and no card on the cpu
        assert row["node"] == socket.gethostname() and row["gpu"] is None, row
        if row.get("partner") is not None:
            partner = rows[row["partner"]]
            assert partner["slot"] == row["slot"] and partner["seed"] == row["seed"]
    assert not (ws / "runs" / TAG / "slots").exists() or not any(
        (ws / "runs" / TAG / "slots").iterdir()
    )  # the slots' worktrees are removed at the end
    return recs


def test_two_slots_train_at_once_and_a_stale_keep_is_rebased_and_measured_again(
    ws: Path, env: dict, tmp_path: Path
) -> None:
    """Slot 0 keeps LR 0.06 while slot 1's WIDTH 128 (made on the base) waits at its gate;
    released, WIDTH 128 beat its base, so it is merged onto the new best and trained again
    there (paired with the new best's run on slot 1) before it is kept."""
    gate = tmp_path / "gate-width"
    patches = _patches(
        tmp_path,
        reply("LR to 0.06", _lr("0.04", "0.06")),
        reply(
            "WIDTH to 128",
            ("WIDTH = 64  # model width", "WIDTH = 128  # model width"),
            _gate_edit(gate),
        ),
    )
    log = tmp_path / "run.log"
    proc = _start(ws, env, patches, 3, log)
    try:
        # both candidates in flight at once: slot 1 trains while slot 0's is recorded
        _wait_for(lambda: Path(str(gate) + ".pids").is_file(), "WIDTH 128 training", proc, log)
        _wait_for(lambda: any(r["id"] == 2 for r in _records(ws)), "LR 0.06 kept", proc, log)
        assert [r["status"] for r in _records(ws)] == ["keep", "keep"]
        assert len(_state(ws).get("slots", {})) == 1  # slot 1 still in flight
        status = subprocess.run(
            [sys.executable, "-m", "autoresearch", "status", "--tag", TAG, "--workspace", str(ws)],
            cwd=ws, env=env, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert re.search(r"slot 1: exp 0003 training for \d+m\d\ds: WIDTH to 128", status)
        gate.touch()
        assert proc.wait(timeout=300) == 0, (tmp_path / "run.log").read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    recs = _check_consistent(ws, 3)
    lr, width = recs[1], recs[2]
    assert (lr["id"], lr["status"], lr["extra"]["slot"]) == (2, "keep", "0")
    assert (width["id"], width["status"], width["extra"]["slot"]) == (3, "keep", "1")
    # measured again on the new best, which is its parent; the first measurement kept aside
    assert width["parent"] == lr["commit"]
    assert width["extra"]["rebased"]["parent"] == recs[0]["commit"]
    assert width["val_bpb"] == pytest.approx(stub_bpb(0.06, 128))
    merged = git(ws, "show", f"{width['commit']}:train.py")
    assert "LR = 0.06" in merged and "WIDTH = 128" in merged
    stale = git(ws, "rev-parse", f"refs/autoresearch/{TAG}/attempts/0003-stale")
    assert stale == width["extra"]["rebased"]["commit"]
    assert "LR = 0.04" in git(ws, "show", f"{stale}:train.py")
    # the runs that decided the keep are the merged commit's, paired with the new best's
    rows = _measurements(ws)
    decisive = [r for r in rows if r["commit"] == width["commit"]]
    assert decisive and all(rows[r["partner"]]["commit"] == lr["commit"] for r in decisive)
    assert {r["slot"] for r in decisive} == {"1"}


def test_a_stale_keep_that_no_longer_merges_is_recorded_discard(
    ws: Path, env: dict, tmp_path: Path
) -> None:
    """LR 0.05 (made on the base, slot 1) beats the base, but LR 0.06 was kept meanwhile on
    the same line: it cannot be merged, so it is recorded `discard` with the reason."""
    gate = tmp_path / "gate-lr"
    patches = _patches(
        tmp_path,
        reply("LR to 0.06", _lr("0.04", "0.06")),
        reply("LR to 0.05", _lr("0.04", "0.05"), _gate_edit(gate)),
    )
    log = tmp_path / "run.log"
    proc = _start(ws, env, patches, 3, log)
    try:
        _wait_for(lambda: any(r["id"] == 2 for r in _records(ws)), "LR 0.06 kept", proc, log)
        gate.touch()
        assert proc.wait(timeout=300) == 0, (tmp_path / "run.log").read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    recs = _check_consistent(ws, 3)
    late = recs[2]
    assert late["status"] == "discard" and "no longer applies" in late["extra"]["reason"]
    assert late["parent"] == recs[0]["commit"]  # judged against its own base, never kept
    assert git(ws, "rev-parse", "HEAD") == recs[1]["commit"]


def test_a_crashed_baseline_with_two_slots_fails_and_a_committed_fix_resumes(
    tmp_path: Path, env: dict
) -> None:
    """The coordinator's way: a baseline that does not parse ends the session with exit
    status 3 before any candidate; the fix committed on the branch, `--resume` trains the
    baseline again at the fix (alone, as every candidate is built on it) and goes on."""
    ws = make_workspace(tmp_path / "ws", STUB_TRAIN + "\ndef broken(:\n    pass\n")
    patches = _patches(tmp_path, reply("LR to 0.06", _lr("0.04", "0.06")))

    def session(n: int, *extra: str) -> subprocess.CompletedProcess:
        args = run_args(TAG, *replay_args(patches), "--workers", "2", "--unsandboxed", *extra, n=n)
        command = [sys.executable, "-m", "autoresearch", *args, "--workspace", str(ws)]
        return subprocess.run(command, cwd=ws, env=env, capture_output=True, text=True, timeout=600)

    proc = session(2)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "crashed (syntax)" in " ".join(proc.stderr.split())
    assert [(r["status"], r["crash_class"]) for r in _records(ws)] == [("crash", "syntax")]

    (ws / "train.py").write_text(STUB_TRAIN, encoding="utf-8")
    git(ws, "commit", "-q", "-am", "fix the syntax error")
    fix = git(ws, "rev-parse", "HEAD")
    proc = session(3, "--resume")  # the crash, the new baseline and one candidate
    assert proc.returncode == 0, proc.stdout + proc.stderr
    recs = _records(ws)
    assert [(r["id"], r["status"]) for r in recs][:2] == [(1, "crash"), (2, "keep")]
    assert recs[1]["commit"] == fix and all(r["parent"] == fix for r in recs[2:])
    assert len(recs) == 3 and recs[2]["description"] == "LR to 0.06", proc.stdout


@pytest.mark.slow  # two sessions with real children: minutes on two cores
def test_kill_9_with_two_runs_in_flight_then_resume(ws: Path, env: dict, tmp_path: Path) -> None:
    """Killed with both slots training: both runs die with the session (their guards kill
    them: no orphan keeps a card), the resume trains both experiments again under their ids,
    and records every experiment once."""
    gates = [tmp_path / "gate-a", tmp_path / "gate-b"]
    patches = _patches(
        tmp_path,
        reply("LR to 0.06", _lr("0.04", "0.06"), _gate_edit(gates[0])),
        reply(
            "WIDTH to 128",
            ("WIDTH = 64  # model width", "WIDTH = 128  # model width"),
            _gate_edit(gates[1]),
        ),
    )
    log = tmp_path / "run.log"
    proc = _start(ws, env, patches, 3, log)
    try:
        for gate in gates:
            pids = Path(str(gate) + ".pids")
            _wait_for(lambda p=pids: _line_in(p), f"{gate.name} waiting", proc, log)
        flight = _state(ws)["slots"]
        assert sorted(e["id"] for e in flight.values()) == [2, 3]
        assert all(e.get("run_marker") for e in flight.values())
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert [r["id"] for r in _records(ws)] == [1]
    leftovers = [int(p) for g in gates for p in Path(str(g) + ".pids").read_text().split()]
    assert len(leftovers) == 2
    deadline = time.monotonic() + 120  # guards a hang only
    while any(alive(pid) for pid in leftovers):  # they die with the session, at the gate
        assert time.monotonic() < deadline, f"runs left after the kill: {leftovers}"
        time.sleep(0.05)
    for gate in gates:
        Path(str(gate) + ".pids").unlink()
    resumed = _start(ws, env, patches, 3, tmp_path / "resume.log", "--resume")
    try:
        log = tmp_path / "resume.log"
        for gate in gates:  # the experiments trained again may now finish
            gate.touch()
        assert resumed.wait(timeout=300) == 0, log.read_text()
    finally:
        if resumed.poll() is None:
            os.killpg(resumed.pid, signal.SIGKILL)
    assert "re-running" in (tmp_path / "resume.log").read_text()
    recs = _check_consistent(ws, 3)
    assert [r["description"] for r in sorted(recs, key=lambda r: r["id"])] == [
        "baseline",
        "LR to 0.06",
        "WIDTH to 128",
    ]
    # every candidate run counted once: one measured run per (experiment, commit, seed)
    runs = [(r["exp"], r["commit"], r["seed"]) for r in _measurements(ws) if r["purpose"] != "pair"]
    assert len(runs) == len(set(runs))


def _line_in(path: Path) -> bool:
    """A whole line was written to `path` (it exists from its opening on)."""
    return path.is_file() and path.read_text().endswith("\n")


def test_slots_from_the_command_line(ws: Path, env: dict) -> None:
    """--gpus gives one slot per card and needs cuda; --workers N on cuda without --gpus is
    refused (two trainings would share a card); on the cpu --workers N gives N slots."""
    cuda = SessionOptions(tag=TAG, preset="gpu", device="cuda", time_budget=300.0)
    assert commands._slots(cuda, 1, "0, 2,3") == {"workers": 3, "gpus": ("0", "2", "3")}
    assert replace(cuda, workers=3, gpus=("0", "2", "3")).slot_gpus == ["0", "2", "3"]
    for workers, gpus, message in [
        (2, None, "would put 2 trainings on one card"),
        (1, "0,0", "distinct card indices"),
        (1, "0,x", "distinct card indices"),
    ]:
        with pytest.raises(UsageError, match=message):
            commands._slots(cuda, workers, gpus)
    with pytest.raises(UsageError, match="--gpu and --gpus"):
        commands._slots(replace(cuda, gpu="1"), 1, "0,1")
    cpu = replace(cuda, preset="cpu", device="cpu")
    assert replace(cpu, **commands._slots(cpu, 2, None)).slot_gpus == [None, None]
    proc = cli(ws, *run_args(TAG, "--agent", "tuner", "--gpus", "0", n=1), env=env)
    assert proc.returncode == 2 and "--gpus needs --device cuda" in proc.stderr + proc.stdout
    assert not (ws / "runs" / TAG).exists()


def test_each_proposal_sees_the_candidates_in_flight(ws: Path, env: dict) -> None:
    """The agent proposes for every free slot; the second request lists the first candidate,
    in flight on slot 0, as running, with its description."""
    with FakeLLM() as server:
        server.enqueue(reply("LR to 0.06", _lr("0.04", "0.06")))
        server.enqueue(
            reply("WIDTH to 128", ("WIDTH = 64  # model width", "WIDTH = 128  # model width"))
        )
        args = run_args(TAG, *openai_args(server.base_url), "--workers", "2", "--no-overlap", n=3)
        proc = cli(ws, *args, "--unsandboxed", env={**env, "OPENAI_API_KEY": "sk-test"})
        assert proc.returncode == 0, proc.stderr + proc.stdout
        first, second = (json.dumps(r["messages"]) for r in server.requests[-2:])
    assert "training now" not in first
    assert re.search(r"\| running \|( [^|]* \|)? \(training now\) LR to 0\.06 \|", second)
    recs = _check_consistent(ws, 3)
    assert {r["extra"].get("slot") for r in recs[1:]} == {"0", "1"}


# ---------------------------------------------------------------------------------------------
# Pairs on one card: Measurements.partner, the place of each run
# ---------------------------------------------------------------------------------------------

CARD_A, CARD_B = ("node-1", "GPU-aaaa"), ("node-1", "GPU-bbbb")


def _run(m: noise.Measurements, commit: str, seed: int, *, slot: str, card=None) -> dict:
    node, gpu = card if card is not None else (None, None)
    return m.add(
        commit, 1.0, exp_id=1, purpose="calibrate", seed=seed, slot=slot, node=node, gpu=gpu
    )


def test_a_partner_is_a_run_on_the_same_card_whatever_the_slot(tmp_path: Path) -> None:
    """With cards recorded (Ray: any slot's run may land on any card), the incumbent's run of
    the seed on the candidate's card is the partner; one on another card, of the same slot,
    is not."""
    m = noise.Measurements(tmp_path)
    on_a = _run(m, "best", 1000, slot="1", card=CARD_A)
    _run(m, "best", 1000, slot="0", card=CARD_B)  # the same slot, another card: later, unused
    assert m.partner("best", 1000, 0, slot="0", card=CARD_A) == on_a
    assert m.partner("best", 1000, 0, slot="0", card=("node-2", "GPU-aaaa")) is None
    assert m.partner("best", 1001, 0, slot="0", card=CARD_A) is None  # the seed too


def test_the_pair_window_counts_the_runs_on_that_card_only(tmp_path: Path) -> None:
    m = noise.Measurements(tmp_path)
    on_a = _run(m, "best", 1000, slot="0", card=CARD_A)
    for seed in range(5):  # many runs elsewhere do not age it
        _run(m, "other", seed, slot="1", card=CARD_B)
    assert m.partner("best", 1000, 2, slot="0", card=CARD_A) == on_a
    _run(m, "other", 7, slot="1", card=CARD_A)  # one run after it on its card: still recent
    assert m.partner("best", 1000, 2, slot="0", card=CARD_A) == on_a
    _run(m, "other", 8, slot="1", card=CARD_A)  # two: too old for a window of 2
    assert m.partner("best", 1000, 2, slot="0", card=CARD_A) is None
    assert m.partner("best", 1000, 0, slot="0", card=CARD_A) == on_a  # window 0: any age


def test_without_cards_a_partner_is_a_run_of_the_same_slot(tmp_path: Path) -> None:
    """The cpu, and rows recorded before cards were: the slot is the place, and the window
    counts that slot's runs."""
    m = noise.Measurements(tmp_path)
    slot0 = _run(m, "best", 1000, slot="0")
    _run(m, "best", 1000, slot="1")
    _run(m, "other", 1, slot="1")
    assert m.partner("best", 1000, 1, slot="0") == slot0
    assert m.partner("best", 1000, 1, slot="0", card=CARD_A) == slot0  # the row names no card
    _run(m, "other", 2, slot="0")
    assert m.partner("best", 1000, 1, slot="0") is None


def test_a_slot_names_its_host_and_no_card_on_the_cpu(tmp_path: Path) -> None:
    """The lookup of a card's UUID asks torch in a process of its own; this host's torch has
    no CUDA, so there is no card, and a cpu slot's place is (host, None)."""
    assert slot.gpu_uuid("0") is None
    cpu = slot.Slot(
        tmp_path, SessionOptions(tag="t", preset="cpu", device="cpu", time_budget=1.0), None, None, None,
        mark=lambda key, marker: None,
    )  # fmt: skip
    assert cpu.place() == (socket.gethostname(), None) and cpu.card_key() is None


class _MovingSlot(slot.Slot):
    """A slot on a card named by a UUID of the test's (the GPU is the edge faked here) that
    moves to the next of `cards` while it trains the runs numbered in `moves` (from 1, over
    every run it trains): what a Ray slot does when its actor is lost mid-run and a new one,
    on another card, trains the run again (rayslot.py)."""

    def __init__(self, root: Path, cards: list[str], moves: set[int], display) -> None:
        opts = SessionOptions(
            TAG, "cpu", "cpu", 10.0, sealed=False, unsandboxed=True, warm_start=False,
            max_repeats=1,
        )  # fmt: skip
        sealing = slot.Sealing(None, runner.network_isolation(), {})  # unsealed, unboxed
        super().__init__(root, opts, sealing, display, threading.Event(), mark=lambda k, m: None)
        self.cards, self.moves, self.trained = cards, moves, 0

    def place(self) -> tuple[str, str | None]:
        return "node-1", self.cards[0]

    def train(self, *args, **kwargs) -> slot.RunOutcome:
        self.trained += 1
        if self.trained in self.moves:
            self.cards.pop(0)
        return super().train(*args, **kwargs)


def _moving_trial(tmp_path: Path, moves: set[int]):
    """Experiment 2 (LR 0.04 -> 0.06) judged on a _MovingSlot that starts on card GPU-a, where
    the baseline's two calibration runs are; (outcome, measurement rows, what was shown)."""
    from rich.console import Console

    from autoresearch.display import Display
    from autoresearch.trial import Candidate, Trial

    root = tmp_path / "slot"
    root.mkdir(parents=True)
    best, cand = STUB_TRAIN, STUB_TRAIN.replace("LR = 0.04", "LR = 0.06")
    (root / "train.py").write_text(cand)
    m = noise.Measurements(tmp_path / "run")
    for seed in (noise.seed_of(0), noise.seed_of(1)):
        m.add("best", stub_bpb(), exp_id=1, purpose="calibrate", seed=seed, node="node-1",
              gpu="GPU-a")  # fmt: skip
    shown = io.StringIO()
    display = Display(Console(file=shown, width=400))
    cards = ["GPU-a", "GPU-b", "GPU-c", "GPU-d", "GPU-e", "GPU-f"]
    moving = _MovingSlot(root, cards, moves, display)
    candidate = Candidate(2, "cand", "LR to 0.06", "best", {})
    outcome = Trial(
        candidate, moving, opts=moving.opts, measurements=m,
        source={"best": best, "cand": cand}.__getitem__, exp_dir=tmp_path / "run" / "0002",
        display=display,
    ).run()  # fmt: skip
    assert (root / "train.py").read_text() == cand  # the candidate's is put back
    return outcome, noise.Measurements(tmp_path / "run").rows(), " ".join(shown.getvalue().split())


def test_a_run_whose_card_changed_mid_run_is_paired_again_on_its_card(tmp_path: Path) -> None:
    """The candidate's first run was to pair with the baseline's run of seed 1000 on GPU-a, and
    the slot moved to GPU-b while it trained: the best is trained with seed 1000 on GPU-b (a
    `pair` row) before the candidate's row is written, paired with it; the gain judged is the
    one of that pair."""
    outcome, rows, text = _moving_trial(tmp_path, moves={1})
    assert [(r["purpose"], r["seed"], r["gpu"]) for r in rows] == [
        ("calibrate", 1000, "GPU-a"), ("calibrate", 1001, "GPU-a"),
        ("pair", 1000, "GPU-b"), ("candidate", 1000, "GPU-b"),
    ]  # fmt: skip
    assert rows[3]["partner"] == 2 and rows[2]["commit"] == "best"
    assert outcome.rows == [rows[3]]
    assert outcome.verdict.gain == pytest.approx(stub_bpb(0.04) - stub_bpb(0.06))
    assert "run 1 trained on GPU-b on node-1, its partner on GPU-a on node-1" in text, text
    assert (tmp_path / "run" / "0002" / "pair-1.log").is_file()


def test_a_run_whose_card_changes_again_while_its_partner_trains_is_trained_again(
    tmp_path: Path,
) -> None:
    """The card changes during the candidate's run (a -> b) and again during the new partner's
    (b -> c): the candidate's run is trained again on c, with the partner on c. When the card
    never holds still, after REPAIRS new partners the run is recorded without one, and with no
    gain to judge the candidate is discarded: never a gain across cards."""
    from autoresearch.trial import REPAIRS

    outcome, rows, _ = _moving_trial(tmp_path / "twice", moves={1, 2})
    assert [(r["purpose"], r["gpu"], r["partner"]) for r in rows[2:]] == [
        ("pair", "GPU-c", None), ("candidate", "GPU-c", 2),
    ]  # fmt: skip
    assert outcome.status == "keep"
    assert REPAIRS == 2  # the moves below outlast it
    outcome, rows, _ = _moving_trial(tmp_path / "always", moves={1, 2, 3, 4, 5})
    assert [(r["purpose"], r["gpu"], r["partner"]) for r in rows[2:]] == [
        ("pair", "GPU-c", None), ("pair", "GPU-e", None), ("candidate", "GPU-f", None),
    ]  # fmt: skip
    assert outcome.status == "discard" and outcome.verdict is None
