"""docs/reliability.md cannot drift: every test it names exists, and its totals match its rows."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"
NODE_ID = re.compile(r"`(tests/[\w/]+\.py::[^`]+)`")
TOTALS = re.compile(
    r"(\d+) (faults injected|bad inputs tried|exploits tried), "
    r"(\d+) (survived|rejected cleanly|caught)"
)
GROUPS = {  # section heading -> what its totals line counts
    "LLM endpoint": "faults injected",
    "Training": "faults injected",
    "Harness": "faults injected",
    "Bad command-line input": "bad inputs tried",
    "Exploits": "exploits tried",
}


def sections() -> dict[str, str]:
    """Heading -> text of each `## ` section."""
    parts = re.split(r"^## (.+)$", DOC.read_text(encoding="utf-8"), flags=re.MULTILINE)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def table_rows(text: str) -> list[list[str]]:
    """The body rows of the section's table, as cells (the header and rule left out)."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[2:]]


def totals(text: str) -> list[tuple[int, str, int, str]]:
    flat = " ".join(text.split())
    return [(int(a), what, int(b), outcome) for a, what, b, outcome in TOTALS.findall(flat)]


def test_every_group_has_rows_with_tests_and_matching_totals() -> None:
    found = sections()
    overall: dict[str, int] = {}
    for heading, counted in GROUPS.items():
        rows = table_rows(found[heading])
        assert rows, heading
        for row in rows:
            assert len(row) == 3, (heading, row)
            assert NODE_ID.search(row[2]), f"{heading}: no test named for {row[0]!r}"
        [(tried, what, passed, _)] = totals(found[heading])
        assert what == counted and tried == passed == len(rows), (heading, tried, len(rows))
        overall[counted] = overall.get(counted, 0) + len(rows)
    summary = {what: (tried, passed) for tried, what, passed, _ in totals(found["Totals"])}
    assert summary == {what: (n, n) for what, n in overall.items()}


def test_every_named_test_exists() -> None:
    named = set(NODE_ID.findall(DOC.read_text(encoding="utf-8")))
    files = sorted({node.split("::")[0] for node in named})
    proc = subprocess.run(
        # -m "": the slow tests too (the default addopts leave them out); -n 0: collected in
        # this one process, not by workers
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            "-n",
            "0",
            "-m",
            "",
            *files,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    collected = set(proc.stdout.splitlines())
    assert sorted(named - collected) == []
