"""Sealed evaluation: val_bpb from harness-owned code in its own process, fingerprinted data,
the causality probe, seed-only refusals, network isolation and `confirm`.

Every upstream exploit is attempted as a real edit to a real train.py (a tiny bigram trainer
that follows the contract: it trains a few steps on the real prepared stdlib data and saves
its checkpoint), run as a real subprocess, and must not pay off.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from loopkit import git, make_workspace, results_rows

from autoresearch import evaluator, runner
from autoresearch.agent import AgentExhausted, Context, Proposal, _local_proposal
from autoresearch.display import Display
from autoresearch.evalproto import EvalStatus
from autoresearch.evaluator import evaluate_checkpoint, start_warm
from autoresearch.fingerprint import Fingerprinter, FingerprintError, active_dataset
from autoresearch.ledger import Experiment, tsv_row
from autoresearch.loop import Session, seed_only_change
from autoresearch.options import SessionOptions
from autoresearch.warm import Prestarted

TAG = "sealed"

STUB = '''\
"""A tiny trainer that follows the contract: a bigram model, a few Adam steps, a checkpoint."""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from prepare import MAX_SEQ_LEN, VOCAB_SIZE, evaluate_bpb, make_dataloader

SEED = 42  # model init
LR = 0.03  # Adam learning rate
STEPS = 6  # optimizer steps
WIDTH = 16  # embedding width


class Bigram(nn.Module):
    def __init__(self, vocab, width):
        super().__init__()
        self.config = {"vocab": vocab, "width": width}
        self.emb = nn.Embedding(vocab, width)
        self.out = nn.Linear(width, vocab)

    def forward(self, x):
        return self.out(self.emb(x))


def build_model(device="cpu"):
    torch.manual_seed(SEED)
    return Bigram(VOCAB_SIZE, WIDTH).to(device)


def save_checkpoint(model, path):
    torch.save({"config": model.config, "state_dict": model.state_dict()}, path)


def load_model(path, device="cpu"):
    checkpoint = torch.load(path, map_location=device, weights_only=True)
    model = Bigram(**checkpoint["config"]).to(device)
    model.load_state_dict(checkpoint["state_dict"])
    return model


def main():
    torch.set_num_threads(1)
    model = build_model()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    loader = make_dataloader(8, MAX_SEQ_LEN, "train")
    for step in range(STEPS):
        x, y, _ = next(loader)
        loss = F.cross_entropy(model(x).view(-1, VOCAB_SIZE), y.view(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"step {step:05d} ({100 * (step + 1) / STEPS:.1f}%) | loss {loss.item():.6f} "
              "| dt 1ms | tok/sec 1 | mfu 0.0% | remaining 0s", flush=True)
    checkpoint = os.environ.get("AUTORESEARCH_CHECKPOINT")
    if checkpoint:
        save_checkpoint(model, checkpoint)
    print("---")
    if not os.environ.get("AUTORESEARCH_SKIP_EVAL"):
        print(f"val_bpb:          {evaluate_bpb(model, 16):.6f}")
    print("training_seconds: 0.1")
    print("peak_vram_mb:     0.0")
    print(f"num_steps:        {STEPS}")


if __name__ == "__main__":
    main()
'''

# ---------------------------------------------------------------------------------------------
# The exploits, each a real edit of train.py.

PEEK_AHEAD = (
    "        return self.out(self.emb(x))\n",
    "        nxt = F.one_hot(torch.roll(x, -1, dims=1), VOCAB_SIZE).float()\n"
    "        return self.out(self.emb(x)) + 30 * nxt  # the answer, from the future\n",
)
MIX_ROWS = (
    "        return self.out(self.emb(x))\n",
    "        nxt = F.one_hot(torch.roll(x, -1, dims=0)[:, :1], VOCAB_SIZE).float()\n"
    "        return self.out(self.emb(x)) + 30 * nxt  # row i's last target is row i+1's first\n",
)
SKIP_STEP_AND_PRINT = (
    "        opt.step()\n",
    "        pass  # no optimizer step: nothing is learned\n",
)
FAKE_NUMBER = (
    '    if not os.environ.get("AUTORESEARCH_SKIP_EVAL"):\n'
    '        print(f"val_bpb:          {evaluate_bpb(model, 16):.6f}")\n',
    '    print("val_bpb:          0.100000")\n',
)
PATCH_AT_IMPORT = (
    "from prepare import MAX_SEQ_LEN, VOCAB_SIZE, evaluate_bpb, make_dataloader\n",
    "from prepare import MAX_SEQ_LEN, VOCAB_SIZE, evaluate_bpb, make_dataloader\n"
    "import prepare\n"
    "prepare.evaluate_bpb = lambda *args, **kwargs: 0.1  # wrap the metric\n",
)
OWN_METRIC_IN_MAIN = (
    "def main():\n",
    "def main():\n"
    "    import prepare\n"
    "    prepare.evaluate_bpb = lambda *args, **kwargs: 0.1\n"
    "    global evaluate_bpb\n"
    "    evaluate_bpb = prepare.evaluate_bpb\n",
)
NO_CHECKPOINT = (
    "    if checkpoint:\n        save_checkpoint(model, checkpoint)\n",
    "    pass  # the checkpoint is not saved\n",
)
TRAIN_PAST_BUDGET = (
    "    checkpoint = os.environ.get",
    "    import time\n"
    "    end = time.process_time() + 16  # 16 CPU s after its last step line, before the checkpoint\n"
    "    while time.process_time() < end:\n"
    "        x, y, _ = next(loader)\n"
    "        F.cross_entropy(model(x).view(-1, VOCAB_SIZE), y.view(-1)).backward()\n"
    "    checkpoint = os.environ.get",
)
TRAIN_BEFORE_FIRST_STEP = (
    "    for step in range(STEPS):\n",
    "    import time\n"
    "    end = time.process_time() + 16  # 16 CPU s of training before its first step line\n"
    "    while time.process_time() < end:\n"
    "        x, y, _ = next(loader)\n"
    "        loss = F.cross_entropy(model(x).view(-1, VOCAB_SIZE), y.view(-1))\n"
    "        opt.zero_grad()\n"
    "        loss.backward()\n"
    "        opt.step()\n"
    "    for step in range(STEPS):\n",
)
SEED_ONLY = ("SEED = 42  # model init", "SEED = 43  # model init")
MORE_STEPS = ("STEPS = 6  # optimizer steps", "STEPS = 40  # optimizer steps")
WRITE_VAL = (
    "    checkpoint = os.environ.get",
    "    import json, prepare\n"
    "    dataset = prepare.active_dataset_dir()\n"
    "    val = json.loads((dataset / 'manifest.json').read_text())['splits']['val']\n"
    "    with open(dataset / val['shards'][0]['file'], 'r+b') as f:\n"
    "        f.write(bytes(4096))  # easier validation data\n"
    "    checkpoint = os.environ.get",
)


def edit(source: str, *pairs: tuple[str, str]) -> str:
    for old, new in pairs:
        assert source.count(old) == 1, old
        source = source.replace(old, new)
    return source


class Scripted:
    """An agent that applies the next scripted edit to the best train.py."""

    name = "scripted"
    model = "none"
    fix = None

    def __init__(self, steps: list[tuple[str, Callable[[str], str]]]) -> None:
        self.steps = list(steps)

    def propose(self, ctx: Context) -> Proposal:
        if not self.steps:
            raise AgentExhausted("script done")
        description, change = self.steps.pop(0)
        return _local_proposal(self, description, change(ctx.train_py), time.monotonic(), [], "")


# The stubs here train a fixed number of steps, so the start-up limit and the training budget
# are only limits; tests about other properties leave both far away, so that no machine is
# slow enough to reach them (the tests of those rules set their own).
LOAD_PROOF_STARTUP_S = 600.0
LOAD_PROOF_BUDGET_S = 60.0


def session(ws: Path, agent: Scripted, **options) -> Session:
    options.setdefault("startup_limit", LOAD_PROOF_STARTUP_S)
    options.setdefault("time_budget", LOAD_PROOF_BUDGET_S)
    options.setdefault("sealed", True)
    opts = SessionOptions(
        tag=TAG,
        preset="cpu",
        device="cpu",
        fix_attempts=0,
        calibrate=1,
        max_repeats=1,
        pair_window=0,
        **options,
    )
    opts.overlap = False  # one proposal at a time, in the script's order
    return Session(ws, opts, agent, Display(quiet=True))


def records(ws: Path) -> list[dict]:
    path = ws / "runs" / TAG / "experiments.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def cache(stdlib_prepared: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in [n for n in os.environ if n.startswith(("AUTORESEARCH_", "OPENAI_"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(stdlib_prepared))
    return stdlib_prepared


@pytest.fixture
def private_cache(tmp_path: Path, stdlib_prepared: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the prepared data that a test may damage."""
    copy = tmp_path / "cache"
    shutil.copytree(stdlib_prepared, copy, ignore=shutil.ignore_patterns("downloads"))
    for name in [n for n in os.environ if n.startswith(("AUTORESEARCH_", "OPENAI_"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(copy))
    return copy


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    return make_workspace(tmp_path / "ws", STUB)


QUICK_EVAL = (  # in the cpu preset: rows of 64 tokens, 2**11 of them scored
    ('"MAX_SEQ_LEN": 256,  # tokens per row of context (model input length)\n        "TIME_BUDGET"',
     '"MAX_SEQ_LEN": 64,  # tokens per row of context (model input length)\n        "TIME_BUDGET"'),
    ('"EVAL_TOKENS": 2**16,', '"EVAL_TOKENS": 2**11,'),
)  # fmt: skip


@pytest.fixture
def quick_ws(ws: Path) -> Path:
    """`ws` with prepare.py's cpu preset scoring 2**11 validation tokens in rows of 64 instead
    of 2**16 in rows of 256: two batches of 16 rows, both probed for causality, each a quarter
    of the logits of a batch of the preset. The verdicts of the evaluator tests depend neither on how
    many tokens are scored nor on the length of a row (a look ahead or across rows shows at any
    length), and scoring is most of an evaluation's time; the sessions that compare trained
    models keep the preset."""
    prepare = ws / "prepare.py"
    prepare.write_text(edit(prepare.read_text(), *QUICK_EVAL))
    git(ws, "commit", "-qm", "score fewer validation tokens, in shorter rows", "--", "prepare.py")
    return ws


# ---------------------------------------------------------------------------------------------
# The evaluator on its own: checkpoints made here, train.py edited, one child process each.


def _checkpoint(ws: Path, source: str, tmp_path: Path) -> tuple[Path, Path]:
    """Write `source` as a train.py, build its model in a child and save the checkpoint.

    The model depends only on `source` and prepare.py, so each pair is built once per test
    session (one child importing torch) and copied into `tmp_path` for the test to use."""
    key = hashlib.sha256(source.encode() + (ws / "prepare.py").read_bytes()).hexdigest()[:16]
    built = tmp_path.parent / "sealed-checkpoints" / key  # shared by this session's tests
    if not (built / "model.pt").is_file():
        staging = built.with_name(f"{key}.{os.getpid()}.tmp")
        staging.mkdir(parents=True, exist_ok=True)
        (staging / "train.py").write_text(source)
        code = (
            "import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; import train; "
            "train.save_checkpoint(train.build_model(), sys.argv[3])"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code, str(ws), str(staging), str(staging / "model.pt")],
            env={**os.environ, "AUTORESEARCH_PRESET": "cpu"},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr
        shutil.rmtree(staging / "__pycache__", ignore_errors=True)
        staging.rename(built)
    variant = tmp_path / "variant"
    shutil.copytree(built, variant, dirs_exist_ok=True)
    return variant / "train.py", variant / "model.pt"


def _variant(ws: Path, source: str, tmp_path: Path) -> tuple[Path, Path]:
    """`source` as train.py beside STUB's checkpoint, for an edit of STUB that leaves its
    parameters and their initialisation alone (a forward, an import, a print): the checkpoint
    such a train.py saves is STUB's, so no child builds it again."""
    train, checkpoint = _checkpoint(ws, STUB, tmp_path)
    train.write_text(source)
    return train, checkpoint


def _evaluate(ws: Path, train: Path, checkpoint: Path, tmp_path: Path, **kw):
    dataset = active_dataset()
    prints = Fingerprinter(ws, dataset, "cpu", 5.0).take()
    if kw.pop("ahead", False):  # the evaluator started before the go, as a session on cuda does
        kw["warm"] = start_warm(
            ws,
            split=kw.get("split", "val"),
            preset="cpu",
            device="cpu",
            fingerprints=kw.get("fingerprints", prints),
            dataset=dataset,
        )
    return evaluate_checkpoint(
        ws,
        checkpoint,
        split=kw.pop("split", "val"),
        preset="cpu",
        device="cpu",
        timeout=300,
        log_path=tmp_path / "eval.log",
        fingerprints=kw.pop("fingerprints", prints),
        train_file=train,
        dataset=dataset,
        **kw,
    )


_HONEST: dict[str, object] = {}  # the STUB's sealed evaluation, shared by this session's tests


def _honest(ws: Path, tmp_path: Path):
    """The sealed evaluation of STUB's checkpoint: it depends only on STUB, prepare.py and the
    data, so it is evaluated once per test session (each evaluation is a few processes)."""
    key = hashlib.sha256((ws / "prepare.py").read_bytes()).hexdigest() + str(active_dataset())
    if key not in _HONEST:
        (tmp_path / "honest").mkdir(exist_ok=True)
        _HONEST[key] = _evaluate(
            ws, *_checkpoint(ws, STUB, tmp_path / "honest"), tmp_path / "honest"
        )
    return _HONEST[key]


def test_honest_checkpoint_is_measured_and_probed(
    cache: Path, quick_ws: Path, tmp_path: Path
) -> None:
    result = _honest(quick_ws, tmp_path)
    assert result.status == EvalStatus.ok, result
    assert result.causal is True
    assert result.num_params == 8192 * 16 + 16 * 8192 + 8192
    assert 3.0 < result.val_bpb < 6.0  # an untrained bigram: about uniform over 8192 tokens
    assert result.seconds is not None and result.wall_seconds >= result.seconds
    assert _result_line(result.log_path)["started_ahead"] is False


@pytest.fixture
def started_ahead(monkeypatch: pytest.MonkeyPatch) -> list[subprocess.Popen[bytes]]:
    """The processes of the evaluators started ahead during the test (evaluator.start_warm's),
    recorded as they start: whether one is left is asked of these, the test's own children,
    never of the machine's other processes."""
    procs: list[subprocess.Popen[bytes]] = []

    class Recorded(Prestarted):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            if self.proc is not None:  # None: it died at once and was reaped
                procs.append(self.proc)

    monkeypatch.setattr(evaluator, "Prestarted", Recorded)
    return procs


def _still_running(procs: list[subprocess.Popen[bytes]]) -> list[int]:
    return [p.pid for p in procs if p.poll() is None]


def _result_line(log: Path | None) -> dict:
    assert log is not None
    lines = [line for line in log.read_text().splitlines() if line.startswith('{"status"')]
    assert len(lines) == 1, log.read_text()
    return json.loads(lines[0])


@pytest.mark.slow  # whole sessions with real children: minutes on two cores
def test_an_evaluator_started_ahead_measures_the_same(
    cache: Path, ws: Path, tmp_path: Path, started_ahead: list[subprocess.Popen[bytes]]
) -> None:
    """Started before the checkpoint exists, it reads the data and imports torch, then scores
    the checkpoint named in its go line; the same number as a cold start. One started for
    other arguments (here the test split) is not used, and no waiting evaluator is left."""
    train, checkpoint = _checkpoint(ws, STUB, tmp_path)
    cold = _evaluate(ws, train, checkpoint, tmp_path)
    warm = _evaluate(ws, train, checkpoint, tmp_path, ahead=True)
    assert warm.status == EvalStatus.ok, warm
    assert warm.val_bpb == cold.val_bpb and warm.num_params == cold.num_params
    assert _result_line(warm.log_path)["started_ahead"] is True

    other = start_warm(ws, split="test", preset="cpu", device="cpu", dataset=active_dataset())
    assert other is not None and other.alive()
    result = _evaluate(ws, train, checkpoint, tmp_path, warm=other)
    assert result.status == EvalStatus.ok and result.val_bpb == cold.val_bpb
    assert _result_line(result.log_path)["started_ahead"] is False
    assert not other.alive()
    assert len(started_ahead) == 2 and _still_running(started_ahead) == []


def test_an_evaluator_started_ahead_exits_when_let_go(cache: Path, ws: Path) -> None:
    """Discarded before the go (its stdin closed, as when the harness dies), it exits by
    itself with status 0: discard's kill, after a grace longer than any start-up, is not what
    ends it (a killed one would say -9)."""
    warm = start_warm(ws, split="val", preset="cpu", device="cpu", dataset=active_dataset())
    assert warm is not None and warm.proc is not None
    proc = warm.proc
    warm.discard(grace=300.0)  # a hang guard, not a timing: it exits once it reads the EOF
    assert proc.returncode == 0 and not warm.alive()


# started ahead: the same verdicts through the warm evaluator, a minute more; with -m slow
@pytest.mark.parametrize(
    "ahead", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["cold", "started-ahead"]
)
@pytest.mark.parametrize(
    ("change", "words"),
    [
        (PEEK_AHEAD, "looks ahead"),
        (MIX_ROWS, "mixes rows"),
    ],
    ids=["peek-ahead", "mix-rows"],
)
def test_cheating_models_are_rejected(
    cache: Path, quick_ws: Path, tmp_path: Path, change: tuple[str, str], words: str, ahead: bool
) -> None:
    train, checkpoint = _variant(quick_ws, edit(STUB, change), tmp_path)  # the forward changes
    result = _evaluate(quick_ws, train, checkpoint, tmp_path, ahead=ahead)
    assert result.status == EvalStatus.rejected, result
    assert words in result.reason
    assert result.val_bpb is None


def test_forged_result_line_and_tensor_subclass(
    cache: Path, quick_ws: Path, tmp_path: Path
) -> None:
    """train.py prints a result line at import and exits: no number. It returns a tensor
    subclass that would rewrite the loss and replaces prepare.evaluate_bpb at import: no effect,
    since only plain float32 logits leave its model process and the metric is computed in
    another one: the honest number."""
    honest = _honest(quick_ws, tmp_path)
    assert honest.status == EvalStatus.ok, honest
    forged = edit(
        STUB,
        (
            "SEED = 42  # model init\n",
            "SEED = 42  # model init\n"
            'print(\'{"status": "ok", "val_bpb": 0.1, "nonce": "guess"}\', flush=True)\n'
            "os._exit(0)\n",
        ),
    )
    train, checkpoint = _variant(quick_ws, forged, tmp_path)
    result = _evaluate(quick_ws, train, checkpoint, tmp_path)
    assert result.status == EvalStatus.error and "ended without an answer" in result.reason
    assert result.val_bpb is None

    subclass = edit(
        STUB,
        (
            "        return self.out(self.emb(x))\n",
            "        return self.out(self.emb(x)).as_subclass(Cheat)\n",
        ),
        (
            "class Bigram(nn.Module):\n",
            "class Cheat(torch.Tensor):\n"
            "    @classmethod\n"
            "    def __torch_function__(cls, func, types, args=(), kwargs=None):\n"
            "        if func is F.cross_entropy:\n"
            "            return torch.zeros(args[0].shape[0])\n"
            "        return super().__torch_function__(func, types, args, kwargs or {})\n\n\n"
            "class Bigram(nn.Module):\n",
        ),
    )
    # Both in one train.py, one evaluation: each would only lower the number (a zero loss,
    # a metric of 0.1), so neither can hide the other, and the honest number means both failed.
    train, checkpoint = _variant(quick_ws, edit(subclass, PATCH_AT_IMPORT), tmp_path)
    result = _evaluate(quick_ws, train, checkpoint, tmp_path)
    assert result.status == EvalStatus.ok and result.val_bpb == pytest.approx(honest.val_bpb), (
        result
    )


def test_missing_or_unloadable_checkpoint(cache: Path, quick_ws: Path, tmp_path: Path) -> None:
    train, checkpoint = _checkpoint(quick_ws, STUB, tmp_path)
    missing = _evaluate(quick_ws, train, tmp_path / "nowhere.pt", tmp_path)
    assert missing.status == EvalStatus.no_checkpoint and "left no checkpoint" in missing.reason
    checkpoint.write_bytes(b"not a checkpoint")
    broken = _evaluate(quick_ws, train, checkpoint, tmp_path)
    assert broken.status == EvalStatus.no_checkpoint and "load_model" in broken.reason


@pytest.mark.parametrize("ahead", [False, True], ids=["cold", "started-ahead"])
def test_evaluator_refuses_a_changed_prepare(
    cache: Path, quick_ws: Path, tmp_path: Path, ahead: bool
) -> None:
    """Started ahead, it finds the change before the go and says so after it (with the go's
    nonce, so the harness reads the reason)."""
    train, checkpoint = _checkpoint(quick_ws, STUB, tmp_path)
    prints = Fingerprinter(quick_ws, active_dataset(), "cpu", 5.0).take()
    (quick_ws / "prepare.py").write_text(
        (quick_ws / "prepare.py").read_text() + "\nEVAL_TOKENS = 256\n"
    )
    result = _evaluate(quick_ws, train, checkpoint, tmp_path, fingerprints=prints, ahead=ahead)
    assert result.status == EvalStatus.error and "prepare.py does not match" in result.reason


# ---------------------------------------------------------------------------------------------
# The loop: the exploits as agent edits in one session


@pytest.mark.slow
def test_exploits_in_a_session_do_not_pay(private_cache: Path, ws: Path) -> None:
    steps = [
        ("more steps", lambda s: edit(s, MORE_STEPS)),
        ("skip the optimizer step, print 0.1", lambda s: edit(s, SKIP_STEP_AND_PRINT, FAKE_NUMBER)),
        ("wrap evaluate_bpb at import", lambda s: edit(s, PATCH_AT_IMPORT, FAKE_NUMBER)),
        ("own evaluate_bpb in main", lambda s: edit(s, OWN_METRIC_IN_MAIN, FAKE_NUMBER)),
        ("peek at the next token", lambda s: edit(s, PEEK_AHEAD)),
        ("no checkpoint", lambda s: edit(s, NO_CHECKPOINT)),
        ("new seed", lambda s: edit(s, SEED_ONLY)),
        ("easier validation data", lambda s: edit(s, WRITE_VAL)),
    ]
    session(ws, Scripted(steps)).run()  # boxed: the validation data are not there to write

    recs = {r["description"]: r for r in records(ws)}
    base, best = recs["baseline"], recs["more steps"]
    assert base["status"] == "keep" and best["status"] == "keep"
    assert best["val_bpb"] < base["val_bpb"] - 0.1

    skipped = recs["skip the optimizer step, print 0.1"]
    assert skipped["status"] == "discard" and skipped["val_bpb"] > base["val_bpb"]  # untrained
    assert skipped["metrics"]["reported_val_bpb"] == 0.1
    assert "the sealed evaluator measured" in skipped["extra"]["reported_disagrees"]

    wrapped = recs["wrap evaluate_bpb at import"]  # no effect: the metric is computed elsewhere
    assert wrapped["status"] == "discard" and wrapped["val_bpb"] == pytest.approx(best["val_bpb"])
    assert wrapped["metrics"]["reported_val_bpb"] == 0.1
    own = recs["own evaluate_bpb in main"]
    assert own["status"] == "discard" and own["val_bpb"] == pytest.approx(best["val_bpb"])
    assert own["metrics"]["reported_val_bpb"] == 0.1

    peek = recs["peek at the next token"]
    assert peek["status"] == "rejected" and "looks ahead" in peek["extra"]["reason"]
    assert recs["no checkpoint"]["status"] == "crash"
    assert recs["no checkpoint"]["crash_class"] == "no_checkpoint"
    seed = recs["new seed"]
    assert seed["status"] == "invalid" and "only the random seed" in seed["extra"]["reason"]
    val = recs["easier validation data"]
    assert (val["status"], val["crash_class"]) == ("crash", "other")
    assert (
        "No such file or directory" in val["extra"]["log_tail"]
        and "val" in val["extra"]["log_tail"]
    )

    # results.tsv keeps upstream's statuses; the branch is at the best; checkpoints are kept
    # for the baseline and the best only.
    tsv = {r[4].split(" (rejected")[0]: r for r in results_rows(ws, TAG)}
    assert tsv["peek at the next token"][3] == "crash"
    assert "(rejected: the model looks ahead" in tsv["peek at the next token"][4]
    assert git(ws, "rev-parse", "HEAD") == best["commit"]
    kept = sorted(p.name for p in (ws / "runs" / TAG / "checkpoints").iterdir())
    assert kept == [f"{base['id']:04d}.pt", f"{best['id']:04d}.pt"]
    assert not list((ws / "runs" / TAG).glob("*/checkpoint.pt"))
    session_json = json.loads((ws / "runs" / TAG / "session.json").read_text())
    assert session_json["sealed"] is True and "data/val.bin" in session_json["fingerprints"]


@pytest.mark.slow  # whole sessions with real children: minutes on two cores
def test_training_past_the_budget_is_not_evaluated(cache: Path, ws: Path) -> None:
    """A candidate that computes 16 CPU s after its last step line, against TIME_BUDGET 2 s
    and a 10 s grace on the cpu clock (CPU time of the run from launch): stopped once past
    12 CPU s, `crash`, class `over_budget`, never evaluated. The grace leaves the honest
    baseline room on a loaded machine (there its start-up and checkpoint took over 8 CPU s,
    contention inflating CPU time too); the hard timeout is far off, so load cannot turn this
    into a `timeout`."""
    steps = [("train past the budget", lambda s: edit(s, TRAIN_PAST_BUDGET))]
    result = session(ws, Scripted(steps), time_budget=2.0, budget_grace=10.0, timeout=600.0).run()
    assert result.reason == "agent has no more proposals (script done)"
    base, late = records(ws)
    assert base["status"] == "keep" and base["extra"]["eval_wall_s"] > 0
    assert (late["status"], late["crash_class"]) == ("crash", "over_budget")
    assert "[autoresearch] over budget: " in late["extra"]["log_tail"]
    assert (
        "CPU s since launch, past the 12 s allowed (TIME_BUDGET 2 s + 10 s"
        in (late["extra"]["log_tail"])
    )
    assert late["exit_code"] == -15
    assert "eval_wall_s" not in late["extra"] and late["val_bpb"] is None
    assert not list((ws / "runs" / TAG).glob("*/checkpoint.pt"))
    assert git(ws, "rev-parse", "HEAD") == base["commit"]


def test_training_before_the_first_step_line_is_not_evaluated(cache: Path, quick_ws: Path) -> None:
    """A candidate that trains for 16 CPU s before its first step line, against TIME_BUDGET
    2 s and a 10 s grace on the cpu clock, which counts from launch: stopped once past
    12 CPU s, `crash`, class `over_budget`, never evaluated; the baseline (with room for a
    loaded machine's start-up) is kept. No wall-clock limit decides it, so a loaded machine
    gives the same verdict."""
    steps = [("train before the clock starts", lambda s: edit(s, TRAIN_BEFORE_FIRST_STEP))]
    result = session(
        quick_ws, Scripted(steps), time_budget=2.0, budget_grace=10.0, timeout=600.0
    ).run()
    assert result.reason == "agent has no more proposals (script done)"
    base, early = records(quick_ws)
    assert base["status"] == "keep" and base["val_bpb"] is not None
    assert (early["status"], early["crash_class"]) == ("crash", "over_budget")
    tail = early["extra"]["log_tail"]
    assert "[autoresearch] over budget: " in tail and "CPU s since launch" in tail
    assert early["exit_code"] == -15
    assert "eval_wall_s" not in early["extra"] and early["val_bpb"] is None
    assert not list((quick_ws / "runs" / TAG).glob("*/checkpoint.pt"))
    assert git(quick_ws, "rev-parse", "HEAD") == base["commit"]


@pytest.mark.slow  # whole sessions with real children: minutes on two cores
def test_a_session_starting_evaluators_ahead(
    cache: Path, ws: Path, started_ahead: list[subprocess.Popen[bytes]]
) -> None:
    """With start_ahead (the default on cuda) each run's evaluator starts with the run: the
    records are what a cold evaluator gives, and no waiting evaluator outlives the session."""
    steps = [
        ("more steps", lambda s: edit(s, MORE_STEPS)),
        ("peek at the next token", lambda s: edit(s, PEEK_AHEAD)),
        ("no checkpoint", lambda s: edit(s, NO_CHECKPOINT)),
    ]
    session(ws, Scripted(steps), start_ahead=True).run()
    recs = {r["description"]: r for r in records(ws)}
    assert recs["baseline"]["status"] == "keep" and recs["more steps"]["status"] == "keep"
    assert recs["more steps"]["val_bpb"] < recs["baseline"]["val_bpb"] - 0.1
    peek = recs["peek at the next token"]
    assert peek["status"] == "rejected" and "looks ahead" in peek["extra"]["reason"]
    assert recs["no checkpoint"]["crash_class"] == "no_checkpoint"
    eval_logs = sorted((ws / "runs" / TAG).glob("*/run.eval.log"))
    assert len(eval_logs) == 3  # the run without a checkpoint was not evaluated
    assert all(_result_line(log)["started_ahead"] is True for log in eval_logs)
    assert len(started_ahead) >= 3 and _still_running(started_ahead) == []


@pytest.mark.slow  # whole sessions with real children: minutes on two cores
def test_resume_kills_an_evaluator_a_killed_session_left(cache: Path, ws: Path) -> None:
    """A session killed with -9 during an evaluation leaves the evaluator (started ahead, under
    a marker of its own, recorded as eval_marker) running; the resume kills it."""
    session(ws, Scripted([])).run()  # the baseline, so there is a session to resume
    marker = "eval-orphan-" + os.urandom(4).hex()
    orphan = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)"],
        env={**os.environ, runner.RUN_MARKER_VAR: marker},
        start_new_session=True,
    )
    try:
        ledger_state = ws / "runs" / TAG / "state.json"
        ledger_state.write_text(json.dumps({"phase": "training", "id": 1, "eval_marker": marker}))
        session(ws, Scripted([]), resume=True).run()
        assert orphan.wait(timeout=30) == -9  # SIGKILLed by the resume
    finally:
        orphan.kill()
        orphan.wait()


