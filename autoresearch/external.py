"""`autoresearch try`: one experiment whose edit an outside coding agent made by hand.

The agent (Claude Code, Codex, Aider, …) edits train.py in the working tree and calls `try`;
the experiment is the built-in loop's own: a `Session` on the tag (started, baseline and
calibration included, when the tag has none; resumed otherwise) whose agent is
`ExternalAgent`, which hands over the working tree's train.py once and then says it has no
more. So validation, the `exp NNNN` commit, the time-boxed training, the sealed evaluation,
the keep rule with its repeats, the record, the attempt ref and the reset to the best are the
ones `run` uses, and `run` and `try` can alternate on one tag.

Guarantees:
- Nothing is read, written or trained while another `run` or `try` holds the workspace lock
  (lock.py): the second is refused with exit status 13.
- A candidate is refused before anything is written when a file other than train.py differs
  from the best commit (prepare.py named as the trusted file), or train.py is unchanged.
- An experiment a killed `try` (or `run`) left unfinished is finished first, as
  `run --resume` does; when the working tree still holds that experiment's train.py (what a
  killed `try` leaves), it is not trained twice: its verdict is this call's.
- On a new tag, the candidate is saved to runs/<tag>/try-candidate.json before train.py is
  restored for the baseline; a `try` killed before committing it picks it up again.
- After the verdict the branch and working tree are at the best commit: the new one on keep,
  the old one on discard, crash or invalid (the attempt stays at
  refs/autoresearch/<tag>/attempts/NNNN).

What it does not do: edit train.py, repair crashes (the outside agent does that itself;
`--fix-attempts` is 0 here), or stop an agent from running git by hand (a branch moved by
hand is refused, as `run --resume` refuses it). `ExternalAgent` is not one of `run`'s
`--agent` choices: it has one proposal, made before the command started.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from .agent import AgentExhausted, Context, InvalidProposal, Proposal, _local_proposal
from .display import Display
from .edits import check_compiles
from .errors import AutoresearchError, EditError, UsageError, WorkspaceError
from .gitrepo import GitRepo, merge_texts
from .ledger import Experiment, Ledger, decision_of
from .lock import BUSY_EXIT, WorkspaceBusy, workspace_lock
from .loop import Session, branch_name, normalized_hash
from .options import SessionOptions
from .status import Status, Word
from .workspace import RUNS_DIR, TRAIN_FILE

AGENT_NAME = "external"  # the agent's name in the record (session.json, experiments.jsonl)
CANDIDATE_FILE = "try-candidate.json"  # runs/<tag>/: a new tag's candidate during its baseline
LOG_TAIL_LINES = 30  # of a crashed run's log, in the verdict
TRUSTED_FILES = ("prepare.py",)  # named apart in a refusal: the metric and the data

# Exit statuses of `autoresearch try`; the verdict's `status` says the same in words.
EXIT_KEEP = 0
EXIT_DISCARD = 10
EXIT_CRASH = 11  # crash, rejected or interrupted: no val_bpb
EXIT_REFUSED = 12  # not trained: the working tree's change was refused, or recorded `invalid`
EXIT_BUSY = BUSY_EXIT  # 13: another `run` or `try` holds this workspace
EXIT_CODES = {Status.keep: EXIT_KEEP, Status.discard: EXIT_DISCARD, Status.invalid: EXIT_REFUSED}


class NotTried(Word):
    """The verdict's `status` when nothing was tried: no experiment, so not a `Status`."""

    refused = "refused"  # the working tree's change was refused (EXIT_REFUSED)
    busy = "busy"  # another `run` or `try` holds the workspace (EXIT_BUSY)


class TryRefused(AutoresearchError):
    """The working tree cannot be tried as it is; nothing was written. The message says what
    to change."""

    exit_code = EXIT_REFUSED

    def __init__(self, message: str, files: list[str] | None = None) -> None:
        super().__init__(message)
        self.files = files or []


