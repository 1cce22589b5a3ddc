"""bench/trainer.py's scheduling: versions run in turn, or one per GPU at once with --gpus,
each run a real subprocess of a stub train.py that records the GPU and compile cache it was
given (the GPU itself is the one part that cannot run here)."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_trainer", ROOT / "bench" / "trainer.py")
trainer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(trainer)

# Follows the output contract; appends what it was given, and when it ran, to $TRACE. When:
# on the monotonic clock, which all processes share and no clock adjustment moves (a step of
# the wall clock between two runs made them seem to overlap).
STUB = """
import json, os, time
start = time.monotonic()
print("step 00000 (0.0%) | loss 9.0 | dt 500ms | tok/sec 1,000 | mfu 1.0% | remaining 1s")
time.sleep(SLEEP)
print("step 00001 (50.0%) | loss 5.0 | dt 300ms | tok/sec 2,000 | mfu 2.0% | remaining 0s")
print("---")
print("val_bpb:          VAL")
print("training_seconds: 1.0")
print("num_steps:        2")
with open(os.environ["TRACE"], "a") as f:
    f.write(json.dumps({
        "version": os.path.basename(os.getcwd()),
        "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "cache": os.path.basename(os.environ["TORCHINDUCTOR_CACHE_DIR"]),
        "budget": os.environ.get("AUTORESEARCH_TIME_BUDGET"),
        "start": start,
        "end": time.monotonic(),
    }) + "\\n")
