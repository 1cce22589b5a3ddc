"""The loop benchmark: how much of a session's wall time the GPU spends training, and what
each experiment costs outside its training budget, with an LLM endpoint that is slow.

    python bench/loop.py                                  # 6 experiments, replies take 60 s
    python bench/loop.py --compare                        # the same again with --no-overlap
    python bench/loop.py --compare-warm                   # ... and again with --no-warm-start
    python bench/loop.py --compare-box                    # ... and again with --unsandboxed
    python bench/loop.py --budget 60 --reply-delay 12     # scaled down, same 300:60 ratio
    python bench/loop.py --graph-edit-every 3             # every 3rd edit misses the compile cache
    python bench/loop.py --preset cpu --reply-delay 5 --experiments 3 --compare   # CPU smoke

Per session it creates a fresh workspace (`autoresearch init` in a temporary directory),
starts a fake OpenAI-compatible endpoint (tests/fakellm.py) whose every reply comes after
--reply-delay seconds and is a real edit of the train.py in the request (one learning-rate
constant scaled by a small factor, so it always applies), and runs

    autoresearch run --agent openai --base-url <fake> --model fake --max-experiments N
                     --calibrate 1 --max-repeats 1 --overlap|--no-overlap
                     [--no-warm-start]

on the active prepared dataset (AUTORESEARCH_CACHE; `--prepare pycode` builds the benchmark
protocol's corpus first). The CLI's plain output is read line by line and time-stamped on
arrival, which gives each run's phases (launch → first step line → sealed evaluation →
record); the record (experiments.jsonl) and `autoresearch status --json` give the tool's own
figures: GPU-busy %, child wall time, train.py's training_seconds, the evaluator's time, the
agent's wait.

Definitions (per experiment, from the record):
- cycle: session clock at this record minus at the previous one (session start for the first);
- wait: time the loop waited for the agent (`wait_s` with overlap, else the call's `seconds`);
- outside: cycle - wait - training_seconds printed by train.py (the target: <= 15 s warm,
  <= 45 s cold);
- harness: cycle - wait - child wall - evaluator wall (git, fingerprints, record, prompt).

Prints one table per session and writes everything (records, timelines, status) as JSON to
--out/loop.json, with each session's time-stamped output as --out/<mode>.log.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # fakellm: the same fake endpoint the tests use

from fakellm import FakeLLM  # noqa: E402

from autoresearch.edits import apply_reply  # noqa: E402

TAG = "bench"
# Knobs the fake agent scales, alternately: two lines apart in the template, so an edit of one
# made while the other's experiment trains still merges onto the new best if that is kept.
KNOBS = ("MATRIX_LR", "UNEMBEDDING_LR")
# With --graph-edit-every K, every K-th reply scales this instead: a constant compiled into the
# model's graph, so that run misses the compile cache (a cold compile inside a warm session).
GRAPH_KNOB = "LOGIT_SOFTCAP"
# Small steps, each knob in turn through these; an edit that happened to return to an earlier
# train.py would only be recorded `invalid` (a duplicate), never break the session.
FACTORS = (1.1, 0.9, 1.2, 0.8, 1.15, 0.85, 1.05, 0.95)
TARGET_BUDGET = 300.0  # s: the gpu preset's TIME_BUDGET, which the targets below are about
TARGET_OUTSIDE = (45.0, 15.0)  # s outside training per experiment: cold (first), warm (later)
TARGET_TRAINING_PERCENT = 90.0  # of a 6-experiment session's wall time, with 60 s replies

# Lines of the CLI's plain output that mark a phase (see autoresearch/display.py)
TRAINING_LINE = re.compile(r"^exp (\d{4}) training: (.*)$")
STEP_LINE = re.compile(r"^\s+step \d+ ")
EVAL_LINE = re.compile(r"^· exp (\d{4}): sealed evaluation")
PROPOSING_LINE = re.compile(r"^· exp (\d{4}): \S+ agent (proposing|repairing)")
EXTRA_RUN = re.compile(r"\((calibrate|repeat|remeasure|pair) run \d+\)$")


# --------------------------------------------------------------------------- the fake agent


def edit_reply(train_py: str, n: int, graph_every: int = 0) -> str:
    """The n-th reply (0-based): a description line and one SEARCH/REPLACE block that scales
    a learning-rate constant of `train_py` by a small factor, or GRAPH_KNOB on every
    `graph_every`-th reply. Raises ValueError when train.py has none of the knobs."""
    graph = graph_every > 0 and (n + 1) % graph_every == 0
    knobs = (GRAPH_KNOB,) if graph else KNOBS[n % len(KNOBS) :] + KNOBS[: n % len(KNOBS)]
    for knob in knobs:
        match = re.search(rf"^{knob} = ([0-9.eE+-]+)(.*)$", train_py, re.M)
        if match:
            break
    else:
        raise ValueError(f"train.py assigns none of {', '.join(knobs)} at the top level")
    turn = (n + 1) // graph_every - 1 if graph else n // len(KNOBS)
    factor = FACTORS[turn % len(FACTORS)]
    new = float(f"{float(match[1]) * factor:.4g}")
    return (
        f"Scale {knob} by {factor:g} ({match[1]} -> {new!r})\n\n"
        "train.py\n```python\n<<<<<<< SEARCH\n"
        f"{match[0]}\n=======\n{knob} = {new!r}{match[2]}\n"
        ">>>>>>> REPLACE\n```\n"
    )


def train_py_of(request: dict) -> str:
    """The train.py a chat request shows (the first user message that holds a knob)."""
    for message in request.get("messages", []):
        content = message.get("content")
        if message.get("role") == "user" and isinstance(content, str):
            if any(re.search(rf"^{k} = ", content, re.M) for k in KNOBS):
                return content
    return ""


def fake_endpoint(delay: float, graph_every: int = 0) -> FakeLLM:
    """A started fake endpoint answering every request with the next edit after `delay` s."""
    counter = itertools.count()
    server = FakeLLM(model="fake")
    server.respond_with(
        lambda body: edit_reply(train_py_of(body), next(counter), graph_every), delay=delay
    )
    return server.start()


# --------------------------------------------------------------------------- one session


def cli_env() -> dict[str, str]:
    """This environment for the CLI, minus keys and agent settings; the repo importable."""
    drop = ("OPENAI_", "AUTORESEARCH_API_KEY", "AUTORESEARCH_MODEL", "AUTORESEARCH_BASE_URL")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def autoresearch(ws: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "autoresearch", *args],
        cwd=ws,
        env=cli_env(),
        capture_output=True,
        text=True,
        check=True,
    )


def run_session(
    ws: Path, args: argparse.Namespace, overlap: bool, warm: bool, boxed: bool, log_path: Path
) -> dict:
    """One session in a fresh workspace `ws`; returns what was measured."""
    subprocess.run(
        [sys.executable, "-m", "autoresearch", "init", str(ws)],
        env=cli_env(),
        check=True,
        capture_output=True,
    )
    source = (ws / "train.py").read_text()
    apply_reply(source, edit_reply(source, 0))  # fail here, not inside the fake server
    command = [
        sys.executable,
        "-m",
        "autoresearch",
        "run",
        "--tag",
        TAG,
        "--agent",
        "openai",
        "--model",
        "fake",
        "--max-experiments",
        str(args.experiments),
        "--calibrate",
        "1",
        "--max-repeats",
        "1",
        "--overlap" if overlap else "--no-overlap",
        "--warm-start" if warm else "--no-warm-start",
    ]
    if not boxed:
        command.append("--unsandboxed")
    if args.preset:
        command += ["--preset", args.preset]
    lines: list[tuple[float, str]] = []
    with (
        fake_endpoint(args.reply_delay, args.graph_edit_every) as server,
        open(log_path, "w") as log,
    ):
        command += ["--base-url", server.base_url]
        started = time.monotonic()
        proc = subprocess.Popen(
            command,
            cwd=ws,
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            t = time.monotonic() - started
            lines.append((t, line.rstrip("\n")))
            log.write(f"{t:8.2f} {line}")
            log.flush()
            print(f"{t:8.2f} {line}", end="", flush=True)
        exit_code = proc.wait()
        wall = time.monotonic() - started
        requests = len(server.requests)
    if not (ws / "runs" / TAG / "experiments.jsonl").is_file():
        sys.exit(f"autoresearch run exited {exit_code} before recording anything: see {log_path}")
    status = json.loads(autoresearch(ws, "status", "--json", "--tag", TAG).stdout)
    session = json.loads((ws / "runs" / TAG / "session.json").read_text())
    # the record as written (experiments.jsonl), not the in-memory objects
    jsonl = (ws / "runs" / TAG / "experiments.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in jsonl if line.strip()]
    for r in records:  # a crash's cause, for a session run where its files can't be looked at
        if r["status"] == "crash":
            run_log = ws / "runs" / TAG / f"{r['id']:04d}" / "run.log"
            tail = (
                run_log.read_text(errors="replace").splitlines()[-25:] if run_log.is_file() else []
            )
            print(f"exp {r['id']} crashed; the end of {run_log.name}:", *tail, sep="\n  ")
    for r in records:  # what the sealed evaluator said of its own phases (first run)
        r["evaluator"] = evaluator_report(ws / "runs" / TAG / f"{r['id']:04d}" / "run.eval.log")
    tl = timeline(lines)
    return {
        "mode": mode_name(overlap, warm, boxed),
        "exit_code": exit_code,
        "cli_wall_s": round(wall, 2),
        "time_budget": session.get("time_budget"),
        "agent_requests": requests,
        "status": status,
        "records": records,
        "timeline": tl,
        "rows": rows(records, tl, overlap),
    }


# --------------------------------------------------------------------------- analysis


def evaluator_report(log: Path) -> dict:
    """The evaluator's JSON line (its startup, load and metric seconds), or {} if none."""
    if not log.is_file():
        return {}
    lines = [x for x in log.read_text(errors="replace").splitlines() if x.startswith("{")]
    try:
        return json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        return {}


