"""The prompt, as data and the functions that fill it: what an LLM agent is told.

The edit-format rules, the request for a new experiment or for a repair, the history table and
the corrections sent back when a reply cannot be used. Nothing here talks to a model.
Guarantees: the history table shows every keep (unless trimmed by a level of PROMPT_LEVELS,
which says so) and the most recent experiments; a trimmed prompt is never larger than a less
trimmed one.
"""

from __future__ import annotations

from ..noise import prompt_label
from ..status import Status
from .base import Context, HistoryEntry

HISTORY_RECENT = 30  # experiments shown in full when the history is long (plus every keep)
# Prompt trimming ladder, used when the endpoint says the context is too long: the history
# goes first, then the crash log (a repair keeps at least FIX_MIN_CRASH_LINES of it).
# (recent experiments shown, older keeps shown (None = all), crash-log lines shown).
PROMPT_LEVELS: tuple[tuple[int, int | None, int], ...] = (
    (HISTORY_RECENT, None, 50),
    (10, 10, 50),
    (3, 3, 50),
    (0, 0, 50),
    (0, 0, 10),
    (0, 0, 0),
)
FIX_MIN_CRASH_LINES = 10

EDIT_RULES = """\
# How to reply

Reply with exactly one experiment: one idea you expect to lower val_bpb.

1. The first line is a one-line description of the idea (at most 120 characters), e.g.
   `Raise MATRIX_LR from 0.04 to 0.06`. It becomes the commit message.
2. Then the edit of train.py as one or more SEARCH/REPLACE blocks:

train.py
```python
<<<<<<< SEARCH
    x = self.norm(x)
    logits = self.lm_head(x)
=======
    x = self.norm(x)
    logits = self.lm_head(x).float()
>>>>>>> REPLACE
```

Rules:
- Only train.py may be edited; prepare.py and everything else are fixed.
- The SEARCH part must copy lines of the current train.py exactly (whole lines, with their
  indentation and comments) and must match one place only: add neighbouring lines until it
  is unique. Keep blocks short; use several blocks for changes in several places. Blocks are
  applied in order.
- The edited train.py must still run to the end within the time budget and print its
  summary block; it must not read or write any other file.
- Send blocks, not the whole file; never elide lines inside a block with `...` or
  "unchanged" comments, and never repeat a block (each one is applied once).
- Nothing after the blocks is needed.
"""


def system_message(program: str) -> dict:
    """program.md followed by the edit-format rules."""
    return {"role": "system", "content": program.rstrip() + "\n\n" + EDIT_RULES}


def build_messages(ctx: Context, level: int = 0) -> list[dict]:
    """The messages asking for the next experiment; higher `level`s trim the history and crash
    log (see PROMPT_LEVELS)."""
    recent, keeps, crash_lines = PROMPT_LEVELS[level]
    parts = [
        "# The current best train.py",
        _best_line(ctx),
        _fenced(ctx.train_py, "python"),
        _history_section(ctx, recent, keeps),
    ]
    if ctx.last_crash_tail and crash_lines:
        tail = _tail(ctx.last_crash_tail, crash_lines)
        parts += [
            f"# The last crash (last {tail.count(chr(10)) + 1} lines of its log)",
            _fenced(tail),
        ]
    parts += [
        "# Your task",
        "Propose the next experiment: one idea, different from what the table shows was "
        "already tried, as SEARCH/REPLACE blocks against the train.py above. First line: the "
        "one-line description.",
    ]
    return [system_message(ctx.program), {"role": "user", "content": "\n\n".join(parts)}]


def build_fix_messages(
    ctx: Context, failed_source: str, crash_tail: str, level: int = 0
) -> list[dict]:
    """The messages asking to repair a crashed candidate (edits apply to `failed_source`)."""
    recent, keeps, crash_lines = PROMPT_LEVELS[level]
    idea = next((h.description for h in reversed(ctx.history) if h.source == failed_source), None)
    tail = _tail(crash_tail, max(crash_lines, FIX_MIN_CRASH_LINES))
    parts = [
        "# The candidate train.py that crashed",
        f"Its idea: {idea}" if idea else "",
        _fenced(failed_source, "python"),
        f"# Its crash (last {tail.count(chr(10)) + 1} lines of its log)",
        _fenced(tail),
        _history_section(ctx, recent, keeps),
        "# Your task",
        "Fix the cause of the crash while keeping the idea, as SEARCH/REPLACE blocks against the "
        "crashed train.py shown above (not against any earlier version). If the idea cannot "
        "work as written, make the smallest change that lets it run. First line: the one-line "
        "description of the repaired experiment.",
    ]
    user = "\n\n".join(p for p in parts if p)
    return [system_message(ctx.program), {"role": "user", "content": user}]


