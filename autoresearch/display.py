"""What the user sees while a session runs.

One of three modes, fixed when the Display is made:
- live (an interactive terminal, not `--quiet`): a rich Live dashboard that rich's refresh
  thread redraws REFRESH_PER_SECOND times a second: the experiment in flight with a progress
  bar fed by train.py's step lines, the best val_bpb and its Δ from the baseline, the last
  experiments coloured by status, counts, agent tokens and cost, the share of the session
  spent training (named for the device: "GPU busy", "CPU busy"; MFU only on a GPU), and what
  will end the session (experiments, hours or money left).
- plain (a pipe, a log file, CI): a header line with the budgets, then one line per event,
  step lines thinned to one per tenth of the budget; never colour, never wrapped, so the logs
  of overnight sessions stay readable and greppable.
- quiet (`--quiet`): one line per finished experiment and the session's end line.

Guarantees: a hook never waits for rendering and never prints while the dashboard is live (it
replaces immutable values that the refresh thread reads, so a note from the Ctrl-C handler
cannot deadlock on rich's locks); text from the agent or the user (descriptions, reasons,
error messages) is never parsed as rich markup and has control characters replaced; `close()`
stops the live display, leaving its last frame on screen, and may be called any number of
times, also on the way out of an exception.
Not done here: the full history (`autoresearch status` has it) or deciding anything.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from .ledger import Experiment, decision_of
from .options import SessionOptions
from .runner import Step
from .status import FAILED, Status

REFRESH_PER_SECOND = 4  # dashboard redraws; a step line only updates state
RECENT = 10  # experiments in the dashboard's table (fewer when the terminal is short)
NOTES = 3  # latest notes shown inside the dashboard
PLAIN_STEP_EVERY_PCT = 10.0  # plain mode prints one step line per this much of the budget
DASHBOARD_FIXED_LINES = 15  # dashboard lines besides the table's rows, to fit short terminals
CTRL_C_ECHO_COLUMNS = 2  # right margin kept free for the terminal's "^C" echo

STATUS_STYLE = {
    Status.keep: "bold green",
    Status.discard: "dim",
    Status.crash: "bold red",
    Status.invalid: "yellow",
    Status.interrupted: "magenta",
    Status.rejected: "red",
}
_STATUS_ORDER = {status: i for i, status in enumerate(STATUS_STYLE)}
PHASE_STYLE = {"proposing": "cyan", "repairing": "yellow", "training": "bold blue"}


# --------------------------------------------------------------------------- lines and numbers


def plural(n: int, word: str) -> str:
    """'1 experiment', '2 experiments'."""
    return f"{n} {word}{'s' * (n != 1)}"


def device_name(device: str | None) -> str:
    """What the user calls the device a session trains on: GPU for cuda, else CPU (MPS)."""
    device = (device or "").lower()
    if device.startswith("cuda") or device == "gpu":
        return "GPU"
    return "MPS" if device == "mps" else "CPU"


def busy_percent(experiments: Iterable[Experiment]) -> float | None:
    """The one definition of busy, shown by the dashboard and by `status`: the share of the
    session's wall time that its training runs took (launch to exit, every run of every
    experiment), as of the last experiment recorded, since the session was last started.
    Read from that experiment's `extra.gpu_busy_s` and `extra.session_s`; None before."""
    for e in reversed(list(experiments)):
        busy, total = (e.extra or {}).get("gpu_busy_s"), (e.extra or {}).get("session_s")
        if _finite(busy) and _finite(total) and total > 0:
            return round(100.0 * busy / total, 1)
    return None


def busy_line(experiments: Iterable[Experiment], device: str | None) -> str:
    busy = busy_percent(experiments)
    share = "—" if busy is None else f"{busy:.1f}%"
    return f"{device_name(device)} busy training {share} of the session"


def format_delta(exp: Experiment) -> str:
    if exp.val_bpb is None or exp.best_before is None:
        return ""
    return f"Δ {exp.val_bpb - exp.best_before:+.6f}"


def result_line(exp: Experiment) -> str:
    """One plain line for a finished experiment (also used by `status`)."""
    bpb = f"val_bpb {exp.val_bpb:.6f}" if exp.val_bpb is not None else "val_bpb    —    "
    extra = (
        exp.crash_class or exp.extra.get("reason", "")
        if exp.status in FAILED
        else format_delta(exp)
    )
    line = f"exp {exp.id:04d} {exp.status:<11} {bpb}  {extra:<18} {exp.description}"
    return _clean(line + _noise_note(exp))


