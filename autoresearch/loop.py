"""One research session: propose, validate, commit, train, judge, record; and resume.

Guarantees, whatever happens (a crash of train.py, a dead endpoint, Ctrl-C, kill -9):
- The branch `autoresearch/<tag>` only ever points at the session's base commit, a kept
  experiment, or the candidate being trained; the tool resets only commits it made itself.
- Every candidate commit is reachable through `refs/autoresearch/<tag>/attempts/NNNN` from
  the moment it exists, so a discarded, crashed or interrupted idea is never lost.
- `runs/<tag>/experiments.jsonl` is appended before the branch is reset, and
  `runs/<tag>/state.json` names the experiment in flight, so `--resume` can tell what
  finished (never repeated) from what did not (re-run under the same id).

What it does not do: measure val_bpb itself (runner.py trains, evaluator.py measures),
decide what counts as noise (noise.py), or run git (gitrepo.py).

How a candidate is judged is noise.py's: its k-th run trains with the seed of the k-th run of
the incumbent it is compared with (a recent one, or the incumbent is trained again with that
seed first), and a sequential test on the paired gains keeps, discards or asks for another run.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from statistics import fmean

from . import evaluator, fingerprint, noise, runner, sandbox
from .agent import (
    Agent,
    AgentExhausted,
    Context,
    HistoryEntry,
    InvalidProposal,
    Proposal,
    check_endpoint,
)
from .display import Display, plural
from .edits import check_compiles
from .errors import AgentError, AutoresearchError, EditError, WorkspaceError
from .gitrepo import GitRepo, merge_texts
from .ledger import Experiment, Ledger, LedgerError
from .lock import workspace_lock
from .options import SessionOptions
from .pricing import cost_usd
from .workspace import RUNS_DIR, TRAIN_FILE, cache_dir, data_manifest

BRANCH_PREFIX = "autoresearch/"
AGENT_OUTAGE_RETRIES = (
    5  # consecutive endpoint failures (after the client's own retries) before stopping
)
AGENT_OUTAGE_WAIT_S = 30.0
CHECKPOINT_FILE = "checkpoint.pt"  # in the experiment's folder while its runs are judged
CHECKPOINTS_DIR = "checkpoints"  # runs/<tag>/checkpoints/NNNN.pt: the baseline's and the best's
FAILED_AS = ("interrupted", "rejected")  # run failures recorded under their own status, not crash
# crash classes of runs whose checkpoint is not evaluated: the harness ended them, or they
# trained past the budget
NOT_EVALUATED = ("timeout", "stall", "interrupted", "over_budget")


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


def branch_name(tag: str) -> str:
    return BRANCH_PREFIX + tag


def attempt_ref(tag: str, exp_id: int) -> str:
    return f"refs/autoresearch/{tag}/attempts/{exp_id:04d}"


def normalized_hash(source: str) -> str:
    """Hash of train.py ignoring trailing whitespace and blank lines (a no-op edit hashes the same)."""
    lines = [line.rstrip() for line in source.splitlines() if line.strip()]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def seed_only_change(old: str, new: str) -> list[str]:
    """The seeds a candidate changes, when changing seeds is all it does; else [].

    A seed is a name containing "seed" (any case): the value assigned to such a constant,
    a keyword argument so named (`seed=...`) and the arguments of a call to such a function
    (`torch.manual_seed(...)`). Both sources are compared as syntax trees with those values
    blanked, so comments and formatting do not count as a change either.
    """
    try:
        before, after = ast.parse(old), ast.parse(new)
    except SyntaxError:
        return []
    if ast.dump(before) == ast.dump(after):
        return []
    old_seeds, new_seeds = _SeedBlanker(), _SeedBlanker()
    if ast.dump(old_seeds.visit(before)) != ast.dump(new_seeds.visit(after)):
        return []
    changed = [n for n, v in new_seeds.values.items() if old_seeds.values.get(n) != v]
    return changed or sorted(new_seeds.values)


class _SeedBlanker(ast.NodeTransformer):
    """Replaces every seed value by None, remembering the originals by name."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    def _blank(self, name: str, value: ast.AST) -> ast.Constant:
        self.values.setdefault(name, ast.dump(value))
        return ast.Constant(None)

    def visit_Assign(self, node: ast.Assign) -> ast.AST:
        names = [t.id for t in node.targets if isinstance(t, ast.Name) and _is_seed(t.id)]
        if names:
            node.value = self._blank(names[0], node.value)
        return self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.AST:
        if isinstance(node.target, ast.Name) and _is_seed(node.target.id) and node.value:
            node.value = self._blank(node.target.id, node.value)
        return self.generic_visit(node)

    def visit_keyword(self, node: ast.keyword) -> ast.AST:
        if node.arg and _is_seed(node.arg):
            node.value = self._blank(node.arg, node.value)
        return self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> ast.AST:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if _is_seed(name) and (node.args or node.keywords):
            self._blank(name + "()", ast.Tuple(node.args, ast.Load()))
            node.args, node.keywords = [], []
        return self.generic_visit(node)


