"""Scale-out benchmark: experiments per hour with `--workers N` against `--workers 1`, the same
scripted agent and the same number of experiments.

    python bench/scale_out.py                                 # 1 and 2 workers, 8 experiments
    python bench/scale_out.py --workers 1 2 4 --experiments 12
    python bench/scale_out.py --train spin --seconds 8        # runs that burn CPU, not sleep
    python bench/scale_out.py --good-every 5                  # 1 edit in 5 gains (fewer keeps)

Per worker count it creates a fresh workspace in a temporary directory whose train.py is a
stub trainer (train.py's output contract, three step lines) that either sleeps `--seconds`
(`--train sleep`: a stand-in for a GPU run, each slot its own card, the host idle) or burns
`--seconds` of CPU time (`--train spin`: what the cpu preset does, slots competing for the
host's cores). Its val_bpb is a smooth function of two constants, A and B. A fake
OpenAI-compatible endpoint (tests/fakellm.py) answers every request after `--reply-delay`
seconds with an edit that scales A or B (alternately, two lines apart, so an edit made on an
older best still merges onto the new one). Then

    autoresearch run --agent openai --max-experiments N --workers W --calibrate 1
                     --max-repeats 1 --preset cpu --device cpu        (unsealed: a stub)

Reported per worker count: the session's wall time from launch to exit, and experiments per
hour over the span from the baseline's record to the last record (start-up excluded), with
the statuses recorded. Numbers depend on the host's load: say what else ran.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # fakellm: the same fake endpoint the tests use

from fakellm import FakeLLM  # noqa: E402

TAG = "scale"
KNOBS = ("A", "B")
FACTORS = (0.9, 1.1, 0.8, 1.2, 0.95, 1.05, 0.85, 1.15)

STUB = '''\
"""Stub trainer for bench/scale_out.py: the output contract, val_bpb from A and B."""
import time

A = 0.5  # knob one
WAIT = {wait!r}  # seconds per step
SPIN = {spin!r}  # burn CPU instead of sleeping
STEPS = 3  # step lines printed (two unchanged lines between A and B: their edits merge)
B = 0.5  # knob two


def main():
    for i in range(STEPS):
        if SPIN:
            end = time.process_time() + WAIT
            while time.process_time() < end:
                pass
        else:
            time.sleep(WAIT)
        print(f"step {{i:05d}} ({{(i + 1) * 33.3:.1f}}%) | loss {{5 - i:.6f}} | dt 10ms | "
              f"tok/sec 1,000 | mfu 0.0% | remaining {{2 - i}}s", flush=True)
    val = 1.0 + (A - 0.3) ** 2 + (B - 0.3) ** 2
    print("---")
    print(f"val_bpb:          {{val:.6f}}")
    print("training_seconds: 0.1")
    print("total_seconds:    0.2")
    print("peak_vram_mb:     0.0")
    print("mfu_percent:      0.00")
    print("total_tokens_M:   0.1")
    print("num_steps:        3")
    print("num_params_M:     0.1")
    print("depth:            1")


if __name__ == "__main__":
    main()
'''


def edit_reply(train_py: str, n: int, good_every: int = 0) -> str:
    """The n-th reply: scale knob A or B (alternately) by the next factor; with `good_every`
    K, only every K-th reply moves its knob towards the optimum (a gain), the others away."""
    knob = KNOBS[n % 2]
    match = re.search(rf"^{knob} = ([0-9.eE+-]+)(.*)$", train_py, re.M)
    if match is None:
        raise ValueError(f"train.py assigns no {knob}")
    factor = FACTORS[(n // 2) % len(FACTORS)]
    if good_every:  # A and B start at 0.5, the optimum is 0.3: smaller is better
        factor = 0.9 if n % good_every == 0 else 1.0 + 0.01 * (5 + n % 37)
    new = float(f"{float(match[1]) * factor:.5g}")
    return (
        f"Scale {knob} by {factor:g} ({match[1]} -> {new!r})\n\n"
        "train.py\n```python\n<<<<<<< SEARCH\n"
        f"{match[0]}\n=======\n{knob} = {new!r}{match[2]}\n>>>>>>> REPLACE\n```\n"
    )


def train_py_of(request: dict) -> str:
    for message in request.get("messages", []):
        content = message.get("content")
        if message.get("role") == "user" and isinstance(content, str):
            if re.search(r"^A = ", content, re.M):
                return content
    return ""


def cli_env(cache: Path) -> dict[str, str]:
    drop = ("OPENAI_", "AUTORESEARCH_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["AUTORESEARCH_CACHE"] = str(cache)
    env["AUTORESEARCH_SEALED"] = "0"  # the stub prints val_bpb and saves no checkpoint
    return env


def session(workers: int, args: argparse.Namespace, tmp: Path) -> dict:
    """One session with `workers` slots in a fresh workspace; returns what was measured."""
    cache = tmp / f"cache-{workers}"
    (cache / "stub").mkdir(parents=True)
    (cache / "stub" / "manifest.json").write_text(json.dumps({"source": "stub"}))
    (cache / "ACTIVE").write_text("stub\n")
    env = cli_env(cache)
    ws = tmp / f"ws-{workers}"
    subprocess.run([sys.executable, "-m", "autoresearch", "init", str(ws)], env=env, check=True)
    stub = STUB.format(wait=args.seconds / 3, spin=args.train == "spin")
    (ws / "train.py").write_text(stub, encoding="utf-8")
    for git in (["add", "train.py"], ["commit", "-qm", "stub trainer"]):
        subprocess.run(
            ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", *git],
            cwd=ws,
            check=True,
        )
    counter = itertools.count()
    with FakeLLM(model="fake") as server:
        server.respond_with(
            lambda body: edit_reply(train_py_of(body), next(counter), args.good_every),
            delay=args.reply_delay,
        )
        command = [
            *(sys.executable, "-m", "autoresearch", "run", "--tag", TAG),
            *("--agent", "openai", "--base-url", server.base_url, "--model", "fake"),
            *("--max-experiments", str(args.experiments), "--workers", str(workers)),
            *("--calibrate", "1", "--max-repeats", "1", "--preset", "cpu", "--device", "cpu"),
            *("--workspace", str(ws)),
        ]
        began = time.monotonic()
        proc = subprocess.run(
            command, cwd=ws, env={**env, "OPENAI_API_KEY": "sk-bench"}, capture_output=True
        )
        wall = time.monotonic() - began
    (args.out / f"workers-{workers}.log").write_bytes(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"session with {workers} worker(s) failed: see {args.out}")
    path = ws / "runs" / TAG / "experiments.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    ended = [datetime.fromisoformat(r["ended_at"]) for r in records]
    span = (max(ended) - ended[0]).total_seconds()
    statuses: dict[str, int] = {}
    for r in records:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    after = len(records) - 1  # the experiments recorded after the baseline
    return {
        "workers": workers,
        "experiments": len(records),
        "wall_s": round(wall, 1),
        "span_s": round(span, 1),
        "per_hour": round(after / span * 3600, 1) if span > 0 else None,
        "statuses": statuses,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--experiments", type=int, default=8, help="--max-experiments")
    parser.add_argument("--train", choices=("sleep", "spin"), default="sleep")
    parser.add_argument("--seconds", type=float, default=6.0, help="per training run")
    parser.add_argument("--reply-delay", type=float, default=1.0, help="seconds per reply")
    parser.add_argument(
        "--good-every", type=int, default=0, help="only every K-th edit is a gain (0: about half)"
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results/scale_out"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="autoresearch-scale-") as tmp:
        for workers in args.workers:
            results.append(session(workers, args, Path(tmp)))
            print(json.dumps(results[-1]), flush=True)
    one = next((r["per_hour"] for r in results if r["workers"] == 1), None)
    print(
        f"\n{'workers':>7} {'exps':>5} {'wall s':>7} {'span s':>7} {'exp/h':>7} {'x1':>5}  statuses"
    )
    for r in results:
        ratio = f"{r['per_hour'] / one:.2f}" if one and r["per_hour"] else "—"
        print(
            f"{r['workers']:>7} {r['experiments']:>5} {r['wall_s']:>7} {r['span_s']:>7} "
            f"{r['per_hour']:>7} {ratio:>5}  {r['statuses']}"
        )
    settings = {k: str(v) for k, v in vars(args).items()}
    (args.out / "scale_out.json").write_text(json.dumps({"args": settings, "results": results}))


if __name__ == "__main__":
    main()
