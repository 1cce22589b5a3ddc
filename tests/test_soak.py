"""Soak: 200 experiments in one process must not leak file descriptors, processes or memory.

The loop runs all night; GitPython is known to leak helper processes and descriptors in
long-running programs. The stub trainer makes each experiment cost a fraction of a second.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
from loopkit import alive, fake_prepared_cache, git, make_workspace, own_children

from autoresearch.agent import Context, Proposal, _local_proposal
from autoresearch.display import Display
from autoresearch.loop import Session
from autoresearch.options import SessionOptions

ITERATIONS = 200
WARMUP = 20  # experiments before the first sample: imports, caches and pools settle


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def child_processes() -> int:
    """This process's children that still run (own_children: no other process is looked at)."""
    return sum(alive(pid) for pid in own_children())


class Sampling(Display):
    """A quiet display that samples resources after every experiment."""

    def __init__(self) -> None:
        super().__init__(quiet=True)
        self.samples: list[tuple[int, int, float, int]] = []

    def result(self, exp) -> None:
        self.samples.append((exp.id, open_fds(), rss_mb(), child_processes()))


STUB = """\
import hashlib

ITER = 0  # changed by every proposal


def main():
    print("step 00000 (100.0%) | loss 1.000000 | dt 1ms | tok/sec 1 | mfu 0.0% | remaining 0s")
    jitter = int(hashlib.sha256(str(ITER).encode()).hexdigest(), 16) % 1000
    print("---")
    print(f"val_bpb: {1.0 + jitter / 1e5 - ITER / 1e4:.6f}")
    print("peak_vram_mb: 0.0")


if __name__ == "__main__":
    main()
"""


class CountingAgent:
    """Stands in for the LLM: every proposal sets ITER to a new value."""

    name = "counting"
    model = "none"

    def __init__(self) -> None:
        self.n = 0

    def propose(self, ctx: Context) -> Proposal:
        self.n += 1
        source = re.sub(r"^ITER = \d+", f"ITER = {self.n}", ctx.train_py, flags=re.M)
        return _local_proposal(self, f"iteration {self.n}", source, time.monotonic(), [], "")

    fix = None  # never asked: the stub never crashes


@pytest.mark.slow  # 200 experiments: about two minutes on two cores
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_two_hundred_experiments_leak_nothing(tmp_path: Path, monkeypatch) -> None:
    ws = make_workspace(tmp_path / "ws", STUB)
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(fake_prepared_cache(tmp_path / "cache")))
    display = Sampling()
    opts = SessionOptions(
        tag="soak", preset="cpu", device="cpu", time_budget=1.0, max_experiments=ITERATIONS,
        calibrate=1, max_repeats=3, sealed=False,  # the stub prints val_bpb, saves no checkpoint
    )  # fmt: skip
    others = child_processes()  # the suite's own, if any (conftest's corpus preparation)
    result = Session(ws, opts, CountingAgent(), display).run()

    assert len(result.experiments) == ITERATIONS
    statuses = {e.status for e in result.experiments}
    assert statuses == {"keep", "discard"}
    assert [s[0] for s in display.samples] == list(range(1, ITERATIONS + 1))
    _, fds_early, rss_early, _ = display.samples[WARMUP - 1]
    _, fds_late, rss_late, _ = display.samples[-1]
    assert fds_late <= fds_early, display.samples[WARMUP - 1 :: 20]
    assert rss_late - rss_early < 25.0, (rss_early, rss_late)
    # git's helpers, if any, stay bounded
    assert max(s[3] for s in display.samples[WARMUP:]) <= 2 + others
    assert child_processes() <= 2 + others
    assert git(ws, "status", "--porcelain") == ""
