"""Reading train.py's output contract: its live step lines and its `---` summary block.

Guarantees: parsing never raises on what a child prints; a line that is not a step line is
None, a log without a summary block is {}. What it does not do: judge the numbers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass


@dataclass
class Step:
    """One live progress line of train.py, parsed. Missing fields are NaN."""

    step: int
    pct: float
    loss: float
    dt_ms: float
    tok_per_sec: float
    mfu: float
    remaining_s: float


_NUMBER = r"[-+]?(?:nan|inf|[\d,]*\.?\d+(?:[eE][-+]?\d+)?)"
_STEP_HEAD = re.compile(rf"^step\s*:?\s*(\d+)\s*\(\s*({_NUMBER})\s*%\s*\)", re.IGNORECASE)
_STEP_FIELD = re.compile(rf"^\s*([a-z_/]+)\s*:?\s*({_NUMBER})\s*(ms|s|%)?\s*$", re.IGNORECASE)
_STEP_KEYS = {
    "loss": "loss",
    "dt": "dt_ms",
    "tok/sec": "tok_per_sec",
    "tok/s": "tok_per_sec",
    "mfu": "mfu",
    "remaining": "remaining_s",
}
_SUMMARY_ITEM = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*:\s*(\S+)\s*$")


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def parse_step(line: str) -> Step | None:
    """Parse a live line such as
    `step 00012 (4.1%) | loss 5.123456 | dt 812ms | tok/sec 20,123 | mfu 1.2% | remaining 23s`.

    Also accepts `key: value` fields and extra fields (upstream's `lrm`, `epoch`), which are
    ignored. Returns None unless the line has a step number, a percentage and a loss.
    """
    head, *fields = line.strip().split("|")
    match = _STEP_HEAD.match(head.strip())
    if match is None:
        return None
    values: dict[str, float] = {}
    for field in fields:
        item = _STEP_FIELD.match(field)
        if item is None or item.group(1).lower() not in _STEP_KEYS:
            continue
        key, value, unit = _STEP_KEYS[item.group(1).lower()], _number(item.group(2)), item.group(3)
        if key == "dt_ms" and unit == "s":
            value *= 1000.0
        values[key] = value
    if "loss" not in values:
        return None
    return Step(
        step=int(match.group(1)),
        pct=_number(match.group(2)),
        loss=values["loss"],
        dt_ms=values.get("dt_ms", math.nan),
        tok_per_sec=values.get("tok_per_sec", math.nan),
        mfu=values.get("mfu", math.nan),
        remaining_s=values.get("remaining_s", math.nan),
    )


def parse_summary(text: str) -> dict[str, float]:
    """The `key: value` lines after the last `---` line that has any, as floats.

    Lines in the block that are not `key: numeric value` are skipped (a stray warning does not
    end the block); the first occurrence of a key wins. `nan` and `inf` are kept as floats.
    Returns {} when no `---` line is followed by a numeric item.
    """
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == "---"]
    for start in reversed(starts):
        end = next((j for j in starts if j > start), len(lines))
        summary: dict[str, float] = {}
        for line in lines[start + 1 : end]:
            item = _SUMMARY_ITEM.match(line.strip())
            if item is None or item.group(1) in summary:
                continue
            try:
                summary[item.group(1)] = _number(item.group(2))
            except ValueError:
                continue
        if summary:
            return summary
    return {}
