"""Run-to-run noise of val_bpb, and the keep rule that respects it.

Every training run's val_bpb is a measurement of one commit. `Measurements` appends them to
`runs/<tag>/measurements.jsonl` (flushed and fsync'd, torn last line ignored), so after a kill
the runs that finished are reused, never repeated. From them:

- the estimate of a commit is the mean of its runs;
- sigma is the pooled standard deviation over every commit measured at least twice (the
  baseline's calibration runs, a candidate's repeats, the incumbent's re-measurements);
- `judge` compares a candidate's mean with the incumbent's: the gain must clear
  max(2 sigma sqrt(1/n + 1/m), min_delta), the two-standard-error bar for a difference of two
  means of n and m runs. A candidate with no gain at all is discarded at once; one in between
  is re-run, up to `max_repeats` runs.

What it does not do: model drift of the machine over a night (the incumbent's re-measurement
every few keeps is the defence), or non-Gaussian outliers.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean

SIGMAS = 2.0  # standard errors a gain must clear to count as real
FILE = "measurements.jsonl"


@dataclass(frozen=True)
class Verdict:
    decision: str  # keep | discard | repeat
    gain: float  # incumbent mean - candidate mean (positive = better)
    threshold: float  # what the gain had to clear at this n and m
    runs: int  # candidate runs so far
    sigma: float | None


class Measurements:
    """Append-only record of every run's val_bpb, by commit."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / FILE
        self._rows: list[dict] | None = None

    def rows(self) -> list[dict]:
        if self._rows is None:
            self._rows = []
            if self.path.is_file():
                for line in self.path.read_text(encoding="utf-8").splitlines():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:  # torn by a kill mid-write: that run is redone
                        continue
                    if isinstance(row, dict) and "commit" in row and "val_bpb" in row:
                        self._rows.append(row)
        return self._rows

    def add(self, commit: str, val_bpb: float, *, exp_id: int, purpose: str, seed: int) -> None:
        row = {
            "commit": commit,
            "val_bpb": val_bpb,
            "exp": exp_id,
            "purpose": purpose,
            "seed": seed,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = (json.dumps(row) + "\n").encode()
        with open(self.path, "ab") as f:
            if f.tell() and not self._ends_with_newline():
                f.write(b"\n")  # seal a torn line so this row parses
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self.rows().append(row)

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def values(self, commit: str) -> list[float]:
        return [r["val_bpb"] for r in self.rows() if r["commit"] == commit]

    def mean(self, commit: str) -> float | None:
        values = self.values(commit)
        return fmean(values) if values else None

    def sigma(self) -> float | None:
        """Pooled standard deviation over commits measured at least twice; None before that."""
        by_commit: dict[str, list[float]] = {}
        for r in self.rows():
            by_commit.setdefault(r["commit"], []).append(r["val_bpb"])
        squares, dof = 0.0, 0
        for values in by_commit.values():
            if len(values) >= 2:
                m = fmean(values)
                squares += sum((v - m) ** 2 for v in values)
                dof += len(values) - 1
        return math.sqrt(squares / dof) if dof else None


def threshold(sigma: float | None, n: int, m: int, min_delta: float) -> float:
    """The gain a candidate of n runs must beat against an incumbent of m runs."""
    if sigma is None:
        return min_delta
    return max(SIGMAS * sigma * math.sqrt(1 / n + 1 / max(m, 1)), min_delta)


def judge(
    candidate: list[float],
    incumbent: list[float],
    *,
    sigma: float | None,
    min_delta: float,
    max_repeats: int,
) -> Verdict:
    """keep, discard, or repeat (run the candidate once more) — see the module docstring."""
    n, m = len(candidate), len(incumbent)
    gain = fmean(incumbent) - fmean(candidate)
    bar = threshold(sigma, n, m, min_delta)
    if gain > bar:
        decision = "keep"
    elif gain <= 0 or sigma is None or n >= max_repeats:
        decision = "discard"
    else:
        decision = "repeat"
    return Verdict(decision, gain, bar, n, sigma)
