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
of the same seed on the same card: the card's UUID where rows name one, else the record's
`card` where both name one (on Ray's cpu: the actor standing in for a card), else the same
slot (the local cpu, rows recorded before cards were). So no gain the keep rule judges
compares two cards. On Ray each slot's runs train on the card its actor holds (rayslot.py);
when the actor is lost mid-run, a new one trains the run again, perhaps on another card than
the partner chosen before: the best is then trained again with that seed on the run's card
(a `pair` row) and the run is recorded after it, paired with it (`_candidate_run`). That run
is the one exception to "as soon as": a kill before its new partner is measured loses it, and
`--resume` trains it again.

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
# new partners one candidate run may get because its card changed while it trained (a Ray
# slot's actor lost mid-run); after that it is recorded without a partner, so it counts in no
# gain, rather than paired across cards
REPAIRS = 2


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
        self._wall = 0.0  # seconds of training, every run of the trial

    def run(self) -> TrialOutcome:
        c, m = self.c, self.measurements
        needed = self.opts.calibrate if c.baseline else 1
        ran, last = False, None
        verdict: noise.Verdict | None = None
        while True:
            rows = m.candidate_rows(c.exp_id, c.commit)  # after --resume, finished runs count
            if len(rows) < needed:
                run, partner, ran = len(rows), None, True
                if not c.baseline:
                    partner, pair = self._partner(run)
                    if pair is not None:
                        last = pair
                        if pair.result.crash_class == CrashClass.interrupted:
                            status = Status.interrupted
                            break
                purpose = "calibrate" if c.baseline else ("repeat" if rows else "candidate")
                last = self._candidate_run(run, purpose, partner)
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
        return TrialOutcome(status, verdict, rows, last, self._wall, ran)

    def _partner(self, run: int) -> tuple[int | None, RunOutcome | None]:
        """The `n` of the best's run that the candidate's run `run` is paired with: its latest
        run of that seed on the slot's card when recent (noise.Measurements.partner, checked
        by _same_card), else a new one trained now, with the best's train.py put in the
        working tree for that run (the candidate's is put back after; a kill in between is
        repaired by --resume, which restores the candidate's). Returns (partner, the pair
        run's outcome if one was trained).
        """
        c, seed = self.c, noise.seed_of(run)
        key = self.slot.card_key()  # a Ray slot asks its actor (replaced first if it died)
        n = self._found(seed, self.opts.pair_window, *(key or (None, None)), self.slot.card)
        if n is not None:
            return n, None
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
        if outcome.result.ok:
            self._record(c.parent, outcome, "pair", None)
        if outcome.fatal is not None:
            raise outcome.fatal
        # the new run; or, when it failed on code that trained before (the machine's fault, not
        # the candidate's), the best's older run of that seed on this card, if there is one
        return self._found(seed, 0, outcome.node, outcome.gpu, self.slot.card), outcome

    def _found(
        self, seed: int, window: int, node: str | None, gpu: str | None, card: str | None
    ) -> int | None:
        """The `n` of the best's latest run of `seed` on the card (`node`, `gpu`; `card` the
        record's name of it) within `window` (noise.Measurements.partner), if it is on that
        card by _same_card too (on Ray's cpu the place is the slot, the card its actor)."""
        key = (node, gpu) if gpu is not None else None
        row = self.measurements.partner(self.c.parent, seed, window, slot=self.slot.name, card=key)
        return row["n"] if row is not None and _same_card(row, node, gpu, card) else None

    def _candidate_run(self, run: int, purpose: str, partner: int | None) -> RunOutcome:
        """The candidate's run `run` (or the baseline's), recorded with `partner` when both
        trained on one card (_same_card).

        The card can change while the run trains: a Ray slot's actor lost mid-run is replaced,
        perhaps on another card, and the new one trains the run again (rayslot.py). The best
        is then trained with the run's seed on that card (or a recent run of it there is
        found: _partner) before the run is recorded, paired with it. Should the card change
        again meanwhile, the candidate's run is trained again on the new one. After REPAIRS
        new partners, the run is recorded without one."""
        c, rows = self.c, self.measurements.rows
        for attempt in range(REPAIRS + 1):
            outcome = self._train(c.commit, c.description, run, purpose)
            if not outcome.result.ok:
                return outcome
            here = (outcome.node, outcome.gpu, self.slot.card)
            if partner is None or _same_card(rows()[partner], *here):
                break
            if attempt == REPAIRS:
                partner = None  # never a gain across cards
                break
            was = rows()[partner]
            self.display.note(
                f"exp {c.exp_id:04d}: run {run + 1} trained on {_card_name(*here)}, its partner "
                f"on {_card_name(was.get('node'), was.get('gpu'), was.get('card'))} (the slot's "
                "card changed while it trained): it is paired on its own card"
            )
            partner, pair = self._partner(run)
            if pair is not None and pair.result.crash_class == CrashClass.interrupted:
                return pair
            if partner is None or _same_card(rows()[partner], *here):
                break  # None: the best failed there too and has no run on it; no partner
        self._record(c.commit, outcome, purpose, partner)
        return outcome

    def _train(self, commit: str, description: str, run: int, purpose: str) -> RunOutcome:
        """One run of the train.py in the slot's working tree (`commit`'s); not recorded."""
        label = description if run == 0 else f"{description} ({purpose} run {run + 1})"
        log_name = "run.log" if run == 0 else f"run-{run + 1}.log"
        if purpose == "pair":
            label = f"{description} ({purpose} run {run + 1})"
            log_name = f"pair-{run + 1}.log"
            again = 1
            while (self.exp_dir / log_name).exists():  # a pair of this seed trained before
                again += 1
                log_name = f"pair-{run + 1}.{again}.log"
        outcome = self.slot.train(
            self.c.exp_id, self.exp_dir, label, log_name, run, keep=purpose != "pair"
        )
        self._wall += outcome.result.wall_seconds
        return outcome

    def _record(self, commit: str, outcome: RunOutcome, purpose: str, partner: int | None) -> None:
        """The run's val_bpb as a measurement of `commit`, paired with row `partner`."""
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


def _same_card(row: dict, node: str | None, gpu: str | None, card: str | None) -> bool:
    """Whether measurement `row` trained on the card named by `node` and `gpu` (its UUID) when
    both name a UUID; else by the record's `card` when both name one (on Ray's cpu, the actor);
    else True: nothing names a card (the local cpu, rows recorded before cards were), and the
    row was found on the same slot."""
    if gpu is not None and row.get("gpu") is not None:
        return (row.get("node"), row["gpu"]) == (node, gpu)
    if card is None or row.get("card") is None:
        return True
    return row["card"] == card


def _card_name(node: str | None, gpu: str | None, card: str | None) -> str:
    return card or (f"{gpu} on {node}" if gpu else f"node {node}")
