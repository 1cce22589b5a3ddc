"""What the user sees while a session runs.

In a terminal: a rich progress bar for the run in flight (fed by train.py's step lines) and
one coloured line per finished experiment. Not a terminal: plain lines, with step lines
thinned to one per tenth of the budget, so logs of overnight sessions stay readable.
`quiet`: only finished experiments and the session's end.
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from .ledger import Experiment
from .runner import Step

STATUS_STYLE = {
    "keep": "bold green",
    "discard": "dim",
    "crash": "bold red",
    "invalid": "yellow",
    "interrupted": "magenta",
}


def format_delta(exp: Experiment) -> str:
    if exp.val_bpb is None or exp.best_before is None:
        return ""
    return f"Δ {exp.val_bpb - exp.best_before:+.6f}"


def result_line(exp: Experiment) -> str:
    """One plain line for a finished experiment (also used by `status`)."""
    bpb = f"val_bpb {exp.val_bpb:.6f}" if exp.val_bpb is not None else "val_bpb    —    "
    extra = (
        exp.crash_class or exp.extra.get("reason", "")
        if exp.status in ("crash", "invalid")
        else format_delta(exp)
    )
    return f"exp {exp.id:04d} {exp.status:<11} {bpb}  {extra:<18} {exp.description}"


class Display:
    def __init__(
        self, console: Console | None = None, *, quiet: bool = False, live: bool | None = None
    ) -> None:
        self.console = console or Console(stderr=False)
        self.quiet = quiet
        self.live = self.console.is_terminal if live is None else live
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._next_pct = 0.0

    def note(self, message: str) -> None:
        if not self.quiet:
            self.console.print(f"[cyan]·[/] {message}", highlight=False)

    def proposing(self, exp_id: int, agent: str, fix_of: int | None = None) -> None:
        what = f"repairing experiment {fix_of:04d}" if fix_of else "proposing"
        self.note(f"exp {exp_id:04d}: {agent} agent {what}…")

    def training(self, exp_id: int, description: str, budget: float) -> None:
        self._next_pct = 0.0
        if self.quiet:
            return
        if not self.live:
            self.console.print(
                f"exp {exp_id:04d} training: {description}", highlight=False, markup=False
            )
            return
        self._progress = Progress(
            TextColumn(f"exp {exp_id:04d}"),
            BarColumn(),
            TextColumn("{task.percentage:>5.1f}%"),
            TextColumn("{task.fields[stats]}"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task(description, total=100.0, stats="starting…")

    def step(self, step: Step) -> None:
        if self.quiet:
            return
        stats = f"loss {step.loss:.4f} | {step.tok_per_sec:,.0f} tok/s | mfu {step.mfu:.1f}% | {step.remaining_s:.0f}s left"
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=min(step.pct, 100.0), stats=stats)
        elif step.pct >= self._next_pct:
            self._next_pct = step.pct + 10.0
            self.console.print(
                f"  step {step.step:05d} ({step.pct:.1f}%) | {stats}", highlight=False, markup=False
            )

    def result(self, exp: Experiment) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            self._task = None
        style = STATUS_STYLE.get(exp.status, "")
        self.console.print(f"[{style}]{result_line(exp)}[/]", highlight=False)

    def session_end(self, reason: str, exps: list[Experiment], best: Experiment | None) -> None:
        counts: dict[str, int] = {}
        for e in exps:
            counts[e.status] = counts.get(e.status, 0) + 1
        summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        baseline = exps[0].val_bpb if exps and exps[0].val_bpb is not None else None
        line = f"session ended: {reason}. {len(exps)} experiments ({summary or 'none'})"
        if best is not None and best.val_bpb is not None and baseline is not None:
            line += f"; val_bpb {baseline:.6f} → {best.val_bpb:.6f} (exp {best.id:04d})"
        self.console.print(line, highlight=False, markup=False)


def stderr_console() -> Console:
    return Console(file=sys.stderr)
