"""The morning report: `runs/<tag>/progress.png` and a self-contained `runs/<tag>/report.html`.

Guarantees:
- report.html opens offline: CSS is inline, the plot is embedded as a data: URI, there are no
  remote references and no scripts; a Content-Security-Policy forbids loading anything else.
- Every text that came from the record (descriptions are written by an LLM, crash classes,
  diffs) is HTML-escaped, and plot labels are drawn without mathtext, so `$` is just `$`.
- Rendering (`plot_progress`, `render_html`, `build_report`) needs no git: the diffs are
  passed in. `write_report` reads the ledger and asks git for them.

Not guaranteed: diffs for commits git no longer has (a pruned attempt ref); the report says
"diff not available" there instead of failing the whole report.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

# A bare Figure renders with Agg and never touches pyplot's global backend or a display.
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.text import Annotation
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import blended_transform_factory

from autoresearch import gitrepo
from autoresearch.errors import WorkspaceError
from autoresearch.horizon import FILE as HORIZON_FILE
from autoresearch.ledger import STATUSES, Decision, Experiment, Ledger, decision_of
from autoresearch.status import FAILED as NOT_MEASURED
from autoresearch.status import Status

RUNS_DIR = "runs"
TRAIN_FILE = "train.py"
PLOT_FILE = "progress.png"
REPORT_FILE = "report.html"

# statuses with no val_bpb to plot
FAILED = (Status.crash, Status.invalid, Status.interrupted, Status.rejected)

# Plot colours; the page's CSS uses the same greens and reds for the statuses.
GREEN, DARK_GREEN, GREY, RED, AMBER = "#2ecc71", "#1a7a3a", "#b0b0b0", "#d62728", "#e69500"

PLOT_SIZE = (12, 6)  # inches; small enough that labels stay legible in a 1200 px wide page
PLOT_DPI = 160  # 1920x960 pixels, sharp on a high-density screen
LABEL_CHARS = 48  # a kept change's description is cut to this many characters on the plot
LABEL_SIZE = 8.5  # points
LABEL_ANGLE = 28  # degrees; upstream's slant, keeps long labels clear of the running best
LABEL_OFFSET = 6  # points right of and above the dot
GLYPH_WIDTH = 0.6  # average character width in em, to estimate a label's length
STRIP_Y = 0.04  # axes height of the marks for experiments without a val_bpb
DISCARDED_LOWER_LABEL = "discarded: lower, but within noise"
LEADER = {"arrowstyle": "-", "color": DARK_GREEN, "linewidth": 0.6, "alpha": 0.6, "shrinkB": 3}
RIGHT_ROOM = 0.16  # share of the experiment range left free after the last one, for its label
SHORT_SHA = 8  # characters of a commit shown in tables

DiffKey = tuple[str, str]  # (from commit, to commit)


@dataclass(frozen=True)
class Summary:
    """The numbers at the top of the report. Fields are None when the record lacks them."""

    experiments: int
    counts: dict[str, int]
    baseline: float | None
    best: float | None
    best_id: int | None
    train_seconds: float
    tokens_in: int
    tokens_out: int
    cost_usd: float | None  # sum over experiments that recorded extra.cost_usd
    cost_unknown: int  # experiments run by an agent with no recorded cost
    started_at: str | None
    ended_at: str | None

    @property
    def delta(self) -> float | None:
        if self.baseline is None or self.best is None:
            return None
        return self.best - self.baseline


# --- reading the record --------------------------------------------------------------------


def _sorted(experiments: Sequence[Experiment]) -> list[Experiment]:
    return sorted(experiments, key=lambda e: e.id)


def baseline_of(experiments: Sequence[Experiment]) -> Experiment | None:
    """The first experiment: the unmodified train.py."""
    ordered = _sorted(experiments)
    return ordered[0] if ordered else None


def best_of(experiments: Sequence[Experiment]) -> Experiment | None:
    """The kept experiment with the lowest val_bpb (the earliest on a tie), or None."""
    kept = [e for e in _sorted(experiments) if e.status == Status.keep and e.val_bpb is not None]
    return min(kept, key=lambda e: e.val_bpb) if kept else None


def summarize(experiments: Sequence[Experiment]) -> Summary:
    """Counts, baseline, best and totals over the whole record."""
    base, best = baseline_of(experiments), best_of(experiments)
    costs = [
        e.extra["cost_usd"] for e in experiments if (e.extra or {}).get("cost_usd") is not None
    ]
    with_agent = [e for e in experiments if e.agent]
    return Summary(
        experiments=len(experiments),
        counts=dict(Counter(e.status for e in experiments)),
        baseline=base.val_bpb if base else None,
        best=best.val_bpb if best else None,
        best_id=best.id if best else None,
        train_seconds=sum(e.train_seconds or 0.0 for e in experiments),
        tokens_in=sum(int(e.agent.get("tokens_in") or 0) for e in with_agent),
        tokens_out=sum(int(e.agent.get("tokens_out") or 0) for e in with_agent),
        cost_usd=sum(costs) if costs else None,
        cost_unknown=sum(1 for e in with_agent if (e.extra or {}).get("cost_usd") is None),
        started_at=min((e.started_at for e in experiments if e.started_at), default=None),
        ended_at=max((e.ended_at for e in experiments if e.ended_at), default=None),
    )


def diff_pairs(experiments: Sequence[Experiment]) -> list[DiffKey]:
    """The (from, to) commits the report shows: baseline -> best, then each kept change."""
    base, best = baseline_of(experiments), best_of(experiments)
    pairs: list[DiffKey] = []
    if base and best and base.commit and best.commit and base.commit != best.commit:
        pairs.append((base.commit, best.commit))
    for e in _sorted(experiments):
        if e.status == Status.keep and e.id != base.id and e.parent and e.commit:
            pairs.append((e.parent, e.commit))
    return pairs


def git_diffs(workspace: Path, pairs: Sequence[DiffKey]) -> dict[DiffKey, str]:
    """`git diff a b -- train.py` for each pair git can answer; pairs it cannot are left out."""
    return gitrepo.diffs(workspace, TRAIN_FILE, list(dict.fromkeys(pairs)))


# --- the plot ------------------------------------------------------------------------------


def _shorten(text: str | None, width: int = LABEL_CHARS) -> str:
    """One line of at most `width` characters, cut at a word when one ends late enough."""
    line = " ".join((text or "").split())
    if len(line) <= width:
        return line
    cut = line.rfind(" ", 0, width)
    return line[: cut if cut > width // 2 else width - 1].rstrip() + "…"


def _title(tag: str, summary: Summary) -> str:
    kept = summary.counts.get(Status.keep, 0)
    n = summary.experiments
    head = f"autoresearch {tag}: {n} experiment{'s' * (n != 1)}, {kept} kept"
    if summary.baseline is None or summary.best is None or summary.delta is None:
        return head
    return f"{head}  ·  val_bpb {summary.baseline:.4f} → {summary.best:.4f} ({summary.delta:+.4f})"


def plot_progress(experiments: Sequence[Experiment], tag: str) -> bytes:
    """The progress plot as PNG bytes (see `progress_figure`)."""
    fig = progress_figure(experiments, tag)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.savefig(buffer, format="png")
    return buffer.getvalue()


def progress_figure(experiments: Sequence[Experiment], tag: str) -> Figure:
    """val_bpb per experiment id, every experiment on it, laid out and ready to save.

    Kept changes are green dots annotated with their description, joined by the running best
    as a step line; discards are grey dots, except those lower than the best they were judged
    against (discarded as within noise), which are hollow amber diamonds; experiments with no
    val_bpb (crash, invalid, rejected, interrupted) are marks on a strip along the bottom.
    The y axis spans every val_bpb measured, the strip below them.
    """
    ordered = _sorted(experiments)
    summary = summarize(ordered)
    fig = Figure(figsize=PLOT_SIZE, dpi=PLOT_DPI)
    ax = fig.add_subplot()
    strip = blended_transform_factory(ax.transData, ax.transAxes)  # x in data, y in axes units

    scored = [e for e in ordered if _finite(e.val_bpb) and e.status not in FAILED]
    kept = [e for e in scored if e.status == Status.keep]
    lower = [e for e in scored if e.status != Status.keep and _discarded_lower(e)]
    others = [e for e in scored if e.status != Status.keep and not _discarded_lower(e)]
    scored_ids = {e.id for e in scored}
    failed = [e for e in ordered if e.id not in scored_ids]

    if others:
        ax.scatter(
            [e.id for e in others],
            [e.val_bpb for e in others],
            c=GREY,
            s=18,
            alpha=0.8,
            zorder=2,
            label="discarded",
        )
    if lower:
        ax.scatter(
            [e.id for e in lower],
            [e.val_bpb for e in lower],
            marker="D",
            facecolors="none",
            edgecolors=AMBER,
            linewidths=1.6,
            s=42,
            zorder=4.5,
            label=DISCARDED_LOWER_LABEL,
        )
    if kept:
        _plot_running_best(ax, ordered, kept)
        ax.scatter(
            [e.id for e in kept],
            [e.val_bpb for e in kept],
            c=GREEN,
            s=60,
            edgecolors="black",
            linewidths=0.6,
            zorder=4,
            label="kept",
        )
    for statuses, colour in ((NOT_MEASURED, RED), ((Status.interrupted,), AMBER)):
        xs = [e.id for e in failed if e.status in statuses]
        if xs:
            ax.scatter(
                xs,
                [STRIP_Y] * len(xs),
                transform=strip,
                marker="x",
                c=colour,
                s=45,
                linewidths=2,
                zorder=5,
                label=" / ".join(statuses) + " (no val_bpb)",
            )

    if ordered:  # room on the right for the last keep's slanted label
        first, last = ordered[0].id, ordered[-1].id
        ax.set_xlim(first - 1, last + max(3.0, RIGHT_ROOM * (last - first)))
    ax.set_ylim(*_y_limits([e.val_bpb for e in scored], has_strip=bool(failed)))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("experiment #")
    ax.set_ylabel("val_bpb (lower is better)")
    ax.set_title(_title(tag, summary), fontsize=14, pad=14, parse_math=False)
    ax.grid(True, alpha=0.25)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", framealpha=0.9)
    # Labels are placed in final pixels, and the layout makes room for them: place, lay out
    # again, and place once more in the slightly moved axes.
    with warnings.catch_warnings():
        # DejaVu Sans lacks CJK and emoji; such a label shows boxes, the page has the text.
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.tight_layout()
        for label in _annotate_keeps(ax, kept):
            label.remove()
        fig.tight_layout()
        _annotate_keeps(ax, kept)
    return fig


def _finite(x: float | None) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _discarded_lower(e: Experiment) -> bool:
    """A discard whose val_bpb was below the best it was judged against: within noise."""
    return e.status == Status.discard and _finite(e.best_before) and e.val_bpb < e.best_before


def _y_limits(values: Sequence[float], *, has_strip: bool) -> tuple[float, float]:
    """Every value inside with a margin; more room below when the strip of runs without a
    val_bpb is drawn there, and above for the kept changes' slanted labels."""
    if not values:
        return 0.0, 1.0
    top, bottom = max(values), min(values)
    span = max(top - bottom, 0.01 * abs(top), 1e-3)
    below = (0.22 if has_strip else 0.1) * span
    return bottom - below, top + 0.35 * span


