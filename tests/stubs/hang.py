"""Stub trainer: prints one line, then hangs without output (a stall)."""

import threading

print("step 00000 (10.0%) | loss 5.000000 | dt 10ms | tok/sec 1,000 | mfu 0.1% | remaining 9s")
threading.Event().wait()