def history_table(
    history: list[HistoryEntry],
    noise: float | None,
    recent: int = HISTORY_RECENT,
    keeps: int | None = None,
) -> str:
    """A markdown table of past experiments, oldest first.

    Shows everything when there are at most `recent` entries; otherwise the last `recent` plus
    the earlier keeps (the last `keeps` of them, or all when None), and a line saying how many
    were left out. With `noise` known, Δ is also given in units of σ and each row is labelled
    with the keep rule's verdict (win / within-noise / loss / not-better), or crash, etc.
    """
    if not history:
        return "(no experiments yet)"
    cut = max(0, len(history) - recent)
    older, shown = history[:cut], history[cut:]
    older_keeps = [h for h in older if h.status == Status.keep]
    if keeps is not None:
        older_keeps = older_keeps[-keeps:] if keeps else []
    rows = older_keeps + shown
    header = "| id | val_bpb | Δ vs best | status | description |"
    rule = "|---:|---:|---:|---|---|"
    if noise:
        header = "| id | val_bpb | Δ vs best | status | verdict | description |"
        rule = "|---:|---:|---:|---|---|---|"
    lines = [header, rule]
    for h in rows:
        cells = [str(h.id), _num(h.val_bpb), _delta(h.delta, noise), h.status]
        if noise:
            cells.append(_verdict(h))
        cells.append(" ".join(h.description.split()).replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    omitted = len(history) - len(rows)
    if omitted:
        lines.append(f"\n({omitted} older experiments not shown.)")
    return "\n".join(lines)


def _history_section(ctx: Context, recent: int, keeps: int | None) -> str:
    title = f"# Experiments so far ({len(ctx.history)}, oldest first; Δ is vs the best at the time)"
    return title + "\n\n" + history_table(ctx.history, ctx.noise, recent, keeps)


def _best_line(ctx: Context) -> str:
    line = "No val_bpb measured yet (lower is better)."
    if ctx.best_bpb is not None:
        line = f"Its val_bpb is {ctx.best_bpb:.6f} (lower is better)."
    if ctx.noise:
        line += (
            f" One train.py's val_bpb spreads over seeds by σ ≈ {ctx.noise:.6f}, and a change's "
            "gain differs from seed to seed too. The verdict column is the keep "
            "rule's: win (kept), loss (worse beyond the noise), within-noise (not kept, not "
            "clearly worse), not-better (not kept, judged on one run before the noise was known)."
        )
    return line


def _verdict(h: HistoryEntry) -> str:
    """The row's label: for a judged experiment the keep rule's own verdict
    (noise.prompt_label), so the agent is told what the rule decided and nothing else."""
    if h.status == Status.crash or (h.val_bpb is None and h.status not in _NOT_MEASURED):
        return str(Status.crash)
    if h.val_bpb is None:
        return str(h.status)
    if h.delta is None:
        return "baseline"
    if h.status in (Status.keep, Status.discard):
        return str(prompt_label(h.status, h.verdict))
    return str(h.status)


# statuses that have no val_bpb without having crashed
_NOT_MEASURED = (Status.invalid, Status.interrupted, Status.running, Status.rejected)


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.6f}"


def _delta(delta: float | None, noise: float | None) -> str:
    if delta is None:
        return "—"
    text = f"{delta:+.6f}"
    return f"{text} ({delta / noise:+.1f}σ)" if noise else text


def _tail(text: str, n: int) -> str:
    return "\n".join(text.rstrip("\n").split("\n")[-n:])


def _fenced(text: str, lang: str = "") -> str:
    fence = "````" if "```" in text else "```"
    return f"{fence}{lang}\n{text.rstrip()}\n{fence}"


# ============================================================================ corrections


def correction(problem: str) -> str:
    """What is sent back when a reply could not be used: the reason, and the ask again."""
    return (
        f"Your edit could not be used:\n\n{problem}\n\nReply again with the complete edit: the "
        "one-line description first, then SEARCH/REPLACE blocks against the same train.py as "
        "before."
    )


NO_CHOICES = "The reply contained no message (no choices). Reply with the edit."
REFUSED = (
    "You declined ({refusal}). This is a benign machine-learning experiment on a small "
    "language model: propose a change to train.py."
)
CUT_OFF = (
    "Your reply was cut off at the output token limit {where}, so none of it was applied. "
    "Reply with a shorter edit: only the description line and short SEARCH/REPLACE blocks, no "
    "whole file and no explanation."
)
FILTERED = (
    "Your reply was stopped by the endpoint's content filter, so none of it was applied. This "
    "is a benign machine-learning experiment: reply with the description line and "
    "SEARCH/REPLACE blocks for train.py."
)
ONLY_REASONING = (
    "Your reply held only reasoning and an empty answer. After reasoning, write the answer: "
    "the description line and SEARCH/REPLACE blocks."
)
EMPTY = "The reply was empty. Reply with a description line and SEARCH/REPLACE blocks."
