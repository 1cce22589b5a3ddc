"""One candidate trained and judged on one slot: its runs, the incumbent runs they pair with,
and the keep rule's verdict, returned as a `TrialOutcome` value.

How a candidate is judged is noise.py's: its k-th run trains with the seed of the k-th run of
the incumbent it is compared with (a recent run of that seed on the same card, node and GPU
UUID, or on the cpu on the same slot; else the incumbent trained again there with that seed
first), and a sequential test on the paired gains keeps, discards or asks for another run. The
baseline trains `calibrate` times instead.

Guarantees: every valid run becomes one row of measurements.jsonl (with its seed, slot, node,
card UUID and partner) as soon as it is measured, so after `--resume` the runs that finished
count and are not trained again; a candidate's run is only ever paired with an incumbent run
of the same seed, on the slot's card (Slot.card_key) or, without one, on the same slot. On
Ray the slot's card is that of its last run: Ray may place the next run elsewhere, and its
row then says so (its `gpu` differs from its partner's).

What it does not do: write the record (record.py), move the branch (loop.py), or train
(slot.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import noise, runner
from .display import Display
from .options import SessionOptions
from .slot import RunOutcome, Slot
from .status import CrashClass, Decision, Status
from .workspace import TRAIN_FILE

FAILED_AS = (
    Status.interrupted,
    Status.rejected,
)  # run failures recorded under their own status, not crash


@dataclass(frozen=True)
class Candidate:
    """What is trained: a commit, and what the record says about where it came from."""

    exp_id: int
    commit: str
    description: str
    parent: str  # the best commit it was built on and is judged against
    agent: dict
    fix_of: int | None = None
    baseline: bool = False


@dataclass(frozen=True)
class TrialOutcome:
    status: Status  # keep, discard, crash, interrupted, rejected
    verdict: noise.Verdict | None
    rows: list[dict]  # the candidate's measurements (measurements.jsonl rows)
    last: RunOutcome  # the last run trained, or, after a resume, read back from its log
    wall: float  # seconds of training, pair runs included
    ran: bool  # False: every run had been measured before the session stopped

    @property
    def fatal(self) -> Exception | None:
        """A fingerprint that moved during the last run: raised once the record is written."""
        return self.last.fatal


class Trial:
    """Trains `candidate` on `slot` as many times as the keep rule needs."""

    def __init__(
        self,
        candidate: Candidate,
        slot: Slot,
        *,
        opts: SessionOptions,
        measurements: noise.Measurements,
        source: Callable[[str], str],
        exp_dir: Path,
        display: Display,
    ) -> None:
        self.c = candidate
        self.slot = slot
        self.opts = opts
        self.measurements = measurements
        self.source = source  # a commit's train.py
        self.exp_dir = exp_dir
        self.display = display

    def run(self) -> TrialOutcome:
        c, m = self.c, self.measurements
        needed = self.opts.calibrate if c.baseline else 1
        wall, ran, last = 0.0, False, None
        verdict: noise.Verdict | None = None
        while True:
            rows = m.candidate_rows(c.exp_id, c.commit)  # after --resume, finished runs count
            if len(rows) < needed:
                run, partner, ran = len(rows), None, True
                if not c.baseline:
                    partner, pair = self._partner(run)
                    if pair is not None:
                        wall += pair.result.wall_seconds
                        last = pair
                        if pair.result.crash_class == CrashClass.interrupted:
                            status = Status.interrupted
                            break
                purpose = "calibrate" if c.baseline else ("repeat" if rows else "candidate")
                last = self._train(c.commit, c.description, run, purpose, partner=partner)
                wall += last.result.wall_seconds
                if not last.result.ok:
                    crash = last.result.crash_class
                    status = Status(crash) if crash in FAILED_AS else Status.crash
                    break
                continue
            if c.baseline:
                status = Status.keep
                break
            gains = m.gains(rows)
            if not gains:  # the best could not be trained again and had no run to pair with
                status = Status.discard
                break
            verdict = noise.judge(
                gains,
                sigma=m.paired_sigma(exclude_exp=c.exp_id),
                min_delta=self.opts.min_delta,
                max_repeats=self.opts.max_repeats,
            )
            if verdict.decision != Decision.repeat:
                status = Status(verdict.decision)  # keep or discard, the same words
                break
            needed += 1
        rows = m.candidate_rows(c.exp_id, c.commit)
        if not ran:  # every run was measured before the session stopped (killed while recording)
            last = self._recall_last_run([r["val_bpb"] for r in rows])
        assert last is not None
        return TrialOutcome(status, verdict, rows, last, wall, ran)

    def _partner(self, run: int) -> tuple[int | None, RunOutcome | None]:
        """The `n` of the best's run that the candidate's run `run` is paired with: its latest
        run of that seed on this slot when recent (noise.Measurements.partner), else a new one
        trained now, with the best's train.py put in the working tree for that run (the
        candidate's is put back after; a kill in between is repaired by --resume, which
        restores the candidate's). Returns (partner, the pair run's outcome if one was trained).
        """
        c, seed = self.c, noise.seed_of(run)
        row = self.measurements.partner(
            c.parent, seed, self.opts.pair_window, slot=self.slot.name, card=self.slot.card_key()
        )
        if row is not None:
            return row["n"], None
        self.display.note(
            f"exp {c.exp_id:04d}: training the best again with seed {seed}, to pair with run "
            f"{run + 1} of the candidate (same seed, close in time)"
        )
        path = self.slot.root / TRAIN_FILE
        path.write_text(self.source(c.parent), encoding="utf-8")
        try:
            outcome = self._train(c.parent, "the best", run, "pair")
        finally:
            path.write_text(self.source(c.commit), encoding="utf-8")
        if outcome.fatal is not None:
            raise outcome.fatal
        # the new run; or, when it failed on code that trained before (the machine's fault, not
        # the candidate's), the best's older run of that seed on this slot, if there is one
        card = (outcome.node, outcome.gpu) if outcome.gpu else self.slot.card_key()
        row = self.measurements.partner(c.parent, seed, 0, slot=self.slot.name, card=card)
        return (row["n"] if row is not None else None), outcome

    def _train(
        self, commit: str, description: str, run: int, purpose: str, *, partner: int | None = None
    ) -> RunOutcome:
        """One run of the train.py in the slot's working tree (`commit`'s); a valid val_bpb
        becomes a measurement, paired with row `partner`."""
        label = description if run == 0 else f"{description} ({purpose} run {run + 1})"
        log_name = "run.log" if run == 0 else f"run-{run + 1}.log"
        if purpose == "pair":
            label = f"{description} ({purpose} run {run + 1})"
            log_name = f"pair-{run + 1}.log"
        outcome = self.slot.train(
            self.c.exp_id, self.exp_dir, label, log_name, run, keep=purpose != "pair"
        )
        if outcome.result.ok:
            self.measurements.add(
                commit,
                outcome.summary["val_bpb"],
                exp_id=self.c.exp_id,
                purpose=purpose,
                seed=outcome.seed,
                partner=partner,
                slot=self.slot.name,
                card=self.slot.card,
                node=outcome.node,
                gpu=outcome.gpu,
            )
        return outcome

    def _recall_last_run(self, values: list[float]) -> RunOutcome:
        """The last run of an experiment measured before a --resume, read back from its log:
        every measured run exited 0, and its val_bpb is the measurement (train.py's printed
        number, in a sealed session, is kept as reported_val_bpb, as the slot's evaluation
        does)."""
        log = self.exp_dir / ("run.log" if len(values) == 1 else f"run-{len(values)}.log")
        text = log.read_text(encoding="utf-8", errors="replace") if log.is_file() else ""
        summary = runner.parse_summary(text)
        printed = summary.get("val_bpb")
        summary["val_bpb"] = values[-1]
        if self.opts.sealed and printed is not None:
            summary["reported_val_bpb"] = printed
        result = runner.RunResult(
            exit_code=0,
            summary=summary,
            crash_class=None,
            wall_seconds=0.0,
            log_path=log,
            log_tail="",
            last_step=None,
        )
        return RunOutcome(result, noise.seed_of(len(values) - 1), {})
