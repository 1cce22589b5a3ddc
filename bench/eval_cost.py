"""What the sealed evaluation costs, against scoring the same checkpoint in one process.

    python bench/eval_cost.py --checkpoint model.pt --device cuda --runs 2
    python bench/eval_cost.py --checkpoint model.pt --device cuda --box   # the box too

Run in a workspace (train.py, prepare.py, the active dataset); the checkpoint is one a run of
train.py saved (AUTORESEARCH_CHECKPOINT). Each way of scoring runs in a fresh process, in turn,
`--runs` times:

- in-process: `prepare.evaluate_bpb` on `train.load_model(checkpoint)`, the model's logits
  handed straight to the loss (upstream's way, and this project's before the sealed evaluator);
- sealed: `python -m autoresearch.sealed_eval`, cold (not started ahead): the model runs in a
  process of its own that writes float32 logits into a shared buffer in host memory, the
  evaluator copies them out, checks them and computes the loss; a second model process
  re-computes PROBED_BATCHES batches for the causality probe;
- sealed, boxed (`--box`): the same with the model processes in the box.

For each: the process's wall time, the evaluator's own figures (start-up, loading, scoring),
the tokens scored, tokens per second of scoring, and val_bpb (the same checkpoint, so the same
figure up to float noise). Prints a table; `--out` writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from autoresearch.sealed_eval import BATCH_SIZE

# the in-process way: imports, the model, then evaluate_bpb timed on its own
IN_PROCESS = """
import json, sys, time
t0 = time.perf_counter()
import torch, prepare, train
device = torch.device(sys.argv[2])
model = train.load_model(sys.argv[1], device)
loaded = time.perf_counter()
bpb = prepare.evaluate_bpb(model, int(sys.argv[3]), device)
if device.type == "cuda":
    torch.cuda.synchronize()
done = time.perf_counter()
print(json.dumps({"status": "ok", "val_bpb": bpb, "load_seconds": loaded - t0,
                  "seconds": done - loaded}))
"""


def _last_json(text: str) -> dict:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise SystemExit(f"no result line in:\n{text[-2000:]}")


def score(how: str, checkpoint: Path, device: str, preset: str, batch: int) -> dict:
    """One scoring of `checkpoint` in a fresh process: its result line, with the wall time."""
    if how == "in-process":
        command = [sys.executable, "-c", IN_PROCESS, str(checkpoint), device, str(batch)]
    else:
        command = [sys.executable, "-m", "autoresearch.sealed_eval", "--workspace", "."]
        command += ["--checkpoint", str(checkpoint), "--preset", preset, "--device", device]
        command += ["--batch-size", str(batch)] + (["--box"] if how == "sealed, boxed" else [])
    env = {**os.environ, "AUTORESEARCH_PRESET": preset}
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(
            f"{how} exited {proc.returncode}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        )
    result = _last_json(proc.stdout)
    result["wall_s"] = wall
    result["how"] = how
    return result


def scored_tokens(preset: str) -> int:
    """The target tokens evaluate_bpb scores on the active dataset's val split (the same for
    every way: EVAL_TOKENS, or the whole split where it is shorter)."""
    code = (
        "import prepare\n"
        "d = prepare.active_dataset_dir()\n"
        "t = prepare._tokens(d / prepare._split_entry(d, 'val')['shards'][0]['file'])\n"
        "print(min(prepare.EVAL_TOKENS // prepare.MAX_SEQ_LEN, (len(t) - 1) // prepare.MAX_SEQ_LEN)"
        " * prepare.MAX_SEQ_LEN)"
    )
    env = {**os.environ, "AUTORESEARCH_PRESET": preset}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-2000:])
    return int(out.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default=None, help="default: gpu on cuda, else cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="the sealed evaluator's")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--box", action="store_true", help="also the sealed evaluation boxed")
    parser.add_argument("--out", type=Path, help="the rows as JSON")
    args = parser.parse_args()
    preset = args.preset or ("gpu" if args.device.startswith("cuda") else "cpu")
    batch = args.batch_size or BATCH_SIZE[preset]
    ways = ["in-process", "sealed"] + (["sealed, boxed"] if args.box else [])
    tokens = scored_tokens(preset)
    rows = []
    for _ in range(args.runs):
        for how in ways:  # in turn, so a drift of the machine hits every way alike
            rows.append(score(how, args.checkpoint.resolve(), args.device, preset, batch))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{tokens:,} tokens scored, batch {batch} rows, preset {preset}, device {args.device}")
    print(f"{'how':<14} {'wall s':>8} {'start-up s':>10} {'load s':>8} {'scoring s':>10} "
          f"{'tok/s':>12} {'val_bpb':>10}")  # fmt: skip
    for how in ways:
        mine = [r for r in rows if r["how"] == how]
        wall = statistics.median(r["wall_s"] for r in mine)
        seconds = statistics.median(r["seconds"] for r in mine)
        startup = statistics.median(r.get("startup_seconds", 0.0) for r in mine)
        load = statistics.median(r.get("load_seconds", 0.0) for r in mine)
        bpb = statistics.median(r["val_bpb"] for r in mine)
        print(f"{how:<14} {wall:>8.1f} {startup:>10.1f} {load:>8.1f} {seconds:>10.1f} "
              f"{tokens / seconds:>12,.0f} {bpb:>10.6f}")  # fmt: skip
    print(f"(medians of {args.runs} run(s) each)")
    if args.out:
        args.out.write_text(json.dumps({"tokens": tokens, "batch": batch, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
