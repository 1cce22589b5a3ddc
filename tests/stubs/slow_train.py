"""Stub trainer that takes its time: `slow_train.py STARTUP TRAINING AFTER [--no-steps]`
sleeps STARTUP seconds before its first step line, TRAINING between its first and last step
lines, AFTER after the last one (as train.py's own evaluation would), then prints a summary
and exits 0. With --no-steps it prints no step line at all."""

import sys
import time

startup, training, after = (float(a) for a in sys.argv[1:4])
steps = "--no-steps" not in sys.argv


def step(i: int) -> None:
    if steps:
        print(f"step {i:05d} ({50 * i:.1f}%) | loss 5.0 | dt 10ms | remaining 0s", flush=True)


time.sleep(startup)
step(0)
time.sleep(training)
step(1)
time.sleep(after)
print("---")
print("val_bpb:          1.000000")
print("training_seconds: 0.1")