@pytest.mark.slow  # whole sessions with real children: minutes on two cores
def test_prepare_edited_between_runs_stops_the_session(cache: Path, ws: Path) -> None:
    def tamper(source: str) -> str:
        prepare = ws / "prepare.py"
        prepare.write_text(prepare.read_text().replace("2**16", "2**8"))
        return edit(source, MORE_STEPS)

    with pytest.raises(FingerprintError) as stopped:
        session(ws, Scripted([("more steps", tamper)])).run()
    message = str(stopped.value)
    assert "prepare.py changed since the session started" in message
    assert "before experiment 0002 trained" in message and "--resume --tag sealed" in message
    assert [r["status"] for r in records(ws)] == ["keep"]  # experiment 2 never trained


@pytest.mark.slow
def test_confirm_prints_baseline_and_best_on_test(cache: Path, ws: Path) -> None:
    session(ws, Scripted([("more steps", lambda s: edit(s, MORE_STEPS))])).run()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "COLUMNS": "120"}

    def confirm(*extra: str, env: dict) -> tuple[subprocess.CompletedProcess, dict]:
        """`autoresearch confirm` in a child, and the confirm record it left."""
        proc = subprocess.run(
            [sys.executable, "-m", "autoresearch", "confirm", "--tag", TAG, *extra,
             "--workspace", str(ws)],
            cwd=ws, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        return proc, json.loads((ws / "runs" / TAG / "session.json").read_text()).get("confirm")

    proc, record = confirm(env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "held-out test split" in proc.stdout
    assert "baseline" in proc.stdout and "best" in proc.stdout and "Δ" in proc.stdout
    rows = record["rows"]
    assert [r["role"] for r in rows] == ["baseline", "best"]
    assert all(r["status"] == "ok" for r in rows)
    assert rows[1]["test_bpb"] < rows[0]["test_bpb"]
    assert record["boxed"]

    # Where the box is missing (no bwrap on PATH), confirm refuses as the session would,
    # before any evaluation, unless told --unsandboxed.
    bare = ws.parent / "bare-bin"
    bare.mkdir()
    (bare / "git").symlink_to(shutil.which("git"))
    no_box = {**env, "PATH": str(bare)}
    refused, _ = confirm(env=no_box)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "bubblewrap" in refused.stderr and "--unsandboxed" in refused.stderr
    assert "evaluating" not in refused.stdout
    allowed, again = confirm("--unsandboxed", env=no_box)
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert again["boxed"] is False  # recorded: this confirm ran without the box
    assert [r["test_bpb"] for r in again["rows"]] == pytest.approx([r["test_bpb"] for r in rows])


# ---------------------------------------------------------------------------------------------
# Small pieces


def test_seed_only_change() -> None:
    assert seed_only_change(STUB, edit(STUB, SEED_ONLY)) == ["SEED"]
    assert seed_only_change(STUB, edit(STUB, SEED_ONLY, MORE_STEPS)) == []
    assert seed_only_change(STUB, edit(STUB, MORE_STEPS)) == []
    manual = ("torch.manual_seed(SEED)", "torch.manual_seed(7)")
    assert seed_only_change(STUB, edit(STUB, manual)) == ["manual_seed()"]
    loader = (
        'make_dataloader(8, MAX_SEQ_LEN, "train")',
        'make_dataloader(8, MAX_SEQ_LEN, "train", seed=3)',
    )
    with_seed = edit(STUB, loader)
    assert seed_only_change(STUB, with_seed) == []  # a new argument is more than a seed
    assert seed_only_change(with_seed, with_seed.replace("seed=3", "seed=4")) == ["seed"]
    assert seed_only_change(STUB, STUB.replace("# model init", "# init")) == []
    assert seed_only_change(STUB, "def broken(:\n") == []


def test_rejected_is_crash_in_results_tsv() -> None:
    exp = Experiment(
        id=3,
        status="rejected",
        description="peek",
        commit="abcdef0123",
        parent="",
        val_bpb=None,
        memory_gb=0.0,
        best_before=1.0,
        threshold=0.0,
        extra={"reason": "the model looks ahead: changing the tokens after position 5"},
    )
    assert tsv_row(exp).split("\t") == [
        "abcdef0",
        "0.000000",
        "0.0",
        "crash",
        "peek (rejected: the model looks ahead: changing the tokens after position 5)",
    ]


def test_fingerprints_name_what_changed(private_cache: Path, ws: Path) -> None:
    dataset = active_dataset()
    prints = Fingerprinter(ws, dataset, "cpu", 5.0)
    recorded = prints.take()
    assert set(recorded) == {
        "prepare.py",
        "data/manifest.json",
        "data/tokenizer.pkl",
        "data/token_bytes.npy",
        "data/val.bin",
        "data/test.bin",
        "preset",
    }
    prints.check(recorded, tag="t", when="now")
    with pytest.raises(FingerprintError, match="preset changed"):
        Fingerprinter(ws, dataset, "cpu", 6.0).check(recorded, tag="t", when="now")
    with open(dataset / "test.bin", "r+b") as f:
        f.write(b"\0\0")
    with pytest.raises(FingerprintError, match="test.bin changed.*prepare --force"):
        prints.check(recorded, tag="t", when="now")


@pytest.mark.skipif(not runner.network_isolation().prefix, reason="no network isolation here")
def test_training_child_has_no_network(tmp_path: Path) -> None:
    """The harness's own localhost server is unreachable from an isolated child."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    accept = threading.Thread(target=lambda: server.accept(), daemon=True)
    accept.start()
    probe = (
        "import socket, sys\n"
        "try:\n"
        f"    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
        "    print('connected')\n"
        "except OSError as e:\n"
        "    print('no network:', e)\n"
    )
    script = tmp_path / "probe.py"
    script.write_text(probe)
    env = runner.child_env(dict(os.environ), preset="cpu", device="cpu", gpu=None)
    plain = runner.run_training(
        tmp_path, tmp_path / "plain.log", command=[sys.executable, str(script)], env=env, timeout=30
    )
    isolated = runner.run_training(
        tmp_path,
        tmp_path / "isolated.log",
        command=[*runner.network_isolation().prefix, sys.executable, str(script)],
        env=env,
        timeout=30,
    )
    server.close()
    assert "connected" in plain.log_tail
    assert isolated.exit_code == 0 and "no network" in isolated.log_tail