def _noise_note(exp: Experiment) -> str:
    """Why a lower val_bpb was still discarded: its gain did not clear the noise bar."""
    if exp.status == "discard" and exp.extra.get("reason"):  # e.g. a stale base, no merge
        return f"  [{' '.join(str(exp.extra['reason']).split())}]"
    d = decision_of(exp)
    if exp.status != Status.discard or d.gain is None or d.gain <= 0 or d.bar is None:
        return ""
    runs = max(d.runs, 1)
    return f"  [within noise: gain {d.gain:.6f} <= bar {d.bar:.6f} after {plural(runs, 'run')}]"


def _clean(value: object) -> str:
    """One printable line: an LLM's text may hold newlines or escape sequences."""
    text = "" if value is None else str(value)
    return "".join(ch if ch.isprintable() else " " for ch in text)


def _finite(x: float | None) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def _count(n: float) -> str:
    if n < 1000:
        return f"{n:.0f}"
    if n < 1_000_000:
        return f"{n / 1000:.1f}k"
    return f"{n / 1_000_000:.2f}M"


def _either(parts: list[str]) -> str:
    """'a', 'a or b', 'a, b or c'."""
    return " or ".join(filter(None, [", ".join(parts[:-1]), parts[-1]]))


def _hours(h: float) -> str:
    return f"{h:g}h"


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
            baseline=exps[0] if exps else None,
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
            subtitle = Text(f"session {_duration(now - started)}{hint}", style="dim")
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
        elapsed = _duration(now - run.started)
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
        pct = step.pct if step is not None and _finite(step.pct) else 0.0
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
        pct = f"{step.pct:5.1f}%" if step is not None and _finite(step.pct) else "start"
        return Text.assemble(
            (f"slot {_clean(name)}  ", "bold"),
            (f"exp {run.exp_id:04d}  ", "bold"),
            (f"{pct}  {_duration(now - run.started)}  ", PHASE_STYLE.get(run.phase, "")),
            run.description,
            no_wrap=True,
            overflow="ellipsis",
        )

    def _step_stats(self, run: Run, step: Step | None, elapsed: str) -> Text:
        if step is None:
            budget = f" (TIME_BUDGET {run.budget:g}s)" if _finite(run.budget) else ""
            return Text(f"starting: imports, data, compile… {elapsed}{budget}", style="dim")
        done = (_finite(step.remaining_s) and step.remaining_s <= 0) or (
            _finite(step.pct) and step.pct >= 100
        )
        if done:
            left = "evaluating val_bpb…"
        else:
            left = f"{_duration(step.remaining_s)} left" if _finite(step.remaining_s) else "— left"
        fields = [
            f"loss {step.loss:.4f}" if _finite(step.loss) else "loss —",
            f"{step.tok_per_sec:,.0f} tok/s" if _finite(step.tok_per_sec) else "— tok/s",
            *([f"MFU {step.mfu:.1f}%" if _finite(step.mfu) else "MFU —"] if self.gpu else []),
            left,
            f"{elapsed} elapsed",
        ]
        return Text(" · ".join(fields), no_wrap=True, overflow="ellipsis")

    @staticmethod
    def _best(record: Record) -> Text:
        best, base = record.best, record.baseline
        if best is None or not _finite(best.val_bpb):
            return Text("best val_bpb —  (no experiment kept yet)", style="dim")
        line = Text.assemble(
            "best val_bpb ", (f"{best.val_bpb:.6f}", "bold green"), f"  exp {best.id:04d}"
        )
        if base is not None and _finite(base.val_bpb) and base is not best:
            delta = best.val_bpb - base.val_bpb
            pct = f" ({100 * delta / base.val_bpb:+.2f}%)" if base.val_bpb else ""
            line.append(f"  Δ {delta:+.6f}{pct}", style="green" if delta < 0 else "")
            line.append(f" from baseline {base.val_bpb:.6f}")
        if base is best:
            line.append("  (the baseline)", style="dim")
        else:
            line.append(f"  {_clean(best.description)}", style="dim")
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
                delta = _clean(e.crash_class or "")
            elif _finite(e.val_bpb) and _finite(e.best_before):
                delta = f"{e.val_bpb - e.best_before:+.6f}"
            else:
                delta = "baseline" if e is record.baseline else ""
            description = Text(_clean(e.description))
            reason = e.extra.get("reason")
            if reason:
                description.append(f" — {_clean(reason)}", style="dim")
            table.add_row(  # Text cells: a str cell would be parsed as markup
                Text(f"{e.id:04d}"),
                Text(_clean(e.status)),
                Text(f"{e.val_bpb:.6f}" if _finite(e.val_bpb) else "—"),
                Text(delta),
                Text(_duration(e.train_seconds) if _finite(e.train_seconds) else ""),
                description,
                style=STATUS_STYLE.get(e.status, ""),
            )
        return table

    @staticmethod
    def _counts(record: Record) -> Text:
        line = Text(f"{plural(len(record.experiments), 'experiment')}: ")
        ordered = sorted(record.counts.items(), key=lambda kv: _STATUS_ORDER.get(kv[0], 99))
        for i, (status, count) in enumerate(ordered):
            line.append(", " if i else "")
            line.append(f"{count} {_clean(status)}", style=STATUS_STYLE.get(status, ""))
        if not record.counts:
            line.append("none")
        line.no_wrap, line.overflow = True, "ellipsis"
        return line

    def _usage(self, record: Record) -> Text:
        """Busy (as `status` says it: `busy_percent`), agent tokens and their cost."""
        return Text(
            busy_line(record.experiments, self.device)
            + f" · agent tokens {_count(record.tokens_in)} in / {_count(record.tokens_out)} out"
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
            parts.append(f"{_hours(b.max_hours)} ({_duration(left_s)} left)")
        if b.max_cost is not None:
            parts.append(
                f"${b.max_cost:.2f} of agent cost (${max(0.0, b.max_cost - record.cost_usd):.2f} left)"
            )
        if not parts:
            return Text(
                "ends when the agent stops or on Ctrl-C (no --max-experiments/hours/cost)",
                style="dim",
            )
        return Text("ends after " + _either(parts), style="bold", no_wrap=True, overflow="ellipsis")


def plain_limits(budgets: Budgets, recorded: int) -> str:
    """The budgets as one plain line (the plain mode's session header)."""
    parts = []
    if budgets.max_experiments is not None:
        parts.append(f"{plural(budgets.max_experiments, 'experiment')} ({recorded} recorded)")
    if budgets.max_hours is not None:
        parts.append(_hours(budgets.max_hours))
    if budgets.max_cost is not None:
        parts.append(f"${budgets.max_cost:.2f} of agent cost")
    ends = (
        "ends after " + _either(parts)
        if parts
        else "no limit: ends when the agent stops or on Ctrl-C"
    )
    per_run = (
        f"TIME_BUDGET {budgets.time_budget:g}s per run; " if _finite(budgets.time_budget) else ""
    )
    return f"session: {per_run}{ends}"


# --------------------------------------------------------------------------- the display


class Display:
    """The hooks the loop calls; see the module docstring for the three modes."""

    def __init__(
        self,
        console: Console | None = None,
        *,
        quiet: bool = False,
        live: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        auto_refresh: bool = True,
        device: str | None = None,
    ) -> None:
        self.console = console or Console(stderr=False)
        self.quiet = quiet
        self.live = (self.console.is_interactive if live is None else live) and not quiet
        self.dashboard = Dashboard(clock)
        self.dashboard.device = device
        self._clock = clock
        self._auto_refresh = auto_refresh
        self._live: Live | None = None
        self._next_pct: dict[str | None, float] = {}  # per slot: the next plain step line

    # -- lifecycle

    def session_start(
        self, opts: SessionOptions, experiments: Iterable[Experiment], *, agent: str = ""
    ) -> None:
        """The session's budgets and what is recorded already (a resumed session)."""
        dash = self.dashboard
        dash.budgets = Budgets(
            max_experiments=opts.max_experiments,
            max_hours=opts.max_hours,
            max_cost=opts.max_cost,
            time_budget=opts.time_budget,
        )
        dash.record = Record.of(experiments)
        dash.device = opts.device
        dash.title = f"autoresearch · {_clean(opts.tag)}" + (
            f" · {_clean(agent)} agent" if agent else ""
        )
        dash.started = self._clock()
        if self.live:
            self._start_live()
        elif not self.quiet:
            self._print(Text(plain_limits(dash.budgets, len(dash.record.experiments))))

    def close(self) -> None:
        """Stop the live dashboard, leaving its last frame; safe to call again."""
        live, self._live = self._live, None
        if live is not None:
            self.dashboard.closed = True
            live.stop()

    def _start_live(self) -> None:
        if self._live is None:
            self._live = Live(
                self.dashboard,
                console=self.console,
                auto_refresh=self._auto_refresh,
                refresh_per_second=REFRESH_PER_SECOND,
                transient=self.dashboard.started is None,  # `train` keeps only its result line
            )
            self._live.start(refresh=True)

    # -- hooks

    def note(self, message: str) -> None:
        if self.quiet:
            return
        if self._live is not None:
            # Never print while live: this may run inside the Ctrl-C handler, mid-frame.
            self.dashboard.notes = (*self.dashboard.notes[-(NOTES - 1) :], _clean(message))
            return
        self._print(Text.assemble(("·", "cyan"), " ", _clean(message)))

    def proposing(self, exp_id: int, agent: str, fix_of: int | None = None) -> None:
        self._set_run(
            Run(
                exp_id,
                "repairing" if fix_of else "proposing",
                self._clock(),
                agent=agent,
                fix_of=fix_of,
            )
        )
        if self._live is None:
            what = f"repairing experiment {fix_of:04d}" if fix_of else "proposing"
            self.note(f"exp {exp_id:04d}: {agent} agent {what}…")

    def training(
        self, exp_id: int, description: str, budget: float, slot: str | None = None
    ) -> None:
        """A run starts; `slot`: which one, in a session of several (the dashboard shows a
        line per slot)."""
        run = Run(exp_id, "training", self._clock(), description=_clean(description), budget=budget)
        self._next_pct[slot] = 0.0
        dash = self.dashboard
        if slot is None:
            self._set_run(run)
        else:
            dash.slots = {**dash.slots, slot: run}
            if dash.run is not None and dash.run.exp_id == exp_id:  # proposed, now training
                self._set_run(None)
        if self.quiet:
            return
        if self.live:
            self._start_live()
            return
        on = "" if slot is None else f" on slot {_clean(slot)}"
        self._print(Text(f"exp {exp_id:04d} training{on}: {_clean(description)}"))

    def step(self, step: Step, slot: str | None = None) -> None:
        dash = self.dashboard
        if slot is None:
            run = dash.run
            if run is not None:
                dash.run = replace(run, step=step)
        elif slot in dash.slots:
            dash.slots = {**dash.slots, slot: replace(dash.slots[slot], step=step)}
        if self.quiet or self.live or not (step.pct >= self._next_pct.get(slot, 0.0)):
            return
        self._next_pct[slot] = step.pct + PLAIN_STEP_EVERY_PCT
        mfu = f"mfu {step.mfu:.1f}% | " if self.dashboard.gpu else ""
        stats = (
            f"loss {step.loss:.4f} | {step.tok_per_sec:,.0f} tok/s | {mfu}"
            f"{step.remaining_s:.0f}s left"
        )
        on = "" if slot is None else f"[slot {_clean(slot)}] "
        self._print(Text(f"  {on}step {step.step:05d} ({step.pct:.1f}%) | {stats}"))

    def result(self, exp: Experiment) -> None:
        dash = self.dashboard
        if not dash.slots or (dash.run is not None and dash.run.exp_id == exp.id):
            self._set_run(None)
        dash.slots = {k: r for k, r in dash.slots.items() if r.exp_id != exp.id}
        dash.record = Record.of((*dash.record.experiments, exp))
        if self._live is not None and dash.started is not None:
            return  # the dashboard's table shows it
        self.close()
        self._print(Text(result_line(exp), style=STATUS_STYLE.get(exp.status, "")))

    def session_end(self, reason: str, exps: list[Experiment], best: Experiment | None) -> None:
        self.close()
        counts: dict[str, int] = {}
        for e in exps:
            counts[e.status] = counts.get(e.status, 0) + 1
        summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        baseline = exps[0].val_bpb if exps and exps[0].val_bpb is not None else None
        line = (
            f"session ended: {_clean(reason).rstrip(' .')}. "
            f"{plural(len(exps), 'experiment')} ({summary or 'none'})"
        )
        if best is not None and best.val_bpb is not None and baseline is not None:
            line += f"; val_bpb {baseline:.6f} → {best.val_bpb:.6f} (exp {best.id:04d})"
        self._print(Text(line))

    def _set_run(self, run: Run | None) -> None:
        self.dashboard.run = run

    def _print(self, text: Text) -> None:
        # soft_wrap: a log line stays one line however narrow the console thinks it is.
        self.console.print(text, highlight=False, soft_wrap=True)