"""


def _versions(tmp_path: Path, names: dict[str, float], sleep: float) -> dict[str, Path]:
    trains = []
    for name, val in names.items():
        path = tmp_path / "src" / f"{name}.py"
        path.parent.mkdir(exist_ok=True)
        path.write_text(STUB.replace("VAL", str(val)).replace("SLEEP", str(sleep)))
        trains.append(path)
    return trainer.workdirs(trainer.versions_of(trains, None), tmp_path / "work")


def _run(
    tmp_path: Path,
    monkeypatch,
    gpus: int,
    runs: int,
    budget=None,
    budgets=None,
    shared_cache: bool = False,
    sleep: float = 1.0,
) -> tuple[list[dict], list[dict]]:
    """Every version's runs; each sleeps `sleep` s between its step lines, long enough for the
    tests of who runs when to see runs that would overlap (the others pass 0: no wait)."""
    trace = tmp_path / "trace.jsonl"
    monkeypatch.setenv("TRACE", str(trace))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    versions = _versions(tmp_path, {"a": 0.9, "b": 0.8, "c": 0.7}, sleep)
    out = tmp_path / "out"
    out.mkdir()
    args = argparse.Namespace(
        runs=runs,
        gpus=gpus,
        out=out,
        work=tmp_path / "work",
        budget=budget,
        doc_eval=False,
        shared_cache=shared_cache,
    )
    rows = trainer.run_all(versions, args, budgets)
    return rows, [json.loads(line) for line in trace.read_text().splitlines()]


def test_shared_cache_gives_every_version_one_compile_cache(tmp_path, monkeypatch) -> None:
    """--shared-cache: versions that differ only in constants share compiled graphs."""
    _, trace = _run(tmp_path, monkeypatch, gpus=1, runs=2, shared_cache=True, sleep=0)
    assert [t["version"] for t in trace] == ["a", "b", "c", "a", "b", "c"]
    assert {t["cache"] for t in trace} == {"compile-shared"}


def test_one_gpu_runs_versions_in_turn(tmp_path, monkeypatch) -> None:
    # 0.3 s between step lines: runs started together would overlap by far more than a
    # process's start-up; a busy machine can only hide an overlap, never make one
    rows, trace = _run(tmp_path, monkeypatch, gpus=1, runs=2, sleep=0.3)
    assert [(r["version"], r["run"]) for r in rows] == [
        ("a", 1), ("b", 1), ("c", 1), ("a", 2), ("b", 2), ("c", 2)
    ]  # fmt: skip
    assert [r["val_bpb"] for r in rows] == [0.9, 0.8, 0.7, 0.9, 0.8, 0.7]
    assert [t["version"] for t in trace] == ["a", "b", "c", "a", "b", "c"]
    assert all(t["gpu"] is None for t in trace)  # the GPU is left as the caller gave it
    assert [t["cache"] for t in trace[:3]] == ["compile-a", "compile-b", "compile-c"]
    ordered = sorted(trace, key=lambda t: t["start"])
    for before, after in zip(ordered, ordered[1:], strict=False):  # never two at once
        assert before["end"] <= after["start"]
    assert all(r["cache"] == "cold" for r in rows[:3])  # the stub writes no cache: all cold
    assert all(r["startup_s"] is not None and r["training_s"] == 1.0 for r in rows)


@pytest.mark.parametrize("gpus", [2, 3])
def test_gpus_run_at_once_each_on_a_gpu_of_its_own(tmp_path, monkeypatch, gpus) -> None:
    rows, trace = _run(tmp_path, monkeypatch, gpus=gpus, runs=2)
    # rows come back in job order whatever order the runs finished in
    assert [(r["version"], r["run"]) for r in rows] == [
        ("a", 1), ("b", 1), ("c", 1), ("a", 2), ("b", 2), ("c", 2)
    ]  # fmt: skip
    assert [r["val_bpb"] for r in rows] == [0.9, 0.8, 0.7, 0.9, 0.8, 0.7]
    # run r of the v-th version on GPU (v + r) mod gpus: each version meets two cards
    assert [r["gpu"] for r in rows] == [str((v + r) % gpus) for r in range(2) for v in range(3)]
    assert all(len({r["gpu"] for r in rows if r["version"] == v}) == 2 for v in "abc")
    for t in trace:  # a compile cache per version and GPU: concurrent runs never share one
        assert t["cache"] == f"compile-{t['version']}-gpu{t['gpu']}"
    for t in trace:  # never two at once on one GPU
        for u in trace:
            if u is not t and u["start"] < t["end"] and t["start"] < u["end"]:
                assert u["gpu"] != t["gpu"], (t, u)
    # never more than `gpus` at once: the runs under way as each one starts (runs that each
    # overlap a long one need not overlap each other, so overlaps of one run do not count this)
    most = max(sum(u["start"] <= t["start"] < u["end"] for u in trace) for t in trace)
    assert most == gpus


def test_a_versions_own_budget_reaches_its_runs_alone(tmp_path, monkeypatch) -> None:
    rows, trace = _run(tmp_path, monkeypatch, 1, 1, budget=60, budgets={"b": 61.5}, sleep=0)
    assert {t["version"]: t["budget"] for t in trace} == {"a": "60", "b": "61.5", "c": "60"}
    (tmp_path / "again").mkdir()
    rows, trace = _run(tmp_path / "again", monkeypatch, 1, 1, budgets={"c": 306.0}, sleep=0)
    assert {t["version"]: t["budget"] for t in trace} == {"a": None, "b": None, "c": "306.0"}


def test_summary_gives_each_version_its_mean_and_range_over_the_runs_that_finished() -> None:
    rows = [
        {"version": "b", "run": 1, "gpu": "1", "val_bpb": 0.76, "tok_per_s": 1.60e6},
        {"version": "a", "run": 1, "gpu": "0", "val_bpb": 0.78, "tok_per_s": 1.70e6},
        {"version": "b", "run": 2, "gpu": "0", "val_bpb": 0.77, "tok_per_s": 1.64e6},
        {"version": "a", "run": 2, "gpu": "1", "val_bpb": None, "tok_per_s": None},  # crashed
    ]
    b, a = trainer.summary(rows)
    assert (b["version"], b["runs"], b["gpus"]) == ("b", 2, ["0", "1"])
    assert b["val_bpb"] == pytest.approx((0.765, 0.76, 0.77))
    assert b["tok_per_s"] == pytest.approx((1.62e6, 1.60e6, 1.64e6))
    assert "doc_bpb" not in b  # not scored upstream's way: no column to average
    assert (a["runs"], a["gpus"], a["val_bpb"]) == (1, ["0"], (0.78, 0.78, 0.78))


def test_the_printed_tables_give_each_run_and_each_versions_summary(tmp_path, monkeypatch) -> None:
    rows, _ = _run(tmp_path, monkeypatch, gpus=2, runs=2, sleep=0)
    text = trainer.tables(rows, {"card": "NVIDIA H200", "driver": "580.1", "torch": "2.11"}, 39.2)
    lines = text.splitlines()
    assert "NVIDIA H200 | driver 580.1 | torch 2.11 | prepare 39s" in lines
    runs = [line for line in lines if line.startswith(("| a |", "| b |", "| c |"))]
    assert [line.split(" | ")[:5] for line in runs[:6]] == [
        ["| a", "1", "0", "cold", "0.9000"],
        ["| b", "1", "1", "cold", "0.8000"],
        ["| c", "1", "0", "cold", "0.7000"],
        ["| a", "2", "1", "cold", "0.9000"],
        ["| b", "2", "0", "cold", "0.8000"],
        ["| c", "2", "1", "cold", "0.7000"],
    ]
    assert runs[6:] == [  # per version: two runs on two cards, no doc_bpb without --doc-eval
        f"| {v} | 2 | 0, 1 | {val} ({val}–{val}) | — | 2,000 (2,000–2,000) |"
        for v, val in (("a", "0.9000"), ("b", "0.8000"), ("c", "0.7000"))
    ]
    assert "scored two ways" not in text


def _constants(source: str) -> dict[str, str]:
    """The module-level NAME = value assignments of a source, values as written."""
    tree = ast.parse(source)
    return {
        stmt.targets[0].id: ast.unparse(stmt.value)
        for stmt in tree.body
        if isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Name)
    }


def test_a_variant_is_train_py_with_its_constants_set() -> None:
    base = (ROOT / "train.py").read_text()
    name, source, budget = trainer.variant(
        "small:TOTAL_BATCH_SIZE=2**17, DEVICE_BATCH_SIZE=64,MUON_MOMENTUM=(0.9, 0.95, 300)", base
    )
    assert (name, budget) == ("small", None)
    before, after = _constants(base), _constants(source)
    assert after["TOTAL_BATCH_SIZE"] == "2 ** 17" and after["DEVICE_BATCH_SIZE"] == "64"
    assert after["MUON_MOMENTUM"] == "(0.9, 0.95, 300)"
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {"TOTAL_BATCH_SIZE", "DEVICE_BATCH_SIZE", "MUON_MOMENTUM"}
    assert len(source.splitlines()) == len(base.splitlines())  # comments and layout kept
    versions = trainer.versions_of([], ["a:SEED=1", "b:SEED=2"])
    assert [(n, _constants(s)["SEED"], b) for n, s, b in versions] == [
        ("a", "1", None),
        ("b", "2", None),
    ]
    assert trainer.versions_of(None, None) == [("train", base, None)]


def test_a_variant_may_set_its_own_training_budget() -> None:
    """TIME_BUDGET is prepare.py's: a variant that sets it gets the budget, not an edited file,
    so versions can be compared at equal tokens."""
    base = (ROOT / "train.py").read_text()
    assert trainer.variant("long:TIME_BUDGET=306", base) == ("long", base, 306.0)
    name, source, budget = trainer.variant("both:SEED=7,TIME_BUDGET=2.5", base)
    assert (name, _constants(source)["SEED"], budget) == ("both", "7", 2.5)


@pytest.mark.parametrize(
    "spec, words",
    [
        ("bs18", "expected NAME:CONST=TEXT"),
        ("x:NOT_A_CONSTANT=1", "'NOT_A_CONSTANT' is not a constant train.py assigns once"),
        ("x:TOTAL_BATCH_SIZE", "'TOTAL_BATCH_SIZE' is not a constant"),
        ("x:SEED=1,EVAL_TOKENS=5", "'EVAL_TOKENS' is not a constant"),  # prepare.py's
        ("x:DEPTH=8 +", "no longer parses"),
        ("x:TIME_BUDGET=0", "TIME_BUDGET must be a positive number"),
        ("x:TIME_BUDGET=soon", "TIME_BUDGET must be a positive number"),
    ],
)
def test_a_bad_variant_is_refused_before_anything_runs(spec: str, words: str) -> None:
    with pytest.raises(SystemExit, match=words):
        trainer.variant(spec, (ROOT / "train.py").read_text())
