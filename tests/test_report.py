"""The morning report: plot, page, diffs from a real temporary git repo, a real headless browser."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from autoresearch import cli, horizon, report
from autoresearch.errors import WorkspaceError
from autoresearch.ledger import FIRST_ID, Experiment, Ledger

TAG = "nov26"
BASELINE_TRAIN = """\
import torch

DEPTH = 8
LR = 0.02
WARMUP = 0

def main():
    print("---")
    print("val_bpb: 1.0")
"""

# (status, description, val_bpb, edit of train.py or None)
SCRIPT = [
    ("keep", "baseline", 1.0000, None),
    ("discard", "double the width", 1.0050, ("DEPTH = 8", "DEPTH = 16")),
    ("keep", "raise LR to 0.04", 0.9812, ("LR = 0.02", "LR = 0.04")),
    ("crash", "swap to bf16 <everywhere>", None, ("import torch", "import torch as T")),
    ("discard", "a $100 idea & <b>bold</b>", 1.4000, ("WARMUP = 0", "WARMUP = 1000")),
    ("invalid", "edit did not apply", None, None),
    (
        "keep",
        "add 100 warmup steps <script>alert(1)</script>",
        0.9701,
        ("WARMUP = 0", "WARMUP = 100"),
    ),
    ("discard", "depth 10", 0.9755, ("DEPTH = 8", "DEPTH = 10")),
    ("interrupted", "rotary embeddings", None, ("DEPTH = 8", "DEPTH = 9")),
]


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def build_session(workspace: Path) -> list[Experiment]:
    """A git repo where keeps are on the branch and other candidates only under attempt refs,
    and the session's record in runs/<tag>/ written through the ledger."""
    workspace.mkdir()
    git(workspace, "init", "-q", "-b", f"autoresearch/{TAG}")
    train = workspace / "train.py"
    train.write_text(BASELINE_TRAIN)
    git(workspace, "add", "train.py")
    git(workspace, "commit", "-q", "-m", "baseline")
    best_sha, best_bpb = git(workspace, "rev-parse", "HEAD"), None
    ledger = Ledger(workspace / "runs" / TAG)
    for i, (status, description, bpb, edit) in enumerate(SCRIPT):
        exp_id = FIRST_ID + i
        commit = best_sha if i == 0 else None
        if edit is not None:
            train.write_text(train.read_text().replace(*edit))
            git(workspace, "commit", "-q", "-am", description)
            commit = git(workspace, "rev-parse", "HEAD")
            git(workspace, "update-ref", f"refs/autoresearch/{TAG}/attempts/{exp_id:04d}", commit)
            if status != "keep":
                git(workspace, "reset", "-q", "--hard", best_sha)
        ledger.append(
            Experiment(
                id=exp_id,
                status=status,
                description=description,
                commit=commit,
                parent=best_sha,
                val_bpb=bpb,
                memory_gb=0.0 if bpb is None else 12.5,
                best_before=best_bpb,
                threshold=0.0,
                crash_class="oom" if status == "crash" else None,
                started_at=f"2025-11-26T0{i}:00:00+00:00",
                ended_at=f"2025-11-26T0{i}:05:00+00:00",
                train_seconds=None if status == "invalid" else 300.0,
                agent={} if i == 0 else {"name": "openai", "tokens_in": 1000, "tokens_out": 200},
                extra={} if i == 0 else {"cost_usd": 0.01},
            )
        )
        if status == "keep":
            best_sha, best_bpb = commit, bpb
    return ledger.experiments()


def experiment(exp_id: int, status: str, val_bpb: float | None) -> Experiment:
    return Experiment(exp_id, status, "baseline", "a" * 40, "a" * 40, val_bpb, 10.0, None, 0.0)


@pytest.fixture
def session(tmp_path: Path) -> tuple[Path, list[Experiment]]:
    workspace = tmp_path / "ws"
    return workspace, build_session(workspace)


