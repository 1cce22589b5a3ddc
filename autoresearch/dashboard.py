"""The live dashboard's state and rendering (`Dashboard`), and the plain mode's header line.

The session's thread replaces the dashboard's fields whole, never mutates them, and rich's
refresh thread reads each field once per frame: no lock, and a hook never waits on a frame.
Rendering fits the terminal's height (fewer table rows on a short one) and leaves two columns
free for the terminal's "^C" echo. It decides nothing and prints nothing itself: display.py
owns the Live and the console.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from .formatting import (
    STATUS_ORDER,
    STATUS_STYLE,
    busy_line,
    device_name,
    hours_text,
    is_finite,
    one_of,
    plural,
    printable,
    short_count,
    short_duration,
)
from .ledger import Experiment, baseline_of
from .runner import Step
from .status import FAILED, Status

RECENT = 10  # experiments in the dashboard's table (fewer when the terminal is short)
DASHBOARD_FIXED_LINES = 15  # dashboard lines besides the table's rows, to fit short terminals
CTRL_C_ECHO_COLUMNS = 2  # right margin kept free for the terminal's "^C" echo
PHASE_STYLE = {"proposing": "cyan", "repairing": "yellow", "training": "bold blue"}


# --------------------------------------------------------------------------- state


@dataclass(frozen=True)
class Budgets:
    """What ends the session besides the agent and Ctrl-C (None: no such limit)."""

    max_experiments: int | None = None
    max_hours: float | None = None
    max_cost: float | None = None  # USD of agent tokens
    time_budget: float | None = None  # seconds of training per experiment


@dataclass(frozen=True)
class Record:
    """The experiments so far and what is summed from them, computed once per result."""

    experiments: tuple[Experiment, ...] = ()
    counts: dict[str, int] = field(default_factory=dict)
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    unpriced: int = 0  # experiments whose agent tokens have no known price
    baseline: Experiment | None = None
    best: Experiment | None = None  # the incumbent: the latest keep, as Ledger.best()

    @classmethod
    def of(cls, experiments: Iterable[Experiment]) -> Record:
        exps = tuple(experiments)
        counts: dict[str, int] = {}
        tokens_in = tokens_out = unpriced = 0
        cost = 0.0
        for e in exps:
            counts[e.status] = counts.get(e.status, 0) + 1
            tokens_in += int(e.agent.get("tokens_in") or 0)
            tokens_out += int(e.agent.get("tokens_out") or 0)
            price = e.extra.get("cost_usd")
            if price is None and "cost_usd" in e.extra:
                unpriced += 1
            cost += price or 0.0
        return cls(
            experiments=exps,
            counts=counts,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            cost_usd=cost,
            unpriced=unpriced,
            baseline=baseline_of(exps),
            best=next((e for e in reversed(exps) if e.status == Status.keep), None),
        )


@dataclass(frozen=True)
class Run:
    """The experiment in flight."""

    exp_id: int
    phase: str  # proposing, repairing or training
    started: float  # clock() when the phase began
    description: str = ""
    agent: str = ""
    fix_of: int | None = None
    budget: float | None = None  # TIME_BUDGET of this run, seconds
    step: Step | None = None  # the latest step line


class Dashboard:
    """The live view: state and rendering.

    The loop's thread replaces fields whole (never mutates them) and rich's refresh thread
    reads each field once per frame, so no lock is needed and a hook never waits on a frame.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.started: float | None = None  # clock() at session_start; None outside a session
        self.title = "autoresearch"
        self.budgets = Budgets()
        self.record = Record()
        self.run: Run | None = None
        # with several slots (--workers, --gpus): the run on each slot, by slot name
        self.slots: Mapping[str, Run] = {}
        self.device: str | None = None  # cuda or cpu, once known: names busy, shows MFU
        self.notes: tuple[str, ...] = ()
        self.closed = False  # the last frame: nothing runs any more

    @property
    def gpu(self) -> bool:
        """MFU is a GPU's figure: on a CPU train.py prints 0.0 and it is not shown."""
        return device_name(self.device) == "GPU"

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        # Two columns to spare: the terminal echoes Ctrl-C as "^C" where the cursor is, the
        # end of the last line; on a full-width line that wraps, scrolls, and the next frame
        # would be drawn one line low, leaving a stale top border behind.
        width = max(1, options.max_width - CTRL_C_ECHO_COLUMNS)
        yield from console.render(self.render(options.max_height), options.update_width(width))

    def render(self, max_height: int | None = None) -> RenderableType:
        now = self.clock()
        run, record, started = self.run, self.record, self.started
        parts: list[RenderableType] = [*self._current(run, now)]
        subtitle = None
        if started is not None:
            rows = RECENT
            if max_height is not None:
                rows = max(3, min(RECENT, max_height - DASHBOARD_FIXED_LINES))
            parts += [
                Text(""),
                self._best(record),
                self._recent(record, rows),
                self._counts(record),
                self._usage(record),
                self._limits(record, now, started),
            ]
            hint = "" if self.closed else " · Ctrl-C stops after this experiment"
            subtitle = Text(f"session {short_duration(now - started)}{hint}", style="dim")
        parts += [
            Text(f"· {note}", style="cyan", no_wrap=True, overflow="ellipsis")
            for note in self.notes
        ]
        return Panel(
            Group(*parts),
            title=Text(self.title, style="bold"),
            title_align="left",
            subtitle=subtitle,
            subtitle_align="right",
            border_style="blue",
        )

    # -- sections

    def _current(self, run: Run | None, now: float) -> list[RenderableType]:
        slots = self.slots
        if slots:
            lines = [self._slot_line(name, r, now) for name, r in sorted(slots.items())]
            if run is not None and run.phase != "training":
                lines += self._run_view(run, now)
            return lines
        return self._run_view(run, now)

    def _run_view(self, run: Run | None, now: float) -> list[RenderableType]:
        if run is None:
            idle = "session over" if self.closed else "waiting for the next experiment…"
            return [Text(idle, style="dim")]
        elapsed = short_duration(now - run.started)
        head = Text.assemble(
            (f"exp {run.exp_id:04d}  ", "bold"),
            (
                run.phase if run.fix_of is None else f"repairing exp {run.fix_of:04d}",
                PHASE_STYLE.get(run.phase, ""),
            ),
            "  ",
            no_wrap=True,
            overflow="ellipsis",
        )
        if run.phase != "training":
            thinking = "stopped" if self.closed else f"is thinking… {elapsed}"
            head.append(f"{run.agent} agent {thinking}", style="dim")
            return [head]
        head.append(run.description)
        step = run.step
        pct = step.pct if step is not None and is_finite(step.pct) else 0.0
        bar = Table.grid(expand=True, padding=(0, 1))
        bar.add_column(ratio=1)
        bar.add_column(justify="right", no_wrap=True)
        bar.add_row(
            ProgressBar(total=100.0, completed=min(max(pct, 0.0), 100.0)),
            Text(f"{pct:5.1f}%" + (f"  step {step.step:05d}" if step is not None else "")),
        )
        return [head, bar, self._step_stats(run, step, elapsed)]

    @staticmethod
    def _slot_line(name: str, run: Run, now: float) -> Text:
        """`slot 1  exp 0003  42.0%  1m20s  WIDTH to 128`: one line per slot."""
        step = run.step
        pct = f"{step.pct:5.1f}%" if step is not None and is_finite(step.pct) else "start"
        return Text.assemble(
            (f"slot {printable(name)}  ", "bold"),
            (f"exp {run.exp_id:04d}  ", "bold"),
            (f"{pct}  {short_duration(now - run.started)}  ", PHASE_STYLE.get(run.phase, "")),
            run.description,
            no_wrap=True,
            overflow="ellipsis",
        )

    def _step_stats(self, run: Run, step: Step | None, elapsed: str) -> Text:
        if step is None:
            budget = f" (TIME_BUDGET {run.budget:g}s)" if is_finite(run.budget) else ""
            return Text(f"starting: imports, data, compile… {elapsed}{budget}", style="dim")
        done = (is_finite(step.remaining_s) and step.remaining_s <= 0) or (
            is_finite(step.pct) and step.pct >= 100
        )
        if done:
            left = "evaluating val_bpb…"
        else:
            left = (
                f"{short_duration(step.remaining_s)} left"
                if is_finite(step.remaining_s)
                else "— left"
            )
        fields = [
            f"loss {step.loss:.4f}" if is_finite(step.loss) else "loss —",
            f"{step.tok_per_sec:,.0f} tok/s" if is_finite(step.tok_per_sec) else "— tok/s",
            *([f"MFU {step.mfu:.1f}%" if is_finite(step.mfu) else "MFU —"] if self.gpu else []),
            left,
            f"{elapsed} elapsed",
        ]
        return Text(" · ".join(fields), no_wrap=True, overflow="ellipsis")

    @staticmethod
    def _best(record: Record) -> Text:
        best, base = record.best, record.baseline
        if best is None or not is_finite(best.val_bpb):
            return Text("best val_bpb —  (no experiment kept yet)", style="dim")
        line = Text.assemble(
            "best val_bpb ", (f"{best.val_bpb:.6f}", "bold green"), f"  exp {best.id:04d}"
        )
        if base is not None and is_finite(base.val_bpb) and base is not best:
            delta = best.val_bpb - base.val_bpb
            pct = f" ({100 * delta / base.val_bpb:+.2f}%)" if base.val_bpb else ""
            line.append(f"  Δ {delta:+.6f}{pct}", style="green" if delta < 0 else "")
            line.append(f" from baseline {base.val_bpb:.6f}")
        if base is best:
            line.append("  (the baseline)", style="dim")
        else:
            line.append(f"  {printable(best.description)}", style="dim")
        line.no_wrap, line.overflow = True, "ellipsis"
        return line

    @staticmethod
    def _recent(record: Record, rows: int) -> RenderableType:
        if not record.experiments:
            return Text("no experiments yet", style="dim")
        table = Table(box=box.SIMPLE_HEAD, expand=True, pad_edge=False, show_edge=False)
        table.add_column("exp", no_wrap=True)
        table.add_column("status", no_wrap=True)
        table.add_column("val_bpb", justify="right", no_wrap=True)
        table.add_column("Δ", justify="right", no_wrap=True)
        table.add_column("time", justify="right", no_wrap=True)
        table.add_column("description", ratio=1, no_wrap=True, overflow="ellipsis")
        for e in record.experiments[-rows:]:
            if e.status in FAILED:
                delta = printable(e.crash_class or "")
            elif is_finite(e.val_bpb) and is_finite(e.best_before):
                delta = f"{e.val_bpb - e.best_before:+.6f}"
            else:
                delta = "baseline" if e is record.baseline else ""
            description = Text(printable(e.description))
            reason = e.extra.get("reason")
            if reason:
                description.append(f" — {printable(reason)}", style="dim")
            table.add_row(  # Text cells: a str cell would be parsed as markup
                Text(f"{e.id:04d}"),
                Text(printable(e.status)),
                Text(f"{e.val_bpb:.6f}" if is_finite(e.val_bpb) else "—"),
                Text(delta),
                Text(short_duration(e.train_seconds) if is_finite(e.train_seconds) else ""),
                description,
                style=STATUS_STYLE.get(e.status, ""),
            )
        return table

    @staticmethod
    def _counts(record: Record) -> Text:
        line = Text(f"{plural(len(record.experiments), 'experiment')}: ")
        ordered = sorted(record.counts.items(), key=lambda kv: STATUS_ORDER.get(kv[0], 99))
        for i, (status, count) in enumerate(ordered):
            line.append(", " if i else "")
            line.append(f"{count} {printable(status)}", style=STATUS_STYLE.get(status, ""))
        if not record.counts:
            line.append("none")
        line.no_wrap, line.overflow = True, "ellipsis"
        return line

    def _usage(self, record: Record) -> Text:
        """Busy (as `status` says it: `busy_percent`), agent tokens and their cost."""
        return Text(
            busy_line(record.experiments, self.device)
            + f" · agent tokens {short_count(record.tokens_in)} in / {short_count(record.tokens_out)} out"
            + f" · cost ${record.cost_usd:.2f}"
            + (f" (+{record.unpriced} unpriced)" if record.unpriced else ""),
            no_wrap=True,
            overflow="ellipsis",
        )

    def _limits(self, record: Record, now: float, started: float) -> Text:
        b = self.budgets
        parts = []
        if b.max_experiments is not None:
            left = max(0, b.max_experiments - len(record.experiments))
            parts.append(f"{plural(b.max_experiments, 'experiment')} ({left} left)")
        if b.max_hours is not None:
            left_s = b.max_hours * 3600 - (now - started)
            parts.append(f"{hours_text(b.max_hours)} ({short_duration(left_s)} left)")
        if b.max_cost is not None:
            parts.append(
                f"${b.max_cost:.2f} of agent cost (${max(0.0, b.max_cost - record.cost_usd):.2f} left)"
            )
        if not parts:
            return Text(
                "ends when the agent stops or on Ctrl-C (no --max-experiments/hours/cost)",
                style="dim",
            )
        return Text("ends after " + one_of(parts), style="bold", no_wrap=True, overflow="ellipsis")


def plain_limits(budgets: Budgets, recorded: int) -> str:
    """The budgets as one plain line (the plain mode's session header)."""
    parts = []
    if budgets.max_experiments is not None:
        parts.append(f"{plural(budgets.max_experiments, 'experiment')} ({recorded} recorded)")
    if budgets.max_hours is not None:
        parts.append(hours_text(budgets.max_hours))
    if budgets.max_cost is not None:
        parts.append(f"${budgets.max_cost:.2f} of agent cost")
    ends = (
        "ends after " + one_of(parts)
        if parts
        else "no limit: ends when the agent stops or on Ctrl-C"
    )
    per_run = (
        f"TIME_BUDGET {budgets.time_budget:g}s per run; " if is_finite(budgets.time_budget) else ""
    )
    return f"session: {per_run}{ends}"
