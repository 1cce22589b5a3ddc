"""Several slots on one host (`--workers N`, `--gpus LIST`): one coordinator, N trainings.

The coordinator (the session's process, its main thread) owns the branch, the record
(experiments.jsonl, state.json), measurements.jsonl and every keep or reset; each slot only
trains and evaluates (slot.py, judged by trial.py in a thread of its own). Each slot works in a
git worktree of its own, runs/<tag>/slots/<name>/, checked out (detached) at the candidate it
trains; no two slots share a working tree, and on cuda each slot has one card of its own.

Guarantees, on top of loop.py's:
- The branch `autoresearch/<tag>` points only at the session's base or a kept experiment; the
  workspace's working tree holds the best. A candidate is committed in its slot's worktree on
  top of the best at the time it was proposed, reachable through its attempt ref.
- A keep is never made on a measurement of another base: a candidate that beat its own base
  after the best moved is three-way merged onto the new best and measured again (on the same
  slot) before it may be kept; one that no longer merges is recorded `discard` with the reason.
- A candidate's run is paired with the incumbent's run of the same seed on the same slot.
- state.json names every slot's experiment in flight and its process markers, so `--resume`
  kills what a kill -9 left running and trains every unfinished experiment again; the runs
  that finished are in measurements.jsonl and count once.

With `--backend ray` each slot is a rayslot.RaySlot: its runs train on the card of a Ray
actor of its own, placed by Ray on any node of the cluster; the coordinator stays here.

What it does not do: run two trainings on one card.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from . import record
from .agent import AgentExhausted, InvalidProposal, Proposal
from .edits import check_compiles
from .errors import AgentError, EditError
from .gitrepo import GitRepo, merge_texts
from .rayslot import RaySlot
from .slot import Sealing, Slot
from .status import Status
from .trial import Candidate, Trial, TrialOutcome
from .workspace import TRAIN_FILE

if TYPE_CHECKING:
    from .loop import Session

SLOTS_DIR = "slots"  # runs/<tag>/slots/<name>/: each slot's git worktree


class SlotTree:
    """A slot's own git worktree, detached, under the session's run directory."""

    def __init__(self, repo: GitRepo, path: Path, at: str) -> None:
        self.path = path
        repo.remove_worktree(path)
        if path.exists():  # what a killed session left that git no longer knows
            shutil.rmtree(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        repo.add_worktree(path, at)
        self.repo = GitRepo(path)

    def checkout(self, commit: str) -> None:
        self.repo.reset_hard(commit)

    def commit(self, source: str, message: str) -> str:
        """Commit `source` as train.py on top of what is checked out; returns the commit."""
        (self.path / TRAIN_FILE).write_text(source, encoding="utf-8")
        return self.repo.commit_file(TRAIN_FILE, message)

    def close(self, repo: GitRepo) -> None:
        self.repo.close()
        repo.remove_worktree(self.path)


BASELINE_CRASHED = "baseline crashed"  # the end reason of a session with no baseline


@dataclass
class Job:
    """A candidate in flight on a slot."""

    candidate: Candidate
    slot: Slot
    tree: SlotTree
    started: str
    fixes_left: int
    future: Future
    stale: dict | None = None  # the first measurement, when this is the re-run after a rebase


class Coordinator:
    """Runs a session's experiments on `slots` at once; see the module docstring."""

    def __init__(self, session: Session, sealing: Sealing) -> None:
        """One slot per entry of the session's `slot_gpus`, each in a worktree of its own at
        the best commit; on cuda each slot pins its card (CUDA_VISIBLE_DEVICES)."""
        s = self.s = session
        self.jobs: dict[str, Job] = {}  # slot name -> its job
        self._state_lock = threading.Lock()
        self._flight: dict[str, dict] = {}  # slot name -> its state.json entry
        self._interrupted: list[int] = []
        self.slots: list[Slot] = []
        self.trees: dict[str, SlotTree] = {}
        best = s.best()
        ray = s.opts.backend == "ray"  # each slot trains on a Ray actor (rayslot.py)
        for i, gpu in enumerate(s.opts.slot_gpus):
            name = str(i)
            tree = SlotTree(s.repo, s.ledger.run_dir / SLOTS_DIR / name, best)
            self.trees[name] = tree
            card = card_name(gpu) if s.opts.device == "cuda" and not ray else None
            self.slots.append(
                Slot(tree.path, s.opts, sealing, s.display, s.cancel, mark=self.mark(name),
                     name=name, gpu=gpu, card=card, shown=True)
                if not ray else
                RaySlot(tree.path, s.opts, sealing, s.display, s.cancel, mark=self.mark(name),
                        name=name, shown=True, address=s.opts.address)
            )  # fmt: skip
        self._pool = ThreadPoolExecutor(max_workers=len(self.slots), thread_name_prefix="slot")

    # ----------------------------------------------------------------- the loop

    def run(self, in_flight: list[dict]) -> tuple[str, bool]:
        """Until a budget, the agent or Ctrl-C ends the session: (why, agent unavailable)."""
        s = self.s
        queue = [s.candidate_in_flight(p) for p in in_flight]
        if s.ledger.best() is None and not queue:  # new, or resumed after the baseline crashed
            head, best = s.repo.head(), s.best()
            queue.append(Candidate(s.ledger.next_id(), head, "baseline", best, {}, baseline=True))
        try:
            return self._loop(queue)
        except KeyboardInterrupt:  # Ctrl-C twice while the agent was thinking: runs killed
            s.cancel.set()
            for job in list(self.jobs.values()):
                wait([job.future])
                self._finish(job)
            s.ledger.write_state(None)
            if self._interrupted:
                s.raise_interrupted(self._interrupted)
            raise

    def _loop(self, queue: list[Candidate]) -> tuple[str, bool]:
        s = self.s
        ending: str | None = None
        unavailable, outages = False, 0
        while True:
            if ending is None and s.ledger.best() is None and not queue and not self.jobs:
                ending = BASELINE_CRASHED
            # the baseline (and the re-run of an interrupted one) trains alone: every
            # candidate is built on it
            alone = any(j.candidate.baseline for j in self.jobs.values())
            while ending is None and not alone and self._free():
                slot = self._free()[0]
                if queue:  # trained again after a resume: no repair of a crash, as with one slot
                    c = queue.pop(0)
                    alone = c.baseline
                    self._start(slot, c, 0)
                    continue
                ending = s.should_stop(in_flight=len(self.jobs))
                if ending is not None:
                    break
                try:
                    self._propose(slot)
                    outages = 0
                except AgentExhausted as exc:
                    ending = f"agent has no more proposals ({exc})"
                except AgentError as exc:
                    outages += 1
                    ending = s.agent_trouble(exc, outages)
                    unavailable = ending is not None
                    if ending is None and self.jobs:
                        break  # the runs in flight go on; ask again when one is done
            if not self.jobs:
                break
            self._prepare_next()
            done, _ = wait([j.future for j in self.jobs.values()], return_when=FIRST_COMPLETED)
            for job in [j for j in self.jobs.values() if j.future in done]:
                self._finish(job)
        s.ledger.write_state(None)
        if self._interrupted:
            s.raise_interrupted(self._interrupted)
        return ending or "stopped", unavailable

    def _free(self) -> list[Slot]:
        return [slot for slot in self.slots if slot.name not in self.jobs]

    def _propose(self, slot: Slot) -> None:
        """A proposal for `slot`, aware of those in flight; refused, or committed and started."""
        s = self.s
        exp_id = self._next_id()
        self._write_state(slot.name, {"phase": "proposing", "id": exp_id})
        best = s.best()
        try:
            proposal = s.proposer.next(exp_id, best, lambda: s.context_for(self._running()))
        except InvalidProposal as exc:
            self._write_state(slot.name, None)
            s.refuse(exp_id, exc=exc)
            return
        except AgentError:  # nothing was committed for it: no longer in flight
            self._write_state(slot.name, None)
            raise
        reason = s.refusal(proposal, in_flight=self._running())
        if reason:
            self._write_state(slot.name, None)
            s.refuse(exp_id, proposal=proposal, reason=reason)
            return
        c = self._commit(slot, exp_id, proposal, None)
        self._start(slot, c, s.opts.fix_attempts)

    def _prepare_next(self) -> None:
        """While every slot trains, have the agent prepare the next proposal."""
        s = self.s
        if self._free() or not (s.opts.overlap and s.proposer.overlaps):
            return
        if s.proposer.prepared or s.stop_requested:
            return
        limit = s.opts.max_experiments
        if limit is not None and len(s.ledger.experiments()) + len(self.jobs) >= limit:
            return
        s.proposer.prepare(s.context_for(self._running()), s.best())

    def _running(self) -> list[tuple[int, str, str]]:
        """The candidates in flight, for the agent's context and the duplicate check."""
        return [(j.candidate.exp_id, j.candidate.commit, j.candidate.description)
                for j in self.jobs.values()]  # fmt: skip

    def _next_id(self) -> int:
        flying = [j.candidate.exp_id for j in self.jobs.values()]
        flying += [e["id"] for e in self._flight.values() if "id" in e]
        return max([self.s.ledger.next_id() - 1, *flying]) + 1

    # ----------------------------------------------------------------- a job

    def _commit(
        self, slot: Slot, exp_id: int, proposal: Proposal, fix_of: int | None, *, on: str = ""
    ) -> Candidate:
        """Commit the proposal in the slot's worktree, on top of the best (or `on`)."""
        s = self.s
        base, info = on or s.best(), record.agent_info(proposal)
        self._write_state(
            slot.name,
            {"phase": "committing", "id": exp_id, "description": proposal.description,
             "parent": base, "fix_of": fix_of, "agent": info},
        )  # fmt: skip
        s.ledger.write_artifact(exp_id, "prompt.json", record.to_json(proposal.messages))
        s.ledger.write_artifact(exp_id, "reply.txt", proposal.reply)
        tree = self.trees[slot.name]
        tree.checkout(base)
        commit = tree.commit(proposal.source, f"exp {exp_id:04d}: {proposal.description}")
        s.repo.update_ref(record.attempt_ref(s.opts.tag, exp_id), commit)
        s.ledger.write_artifact(exp_id, "patch.diff", s.repo.diff(base, commit, TRAIN_FILE))
        return Candidate(exp_id, commit, proposal.description, base, info, fix_of)

    def _start(self, slot: Slot, c: Candidate, fixes_left: int, stale: dict | None = None) -> None:
        s = self.s
        self._write_state(
            slot.name,
            {"phase": "training", "id": c.exp_id, "commit": c.commit,
             "description": c.description, "parent": c.parent, "fix_of": c.fix_of,
             "agent": c.agent, "baseline": c.baseline, "slot": slot.name,
             "card": slot.card, "since": record.now()},
        )  # fmt: skip
        tree = self.trees[slot.name]
        tree.checkout(c.commit)
        trial = Trial(
            c, slot, opts=s.opts, measurements=s.measurements, source=s.sources,
            exp_dir=s.ledger.experiment_dir(c.exp_id), display=s.display,
        )  # fmt: skip
        future = self._pool.submit(trial.run)
        self.jobs[slot.name] = Job(c, slot, tree, record.now(), fixes_left, future, stale)

    def _finish(self, job: Job) -> None:
        """Record a finished trial, or rebase and re-measure it when its base went stale."""
        s, c = self.s, job.candidate
        del self.jobs[job.slot.name]
        error = job.future.exception()
        if error is not None:  # a fingerprint moved in a pair run, or a bug: the others stop
            s.cancel.set()
            self._drain()
            raise error
        t = job.future.result()
        reason = None
        best = s.best()
        if t.status == Status.keep and not c.baseline and c.parent != best and s.cancel.is_set():
            # it could not be measured on the new best: trained again by --resume
            t = replace(t, status=Status.interrupted)
        elif t.status == Status.keep and not c.baseline and c.parent != best:
            rebased = self._rebase(job.slot, c, best)
            if rebased is not None:
                s.display.note(
                    f"exp {c.exp_id:04d}: beat its base {c.parent[:7]}, but the best moved to "
                    f"{best[:7]}: merged onto it, measuring again before a keep"
                )
                stale = {
                    "commit": c.commit,
                    "parent": c.parent,
                    "runs": [r["val_bpb"] for r in t.rows],
                }
                self._start(job.slot, rebased, job.fixes_left, stale)
                return
            reason = (
                f"beat its base {c.parent[:7]}, but no longer applies to the new best "
                f"{best[:7]} (a three-way merge of train.py failed or does not compile)"
            )
            t = replace(t, status=Status.discard)
        exp = self._record(job, t, reason)
        if t.fatal is not None:
            s.cancel.set()
            self._drain()
            raise t.fatal
        if exp.status == Status.interrupted:
            self._interrupted.append(c.exp_id)
        if exp.status == Status.crash and job.fixes_left > 0 and not s.stop_requested:
            self._fix(job, exp)

    def _record(self, job: Job, t: TrialOutcome, reason: str | None):
        s, c = self.s, job.candidate
        best = s.ledger.best()
        extra = record.session_extra(s, job.slot, self.slots, rebased=job.stale, reason=reason)
        exp = record.trial_experiment(
            c, t, tag=s.opts.tag, measurements=s.measurements,
            best_val=best.val_bpb if best else None, min_delta=s.opts.min_delta,
            prices=s.opts.prices, started=job.started, extra=extra,
        )  # fmt: skip
        s.ledger.append(exp)  # before the branch moves: a kill in between loses nothing
        self._write_state(job.slot.name, None)
        if exp.status == Status.keep and not c.baseline:
            s.repo.reset_hard(c.commit)  # the branch and the workspace move to the new best
        record.keep_checkpoint(s.ledger, c.exp_id if exp.status == Status.keep else None, c.exp_id)
        s.display.result(exp)
        return exp

    def _rebase(self, slot: Slot, c: Candidate, best: str) -> Candidate | None:
        """`c`'s edit merged onto `best` and committed in the slot's worktree; None when it
        does not merge, does not compile, or changes nothing any more."""
        s = self.s
        merged = merge_texts(s.sources(c.parent), s.sources(best), s.sources(c.commit))
        if merged is None or merged == s.sources(best):
            return None
        try:
            check_compiles(merged)
        except EditError:
            return None
        tree = self.trees[slot.name]
        tree.checkout(best)
        message = f"exp {c.exp_id:04d}: {c.description} (onto {best[:7]})"
        commit = tree.commit(merged, message)
        s.repo.update_ref(record.attempt_ref(s.opts.tag, c.exp_id) + "-stale", c.commit)
        s.repo.update_ref(record.attempt_ref(s.opts.tag, c.exp_id), commit)
        s.ledger.write_artifact(c.exp_id, "patch.diff", s.repo.diff(best, commit, TRAIN_FILE))
        agent = {**c.agent, "rebased_from": c.parent}
        return replace(c, commit=commit, parent=best, agent=agent)

    def _fix(self, job: Job, exp) -> None:
        """Ask the agent to repair a crash; the repair trains on the same slot."""
        s, c = self.s, job.candidate
        exp_id = self._next_id()
        self._write_state(job.slot.name, {"phase": "proposing", "id": exp_id, "fix_of": c.exp_id})
        s.display.proposing(exp_id, s.agent.name, fix_of=c.exp_id)
        try:
            proposal = s.proposer.ask(
                s.agent.fix, s.context_for(self._running()), s.sources(c.commit),
                exp.extra["log_tail"],
            )  # fmt: skip
        except InvalidProposal as exc:
            self._write_state(job.slot.name, None)
            s.refuse(exp_id, exc=exc, fix_of=c.exp_id)
            return
        reason = s.refusal(proposal, in_flight=self._running())
        if reason:
            self._write_state(job.slot.name, None)
            s.refuse(exp_id, proposal=proposal, reason=reason, fix_of=c.exp_id)
            return
        fix = self._commit(job.slot, exp_id, proposal, c.exp_id)
        self._start(job.slot, fix, job.fixes_left - 1)

    def _drain(self) -> None:
        """Wait for every run in flight to end (after `cancel`: killed), recording nothing."""
        wait([j.future for j in self.jobs.values()])
        self.jobs.clear()

    # ----------------------------------------------------------------- state.json

    def mark(self, slot: str) -> Callable[[str, str], None]:
        """The slot's `mark`: a process marker, recorded in the slot's state.json entry."""

        def mark(key: str, marker: str) -> None:
            with self._state_lock:
                self._flight[slot] = {**self._flight.get(slot, {}), key: marker}
                self._flush()

        return mark

    def _write_state(self, slot: str, entry: dict | None) -> None:
        with self._state_lock:
            if entry is None:
                self._flight.pop(slot, None)
            else:
                self._flight[slot] = entry
            self._flush()

    def _flush(self) -> None:
        self.s.ledger.write_state({"slots": dict(self._flight)} if self._flight else None)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for slot in self.slots:  # a Ray slot gives its actor's card back to the cluster
            slot.close()
        for tree in self.trees.values():
            tree.close(self.s.repo)


def card_name(gpu: str | None) -> str | None:
    """`3: NVIDIA H100 80GB HBM3`, the card a slot trains on, for the record: cards of one
    model differ in speed, so a run's card is part of its measurement."""
    if gpu is None:
        return None
    import torch  # the CLI imported it to find the device; cheap here

    try:
        return f"{gpu}: {torch.cuda.get_device_name(int(gpu))}"
    except (RuntimeError, ValueError):  # not visible to this process
        return gpu
