"""The GPU benchmark protocol for train.py: prepare the `pycode` corpus, train, print a table.

    python bench/trainer.py --runs 2                 # the protocol (gpu preset, 300 s each)
    python bench/trainer.py --runs 1 --budget 60     # a shorter smoke run (not comparable)
    python bench/trainer.py --train old.py --train train.py --budget 90   # versions side by side
    python bench/trainer.py --train a.py --train b.py --gpus 2            # ... one per GPU at once
    python bench/trainer.py --train train.py --variant bs18:TOTAL_BATCH_SIZE=2**18 --gpus 2

The `pycode` corpus is every .py file under this Python's site-packages, walked in sorted
order; validation is every file under networkx/ (held out whole); train is capped at 800 MB
and cut into documents of about 8,000 characters. It is prepared once into the cache
(AUTORESEARCH_CACHE) and reused.

Per run it measures, from the outside: startup (launch to the first step line), compile (the
first step's dt: step 0 compiles the model and the optimizer steps), the steady-state tok/s
and MFU (median over step lines after the first 10% of the budget),
training seconds, evaluation (last step line to the summary), and the total wall time.
Results are printed as a table and written as JSON to --out.

With --doc-eval, each run also saves its checkpoint, and bench/doc_eval.py scores it the way
upstream autoresearch scores val_bpb (BOS-aligned rows of packed documents) beside this
project's metric, on the same weights: the doc_bpb and stream_bpb columns.

Each version (--train, default ./train.py) runs in a directory of its own beside this
repository's prepare.py, with a compile cache of its own (TORCHINDUCTOR_CACHE_DIR) that starts
empty: its first run is cold, later runs are warm, and the table says which (--shared-cache
gives all versions one cache, for versions whose compiled graphs are the same, such as seeds of
one file: then only the call's first run is cold). Versions are run
in turn (A B A B ...), so a drift of the machine over the call does not favour one of them.
A --variant NAME:CONST=TEXT[,CONST=TEXT...] is this repository's train.py with the values of those
module-level constants replaced by the texts, so a sweep of constants needs no files. TIME_BUDGET
(prepare.py's) may be set there too: that version alone trains for that many seconds, so
versions can be compared at equal tokens (`--variant long:TIME_BUDGET=306`).

With --gpus N, N runs go at once, each on a GPU of its own (CUDA_VISIBLE_DEVICES): run r
(from 0) of the v-th version on GPU (v + r) mod N, so each version meets min(runs, N) cards.
Each version keeps one compile cache per GPU, so its first run on a GPU is cold and only later
runs there are warm. Same-model cards of one host differ by up to ~3 % in tok/s: compare
val_bpb across them freely, and tok/s with the GPU column in view. A last table gives each
version's mean and range over its runs.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import re
import shutil
import site
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autoresearch import runner  # noqa: E402

PYCODE = {
    "include": ["*.py"],
    "val_include": ["networkx/**"],
    "max_train_bytes": 800_000_000,
    "doc_chars": 8000,
}


def prepare_pycode() -> float:
    """Prepare (or reuse) the pycode corpus; returns the seconds it took."""
    import prepare

    started = time.monotonic()
    prepare.run_prepare(f"files:{site.getsitepackages()[0]}", **PYCODE)
    return time.monotonic() - started


def card() -> dict:
    info = {"python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["card"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        info["driver"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()[0]  # one line per card; the cards of one host share a driver
    except (OSError, subprocess.CalledProcessError, IndexError):
        info["driver"] = "n/a"
    return info


def one_run(
    workdir: Path,
    log_path: Path,
    budget: float | None,
    compile_cache: Path,
    doc_eval: bool,
    gpu: str | None = None,
) -> dict:
    stamps: list[tuple[float, str]] = []
    cold = not any(compile_cache.iterdir()) if compile_cache.is_dir() else True
    extra = {"TORCHINDUCTOR_CACHE_DIR": str(compile_cache)}
    if budget:
        extra["AUTORESEARCH_TIME_BUDGET"] = str(budget)
    checkpoint = log_path.with_suffix(".pt")  # runs of one version may go at once
    if doc_eval:
        checkpoint.unlink(missing_ok=True)
        extra["AUTORESEARCH_CHECKPOINT"] = str(checkpoint)
    env = runner.child_env(dict(os.environ), preset="gpu", device="cuda", gpu=gpu, extra=extra)
    started = time.monotonic()
    result = runner.run_training(
        workdir,
        log_path,
        env=env,
        timeout=3600,
        on_line=lambda line: stamps.append((time.monotonic() - started, line)),
    )
    steps = [(t, runner.parse_step(line)) for t, line in stamps]
    steps = [(t, s) for t, s in steps if s is not None]
    summary_at = next((t for t, line in stamps if line.strip() == "---"), None)
    steady = [s for _, s in steps if s.pct >= 10.0]
    row = {
        "cache": "cold" if cold else "warm",
        "ok": result.ok,
        "crash_class": result.crash_class,
        "val_bpb": result.summary.get("val_bpb"),
        "num_steps": result.summary.get("num_steps"),
        "training_s": result.summary.get("training_seconds"),
        "mfu_percent": result.summary.get("mfu_percent"),
        "tok_per_s": statistics.median(s.tok_per_sec for s in steady) if steady else None,
        "steady_mfu": statistics.median(s.mfu for s in steady) if steady else None,
        "startup_s": steps[0][0] if steps else None,
        # step 0 compiles the model and the optimizer steps: its dt is the compile time
        "compile_s": steps[0][1].dt_ms / 1000 if steps and steps[0][1].step == 0 else None,
        "eval_s": summary_at - steps[-1][0] if steps and summary_at else None,
        "total_s": result.wall_seconds,
        "peak_vram_mb": result.summary.get("peak_vram_mb"),
        "gpu": gpu,
    }
    if row["training_s"] is not None:
        row["outside_s"] = row["total_s"] - row["training_s"]
    if doc_eval and checkpoint.is_file():
        row.update(score_both_ways(workdir, checkpoint, env, log_path.with_suffix(".doc.log")))
        checkpoint.unlink()
    return row


def score_both_ways(workdir: Path, checkpoint: Path, env: dict, log_path: Path) -> dict:
    """bench/doc_eval.py on the run's checkpoint: {"doc_bpb": ..., "stream_bpb": ...}."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "doc_eval.py"), "--checkpoint", str(checkpoint)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    log_path.write_text(proc.stdout + proc.stderr)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        print(f"doc_eval failed (exit {proc.returncode}); see {log_path}", flush=True)
        return {}
    scores = json.loads(lines[-1])
    return {"doc_bpb": scores["doc_bpb"], "stream_bpb": scores["stream_bpb"]}


