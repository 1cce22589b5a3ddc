"""Stub trainer whose start-up is CPU work on one core: `contended_start.py CPU NICE WORK
[--no-steps]` pins itself to CPU, lowers its priority by NICE, computes for WORK CPU seconds
before its first step line, then prints a step line and a summary and exits 0. A competitor on
the same core (started by the test) stretches the start-up's wall time, not its CPU time."""

import os
import sys
import time

cpu, nice, work = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
os.sched_setaffinity(0, {cpu})
os.nice(nice)
try:  # where the kernel groups processes by session (autogroup), nice counts within it only
    with open("/proc/self/autogroup", "w") as group:
        group.write(str(nice))
except OSError:
    pass
begun = time.process_time()
while time.process_time() - begun < work:
    pass
if "--no-steps" not in sys.argv:
    print("step 00000 (0.0%) | loss 5.0 | dt 10ms | remaining 0s", flush=True)
    print("step 00001 (100.0%) | loss 4.0 | dt 10ms | remaining 0s", flush=True)
print("---")
print("val_bpb:          1.000000")
