"""Stub trainer: keeps printing step lines and never finishes (runs past any timeout)."""

import time

step = 0
while True:
    print(
        f"step {step:05d} (1.0%) | loss 5.000000 | dt 50ms | tok/sec 1,000 | mfu 0.1% | remaining 99s"
    )
    step += 1
    time.sleep(0.05)
