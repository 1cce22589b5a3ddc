"""Stub trainer: dies from SIGKILL, as under the kernel's OOM killer."""

import os
import signal

print("step 00000 (10.0%) | loss 5.000000 | dt 10ms | tok/sec 1,000 | mfu 0.1% | remaining 9s")
os.kill(os.getpid(), signal.SIGKILL)
