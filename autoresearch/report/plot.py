"""progress.png: val_bpb per experiment, the running best, the kept changes labelled.

The figure is a bare matplotlib Figure rendered with Agg: it never touches pyplot's global
backend or needs a display. Labels are drawn without mathtext, so `$` in a description is
just `$`. Experiments without a val_bpb are marks on a strip at the bottom, never points.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence

# A bare Figure renders with Agg and never touches pyplot's global backend or a display.
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.text import Annotation
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import blended_transform_factory

from autoresearch.ledger import Experiment
from autoresearch.status import FAILED as NOT_MEASURED
from autoresearch.status import Status

from .summary import Summary, in_order, summarize

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
# a val_bpb more than this many times the session's range (baseline to lowest) above the
# baseline is drawn on the top edge, so one diverged run does not flatten every other point
OFF_CHART_SPANS = 1.0


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
    The y axis spans every val_bpb measured, the strip below them, except discards far above
    the baseline (a diverged run): those are triangles on the top edge, their values in the
    legend, so the changes that matter keep the height of the plot.
    """
    ordered = in_order(experiments)
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
    cap = _off_chart_above(scored, kept)
    high = [e for e in scored if e.status != Status.keep and e.val_bpb > cap]
    others = [e for e in others if e.val_bpb <= cap]

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
    limits = _y_limits([e.val_bpb for e in scored if e not in high], has_strip=bool(failed))
    ax.set_ylim(*limits)
    if high:
        ax.scatter(
            [e.id for e in high],
            [limits[1]] * len(high),
            marker="^",
            c=GREY,
            s=40,
            clip_on=False,
            zorder=5,
            label=f"discarded, off the chart (val_bpb {_range(high)})",
        )
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


def _off_chart_above(scored: Sequence[Experiment], kept: Sequence[Experiment]) -> float:
    """The val_bpb above which a discarded run is drawn on the top edge, not in the range:
    OFF_CHART_SPANS times the session's range (the baseline to the lowest value) above the
    baseline, a range of at least 1 % of the baseline. Kept values are always in range."""
    if not kept:
        return math.inf
    baseline = kept[0].val_bpb
    span = max(baseline - min(e.val_bpb for e in scored), 0.01 * abs(baseline), 1e-3)
    return max(max(e.val_bpb for e in kept), baseline + OFF_CHART_SPANS * span)


def _range(runs: Sequence[Experiment]) -> str:
    values = sorted(e.val_bpb for e in runs)
    low, high = values[0], values[-1]
    return f"{low:.4g}" if low == high else f"{low:.4g}–{high:.4g}"


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
