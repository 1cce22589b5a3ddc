"""Stub trainer: the loss becomes NaN; the script says so and exits 3."""

import sys

print("step 00000 (10.0%) | loss 5.000000 | dt 10ms | tok/sec 1,000 | mfu 0.1% | remaining 9s")
print("step 00001 (20.0%) | loss nan | dt 10ms | tok/sec 1,000 | mfu 0.1% | remaining 8s")
print("FAIL: loss is NaN, training diverged")
sys.exit(3)
