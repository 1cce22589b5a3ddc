"""The keep rule on a real cpu session (bench/keep_rule_check.py, small): a replayed neutral
refactor is not kept, undoing a detuned learning rate is. Two steps a run (a budget shorter
than one step), so the outcome does not depend on the machine's load."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_real_session_keeps_the_good_change_and_not_the_neutral_one(
    stdlib_prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [n for n in os.environ if n.startswith("AUTORESEARCH_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(stdlib_prepared))
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import keep_rule_check

    result = keep_rule_check.run_check(tmp_path, budget=0.01, calibrate=2, max_repeats=2, count=2)
    kinds = [(r["kind"], r["status"]) for r in result["candidates"]]
    assert kinds == [("neutral", "discard"), ("good", "keep")], result
    assert all(len(r["seeds"]) == len(r["paired_gains"]) for r in result["candidates"])
    sys.modules.pop("keep_rule_check", None)
