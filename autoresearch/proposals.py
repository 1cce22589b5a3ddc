"""Getting the next candidate from the agent: what it is shown, proposals prepared in the
background while runs train, an edit made on an older best re-applied to the new one, and the
checks that refuse a proposal before anything is committed (a duplicate, a seed-only change).

Guarantees: at most one call into the agent at a time (a lock); a proposal prepared against a
best that has moved since is either three-way merged onto the new best and still compiles, or
dropped and asked for again; a second Ctrl-C while the session waits for the agent raises
KeyboardInterrupt there (`interruptible`), before anything is committed.

What it does not do: commit, train or record anything.
"""

from __future__ import annotations

import ast
import hashlib
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

from . import noise
from .agent import Agent, Context, HistoryEntry, Proposal
from .display import Display
from .edits import check_compiles
from .errors import EditError
from .gitrepo import GitRepo, merge_texts
from .ledger import Experiment
from .status import Status
from .workspace import TRAIN_FILE


class Sources:
    """train.py at a commit, read once per commit."""

    def __init__(self, repo: GitRepo) -> None:
        self.repo = repo
        self._cache: dict[str, str] = {}

    def __call__(self, commit: str) -> str:
        if commit not in self._cache:
            self._cache[commit] = self.repo.show_file(commit, TRAIN_FILE)
        return self._cache[commit]


def normalized_hash(source: str) -> str:
    """Hash of train.py ignoring trailing whitespace and blank lines (a no-op edit hashes the same)."""
    lines = [line.rstrip() for line in source.splitlines() if line.strip()]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def duplicate_of(
    source: str, exps: Sequence[Experiment], sources: Callable[[str], str]
) -> int | None:
    """The id of an experiment whose train.py is `source` up to blank lines, if any."""
    digest = normalized_hash(source)
    for e in exps:
        if e.commit and normalized_hash(sources(e.commit)) == digest:
            return e.id
    return None


def refusal(
    source: str,
    exps: Sequence[Experiment],
    sources: Callable[[str], str],
    *,
    best: str,
    in_flight: Sequence[tuple[int, str, str]] = (),
) -> str | None:
    """Why a proposed train.py (`source`) is recorded as invalid without training, if it is:
    the same train.py as a recorded experiment or one in flight (`in_flight`: (id, commit,
    description)), or the best commit's (`best`) with new seeds only."""
    duplicate = duplicate_of(source, exps, sources)
    if duplicate is None:
        same = normalized_hash(source)
        duplicate = next((i for i, c, _ in in_flight if normalized_hash(sources(c)) == same), None)
    if duplicate is not None:
        return f"train.py identical to experiment {duplicate:04d}"
    seeds = seed_only_change(sources(best), source)
    if seeds:
        return (
            f"only the random seed changed ({', '.join(seeds)}): a new seed "
            "measures noise, not an idea"
        )
    return None


def context(
    root: Path,
    exps: Sequence[Experiment],
    best: Experiment | None,
    *,
    best_source: str,
    sources: Callable[[str], str],
    measurements: noise.Measurements,
    preset: str,
    running: Sequence[tuple[int, str, str]] = (),
) -> Context:
    """What the agent is shown: program.md, the best train.py, every experiment, and the
    candidates in flight (`running`: (id, commit, description)) listed as `running`, so that
    it does not propose the same idea twice."""
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
                source=sources(e.commit) if e.commit else None,
                verdict=e.extra.get("verdict"),
            )
        )
        if e.status == Status.keep:
            best_so_far = e.val_bpb
    for exp_id, commit, description in running:
        history.append(
            HistoryEntry(
                id=exp_id,
                status=Status.running,
                val_bpb=None,
                delta=None,
                description=f"(training now) {description}".rstrip(),
                source=sources(commit),
            )
        )
    crashes = [e for e in exps if e.status == Status.crash]
    return Context(
        program=(root / "program.md").read_text(encoding="utf-8"),
        train_py=best_source,
        history=history,
        best_bpb=best.val_bpb if best else best_so_far,
        last_crash_tail=crashes[-1].extra.get("log_tail") if crashes else None,
        noise=measurements.sigma(),
        preset=preset,
    )


def _history_description(e: Experiment) -> str:
    """What the agent reads for a past experiment: a refusal carries its reason."""
    reason = e.extra.get("reason")
    if e.status in (Status.invalid, Status.rejected) and reason:
        return f"{e.description} ({e.status}: {' '.join(str(reason).split())[:160]})"
    return e.description


def rebase(
    proposal: Proposal, base: str, best: str, sources: Callable[[str], str]
) -> Proposal | None:
    """Re-apply an edit made against `base` onto `best` (a three-way merge of train.py);
    None when it does not merge or the merge does not compile."""
    merged = merge_texts(sources(base), sources(best), proposal.source)
    if merged is None:
        return None
    try:
        check_compiles(merged)
    except EditError:
        return None
    proposal.source = merged
    proposal.rebased_from = base
    return proposal


class Proposer:
    """The agent, called one at a time, with proposals prepared in the background."""

    def __init__(self, agent: Agent, display: Display, sources: Callable[[str], str]) -> None:
        self.agent = agent
        self.display = display
        self.sources = sources
        self.interruptible = False  # True while blocked on the agent: a second Ctrl-C raises
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="autoresearch-agent")
        self._lock = threading.Lock()
        self._pending: list[tuple[Future, str]] = []  # (proposal being made, best it was made on)

    @property
    def overlaps(self) -> bool:
        return bool(getattr(self.agent, "overlaps", False))

    @property
    def prepared(self) -> int:
        """How many proposals are being made (or are ready) in the background."""
        return len(self._pending)

    def prepare(self, ctx: Context, base: str) -> None:
        """Start proposing in the background, on `ctx` (whose best is `base`)."""
        self._pending.append((self._executor.submit(self._locked, self.agent.propose, ctx), base))

    def next(self, exp_id: int, best: str, ctx: Callable[[], Context]) -> Proposal:
        """The oldest proposal prepared in the background, re-applied to `best` if that moved;
        or a fresh one, on `ctx()`, when there is none or it no longer applies."""
        if self._pending:
            future, base = self._pending.pop(0)
            waited = time.monotonic()
            if not future.done():
                self.display.proposing(exp_id, self.agent.name)
            proposal = self._wait(future)
            proposal.wait_s = round(time.monotonic() - waited, 2)
            if base == best:
                return proposal
            rebased = rebase(proposal, base, best, self.sources)
            if rebased is not None:
                return rebased
            self.display.note("the prepared edit no longer applies to the new best: asking again")
        self.display.proposing(exp_id, self.agent.name)
        return self.ask(self.agent.propose, ctx())

    def ask(self, call, *args):
        """Call the agent; a second Ctrl-C interrupts it (nothing is committed yet)."""
        self.interruptible = True
        try:
            return self._locked(call, *args)
        finally:
            self.interruptible = False

    def _wait(self, future: Future) -> Proposal:
        """The background proposal's result; a second Ctrl-C interrupts the wait."""
        self.interruptible = True
        try:
            while True:
                try:
                    return future.result(timeout=0.5)
                except FutureTimeout:
                    continue
        finally:
            self.interruptible = False

    def _locked(self, call, *args):
        with self._lock:
            return call(*args)


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
