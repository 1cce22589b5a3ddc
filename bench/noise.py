"""How noisy is val_bpb? Runs train.py again and again and prints a table of spreads.

    python bench/noise.py --out noise-cpu --preset cpu --budget 10 --seeds 3 --repeats 2
    python bench/noise.py --out noise-gpu --pycode --seeds 4 --repeats 2         # gpu, 300 s
    python bench/noise.py --out pair --train old.py --train train.py --seeds 4 --repeats 1
    python bench/noise.py --out pair2 --train old.py --train train.py --seeds 3 --first-seed 4

Each version (--train, default this repository's train.py) runs in a directory of its own
beside this repository's prepare.py, on the active prepared dataset (AUTORESEARCH_CACHE), with
AUTORESEARCH_SEED set as the session sets it (seed k = 1000 + k) and train.py's own evaluation.
Runs go in rounds: for each repeat, for each seed, every version in turn, so the runs that are
compared (same seed, other version) are next to each other in time.

The table (also written to OUT/noise.json with every run):
- same seed: the pooled standard deviation of the runs of one version with one seed (what the
  GPU's nondeterministic kernels and the time budget's last step do; 0 on a CPU whose steps
  all fit the same way);
- across seeds: the standard deviation over seeds of one version's first runs (initialisation
  and data order on top of the above);
- with two versions, paired: the standard deviation of B - A over the runs of one seed and
  repeat, against unpaired, sqrt(sd_A^2 + sd_B^2) over seeds (what the difference of two runs
  of different seeds spreads by), and the mean difference with its standard error both ways;
- num_steps per run, since a wall-clock budget ends at a different step from run to run, and
  tokens per training second (what a lever that makes runs repeatable costs in speed).

What it does not do: separate initialisation from data order (both follow the one seed), or
measure between calls of a GPU (run it in two calls and compare the JSON files).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autoresearch import noise, runner  # noqa: E402


def one_run(
    workdir: Path, log: Path, *, seed: int, preset: str, device: str, budget: float | None
) -> dict:
    extra = {"AUTORESEARCH_SEED": str(seed)}
    if budget:
        extra["AUTORESEARCH_TIME_BUDGET"] = str(budget)
    env = runner.child_env(dict(os.environ), preset=preset, device=device, gpu=None, extra=extra)
    result = runner.run_training(workdir, log, env=env, timeout=3600)
    return {
        "ok": result.ok,
        "val_bpb": result.summary.get("val_bpb"),
        "num_steps": result.summary.get("num_steps"),
        "training_s": result.summary.get("training_seconds"),
        "wall_s": round(result.wall_seconds, 1),
        "tok_per_s": tokens_per_second(result.summary),
    }


def tokens_per_second(summary: dict) -> float | None:
    """Training throughput of one run (what a determinism lever would cost)."""
    tokens, seconds = summary.get("total_tokens_M"), summary.get("training_seconds")
    return round(tokens * 1e6 / seconds) if tokens and seconds else None


def sd(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) >= 2 else None


def summarize(runs: list[dict], versions: list[str]) -> dict:
    ok = [r for r in runs if r["ok"] and r["val_bpb"] is not None]
    by: dict[tuple[str, int], list[float]] = {}
    for r in ok:
        by.setdefault((r["version"], r["seed"]), []).append(r["val_bpb"])
    out: dict = {"runs": len(runs), "ok": len(ok), "versions": {}}
    for v in versions:
        groups = [vals for (ver, _), vals in by.items() if ver == v]
        firsts = [vals[0] for vals in groups]
        steps = [r["num_steps"] for r in ok if r["version"] == v]
        rates = [r["tok_per_s"] for r in ok if r["version"] == v and r.get("tok_per_s")]
        out["versions"][v] = {
            "mean": statistics.fmean(firsts) if firsts else None,
            "same_seed_sd": noise.pooled_sigma(groups),
            "across_seeds_sd": sd(firsts),
            "seeds": len(groups),
            "steps_mean": statistics.fmean(steps) if steps else None,
            "steps_sd": sd(steps),
            "tok_per_s": statistics.fmean(rates) if rates else None,
        }
    if len(versions) == 2:
        a, b = versions
        keyed = {(r["version"], r["seed"], r["repeat"]): r["val_bpb"] for r in ok}
        diffs = [
            keyed[(b, s, k)] - keyed[(a, s, k)]
            for (v, s, k) in keyed
            if v == a and (b, s, k) in keyed
        ]
        va, vb = out["versions"][a], out["versions"][b]
        unpaired = None
        if va["across_seeds_sd"] is not None and vb["across_seeds_sd"] is not None:
            unpaired = math.hypot(va["across_seeds_sd"], vb["across_seeds_sd"])
        out["paired"] = {
            "pairs": len(diffs),
            "mean_difference": statistics.fmean(diffs) if diffs else None,
            "paired_sd": sd(diffs),
            "paired_se": sd(diffs) / math.sqrt(len(diffs)) if sd(diffs) is not None else None,
            "unpaired_sd": unpaired,
            "unpaired_se": unpaired / math.sqrt(len(diffs)) if unpaired and diffs else None,
        }
    return out


def fmt(x: float | None, digits: int = 5) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def print_table(summary: dict) -> None:
    print(f"\n{summary['ok']} of {summary['runs']} runs measured\n")
    print(
        "| version | seeds | mean val_bpb | same seed sd | across seeds sd | steps (sd) | tok/s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, v in summary["versions"].items():
        print(
            f"| {name} | {v['seeds']} | {fmt(v['mean'])} | {fmt(v['same_seed_sd'])} "
            f"| {fmt(v['across_seeds_sd'])} | {fmt(v['steps_mean'], 1)} ({fmt(v['steps_sd'], 1)}) "
            f"| {fmt(v['tok_per_s'], 0)} |"
        )
    p = summary.get("paired")
    if p:
        print(
            f"\nB - A over {p['pairs']} pairs: mean {fmt(p['mean_difference'])}; "
            f"paired sd {fmt(p['paired_sd'])} (se {fmt(p['paired_se'])}), "
            f"unpaired sd {fmt(p['unpaired_sd'])} (se {fmt(p['unpaired_se'])})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for logs and noise.json")
    parser.add_argument("--train", type=Path, action="append", help="a train.py (twice: paired)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 1000, 1001, ... (default 3)")
    parser.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="start at seed 1000 + this (more seeds in a later call)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="runs per seed (default 2)")
    parser.add_argument("--preset", choices=("gpu", "cpu"), default="gpu")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None)
    parser.add_argument("--budget", type=float, default=None, help="TIME_BUDGET override, seconds")
    parser.add_argument(
        "--pycode",
        action="store_true",
        help="first prepare (or reuse) bench/trainer.py's pycode corpus, as its figures use",
    )
    args = parser.parse_args()
    if args.pycode:
        from trainer import prepare_pycode  # bench/trainer.py, beside this file

        print(f"pycode corpus ready ({prepare_pycode():.0f} s)", flush=True)
    device = args.device or ("cuda" if args.preset == "gpu" else "cpu")
    trains = args.train or [ROOT / "train.py"]
    versions = [f"{chr(ord('A') + i)}:{path.name}" for i, path in enumerate(trains)]
    args.out.mkdir(parents=True, exist_ok=True)
    dirs = []
    for name, path in zip(versions, trains, strict=True):
        d = args.out / "versions" / name.replace(":", "_")
        d.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, d / "train.py")
        shutil.copyfile(ROOT / "prepare.py", d / "prepare.py")
        dirs.append(d)
    runs = []
    for repeat in range(args.repeats):
        for k in range(args.seeds):
            seed = noise.seed_of(args.first_seed + k)
            for name, d in zip(versions, dirs, strict=True):
                log = args.out / "logs" / f"{name.replace(':', '_')}-s{seed}-r{repeat}.log"
                log.parent.mkdir(exist_ok=True)
                row = one_run(
                    d, log, seed=seed, preset=args.preset, device=device, budget=args.budget
                )
                row.update(version=name, seed=seed, repeat=repeat)
                runs.append(row)
                print(
                    f"{name} seed {seed} repeat {repeat}: val_bpb {fmt(row['val_bpb'], 6)}, "
                    f"{row['num_steps']} steps, {row['wall_s']} s",
                    flush=True,
                )
                save(args, trains, runs)  # after every run: a long call killed keeps its runs
    summary = summarize(runs, versions)
    save(args, trains, runs, summary)
    print_table(summary)


def save(args: argparse.Namespace, trains: list[Path], runs: list[dict], summary=None) -> None:
    from trainer import card  # bench/trainer.py: python, torch, card and driver

    settings = {**vars(args), "out": str(args.out), "train": [str(t) for t in trains]}
    data = {"args": settings, "machine": card(), "runs": runs, "summary": summary}
    (args.out / "noise.json").write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
