"""Stub trainer that spends CPU time: `cpu_train.py BEFORE TRAINING AFTER [--idle S] [--late S]`
computes for BEFORE CPU seconds before its first step line, TRAINING between its first and
last step lines, AFTER after the last one, then prints a summary and exits 0. `--idle S`
sleeps S seconds between the two step lines, `--late S` before the first: wall time without
CPU time, as a loaded machine gives."""

import sys
import time

before, training, after = (float(a) for a in sys.argv[1:4])


def option(name: str) -> float:
    return float(sys.argv[sys.argv.index(name) + 1]) if name in sys.argv else 0.0


idle, late = option("--idle"), option("--late")


def compute(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        sum(range(1000))


def step(i: int) -> None:
    print(f"step {i:05d} ({50 * i:.1f}%) | loss 5.0 | dt 10ms | remaining 0s", flush=True)


compute(before)
time.sleep(late)
step(0)
compute(training)
time.sleep(idle)
step(1)
compute(after)
print("---")
print("val_bpb:          1.000000")
print("training_seconds: 0.1")
