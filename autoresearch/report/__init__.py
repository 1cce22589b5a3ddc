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

The package: `summary` reads the record, `plot` draws progress.png, `page` renders
report.html; this module writes both files. Its names are re-exported here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from autoresearch.errors import WorkspaceError
from autoresearch.ledger import Experiment, Ledger

from .page import CSP, CSS, SHORT_SHA, render_html
from .plot import (
    DISCARDED_LOWER_LABEL,
    FAILED,
    LABEL_CHARS,
    _shorten,
    plot_progress,
    progress_figure,
)
from .summary import (
    TRAIN_FILE,
    DiffKey,
    Summary,
    baseline_of,
    best_of,
    diff_pairs,
    git_diffs,
    read_horizon,
    summarize,
)

__all__ = [
    "CSP",
    "CSS",
    "DISCARDED_LOWER_LABEL",
    "FAILED",
    "LABEL_CHARS",
    "PLOT_FILE",
    "REPORT_FILE",
    "RUNS_DIR",
    "SHORT_SHA",
    "TRAIN_FILE",
    "DiffKey",
    "Summary",
    "_shorten",
    "baseline_of",
    "best_of",
    "build_report",
    "diff_pairs",
    "git_diffs",
    "plot_progress",
    "progress_figure",
    "read_horizon",
    "render_html",
    "summarize",
    "write_report",
]

RUNS_DIR = "runs"
PLOT_FILE = "progress.png"
REPORT_FILE = "report.html"


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
