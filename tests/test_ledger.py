"""ledger: the record survives kills and full disks; results.tsv follows experiments.jsonl."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autoresearch import ledger as ledger_module
from autoresearch.errors import AutoresearchError
from autoresearch.ledger import (
    JSONL_FILE,
    STATUSES,
    TSV_HEADER,
    Experiment,
    Ledger,
    LedgerError,
    decision_of,
    tsv_row,
)
from autoresearch.status import CrashClass, Status

SHA = "0123456789abcdef0123456789abcdef01234567"
PARENT = "fedcba9876543210fedcba9876543210fedcba98"


def make(id: int, status: str = "discard", val_bpb: float | None = 1.0, **kw: object) -> Experiment:
    base: dict = dict(
        description=f"experiment {id}",
        commit=SHA,
        parent=PARENT,
        memory_gb=2.0,
        best_before=1.1,
        threshold=0.0,
    )
    base.update(kw)
    return Experiment(id=id, status=status, val_bpb=val_bpb, **base)


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    return Ledger(tmp_path / "runs" / "mytag")


def tsv_lines(ledger: Ledger) -> list[str]:
    return ledger.tsv_path.read_text().splitlines()


def test_nothing_is_written_until_asked(ledger: Ledger) -> None:
    assert ledger.experiments() == [] and ledger.best() is None and ledger.next_id() == 1
    assert ledger.read_state() is None and ledger.read_session() is None
    assert not ledger.run_dir.exists()


def test_round_trip_and_tsv(ledger: Ledger) -> None:
    baseline = make(1, "keep", 1.0, best_before=None, metrics={"val_bpb": 1.0, "depth": 8.0})
    crash = make(2, "crash", None, crash_class="oom", exit_code=1, metrics={"val_bpb": math.nan})
    invalid = make(3, "invalid", None, commit=None, description="tab\there\nnewline")
    better = make(
        4, "keep", 0.987654321, memory_gb=44.0039, agent={"name": "tuner"}, extra={"noise": 0.01}
    )
    for exp in (baseline, crash, invalid, better):
        ledger.append(exp)

    got = ledger.experiments()
    assert got[0] == baseline and got[2] == invalid and got[3] == better
    assert got[1].metrics == {"val_bpb": None}  # NaN is recorded as null: JSON has no NaN
    assert ledger.get(3) == invalid and ledger.get(99) is None
    assert ledger.best() == better and ledger.next_id() == 5
    assert tsv_lines(ledger) == [
        TSV_HEADER,
        "0123456\t1.000000\t2.0\tkeep\texperiment 1",
        "0123456\t0.000000\t2.0\tcrash\texperiment 2",
        "-\t0.000000\t2.0\tinvalid\ttab here newline",
        "0123456\t0.987654\t44.0\tkeep\texperiment 4",
    ]
    for line in ledger.jsonl_path.read_text().splitlines():
        json.loads(line)  # strict JSON, one object per line


def test_best_is_the_latest_keep(ledger: Ledger) -> None:
    ledger.append(make(1, "keep", 1.0))
    ledger.append(make(2, "keep", 0.9))
    ledger.append(make(3, "discard", 0.8))  # lower, but not kept (e.g. above the threshold)
    ledger.append(make(4, "crash", None))
    best = ledger.best()
    assert best is not None and best.id == 2


def test_the_baseline_is_the_first_keep_and_a_crashed_one_until_then(ledger: Ledger) -> None:
    assert ledger.baseline() is None
    ledger.append(make(1, "crash", None))  # the baseline crashed
    assert ledger.baseline().id == 1 and ledger.best() is None
    ledger.append(make(2, "keep", 1.0))  # trained again after the fix (--resume)
    ledger.append(make(3, "keep", 0.9))
    assert ledger.baseline().id == 2 and ledger.best().id == 3


def test_append_rejects_duplicates_and_unknown_statuses(ledger: Ledger) -> None:
    ledger.append(make(1, "keep"))
    with pytest.raises(ValueError):
        ledger.append(make(1, "discard"))
    with pytest.raises(ValueError):
        ledger.append(make(2, "kept"))
    assert len(ledger.experiments()) == 1


def test_torn_last_line_is_ignored_then_healed(ledger: Ledger) -> None:
    ledger.append(make(1, "keep"))
    ledger.append(make(2))
    with open(ledger.jsonl_path, "ab") as f:  # kill -9 in the middle of writing line 3
        f.write(b'{"id": 3, "status": "disc')
    assert [e.id for e in ledger.experiments()] == [1, 2]
    assert ledger.next_id() == 3

    ledger.append(make(3))
    assert [e.id for e in ledger.experiments()] == [1, 2, 3]
    lines = ledger.jsonl_path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and all(json.loads(line) for line in lines[:-1])
    assert (
        ledger.run_dir / "experiments.jsonl.torn"
    ).read_bytes() == b'{"id": 3, "status": "disc\n'
    assert len(tsv_lines(ledger)) == 4


def test_whole_last_record_without_newline_is_kept(ledger: Ledger) -> None:
    ledger.append(make(1, "keep"))
    data = ledger.jsonl_path.read_bytes()
    ledger.jsonl_path.write_bytes(data + data.replace(b'"id": 1', b'"id": 2').rstrip(b"\n"))
    assert [e.id for e in ledger.experiments()] == [1, 2]
    ledger.append(make(3))
    assert [e.id for e in ledger.experiments()] == [1, 2, 3]


def test_damaged_middle_line_is_an_error(ledger: Ledger) -> None:
    ledger.append(make(1, "keep"))
    with open(ledger.jsonl_path, "ab") as f:
        f.write(b"garbage\n")
    with pytest.raises(LedgerError, match="line 2"):
        ledger.experiments()
    with pytest.raises(LedgerError, match="line 2"):
        ledger.append(make(2))  # never write after damage it did not make


def test_tsv_rebuilt_after_a_kill_between_the_two_writes(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger.append(make(1, "keep"))

    def killed(self: Ledger) -> None:
        raise SystemExit("killed between the jsonl and the tsv")

    with monkeypatch.context() as m:
        m.setattr(Ledger, "rebuild_tsv", killed)
        with pytest.raises(SystemExit):
            ledger.append(make(2))
    assert len(tsv_lines(ledger)) == 2  # stale: the kill came before the tsv
    assert [e.id for e in ledger.experiments()] == [1, 2]  # but the record has it

    ledger.rebuild_tsv()
    assert len(tsv_lines(ledger)) == 3
    ledger.tsv_path.unlink()
    ledger.append(make(3))  # and any later append heals it too
    assert [line.split("\t")[3] for line in tsv_lines(ledger)[1:]] == ["keep", "discard", "discard"]


def _enospc(*args: object, **kwargs: object) -> int:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_on_append_leaves_the_record_intact(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger.append(make(1, "keep"))
    before_jsonl, before_tsv = ledger.jsonl_path.read_bytes(), ledger.tsv_path.read_bytes()
    with monkeypatch.context() as m:
        m.setattr(os, "write", _enospc)
        with pytest.raises(LedgerError, match="disk full") as raised:
            ledger.append(make(2))
    assert isinstance(raised.value, AutoresearchError)
    assert "--resume --tag mytag" in str(raised.value)
    assert ledger.jsonl_path.read_bytes() == before_jsonl
    assert ledger.tsv_path.read_bytes() == before_tsv
    ledger.append(make(2))  # space is back: recording goes on
    assert [e.id for e in ledger.experiments()] == [1, 2]


def test_disk_full_mid_line_is_cut_back(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    ledger.append(make(1, "keep"))
    before = ledger.jsonl_path.read_bytes()
    real_write = os.write
    calls = 0

    def half_then_full(fd: int, data: bytes) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            return real_write(fd, bytes(data[:10]))  # a short write ...
        raise OSError(errno.ENOSPC, "No space left on device")  # ... then the disk is full

    with monkeypatch.context() as m:
        m.setattr(os, "write", half_then_full)
        with pytest.raises(LedgerError, match="disk full"):
            ledger.append(make(2))
    assert ledger.jsonl_path.read_bytes() == before


def test_disk_full_on_tsv_keeps_the_jsonl_record(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger.append(make(1, "keep"))
    before_tsv = ledger.tsv_path.read_bytes()
    real_write = os.write
    calls = 0

    def jsonl_ok_then_full(fd: int, data: bytes) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            return real_write(fd, data)
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "write", jsonl_ok_then_full)
        with pytest.raises(LedgerError, match="disk full"):
            ledger.append(make(2))
    assert [e.id for e in ledger.experiments()] == [1, 2]
    assert ledger.tsv_path.read_bytes() == before_tsv  # the old table, whole; no temp left over
    assert sorted(p.name for p in ledger.run_dir.iterdir()) == ["experiments.jsonl", "results.tsv"]


def test_artifacts_are_written_atomically(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    path = ledger.write_artifact(7, "reply.txt", "first")
    assert path == ledger.run_dir / "0007" / "reply.txt" and path.read_text() == "first"
    assert ledger.write_artifact(7, "run.log", b"\x00\xff").read_bytes() == b"\x00\xff"
    with monkeypatch.context() as m:
        m.setattr(os, "write", _enospc)
        with pytest.raises(LedgerError, match="disk full"):
            ledger.write_artifact(7, "reply.txt", "second")
    assert path.read_text() == "first"
    assert sorted(p.name for p in path.parent.iterdir()) == ["reply.txt", "run.log"]
    for bad in ("", "..", "a/b"):
        with pytest.raises(ValueError):
            ledger.write_artifact(7, bad, "x")
    assert ledger.experiment_dir(12345).name == "12345"


def test_state_and_session(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    ledger.write_state({"phase": "training", "id": 3, "commit": SHA})
    assert ledger.read_state() == {"phase": "training", "id": 3, "commit": SHA}
    with monkeypatch.context() as m:
        m.setattr(os, "write", _enospc)
        with pytest.raises(LedgerError):
            ledger.write_state({"phase": "proposing", "id": 4})
    assert ledger.read_state() == {"phase": "training", "id": 3, "commit": SHA}
    ledger.write_state(None)
    assert ledger.read_state() is None
    ledger.write_state(None)  # idempotent

    ledger.update_session(tag="mytag", base=PARENT)
    assert ledger.update_session(ended="now") == {"tag": "mytag", "base": PARENT, "ended": "now"}
    assert ledger.read_session() == {"tag": "mytag", "base": PARENT, "ended": "now"}
    (ledger.run_dir / "state.json").write_text("{not json")
    with pytest.raises(LedgerError, match="move it away"):
        ledger.read_state()


def test_unknown_fields_from_a_newer_writer_are_kept_in_extra(ledger: Ledger) -> None:
    record = json.loads(ledger_module._to_line(make(1, "keep")))
    record["noise_sigma"] = 0.002
    ledger.run_dir.mkdir(parents=True)
    ledger.jsonl_path.write_text(json.dumps(record) + "\n")
    assert ledger.experiments()[0].extra == {"noise_sigma": 0.002}


def test_tsv_row_of_an_unmeasured_discard() -> None:
    assert tsv_row(make(1, "discard", math.nan, memory_gb=math.inf)) == (
        "0123456\t0.000000\t0.0\tdiscard\texperiment 1"
    )


APPENDER = """
import sys
from pathlib import Path
from autoresearch.ledger import Experiment, Ledger