@pytest.fixture
def written(session: tuple[Path, list[Experiment]]) -> tuple[Path, Path, list[Experiment]]:
    workspace, experiments = session
    png, page = report.write_report(workspace, TAG)
    return png, page, experiments


def test_files_are_written_and_png_is_valid(written):
    png, page, _ = written
    assert png.parent == page.parent == png.parents[2] / "runs" / TAG
    assert (png.name, page.name) == ("progress.png", "report.html")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 30_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1920, 960)


def test_page_loads_nothing_remote_and_embeds_the_plot(written):
    png, page, _ = written
    text = page.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert "<script" not in text.lower().replace("&lt;script", "")
    embedded = re.search(r'src="data:image/png;base64,([^"]+)"', text)
    assert embedded and base64.b64decode(embedded.group(1)) == png.read_bytes()


def test_llm_text_is_escaped(written):
    _, page, _ = written
    text = page.read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<script>alert(1)" not in text
    assert "&lt;b&gt;bold&lt;/b&gt;" in text and "a $100 idea &amp;" in text


def test_table_has_every_experiment_with_its_status(written):
    _, page, experiments = written
    text = page.read_text()
    for e in experiments:
        row = re.search(rf'<tr id="exp-{e.id}" class="(\w+)">(.*?)</tr>', text, re.S)
        assert row, f"no row for experiment {e.id}"
        assert f'class="status s-{e.status}"' in row.group(2)
        if e.commit:
            assert e.commit[:8] in row.group(2)
    assert "0.981200" in text and "-0.018800" in text  # val_bpb and Δ of experiment 2
    assert "crashed (oom)" in text  # the crash class, in its reason


def test_summary_counts_and_totals(written):
    _, page, experiments = written
    s = report.summarize(experiments)
    assert s.counts == {"keep": 3, "discard": 3, "crash": 1, "invalid": 1, "interrupted": 1}
    assert (s.baseline, s.best, s.best_id) == (1.0, 0.9701, FIRST_ID + 6)
    assert s.delta == pytest.approx(-0.0299)
    assert s.train_seconds == 8 * 300.0
    assert (s.tokens_in, s.tokens_out) == (8000, 1600)
    assert s.cost_usd == pytest.approx(0.08) and s.cost_unknown == 0
    text = page.read_text()
    assert "$0.08" in text and "3 keep, 3 discard, 1 crash, 1 invalid, 1 interrupted" in text


def test_diffs_show_baseline_to_best_and_each_kept_change(written):
    _, page, _ = written
    text = page.read_text()
    total = text.split("baseline → best</h2>")[1].split("<h2>")[0]
    assert '<span class="del">-LR = 0.02</span>' in total
    assert '<span class="add">+LR = 0.04</span>' in total
    assert '<span class="add">+WARMUP = 100</span>' in total
    assert "DEPTH = 16" not in total  # a discarded change is not part of the best
    changes = text.split("Kept changes</h2>")[1]
    assert changes.count('<div class="change">') == 2
    first, second = changes.split('<div class="change">')[1:]
    assert "+LR = 0.04" in first and "+WARMUP" not in first and "-0.018800" in first
    assert "+WARMUP = 100" in second and "+LR" not in second


def test_git_diffs_leaves_out_commits_git_does_not_have(session):
    workspace, experiments = session
    real = (experiments[0].commit, experiments[2].commit)
    gone = (experiments[0].commit, "f" * 40)
    diffs = report.git_diffs(workspace, [real, gone])
    assert list(diffs) == [real] and "+LR = 0.04" in diffs[real]


def test_report_without_experiments_says_what_to_do(tmp_path: Path):
    with pytest.raises(WorkspaceError, match="no experiments recorded"):
        report.write_report(tmp_path, TAG)


def test_report_without_git_history_still_renders(session):
    workspace, experiments = session
    png, page = report.build_report(experiments, TAG, workspace / "elsewhere", diffs={})
    assert page.read_text().count("diff not available") == 3  # baseline->best, two keeps