def _plot_running_best(ax: Axes, ordered: Sequence[Experiment], kept: Sequence[Experiment]) -> None:
    xs, ys, best = [], [], None
    for e in ordered:
        if e.status == Status.keep and e.val_bpb is not None and (best is None or e.val_bpb < best):
            best = e.val_bpb
        if best is not None:
            xs.append(e.id)
            ys.append(best)
    ax.step(
        xs, ys, where="post", color=GREEN, linewidth=2, alpha=0.8, zorder=3, label="running best"
    )


def _annotate_keeps(ax: Axes, kept: Sequence[Experiment]) -> list[Annotation]:
    """Label each keep up and to the right of its dot, as upstream does. Labels are parallel
    lines of text; where two would overprint, the earlier one is lifted (with a thin leader)
    until it clears every later one. Call after the axes' limits and layout are final."""
    angle = math.radians(LABEL_ANGLE)
    along, normal = (math.cos(angle), math.sin(angle)), (-math.sin(angle), math.cos(angle))
    px = ax.figure.dpi / 72  # pixels per point
    line = LABEL_SIZE * 1.35 * px  # distance two parallel labels need between their baselines
    placed: list[tuple[float, float, float]] = []  # (start, end) along the text, offset across
    labels = []
    for i in range(len(kept) - 1, -1, -1):  # right to left: later labels stay put
        e = kept[i]
        label = "baseline" if i == 0 else _shorten(e.description)
        x, y = ax.transData.transform((e.id, e.val_bpb)) + LABEL_OFFSET * px
        start = x * along[0] + y * along[1]
        end = start + GLYPH_WIDTH * LABEL_SIZE * px * len(label)
        natural = across = x * normal[0] + y * normal[1]
        for other_start, other_end, other_across in sorted(placed, key=lambda p: p[2]):
            if start < other_end and other_start < end and abs(across - other_across) < line:
                across = other_across + line
        placed.append((start, end, across))
        lift = (across - natural) / math.cos(angle) / px  # points straight up
        annotation = ax.annotate(
            label,
            (e.id, e.val_bpb),
            xytext=(LABEL_OFFSET, LABEL_OFFSET + lift),
            textcoords="offset points",
            fontsize=LABEL_SIZE,
            color=DARK_GREEN,
            rotation=LABEL_ANGLE,
            rotation_mode="anchor",
            ha="left",
            va="bottom",
            parse_math=False,
            annotation_clip=True,
            zorder=1.5,  # under the dots, so a label never hides a result
            arrowprops=LEADER if lift > 0 else None,
        )
        labels.append(annotation)
    return labels


