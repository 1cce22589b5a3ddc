"""display: the live dashboard rendered frame by frame on a fake clock, the plain and quiet
line modes, text from the agent shown literally, and the live display closed by a real
Session on the way out (normal end and Ctrl-C)."""

from __future__ import annotations

import io
import math
import re
import sys
from pathlib import Path

import pytest
from loopkit import fake_prepared_cache, make_workspace
from rich.color import ColorSystem
from rich.console import Console
from rich.file_proxy import FileProxy
from rich.style import Style

from autoresearch.display import STATUS_STYLE, Display, format_delta, result_line
from autoresearch.ledger import Experiment
from autoresearch.loop import Session, SessionInterrupted
from autoresearch.options import SessionOptions
from autoresearch.trainlog import Step

NAN = math.nan
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def opts(**budgets: object) -> SessionOptions:
    # unsealed, one calibration run: the stub prints val_bpb and saves no checkpoint
    base = {"tag": "demo", "preset": "cpu", "device": "cpu", "time_budget": 300.0}
    unsealed = {"sealed": False, "calibrate": 1, "max_repeats": 3}
    return SessionOptions(**{**base, **unsealed, **budgets})


def exp(
    id: int,
    status: str,
    val_bpb: float | None = None,
    best_before: float | None = None,
    description: str = "an idea",
    *,
    tokens: tuple[int, int] = (0, 0),
    cost: float | None = 0.0,
    **fields: object,
) -> Experiment:
    return Experiment(
        id=id,
        status=status,
        description=description,
        commit="c" * 40,
        parent="p" * 40,
        val_bpb=val_bpb,
        memory_gb=1.0,
        best_before=best_before,
        threshold=0.0,
        train_seconds=fields.pop("train_seconds", 60.0),
        agent={"tokens_in": tokens[0], "tokens_out": tokens[1]},
        extra={"cost_usd": cost, **fields.pop("extra", {})},
        **fields,
    )


def step(pct: float, n: int = 100, **kw: float) -> Step:
    values = dict(loss=3.21, dt_ms=812.0, tok_per_sec=20123.0, mfu=41.2, remaining_s=150.0)
    return Step(step=n, pct=pct, **{**values, **kw})


def live_display(clock: Clock) -> Display:
    """A live-mode Display that draws only when told (no refresh thread)."""
    console = Console(file=io.StringIO(), force_terminal=True, width=120, height=50)
    return Display(console, live=True, clock=clock, auto_refresh=False)


def frame(display: Display, height: int = 50) -> str:
    """One frame of the dashboard, as the terminal would show it."""
    console = Console(
        file=io.StringIO(), record=True, width=120, force_terminal=True, height=height
    )
    console.print(display.dashboard)
    return console.export_text()


def frame_line(text: str, needle: str) -> str:
    return next(line for line in text.splitlines() if needle in line)


def plain_display(quiet: bool = False) -> tuple[Display, io.StringIO]:
    buf = io.StringIO()
    return Display(Console(file=buf, width=80), quiet=quiet), buf


@pytest.fixture
def clock() -> Clock:
    return Clock()


# --------------------------------------------------------------------------- the dashboard


