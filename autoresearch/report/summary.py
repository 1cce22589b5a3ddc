"""The record read for the report: the summary numbers, the baseline and the best, which diffs
of train.py the page shows and their text from git, `confirm --horizon`'s record.

Only reads: the ledger's experiments are passed in, git is asked for diffs and the horizon
file is read; nothing is written. A diff git cannot give (a pruned attempt ref) is left out
of the result, not an error.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from autoresearch import gitrepo
from autoresearch.errors import WorkspaceError
from autoresearch.horizon import FILE as HORIZON_FILE
from autoresearch.ledger import Experiment
from autoresearch.ledger import baseline_of as ledger_baseline_of
from autoresearch.status import Status

TRAIN_FILE = "train.py"

DiffKey = tuple[str, str]  # (from commit, to commit)


@dataclass(frozen=True)
class Summary:
    """The numbers at the top of the report. Fields are None when the record lacks them."""

    experiments: int
    counts: dict[str, int]
    baseline: float | None
    best: float | None
    best_id: int | None
    train_seconds: float
    tokens_in: int
    tokens_out: int
    cost_usd: float | None  # sum over experiments that recorded extra.cost_usd
    cost_unknown: int  # experiments run by an agent with no recorded cost
    started_at: str | None
    ended_at: str | None

    @property
    def delta(self) -> float | None:
        if self.baseline is None or self.best is None:
            return None
        return self.best - self.baseline


def in_order(experiments: Sequence[Experiment]) -> list[Experiment]:
    return sorted(experiments, key=lambda e: e.id)


def baseline_of(experiments: Sequence[Experiment]) -> Experiment | None:
    """The unmodified train.py, measured: ledger.baseline_of over the experiments in order."""
    return ledger_baseline_of(in_order(experiments))


def best_of(experiments: Sequence[Experiment]) -> Experiment | None:
    """The kept experiment with the lowest val_bpb (the earliest on a tie), or None."""
    kept = [e for e in in_order(experiments) if e.status == Status.keep and e.val_bpb is not None]
    return min(kept, key=lambda e: e.val_bpb) if kept else None


def summarize(experiments: Sequence[Experiment]) -> Summary:
    """Counts, baseline, best and totals over the whole record."""
    base, best = baseline_of(experiments), best_of(experiments)
    costs = [
        e.extra["cost_usd"] for e in experiments if (e.extra or {}).get("cost_usd") is not None
    ]
    with_agent = [e for e in experiments if e.agent]
    return Summary(
        experiments=len(experiments),
        counts=dict(Counter(e.status for e in experiments)),
        baseline=base.val_bpb if base else None,
        best=best.val_bpb if best else None,
        best_id=best.id if best else None,
        train_seconds=sum(e.train_seconds or 0.0 for e in experiments),
        tokens_in=sum(int(e.agent.get("tokens_in") or 0) for e in with_agent),
        tokens_out=sum(int(e.agent.get("tokens_out") or 0) for e in with_agent),
        cost_usd=sum(costs) if costs else None,
        cost_unknown=sum(1 for e in with_agent if (e.extra or {}).get("cost_usd") is None),
        started_at=min((e.started_at for e in experiments if e.started_at), default=None),
        ended_at=max((e.ended_at for e in experiments if e.ended_at), default=None),
    )


def diff_pairs(experiments: Sequence[Experiment]) -> list[DiffKey]:
    """The (from, to) commits the report shows: baseline -> best, then each kept change."""
    base, best = baseline_of(experiments), best_of(experiments)
    pairs: list[DiffKey] = []
    if base and best and base.commit and best.commit and base.commit != best.commit:
        pairs.append((base.commit, best.commit))
    for e in in_order(experiments):
        if e.status == Status.keep and e.id != base.id and e.parent and e.commit:
            pairs.append((e.parent, e.commit))
    return pairs


def git_diffs(workspace: Path, pairs: Sequence[DiffKey]) -> dict[DiffKey, str]:
    """`git diff a b -- train.py` for each pair git can answer; pairs it cannot are left out."""
    return gitrepo.diffs(workspace, TRAIN_FILE, list(dict.fromkeys(pairs)))


def read_horizon(run_dir: Path) -> dict | None:
    """The confirm-horizon record of a session, or None when `confirm --horizon` never ran;
    WorkspaceError when the file is there but unreadable."""
    path = run_dir / HORIZON_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise WorkspaceError(
            f"cannot read {path} ({exc}): run `autoresearch confirm --horizon K` again, "
            "or move the file away"
        ) from exc
    if not isinstance(record, dict):
        raise WorkspaceError(f"{path} holds no confirm record: move it away")
    return record