ledger = Ledger(Path(sys.argv[1]))
for i in range(1, 100_000):
    ledger.append(Experiment(id=i, status="discard", description="x" * 2000, commit=None,
                             parent="p", val_bpb=1.0, memory_gb=0.0, best_before=1.0,
                             threshold=0.0))
"""


def test_real_kill_9_while_appending(ledger: Ledger) -> None:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    child = subprocess.Popen([sys.executable, "-c", APPENDER, str(ledger.run_dir)], env=env)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # wait for progress, then kill at a random instant
            if ledger.jsonl_path.exists() and ledger.jsonl_path.stat().st_size > 50_000:
                break
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    ids = [e.id for e in ledger.experiments()]
    assert len(ids) >= 20 and ids == list(range(1, len(ids) + 1))
    ledger.append(make(len(ids) + 1))
    assert [e.id for e in ledger.experiments()] == list(range(1, len(ids) + 2))
    assert len(tsv_lines(ledger)) == len(ids) + 2


# ------------------------------------------------------------------- declared values, enums


def test_older_records_load_with_the_declared_extra_fields(tmp_path: Path):
    """Records written by earlier versions: one without `extra` at all, one with an older
    key set (no `verdict`, `incumbent_runs` as a list) and a key of its own at the top level,
    one from a newer writer with a key this version does not declare. Each loads; declared
    values read as attributes with their defaults where absent; nothing is lost on rewrite."""
    run_dir = tmp_path / "runs" / "old"
    run_dir.mkdir(parents=True)
    base = {"description": "d", "commit": "a" * 40, "parent": "b" * 40, "memory_gb": 1.0}
    lines = [
        {"id": 1, "status": "keep", "val_bpb": 1.0, **base},
        {
            "id": 2, "status": "discard", "val_bpb": 1.01, "best_before": 1.0, **base,
            "extra": {"runs": [1.01], "incumbent_runs": [1.0], "sigma": 0.002},
            "noise_sigma": 0.002,
        },
        {
            "id": 3, "status": "crash", "val_bpb": None, "crash_class": "oom", **base,
            "extra": {"log_tail": "CUDA out of memory", "from_the_future": {"x": 1}},
        },
    ]  # fmt: skip
    (run_dir / JSONL_FILE).write_text("".join(json.dumps(r) + "\n" for r in lines))
    first, second, third = Ledger(run_dir).experiments()

    assert first.extra.verdict is None and first.extra.cost_usd is None
    assert "cost_usd" not in first.extra and len(first.extra) == 0
    assert second.extra.runs == [1.01] and second.extra.incumbent_runs == [1.0]
    assert second.extra.get("verdict") is None and second.extra["noise_sigma"] == 0.002
    assert decision_of(second).incumbent_runs == 1
    assert third.extra.log_tail == "CUDA out of memory"
    assert third.extra["from_the_future"] == {"x": 1}
    assert third.status is Status.crash and third.crash_class is CrashClass.oom

    again = Ledger(tmp_path / "runs" / "copy")
    for exp in (first, second, third):
        again.append(exp)
    written = [json.loads(x) for x in (again.run_dir / JSONL_FILE).read_text().splitlines()]
    assert written[0]["extra"] == {}
    assert written[1]["extra"] == {
        "runs": [1.01], "incumbent_runs": [1.0], "sigma": 0.002, "noise_sigma": 0.002,
    }  # fmt: skip
    assert written[2]["extra"]["from_the_future"] == {"x": 1}
    assert written[2]["status"] == "crash" and written[2]["crash_class"] == "oom"


def test_where_a_run_trained_is_declared_and_older_records_without_it_load(tmp_path: Path):
    """`slot`, `card`, `node`, `rebased` and `eval_wall_s` (a session of slots, a Ray node, a
    sealed evaluation) are declared values: a record written before they were (without them)
    loads with None, and one with them reads them as attributes (not as undeclared keys) and
    writes them back unchanged."""
    run_dir = tmp_path / "runs" / "where"
    run_dir.mkdir(parents=True)
    base = {"description": "d", "commit": "a" * 40, "parent": "b" * 40, "memory_gb": 1.0}
    rebased = {"commit": "c" * 40, "parent": "d" * 40, "runs": [0.99]}
    where = {
        "slot": "1", "card": "1: NVIDIA H100 80GB HBM3", "node": "host-b",
        "rebased": rebased, "eval_wall_s": 2.14, "session_s": 310.5, "gpu_busy_s": 290.0,
    }  # fmt: skip
    lines = [
        {"id": 1, "status": "keep", "val_bpb": 1.0, **base, "extra": {"session_s": 60.0}},
        {"id": 2, "status": "keep", "val_bpb": 0.99, "best_before": 1.0, **base, "extra": where},
    ]
    (run_dir / JSONL_FILE).write_text("".join(json.dumps(r) + "\n" for r in lines))
    older, newer = Ledger(run_dir).experiments()

    names = ("slot", "card", "node", "rebased", "eval_wall_s")
    assert [getattr(older.extra, name) for name in names] == [None] * 5
    assert not any(name in older.extra for name in names)
    assert [getattr(newer.extra, name) for name in names] == [where[name] for name in names]
    assert newer.extra.other == {}  # every key declared

    again = Ledger(tmp_path / "runs" / "copy")
    again.append(older)
    again.append(newer)
    written = [json.loads(x) for x in (again.run_dir / JSONL_FILE).read_text().splitlines()]
    assert written[0]["extra"] == {"session_s": 60.0}
    assert written[1]["extra"] == where


def test_statuses_are_enums_that_read_and_write_as_their_words(tmp_path: Path):
    ledger = Ledger(tmp_path / "runs" / "t")
    exp = Experiment(1, "keep", "baseline", "a" * 40, "a" * 40, 1.0, 0.0, None, 0.0)
    assert exp.status is Status.keep and exp.status == "keep" and f"{exp.status:<5}|" == "keep |"
    exp.extra["cost_usd"] = None  # an unknown price, recorded as such
    ledger.append(exp)
    back = ledger.experiments()[0]
    assert back.status is Status.keep and "cost_usd" in back.extra
    assert json.loads((ledger.run_dir / JSONL_FILE).read_text())["extra"] == {"cost_usd": None}
    assert STATUSES == tuple(s.value for s in Status if s is not Status.running)


def test_every_crash_class_the_runner_and_evaluator_name_is_a_crashclass():
    """Until runner.py and evaluator.py spell them as CrashClass members, their own lists
    must not drift from it."""
    from autoresearch import evaluator, runner

    named = set(runner.CRASH_CLASSES) | set(evaluator.CRASH_CLASSES) | {"rejected"}
    assert named == {c.value for c in CrashClass}


def test_a_discard_with_a_reason_of_its_own_says_it_not_within_noise():
    """A candidate that beat its own base but no longer merges onto the new best (scale-out)
    is discarded with a reason: `show` and the report give that reason, not a noise verdict
    its numbers contradict."""
    base = dict(description="d", commit="a" * 40, parent="b" * 40, memory_gb=0.0)
    reason = "beat its base bbbbbbb, but no longer applies to the new best ccccccc"
    stale = Experiment(
        id=4, status=Status.discard, val_bpb=0.9, best_before=1.0, threshold=0.01,
        extra={"runs": [0.9], "incumbent_runs": 1, "paired_sigma": 0.004, "reason": reason},
        **base,
    )  # fmt: skip
    assert decision_of(stale).reason == f"discarded: {reason}"
    plain = Experiment(
        id=5, status=Status.discard, val_bpb=0.995, best_before=1.0, threshold=0.01,
        extra={"runs": [0.995], "incumbent_runs": 1, "paired_sigma": 0.004}, **base,
    )  # fmt: skip
    assert "within noise" in decision_of(plain).reason
