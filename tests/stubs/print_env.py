"""Stub trainer: prints its environment as one JSON line, then a valid summary."""

import json
import os

print("ENV " + json.dumps(dict(os.environ)))
print("---")
print("val_bpb: 1.0")
