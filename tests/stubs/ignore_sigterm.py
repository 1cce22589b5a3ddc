"""Stub trainer: ignores SIGTERM and keeps printing, so only SIGKILL ends it."""

import signal
import time

signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ignoring SIGTERM", flush=True)
while True:
    print("still here", flush=True)
    time.sleep(0.05)