def timeline(lines: list[tuple[float, str]]) -> dict:
    """From the time-stamped output: each training run (when it was announced, its first
    step line, its sealed evaluation, the next line after that: its record or the next
    phase), and per experiment id when the loop began waiting for the agent."""
    runs: list[dict] = []
    waits: dict[int, float] = {}  # id -> first "proposing"/"repairing" note
    for t, line in lines:
        if m := PROPOSING_LINE.match(line):
            waits.setdefault(int(m[1]), t)
            continue
        run = runs[-1] if runs else None
        if m := TRAINING_LINE.match(line):
            runs.append({"id": int(m[1]), "label": m[2], "start": t})
        elif run is None:
            continue
        elif STEP_LINE.match(line):
            run.setdefault("first_step", t)
        elif EVAL_LINE.match(line):
            run["eval"] = t
        elif "eval" in run and "after_eval" not in run:
            run["after_eval"] = t
    for run in runs:
        if "first_step" in run:
            run["startup_s"] = round(run["first_step"] - run["start"], 2)
        if "eval" in run and "first_step" in run:
            run["steps_to_eval_s"] = round(run["eval"] - run["first_step"], 2)
        if "after_eval" in run:
            run["eval_phase_s"] = round(run["after_eval"] - run["eval"], 2)
    return {"runs": runs, "proposing_at": waits}