class ExternalAgent:
    """An agent whose one proposal was made outside the tool: train.py as the outside agent
    left it, edited from `base` (train.py of the checked-out commit: the best, or the
    unfinished candidate a kill left checked out). When the best it is proposed against is
    not `base` (that candidate was discarded, or kept while this call finished it), the edit
    is carried over by a three-way merge, as the loop re-applies a prepared proposal. After
    that one proposal it has no more, which ends the session after exactly one new
    experiment."""

    name = AGENT_NAME
    model = AGENT_NAME
    overlaps = False  # the next proposal is the outside agent's, after it reads the verdict

    def __init__(self, description: str, source: str | None, base: str, diff: str) -> None:
        self.description = description
        self.source = source  # None: nothing new to try (only an unfinished experiment)
        self.base = base
        self.diff = diff

    def propose(self, ctx: Context) -> Proposal:
        source, self.source = self.source, None
        if source is None:
            raise AgentExhausted("`try` runs one experiment per call")
        started = time.monotonic()
        messages = [{"role": "user", "content": "(edited by an outside agent: `autoresearch try`)"}]
        reply = f"{self.description}\n\n{self.diff}"
        rebased_from = None
        if ctx.train_py != self.base:
            merged = merge_texts(self.base, ctx.train_py, source)
            if merged is None:
                raise InvalidProposal(
                    "the edit conflicts with the best train.py it was to be tried on (an "
                    "unfinished experiment was judged first): edit the best again",
                    messages=messages,
                    reply=reply,
                    description=self.description,
                    model=self.model,
                )
            source, rebased_from = merged, "the checked-out train.py it was edited from"
        try:
            check_compiles(source)
        except EditError as exc:
            raise InvalidProposal(
                str(exc), messages=messages, reply=reply, description=self.description,
                model=self.model,
            ) from None  # fmt: skip
        return _local_proposal(
            self, self.description, source, started, messages, reply, rebased_from
        )

    def fix(self, ctx: Context, failed_source: str, crash_tail: str) -> Proposal:
        raise AgentExhausted("the outside agent repairs its own crashes")


@dataclass
class TryResult:
    """What one `try` did: the experiment judged for this call, and those recorded before it
    in the same call (a new session's baseline, an experiment a killed command left
    unfinished)."""

    experiment: Experiment
    tag: str
    best: Experiment | None
    recorded_first: list[Experiment] = field(default_factory=list)
    working_tree: str = ""  # where the branch and train.py were left, in words

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.experiment.status, EXIT_CRASH)


def default_tag(root: Path, fallback: str) -> str:
    """The session whose branch is checked out (an outside agent calls `try` again and again,
    past midnight too), else `fallback`."""
    repo = GitRepo(root)
    try:
        branch = repo.current_branch() or ""
    finally:
        repo.close()
    prefix = branch_name("")
    return (
        branch[len(prefix) :]
        if branch.startswith(prefix) and len(branch) > len(prefix)
        else fallback
    )


def try_experiment(
    root: Path, *, description: str, opts: SessionOptions, display: Display
) -> TryResult:
    """Run the working tree's train.py as one experiment of the session `opts.tag`, exactly
    as `run` would; raises TryRefused (nothing written) or WorkspaceBusy."""
    description = " ".join(description.split())
    if not description:
        raise UsageError("-m: describe the change in one line (it becomes the commit message)")
    with workspace_lock(root, f"try --tag {opts.tag}"):
        ledger = Ledger(root / RUNS_DIR / opts.tag)
        agent, exists = _prepare(root, opts.tag, ledger, description)
        before = ledger.next_id()
        options = replace(
            opts,
            resume=exists,
            fix_attempts=0,  # the outside agent reads the crash and repairs it itself
            overlap=False,
            max_experiments=None,
            max_hours=None,
            max_cost=None,
        )
        try:
            Session(root, options, agent, display).run()
        finally:
            if agent.source is not None:
                # Never proposed (the session stopped first: an error, the baseline crashed,
                # Ctrl-C): the outside agent gets its edit back in train.py.
                (root / TRAIN_FILE).write_text(agent.source, encoding="utf-8")
            (ledger.run_dir / CANDIDATE_FILE).unlink(missing_ok=True)
            if ledger.run_dir.is_dir() and not any(ledger.run_dir.iterdir()):
                ledger.run_dir.rmdir()  # the session refused to start: leave no trace
        recorded = [e for e in ledger.experiments() if e.id >= before]
        if not recorded:
            raise WorkspaceError(f"session {opts.tag} recorded no experiment for this call")
        best = ledger.best()
        return TryResult(
            experiment=recorded[-1],
            tag=opts.tag,
            best=best,
            recorded_first=recorded[:-1],
            working_tree=_where(root, best),
        )


