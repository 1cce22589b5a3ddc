"""Stub trainer: an early `---` block (e.g. a config dump), then the real final summary."""

print("---")
print("val_bpb: 9.999")
print("depth: 99")
print("step 00000 (50.0%) | loss 3.000000 | dt 10ms | tok/sec 1,000 | mfu 0.1% | remaining 1s")
print("some warning: not a number")
print("---")
print("val_bpb:          1.234567")
print("a stray line that is not an item")
print("peak_vram_mb:     512.0")
print("preset:           cpu")
print("depth:            4")
