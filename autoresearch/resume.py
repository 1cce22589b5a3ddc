"""Starting a session, or reconciling git with the record after any death to resume one.

`start` refuses a workspace whose state the session could damage (an existing branch, a
detached HEAD, uncommitted work, a record without its branch), then creates and checks out
`autoresearch/<tag>`. `resume` kills the processes the stopped session left running (their
markers are in state.json), refuses a branch moved by hand (except, while the record has no
baseline because it crashed, commits on top of the session's base: the fix, whose tip the
baseline is trained at again), restores train.py and returns the experiment in flight, to be
trained again under its id. Both probe the box and, in a
sealed session, take (or check) the fingerprints: they return the session's `Sealing`.

Guarantees: nothing a user made is reset or overwritten; an experiment in the record is never
trained again, one in flight when the session died always is.

What it does not do: train, or decide; the loop (loop.py) continues from what these return.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import fingerprint, runner, sandbox
from .display import Display, plural
from .errors import WorkspaceError
from .experiment import Experiment
from .gitrepo import GitRepo
from .ledger import Ledger
from .options import SessionOptions
from .record import attempt_ref, branch_name, now
from .slot import Sealing, fingerprinter
from .status import Status
from .workspace import TRAIN_FILE, data_manifest


@dataclass(frozen=True)
class Begun:
    """Where a started or resumed session stands."""

    sealing: Sealing
    pending: dict | None  # the experiment in flight when the session died (state.json's)
    # with slots (coordinator.py): every experiment in flight to train again, on any slot
    in_flight: tuple[dict, ...] = ()
    slotted: bool = False  # the session runs slots: it was asked to, or its state has them


def best_commit(ledger: Ledger, session: dict | None = None) -> str:
    best = ledger.best()
    if best and best.commit:
        return best.commit
    session = session or ledger.read_session() or {}
    return session["base"]


def start(
    root: Path, opts: SessionOptions, repo: GitRepo, ledger: Ledger, display: Display, agent: str
) -> Begun:
    branch = _branch(opts)
    if repo.branch_exists(branch):
        raise WorkspaceError(
            f"branch {branch} already exists: continue it with `--resume`, "
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
    if ledger.experiments():
        raise WorkspaceError(
            f"{ledger.run_dir} already holds a record but the branch is gone: "
            "choose another --tag, or move that directory away"
        )
    data_manifest()
    sealing, fields = seal(root, opts, display, None)
    base = repo.head()
    repo.create_branch(branch, base)
    repo.checkout(branch)
    ledger.update_session(
        tag=opts.tag,
        branch=branch,
        base=base,
        started=now(),
        preset=opts.preset,
        device=opts.device,
        agent=agent,
        **fields,
    )
    return Begun(sealing, None, (), opts.slotted)


def seal(
    root: Path, opts: SessionOptions, display: Display, session: dict | None
) -> tuple[Sealing, dict]:
    """Probe network isolation; in a sealed session, fingerprint (or, on resume, check)
    what the metric depends on. Returns the Sealing and the fields for session.json."""
    probed = sandbox.probe()
    box = sandbox.require(probed, unsandboxed=opts.unsandboxed)
    display.note(probed.note if box else sandbox.UNSANDBOXED_NOTE)
    isolation = runner.network_isolation()
    if not isolation.prefix:
        display.note(isolation.note)
    fields: dict = {
        "sealed": opts.sealed,
        "network_isolation": isolation.note,
        "sandbox": {**probed.record(), "unsandboxed": opts.unsandboxed},
    }
    if not opts.sealed:
        return Sealing(box, isolation, {}), fields
    session = session or {}
    dataset = Path(session.get("dataset") or fingerprint.active_dataset())
    prints = fingerprinter(root, opts, dataset)
    recorded = session.get("fingerprints")
    if recorded:
        prints.check(recorded, tag=opts.tag, when="on resume")
    else:
        recorded = prints.take()
    sealed = {"dataset": str(dataset), "fingerprints": recorded, "time_budget": opts.time_budget}
    return Sealing(box, isolation, sealed), {**fields, **sealed}


def resume(
    root: Path, opts: SessionOptions, repo: GitRepo, ledger: Ledger, display: Display
) -> Begun:
    """Reconcile git with the record after any death; returns the experiment in flight."""
    branch = _branch(opts)
    if not repo.branch_exists(branch):
        raise WorkspaceError(
            f"nothing to resume: branch {branch} does not exist (start it without --resume)"
        )
    session = ledger.read_session()
    if not session:
        raise WorkspaceError(
            f"branch {branch} exists but {ledger.run_dir} has no session record: "
            "it was not made by this tool, or its runs/ directory was removed"
        )
    repo.clear_stale_lock()
    state = ledger.read_state() or {}
    entries = list(state["slots"].values()) if "slots" in state else [state] if state else []
    markers = [e[k] for e in entries for k in ("run_marker", "eval_marker") if e.get(k)]
    orphans = sum(runner.kill_orphans(marker) for marker in markers)
    if orphans:
        display.note(f"killed {orphans} process(es) the stopped session left running")
    done = {e.id for e in ledger.experiments()}
    flying = [e for e in entries if e.get("id") not in done]
    pending = flying[0] if flying and "slots" not in state else None
    rerun = None if flying else _interrupted_last(ledger)
    pending = pending or rerun
    in_flight = [e for e in flying if e.get("commit")] or ([rerun] if rerun else [])
    slotted = opts.slotted or "slots" in state
    ours = {session["base"]} | {e.commit for e in ledger.experiments() if e.commit}
    ours |= {e["commit"] for e in in_flight}
    tip = repo.branch_sha(branch)
    # no baseline yet (it crashed): commits made on the branch since are the fix, and the
    # baseline is trained again at the tip
    fixed = ledger.best() is None and not in_flight and repo.is_ancestor(session["base"], tip)
    if tip not in ours and not fixed:
        best, saved = best_commit(ledger, session)[:12], f"{opts.tag}-by-hand"
        move_back = (
            f"git branch {saved} && git reset --hard {best}"
            if repo.current_branch() == branch
            else f"git branch {saved} {branch} && git branch -f {branch} {best}"
        )
        raise WorkspaceError(
            f"branch {branch} points at {tip[:12]}, a commit this session did not make "
            f"(moved by hand?): keep that commit on a branch of its own and move "
            f"{branch} back to the session's best with `{move_back}`, "
            "or start a new --tag"
        )
    dirty = repo.dirty_paths()
    if dirty - {TRAIN_FILE}:
        raise WorkspaceError(
            f"uncommitted changes to {', '.join(sorted(dirty - {TRAIN_FILE}))}: "
            "commit or stash them, then resume"
        )
    # Only train.py can be dirty here, and only the session writes it: restore it. With slots
    # the workspace holds the best, and candidates are checked out in the slots' worktrees.
    target = tip if fixed else best_commit(ledger, session)
    if pending and pending.get("commit") and not slotted:
        target = pending["commit"]
    sealing, fields = seal(root, opts, display, session)
    ledger.update_session(**fields)
    repo.checkout(branch, force=True)
    repo.reset_hard(target)
    ledger.rebuild_tsv()
    if rerun:
        _carry_over(repo, ledger, opts.tag, rerun)
    again = f" (experiment {rerun['rerun_of']:04d}, interrupted)" if rerun else ""
    ids = ", ".join(f"{e['id']:04d}" for e in in_flight)
    several = "s" if len(in_flight) > 1 else ""
    display.note(
        f"resuming {branch}: {plural(len(done), 'experiment')} recorded"
        + (f", re-running experiment{several} {ids}{again}" if ids else "")
    )
    return Begun(sealing, pending, tuple(in_flight), slotted)


def _branch(opts: SessionOptions) -> str:
    return branch_name(opts.tag)


def _interrupted_last(ledger: Ledger) -> dict | None:
    """The training state that re-runs the last experiment, when Ctrl-C twice killed it.

    The record keeps the interrupted attempt (what happened); the re-run is a new
    experiment, under the next id, of the same commit, so what did not finish is trained
    again as the README says. Nothing is written here.
    """
    exps = ledger.experiments()
    last = exps[-1] if exps else None
    if last is None or last.status != Status.interrupted or not last.commit:
        return None
    return {
        "phase": "training",
        "id": ledger.next_id(),
        "commit": last.commit,
        "description": last.description,
        "parent": last.parent,
        "fix_of": last.fix_of,
        "agent": last.agent,
        "rerun_of": last.id,
        "baseline": ledger.best() is None,
    }


def _carry_over(repo: GitRepo, ledger: Ledger, tag: str, rerun: dict) -> None:
    """The re-run's attempt ref and the artifacts of the proposal it trains again."""
    if not rerun["baseline"]:
        repo.update_ref(attempt_ref(tag, rerun["id"]), rerun["commit"])
    old = ledger.run_dir / f"{rerun['rerun_of']:04d}"
    for name in ("patch.diff", "prompt.json", "reply.txt"):
        if (old / name).is_file():
            ledger.write_artifact(rerun["id"], name, (old / name).read_bytes())


def baseline_crash(ledger: Ledger, tag: str, exp: Experiment | None) -> str:
    """What a session whose baseline crashed says (BaselineCrashed): what crashed, where its
    log is, and how to go on: a resume trains the baseline again (the loop does so whenever
    the record has no best)."""
    what = "the baseline crashed"
    if exp is not None:
        kind = exp.crash_class or exp.status
        logs = sorted(ledger.experiment_dir(exp.id).glob("*.log"), key=lambda p: p.stat().st_mtime)
        where = f"its log: {logs[-1]}" if logs else f"see {ledger.run_dir}"
        what = f"the baseline (train.py at {exp.commit[:8]}) crashed ({kind}); {where}"
    return (
        f"{what}. Without a baseline there is nothing to compare a change with. Fix train.py "
        f"(or the data) and commit it on branch {branch_name(tag)}; "
        f"`autoresearch run --resume --tag {tag}` (or the next `autoresearch try`) then "
        "trains the baseline again"
    )
