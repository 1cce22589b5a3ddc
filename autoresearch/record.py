"""The experiment's record: the one place an `Experiment` is built, from what a trial returned
(`trial_experiment`) or from a proposal that never trained (`invalid_experiment`), and the one
place the session's own values for it are gathered (`session_extra`: its clocks, the slot).

Guarantees: every field of a record comes from the values passed in (only `session_extra`
reads the session, for both loop.py's one slot and coordinator.py's several); `val_bpb` is the
mean of the candidate's measured runs for keep/discard and None otherwise; `best_before` is
the mean of the incumbent runs it was paired with, so that `val_bpb - best_before` is minus
the mean paired gain.

What it does not do: append the record (loop.py does, before it moves the branch), or judge.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from statistics import fmean
from typing import TYPE_CHECKING

from . import noise
from .agent import InvalidProposal, Proposal
from .ledger import Experiment, Ledger
from .pricing import cost_usd
from .slot import CHECKPOINT_FILE, Slot
from .status import Status
from .trial import Candidate, TrialOutcome

if TYPE_CHECKING:
    from .loop import Session

CHECKPOINTS_DIR = "checkpoints"  # runs/<tag>/checkpoints/NNNN.pt: the baseline's and the best's
BRANCH_PREFIX = "autoresearch/"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def branch_name(tag: str) -> str:
    return BRANCH_PREFIX + tag


def attempt_ref(tag: str, exp_id: int) -> str:
    return f"refs/autoresearch/{tag}/attempts/{exp_id:04d}"


def trial_experiment(
    c: Candidate,
    t: TrialOutcome,
    *,
    tag: str,
    measurements: noise.Measurements,
    best_val: float | None,
    min_delta: float,
    prices: dict,
    started: str,
    extra: dict,
) -> Experiment:
    """The record of a trained candidate. `best_val`: the best's val_bpb when it was proposed,
    the fallback for `best_before` when no run was paired; `extra`: what the session adds
    (`session_extra`)."""
    values = [r["val_bpb"] for r in t.rows]
    table = measurements.rows()
    partners = [table[r["partner"]]["val_bpb"] for r in t.rows if r.get("partner") is not None]
    failed = t.status in (Status.crash, Status.interrupted)
    summary = t.last.summary
    return Experiment(
        id=c.exp_id,
        status=t.status,
        description=c.description,
        commit=c.commit,
        parent=c.parent,
        val_bpb=fmean(values) if t.status in (Status.keep, Status.discard) else None,
        memory_gb=summary.get("peak_vram_mb", 0.0) / 1024,
        best_before=None if c.baseline else (fmean(partners) if partners else best_val),
        threshold=t.verdict.threshold if t.verdict else min_delta,
        crash_class=t.last.result.crash_class if failed else None,
        exit_code=t.last.result.exit_code,
        metrics=dict(summary),
        started_at=started,
        ended_at=now(),
        train_seconds=round(t.wall, 2) if t.ran else None,
        agent=c.agent,
        attempt_ref=None if c.baseline else attempt_ref(tag, c.exp_id),
        fix_of=c.fix_of,
        extra={
            "cost_usd": cost(c.agent, prices),
            "log_tail": t.last.result.log_tail if failed else "",
            "runs": values,
            "seeds": [r["seed"] for r in t.rows],
            "paired_gains": measurements.gains(t.rows),
            "incumbent_runs": len(partners),
            "sigma": measurements.sigma(),
            "paired_sigma": t.verdict.sigma if t.verdict else None,
            "verdict": t.verdict.label if t.verdict else None,
            **extra,
            **t.last.notes,
        },
    )


def session_extra(
    session: Session,
    slot: Slot,
    slots: Sequence[Slot] | None = None,
    *,
    rebased: dict | None = None,
    reason: str | None = None,
) -> dict:
    """What the session adds to the record of a candidate `slot` trained (`trial_experiment`'s
    `extra`): its wall and training clocks; in a session of slots (`slots`: all of them,
    coordinator.py; None for loop.py's one) the slot's name and card; `rebased`: the first
    measurement of a candidate merged onto a newer best; `reason`: why it was discarded without
    a verdict. A value the session knows for the record is added here (and declared in
    experiment.Extra)."""
    extra: dict = {
        "session_s": session.session_seconds(),
        "gpu_busy_s": round(sum(s.train_wall for s in slots or [slot]), 1),
    }
    if slots is not None:
        extra["slot"] = slot.name
    if slot.card:
        extra["card"] = slot.card
    if rebased:
        extra["rebased"] = rebased
    if reason:
        extra["reason"] = reason
    return extra


def invalid_experiment(
    exp_id: int,
    *,
    agent: str,
    exc: InvalidProposal | None = None,
    proposal: Proposal | None = None,
    reason: str | None = None,
    parent: str,
    best_val: float | None,
    min_delta: float,
    prices: dict,
    fix_of: int | None = None,
) -> Experiment:
    """The record of a proposal that was refused before training: the agent's own failure
    (`exc`) or a proposal refused for `reason` (a duplicate, a seed-only change)."""
    if exc is not None:
        reason = str(exc)
        info = {
            "name": agent,
            "model": exc.model,
            "attempts": exc.attempts,
            "tokens_in": exc.tokens_in,
            "tokens_out": exc.tokens_out,
        }
        description = exc.description or "(no valid edit)"
    else:
        assert proposal is not None
        info = agent_info(proposal)
        description = proposal.description
    return Experiment(
        id=exp_id,
        status=Status.invalid,
        description=description,
        commit=None,
        parent=parent,
        val_bpb=None,
        memory_gb=0.0,
        best_before=best_val,
        threshold=min_delta,
        started_at=now(),
        ended_at=now(),
        agent=info,
        fix_of=fix_of,
        extra={"reason": reason or "", "cost_usd": cost(info, prices)},
    )


def cost(info: dict, prices: dict) -> float | None:
    """USD for the agent's tokens; None when the model's price is unknown."""
    if not info.get("tokens_in") and not info.get("tokens_out"):
        return 0.0
    return cost_usd(info.get("model"), info.get("tokens_in", 0), info.get("tokens_out", 0), prices)


def agent_info(p: Proposal) -> dict:
    return {
        "name": p.agent,
        "model": p.model,
        "attempts": p.attempts,
        "tokens_in": p.tokens_in,
        "tokens_out": p.tokens_out,
        "seconds": round(p.seconds, 2),
        "wait_s": p.wait_s,
        "rebased_from": p.rebased_from,
    }


def keep_checkpoint(ledger: Ledger, kept: int | None, exp_id: int) -> None:
    """Move a kept experiment's checkpoint to runs/<tag>/checkpoints/ (for `confirm`),
    delete the superseded best's unless it is the baseline's; delete any other."""
    checkpoint = ledger.experiment_dir(exp_id) / CHECKPOINT_FILE
    if kept is None or not checkpoint.is_file():
        checkpoint.unlink(missing_ok=True)
        return
    folder: Path = ledger.run_dir / CHECKPOINTS_DIR
    folder.mkdir(exist_ok=True)
    first = ledger.baseline()
    baseline = first.id if first else kept
    for old in folder.glob("*.pt"):
        if old.stem.isdigit() and int(old.stem) not in (baseline, kept):
            old.unlink()
    os.replace(checkpoint, folder / f"{kept:04d}.pt")


def to_json(obj: object) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False)
