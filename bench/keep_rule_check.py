"""The keep rule on a real session (CPU): known-good and known-neutral candidates, replayed.

    AUTORESEARCH_CACHE=... python bench/keep_rule_check.py --out check

The baseline is a small cpu-preset train.py (depth 2, width 64, 2^11 tokens a step) with one
constant detuned: UNEMBEDDING_LR 0.004 -> 0.0004. The default TIME_BUDGET, 0.01 s, is shorter
than one step, so every run trains exactly two steps (step 0 is untimed): on a CPU the same
seed then gives the same val_bpb to the last bit, whatever the machine's load, and what
varies is only what the seed does. (With a wall-clock budget of seconds on a busy two-core
machine the step count itself varied from 2 to 4 between runs, and moved val_bpb by ~0.1 a
step: that noise is the clock's, bench/LOG.md.) The `replay` agent then proposes, in
this order:

1. neutral: `rotate` renamed `apply_rotary` (the same computation);
2. good: UNEMBEDDING_LR back to 0.004 (its gain is measured beforehand with bench/noise.py
   over 10 seeds, bench/LOG.md);
3. neutral: the rotary halves taken with `split` instead of two slices (same values);
4. neutral: rms_norm's shape from `x.shape[-1:]` instead of `(x.size(-1),)`.

A session runs them with `autoresearch run --agent replay` (sealed, as a user would run it;
--calibrate 2 and --max-repeats 3 unless given). The rule passes the check when it keeps the
good candidate and none of the neutral ones. Printed as a table and written to
OUT/check.json (with every experiment's runs, seeds, paired gains and verdict).

What it does not show: the rule's error rates (one session is one draw; bench/keep_rule.py
simulates many), or anything about the gpu preset.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autoresearch.workspace import init_workspace  # noqa: E402

TAG = "check"
SMALL = [  # the cpu preset made small enough for a busy two-core machine
    ("CPU_DEPTH = 3\n", "CPU_DEPTH = 2\n"),
    ("CPU_ASPECT_RATIO = 40 ", "CPU_ASPECT_RATIO = 32 "),
    ("CPU_TOTAL_BATCH_SIZE = 2**12 ", "CPU_TOTAL_BATCH_SIZE = 2**11 "),
    ("CPU_DEVICE_BATCH_SIZE = 16 ", "CPU_DEVICE_BATCH_SIZE = 8 "),
]
DETUNE = ("UNEMBEDDING_LR = 0.004 ", "UNEMBEDDING_LR = 0.0004 ")
DETUNED_LINE = tuple(  # the whole line, as a reply's SEARCH block needs it
    f"{value}  # AdamW, lm_head (same width scaling)"
    for value in ("UNEMBEDDING_LR = 0.004", "UNEMBEDDING_LR = 0.0004")
)
CANDIDATES = [  # (kind, description, [(search, replace), ...]) against the best at the time
    (
        "neutral",
        "rename rotate to apply_rotary",
        [
            (
                "def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:",
                "def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:",
            ),
            (
                "        q = rotate(norm(q), cos, sin).to(v.dtype)",
                "        q = apply_rotary(norm(q), cos, sin).to(v.dtype)",
            ),
            (
                "        k = rotate(norm(k), cos, sin).to(v.dtype)",
                "        k = apply_rotary(norm(k), cos, sin).to(v.dtype)",
            ),
        ],
    ),
    ("good", "UNEMBEDDING_LR back to 0.004", [(DETUNED_LINE[1], DETUNED_LINE[0])]),
    (
        "neutral",
        "rotary halves with split",
        [("    x1, x2 = x[..., :half], x[..., half:]", "    x1, x2 = x.split(half, dim=-1)")],
    ),
    (
        "neutral",
        "rms_norm shape from x.shape",
        [("    return F.rms_norm(x, (x.size(-1),))", "    return F.rms_norm(x, x.shape[-1:])")],
    ),
]


def edit(source: str, pairs: list[tuple[str, str]]) -> str:
    for old, new in pairs:
        if source.count(old) != 1:
            raise SystemExit(
                f"train.py no longer has exactly one {old.strip()!r}: update the check"
            )
        source = source.replace(old, new)
    return source


def reply(description: str, pairs: list[tuple[str, str]]) -> str:
    blocks = "".join(
        f"train.py\n```python\n<<<<<<< SEARCH\n{old}\n=======\n{new}\n>>>>>>> REPLACE\n```\n"
        for old, new in pairs
    )
    return f"{description}\n\n{blocks}"


def baseline_source() -> str:
    return edit((ROOT / "train.py").read_text(encoding="utf-8"), [*SMALL, DETUNE])


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def run_check(
    out: Path, *, budget: float, calibrate: int, max_repeats: int, count: int | None = None
) -> dict:
    """Build the workspace, replay the first `count` candidates (all by default) in a
    session, return the outcome."""
    candidates = CANDIDATES[:count]
    ws = init_workspace(out / "ws")
    (ws / "train.py").write_text(baseline_source(), encoding="utf-8")
    git(ws, "add", "train.py")
    git(ws, "-c", "user.name=check", "-c", "user.email=check@localhost", "commit", "-qm", "detuned")
    patches = out / "replies"
    patches.mkdir(parents=True, exist_ok=True)
    for i, (_, description, pairs) in enumerate(candidates, start=1):
        (patches / f"{i}.txt").write_text(reply(description, pairs), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env["AUTORESEARCH_TIME_BUDGET"] = f"{budget:g}"
    command = [
        sys.executable, "-m", "autoresearch", "run", "--tag", TAG, "--agent", "replay",
        "--patches", str(patches), "--preset", "cpu", "--device", "cpu",
        "--calibrate", str(calibrate), "--max-repeats", str(max_repeats), "--quiet",
        "--timeout", "900",  # a busy machine may take minutes to import and load
        "--workspace", str(ws),
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=ws, env=env, capture_output=True, text=True)
    (out / "session.log").write_text(proc.stdout + proc.stderr, encoding="utf-8")
    if proc.returncode != 0:
        raise SystemExit(f"the session failed (exit {proc.returncode}): see {out / 'session.log'}")
    records = [
        json.loads(line)
        for line in (ws / "runs" / TAG / "experiments.jsonl").read_text().splitlines()
    ]
    rows = []
    for (kind, description, _), rec in zip(candidates, records[1:], strict=True):
        extra = rec["extra"]
        rows.append(
            {
                "id": rec["id"],
                "kind": kind,
                "description": description,
                "status": rec["status"],
                "verdict": extra.get("verdict"),
                "runs": extra.get("runs"),
                "seeds": extra.get("seeds"),
                "paired_gains": extra.get("paired_gains"),
                "paired_sigma": extra.get("paired_sigma"),
                "num_steps": rec["metrics"].get("num_steps"),
            }
        )
    passed = all((r["status"] == "keep") == (r["kind"] == "good") for r in rows)
    baseline = records[0]
    return {
        "budget": budget,
        "calibrate": calibrate,
        "max_repeats": max_repeats,
        "baseline": {"runs": baseline["extra"]["runs"], "sigma": baseline["extra"]["sigma"]},
        "candidates": rows,
        "passed": passed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--budget", type=float, default=0.01, help="TIME_BUDGET, seconds (default: two steps)"
    )
    parser.add_argument("--calibrate", type=int, default=2)
    parser.add_argument("--max-repeats", type=int, default=3)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result = run_check(
        args.out, budget=args.budget, calibrate=args.calibrate, max_repeats=args.max_repeats
    )
    (args.out / "check.json").write_text(json.dumps(result, indent=1))
    print(f"baseline runs {result['baseline']['runs']}, sigma {result['baseline']['sigma']}")
    print("| exp | kind | description | status | verdict | paired gains | seeds |")
    print("|---:|---|---|---|---|---|---|")
    for r in result["candidates"]:
        gains = ", ".join(f"{g:+.4f}" for g in r["paired_gains"] or [])
        print(
            f"| {r['id']} | {r['kind']} | {r['description']} | {r['status']} | {r['verdict']} "
            f"| {gains} | {r['seeds']} |"
        )
    print(
        "passed"
        if result["passed"]
        else "FAILED: the rule kept a neutral change or missed the good one"
    )


if __name__ == "__main__":
    main()