# --- the page ------------------------------------------------------------------------------

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


def _run_values(d: Decision) -> str:
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


def read_horizon(run_dir: Path) -> dict | None:
    """The confirm-horizon record of a session, or None when `confirm --horizon` never ran;
    WorkspaceError when the file is there but unreadable."""
    path = run_dir / HORIZON_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise WorkspaceError(
            f"cannot read {path} ({exc}): run `autoresearch confirm --horizon K` again, "
            "or move the file away"
        ) from exc
    if not isinstance(record, dict):
        raise WorkspaceError(f"{path} holds no confirm record: move it away")
    return record


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
    ordered = _sorted(experiments)
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


# --- writing -------------------------------------------------------------------------------


def build_report(
    experiments: Sequence[Experiment],
    tag: str,
    run_dir: Path,
    diffs: Mapping[DiffKey, str],
    horizon: Mapping | None = None,
) -> tuple[Path, Path]:
    """Write `run_dir/progress.png` and `run_dir/report.html`; return (png path, html path)."""
    png = plot_progress(experiments, tag)
    page = render_html(experiments, tag, png, diffs, horizon).encode("utf-8")
    run_dir.mkdir(parents=True, exist_ok=True)
    png_path, html_path = run_dir / PLOT_FILE, run_dir / REPORT_FILE
    _replace(png_path, png)
    _replace(html_path, page)
    return png_path, html_path


def _replace(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so a browser reloading mid-write sees the old
    or the new file, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_report(workspace: Path, tag: str) -> tuple[Path, Path]:
    """Read `runs/<tag>/`'s record and the workspace's git history; write the plot and page.

    Raises WorkspaceError when the run has no recorded experiments.
    """
    run_dir = workspace / RUNS_DIR / tag
    experiments = Ledger(run_dir).experiments()
    if not experiments:
        raise WorkspaceError(
            f"no experiments recorded in {run_dir}: check the tag (`ls {RUNS_DIR}/`) "
            f"or start a session with `autoresearch run --tag {tag}`"
        )
    diffs = git_diffs(workspace, diff_pairs(experiments))
    return build_report(experiments, tag, run_dir, diffs, read_horizon(run_dir))
