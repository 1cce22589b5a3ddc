"""Stub trainer: says which heavy modules were imported before its first line, how it was
run, and its environment; then a valid summary. Exits with the code in STUB_EXIT, if set."""

import sys

PRELOADED = sorted(name for name in ("json", "numpy", "torch") if name in sys.modules)

import json  # noqa: E402
import os  # noqa: E402

print("PRELOADED " + json.dumps(PRELOADED))
print("RUN " + json.dumps({"name": __name__, "argv": sys.argv, "stdin": sys.stdin.read()}))
print("ENV " + json.dumps(dict(os.environ)))
print("---")
print("val_bpb: 1.0")
sys.exit(int(os.environ.get("STUB_EXIT", "0")))
