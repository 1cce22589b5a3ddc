"""Stub trainer: starts grandchildren that would outlive it, then exits or hangs.

Usage: spawn_children.py PID_FILE exit|hang
Starts one `sleep` in its own process group (inheriting stdout, so it holds the pipe open),
one with its output on /dev/null, and one that moves to a new session (setsid). Their pids go
to PID_FILE, one per line, before the script goes on.
"""

import subprocess
import sys
import threading

pid_file, mode = sys.argv[1], sys.argv[2]
children = [
    subprocess.Popen(["sleep", "1000"]),
    subprocess.Popen(["sleep", "1000"], stdout=subprocess.DEVNULL),
    subprocess.Popen(["sleep", "1000"], start_new_session=True),
]
with open(pid_file, "w") as out:
    out.write("".join(f"{child.pid}\n" for child in children))
print("step 00000 (100.0%) | loss 3.000000 | dt 10ms | tok/sec 1,000 | mfu 0.1% | remaining 0s")
if mode == "hang":
    threading.Event().wait()
print("---")
print("val_bpb: 1.5")
