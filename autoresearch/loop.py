"""One research session: program.md's LOOP FOREVER, on one workspace and tag.

    start or resume; train the baseline
    loop: propose -> refuse duplicates -> commit the candidate -> train and judge it (trial.py)
          -> record it (record.py) -> keep it, or reset the branch to the best
          -> ask the agent to fix a crash, within --fix-attempts

Guarantees, whatever happens (a crash of train.py, a dead endpoint, Ctrl-C, kill -9):
- The branch `autoresearch/<tag>` only ever points at the session's base commit, a kept
  experiment, or (with one slot) the candidate being trained; with several slots
  (coordinator.py) candidates are committed in the slots' own worktrees and the branch
  points only at the base or a kept experiment. The tool resets only commits it made itself.
- Every candidate commit is reachable through `refs/autoresearch/<tag>/attempts/NNNN` from
  the moment it exists, so a discarded, crashed or interrupted idea is never lost.
- `runs/<tag>/experiments.jsonl` is appended before the branch is reset, and
  `runs/<tag>/state.json` names the experiment in flight, so `--resume` (resume.py) can tell
  what finished (never repeated) from what did not (re-run under the same id).

What it does not do: train or measure (slot.py), judge (trial.py, noise.py), talk to the
agent (proposals.py), build the record (record.py), or run git (gitrepo.py).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from . import noise, proposals, record, resume
from .agent import Agent, AgentExhausted, Context, InvalidProposal, Proposal, check_endpoint
from .coordinator import BASELINE_CRASHED, Coordinator
from .display import Display
from .errors import AgentError, AutoresearchError, BaselineCrashed
from .gitrepo import GitRepo
from .ledger import Experiment, Ledger, LedgerError
from .lock import workspace_lock
from .options import SessionOptions
from .proposals import (  # noqa: F401 - normalized_hash, seed_only_change: imported from here
    Proposer,
    Sources,
    context,
    normalized_hash,
    seed_only_change,
)
from .record import (  # noqa: F401 - BRANCH_PREFIX, attempt_ref: imported from here
    BRANCH_PREFIX,
    agent_info,
    attempt_ref,
    branch_name,
    now,
)
from .runner import WarmChild
from .slot import Slot, compile_cache_env, warm_child_for  # noqa: F401 - re-exported
from .status import Status
from .trial import Candidate, Trial
from .workspace import RUNS_DIR, TRAIN_FILE

AGENT_OUTAGE_RETRIES = (
    5  # consecutive endpoint failures (after the client's own retries) before stopping
)
AGENT_OUTAGE_WAIT_S = 30.0


class SessionInterrupted(AutoresearchError):
    """Ctrl-C pressed twice: training killed, branch reset to best, record written."""

    exit_code = 130

    def __init__(self, message: str, end_reason: str = "interrupted by Ctrl-C twice") -> None:
        super().__init__(message)
        self.end_reason = end_reason  # for session.json: why the session ended, without the advice


@dataclass
class SessionResult:
    reason: str  # why the session ended
    experiments: list[Experiment] = field(default_factory=list)
    best: Experiment | None = None


@dataclass(frozen=True)
class _Ending:
    reason: str
    agent_unavailable: bool = False  # a failure: exit status 1 once the record is written

    @property
    def baseline_crashed(self) -> bool:  # a failure too: exit status 3 (BaselineCrashed)
        return self.reason == BASELINE_CRASHED


class Session:
    """A research session on one workspace and tag. Use `run()` once."""

    def __init__(
        self,
        root,
        opts: SessionOptions,
        agent: Agent,
        display: Display,
        *,
        warm: WarmChild | None = None,
    ) -> None:
        """`warm`: the first run's interpreter, started by the caller in `root` before it
        imported torch itself (commands.run_session); the session owns it from here on."""
        self.root = root
        self.opts = opts
        self.agent = agent
        self.display = display
        self.branch = branch_name(opts.tag)
        self.ledger = Ledger(root / RUNS_DIR / opts.tag)
        self.repo = GitRepo(root)
        self.stop_requested = False
        self.cancel = threading.Event()
        self.measurements = noise.Measurements(self.ledger.run_dir)
        self.sources = Sources(self.repo)
        self.proposer = Proposer(agent, display, self.sources)
        self.slot: Slot | None = None  # made once the session's sealing is known
        self._warm = warm
        self._started = time.monotonic()

    def run(self) -> SessionResult:
        """`_run` holding the workspace lock (lock.py): another session or `try` on this
        working tree is refused (WorkspaceBusy) before anything is read or written."""
        with workspace_lock(self.root, f"a session on tag {self.opts.tag}"):
            return self._run()

    def _run(self) -> SessionResult:
        """Run until a budget, the agent or Ctrl-C ends the session.

        Every way out of a session that started records why in session.json (`end_reason`,
        `ended`): a budget, the agent, Ctrl-C once or twice, an error. Only a kill -9 cannot,
        and `status` tells that apart by the recorded pid. An agent that stayed unavailable
        ends the session with an AgentError (exit status 1) once the record is written.
        """
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        began = False
        try:
            check_endpoint(self.agent)  # a wrong URL, model or key stops here, before any run
            args = (self.root, self.opts, self.repo, self.ledger, self.display)
            begun = (
                resume.resume(*args) if self.opts.resume else resume.start(*args, self.agent.name)
            )
            if not begun.slotted:
                self.slot = Slot(
                    self.root,
                    self.opts,
                    begun.sealing,
                    self.display,
                    self.cancel,
                    mark=self._mark,
                    warm=self._warm,
                )
                self._warm = None  # the slot's now
            began = True
            self.ledger.update_session(ended=None, end_reason=None, pid=os.getpid())
            self.display.session_start(self.opts, self.ledger.experiments(), agent=self.agent.name)
            if begun.slotted:
                ending = self._coordinate(begun)
            else:
                ending = self._loop(begun.pending)
            self.ledger.write_state(None)  # e.g. the agent gave up while proposing
        except KeyboardInterrupt:
            # Second Ctrl-C while the agent was thinking: nothing was committed for it.
            self.ledger.write_state(None)
            self._record_end(began, "interrupted by Ctrl-C twice while the agent was proposing")
            raise SessionInterrupted(
                "interrupted while proposing; nothing was committed. Continue with "
                f"`autoresearch run --resume --tag {self.opts.tag}`"
            ) from None
        except SessionInterrupted as exc:
            self._record_end(began, exc.end_reason)
            raise
        except AutoresearchError as exc:
            self._record_end(began, f"error: {exc}")
            raise
        except BaseException as exc:  # recorded, then raised as it came: a bug, a SystemExit
            self._record_end(began, f"failed: {type(exc).__name__}: {exc}")
            raise
        finally:
            if self.slot is not None:
                self.slot.close()
            if self._warm is not None:
                self._warm.discard()
            self.display.close()  # stop the live dashboard before any error is printed
            signal.signal(signal.SIGINT, previous)
            self.repo.close()
        self.ledger.update_session(ended=now(), end_reason=ending.reason)
        exps = self.ledger.experiments()
        self.display.session_end(ending.reason, exps, self.ledger.best())
        if ending.baseline_crashed:
            raise BaselineCrashed(
                resume.baseline_crash(self.ledger, self.opts.tag, exps[-1] if exps else None)
            )
        if ending.agent_unavailable:
            raise AgentError(
                f"{ending.reason.rstrip(' .')}. Check the endpoint, then continue with "
                f"`autoresearch run --resume --tag {self.opts.tag}`"
            )
        return SessionResult(reason=ending.reason, experiments=exps, best=self.ledger.best())

    def _record_end(self, began: bool, reason: str) -> None:
        """session.json's end reason on the way out of an error; a refusal before the
        session began has written nothing, and a disk that refuses this too (the error
        on its way out says so) leaves the last record as it was."""
        if not began:
            return
        try:
            self.ledger.update_session(ended=now(), end_reason=reason)
        except LedgerError:
            pass

    # ----------------------------------------------------------------- the loop

    def _loop(self, pending: dict | None) -> _Ending:
        if pending and pending.get("commit"):
            self._judge(self.candidate_in_flight(pending))
        elif self.ledger.best() is None:  # a new session, or one resumed after its baseline crashed
            head, best = self.repo.head(), self.best()
            self._judge(Candidate(self.ledger.next_id(), head, "baseline", best, {}, baseline=True))
        if self.ledger.best() is None:  # the baseline, or the re-run of an interrupted one
            return _Ending(BASELINE_CRASHED)
        outages = 0
        while True:
            reason = self.should_stop()
            if reason:
                return _Ending(reason)
            try:
                self._experiment()
                outages = 0
            except AgentExhausted as exc:
                return _Ending(f"agent has no more proposals ({exc})")
            except AgentError as exc:
                outages += 1
                reason = self.agent_trouble(exc, outages)
                if reason:
                    return _Ending(reason, agent_unavailable=True)

    def _coordinate(self, begun: resume.Begun) -> _Ending:
        """The loop with several slots at once (coordinator.py)."""
        coordinator = Coordinator(self, begun.sealing)
        try:
            reason, unavailable = coordinator.run(list(begun.in_flight))
        finally:
            coordinator.close()
        return _Ending(reason, agent_unavailable=unavailable)

    def agent_trouble(self, exc: AgentError, outages: int) -> str | None:
        """After the `outages`-th endpoint failure in a row: why the session ends, or None
        once it waited to ask again."""
        if outages >= AGENT_OUTAGE_RETRIES:
            return f"agent unavailable: {exc}"
        self.display.note(
            f"agent error ({exc}); retrying in {AGENT_OUTAGE_WAIT_S:.0f}s "
            f"({outages}/{AGENT_OUTAGE_RETRIES})"
        )
        self._sleep(AGENT_OUTAGE_WAIT_S)
        return None

    def _experiment(self) -> None:
        """Propose, refuse or commit, train and judge; repair crashes within --fix-attempts."""
        exp_id = self.ledger.next_id()
        self.ledger.write_state({"phase": "proposing", "id": exp_id})
        try:
            proposal = self.proposer.next(exp_id, self.best(), self._context)
        except InvalidProposal as exc:
            self.refuse(exp_id, exc=exc)
            return
        fix_of, fixes_left = None, self.opts.fix_attempts
        while True:
            reason = self.refusal(proposal)
            if reason:
                self.refuse(exp_id, proposal=proposal, reason=reason)
                return
            candidate = self._commit(exp_id, proposal, fix_of)
            exp = self._judge(candidate)
            if exp.status != Status.crash or fixes_left <= 0 or self.stop_requested:
                return
            fixes_left -= 1
            fix_of, exp_id = exp_id, self.ledger.next_id()
            self.ledger.write_state({"phase": "proposing", "id": exp_id, "fix_of": fix_of})
            self.display.proposing(exp_id, self.agent.name, fix_of=fix_of)
            try:
                proposal = self.proposer.ask(
                    self.agent.fix,
                    self._context(),
                    self.sources(candidate.commit),
                    exp.extra["log_tail"],
                )
            except InvalidProposal as exc:
                self.refuse(exp_id, exc=exc, fix_of=fix_of)
                return

    def should_stop(self, in_flight: int = 0) -> str | None:
        """Why no further experiment may start, with `in_flight` ones started already."""
        if self.stop_requested:
            return "stopped by Ctrl-C"
        exps = self.ledger.experiments()
        limit = self.opts.max_experiments
        if limit is not None and len(exps) + in_flight >= limit:
            return f"reached --max-experiments {self.opts.max_experiments}"
        if self.opts.max_cost is not None:
            spent = sum(e.extra.get("cost_usd") or 0.0 for e in exps)
            if spent >= self.opts.max_cost:
                return f"reached --max-cost {self.opts.max_cost:g} USD (spent {spent:.2f})"
        hours = (time.monotonic() - self._started) / 3600
        if self.opts.max_hours is not None and hours >= self.opts.max_hours:
            return f"reached --max-hours {self.opts.max_hours:g}"
        return None

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stop_requested and time.monotonic() < deadline:
            self.cancel.wait(min(1.0, deadline - time.monotonic()))

    # ----------------------------------------------------------------- the steps

    def refusal(
        self, proposal: Proposal, in_flight: Sequence[tuple[int, str, str]] = ()
    ) -> str | None:
        """proposals.refusal for this session's record and best."""
        return proposals.refusal(
            proposal.source,
            self.ledger.experiments(),
            self.sources,
            best=self.best(),
            in_flight=in_flight,
        )

    def _commit(self, exp_id: int, proposal: Proposal, fix_of: int | None) -> Candidate:
        """Commit the proposal's train.py on the branch, with its attempt ref and artifacts."""
        best, info = self.best(), agent_info(proposal)
        self.ledger.write_state(
            {
                "phase": "committing",
                "id": exp_id,
                "description": proposal.description,
                "parent": best,
                "fix_of": fix_of,
                "agent": info,
            }
        )
        self.ledger.write_artifact(exp_id, "prompt.json", record.to_json(proposal.messages))
        self.ledger.write_artifact(exp_id, "reply.txt", proposal.reply)
        (self.root / TRAIN_FILE).write_text(proposal.source, encoding="utf-8")
        commit = self.repo.commit_file(TRAIN_FILE, f"exp {exp_id:04d}: {proposal.description}")
        self.repo.update_ref(attempt_ref(self.opts.tag, exp_id), commit)
        self.ledger.write_artifact(exp_id, "patch.diff", self.repo.diff(best, commit, TRAIN_FILE))
        return Candidate(exp_id, commit, proposal.description, best, info, fix_of)

    def candidate_in_flight(self, pending: dict) -> Candidate:
        """The experiment state.json names (or an interrupted one's re-run), trained again."""
        return Candidate(
            pending["id"],
            pending["commit"],
            pending["description"],
            pending.get("parent") or self.best(),
            pending.get("agent", {}),
            pending.get("fix_of"),
            baseline=pending.get("baseline", not self.ledger.experiments()),
        )

    def _judge(self, c: Candidate) -> Experiment:
        """Train and judge `c` (trial.py), record it, then keep it or reset to the best."""
        self.ledger.write_state(
            {
                "phase": "training",
                "id": c.exp_id,
                "commit": c.commit,
                "description": c.description,
                "parent": c.parent,
                "fix_of": c.fix_of,
                "agent": c.agent,
            }
        )
        self._prepare_next(running=None if c.baseline else c)
        best, started = self.ledger.best(), now()
        assert self.slot is not None
        trial = Trial(
            c,
            self.slot,
            opts=self.opts,
            measurements=self.measurements,
            source=self.sources,
            exp_dir=self.ledger.experiment_dir(c.exp_id),
            display=self.display,
        ).run()
        exp = record.trial_experiment(
            c,
            trial,
            tag=self.opts.tag,
            measurements=self.measurements,
            best_val=best.val_bpb if best else None,
            min_delta=self.opts.min_delta,
            prices=self.opts.prices,
            started=started,
            extra=record.session_extra(self, self.slot),
        )
        self.ledger.append(exp)  # before the branch moves: a kill in between loses nothing
        if exp.status != Status.keep and not c.baseline:
            self.repo.reset_hard(c.parent)
        record.keep_checkpoint(
            self.ledger, c.exp_id if exp.status == Status.keep else None, c.exp_id
        )
        self.ledger.write_state(None)
        self.display.result(exp)
        if trial.fatal is not None:
            raise trial.fatal
        if exp.status == Status.interrupted:
            self.raise_interrupted([c.exp_id])
        return exp

    def refuse(
        self,
        exp_id: int,
        *,
        exc: InvalidProposal | None = None,
        proposal: Proposal | None = None,
        reason: str | None = None,
        fix_of: int | None = None,
    ) -> None:
        """Record a proposal that does not train (status invalid), with its artifacts."""
        source = exc if exc is not None else proposal
        assert source is not None
        self.ledger.write_artifact(exp_id, "prompt.json", record.to_json(source.messages))
        self.ledger.write_artifact(exp_id, "reply.txt", source.reply)
        best = self.ledger.best()
        exp = record.invalid_experiment(
            exp_id,
            agent=self.agent.name,
            exc=exc,
            proposal=proposal,
            reason=reason,
            parent=self.best(),
            best_val=best.val_bpb if best else None,
            min_delta=self.opts.min_delta,
            prices=self.opts.prices,
            fix_of=fix_of,
        )
        self.ledger.append(exp)
        self.ledger.write_state(None)
        self.display.result(exp)

    def _prepare_next(self, running: Candidate | None) -> None:
        """Start proposing the next experiment in the background while a run trains.

        The agent sees the current best and the history, with the candidate in flight listed
        as `running`. Nothing is started when the session will end after this experiment.
        """
        if not (self.opts.overlap and self.proposer.overlaps):
            return
        if self.proposer.prepared or self.stop_requested:
            return
        limit = self.opts.max_experiments
        if limit is not None and self.ledger.next_id() + 1 > limit:
            return
        # the candidate's own description is not shown: with one slot, as it always was
        flight = [(running.exp_id, running.commit, "")] if running is not None else []
        self.proposer.prepare(self._context(flight), self.best())

    # ----------------------------------------------------------------- helpers

    def best(self) -> str:
        return resume.best_commit(self.ledger)

    def session_seconds(self) -> float:
        return round(time.monotonic() - self._started, 1)

    def raise_interrupted(self, ids: Sequence[int]) -> None:
        """Ctrl-C twice killed experiments `ids`: the session ends (exit status 130)."""
        named = ", ".join(f"{i:04d}" for i in ids)
        raise SessionInterrupted(
            f"interrupted: experiment {named} killed, branch reset to the best commit; "
            "continue with `autoresearch run --resume --tag " + self.opts.tag + "`, "
            "which trains it again",
            end_reason=f"interrupted by Ctrl-C twice: experiment {named} killed "
            "(`--resume` trains it again)",
        )

    def _context(self, running: Sequence[tuple[int, str, str]] | None = None) -> Context:
        return self.context_for(running or ())

    def context_for(self, running: Sequence[tuple[int, str, str]]) -> Context:
        """What the agent is shown, with the candidates in flight (`running`: (id, commit,
        description))."""
        return context(
            self.root,
            self.ledger.experiments(),
            self.ledger.best(),
            best_source=self.sources(self.best()),
            sources=self.sources,
            measurements=self.measurements,
            preset=self.opts.preset,
            running=running,
        )

    def _mark(self, key: str, marker: str) -> None:
        """Record a process marker in state.json, so a resume can kill what a kill -9 left."""
        self.ledger.write_state({**(self.ledger.read_state() or {}), key: marker})

    def _on_sigint(self, signum: int, frame: object) -> None:
        if not self.stop_requested:
            self.stop_requested = True
            self.display.note(
                "Ctrl-C: finishing the current experiment, then stopping (press again to kill it now)"
            )
            return
        self.cancel.set()
        if self.proposer.interruptible:
            raise KeyboardInterrupt
