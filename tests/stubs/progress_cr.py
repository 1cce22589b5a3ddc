"""Stub trainer: upstream-style progress, rewritten in place with \r and no newline."""

import sys

for step in range(3):
    sys.stdout.write(
        f"\rstep {step:05d} ({(step + 1) / 3 * 100:.1f}%) | loss: {4.0 - step:.6f} | lrm: 1.00"
        f" | dt: 10ms | tok/sec: 1,000 | mfu: 0.1% | epoch: 1 | remaining: {2 - step}s    "
    )
    sys.stdout.flush()
print()
print("---")
print("val_bpb:          1.100000")
print("peak_vram_mb:     0.0")