def agent_wait(record: dict, overlap: bool, waited: bool) -> float:
    """Seconds the loop waited for this experiment's proposal. Without overlap, the call's
    duration. With overlap, `wait_s` for a proposal prepared in the background; a fresh one
    (after an invalid or a crash, or when the prepared edit no longer applied) was waited
    for in full, and shows as a wait that began ("proposing" note) with wait_s 0."""
    agent = record["agent"] or {}
    seconds, wait_s = agent.get("seconds") or 0.0, agent.get("wait_s") or 0.0
    if not overlap or (waited and wait_s == 0.0):
        return seconds
    return wait_s


def rows(records: list[dict], tl: dict, overlap: bool) -> list[dict]:
    """One row per experiment: the record's figures and its first run's startup."""
    runs = tl["runs"]
    after_remeasure = {
        runs[i + 1]["id"]
        for i, run in enumerate(runs[:-1])
        if (m := EXTRA_RUN.search(run["label"])) and m[1] == "remeasure"
    }
    out, previous = [], 0.0
    for r in records:
        extra, metrics = r["extra"], r["metrics"]
        session_s = extra.get("session_s")
        cycle = session_s - previous if session_s is not None else None
        previous = session_s if session_s is not None else previous
        wait = agent_wait(r, overlap, r["id"] in tl["proposing_at"]) if r["agent"] else 0.0
        training = metrics.get("training_seconds")
        child = r["train_seconds"]
        eval_wall = extra.get("eval_wall_s")
        first = next((run for run in runs if run["id"] == r["id"]), {})
        row = {
            "id": r["id"],
            "status": r["status"],
            "description": r["description"],
            "wait_s": round(wait, 2),
            "cycle_s": _round(cycle),
            "child_s": child,
            "training_s": training,
            "train_py_total_s": metrics.get("total_seconds"),
            "startup_s": first.get("startup_s"),
            "eval_wall_s": eval_wall,
            "eval_seconds": metrics.get("eval_seconds"),
            # a re-measurement of the best ran inside this cycle (counted in its outside time)
            "after_remeasure": r["id"] in after_remeasure,
            "graph_edit": r["description"].startswith(f"Scale {GRAPH_KNOB} "),
        }
        ev = r.get("evaluator") or {}
        if ev.get("seconds") is not None and eval_wall is not None:
            # data, fingerprints, torch: done while the run trained when it started ahead
            ahead = bool(ev.get("started_ahead"))
            row["eval_ahead_s"] = ev["startup_seconds"] if ahead else 0.0
            row["eval_imports_s"] = 0.0 if ahead else ev["startup_seconds"]
            row["eval_load_s"] = ev.get("load_seconds")  # import train.py, load checkpoint
            row["eval_metric_s"] = ev["seconds"]  # evaluate_bpb with the causality probes
            row["eval_rest_s"] = _round(
                eval_wall - ev["seconds"] - row["eval_imports_s"] - ev["load_seconds"]
            )  # interpreter start (or the go), the imports before its clock, exit
        if child is not None and training is not None and row["startup_s"] is not None:
            # after the first step line: untimed steps, checkpoint save, interpreter exit
            row["tail_s"] = _round(child - row["startup_s"] - training)
        if cycle is not None and training is not None:
            row["outside_s"] = _round(cycle - wait - training)
        if cycle is not None and child is not None and eval_wall is not None:
            row["harness_s"] = _round(cycle - wait - child - eval_wall)
        out.append(row)
    return out


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