def _is_seed(name: str) -> bool:
    return "seed" in name.lower()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Session:
    """A research session on one workspace and tag. Use `run()` once."""

    def __init__(
        self,
        root: Path,
        opts: SessionOptions,
        agent: Agent,
        display: Display,
        *,
        warm: runner.WarmChild | None = None,
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
        self._agent_unavailable = False  # the session ends for that: a failure, exit status 1
        self.cancel = threading.Event()
        self._interruptible = (
            False  # True while blocked in the agent: a second Ctrl-C may raise there
        )
        self._sources: dict[str, str] = {}
        self._started = time.monotonic()
        self._train_wall = 0.0
        self.measurements = noise.Measurements(self.ledger.run_dir)
        self._last_result: runner.RunResult | None = None
        self._last_summary: dict = {}
        self._run_marker: str | None = None  # marks the processes of the run in flight
        self._warm: runner.WarmChild | None = warm  # the next run's interpreter, imports done
        self._warm_eval: runner.Prestarted | None = None  # the run in flight's evaluator, ready
        self._isolation = runner.Isolation((), "")
        self._box: sandbox.Box | None = None  # the box candidate code runs in; None: unboxed
        self._sealed: dict = {}  # dataset and fingerprints, as recorded in session.json
        self._eval_notes: dict = {}  # what the sealed evaluation said about the last run
        self._fatal: fingerprint.FingerprintError | None = None  # stops after recording
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="autoresearch-agent")
        self._agent_lock = threading.Lock()
        self._pending: tuple[Future, str] | None = (
            None  # (proposal being made, best it was made on)
        )

    # ----------------------------------------------------------------- setup

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
            pending = self._resume() if self.opts.resume else self._start()
            began = True
            self.ledger.update_session(ended=None, end_reason=None, pid=os.getpid())
            self.display.session_start(self.opts, self.ledger.experiments(), agent=self.agent.name)
            reason = self._loop(pending)
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
            self._discard_warm()
            self._discard_warm_eval()
            self.display.close()  # stop the live dashboard before any error is printed
            signal.signal(signal.SIGINT, previous)
            self.repo.close()
        self.ledger.update_session(ended=_now(), end_reason=reason)
        exps = self.ledger.experiments()
        self.display.session_end(reason, exps, self.ledger.best())
        if self._agent_unavailable:
            raise AgentError(
                f"{reason.rstrip(' .')}. Check the endpoint, then continue with "
                f"`autoresearch run --resume --tag {self.opts.tag}`"
            )
        return SessionResult(reason=reason, experiments=exps, best=self.ledger.best())

    def _record_end(self, began: bool, reason: str) -> None:
        """session.json's end reason on the way out of an error; a refusal before the
        session began has written nothing, and a disk that refuses this too (the error
        on its way out says so) leaves the last record as it was."""
        if not began:
            return
        try:
            self.ledger.update_session(ended=_now(), end_reason=reason)
        except LedgerError:
            pass

    def _start(self) -> dict | None:
        repo = self.repo
        if repo.branch_exists(self.branch):
            raise WorkspaceError(
                f"branch {self.branch} already exists: continue it with `--resume`, "
                f"or start a new session with `--tag NEWTAG`"
            )
        if repo.current_branch() is None:
            raise WorkspaceError(
                "HEAD is detached: check out the branch to start from (e.g. `git checkout main`)"
            )
        dirty = sorted(repo.dirty_paths())
        if dirty:
            named = ", ".join(dirty[:5]) + (f" and {len(dirty) - 5} more" if len(dirty) > 5 else "")
            raise WorkspaceError(
                f"the working tree has uncommitted changes ({named}): commit or stash them, "
                "or add them to .gitignore, first (the session commits and resets train.py "
                "and must not touch your work)"
            )
        if self.ledger.experiments():
            raise WorkspaceError(
                f"{self.ledger.run_dir} already holds a record but the branch is gone: "
                "choose another --tag, or move that directory away"
            )
        data_manifest()
        sealing = self._sealing(None)
        base = repo.head()
        repo.create_branch(self.branch, base)
        repo.checkout(self.branch)
        self.ledger.update_session(
            tag=self.opts.tag,
            branch=self.branch,
            base=base,
            started=_now(),
            preset=self.opts.preset,
            device=self.opts.device,
            agent=self.agent.name,
            **sealing,
        )
        return None

    def _sealing(self, session: dict | None) -> dict:
        """Probe network isolation; in a sealed session, fingerprint (or, on resume, check)
        what the metric depends on. Returns the fields for session.json."""
        box = sandbox.probe()
        self._box = sandbox.require(box, unsandboxed=self.opts.unsandboxed)
        self.display.note(box.note if self._box else sandbox.UNSANDBOXED_NOTE)
        self._isolation = runner.network_isolation()
        if not self._isolation.prefix:
            self.display.note(self._isolation.note)
        fields: dict = {
            "sealed": self.opts.sealed,
            "network_isolation": self._isolation.note,
            "sandbox": {**box.record(), "unsandboxed": self.opts.unsandboxed},
        }
        if not self.opts.sealed:
            return fields
        session = session or {}
        dataset = Path(session.get("dataset") or fingerprint.active_dataset())
        prints = self._fingerprinter(dataset)
        recorded = session.get("fingerprints")
        if recorded:
            prints.check(recorded, tag=self.opts.tag, when="on resume")
        else:
            recorded = prints.take()
        self._sealed = {
            "dataset": str(dataset),
            "fingerprints": recorded,
            "time_budget": self.opts.time_budget,
        }
        return {**fields, **self._sealed}

    def _fingerprinter(self, dataset: Path) -> fingerprint.Fingerprinter:
        return fingerprint.Fingerprinter(
            self.root, dataset, self.opts.preset, self.opts.time_budget
        )

    def _check_fingerprints(self, when: str) -> None:
        if self._sealed:
            self._fingerprinter(Path(self._sealed["dataset"])).check(
                self._sealed["fingerprints"], tag=self.opts.tag, when=when
            )

    def _resume(self) -> dict | None:
        """Reconcile git with the record after any death; returns the experiment in flight."""
        repo = self.repo
        if not repo.branch_exists(self.branch):
            raise WorkspaceError(
                f"nothing to resume: branch {self.branch} does not exist (start it without --resume)"
            )
        session = self.ledger.read_session()
        if not session:
            raise WorkspaceError(
                f"branch {self.branch} exists but {self.ledger.run_dir} has no session record: "
                "it was not made by this tool, or its runs/ directory was removed"
            )
        repo.clear_stale_lock()
        state = self.ledger.read_state()
        if state:
            markers = [state[k] for k in ("run_marker", "eval_marker") if state.get(k)]
            orphans = sum(runner.kill_orphans(marker) for marker in markers)
            if orphans:
                self.display.note(f"killed {orphans} process(es) the stopped session left running")
        done = {e.id for e in self.ledger.experiments()}
        pending = state if state and state.get("id") not in done else None
        rerun = None if pending else self._interrupted_last()
        pending = pending or rerun
        ours = {session["base"]} | {e.commit for e in self.ledger.experiments() if e.commit}
        if pending and pending.get("commit"):
            ours.add(pending["commit"])
        tip = repo.branch_sha(self.branch)
        if tip not in ours:
            best, saved = self._best_commit(session)[:12], f"{self.opts.tag}-by-hand"
            move_back = (
                f"git branch {saved} && git reset --hard {best}"
                if repo.current_branch() == self.branch
                else f"git branch {saved} {self.branch} && git branch -f {self.branch} {best}"
            )
            raise WorkspaceError(
                f"branch {self.branch} points at {tip[:12]}, a commit this session did not make "
                f"(moved by hand?): keep that commit on a branch of its own and move "
                f"{self.branch} back to the session's best with `{move_back}`, "
                "or start a new --tag"
            )
        dirty = repo.dirty_paths()
        if dirty - {TRAIN_FILE}:
            raise WorkspaceError(
                f"uncommitted changes to {', '.join(sorted(dirty - {TRAIN_FILE}))}: "
                "commit or stash them, then resume"
            )
        # Only train.py can be dirty here, and only the session writes it: restore it.
        target = (
            pending["commit"] if pending and pending.get("commit") else self._best_commit(session)
        )
        self.ledger.update_session(**self._sealing(session))
        repo.checkout(self.branch, force=True)
        repo.reset_hard(target)
        self.ledger.rebuild_tsv()
        if rerun:
            self._carry_over(rerun)
        again = f" (experiment {rerun['rerun_of']:04d}, interrupted)" if rerun else ""
        self.display.note(
            f"resuming {self.branch}: {plural(len(done), 'experiment')} recorded"
            + (
                f", re-running experiment {pending['id']:04d}{again}"
                if pending and pending.get("commit")
                else ""
            )
        )
        return pending

    def _interrupted_last(self) -> dict | None:
        """The training state that re-runs the last experiment, when Ctrl-C twice killed it.

        The record keeps the interrupted attempt (what happened); the re-run is a new
        experiment, under the next id, of the same commit, so what did not finish is trained
        again as the README says. Nothing is written here.
        """
        exps = self.ledger.experiments()
        last = exps[-1] if exps else None
        if last is None or last.status != "interrupted" or not last.commit:
            return None
        return {
            "phase": "training",
            "id": self.ledger.next_id(),
            "commit": last.commit,
            "description": last.description,
            "parent": last.parent,
            "fix_of": last.fix_of,
            "agent": last.agent,
            "rerun_of": last.id,
            "baseline": self.ledger.best() is None,
        }

    def _carry_over(self, rerun: dict) -> None:
        """The re-run's attempt ref and the artifacts of the proposal it trains again."""
        if not rerun["baseline"]:
            self.repo.update_ref(attempt_ref(self.opts.tag, rerun["id"]), rerun["commit"])
        old = self.ledger.run_dir / f"{rerun['rerun_of']:04d}"
        for name in ("patch.diff", "prompt.json", "reply.txt"):
            if (old / name).is_file():
                self.ledger.write_artifact(rerun["id"], name, (old / name).read_bytes())

    def _best_commit(self, session: dict | None = None) -> str:
        best = self.ledger.best()
        if best and best.commit:
            return best.commit
        session = session or self.ledger.read_session() or {}
        return session["base"]

    # ----------------------------------------------------------------- the loop

    def _loop(self, pending: dict | None) -> str:
        if pending and pending.get("commit"):
            self._train_and_judge(
                pending["id"],
                pending["commit"],
                pending["description"],
                agent_info=pending.get("agent", {}),
                fix_of=pending.get("fix_of"),
                baseline=pending.get("baseline", not self.ledger.experiments()),
            )
        if not self.ledger.experiments():
            self._baseline()
            if self.ledger.best() is None:
                return "baseline crashed"
        elif pending and pending.get("baseline") and self.ledger.best() is None:
            return "baseline crashed"  # the re-run of an interrupted baseline
        outages = 0
        while True:
            reason = self._should_stop()
            if reason:
                return reason
            try:
                self._experiment()
                outages = 0
            except AgentExhausted as exc:
                return f"agent has no more proposals ({exc})"
            except AgentError as exc:
                outages += 1
                if outages >= AGENT_OUTAGE_RETRIES:
                    self._agent_unavailable = True
                    return f"agent unavailable: {exc}"
                self.display.note(
                    f"agent error ({exc}); retrying in {AGENT_OUTAGE_WAIT_S:.0f}s "
                    f"({outages}/{AGENT_OUTAGE_RETRIES})"
                )
                self._sleep(AGENT_OUTAGE_WAIT_S)

    def _should_stop(self) -> str | None:
        if self.stop_requested:
            return "stopped by Ctrl-C"
        n = len(self.ledger.experiments())
        if self.opts.max_experiments is not None and n >= self.opts.max_experiments:
            return f"reached --max-experiments {self.opts.max_experiments}"
        if self.opts.max_cost is not None:
            spent = sum(e.extra.get("cost_usd") or 0.0 for e in self.ledger.experiments())
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

    def _baseline(self) -> None:
        exp_id = self.ledger.next_id()
        head = self.repo.head()
        self._train_and_judge(exp_id, head, "baseline", agent_info={}, fix_of=None, baseline=True)

    def _experiment(self) -> None:
        exp_id = self.ledger.next_id()
        self.ledger.write_state({"phase": "proposing", "id": exp_id})
        try:
            proposal = self._next_proposal(exp_id)
        except InvalidProposal as exc:
            self._record_invalid(exp_id, exc)
            return
        self._try_candidate(exp_id, proposal, fix_of=None)

    # ----------------------------------------------------------------- overlap

    def _next_proposal(self, exp_id: int) -> Proposal:
        """The proposal prepared while the last run trained, re-applied to the current best
        if that moved; or a fresh one when there is none or it no longer applies."""
        pending, self._pending = self._pending, None
        if pending is not None:
            future, base = pending
            waited = time.monotonic()
            if not future.done():
                self.display.proposing(exp_id, self.agent.name)
            proposal = self._wait(future)
            proposal.wait_s = round(time.monotonic() - waited, 2)
            best = self._best_commit()
            if base == best:
                return proposal
            rebased = self._rebase(proposal, base, best)
            if rebased is not None:
                return rebased
            self.display.note("the prepared edit no longer applies to the new best: asking again")
        self.display.proposing(exp_id, self.agent.name)
        return self._ask(self.agent.propose, self._context())

    def _prepare_next(self, running: str | None) -> None:
        """Start proposing the next experiment in the background while a run trains.

        The agent sees the current best and the history, with the candidate in flight listed
        as `running`. Nothing is started when the session will end after this experiment.
        """
        if not (self.opts.overlap and getattr(self.agent, "overlaps", False)):
            return
        if self._pending is not None or self.stop_requested:
            return
        limit = self.opts.max_experiments
        if limit is not None and self.ledger.next_id() + 1 > limit:
            return
        ctx = self._context()
        if running is not None:
            ctx.history.append(
                HistoryEntry(
                    id=self.ledger.next_id(),
                    status="running",
                    val_bpb=None,
                    delta=None,
                    description="(training now)",
                    source=self._source(running),
                )
            )
        future = self._executor.submit(self._locked, self.agent.propose, ctx)
        self._pending = (future, self._best_commit())

    def _rebase(self, proposal: Proposal, base: str, best: str) -> Proposal | None:
        """Re-apply an edit made against `base` onto `best` (a three-way merge of train.py)."""
        merged = merge_texts(self._source(base), self._source(best), proposal.source)
        if merged is None:
            return None
        try:
            check_compiles(merged)
        except EditError:
            return None
        proposal.source = merged
        proposal.rebased_from = base
        return proposal

    def _wait(self, future: Future) -> Proposal:
        """The background proposal's result; a second Ctrl-C interrupts the wait."""
        self._interruptible = True
        try:
            while True:
                try:
                    return future.result(timeout=0.5)
                except FutureTimeout:
                    continue
        finally:
            self._interruptible = False

    def _locked(self, call, *args):
        with self._agent_lock:
            return call(*args)

    def _try_candidate(self, exp_id: int, proposal: Proposal, fix_of: int | None) -> None:
        """Commit a proposal, train it, and repair crashes within --fix-attempts."""
        fixes_left = self.opts.fix_attempts
        while True:
            duplicate = self._duplicate_of(proposal.source)
            if duplicate is not None:
                self._record_invalid(
                    exp_id,
                    None,
                    proposal=proposal,
                    reason=f"train.py identical to experiment {duplicate:04d}",
                )
                return
            seeds = seed_only_change(self._source(self._best_commit()), proposal.source)
            if seeds:
                self._record_invalid(
                    exp_id,
                    None,
                    proposal=proposal,
                    reason=f"only the random seed changed ({', '.join(seeds)}): a new seed "
                    "measures noise, not an idea",
                )
                return
            commit = self._commit_candidate(exp_id, proposal, fix_of)
            exp = self._train_and_judge(
                exp_id,
                commit,
                proposal.description,
                agent_info=_agent_info(proposal),
                fix_of=fix_of,
            )
            if exp.status != "crash" or fixes_left <= 0 or self.stop_requested:
                return
            fixes_left -= 1
            fix_of = exp_id
            exp_id = self.ledger.next_id()
            self.ledger.write_state({"phase": "proposing", "id": exp_id, "fix_of": fix_of})
            self.display.proposing(exp_id, self.agent.name, fix_of=fix_of)
            try:
                proposal = self._ask(
                    self.agent.fix, self._context(), self._source(commit), exp.extra["log_tail"]
                )
            except InvalidProposal as exc:
                self._record_invalid(exp_id, exc, fix_of=fix_of)
                return

    def _commit_candidate(self, exp_id: int, proposal: Proposal, fix_of: int | None) -> str:
        best = self._best_commit()
        self.ledger.write_state(
            {
                "phase": "committing",
                "id": exp_id,
                "description": proposal.description,
                "parent": best,
                "fix_of": fix_of,
                "agent": _agent_info(proposal),
            }
        )
        self.ledger.write_artifact(exp_id, "prompt.json", _json(proposal.messages))
        self.ledger.write_artifact(exp_id, "reply.txt", proposal.reply)
        (self.root / TRAIN_FILE).write_text(proposal.source, encoding="utf-8")
        message = f"exp {exp_id:04d}: {proposal.description}"
        commit = self.repo.commit_file(TRAIN_FILE, message)
        self.repo.update_ref(attempt_ref(self.opts.tag, exp_id), commit)
        self.ledger.write_artifact(exp_id, "patch.diff", self.repo.diff(best, commit, TRAIN_FILE))
        return commit

    def _train_and_judge(
        self,
        exp_id: int,
        commit: str,
        description: str,
        *,
        agent_info: dict,
        fix_of: int | None,
        baseline: bool = False,
    ) -> Experiment:
        """Train `commit` as many times as the keep rule needs, then record the decision.

        The baseline trains `calibrate` times with seeds seed_of(0), seed_of(1), ...; a
        candidate's k-th run trains with seed_of(k) and is paired with the best's run of that
        seed (`_partner`); noise.judge decides on the paired gains after each run.
        """
        best = self.ledger.best()
        parent = self._best_commit()
        self.ledger.write_state(
            {
                "phase": "training",
                "id": exp_id,
                "commit": commit,
                "description": description,
                "parent": parent,
                "fix_of": fix_of,
                "agent": agent_info,
            }
        )
        self._prepare_next(running=None if baseline else commit)
        started = _now()
        wall = 0.0
        ran = False
        needed = self.opts.calibrate if baseline else 1
        verdict: noise.Verdict | None = None
        while True:
            # after --resume, the runs that finished count
            rows = self.measurements.candidate_rows(exp_id, commit)
            if len(rows) < needed:
                run = len(rows)
                partner, ran = None, True
                if not baseline:
                    partner, pair = self._partner(exp_id, parent, commit, run)
                    wall += pair.wall_seconds if pair else 0.0
                    if pair is not None and pair.crash_class == "interrupted":
                        status = "interrupted"
                        break
                purpose = "calibrate" if baseline else ("repeat" if rows else "candidate")
                result = self._train(exp_id, commit, description, run, purpose, partner=partner)
                wall += result.wall_seconds
                if not result.ok:
                    status = result.crash_class if result.crash_class in FAILED_AS else "crash"
                    break
                continue
            if baseline:
                status = "keep"
                break
            gains = self.measurements.gains(rows)
            if not gains:  # the best could not be trained again and had no run to pair with
                status = "discard"
                break
            verdict = noise.judge(
                gains,
                sigma=self.measurements.paired_sigma(exclude_exp=exp_id),
                min_delta=self.opts.min_delta,
                max_repeats=self.opts.max_repeats,
            )
            if verdict.decision != "repeat":
                status = verdict.decision
                break
            needed += 1
        rows = self.measurements.candidate_rows(exp_id, commit)
        values = [r["val_bpb"] for r in rows]
        if not ran:  # every run was measured before the session stopped (killed while recording)
            self._recall_last_run(exp_id, values)
        table = self.measurements.rows()
        partners = [table[r["partner"]]["val_bpb"] for r in rows if r.get("partner") is not None]
        val_bpb = fmean(values) if status in ("keep", "discard") else None
        summary = self._last_summary
        exp = Experiment(
            id=exp_id,
            status=status,
            description=description,
            commit=commit,
            parent=parent,
            val_bpb=val_bpb,
            memory_gb=summary.get("peak_vram_mb", 0.0) / 1024,
            # the mean of the best's runs this candidate was compared with, so that
            # val_bpb - best_before is minus the mean paired gain
            best_before=None
            if baseline
            else (fmean(partners) if partners else best and best.val_bpb),
            threshold=verdict.threshold if verdict else self.opts.min_delta,
            crash_class=self._last_result.crash_class
            if status in ("crash", "interrupted")
            else None,
            exit_code=self._last_result.exit_code,
            metrics=dict(summary),
            started_at=started,
            ended_at=_now(),
            train_seconds=round(wall, 2) if ran else None,
            agent=agent_info,
            attempt_ref=None if baseline else attempt_ref(self.opts.tag, exp_id),
            fix_of=fix_of,
            extra={
                "cost_usd": self._cost(agent_info),
                "log_tail": self._last_result.log_tail
                if status in ("crash", "interrupted")
                else "",
                "runs": values,
                "seeds": [r["seed"] for r in rows],
                "paired_gains": self.measurements.gains(rows),
                "incumbent_runs": len(partners),
                "sigma": self.measurements.sigma(),
                "paired_sigma": verdict.sigma if verdict else None,
                "verdict": verdict.label if verdict else None,
                "gpu_busy_s": round(self._train_wall, 1),
                "session_s": round(time.monotonic() - self._started, 1),
                **self._eval_notes,
            },
        )
        self.ledger.append(exp)
        if status != "keep" and not baseline:
            self.repo.reset_hard(parent)
        self._keep_checkpoint(exp_id if status == "keep" else None, exp_id)
        self.ledger.write_state(None)
        self.display.result(exp)
        if self._fatal is not None:
            raise self._fatal
        if status == "interrupted":
            raise SessionInterrupted(
                f"interrupted: experiment {exp_id:04d} killed, branch reset to the best commit; "
                "continue with `autoresearch run --resume --tag " + self.opts.tag + "`, "
                "which trains it again",
                end_reason=f"interrupted by Ctrl-C twice: experiment {exp_id:04d} killed "
                "(`--resume` trains it again)",
            )
        return exp

    def _partner(
        self, exp_id: int, incumbent: str, commit: str, run: int
    ) -> tuple[int | None, runner.RunResult | None]:
        """The `n` of the best's run that the candidate's run `run` is paired with: its latest
        run of that seed when recent (noise.Measurements.partner), else a new one trained now,
        with the best's train.py put in the workspace for that run (the candidate's is put
        back after; a kill in between is repaired by --resume, which restores the candidate's).
        Returns (partner, the pair run's result if one was trained)."""
        seed = noise.seed_of(run)
        row = self.measurements.partner(incumbent, seed, self.opts.pair_window)
        if row is not None:
            return row["n"], None
        self.display.note(
            f"exp {exp_id:04d}: training the best again with seed {seed}, to pair with run "
            f"{run + 1} of the candidate (same seed, close in time)"
        )
        path = self.root / TRAIN_FILE
        path.write_text(self._source(incumbent), encoding="utf-8")
        try:
            result = self._train(exp_id, incumbent, "the best", run, "pair")
        finally:
            path.write_text(self._source(commit), encoding="utf-8")
        if self._fatal is not None:
            raise self._fatal
        # the new run; or, when it failed on code that trained before (the machine's fault, not
        # the candidate's), the best's older run of that seed, if there is one
        row = self.measurements.partner(incumbent, seed, 0)
        return (row["n"] if row is not None else None), result

    def _train(
        self,
        exp_id: int,
        commit: str,
        description: str,
        run: int,
        purpose: str,
        *,
        partner: int | None = None,
    ) -> runner.RunResult:
        """One training run of the train.py in the workspace (`commit`'s) with seed
        noise.seed_of(run); a valid val_bpb becomes a measurement, paired with row `partner`.

        Sealed: the fingerprints are checked before and after the run, train.py saves its
        model to the experiment's checkpoint, and the val_bpb measured is the sealed
        evaluator's (see `_evaluate`).
        """
        seed = noise.seed_of(run)
        label = description if run == 0 else f"{description} ({purpose} run {run + 1})"
        log_name = "run.log" if run == 0 else f"run-{run + 1}.log"
        if purpose == "pair":
            label = f"{description} ({purpose} run {run + 1})"
            log_name = f"pair-{run + 1}.log"
        self.display.training(exp_id, label, self.opts.time_budget)
        exp_dir = self.ledger.experiment_dir(exp_id)
        checkpoint = exp_dir / CHECKPOINT_FILE
        extra = {"AUTORESEARCH_SEED": str(seed), **compile_cache_env(os.environ)}
        self._eval_notes = {}
        if self.opts.sealed:
            self._check_fingerprints(f"before experiment {exp_id:04d} trained")
            checkpoint.unlink(missing_ok=True)
            extra.update(self._sealed_env(), AUTORESEARCH_CHECKPOINT=str(checkpoint))
            extra["AUTORESEARCH_SKIP_EVAL"] = "1"  # the evaluator measures; train.py need not
        warm = self._take_warm()
        # recorded, so a resume can kill what a kill -9 left running
        marker = warm.marker if warm is not None else uuid.uuid4().hex
        self.ledger.write_state({**(self.ledger.read_state() or {}), "run_marker": marker})
        self._run_marker = marker
        ahead = self.opts.start_ahead
        if ahead is None:
            ahead = self.opts.device == "cuda"  # the card trains: the host has cores to spare
        if ahead:
            self._start_warm()  # the next run's imports, done long before they are needed
            self._start_warm_eval()  # this run's evaluator, ready when the checkpoint is
        result = runner.run_training(
            self.root,
            exp_dir / log_name,
            command=[
                *(() if self._box else self._isolation.prefix),
                *(self.opts.command or [sys.executable, TRAIN_FILE]),
            ],
            env=self._child_env(extra),
            timeout=self.opts.hard_timeout,
            stall_timeout=self.opts.stall_timeout,
            on_step=self.display.step,
            cancel=self.cancel,
            marker=marker,
            warm=warm,
            budget=self.opts.budget,
            box=self._box,
        )
        self._train_wall += result.wall_seconds
        if not ahead and not self.cancel.is_set():
            # on the cpu preset the imports would slow the run itself: start them after it,
            # while it is evaluated and recorded
            self._start_warm()
        if self.opts.sealed:
            result = self._evaluate(exp_id, result, checkpoint, log_name)
            if purpose == "pair":  # the best keeps the checkpoint it was kept with
                checkpoint.unlink(missing_ok=True)
        self._last_result = result
        self._last_summary = result.summary
        if result.ok:
            self.measurements.add(
                commit,
                result.summary["val_bpb"],
                exp_id=exp_id,
                purpose=purpose,
                seed=seed,
                partner=partner,
            )
        return result

    def _start_warm(self) -> None:
        """Start the next run's interpreter now (runner.WarmChild), when the run command is
        the default and the train.py in the workspace imports torch or numpy and sets no
        environment variables; its environment is the next run's minus the per-run variables.
        On cuda it is started as a run starts, elsewhere once the run has exited."""
        self._discard_warm()
        if not self.opts.warm_start or self.opts.command is not None:
            return
        env = self._child_env(compile_cache_env(os.environ))
        self._warm = warm_child_for(self.root, env, self._isolation.prefix, self._box)

    def _take_warm(self) -> runner.WarmChild | None:
        """The warm child, if it may run the train.py now in the workspace (it was started
        for the one before: the candidate checked out since may set environment variables)."""
        warm, self._warm = self._warm, None
        if warm is None:
            return None
        if not runner.warm_start_ok(self._workspace_train()):
            warm.discard()
            return None
        return warm

    def _child_env(self, extra: dict[str, str]) -> dict[str, str]:
        """A training child's environment: this process's minus secrets, plus `extra`."""
        return runner.child_env(
            dict(os.environ),
            preset=self.opts.preset,
            device=self.opts.device,
            gpu=self.opts.gpu,
            extra=extra,
        )

    def _workspace_train(self) -> str:
        return (self.root / TRAIN_FILE).read_text(encoding="utf-8", errors="replace")

    def _discard_warm(self) -> None:
        warm, self._warm = self._warm, None
        if warm is not None:
            warm.discard()

    def _start_warm_eval(self) -> None:
        """In a sealed session with warm starts, start the sealed evaluator as the run starts
        (evaluator.start_warm): its imports and data checks are done when the checkpoint is."""
        self._discard_warm_eval()
        if self.opts.sealed and self.opts.warm_start:
            self._warm_eval = evaluator.start_warm(
                self.root,
                split="val",
                preset=self.opts.preset,
                device=self.opts.device,
                gpu=self.opts.gpu,
                fingerprints=self._sealed["fingerprints"],
                dataset=Path(self._sealed["dataset"]),
                prefix=self._isolation.prefix,
                boxed=self._box is not None,
            )
        if self._warm_eval is not None:  # its own marker: a resume kills it too
            state = self.ledger.read_state() or {}
            self.ledger.write_state({**state, "eval_marker": self._warm_eval.marker})

    def _discard_warm_eval(self) -> None:
        warm, self._warm_eval = self._warm_eval, None
        if warm is not None:
            warm.discard()

    def _recall_last_run(self, exp_id: int, values: list[float]) -> None:
        """The last run of an experiment measured before a --resume, read back from its log:
        every measured run exited 0, and its val_bpb is the measurement (train.py's printed
        number, in a sealed session, is kept as reported_val_bpb, as `_evaluate` does)."""
        log = self.ledger.experiment_dir(exp_id) / (
            "run.log" if len(values) == 1 else f"run-{len(values)}.log"
        )
        text = log.read_text(encoding="utf-8", errors="replace") if log.is_file() else ""
        summary = runner.parse_summary(text)
        printed = summary.get("val_bpb")
        summary["val_bpb"] = values[-1]
        if self.opts.sealed and printed is not None:
            summary["reported_val_bpb"] = printed
        self._last_summary, self._eval_notes = summary, {}
        self._last_result = runner.RunResult(
            exit_code=0,
            summary=summary,
            crash_class=None,
            wall_seconds=0.0,
            log_path=log,
            log_tail="",
            last_step=None,
        )

    def _sealed_env(self) -> dict[str, str]:
        """The session's dataset, pinned for the children (ACTIVE may change under us)."""
        dataset = Path(self._sealed["dataset"])
        return {"AUTORESEARCH_CACHE": str(dataset.parent), "AUTORESEARCH_DATASET": dataset.name}

    def _evaluate(
        self, exp_id: int, result: runner.RunResult, checkpoint: Path, log_name: str
    ) -> runner.RunResult:
        """The run with val_bpb measured by the sealed evaluator, in a process of its own.

        A run that exited 0 (on its own) is trained; its checkpoint is evaluated. The
        fingerprints are checked after training and after evaluation (train.py's code runs in
        both): a change is recorded as `rejected` and then stops the session.
        """
        trained = result.exit_code == 0 and result.crash_class not in NOT_EVALUATED
        warm, self._warm_eval = self._warm_eval, None
        if not self._data_unchanged(f"after experiment {exp_id:04d} trained") or not trained:
            if warm is not None:
                warm.discard()
            checkpoint.unlink(missing_ok=True)
            return self._rejected(result) if self._fatal else result
        self.display.note(f"exp {exp_id:04d}: sealed evaluation of the checkpoint")
        ev = evaluator.evaluate_checkpoint(
            self.root,
            checkpoint,
            split="val",
            preset=self.opts.preset,
            device=self.opts.device,
            gpu=self.opts.gpu,
            timeout=self.opts.hard_timeout,
            log_path=checkpoint.parent / log_name.replace(".log", ".eval.log"),
            fingerprints=self._sealed["fingerprints"],
            dataset=Path(self._sealed["dataset"]),
            prefix=self._isolation.prefix,
            cancel=self.cancel,
            marker=self._run_marker,
            warm=warm,
            boxed=self._box is not None,
        )
        result, self._eval_notes = evaluator.sealed_outcome(result, ev)
        if not self._data_unchanged(f"after experiment {exp_id:04d} was evaluated"):
            result = self._rejected(result)
        if not result.ok:
            checkpoint.unlink(missing_ok=True)
        return result

    def _data_unchanged(self, when: str) -> bool:
        """False (and the error kept for after the record is written) when a fingerprint moved."""
        try:
            self._check_fingerprints(when)
        except fingerprint.FingerprintError as exc:
            self._fatal = exc
            return False
        return True

    def _rejected(self, result: runner.RunResult) -> runner.RunResult:
        reason = f"the run changed what the metric depends on: {self._fatal}"
        self._eval_notes = {**self._eval_notes, "reason": reason}
        return replace(
            result,
            crash_class="rejected",
            log_tail=result.log_tail + f"\n[autoresearch] {reason}",
        )

    def _keep_checkpoint(self, kept: int | None, exp_id: int) -> None:
        """Move a kept experiment's checkpoint to runs/<tag>/checkpoints/ (for `confirm`),
        delete the superseded best's unless it is the baseline's; delete any other."""
        checkpoint = self.ledger.experiment_dir(exp_id) / CHECKPOINT_FILE
        if kept is None or not checkpoint.is_file():
            checkpoint.unlink(missing_ok=True)
            return
        folder = self.ledger.run_dir / CHECKPOINTS_DIR
        folder.mkdir(exist_ok=True)
        exps = self.ledger.experiments()
        baseline = exps[0].id if exps else kept
        for old in folder.glob("*.pt"):
            if old.stem.isdigit() and int(old.stem) not in (baseline, kept):
                old.unlink()
        os.replace(checkpoint, folder / f"{kept:04d}.pt")

    def _record_invalid(
        self,
        exp_id: int,
        exc: InvalidProposal | None,
        *,
        proposal: Proposal | None = None,
        reason: str | None = None,
        fix_of: int | None = None,
    ) -> None:
        if exc is not None:
            self.ledger.write_artifact(exp_id, "prompt.json", _json(exc.messages))
            self.ledger.write_artifact(exp_id, "reply.txt", exc.reply)
            reason = str(exc)
            info = {
                "name": self.agent.name,
                "model": exc.model,
                "attempts": exc.attempts,
                "tokens_in": exc.tokens_in,
                "tokens_out": exc.tokens_out,
            }
            description = exc.description or "(no valid edit)"
        else:
            assert proposal is not None
            self.ledger.write_artifact(exp_id, "prompt.json", _json(proposal.messages))
            self.ledger.write_artifact(exp_id, "reply.txt", proposal.reply)
            info = _agent_info(proposal)
            description = proposal.description
        best = self.ledger.best()
        exp = Experiment(
            id=exp_id,
            status="invalid",
            description=description,
            commit=None,
            parent=self._best_commit(),
            val_bpb=None,
            memory_gb=0.0,
            best_before=best.val_bpb if best else None,
            threshold=self.opts.min_delta,
            started_at=_now(),
            ended_at=_now(),
            agent=info,
            fix_of=fix_of,
            extra={"reason": reason or "", "cost_usd": self._cost(info)},
        )
        self.ledger.append(exp)
        self.ledger.write_state(None)
        self.display.result(exp)

    def _cost(self, agent_info: dict) -> float | None:
        """USD for the agent's tokens; None when the model's price is unknown."""
        if not agent_info.get("tokens_in") and not agent_info.get("tokens_out"):
            return 0.0
        return cost_usd(
            agent_info.get("model"),
            agent_info.get("tokens_in", 0),
            agent_info.get("tokens_out", 0),
            self.opts.prices,
        )

    # ----------------------------------------------------------------- context

    def _context(self) -> Context:
        exps = self.ledger.experiments()
        best = self.ledger.best()
        history = []
        best_so_far: float | None = None
        for e in exps:
            delta = None
            if e.val_bpb is not None and e.best_before is not None:
                delta = e.val_bpb - e.best_before
            history.append(
                HistoryEntry(
                    id=e.id,
                    status=e.status,
                    val_bpb=e.val_bpb,
                    delta=delta,
                    description=_history_description(e),
                    source=self._source(e.commit) if e.commit else None,
                    verdict=e.extra.get("verdict"),
                )
            )
            if e.status == "keep":
                best_so_far = e.val_bpb
        crashes = [e for e in exps if e.status == "crash"]
        return Context(
            program=(self.root / "program.md").read_text(encoding="utf-8"),
            train_py=self._source(self._best_commit()),
            history=history,
            best_bpb=best.val_bpb if best else best_so_far,
            last_crash_tail=crashes[-1].extra.get("log_tail") if crashes else None,
            noise=self.measurements.sigma(),
            preset=self.opts.preset,
        )

    def _source(self, commit: str) -> str:
        if commit not in self._sources:
            self._sources[commit] = self.repo.show_file(commit, TRAIN_FILE)
        return self._sources[commit]

    def _duplicate_of(self, source: str) -> int | None:
        digest = normalized_hash(source)
        for e in self.ledger.experiments():
            if e.commit and normalized_hash(self._source(e.commit)) == digest:
                return e.id
        return None

    # ----------------------------------------------------------------- Ctrl-C

    def _on_sigint(self, signum: int, frame: object) -> None:
        if not self.stop_requested:
            self.stop_requested = True
            self.display.note(
                "Ctrl-C: finishing the current experiment, then stopping (press again to kill it now)"
            )
            return
        self.cancel.set()
        if self._interruptible:
            raise KeyboardInterrupt

    def _ask(self, call, *args):
        """Call the agent; a second Ctrl-C interrupts it (nothing is committed yet)."""
        self._interruptible = True
        try:
            return self._locked(call, *args)
        finally:
            self._interruptible = False


