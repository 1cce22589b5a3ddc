"""How fast prepare.make_dataloader produces batches, alone (no model).

The loader must never starve the GPU: an H100 consumes ~2M tokens/s on the gpu preset, so the
target is >= 10M tokens/s (5x that) at batch 64 x 2048 on the CPU side.

    python bench/loader_throughput.py                  # uses the active prepared dataset
    python bench/loader_throughput.py --device cuda    # includes pinned copies to the GPU

Needs a prepared dataset (`autoresearch prepare --source stdlib` is enough).  Prints one
`key: value` line per measurement.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # prepare.py is a top-level file

import prepare  # noqa: E402


def measure(batch_size: int, seq_len: int, device: str, seconds: float, prefetch: int | None):
    """Tokens per second over `seconds`, after one warm-up batch."""
    loader = prepare.make_dataloader(batch_size, seq_len, device=device, prefetch=prefetch)
    next(loader)
    batches, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        x, y, _ = next(loader)
        batches += 1
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    return batches * batch_size * seq_len / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--target", type=float, default=10e6, help="tokens/s to pass")
    args = parser.parse_args()
    try:
        manifest = prepare.load_manifest()
    except prepare.PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"dataset: {manifest['name']} ({manifest['splits']['train']['tokens']:,} train tokens)")
    print(f"batch: {args.batch_size} x {args.seq_len} on {args.device}")
    worst = float("inf")
    for prefetch in (0, 2):
        rate = measure(args.batch_size, args.seq_len, args.device, args.seconds, prefetch)
        worst = min(worst, rate)
        print(f"tokens_per_second_prefetch_{prefetch}: {rate:,.0f}")
    print(f"target: {args.target:,.0f} {'ok' if worst >= args.target else 'TOO SLOW'}")
    return 0 if worst >= args.target else 1


if __name__ == "__main__":
    sys.exit(main())