def value_span(source: str, const: str) -> tuple[int, int] | None:
    """Byte offsets in `source` (UTF-8) of the value of `const`, if a module-level statement
    `CONST = value` assigns it once."""
    values = [
        stmt.value
        for stmt in ast.parse(source).body
        if isinstance(stmt, ast.Assign)
        and [getattr(t, "id", None) for t in stmt.targets] == [const]
    ]
    if len(values) != 1:
        return None
    line_starts = [0]
    for line in source.encode().splitlines(keepends=True):
        line_starts.append(line_starts[-1] + len(line))
    value = values[0]
    assert value.end_lineno is not None and value.end_col_offset is not None
    start = line_starts[value.lineno - 1] + value.col_offset  # ast columns count UTF-8 bytes
    return start, line_starts[value.end_lineno - 1] + value.end_col_offset


def variant(spec: str, source: str) -> tuple[str, str, float | None]:
    """--variant NAME:CONST=TEXT[,CONST=TEXT...]: (NAME, `source` with the value of each CONST
    replaced by its TEXT, the version's TIME_BUDGET if set, else None). A TEXT may hold commas,
    as in a tuple. TIME_BUDGET is prepare.py's, so it is passed to the run, not written."""
    name, _, settings = spec.partition(":")
    if not name or not settings:
        raise SystemExit(f"--variant {spec!r}: expected NAME:CONST=TEXT[,CONST=TEXT...]")
    budget = None
    for setting in re.split(r",\s*(?=[A-Za-z_]\w*\s*=)", settings):
        const, eq, text = (part.strip() for part in setting.partition("="))
        if const == "TIME_BUDGET" and eq:
            try:
                budget = float(text)
            except ValueError:
                budget = 0.0
            if not budget > 0:
                raise SystemExit(f"--variant {spec!r}: TIME_BUDGET must be a positive number")
            continue
        span = value_span(source, const) if eq else None
        if span is None:
            raise SystemExit(
                f"--variant {spec!r}: {const!r} is not a constant train.py assigns once"
            )
        data = source.encode()
        source = (data[: span[0]] + text.encode() + data[span[1] :]).decode()
        try:
            ast.parse(source)
        except SyntaxError as exc:
            raise SystemExit(f"--variant {spec!r}: train.py no longer parses ({exc.msg})") from None
    return name, source, budget