def warm_child_for(
    root: Path, env: Mapping[str, str], prefix: Sequence[str], box: sandbox.Box | None = None
) -> runner.WarmChild | None:
    """A WarmChild for the train.py in `root` (the default command), or None when it imports
    nothing worth preloading, writes the environment, or no process could be started (the run
    then starts cold). With `box`, it waits in a box of its own (for its run's `box=`)."""
    try:
        source = (root / TRAIN_FILE).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    preload = runner.warm_preload(source)
    if not preload or not runner.warm_start_ok(source):
        return None
    try:
        cell = box.cell(root, dataset=sandbox.dataset_of(env)) if box is not None else None
        return runner.WarmChild(root, env, preload=preload, prefix=prefix, cell=cell)
    except OSError:
        return None


def compile_cache_env(environ: Mapping[str, str]) -> dict[str, str]:
    """Keep torch.compile's caches between experiments, in the data cache, not in /tmp.

    Most edits change constants, not shapes, so the next run finds its compiled graphs and
    autotuning results on disk instead of compiling from scratch. A user's own setting wins.
    """
    if environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return {}
    return {
        "TORCHINDUCTOR_CACHE_DIR": str(cache_dir(dict(environ)) / "compile"),
        "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
        "TORCHINDUCTOR_AUTOGRAD_CACHE": "1",
    }


def _history_description(e: Experiment) -> str:
    """What the agent reads for a past experiment: a refusal carries its reason."""
    reason = e.extra.get("reason")
    if e.status in ("invalid", "rejected") and reason:
        return f"{e.description} ({e.status}: {' '.join(str(reason).split())[:160]})"
    return e.description


def _agent_info(p: Proposal) -> dict:
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


def _json(obj: object) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False)
