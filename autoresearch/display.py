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
The dashboard itself is dashboard.py, the one-line texts formatting.py; their names that
other modules import from here are re-exported.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import replace

from rich.console import Console
from rich.live import Live
from rich.text import Text

from .dashboard import Budgets, Dashboard, Record, Run, plain_limits
from .formatting import (
    STATUS_STYLE,
    busy_line,
    busy_percent,
    device_name,
    format_delta,
    plural,
    printable,
    result_line,
)
from .ledger import Experiment, baseline_of
from .options import SessionOptions
from .runner import Step

__all__ = [
    "STATUS_STYLE",
    "Budgets",
    "Dashboard",
    "Display",
    "Record",
    "Run",
    "busy_line",
    "busy_percent",
    "device_name",
    "format_delta",
    "plain_limits",
    "plural",
    "result_line",
]

REFRESH_PER_SECOND = 4  # dashboard redraws; a step line only updates state
NOTES = 3  # latest notes shown inside the dashboard
PLAIN_STEP_EVERY_PCT = 10.0  # plain mode prints one step line per this much of the budget


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
        dash.title = f"autoresearch · {printable(opts.tag)}" + (
            f" · {printable(agent)} agent" if agent else ""
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
            self.dashboard.notes = (*self.dashboard.notes[-(NOTES - 1) :], printable(message))
            return
        self._print(Text.assemble(("·", "cyan"), " ", printable(message)))

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
        run = Run(
            exp_id, "training", self._clock(), description=printable(description), budget=budget
        )
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
        on = "" if slot is None else f" on slot {printable(slot)}"
        self._print(Text(f"exp {exp_id:04d} training{on}: {printable(description)}"))

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
        on = "" if slot is None else f"[slot {printable(slot)}] "
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
        first = baseline_of(exps)
        baseline = first.val_bpb if first is not None else None
        line = (
            f"session ended: {printable(reason).rstrip(' .')}. "
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