BREAKDOWN = (  # where outside_s goes: these add up to it
    ("startup_s", "train.py launch -> first step line (imports, data, model, compile, step 0)"),
    ("tail_s", "first step line -> train.py exit, minus training_seconds (untimed steps, save)"),
    ("eval_rest_s", "evaluator: interpreter start and exit"),
    ("eval_imports_s", "evaluator: data, fingerprints, torch import (0: started ahead)"),
    ("eval_load_s", "evaluator: import train.py, load the checkpoint"),
    ("eval_metric_s", "evaluator: evaluate_bpb with causality probes"),
    ("harness_s", "harness: git, fingerprints, record, prompt (cycle - wait - child - eval)"),
)


def medians(rows_: list[dict]) -> dict:
    keys = ("wait_s", "cycle_s", "child_s", "training_s", "startup_s", "eval_wall_s")
    keys += ("harness_s", "outside_s") + tuple(k for k, _ in BREAKDOWN)
    med = {}
    for key in keys:
        values = [r[key] for r in rows_ if r.get(key) is not None]
        med[key] = round(statistics.median(values), 2) if values else None
    return med


def projected(rows_: list[dict], budget: float | None) -> dict:
    """The session's shares had each run trained TARGET_BUDGET s with the same outside times
    and the agent's waits scaled like the budget (a scaled-down run keeps the ratio)."""
    trained = [r for r in rows_ if r.get("outside_s") is not None and r.get("tail_s") is not None]
    if not budget or not trained:
        return {}
    scale = TARGET_BUDGET / budget
    wall = sum(TARGET_BUDGET + r["outside_s"] + r["wait_s"] * scale for r in trained)
    child = sum(TARGET_BUDGET + r["startup_s"] + r["tail_s"] for r in trained)
    return {
        "training_percent": round(100 * TARGET_BUDGET * len(trained) / wall, 1),
        "gpu_busy_percent": round(100 * child / wall, 1),
    }


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "—" if value is None else format(value, spec)


