"""evaluator.WarmKey: what an evaluator started ahead must match to be used; the evaluator's
result statuses (evalproto.EvalStatus) on the wire and in the harness."""

from __future__ import annotations

import inspect
import json
from dataclasses import fields
from pathlib import Path

from autoresearch.evalproto import STATUSES, EvalStatus
from autoresearch.evaluator import (
    EvalResult,
    WarmKey,
    _parse_result,
    evaluate_checkpoint,
    sealed_outcome,
    start_warm,
)
from autoresearch.runner import RunResult
from autoresearch.status import CrashClass

BASE = {
    "root": Path("/ws"),
    "split": "val",
    "preset": "cpu",
    "device": "cpu",
    "fingerprints": {"prepare.py": "ab", "data/val.bin": "cd"},
    "dataset": Path("/cache/ds"),
    "gpu": None,
    "prefix": (),
    "boxed": True,
}
OTHER = {
    "root": Path("/other"),
    "split": "test",
    "preset": "gpu",
    "device": "cuda",
    "fingerprints": {"prepare.py": "ab", "data/val.bin": "ef"},
    "dataset": Path("/cache/other"),
    "gpu": "1",
    "prefix": ("unshare", "--net"),
    "boxed": False,
}


def test_the_key_covers_every_argument_of_start_warm_but_the_marker() -> None:
    """A parameter added to or renamed in start_warm must be added to the key (or this fails):
    otherwise an evaluator started for other arguments could serve an evaluation."""
    started_with = set(inspect.signature(start_warm).parameters) - {"marker"}
    assert {f.name for f in fields(WarmKey)} == started_with == set(BASE)
    # and evaluate_checkpoint has each of them, under the same name, to build its own key
    assert started_with <= set(inspect.signature(evaluate_checkpoint).parameters)


def test_each_argument_changes_the_key_and_nothing_else_does() -> None:
    base = WarmKey.of(**BASE)
    for name, value in OTHER.items():
        assert WarmKey.of(**{**BASE, name: value}) != base, name
    same = {
        **BASE,
        "root": "/ws",
        "dataset": "/cache/ds",
        "prefix": [],
        "fingerprints": dict(reversed(list(BASE["fingerprints"].items()))),
    }
    assert WarmKey.of(**same) == base  # a path as text, a list for a tuple, another dict order
    assert WarmKey.of(**{**BASE, "fingerprints": None}) == WarmKey.of(
        **{**BASE, "fingerprints": {}}
    )


def test_the_statuses_are_written_and_read_as_the_words_they_replaced() -> None:
    """The result line is a contract with evaluators already started (and model_server.py,
    which does not import the package and says `fail no_checkpoint ...` as a string): a member
    serialises byte for byte as its word, and a line read back yields the member."""
    assert [s.value for s in STATUSES] == ["ok", "rejected", "no_checkpoint", "error"]
    assert json.dumps({"status": EvalStatus.no_checkpoint}) == '{"status": "no_checkpoint"}'
    assert f"{EvalStatus.error}: why" == "error: why" and "rejected" in STATUSES
    line = json.dumps({"status": "rejected", "nonce": "n", "reason": "looks ahead"})
    result = _parse_result(["noise", line, '{"status": "won", "nonce": "n"}'], "n")
    assert result is not None and EvalStatus(result["status"]) is EvalStatus.rejected


def _run() -> RunResult:
    return RunResult(0, {"val_bpb": 1.1}, None, 10.0, Path("train.log"), "tail", None)


def _eval(status: EvalStatus, val_bpb: float | None = None, reason: str = "") -> EvalResult:
    return EvalResult(status, val_bpb, 10, status is not EvalStatus.rejected, 1.0, 2.0, reason,
                      None)  # fmt: skip


def test_each_status_becomes_the_record_it_stands_for() -> None:
    ok, _ = sealed_outcome(_run(), _eval(EvalStatus.ok, 1.2))
    assert ok.crash_class is None and ok.summary["val_bpb"] == 1.2
    assert ok.summary["reported_val_bpb"] == 1.1
    nan, _ = sealed_outcome(_run(), _eval(EvalStatus.ok, float("nan")))
    assert nan.crash_class is CrashClass.nan
    cases = {
        EvalStatus.rejected: CrashClass.rejected,
        EvalStatus.no_checkpoint: CrashClass.no_checkpoint,
        EvalStatus.error: CrashClass.eval,
    }
    for status, crash_class in cases.items():
        run, notes = sealed_outcome(_run(), _eval(status, reason=f"{status} because"))
        assert run.crash_class is crash_class and notes["reason"] == f"{status} because"
    stopped, _ = sealed_outcome(_run(), _eval(EvalStatus.error, reason="interrupted"))
    assert stopped.crash_class is CrashClass.interrupted