def workdirs(versions: list[tuple[str, str, float | None]], work: Path) -> dict[str, Path]:
    """One directory per version (name, train.py source, budget): its train.py beside a copy of
    this repository's prepare.py. Names are made unique with a number, in the versions' order."""
    dirs: dict[str, Path] = {}
    for stem, source, _ in versions:
        name = stem
        while name in dirs:
            name = f"{stem}{len(dirs) + 1}"
        workdir = work / name
        workdir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / "prepare.py", workdir / "prepare.py")
        (workdir / "train.py").write_text(source)
        dirs[name] = workdir
    return dirs


def versions_of(
    trains: list[Path] | None, variants: list[str] | None
) -> list[tuple[str, str, float | None]]:
    """(name, train.py source, budget or None) for the --train files (named by stem), then the
    --variant versions of this repository's train.py; with neither, this repository's train.py."""
    versions: list[tuple[str, str, float | None]] = []
    for train in trains or []:
        if not train.is_file():
            raise SystemExit(f"--train {train}: no such file")
        versions.append((train.stem, train.read_text(), None))
    base = (ROOT / "train.py").read_text()
    versions += [variant(spec, base) for spec in variants or []]
    return versions or [("train", base, None)]


def run_all(
    versions: dict[str, Path],
    args: argparse.Namespace,
    budgets: dict[str, float | None] | None = None,
) -> list[dict]:
    """Every run of every version, A B A B ..., at most args.gpus at once; rows in that order.
    A version's budget (from `budgets`) wins over args.budget.

    With several GPUs, run r (from 0) of the v-th version goes to GPU (v + r) mod args.gpus,
    and each GPU takes its runs in that order: every version meets min(runs, gpus) cards, so a
    slow card does not weigh on one version alone."""
    jobs = [(name, r + 1) for r in range(args.runs) for name in versions]
    gpus = list(range(args.gpus)) if args.gpus > 1 else [None]
    lanes: dict = {gpu: [] for gpu in gpus}
    for r in range(args.runs):
        for v, name in enumerate(versions):
            lanes[gpus[(v + r) % len(gpus)]].append((name, r + 1))
    rows: dict[tuple[str, int], dict] = {}

    def lane(gpu) -> None:
        for name, run in lanes[gpu]:
            key = "shared" if args.shared_cache else name
            cache = f"compile-{key}" if gpu is None else f"compile-{key}-gpu{gpu}"
            row = one_run(
                versions[name],
                args.out / f"{name}-run{run}.log",
                (budgets or {}).get(name) or args.budget,
                args.work / cache,
                args.doc_eval,
                gpu=None if gpu is None else str(gpu),
            )
            row.update(version=name, run=run)
            print(json.dumps(row), flush=True)
            rows[name, run] = row

    with ThreadPoolExecutor(max_workers=len(gpus)) as pool:
        for future in [pool.submit(lane, gpu) for gpu in gpus]:
            future.result()
    return [rows[job] for job in jobs]


def summary(rows: list[dict]) -> list[dict]:
    """Per version, in first-seen order: the runs that finished, and the mean and range of
    val_bpb (and doc_bpb with --doc-eval) and steady tok/s over them, with the cards used."""
    out = []
    for name in dict.fromkeys(r["version"] for r in rows):
        ok = [r for r in rows if r["version"] == name and r.get("val_bpb") is not None]
        entry = {"version": name, "runs": len(ok), "gpus": sorted({str(r["gpu"]) for r in ok})}
        for key in ("val_bpb", "doc_bpb", "tok_per_s"):
            values = [r[key] for r in ok if r.get(key) is not None]
            if values:
                entry[key] = (sum(values) / len(values), min(values), max(values))
        out.append(entry)
    return out


def fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def tables(rows: list[dict], info: dict, prep_s: float) -> str:
    """The printed result: the card line, one row per run, the per-version summary and, with
    --doc-eval, the two metrics side by side (markdown tables)."""
    lines = [
        f"\n{info.get('card', 'cpu')} | driver {info['driver']} | torch {info.get('torch')} | "
        f"prepare {prep_s:.0f}s",
        "| version | run | gpu | cache | val_bpb | steps | tok/s (steady) | MFU (steady) "
        "| training s | startup s | compile s | eval s | total s | outside s |",
        "|---" * 14 + "|",
    ]
    for r in rows:
        lines.append(
            f"| {r['version']} | {r['run']} | {r['gpu'] or '—'} | {r['cache']} | "
            f"{fmt(r['val_bpb'], '.4f')} | "
            f"{fmt(r['num_steps'], '.0f')} | "
            f"{fmt(r['tok_per_s'], ',.0f')} | {fmt(r['steady_mfu'], '.1f')} % | "
            f"{fmt(r['training_s'], '.1f')} | {fmt(r['startup_s'], '.1f')} | "
            f"{fmt(r['compile_s'], '.1f')} | {fmt(r['eval_s'], '.1f')} | "
            f"{fmt(r['total_s'], '.1f')} | {fmt(r.get('outside_s'), '.1f')} |"
        )
    lines += [
        "\nper version, over its runs: mean (min–max)",
        "| version | runs | gpus | val_bpb | upstream's way | tok/s (steady) |",
        "|---|---|---|---|---|---|",
    ]
    for e in summary(rows):
        cells = [
            "—" if key not in e else f"{e[key][0]:{spec}} ({e[key][1]:{spec}}–{e[key][2]:{spec}})"
            for key, spec in (("val_bpb", ".4f"), ("doc_bpb", ".4f"), ("tok_per_s", ",.0f"))
        ]
        lines.append(
            f"| {e['version']} | {e['runs']} | {', '.join(e['gpus'])} | " + " | ".join(cells) + " |"
        )
    if any("doc_bpb" in r for r in rows):
        lines += [
            "\nthe same checkpoints scored two ways (bench/doc_eval.py):",
            "| version | run | this project's val_bpb (stream rows) | upstream's way (BOS-aligned) |",
            "|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['version']} | {r['run']} | {fmt(r.get('stream_bpb'), '.4f')} | "
                f"{fmt(r.get('doc_bpb'), '.4f')} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--budget", type=float, default=None, help="override TIME_BUDGET (smoke)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument(
        "--work",
        type=Path,
        default=Path(tempfile.gettempdir()) / "autoresearch-bench",
        help="where the versions' directories and compile caches go (emptied first)",
    )
    parser.add_argument(
        "--train",
        type=Path,
        action="append",
        help="a version of train.py to measure (repeatable; default: this repository's)",
    )
    parser.add_argument(
        "--variant",
        action="append",
        help="NAME:CONST=TEXT[,CONST=TEXT...]: this repository's train.py with those constants "
        "set (repeatable)",
    )
    parser.add_argument(
        "--gpus",
        type=int,
        default=1,
        help="run up to this many runs at once, one per GPU (default 1: in turn, GPU as given)",
    )
    parser.add_argument(
        "--shared-cache",
        action="store_true",
        help="one compile cache for all versions (for versions whose graphs are the same, e.g. "
        "ones that differ only in a seed): only the very first run is cold",
    )
    parser.add_argument(
        "--doc-eval",
        action="store_true",
        help="also score each run's checkpoint as upstream does (bench/doc_eval.py)",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(args.work, ignore_errors=True)
    specs = versions_of(args.train, args.variant)
    versions = workdirs(specs, args.work)
    budgets = {name: budget for name, (_, _, budget) in zip(versions, specs, strict=True)}
    prep_s = prepare_pycode()
    info = card()
    rows = run_all(versions, args, budgets)
    result = {
        "versions": list(versions),
        "date": time.strftime("%Y-%m-%d"),
        "prepare_s": prep_s,
        **info,
        "budget": args.budget,
        "budgets": {name: budget for name, budget in budgets.items() if budget},
        "gpus": args.gpus,
        "rows": rows,
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    print(tables(rows, info, prep_s))


if __name__ == "__main__":
    main()
