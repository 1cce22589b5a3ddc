"""Stub trainer: trains, then exits 0 without printing the summary block."""

print("step 00000 (50.0%) | loss 4.000000 | dt 10ms | tok/sec 1,000 | mfu 0.1% | remaining 1s")
print("step 00001 (100.0%) | loss 3.900000 | dt 10ms | tok/sec 1,000 | mfu 0.1% | remaining 0s")
print("done")
