"""Does the session's gain hold at a longer horizon? (`autoresearch confirm --horizon K`)

A session judges every change after TIME_BUDGET seconds of training; a change can win early
and lose later (a higher learning rate, a shorter warmdown). This trains the baseline's and
the best's train.py for K x TIME_BUDGET each, with the same seeds (noise.seed_of(0), ...: for
each seed the baseline, then the best, so each pair is close in time), evaluates every
checkpoint with the sealed evaluator on the validation split and on the held-out test split,
and writes the answer to `runs/<tag>/confirm-horizon.json` (FILE):

    {"horizon": K, "time_budget": seconds per run, "seeds": [...], "at": ISO time,
     "baseline": {"id", "commit", "val_bpb"}, "best": {"id", "commit", "val_bpb"},
     "runs": [{"role", "seed", "status", "reason", "val_bpb", "test_bpb", "num_steps",
               "wall_s"}],
     "session_gain": the baseline's val_bpb minus the best's, as the session measured them,
     "val_gain", "test_gain": the mean over seeds of baseline minus best at K x TIME_BUDGET,
     "holds": true when both are positive, null when a run failed}

What it guarantees: both versions train from the same commit's bytes, on the session's pinned
dataset, checked against the session's fingerprints, in children without secrets, in the same
box as the session's runs (sandbox.py: the train split only, no network, one private writable
directory; the checkpoint is taken out of it), evaluated by the trusted metric with the model
boxed too. Without the box only where the session ran without it (`--unsandboxed`, recorded in
its session.json), and then without network where the OS allows. What it does not: prove the gain
with the keep rule's error rates; with one or two seeds it says whether the sign survives.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from statistics import fmean

from . import noise, sandbox
from .childenv import child_env
from .evalproto import EvalStatus
from .evaluator import evaluate_checkpoint
from .ledger import Experiment, Ledger
from .runner import RunResult, run_training
from .status import Status

FILE = "confirm-horizon.json"
EVAL_TIMEOUT_S = 1800.0  # seconds one evaluation may take
STARTUP_S = 600.0  # added to twice the training time for a run's hard timeout


def confirm_horizon(
    root: Path,
    run_dir: Path,
    *,
    baseline: tuple[Experiment, str],
    best: tuple[Experiment, str],
    horizon: float,
    seeds: int,
    time_budget: float,
    preset: str,
    device: str,
    dataset: Path,
    fingerprints: Mapping[str, str],
    prefix: Sequence[str] = (),
    unsandboxed: bool | None = None,
    on_run=None,
) -> dict:
    """Train and evaluate the two versions ((experiment, train.py source) each); returns the
    record described in the module docstring (the caller writes it). `unsandboxed`: run the
    candidate's code without the box; None: as the session did (its session.json). Raises
    sandbox.SandboxError where the box is needed and missing."""
    box = box_for(run_dir, unsandboxed)
    budget = horizon * time_budget
    runs = []
    with tempfile.TemporaryDirectory(prefix="autoresearch-horizon-") as tmp:
        dirs = {}
        for role, (exp, source) in (("baseline", baseline), ("best", best)):
            d = Path(tmp) / role
            d.mkdir()
            (d / "train.py").write_text(source, encoding="utf-8")
            shutil.copyfile(root / "prepare.py", d / "prepare.py")  # checked by the caller
            dirs[role] = (exp, d)
        for k in range(seeds):
            seed = noise.seed_of(k)
            for role, (exp, d) in dirs.items():
                row = _one(
                    root,
                    d,
                    run_dir / "confirm" / f"horizon-{role}-{seed}",
                    seed=seed,
                    budget=budget,
                    preset=preset,
                    device=device,
                    dataset=dataset,
                    fingerprints=fingerprints,
                    prefix=prefix,
                    box=box,
                )
                runs.append({"role": role, "id": exp.id, "seed": seed, **row})
                if on_run is not None:
                    on_run(runs[-1])
    return {
        "horizon": horizon,
        "time_budget": budget,
        "seeds": [noise.seed_of(k) for k in range(seeds)],
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **{
            role: {"id": exp.id, "commit": exp.commit, "val_bpb": exp.val_bpb}
            for role, (exp, _) in (("baseline", baseline), ("best", best))
        },
        "runs": runs,
        **verdict(runs, baseline[0].val_bpb, best[0].val_bpb),
    }


def box_for(run_dir: Path, unsandboxed: bool | None) -> sandbox.Box | None:
    """The box the runs use: the session's (sandbox.require), None when `unsandboxed`, or,
    for None, when the session in `run_dir` ran with `--unsandboxed` (its session.json)."""
    if unsandboxed is None:
        recorded = (Ledger(run_dir).read_session() or {}).get("sandbox") or {}
        unsandboxed = bool(recorded.get("unsandboxed", False))
    return sandbox.require(sandbox.probe(), unsandboxed=unsandboxed)


def verdict(runs: list[dict], baseline_bpb: float | None, best_bpb: float | None) -> dict:
    """The paired gains (baseline - best) per split over the seeds both measured, and whether
    the gain holds (positive on both splits); holds is None when a run failed."""
    out: dict = {"session_gain": None, "val_gain": None, "test_gain": None, "holds": None}
    if baseline_bpb is not None and best_bpb is not None:
        out["session_gain"] = baseline_bpb - best_bpb
    if not runs or any(r["status"] != EvalStatus.ok for r in runs):
        return out
    by = {(r["role"], r["seed"]): r for r in runs}
    seeds = [s for role, s in by if role == "baseline" and ("best", s) in by]
    for split in ("val", "test"):
        key = f"{split}_bpb"
        out[f"{split}_gain"] = fmean(by[("baseline", s)][key] - by[("best", s)][key] for s in seeds)
    out["holds"] = out["val_gain"] > 0 and out["test_gain"] > 0
    return out


def _one(
    root: Path,
    workdir: Path,
    stem: Path,
    *,
    seed: int,
    budget: float,
    preset: str,
    device: str,
    dataset: Path,
    fingerprints: Mapping[str, str],
    prefix: Sequence[str],
    box: sandbox.Box | None,
) -> dict:
    """Train one version once with `seed` for `budget` seconds; evaluate it on val and test."""
    result, checkpoint = train(
        workdir,
        stem.with_suffix(".log"),
        seed=seed,
        budget=budget,
        preset=preset,
        device=device,
        dataset=dataset,
        prefix=prefix,
        box=box,
    )
    row = {
        "status": EvalStatus.ok,
        "reason": "",
        "val_bpb": None,
        "test_bpb": None,
        "num_steps": result.summary.get("num_steps"),
        "wall_s": round(result.wall_seconds, 1),
    }
    # train.py skips its own evaluation, so the summary has no val_bpb: a run counts when it
    # exited 0 (runner's "no_summary" says only that val_bpb is missing) and left a checkpoint
    if result.exit_code != 0 or not checkpoint.is_file():
        return {
            **row,
            "status": result.crash_class or Status.crash,
            "reason": result.log_tail[-500:],
        }
    for split in ("val", "test"):
        ev = evaluate_checkpoint(
            root,
            checkpoint,
            split=split,
            preset=preset,
            device=device,
            timeout=EVAL_TIMEOUT_S,
            log_path=stem.parent / f"{stem.name}.{split}.log",
            fingerprints=fingerprints,
            train_file=workdir / "train.py",
            dataset=dataset,
            prefix=prefix,
            boxed=box is not None,
        )
        if not ev.ok:
            return {**row, "status": ev.status, "reason": ev.reason}
        row[f"{split}_bpb"] = ev.val_bpb
    return row


def train(
    workdir: Path,
    log_path: Path,
    *,
    seed: int,
    budget: float,
    preset: str,
    device: str,
    dataset: Path,
    prefix: Sequence[str],
    box: sandbox.Box | None,
) -> tuple[RunResult, Path]:
    """One training run of `workdir`'s train.py for `budget` seconds with `seed`, boxed as a
    session's run is when `box` is given (else behind `prefix`, the network isolation); returns
    the result and where its checkpoint is (there only if the run left one)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = workdir / "checkpoint.pt"
    checkpoint.unlink(missing_ok=True)
    extra = {
        "AUTORESEARCH_SEED": str(seed),
        "AUTORESEARCH_TIME_BUDGET": f"{budget:g}",
        "AUTORESEARCH_CHECKPOINT": str(checkpoint),
        "AUTORESEARCH_SKIP_EVAL": "1",
        "AUTORESEARCH_CACHE": str(dataset.parent),
        "AUTORESEARCH_DATASET": dataset.name,
    }
    env = child_env(dict(os.environ), preset=preset, device=device, gpu=None, extra=extra)
    result = run_training(
        workdir,
        log_path,
        command=[*(() if box is not None else prefix), sys.executable, "train.py"],
        env=env,
        timeout=2 * budget + STARTUP_S,
        box=box,
    )
    return result, checkpoint
