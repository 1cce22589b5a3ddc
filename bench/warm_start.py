"""What a warm start saves: launch to train.py's first output line, cold against warm.

    python bench/warm_start.py --runs 5

Cold is `python train.py` started the way a session starts it; warm is runner.WarmChild,
started `--lead` seconds before the go (a session starts it while the last run is evaluated),
timed from the go. Each run is stopped at train.py's first line (print_config, which comes
after its imports), so no prepared data is needed. Prints a table of the medians.
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

from autoresearch import runner  # noqa: E402


def first_line(proc: subprocess.Popen[bytes], started: float) -> float:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    elapsed = time.monotonic() - started
    proc.kill()
    proc.wait()
    proc.stdout.close()
    if not line:
        raise SystemExit("train.py printed nothing before it exited")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--lead", type=float, default=15.0, help="seconds from start to go")
    parser.add_argument("--preset", default="cpu")
    args = parser.parse_args()
    env = runner.child_env(dict(os.environ), preset=args.preset, device="cpu", gpu=None)
    source = (ROOT / "train.py").read_text(encoding="utf-8")
    preload = runner.warm_preload(source)
    cold, warm = [], []
    for _ in range(args.runs):
        started = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "train.py"], cwd=ROOT, env=env, stdout=subprocess.PIPE
        )
        cold.append(first_line(proc, started))
        child = runner.WarmChild(ROOT, env, preload=preload)
        time.sleep(args.lead)
        started = time.monotonic()
        proc = child.go("train.py", env)
        if proc is None:
            raise SystemExit("the warm child died before the go")
        warm.append(first_line(proc, started))
    import torch

    print(f"torch {torch.__version__}, python {sys.version.split()[0]}, {os.cpu_count()} cpus")
    print(f"preloaded: {', '.join(preload) or 'nothing'}; {args.runs} runs each")
    print("| start | launch → first line, median s | min s | max s |\n|---|---|---|---|")
    for name, values in (("cold", cold), ("warm", warm)):
        print(
            f"| {name} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} |"
        )
    print(f"saved per run: {statistics.median(cold) - statistics.median(warm):.2f} s")


if __name__ == "__main__":
    main()