def _where(root: Path, best: Experiment | None) -> str:
    """Where the branch and train.py were left, in words."""
    repo = GitRepo(root)
    try:
        head, dirty, branch = repo.head(), repo.is_dirty(), repo.current_branch()
    finally:
        repo.close()
    where = f"{branch} at {head[:12]}"
    if best is not None and best.commit == head and not dirty:
        return where + ", the best"
    return where + (", train.py holds your edit, not tried" if dirty else "")


def _prepare(root: Path, tag: str, ledger: Ledger, description: str) -> tuple[ExternalAgent, bool]:
    """The agent holding the working tree's candidate, and whether the session exists. Checks
    what differs from the best commit; on a new tag, saves the candidate and restores train.py
    (the baseline trains the best's)."""
    repo = GitRepo(root)
    try:
        branch = branch_name(tag)
        exists = repo.branch_exists(branch)
        current = repo.current_branch()
        if exists and current != branch:
            raise TryRefused(
                f"session {tag} lives on branch {branch}, but {current or 'a detached HEAD'} is "
                f"checked out: `git checkout {branch}` (carrying train.py over), then try again"
            )
        if current is None:
            raise TryRefused("HEAD is detached: check out the branch to start from")
        _refuse_other_changes(repo)
        best = _best_commit(ledger, repo) if exists else repo.head()
        best_source = repo.show_file(best, TRAIN_FILE)
        source = (root / TRAIN_FILE).read_text(encoding="utf-8")
        unfinished = _unfinished_source(ledger, repo) if exists else None
        saved = _saved_candidate(ledger, repo)
        if saved is not None and _same(source, best_source):
            description, source = saved  # a killed `try` had not committed it yet
        if unfinished is not None and (_same(source, unfinished) or _same(source, best_source)):
            candidate = None  # the unfinished experiment is this call's
        elif _same(source, best_source):
            raise TryRefused(
                f"train.py is unchanged from the best commit ({best[:12]}): edit it, then "
                "call try again"
            )
        else:
            candidate = source
        diff = repo.diff("HEAD", None, TRAIN_FILE)
        edited_from = repo.show_file("HEAD", TRAIN_FILE)
        if candidate is not None and not exists:
            _save_candidate(ledger, description, candidate)
            repo.reset_hard(best)  # only train.py differed: the baseline trains the best's
        return ExternalAgent(description, candidate, edited_from, diff), exists
    finally:
        repo.close()


def _refuse_other_changes(repo: GitRepo) -> None:
    others = sorted(repo.dirty_paths() - {TRAIN_FILE})
    if not others:
        return
    trusted = [p for p in others if p in TRUSTED_FILES]
    named = ", ".join(others)
    if trusted:
        raise TryRefused(
            f"{', '.join(trusted)} changed: it is the trusted side (the data, the tokenizer, "
            f"the metric) and may not change in a session. Restore it with "
            f"`git checkout -- {' '.join(trusted)}`; only train.py may differ from the best "
            "commit",
            files=others,
        )
    raise TryRefused(
        f"only train.py may differ from the best commit, but so do: {named}. Restore tracked "
        "files with `git checkout -- FILE`, and remove new ones or list them in .gitignore",
        files=others,
    )


def _best_commit(ledger: Ledger, repo: GitRepo) -> str:
    best = ledger.best()
    if best is not None and best.commit:
        return best.commit
    session = ledger.read_session() or {}
    return session.get("base") or repo.head()


def _unfinished_source(ledger: Ledger, repo: GitRepo) -> str | None:
    """train.py of the experiment a killed command left unfinished (state.json names it and
    the record lacks it, or the last was interrupted), as `resume.resume` finds it."""
    state = ledger.read_state() or {}
    exps = ledger.experiments()
    commit = state.get("commit") if state.get("id") not in {e.id for e in exps} else None
    if not commit and exps and exps[-1].status == Status.interrupted:
        commit = exps[-1].commit
    return repo.show_file(commit, TRAIN_FILE) if commit else None


def _same(a: str, b: str) -> bool:
    return normalized_hash(a) == normalized_hash(b)


def _save_candidate(ledger: Ledger, description: str, source: str) -> None:
    ledger.run_dir.mkdir(parents=True, exist_ok=True)
    path = ledger.run_dir / CANDIDATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"description": description, "source": source}), encoding="utf-8")
    os.replace(tmp, path)