def test_baseline_only_session(tmp_path: Path):
    png, page = report.build_report([experiment(1, "keep", 1.0)], TAG, tmp_path, diffs={})
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "baseline is still the best" in page.read_text()


def test_crashed_baseline_still_renders(tmp_path: Path):
    png, page = report.build_report([experiment(1, "crash", None)], TAG, tmp_path, diffs={})
    assert png.stat().st_size > 0 and "s-crash" in page.read_text()


# --- a real headless browser ---------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium)"
)

# Written by the test into a copy of the page, since the report itself has no scripts: after
# load, put the plot's natural size and the number of failed loads where --dump-dom shows it.
PROBE = """<script>
let failed = 0;
window.addEventListener("error", () => { failed += 1; }, true);
document.addEventListener("securitypolicyviolation", () => { failed += 1; });
window.addEventListener("load", () => {
  const img = document.querySelector("img.plot");
  document.title = `probe ${img.naturalWidth}x${img.naturalHeight} failed ${failed}`;
});
</script>"""


def chromium(page: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile = tmp_path / "profile"
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            # Nothing on the network resolves: a remote reference would show as a load error.
            "--host-resolver-rules=MAP * ~NOTFOUND",
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=5000",
            *args,
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def console_errors(stderr: str) -> list[str]:
    """Console lines in chromium's log. The report has no scripts, so any console message
    (an uncaught error, a CSP violation, a failed load) means something is wrong."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def with_probe(page: Path, tmp_path: Path, script: str = PROBE) -> Path:
    """A copy of the page whose CSP lets the test's probe script run."""
    text = page.read_text()
    text = text.replace(report.CSP, report.CSP + "; script-src 'unsafe-inline'")
    probed = tmp_path / "probed.html"
    probed.write_text(text.replace("<body>", "<body>" + script))
    return probed


@needs_chromium
def test_browser_loads_page_with_plot_and_no_console_errors(written, tmp_path: Path):
    _, page, experiments = written
    done = chromium(with_probe(page, tmp_path), tmp_path, "--dump-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    title = re.search(r"<title>probe (\d+)x(\d+) failed (\d+)</title>", done.stdout)
    assert title, f"probe did not run: {done.stdout[:500]}"
    assert (int(title.group(1)), int(title.group(2))) == (1920, 960)
    assert title.group(3) == "0"
    assert console_errors(done.stderr) == []
    assert f'id="exp-{experiments[-1].id}"' in done.stdout


@needs_chromium
def test_browser_console_check_catches_errors(written, tmp_path: Path):
    """The checks above must see a real error: a throwing script and a blocked remote image."""
    _, page, _ = written
    bad = PROBE + '<script>null.boom();</script><img src="https://example.invalid/x.png">'
    done = chromium(with_probe(page, tmp_path, bad), tmp_path, "--dump-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    errors = console_errors(done.stderr)
    assert any("Uncaught" in line for line in errors), done.stderr[-2000:]
    assert any("example.invalid" in line for line in errors), done.stderr[-2000:]
    assert re.search(r"<title>probe 1920x960 failed [1-9]", done.stdout)


@needs_chromium
def test_browser_screenshot(written, tmp_path: Path):
    _, page, _ = written
    shot = tmp_path / "shot.png"
    done = chromium(page, tmp_path, f"--screenshot={shot}", "--window-size=1200,2000")
    assert done.returncode == 0, done.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert console_errors(done.stderr) == []


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("raise LR", "raise LR"),
        ("  many\n spaces\there ", "many spaces here"),
        ("word " * 20, "word word word word word word word word word…"),
        ("x" * 60, "x" * 47 + "…"),
    ],
)
def test_plot_labels_are_one_short_line(text: str, label: str):
    assert report._shorten(text) == label


def test_plot_takes_any_description_quietly(tmp_path: Path, recwarn):
    """Mathtext characters, CJK and emoji neither break the plot nor spam warnings at night."""
    odd = experiment(2, "keep", 0.9)
    odd.description, odd.best_before = "lr $3e-4$ _x_ ^y^ 使用 RoPE 🚀", 1.0
    png = report.plot_progress([experiment(1, "keep", 1.0), odd], "t$a^g_")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [w for w in recwarn if "Glyph" in str(w.message)]


# --- every decision explained, every experiment on the plot -----------------------------------


def judged(
    exp_id: int,
    status: str,
    runs: list[float],
    best_before: float | None,
    *,
    bar: float = 0.0,
    sigma: float | None = 0.004,
    incumbent_runs: int = 2,
    crash_class: str | None = None,
    reason: str = "",
) -> Experiment:
    """An experiment as the loop records one it judged: its runs, the bar, σ."""
    mean = sum(runs) / len(runs) if runs and status in ("keep", "discard") else None
    return Experiment(
        id=exp_id,
        status=status,
        description=f"idea {exp_id}",
        commit=f"{exp_id:x}" * 40 if status != "invalid" else None,
        parent="a" * 40,
        val_bpb=mean,
        memory_gb=1.0,
        best_before=best_before,
        threshold=bar,
        crash_class=crash_class,
        extra={
            "runs": runs,
            "incumbent_runs": incumbent_runs,
            "sigma": sigma,
            **({"reason": reason} if reason else {}),
        },
    )


# The baseline (2 runs), a kept change, a lower one discarded as within noise (the case a
# green Δ next to "discard" used to leave unexplained), a worse one, a crash, an invalid edit.
JUDGED = [
    judged(1, "keep", [1.000, 1.004], None, sigma=None, incumbent_runs=0),
    judged(2, "keep", [0.970, 0.974], 1.002, bar=0.008),
    judged(3, "discard", [0.968, 0.966], 0.972, bar=0.008),
    judged(4, "discard", [0.990], 0.972, bar=0.0113, incumbent_runs=2),
    judged(5, "crash", [], 0.972, crash_class="oom"),
    judged(6, "invalid", [], 0.972, reason="SEARCH block 1 matched nothing"),
]
REASONS = {
    1: "the baseline, the first best (2 runs, σ not measured yet)",
    2: "kept: gain 0.030000 cleared the bar 0.008000 (2 runs against 2 of the best, σ 0.004000)",
    3: "discarded: gain 0.005000 within noise, not above the bar 0.008000 "
    "(2 runs against 2 of the best, σ 0.004000)",
    4: "discarded: no gain (val_bpb +0.018000 against the best, 1 run against 2 of the best)",
    5: "crashed (oom): the run gave no val_bpb",
    6: "invalid: SEARCH block 1 matched nothing",
}


def test_each_row_has_the_keep_rule_s_numbers_and_a_reason(tmp_path: Path):
    page = report.render_html(JUDGED, TAG, b"", {})
    for exp_id, reason in REASONS.items():
        row = re.search(rf'<tr id="exp-{exp_id}" class="\w+">(.*?)</tr>', page, re.S).group(1)
        assert f'<td class="reason">{reason}</td>' in row
    row3 = re.search(r'<tr id="exp-3" .*?</tr>', page, re.S).group(0)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row3)
    # val_bpb, Δ (amber, not green: it was not kept), gain, bar, σ, runs on each side
    assert cells[2] == "0.967000"
    assert cells[3] == '<span class="noise">-0.005000</span>'
    assert cells[6:10] == ["0.005000", "0.008000", "0.004000", "2 / 2"]
    assert 'title="this: 0.968000, 0.966000"' in row3  # each run's val_bpb