def print_session(s: dict) -> None:
    training = sum(r["training_s"] or 0.0 for r in s["rows"])
    strict = 100 * training / s["cli_wall_s"] if s["cli_wall_s"] else None
    print(f"\n## {s['mode']}")
    print(
        f"session {s['cli_wall_s']:.1f} s (CLI process); train.py's training_seconds "
        f"{training:.1f} s = {fmt(strict)} % of it; GPU-busy {fmt(s['status'].get('gpu_busy_percent'))}"
        f" % (status --json: training children's wall / session clock); "
        f"{s['agent_requests']} agent requests; ended: {s['status'].get('end_reason')}\n"
    )
    cols = "| exp | status | wait s | cycle s | child s | training s | startup s | eval s "
    print(cols + "| harness s | outside s |")
    print("|---" * 10 + "|")
    for r in s["rows"]:
        print(
            f"| {r['id']:04d} | {r['status']}{' (*)' if r['after_remeasure'] else ''}"
            f"{' (graph edit)' if r.get('graph_edit') else ''} | {fmt(r['wait_s'])} | "
            f"{fmt(r['cycle_s'])} | "
            f"{fmt(r['child_s'])} | {fmt(r['training_s'])} | {fmt(r['startup_s'])} | "
            f"{fmt(r['eval_wall_s'])} | {fmt(r.get('harness_s'))} | {fmt(r.get('outside_s'))} |"
        )
    for label, subset in (("median, all", s["rows"]), ("median, after 1st", s["rows"][1:])):
        m = medians(subset)
        print(
            f"| {label} | | {fmt(m['wait_s'])} | {fmt(m['cycle_s'])} | {fmt(m['child_s'])} | "
            f"{fmt(m['training_s'])} | {fmt(m['startup_s'])} | {fmt(m['eval_wall_s'])} | "
            f"{fmt(m['harness_s'])} | {fmt(m['outside_s'])} |"
        )
    last = next((r for r in reversed(s["records"]) if r["extra"].get("session_s")), None)
    if last is not None:
        print(
            f"CLI process outside the session clock (start, imports, exit): "
            f"{s['cli_wall_s'] - last['extra']['session_s']:.1f} s"
        )
    proj = projected(s["rows"], s["time_budget"])
    if proj and s["time_budget"] != TARGET_BUDGET:
        print(
            f"projected to TIME_BUDGET {TARGET_BUDGET:g} s (same outside times, waits x "
            f"{TARGET_BUDGET / s['time_budget']:g}): training {proj['training_percent']} % of "
            f"the wall time, GPU-busy {proj['gpu_busy_percent']} % (target: training "
            f">= {TARGET_TRAINING_PERCENT:g} %)"
        )
    outside = [r.get("outside_s") for r in s["rows"]]
    rest = [r for r in s["rows"][1:] if not r.get("graph_edit")]  # warm compile caches
    if outside and outside[0] is not None:
        warm = medians(rest)["outside_s"] if rest else None
        print(
            f"outside training: first {fmt(outside[0])} s (target cold <= "
            f"{TARGET_OUTSIDE[0]:g}), median of the rest {fmt(warm)} s (target warm <= "
            f"{TARGET_OUTSIDE[1]:g})"
        )
    for r in s["rows"][1:]:
        if r.get("graph_edit"):
            print(
                f"exp {r['id']:04d} changed the model's graph (a cold compile in a warm session):"
                f" outside {fmt(r.get('outside_s'))} s, launch -> first step {fmt(r['startup_s'])} s"
            )
    candidates = medians(rest)
    if rest:
        print("\nwhere the outside time goes (median of the rest, s):")
        for key, what in BREAKDOWN:
            print(f"  {fmt(candidates[key]):>6}  {what}")
        print(f"  {fmt(candidates['outside_s']):>6}  outside (cycle - wait - training_seconds)")
        ahead = [r["eval_ahead_s"] for r in rest if r.get("eval_ahead_s")]
        if ahead:
            print(
                f"  (and {fmt(statistics.median(ahead))} s of the evaluator's start-up done while "
                "the run trained: it started ahead)"
            )
    for run in s["timeline"]["runs"]:
        if EXTRA_RUN.search(run["label"]):
            print(f"also trained: exp {run['id']:04d} {run['label']}")
    if any(r["after_remeasure"] for r in s["rows"]):
        print("(*) its cycle includes a re-measurement of the best")