def test_dashboard_follows_a_session(clock: Clock) -> None:
    d = live_display(clock)
    d.session_start(
        opts(max_experiments=10, max_hours=2.0, max_cost=1.0, device="cuda"), [], agent="tuner"
    )
    try:
        d.training(1, "baseline", 300.0)
        text = frame(d)
        assert "autoresearch · demo · tuner agent" in text
        assert "starting: imports, data, compile… 0s (TIME_BUDGET 300s)" in text
        assert "no experiment kept yet" in text and "no experiments yet" in text

        clock.advance(60)
        d.step(step(50.0))
        text = frame(d)
        assert re.search(r"exp 0001\s+training\s+baseline", text)
        assert re.search(r"━+.*50\.0%  step 00100", text)
        assert "loss 3.2100 · 20,123 tok/s · MFU 41.2% · 2m 30s left · 1m 00s elapsed" in text
        assert "GPU busy training — of the session" in text  # nothing recorded yet
        assert "ends after 10 experiments (10 left), 2h (1h 59m left) or $1.00" in text

        clock.advance(10)
        d.result(exp(1, "keep", 1.0, description="baseline"))
        d.proposing(2, "tuner")
        clock.advance(30)  # proposing: the GPU idles
        text = frame(d)
        assert re.search(r"exp 0002\s+proposing\s+tuner agent is thinking… 30s", text)
        assert "best val_bpb 1.000000  exp 0001  (the baseline)" in text

        d.training(2, "LR to 0.06", 300.0)
        clock.advance(70)
        d.result(exp(2, "keep", 0.98, 1.0, "LR to 0.06", tokens=(900, 200), cost=0.01))
        d.proposing(3, "tuner")
        d.training(3, "WIDTH to 128", 300.0)
        clock.advance(70)
        d.result(
            exp(
                3,
                "crash",
                None,
                0.98,
                "WIDTH to 128",
                crash_class="oom",
                cost=0.01,
                extra={"gpu_busy_s": 210.0, "session_s": 260.0},
            )
        )
        d.proposing(4, "tuner", fix_of=3)
        clock.advance(20)
        text = frame(d)
    finally:
        d.close()

    assert re.search(r"exp 0004\s+repairing exp 0003", text)
    assert "best val_bpb 0.980000  exp 0002  Δ -0.020000 (-2.00%) from baseline 1.000000" in text
    assert re.search(r"0001\s+keep\s+1\.000000\s+baseline\s+1m 00s\s+baseline", text)
    assert re.search(r"0002\s+keep\s+0\.980000\s+-0\.020000\s+1m 00s\s+LR to 0\.06", text)
    assert re.search(r"0003\s+crash\s+—\s+oom\s+1m 00s\s+WIDTH to 128", text)
    assert "3 experiments: 2 keep, 1 crash" in text
    # As the record says after exp 3: trained 210 s of the 260 s (the loop's counters).
    assert "GPU busy training 80.8% of the session · agent tokens 900 in / 200 out" in text
    assert (
        "ends after 10 experiments (7 left), 2h (1h 55m left) or $1.00 of agent cost ($0.98 left)"
        in text
    )
    assert "session 4m 20s" in text


def test_table_keeps_the_last_ten_coloured_by_status(clock: Clock) -> None:
    d = live_display(clock)
    statuses = ["keep", "discard", "crash", "invalid", "interrupted"]
    history = [exp(1, "keep", 1.0, description="baseline")] + [
        exp(i, statuses[i % 5], 1.0 if statuses[i % 5] in ("keep", "discard") else None, 1.0)
        for i in range(2, 15)
    ]
    d.session_start(opts(), history)
    console = Console(
        file=io.StringIO(),
        record=True,
        width=120,
        force_terminal=True,
        height=50,
        color_system="standard",
    )
    console.print(d.dashboard)
    styled, text = console.export_text(styles=True, clear=False), console.export_text()
    ids = re.findall(r"^│ (\d{4}) ", text, flags=re.M)
    assert ids == [f"{i:04d}" for i in range(5, 15)]
    rows = re.findall(r"^\x1b\[34m│\x1b\[0m (\x1b\[[0-9;]*m)(\d{4})\x1b", styled, flags=re.M)
    assert len(rows) == 10
    for sgr, exp_id in rows:
        style = Style.parse(STATUS_STYLE[statuses[int(exp_id) % 5]])
        assert style.render("x", color_system=ColorSystem.STANDARD).startswith(sgr + "x")
    assert "14 experiments: 3 keep, 2 discard, 3 crash, 3 invalid, 3 interrupted" in text
    assert "ends when the agent stops or on Ctrl-C" in text


def test_short_terminal_shows_fewer_rows(clock: Clock) -> None:
    d = live_display(clock)
    d.session_start(opts(), [exp(i, "discard", 1.0, 1.0) for i in range(1, 15)])
    d.training(15, "x", 300.0)
    text = frame(d, height=22)
    assert len(text.splitlines()) <= 22
    assert re.findall(r"^│ (\d{4}) ", text, flags=re.M) == [f"{i:04d}" for i in range(8, 15)]