@needs_chromium
def test_browser_shows_every_experiment_s_reason(tmp_path: Path):
    """The page as a browser renders it: each experiment's row holds its reason."""
    page = tmp_path / "report.html"
    report.build_report(JUDGED, TAG, tmp_path, diffs={})
    done = chromium(page, tmp_path, "--dump-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    assert console_errors(done.stderr) == []
    for exp_id, reason in REASONS.items():
        row = re.search(rf'<tr id="exp-{exp_id}" class="\w+">(.*?)</tr>', done.stdout, re.S)
        assert row, f"no row for experiment {exp_id} in the rendered page"
        assert f'<td class="reason">{reason}</td>' in row.group(1)


def _collections(ax) -> dict[str, list[tuple[float, float]]]:
    """Scatter label -> the points it draws, in data coordinates (axes units for the strip)."""
    return {c.get_label(): [tuple(p) for p in c.get_offsets()] for c in ax.collections}


def test_plot_has_every_experiment_and_the_discarded_lower_one_inside_the_axes():
    fig = report.progress_figure(JUDGED, TAG)
    ax = fig.axes[0]
    points = _collections(ax)
    (lower,) = points[report.DISCARDED_LOWER_LABEL]
    low, high = ax.get_ylim()
    left, right = ax.get_xlim()
    assert lower == (3, pytest.approx(0.967))
    assert low < lower[1] < high and left < lower[0] < right
    # Every scored experiment inside the y range, not pinned to an edge.
    for label in ("kept", "discarded", report.DISCARDED_LOWER_LABEL):
        for x, y in points[label]:
            assert low < y < high and left < x < right
    # Every experiment is on the plot: the failed ones on the strip, inside the axes.
    crashes = points["crash / invalid / rejected (no val_bpb)"]
    assert [x for x, _ in crashes] == [5, 6]
    assert all(0 < y < 1 for _, y in crashes)
    on_plot = sorted(int(x) for pts in points.values() for x, _ in pts)
    assert on_plot == [e.id for e in JUDGED]
    # The running best is a step line through the kept values.
    (best,) = [line for line in ax.get_lines() if line.get_label() == "running best"]
    assert best.get_drawstyle() == "steps-post"
    assert list(best.get_ydata()) == pytest.approx([1.002, 0.972, 0.972, 0.972, 0.972, 0.972])


def test_a_diverged_run_is_drawn_on_the_top_edge_not_in_the_range():
    """One discard at 6.5 (a diverged run) would flatten 1.000 → 0.970 into a line: it is a
    triangle on the top edge, its value in the legend, and the range stays the session's."""
    diverged = judged(7, "discard", [6.5], 0.972, bar=0.008)
    fig = report.progress_figure([*JUDGED, diverged], TAG)
    ax = fig.axes[0]
    points = _collections(ax)
    low, high = ax.get_ylim()
    assert high < 1.1 and low > 0.9  # the range around the baseline and the best
    (label,) = [k for k in points if "off the chart" in k]
    assert points[label] == [(7, pytest.approx(high))] and "6.5" in label
    assert (4, pytest.approx(0.990)) in points["discarded"]  # a plain worse one stays in range
    on_plot = sorted(int(x) for pts in points.values() for x, _ in pts)
    assert on_plot == [e.id for e in JUDGED] + [7]


def test_the_sigma_shown_is_the_one_the_rule_used():
    """A judged candidate's record holds the paired gain's σ the rule used beside the
    run-to-run σ of val_bpb: the reason and the σ column give the former."""
    e = judged(7, "discard", [0.968], 0.972, bar=0.02)
    e.extra["paired_sigma"] = 0.009
    page = report.render_html([JUDGED[0], e], TAG, b"", {})
    row = re.search(r'<tr id="exp-7" .*?</tr>', page, re.S).group(0)
    assert "σ 0.009000" in row and '<td class="num">0.009000</td>' in row
    assert "σ 0.004000" not in row


# ------------------------------------------------------------------------------------------------
# `confirm --horizon`'s answer in the report, through the CLI
# ------------------------------------------------------------------------------------------------


def horizon_record(holds: bool | None) -> dict:
    """A record as autoresearch.horizon writes it: 2 x a 5 s budget, seeds 1000 and 1001."""
    best_val = 0.95 if holds is not False else 1.05
    runs = [
        {"role": role, "id": exp_id, "seed": seed, "status": "ok", "reason": "",
         "val_bpb": val, "test_bpb": val + 0.01, "num_steps": 40, "wall_s": 12.0}
        for seed in (1000, 1001)
        for role, exp_id, val in (("baseline", 0, 1.0), ("best", 6, best_val))
    ]  # fmt: skip
    if holds is None:
        runs[-1] = {**runs[-1], "status": "crash", "reason": "<oom> in step 3",
                    "val_bpb": None, "test_bpb": None}  # fmt: skip
    return {
        "horizon": 2.0,
        "time_budget": 10.0,
        "seeds": [1000, 1001],
        "at": "2025-11-27T08:00:00+00:00",
        "baseline": {"id": 0, "commit": "a" * 40, "val_bpb": 1.0},
        "best": {"id": 6, "commit": "b" * 40, "val_bpb": 0.9701},
        "runs": runs,
        **horizon.verdict(runs, 1.0, 0.9701),
    }


def report_through_cli(workspace: Path) -> tuple[object, str]:
    """`autoresearch report --tag` in process (Typer's CliRunner): the result and the page."""
    for name in ("program.md", "prepare.py"):  # what makes the repo a workspace
        (workspace / name).touch()
    done = CliRunner().invoke(cli.app, ["report", "--tag", TAG, "--workspace", str(workspace)])
    page = workspace / "runs" / TAG / report.REPORT_FILE
    return done, page.read_text() if page.is_file() else ""


def horizon_section(page: str) -> str:
    assert page.count("× TIME_BUDGET</h2>") == 1
    return page.split("× TIME_BUDGET</h2>", 1)[1].split("</table>", 1)[0]


@pytest.mark.parametrize(
    ("holds", "answer"),
    [
        (True, "the gain holds"),
        (False, "the gain does not hold"),
        (None, "no answer: a run failed"),
    ],
)
def test_report_shows_the_confirm_horizon_answer(
    session: tuple[Path, list[Experiment]], holds: bool | None, answer: str
) -> None:
    workspace, _ = session
    done, page = report_through_cli(workspace)
    assert done.exit_code == 0, done.output
    assert "TIME_BUDGET</h2>" not in page  # no confirm --horizon yet: no section

    record = horizon_record(holds)
    (workspace / "runs" / TAG / horizon.FILE).write_text(json.dumps(record))
    done, page = report_through_cli(workspace)
    assert done.exit_code == 0, done.output
    section = horizon_section(page)
    assert "<h2>At 2 × TIME_BUDGET</h2>" in page and "confirm --horizon 2</code>" in page
    assert answer in section
    assert "seeds 1000, 1001" in section and "10 s of training per run" in section
    assert f"session gain {record['session_gain']:.6f}" in section
    assert section.count("<tr><td>baseline</td>") == 2 and section.count("<tr><td>best</td>") == 2
    if holds is None:
        assert "&lt;oom&gt; in step 3" in section and "<oom>" not in section  # escaped
        assert "val gain —" in section
    else:
        assert f"val gain {record['val_gain']:.6f}" in section
        assert f"test gain {record['test_gain']:.6f}" in section


def test_an_unreadable_confirm_horizon_record_is_named(
    session: tuple[Path, list[Experiment]],
) -> None:
    workspace, _ = session
    (workspace / "runs" / TAG / horizon.FILE).write_text('{"horizon": 2,')
    done, _ = report_through_cli(workspace)
    assert isinstance(done.exception, WorkspaceError)  # main() prints it as one line
    assert horizon.FILE in str(done.exception) and "confirm --horizon K" in str(done.exception)