def mode_name(overlap: bool, warm: bool, boxed: bool = True) -> str:
    return (
        ("overlap" if overlap else "no-overlap")
        + ("" if warm else "-cold-starts")
        + ("" if boxed else "-unboxed")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiments", type=int, default=6, help="--max-experiments (6)")
    parser.add_argument("--reply-delay", type=float, default=60.0, help="seconds per reply (60)")
    parser.add_argument(
        "--preset", choices=("gpu", "cpu"), default=None, help="default: gpu with CUDA"
    )
    parser.add_argument("--budget", type=float, default=None, help="AUTORESEARCH_TIME_BUDGET")
    parser.add_argument(
        "--graph-edit-every",
        type=int,
        default=0,
        metavar="K",
        help=f"every K-th reply scales {GRAPH_KNOB}: that run compiles cold (0: never)",
    )
    parser.add_argument("--compare", action="store_true", help="also run with --no-overlap")
    parser.add_argument("--no-overlap", action="store_true", help="only run with --no-overlap")
    parser.add_argument("--compare-warm", action="store_true", help="also run with --no-warm-start")
    parser.add_argument(
        "--compare-box",
        action="store_true",
        help="also run with --unsandboxed (what the box costs; the boxed session runs first)",
    )
    parser.add_argument(
        "--prepare",
        choices=("pycode",),
        default=None,
        help="prepare (or reuse) the benchmark protocol's pycode corpus first",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("bench-results/loop"), help="loop.json, the logs"
    )
    parser.add_argument("--keep", action="store_true", help="keep the workspaces (in --out)")
    args = parser.parse_args()
    if args.budget:
        os.environ["AUTORESEARCH_TIME_BUDGET"] = f"{args.budget:g}"
    args.out.mkdir(parents=True, exist_ok=True)
    if args.prepare == "pycode":
        from trainer import prepare_pycode  # bench/trainer.py, beside this file

        print(f"pycode corpus ready in {prepare_pycode():.0f} s", flush=True)
    sessions = []
    with tempfile.TemporaryDirectory(prefix="autoresearch-loopbench-") as tmp:
        parent = args.out if args.keep else Path(tmp)
        modes = [(overlap, True, True) for overlap in (True, False)] if args.compare else []
        modes = modes or [(not args.no_overlap, True, True)]
        if args.compare_warm:
            modes.append((modes[0][0], False, True))
        if args.compare_box:
            modes.append((modes[0][0], True, False))
        for overlap, warm, boxed in modes:
            mode = mode_name(overlap, warm, boxed)
            ws = parent / f"ws-{mode}"
            sessions.append(run_session(ws, args, overlap, warm, boxed, args.out / f"{mode}.log"))
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "experiments": args.experiments,
        "reply_delay_s": args.reply_delay,
        "preset": args.preset,
        "time_budget": os.environ.get("AUTORESEARCH_TIME_BUDGET"),
        "cpus": os.cpu_count(),
        "load_avg": os.getloadavg(),
        "sessions": sessions,
    }
    (args.out / "loop.json").write_text(json.dumps(result, indent=2))
    for s in sessions:
        print_session(s)
    if len(sessions) > 1:
        busy = ", ".join(
            f"{s['mode']} {fmt(s['status'].get('gpu_busy_percent'))} %" for s in sessions
        )
        print(f"\nGPU-busy (status --json): {busy}")
    print(f"\nwritten: {args.out / 'loop.json'}")


if __name__ == "__main__":
    main()