def test_resumed_session_counts_what_is_recorded(clock: Clock) -> None:
    d = live_display(clock)
    recorded = [
        exp(1, "keep", 1.0, description="baseline"),
        exp(2, "discard", 1.01, 1.0, tokens=(1500, 2500), cost=0.25),
        exp(3, "invalid", tokens=(1_200_000, 0), cost=None, extra={"reason": "no edit"}),
    ]
    d.session_start(opts(max_experiments=5, max_cost=1.0), recorded, agent="openai")
    text = frame(d)
    assert "waiting for the next experiment" in text
    assert "3 experiments: 1 keep, 1 discard, 1 invalid" in text
    # cpu: named for it; the record holds no busy counters here.
    assert "CPU busy training — of the session · agent tokens 1.20M in / 2.5k out" in text
    assert "cost $0.25 (+1 unpriced)" in text
    assert "ends after 5 experiments (2 left) or $1.00 of agent cost ($0.75 left)" in text
    assert re.search(r"0003\s+invalid\s+—\s+.*an idea — no edit", text)


def test_busy_is_the_record_s_figure_named_for_the_device(clock: Clock) -> None:
    """One definition (display.busy_percent, which `status` prints too), from the last
    experiment's counters; on a CPU it is called CPU busy and MFU is not shown."""
    recorded = [
        exp(1, "keep", 1.0, extra={"gpu_busy_s": 40.0, "session_s": 100.0}),
        exp(2, "discard", 1.1, 1.0, extra={"gpu_busy_s": 80.0, "session_s": 200.0}),
    ]
    for device, name, mfu in (("cpu", "CPU", False), ("cuda", "GPU", True)):
        d = live_display(clock)
        d.session_start(opts(device=device), recorded)
        d.training(3, "an idea", 300.0)
        d.step(step(50.0))
        text = frame(d)
        d.close()
        assert f"{name} busy training 40.0% of the session" in text
        assert ("MFU 41.2%" in text) is mfu
        assert ("GPU" in text) is (device == "cuda")


def test_step_fields_that_are_missing_or_final(clock: Clock) -> None:
    d = live_display(clock)
    d.session_start(opts(device="cuda"), [])
    d.training(1, "baseline", 300.0)
    d.step(Step(step=7, pct=NAN, loss=NAN, dt_ms=NAN, tok_per_sec=NAN, mfu=NAN, remaining_s=NAN))
    text = frame(d)
    assert "0.0%  step 00007" in text
    assert "loss — · — tok/s · MFU — · — left" in text
    d.step(step(100.0, remaining_s=0.0))
    assert "evaluating val_bpb…" in frame(d)
    d.close()


def test_notes_show_inside_the_live_dashboard(clock: Clock) -> None:
    d = live_display(clock)
    d.session_start(opts(), [])
    printed = d.console.file.getvalue()
    for i in range(5):
        d.note(f"note {i}")
    assert d.console.file.getvalue() == printed  # nothing printed while live
    text = frame(d)
    assert "note 1" not in text and all(f"· note {i}" in text for i in (2, 3, 4))
    d.close()
    d.note("after")
    assert "· after" in ANSI.sub("", d.console.file.getvalue())


# --------------------------------------------------------------------------- agent text


@pytest.mark.parametrize(
    "evil",
    [
        "[bold]x[/]",
        "[/]",
        "close [/bold] tag",
        "[red",
        "a\x1b[31mred\x1b[0m\nline\ttab",
        "[link=x]y",
    ],
)
def test_agent_text_is_shown_literally(clock: Clock, evil: str) -> None:
    d = live_display(clock)
    d.session_start(opts(tag="t"), [exp(1, "keep", 1.0, description=evil)], agent=evil)
    d.training(2, evil, 300.0)
    d.note(evil)
    d.result(exp(2, "invalid", description=evil, crash_class=evil, extra={"reason": evil}))
    d.proposing(3, evil)
    console = Console(file=io.StringIO(), record=True, width=120, force_terminal=True, height=50)
    console.print(d.dashboard)
    literal = evil.replace("\x1b", " ").replace("\n", " ").replace("\t", " ")
    # the title, two rows and a reason, the note, the agent thinking
    assert console.export_text().count(literal) >= 5
    assert "\x1b" not in ANSI.sub("", console.export_text(styles=True))
    d.close()
    d.session_end(evil, [], None)
    assert literal in d.console.file.getvalue()

    for quiet in (False, True):
        p, buf = plain_display(quiet)
        p.session_start(opts(), [])
        p.note(evil)
        p.training(1, evil, 300.0)
        p.result(exp(1, "crash", description=evil, crash_class=evil))
        p.session_end(evil, [], None)
        out = buf.getvalue()
        assert literal in out and "\x1b" not in out
    assert literal in result_line(exp(1, "keep", description=evil))


