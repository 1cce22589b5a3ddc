"""What the read-only commands print: `config`, `status`, `log`, `show` and `report`.

They read a workspace's settings and record (runs/<tag>/) and write only to stdout, except
`report`, which writes its two files into the session's folder. They start nothing and change
no git state; a missing workspace or session raises WorkspaceError, a missing experiment
UsageError.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .config import resolve
from .errors import UsageError, WorkspaceError
from .formatting import (
    STATUS_STYLE,
    busy_line,
    busy_percent,
    device_name,
    format_delta,
    plural,
    result_line,
)
from .ledger import Experiment, Ledger, decision_of, measured_runs
from .status import Status
from .workspace import RUNS_DIR, find_workspace, stale_prepare

# Text from the record, shown literally; a line stays one line when piped (a table still fits)
out = Console(markup=False, highlight=False, soft_wrap=True)


# ------------------------------------------------------------------ settings and report


def show_config(*, workspace: Path | None) -> None:
    root = find_workspace(workspace)
    settings = resolve({}, root, os.environ)
    table = Table(title=Text(f"settings for {root}"), title_justify="left")
    for col in ("setting", "value", "from"):
        table.add_column(col)
    for key, value, source in settings.rows():
        # Text cells: a value or a source such as "pyproject.toml [tool.autoresearch]"
        # would otherwise be read as rich markup and lose its brackets.
        table.add_row(Text(key), Text("—" if value is None else str(value)), Text(source))
    out.print(table)
    out.print(
        f"agent in use: {settings.agent_name}. Precedence: flag > environment > "
        "pyproject.toml [tool.autoresearch] > default.",
        highlight=False,
        markup=False,
    )


def report(*, workspace: Path | None, tag: str | None) -> None:
    from .report import write_report

    root = find_workspace(workspace)
    ledger = session_ledger(root, tag)
    png, html = write_report(root, ledger.run_dir.name)
    out.print(f"wrote {png}\nwrote {html}", highlight=False, markup=False)


# ------------------------------------------------------------------ reading the record


def session_ledger(root: Path, tag: str | None) -> Ledger:
    """The ledger of `tag`, or of the most recently started session."""
    runs = root / RUNS_DIR
    if tag is None:
        candidates = (
            sorted((p for p in runs.glob("*/experiments.jsonl")), key=lambda p: p.stat().st_mtime)
            if runs.is_dir()
            else []
        )
        if not candidates:
            raise WorkspaceError(f"no sessions in {runs}: start one with `autoresearch run`")
        return Ledger(candidates[-1].parent)
    ledger = Ledger(runs / tag)
    if not (runs / tag / "experiments.jsonl").is_file():
        known = (
            sorted(p.parent.name for p in runs.glob("*/experiments.jsonl")) if runs.is_dir() else []
        )
        raise WorkspaceError(
            f"no session {tag!r} in {runs}" + (f" (sessions: {', '.join(known)})" if known else "")
        )
    return ledger


def _counts(exps: list[Experiment]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for e in exps:
        counts[e.status] = counts.get(e.status, 0) + 1
    return counts


def status(*, workspace: Path | None, tag: str | None, as_json: bool) -> None:
    root = find_workspace(workspace)
    ledger = session_ledger(root, tag)
    exps = ledger.experiments()
    best = ledger.best()
    baseline = ledger.baseline()
    session = ledger.read_session() or {}
    busy = busy_percent(exps)
    device = session.get("device") or session.get("preset")
    state = session_state(session)
    if as_json:
        payload = {
            "tag": ledger.run_dir.name,
            "branch": session.get("branch"),
            "state": state,
            "end_reason": session.get("end_reason"),
            "baseline_bpb": baseline.val_bpb if baseline else None,
            "best": {
                "id": best.id,
                "val_bpb": best.val_bpb,
                "commit": best.commit,
                "description": best.description,
            }
            if best
            else None,
            "counts": _counts(exps),
            "in_flight": in_flight(ledger.read_state()) if state == "running" else [],
            "busy": {"device": device_name(device), "percent": busy},
            # the same number under its older name, for GPU sessions only
            "gpu_busy_percent": busy if device_name(device) == "GPU" else None,
            "experiments": [
                {
                    "id": e.id,
                    "status": e.status,
                    "val_bpb": e.val_bpb,
                    "commit": e.commit,
                    "description": e.description,
                    "crash_class": e.crash_class,
                    "memory_gb": e.memory_gb,
                    "train_seconds": e.train_seconds,
                    "agent": e.agent,
                }
                for e in exps
            ],
        }
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        return
    table = Table(title=f"session {ledger.run_dir.name}", title_justify="left")
    for col in ("exp", "commit", "val_bpb", "Δ", "status", "description"):
        table.add_column(col, no_wrap=col != "description")
    for e in exps:
        table.add_row(
            f"{e.id:04d}",
            (e.commit or "")[:7],
            f"{e.val_bpb:.6f}" if e.val_bpb is not None else "—",
            format_delta(e),
            Text(e.status, style=STATUS_STYLE.get(e.status, ""))
            + Text(f" ({e.crash_class})" if e.crash_class else ""),
            e.description,
        )
    out.print(table)
    counts = ", ".join(f"{n} {s}" for s, n in sorted(_counts(exps).items()))
    out.print(f"{plural(len(exps), 'experiment')}: {counts or 'none'}")
    if best and baseline and best.val_bpb is not None and baseline.val_bpb is not None:
        out.print(
            f"best: exp {best.id:04d} val_bpb {best.val_bpb:.6f} "
            f"(baseline {baseline.val_bpb:.6f}, Δ {best.val_bpb - baseline.val_bpb:+.6f}) "
            f"{best.description}"
        )
    out.print(busy_line(exps, device))
    out.print(_state_line(state, session, ledger.run_dir.name))
    if state == "running":
        for line in in_flight_lines(ledger.read_state()):
            out.print(line, highlight=False, markup=False)
    if stale := stale_prepare(root, session_running=state == "running"):
        out.print(stale, markup=False, highlight=False)


def in_flight(state: dict | None) -> list[dict]:
    """What a running session has in flight, one entry per slot (state.json)."""
    if not state:
        return []
    if "slots" in state:
        return [{"slot": name, **entry} for name, entry in sorted(state["slots"].items())]
    return [{"slot": "0", **state}] if state.get("id") is not None else []


def in_flight_lines(state: dict | None) -> list[str]:
    """`slot 1: exp 0003 training for 2m05s: WIDTH to 128`, one line per slot."""
    lines = []
    for e in in_flight(state):
        since = e.get("since")
        took = ""
        if since:
            seconds = (datetime.now(timezone.utc) - datetime.fromisoformat(since)).total_seconds()
            took = f" for {int(seconds // 60)}m{int(seconds % 60):02d}s"
        what = f": {e['description']}" if e.get("description") else ""
        card = f" (card {e['card']})" if e.get("card") else ""
        lines.append(f"slot {e['slot']}{card}: exp {e['id']:04d} {e.get('phase', '?')}{took}{what}")
    return lines


def session_state(session: dict) -> str:
    """`ended` (session.json says why), `running` (its process is alive) or `killed`
    (neither: it died without a word, kill -9 or power loss)."""
    if session.get("end_reason"):
        return "ended"
    pid = session.get("pid")
    if isinstance(pid, int) and pid > 0:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return "killed"
        except PermissionError:
            return "running"  # alive, another user's
        return "running"
    return "killed"


def _state_line(state: str, session: dict, tag: str) -> str:
    if state == "ended":
        return f"ended: {session['end_reason']}"
    if state == "running":
        return f"running (pid {session['pid']})"
    return (
        "not running, and no end was recorded: the session was killed; continue it with "
        f"`autoresearch run --resume --tag {tag}`"
    )


def log(*, workspace: Path | None, tag: str | None) -> None:
    root = find_workspace(workspace)
    exps = session_ledger(root, tag).experiments()
    keeps = [e for e in exps if e.status == Status.keep]
    if not keeps:
        out.print("no experiments kept yet")
        return
    for e in keeps:
        if e.best_before is None:
            out.print(f"exp {e.id:04d} {(e.commit or '')[:7]} baseline val_bpb {e.val_bpb:.6f}")
            continue
        out.print(
            f"exp {e.id:04d} {(e.commit or '')[:7]} val_bpb {e.best_before:.6f} → {e.val_bpb:.6f} "
            f"({e.val_bpb - e.best_before:+.6f})  {e.description}"
        )


def run_log_name(run: int) -> str:
    """The log file of a commit's run number `run` (1-based) in its experiment's folder,
    as the loop names them: run.log, run-2.log, …"""
    return "run.log" if run <= 1 else f"run-{run}.log"


def show(*, workspace: Path | None, tag: str | None, exp_id: int) -> None:
    """One experiment, every number labelled with the run it comes from."""
    root = find_workspace(workspace)
    ledger = session_ledger(root, tag)
    exp = ledger.get(exp_id)
    if exp is None:
        raise UsageError(
            f"no experiment {exp_id} in session {ledger.run_dir.name} (see `autoresearch status`)"
        )
    runs = [r for r in measured_runs(ledger.run_dir, exp) if r.get("purpose") != "remeasure"]
    judged = len((exp.extra or {}).get("runs") or []) or len(runs)
    out.print(result_line(exp))
    out.print(f"why: {decision_of(exp).reason}")
    if exp.val_bpb is not None and judged > 1:
        out.print(f"val_bpb {exp.val_bpb:.6f} is the mean of runs 1–{judged}")
    out.print(f"commit {exp.commit or '—'}  parent {exp.parent[:12]}  ref {exp.attempt_ref or '—'}")
    if exp.agent:
        # Fields the agent did not use (None) say nothing: left out.
        shown = ", ".join(f"{k} {v}" for k, v in exp.agent.items() if v is not None)
        out.print(f"agent {shown}")
    if exp.extra.get("reason"):
        out.print(f"reason: {exp.extra['reason']}")
    exp_dir = ledger.run_dir / f"{exp_id:04d}"
    if runs:
        out.rule("runs")
        for number, r in enumerate(runs, start=1):
            paired = r.get("partner_val_bpb")
            against = f"  · the best, same seed: {paired:.6f}" if paired is not None else ""
            out.print(
                f"run {number}  seed {r.get('seed', '—')}  val_bpb {r['val_bpb']:.6f}  "
                f"({r.get('purpose', '')}; log {run_log_name(number)}){against}"
            )
    patch = exp_dir / "patch.diff"
    if patch.is_file():
        out.rule("diff")
        out.print(patch.read_text(encoding="utf-8"))
    # The record keeps the summary of the last run only (a crashed repeat included): the
    # last log on disk is that run's.
    last = max(judged, 1)
    while (exp_dir / run_log_name(last + 1)).is_file():
        last += 1
    if exp.metrics:
        out.rule(f"metrics: train.py's summary of the last run, run {last}")
        for key, value in exp.metrics.items():
            out.print(f"{key + ':':<18}{value}")
    run_log = exp_dir / run_log_name(last)
    if run_log.is_file():
        out.rule(f"log tail: {run_log.name}")
        lines = run_log.read_text(encoding="utf-8", errors="replace").splitlines()
        out.print("\n".join(lines[-30:]))