def _saved_candidate(ledger: Ledger, repo: GitRepo) -> tuple[str, str] | None:
    """A new tag's candidate a killed `try` saved and never committed (once committed, the
    record or state.json holds it)."""
    path = ledger.run_dir / CANDIDATE_FILE
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    digest = normalized_hash(saved["source"])
    state = ledger.read_state() or {}
    commits = [e.commit for e in ledger.experiments() if e.commit] + [state.get("commit")]
    if any(c and normalized_hash(repo.show_file(c, TRAIN_FILE)) == digest for c in commits):
        return None
    return saved["description"], saved["source"]


# ------------------------------------------------------------------ the verdict


def verdict(result: TryResult) -> dict:
    """The verdict as data (`--json`, the MCP tool): status, val_bpb, Δ against the best it
    was judged against, the noise bar and σ, every run, the crash class and log tail."""
    exp = result.experiment
    d = decision_of(exp)
    extra = exp.extra or {}
    crashed = exp.status not in EXIT_CODES
    return {
        "status": exp.status,
        "exit_code": result.exit_code,
        "id": exp.id,
        "tag": result.tag,
        "description": exp.description,
        "val_bpb": exp.val_bpb,
        "best_before": exp.best_before,
        "delta": None if d.gain is None else -d.gain,
        "noise_bar": d.bar,
        "sigma": d.sigma,
        "runs": list(d.values),
        "incumbent_runs": d.incumbent_runs,
        "reason": d.reason,
        "crash_class": exp.crash_class if crashed else None,
        "log_tail": _tail(extra.get("log_tail") or "") if crashed else None,
        "commit": exp.commit,
        "attempt_ref": exp.attempt_ref,
        "best": None
        if result.best is None
        else {"id": result.best.id, "val_bpb": result.best.val_bpb, "commit": result.best.commit},
        "recorded_first": [
            {"id": e.id, "status": e.status, "val_bpb": e.val_bpb, "description": e.description}
            for e in result.recorded_first
        ],
        "working_tree": result.working_tree,
    }


def refusal(exc: TryRefused | WorkspaceBusy) -> dict:
    """A refusal as data, in the verdict's shape: nothing was trained or written."""
    busy = isinstance(exc, WorkspaceBusy)
    return {
        "status": NotTried.busy if busy else NotTried.refused,
        "exit_code": exc.exit_code,
        "reason": str(exc),
        "files": [] if busy else exc.files,
    }


def verdict_text(v: dict) -> str:
    """The verdict for a person or an agent to read: a few lines, numbers labelled."""
    if v["status"] in (NotTried.refused, NotTried.busy):
        return f"{v['status']}: {v['reason']}"
    lines = [f"exp {v['id']:04d} {v['status']}: {v['description']}"]
    if v["val_bpb"] is not None:
        runs = len(v["runs"])
        line = f"val_bpb {v['val_bpb']:.6f} (mean of {runs} run{'s' * (runs != 1)})"
        if v["best_before"] is not None:
            line += f", best before {v['best_before']:.6f}, Δ {v['delta']:+.6f}"
        lines.append(line)
    if v["noise_bar"] is not None and v["best_before"] is not None and v["val_bpb"] is not None:
        sigma = "not measured" if v["sigma"] is None else f"{v['sigma']:.6f}"
        lines.append(f"noise bar {v['noise_bar']:.6f} (σ {sigma}); a keep must gain more")
    lines.append(f"why: {v['reason']}")
    for e in v["recorded_first"]:
        lines.append(
            f"recorded first in this call: exp {e['id']:04d} {e['status']}: {e['description']}"
        )
    best = v["best"]
    if best is not None:
        lines.append(f"best: exp {best['id']:04d} val_bpb {best['val_bpb']:.6f}")
    lines.append(f"working tree: {v['working_tree']}")
    if v["attempt_ref"] and v["status"] != Status.keep:
        lines.append(f"the attempt stays at {v['attempt_ref']}")
    if v["log_tail"]:
        lines.append(f"crash class: {v['crash_class']}; last lines of the log:")
        lines.append(v["log_tail"])
    return "\n".join(lines)


def _tail(text: str) -> str:
    return "\n".join(text.splitlines()[-LOG_TAIL_LINES:])