# --------------------------------------------------------------------------- plain and quiet


def _feed(d: Display) -> None:
    d.session_start(
        opts(max_experiments=4, max_hours=1.5), [exp(1, "keep", 1.0, description="baseline")]
    )
    d.proposing(2, "tuner")
    d.training(2, "raise the learning rate " + "and more " * 12, 300.0)
    for i in range(100):
        d.step(step(i + 0.5, n=i))
    d.result(exp(2, "discard", 1.01, 1.0, "raise the learning rate"))
    d.session_end(
        "reached --max-experiments 4", [exp(1, "keep", 1.0), exp(2, "discard", 1.01, 1.0)], None
    )


def test_plain_mode_writes_lines() -> None:
    d, buf = plain_display()
    assert not d.live
    _feed(d)
    lines = buf.getvalue().splitlines()
    assert lines[0] == (
        "session: TIME_BUDGET 300s per run; ends after 4 experiments (1 recorded) or 1.5h"
    )
    assert lines[1] == "· exp 0002: tuner agent proposing…"
    assert lines[2].startswith("exp 0002 training: raise the learning rate and more")
    assert len(lines[2]) > 80  # never wrapped
    steps = [line for line in lines if line.startswith("  step ")]
    assert len(steps) == 10 and steps[0].startswith("  step 00000 (0.5%) | loss 3.2100")
    assert lines[-2].startswith("exp 0002 discard     val_bpb 1.010000  Δ +0.010000")
    assert (
        lines[-1] == "session ended: reached --max-experiments 4. 2 experiments (1 discard, 1 keep)"
    )
    assert len(lines) == 3 + 10 + 2
    assert "\x1b" not in buf.getvalue()


def test_quiet_mode_writes_results_and_the_end() -> None:
    d, buf = plain_display(quiet=True)
    _feed(d)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("exp 0002 discard")
    assert lines[1].startswith("session ended: reached --max-experiments 4.")


def test_quiet_in_a_terminal_is_not_live() -> None:
    console = Console(file=io.StringIO(), force_terminal=True, force_interactive=True)
    assert Display(console).live
    assert not Display(console, quiet=True).live
    assert not Display(Console(file=io.StringIO())).live


def test_helpers_stay_importable_for_status() -> None:
    e = exp(2, "discard", 1.01, 1.0, "x")
    assert format_delta(e) == "Δ +0.010000"
    assert result_line(e).startswith("exp 0002 discard")


# --------------------------------------------------------------------------- live lifecycle


def test_live_without_a_session_is_a_transient_progress(clock: Clock) -> None:
    """`autoresearch train`: progress while it runs, then only the result line."""
    d = live_display(clock)
    d.training(0, "train.py", 300.0)
    assert d._live is not None and isinstance(sys.stdout, FileProxy)
    d.step(step(50.0))
    d.close()
    d.result(exp(0, "keep", 1.0, description="train.py"))
    assert d._live is None and not isinstance(sys.stdout, FileProxy)
    last = ANSI.sub("", d.console.file.getvalue()).rstrip().splitlines()[-1]
    assert last == result_line(exp(0, "keep", 1.0, description="train.py")).rstrip()


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(fake_prepared_cache(tmp_path / "cache")))
    return make_workspace(tmp_path / "ws")


class InterruptedAgent:
    """Ctrl-C twice while the agent thinks: KeyboardInterrupt out of propose."""

    name = "stub"

    def propose(self, ctx: object) -> object:
        raise KeyboardInterrupt

    def fix(self, ctx: object, failed_source: str, crash_tail: str) -> object:
        raise AssertionError("no fix expected")


