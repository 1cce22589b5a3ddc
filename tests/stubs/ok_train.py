"""Stub trainer: a well-behaved run that follows train.py's output contract."""

VAL_BPB = 1.0  # the result this "training" reports; edits to this line change the outcome

for step in range(3):
    print(
        f"step {step:05d} ({(step + 1) / 3 * 100:.1f}%) | loss {5.0 - step:.6f} | dt 812ms"
        f" | tok/sec 20,123 | mfu 1.2% | remaining {2 - step}s"
    )
print("---")
print(f"val_bpb:          {VAL_BPB:.6f}")
print("training_seconds: 1.5")
print("total_seconds:    2.0")
print("peak_vram_mb:     2048.0")
print("mfu_percent:      1.20")
print("total_tokens_M:   0.1")
print("num_steps:        3")
print("num_params_M:     0.5")
print("depth:            2")
