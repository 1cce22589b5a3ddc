"""What the box (autoresearch/sandbox.py) costs a run's start-up: the seconds from launch to
the first line of a child that imports what train.py imports, with and without the box.

    python bench/box_startup.py [--runs 5] [--device cpu|cuda]

Each run launches `python -c "import torch, numpy, tiktoken; <touch the device>; print()"`
(cold, as a session's first run or a run without a warm start) and a `python -c pass` (the
interpreter alone), alternating boxed and plain so that a change of the machine's load hits
both alike. On cuda, the child also allocates a tensor on the card, so the box's device nodes
are exercised. Prints a table of the median and the range over the runs, in seconds of wall
time and of CPU time (the child's, from wait4).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autoresearch import sandbox  # noqa: E402

IMPORTS = "import torch, numpy, tiktoken"


def child(device: str) -> str:
    touch = "torch.ones(1, device='cuda').sum().item()" if device == "cuda" else "None"
    return f"{IMPORTS}; {touch}; print('ready', flush=True)"


def once(prefix: list[str], code: str) -> tuple[float, float]:
    """(wall seconds to the exit, CPU seconds of the child and what it reaped)."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [*prefix, sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.DEVNULL
    )
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"the child failed ({proc.returncode}) with prefix {prefix[:1]}")
    return time.perf_counter() - started, usage.ru_utime + usage.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    box = sandbox.probe()
    if not box.available:
        raise SystemExit(box.note)
    cell = box.cell(ROOT)
    cell.stage()
    rows: dict[tuple[str, str], list[tuple[float, float]]] = {}
    try:
        for _ in range(args.runs):
            for what, code in (("python -c pass", "pass"), (IMPORTS, child(args.device))):
                for how, prefix in (("plain", []), ("boxed", list(cell.prefix))):
                    rows.setdefault((what, how), []).append(once(prefix, code))
    finally:
        cell.close()
    print(f"{box.note}; {args.runs} runs each, device {args.device}, {os.cpu_count()} cores")
    print("| child | how | wall s, median (range) | CPU s, median (range) |")
    print("|---|---|---|---|")
    for (what, how), values in rows.items():
        walls, cpus = [v[0] for v in values], [v[1] for v in values]
        print(
            f"| `{what}` | {how} | {statistics.median(walls):.2f} ({min(walls):.2f}-"
            f"{max(walls):.2f}) | {statistics.median(cpus):.2f} ({min(cpus):.2f}-"
            f"{max(cpus):.2f}) |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