def _session_display() -> Display:
    console = Console(file=io.StringIO(), force_terminal=True, width=120, height=50)
    return Display(console, live=True)


def test_session_closes_the_dashboard_when_it_ends(workspace: Path) -> None:
    d = _session_display()
    result = Session(workspace, opts(max_experiments=1), InterruptedAgent(), d).run()
    assert result.reason == "reached --max-experiments 1"
    assert d._live is None and not isinstance(sys.stdout, FileProxy)
    out = ANSI.sub("", d.console.file.getvalue())
    last_frame = out[out.rindex("╭") :]
    assert re.search(r"0001\s+keep\s+1\.\d{6}\s+baseline", last_frame)
    assert "session over" in last_frame
    assert (
        out.rstrip()
        .splitlines()[-1]
        .startswith("session ended: reached --max-experiments 1. 1 experiment (1 keep)")
    )


def test_session_closes_the_dashboard_on_ctrl_c(workspace: Path) -> None:
    d = _session_display()
    with pytest.raises(SessionInterrupted):
        Session(workspace, opts(max_experiments=3), InterruptedAgent(), d).run()
    assert d._live is None and not isinstance(sys.stdout, FileProxy)
    out = ANSI.sub("", d.console.file.getvalue())
    last_frame = out[out.rindex("╭") :]  # stays on screen
    assert re.search(r"exp 0002\s+proposing\s+stub agent stopped", last_frame)
    assert "Ctrl-C" not in last_frame
    assert "\x1b[?25h" in d.console.file.getvalue()  # the cursor is shown again


def test_a_lower_but_discarded_result_says_it_was_within_noise() -> None:
    from autoresearch.display import result_line
    from autoresearch.ledger import Experiment

    exp = Experiment(
        id=3,
        status="discard",
        description="FINAL_LR_FRAC 0.0 -> 0.1",
        commit="c" * 40,
        parent="p" * 40,
        val_bpb=2.098,
        memory_gb=0.0,
        best_before=2.137,
        threshold=0.045,
        extra={"runs": [2.09, 2.106]},
    )
    line = result_line(exp)
    assert "Δ -0.039000" in line
    assert "[within noise: gain 0.039000 <= bar 0.045000 after 2 runs]" in line
    worse = Experiment(**{**exp.__dict__, "val_bpb": 2.2})
    assert "within noise" not in result_line(worse)


def test_slots_show_one_line_each_and_leave_when_recorded(clock: Clock) -> None:
    """With several slots (--workers, --gpus) the dashboard shows what each one trains, its
    progress and for how long; a recorded experiment's line goes, the other slot's stays."""
    d = live_display(clock)
    d.session_start(opts(max_experiments=5), [exp(1, "keep", 1.0, description="baseline")])
    try:
        d.proposing(2, "tuner")
        d.training(2, "LR to 0.06", 300.0, slot="0")
        clock.advance(30)
        d.proposing(3, "tuner")
        d.training(3, "WIDTH to 128", 300.0, slot="1")
        clock.advance(15)
        d.step(step(40.0), slot="0")
        text = frame(d)
        assert re.search(r"slot 0\s+exp 0002\s+40\.0%\s+45s\s+LR to 0\.06", text)
        assert re.search(r"slot 1\s+exp 0003\s+start\s+15s\s+WIDTH to 128", text)
        assert "thinking" not in text  # both proposals are training now
        d.result(exp(2, "keep", 0.98, 1.0, "LR to 0.06"))
        d.proposing(4, "tuner")
        text = frame(d)
    finally:
        d.close()
    assert "slot 0" not in text
    assert re.search(r"slot 1\s+exp 0003", text)
    assert re.search(r"exp 0004\s+proposing\s+tuner agent is thinking", text)


def test_plain_lines_name_the_slot() -> None:
    d, buf = plain_display()
    d.training(2, "LR to 0.06", 300.0, slot="1")
    d.step(step(50.0), slot="1")
    lines = buf.getvalue().splitlines()
    assert lines[0] == "exp 0002 training on slot 1: LR to 0.06"
    assert lines[1].startswith("  [slot 1] step 00100 (50.0%) | loss 3.2100")
