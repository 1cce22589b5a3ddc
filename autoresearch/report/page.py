"""report.html: the page, one self-contained string.

It opens offline: the CSS is inline, the plot comes in as PNG bytes and is embedded as a
data: URI, there are no remote references and no scripts, and a Content-Security-Policy
forbids loading anything else. Every text from the record (descriptions written by an LLM,
crash classes, diffs) is HTML-escaped. Needs no git: the diffs are passed in.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from datetime import datetime

from autoresearch.ledger import STATUSES, Experiment, Grounds, decision_of
from autoresearch.status import Status

from .summary import DiffKey, Summary, baseline_of, best_of, in_order, summarize

SHORT_SHA = 8  # characters of a commit shown in tables

CSS = """
:root { --green: #1a7a3a; --red: #d62728; --amber: #b36b00; --grey: #6b6b6b; --line: #e3e3e3; }
* { box-sizing: border-box; }
body { font: 15px/1.45 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: #1d1d1d; margin: 0 auto; padding: 24px 32px 64px; max-width: 1280px; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 19px; margin: 36px 0 10px; }
h3 { font-size: 15px; margin: 22px 0 6px; } .muted { color: var(--grey); }
code, pre, td.num, td.sha { font-family: ui-monospace, "SF Mono", Menlo, Consolas, monospace; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(140px, 1fr)); gap: 10px;
         margin: 16px 0; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 8px 12px; }
.card .k { font-size: 12px; color: var(--grey); text-transform: uppercase; letter-spacing: .04em; }
.card .v { font-size: 18px; font-weight: 600; }
.card .v .muted { font-size: 13px; font-weight: 400; }
img.plot { width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px; }
table { border-collapse: collapse; width: 100%; font-size: 13.5px; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid var(--line);
         vertical-align: top; }
th { background: #f6f6f6; position: sticky; top: 0; }
td.num { text-align: right; white-space: nowrap; } td.sha { white-space: nowrap; }
tr.keep td { background: #f0faf3; }
.status { font-weight: 600; } .s-keep { color: var(--green); } .s-discard { color: var(--grey); }
.s-crash, .s-invalid, .s-rejected { color: var(--red); } .s-interrupted { color: var(--amber); }
.better { color: var(--green); } .worse { color: var(--red); } .noise { color: var(--amber); }
td.reason { min-width: 22em; }
pre.diff { background: #fafafa; border: 1px solid var(--line); border-radius: 6px;
           padding: 8px 0; overflow-x: auto; font-size: 12.5px; line-height: 1.4; }
pre.diff span { display: block; padding: 0 12px; white-space: pre; }
pre.diff .add { background: #e6ffec; color: #116329; }
pre.diff .del { background: #ffebe9; color: #a40e26; }
pre.diff .hunk { background: #ddf4ff; color: #0550ae; }
pre.diff .meta { color: var(--grey); font-weight: 600; }
.change { border-left: 3px solid var(--green); padding-left: 14px; margin: 18px 0; }
"""

# Nothing may load from anywhere: the plot is a data: URI, the CSS is inline, there is no JS.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _bpb(value: float | None) -> str:
    return "—" if value is None else f"{value:.6f}"


def _delta_html(delta: float | None) -> str:
    if delta is None:
        return ""
    cls = "better" if delta < 0 else "worse" if delta > 0 else "muted"
    return f'<span class="{cls}">{delta:+.6f}</span>'


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"


def _clock(iso: str | None) -> str:
    if not iso:
        return "—"
    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).strftime("%Y-%m-%d %H:%M UTC")
    except ValueError:
        return iso


def _card(key: str, value: str) -> str:
    return f'<div class="card"><div class="k">{_e(key)}</div><div class="v">{value}</div></div>'


def _summary_html(s: Summary) -> str:
    counts = ", ".join(f"{s.counts[k]} {k}" for k in STATUSES if s.counts.get(k))
    cost = "—" if s.cost_usd is None else f"${s.cost_usd:,.2f}"
    if s.cost_usd is not None and s.cost_unknown:
        cost += f' <span class="muted">(+{s.cost_unknown} unpriced)</span>'
    delta = "—"
    if s.delta is not None and s.baseline:
        delta = f"{_delta_html(s.delta)} <span class='muted'>({s.delta / s.baseline:+.2%})</span>"
    cards = [
        _card("baseline val_bpb", _bpb(s.baseline)),
        _card(
            "best val_bpb",
            _bpb(s.best)
            + (f" <span class='muted'>#{s.best_id}</span>" if s.best_id is not None else ""),
        ),
        _card("Δ val_bpb", delta),
        _card("experiments", f"{s.experiments}"),
        _card("training time", _duration(s.train_seconds)),
        _card("agent tokens in / out", f"{s.tokens_in:,} / {s.tokens_out:,}"),
        _card("agent cost", cost),
    ]
    return (
        f'<div class="cards">{"".join(cards)}</div>'
        f'<p class="muted">{_e(counts)} · from {_e(_clock(s.started_at))} '
        f"to {_e(_clock(s.ended_at))}</p>"
    )


def _sha(commit: str | None) -> str:
    return _e(commit[:SHORT_SHA]) if commit else "—"


def _num(value: float | None, digits: int = 6) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _run_values(d: Grounds) -> str:
    """The val_bpb of each run on each side, for the runs cell's tooltip."""
    parts = []
    if d.values:
        parts.append("this: " + ", ".join(f"{v:.6f}" for v in d.values))
    if d.incumbent_values:
        parts.append("best: " + ", ".join(f"{v:.6f}" for v in d.incumbent_values))
    return "; ".join(parts)


def _table_html(experiments: Sequence[Experiment]) -> str:
    """One row per experiment: its val_bpb, then the keep rule's numbers as recorded (the
    gain over the best, the bar it had to clear, σ, the runs on each side) and a one-line
    reason; all read through `ledger.decision_of`."""
    rows = []
    for e in experiments:
        d = decision_of(e)
        status = e.status if e.status in STATUSES else Status.invalid
        fix = f' <span class="muted">(fix of #{int(e.fix_of)})</span>' if e.fix_of else ""
        # A lower val_bpb that was discarded is not a win: amber, not green.
        delta = None if d.gain is None else -d.gain
        delta_html = _delta_html(delta)
        if e.status != Status.keep and delta is not None and delta < 0:
            delta_html = f'<span class="noise">{delta:+.6f}</span>'
        runs = "—" if not d.runs else f"{d.runs}"
        if d.runs and d.incumbent_runs:
            runs += f" / {d.incumbent_runs}"
        rows.append(
            f'<tr id="exp-{int(e.id)}" class="{status}">'
            f'<td class="num">{int(e.id)}</td>'
            f'<td class="sha">{_sha(e.commit)}</td>'
            f'<td class="num">{_bpb(e.val_bpb)}</td>'
            f'<td class="num">{delta_html}</td>'
            f'<td><span class="status s-{status}">{_e(e.status)}</span></td>'
            f"<td>{_e(e.description)}{fix}</td>"
            f'<td class="num">{_num(d.gain)}</td>'
            f'<td class="num">{_num(d.bar)}</td>'
            f'<td class="num">{_num(d.sigma)}</td>'
            f'<td class="num" title="{_e(_run_values(d))}">{runs}</td>'
            f'<td class="num">{f"{e.memory_gb:.1f}" if e.memory_gb else ""}</td>'
            f'<td class="reason">{_e(d.reason)}</td></tr>'
        )
    head = (
        "<tr><th>#</th><th>commit</th><th>val_bpb</th><th>Δ vs best</th><th>status</th>"
        "<th>description</th><th>gain</th><th>bar</th><th>σ</th>"
        '<th title="runs of the candidate / of the best it was judged against">runs</th>'
        "<th>mem GB</th><th>why</th></tr>"
    )
    note = (
        "<p class=\"muted\">val_bpb is the mean of the experiment's runs. gain: the best's "
        "mean minus this one's; a change is kept when its gain clears the bar, which "
        "grows with σ (the run-to-run noise of val_bpb) and shrinks with more runs on each "
        "side. Numbers as the keep rule recorded them.</p>"
    )
    return f"{note}<table><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>"


def _diff_line_class(line: str) -> str:
    if line.startswith(("diff ", "index ", "--- ", "+++ ", "new file", "deleted file")):
        return "meta"
    if line.startswith("@@"):
        return "hunk"
    if line.startswith("+"):
        return "add"
    if line.startswith("-"):
        return "del"
    return "ctx"


def _diff_html(diff: str | None, pair: DiffKey) -> str:
    if diff is None:
        return (
            f'<p class="muted">diff not available: git has no {_sha(pair[0])}..{_sha(pair[1])} '
            "in this workspace.</p>"
        )
    if not diff.strip():
        return '<p class="muted">no change to train.py.</p>'
    lines = "".join(
        f'<span class="{_diff_line_class(line)}">{_e(line) or " "}</span>'
        for line in diff.rstrip("\n").split("\n")
    )
    return f'<pre class="diff">{lines}</pre>'


def _changes_html(experiments: Sequence[Experiment], diffs: Mapping[DiffKey, str]) -> str:
    base = baseline_of(experiments)
    parts = []
    for e in experiments:
        if e.status != Status.keep or (base is not None and e.id == base.id):
            continue
        delta = None
        if e.val_bpb is not None and e.best_before is not None:
            delta = e.val_bpb - e.best_before
        pair = (e.parent or "", e.commit or "")
        parts.append(
            f'<div class="change"><h3><a href="#exp-{int(e.id)}">#{int(e.id)}</a> · '
            f"{_sha(e.commit)} · val_bpb {_bpb(e.val_bpb)} {_delta_html(delta)}</h3>"
            f"<p>{_e(e.description)}</p>{_diff_html(diffs.get(pair), pair)}</div>"
        )
    return "".join(parts) or '<p class="muted">No change beat the baseline.</p>'


def _g(value: object) -> str:
    """A number as a person writes it (2, not 2.0); anything else escaped as text."""
    return f"{value:g}" if isinstance(value, (int, float)) else _e(value)


def _horizon_html(record: Mapping | None) -> str:
    """`autoresearch confirm --horizon K`'s answer (runs/<tag>/confirm-horizon.json): whether
    the session's gain holds at K x TIME_BUDGET, the mean paired gains and every run."""
    if record is None:
        return ""
    holds = record.get("holds")
    answer = (
        '<span class="better">the gain holds</span>: the best is lower on val and on test'
        if holds is True
        else '<span class="worse">the gain does not hold</span>: the best is not lower on val, or on test'
        if holds is False
        else '<span class="muted">no answer: a run failed</span>'
    )
    seeds = ", ".join(_e(s) for s in record.get("seeds") or [])
    rows = "".join(
        f"<tr><td>{_e(r.get('role'))}</td><td>#{_e(r.get('id'))}</td><td>{_e(r.get('seed'))}</td>"
        f"<td>{_e(r.get('status'))}</td><td>{_num(r.get('val_bpb'))}</td>"
        f"<td>{_num(r.get('test_bpb'))}</td><td>{_e(r.get('num_steps'))}</td>"
        f"<td class='reason'>{_e(r.get('reason'))}</td></tr>"
        for r in record.get("runs") or []
    )
    gains = " · ".join(
        f"{label} {_num(record.get(key))}"
        for label, key in (
            ("session gain", "session_gain"),
            ("val gain", "val_gain"),
            ("test gain", "test_gain"),
        )
    )
    return (
        f"<h2>At {_g(record.get('horizon'))} × TIME_BUDGET</h2>"
        f"<p><code>autoresearch confirm --horizon {_g(record.get('horizon'))}</code>: "
        f"{answer}.</p>"
        f"<p class='muted'>{_g(record.get('time_budget'))} s of training per run, seeds "
        f"{seeds}, paired (baseline − best, mean over seeds): {gains} · "
        f"{_e(_clock(record.get('at')))}</p>"
        "<table><tr><th>version</th><th>exp</th><th>seed</th><th>status</th><th>val_bpb</th>"
        f"<th>test_bpb</th><th>steps</th><th>reason</th></tr>{rows}</table>"
    )


def render_html(
    experiments: Sequence[Experiment],
    tag: str,
    png: bytes,
    diffs: Mapping[DiffKey, str],
    horizon: Mapping | None = None,
) -> str:
    """The whole report page as one string: no remote resources, no scripts, all text escaped.

    `diffs` maps (from commit, to commit) to `git diff` text of train.py, for the pairs that
    `diff_pairs` names; a missing pair is shown as "diff not available". `horizon` is
    `confirm --horizon`'s record, shown when given.
    """
    ordered = in_order(experiments)
    summary = summarize(ordered)
    base, best = baseline_of(ordered), best_of(ordered)
    if base and best and base.commit and best.commit and base.id != best.id:
        pair = (base.commit, best.commit)
        total = (
            f"<p class='muted'>{_sha(base.commit)} (#{base.id}) → {_sha(best.commit)} "
            f"(#{best.id})</p>{_diff_html(diffs.get(pair), pair)}"
        )
    else:
        total = '<p class="muted">The baseline is still the best: train.py is unchanged.</p>'
    image = base64.b64encode(png).decode("ascii")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>autoresearch report · {_e(tag)}</title>
<style>{CSS}</style>
</head>
<body>
<h1>autoresearch · {_e(tag)}</h1>
<p class="muted">val_bpb on the validation split, lower is better.</p>
{_summary_html(summary)}
{_horizon_html(horizon)}
<img class="plot" alt="val_bpb per experiment" src="data:image/png;base64,{image}">
<h2>Experiments</h2>
{_table_html(ordered)}
<h2>train.py, baseline → best</h2>
{total}
<h2>Kept changes</h2>
{_changes_html(ordered, diffs)}
</body>
</html>
"""
