"""The sealed evaluation, seen from the harness: val_bpb of a checkpoint, measured in a process
that runs no code of the candidate's.

The session never takes val_bpb from train.py's output. train.py saves its final model to
AUTORESEARCH_CHECKPOINT; once the training child has exited (and every process of it is gone),
`evaluate_checkpoint` starts the trusted evaluator (sealed_eval.py) as a child process, which
hands the candidate's code to two boxed model processes (model_server.py) and reads back only
their logits; evalproto.py is what this side and that program agree on. `start_warm` starts the
evaluator ahead, before the checkpoint exists; `WarmKey` is what it must have been started for
to be used. `sealed_outcome` turns the evaluator's verdict into the run the session records.

Guarantees: a result counts only from the line that carries this call's nonce (what the model
processes print goes to the log and is never read as a result); a failed evaluation is a
status, never an exception. What it does not guarantee: see sealed_eval.py (the probe samples
two batches; without the box the model processes can read the validation file).

Cost: the logits cross the process boundary through host shared memory (4 bytes per vocabulary
entry per token: 134 MB per 16 x 256-token batch of the cpu preset); on a GPU they are copied
to the host and back, which the GPU measurements will say the cost of (CUDA IPC would avoid
it). Measured before the split, on an H200: 2.7 s of startup plus 36 ms per 32 x 2048-token
batch, about 12 s for EVAL_TOKENS.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from . import sandbox
from .childenv import child_env
from .evalproto import STATUSES, EvalStatus, command_args
from .runner import RunResult, run_training
from .status import CrashClass
from .warm import Prestarted

CRASH_CLASSES = (
    CrashClass.no_checkpoint,
    CrashClass.eval,
)  # crash classes the loop records for evaluator failures
TAIL_LINES = 30  # lines of the evaluator's log kept in EvalResult.log_tail
DISAGREE_BPB = 0.005  # |printed - sealed| val_bpb above which the record notes the disagreement


@dataclass
class EvalResult:
    """What the sealed evaluator said about one checkpoint."""

    status: EvalStatus
    val_bpb: float | None  # bits per byte on the requested split (val or test)
    num_params: int | None
    causal: bool | None  # True: passed the probes; False: rejected for looking ahead
    seconds: float | None  # evaluator-measured seconds of evaluate_bpb, probes included
    wall_seconds: float  # harness-measured, from launch to exit
    reason: str  # why it was not ok
    log_path: Path | None
    log_tail: str = ""

    @property
    def ok(self) -> bool:
        return (
            self.status == EvalStatus.ok
            and self.val_bpb is not None
            and math.isfinite(self.val_bpb)
        )


def evaluate_checkpoint(
    root: Path,
    checkpoint: Path,
    *,
    split: str,
    preset: str,
    device: str,
    timeout: float,
    log_path: Path,
    fingerprints: Mapping[str, str] | None = None,
    train_file: Path | None = None,
    dataset: Path | None = None,
    gpu: str | None = None,
    prefix: Sequence[str] = (),
    cancel: threading.Event | None = None,
    marker: str | None = None,
    warm: Prestarted | None = None,
    boxed: bool | None = None,
) -> EvalResult:
    """Evaluate `checkpoint` with train.py's `load_model` in a sealed child process.

    `root` is the workspace (its prepare.py is the trusted one); `train_file` the train.py
    whose load_model rebuilds the model (default: the workspace's). `fingerprints` are the
    session's (prepare.py, the data files); the child refuses to run on anything else.
    `dataset` pins the prepared dataset's directory. `prefix` goes in front of the command
    (network isolation). The child runs like a training child (runner.run_training: its own
    process group, a hard `timeout`, a secret-free environment, its output in `log_path`).

    `warm`: an evaluator from `start_warm`, used (its marker, not `marker`) when it was started
    for the same arguments and is still alive, else discarded; it is consumed either way.
    `boxed`: whether the candidate's model processes run in the box (default: where it is
    available, sandbox.probe).
    """
    boxed = sandbox.probe().available if boxed is None else boxed
    key = WarmKey.of(root, split, preset, device, fingerprints, dataset, gpu, prefix, boxed)
    if warm is not None and (not warm.alive() or warm.key != key):
        warm.discard()
        warm = None
    if not checkpoint.is_file():
        if warm is not None:
            warm.discard()
        return EvalResult(
            EvalStatus.no_checkpoint,
            None,
            None,
            None,
            None,
            0.0,
            f"train.py left no checkpoint at {checkpoint}: it must save its final model there "
            "(save_checkpoint, when AUTORESEARCH_CHECKPOINT is set) and exit 0",
            None,
        )
    with tempfile.TemporaryDirectory(prefix="autoresearch-eval-") as tmp:
        nonce = secrets.token_hex(16)
        nonce_file = Path(tmp) / "nonce"
        nonce_file.write_text(nonce)
        prints_file = Path(tmp) / "fingerprints.json"
        prints_file.write_text(json.dumps(dict(fingerprints or {})))
        train = str(train_file or root / "train.py")
        args = [
            *command_args(root, split, preset, device, boxed),
            *("--train", train, "--checkpoint", str(checkpoint)),
            *("--nonce-file", str(nonce_file), "--fingerprints", str(prints_file)),
        ]
        if warm is not None:  # told the same by its go line; `args` if it dies before
            warm.message = {"checkpoint": str(checkpoint), "train": train, "nonce": nonce}
            marker = warm.marker
        lines: list[str] = []
        run = run_training(
            root,
            log_path,
            command=[*prefix, *_child_command(root), *args],
            env=_child_env(preset, device, gpu, dataset),
            timeout=timeout,
            on_line=lines.append,
            cancel=cancel,
            marker=marker,
            warm=warm,
        )
    result = _parse_result(lines, nonce)
    tail = "\n".join(run.log_tail.splitlines()[-TAIL_LINES:])
    if result is None:
        if run.crash_class in (CrashClass.timeout, CrashClass.stall, CrashClass.interrupted):
            reason = (
                f"the evaluator was stopped ({run.crash_class}) after {run.wall_seconds:.0f}s; "
                "does importing train.py start training? Keep the training run under "
                '`if __name__ == "__main__":`'
            )
            if run.crash_class == CrashClass.interrupted:
                reason = "interrupted"
        else:
            reason = f"the evaluator exited {run.exit_code} without a result; see {log_path}"
        return EvalResult(
            EvalStatus.error, None, None, None, None, run.wall_seconds, reason, log_path, tail
        )
    val_bpb = result.get("val_bpb")
    return EvalResult(
        status=EvalStatus(result["status"]),
        val_bpb=float(val_bpb) if isinstance(val_bpb, (int, float)) else None,
        num_params=result.get("num_params"),
        causal=result.get("causal"),
        seconds=result.get("seconds"),
        wall_seconds=run.wall_seconds,
        reason=str(result.get("reason", "")),
        log_path=log_path,
        log_tail=tail,
    )


def start_warm(
    root: Path,
    *,
    split: str,
    preset: str,
    device: str,
    fingerprints: Mapping[str, str] | None = None,
    dataset: Path | None = None,
    gpu: str | None = None,
    prefix: Sequence[str] = (),
    marker: str | None = None,
    boxed: bool | None = None,
) -> Prestarted | None:
    """The evaluator started before the checkpoint exists (for `evaluate_checkpoint(warm=)`):
    it checks prepare.py and reads the split's data against `fingerprints`, imports torch and
    takes its snapshots, then waits for the go, which brings the checkpoint, train.py and the
    nonce; nothing untrusted runs in it before then. It touches no GPU until the go. None when
    no process could be started."""
    boxed = sandbox.probe().available if boxed is None else boxed
    key = WarmKey.of(root, split, preset, device, fingerprints, dataset, gpu, prefix, boxed)
    command = [*prefix, *_child_command(root), *command_args(root, split, preset, device, boxed)]
    try:
        return Prestarted(
            [*command, "--wait"],
            root,
            _child_env(preset, device, gpu, dataset),
            stands_for=command,  # the go brings the rest of evaluate_checkpoint's arguments
            marker=marker,
            first={"fingerprints": dict(fingerprints or {})},
            key=key,
        )
    except OSError:
        return None


@dataclass(frozen=True)
class WarmKey:
    """What an evaluator started ahead was started for: every argument of `start_warm` that
    changes the evaluator's command, environment or data (all but `marker`). An evaluation is
    served by a warm evaluator only when the two keys are equal; a test holds the fields to
    start_warm's parameters, so a new or renamed argument cannot silently go unchecked."""

    root: str
    split: str
    preset: str
    device: str
    fingerprints: tuple[tuple[str, str], ...]
    dataset: str | None
    gpu: str | None
    prefix: tuple[str, ...]
    boxed: bool

    @classmethod
    def of(
        cls,
        root: Path,
        split: str,
        preset: str,
        device: str,
        fingerprints: Mapping[str, str] | None,
        dataset: Path | None,
        gpu: str | None,
        prefix: Sequence[str],
        boxed: bool,
    ) -> WarmKey:
        return cls(
            root=str(root),
            split=split,
            preset=preset,
            device=device,
            fingerprints=tuple(sorted((fingerprints or {}).items())),
            dataset=None if dataset is None else str(dataset),
            gpu=gpu,
            prefix=tuple(prefix),
            boxed=bool(boxed),
        )


def _child_env(preset: str, device: str, gpu: str | None, dataset: Path | None) -> dict[str, str]:
    # One compile thread: no worker pool left behind by the evaluator's os._exit.
    extra = {"AUTORESEARCH_CHECKPOINT": "", "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    if dataset is not None:
        extra.update(AUTORESEARCH_CACHE=str(dataset.parent), AUTORESEARCH_DATASET=dataset.name)
    return child_env(dict(os.environ), preset=preset, device=device, gpu=gpu, extra=extra)


def sealed_outcome(run: RunResult, ev: EvalResult) -> tuple[RunResult, dict[str, object]]:
    """(the training run as the session records it, notes for the experiment's extra).

    `run` is the runner.RunResult of a training child that exited 0; `ev` what the evaluator
    said about its checkpoint. The summary's val_bpb becomes the evaluator's; train.py's own
    number, if it printed one, is kept as `reported_val_bpb` and a disagreement larger than
    DISAGREE_BPB is noted. A failed evaluation becomes a crash class (`no_checkpoint`, `eval`,
    `nan`, `interrupted`) or `rejected`, which the loop records as the status `rejected`.
    """
    reported = run.summary.get("val_bpb")
    summary = {k: v for k, v in run.summary.items() if k != "val_bpb"}
    if reported is not None:
        summary["reported_val_bpb"] = reported
    if ev.num_params is not None:
        summary["num_params"] = float(ev.num_params)
    if ev.seconds is not None:
        summary["eval_seconds"] = float(ev.seconds)
    notes: dict[str, object] = {"eval_wall_s": round(ev.wall_seconds, 2)}
    crash_class = None
    if ev.ok:
        summary["val_bpb"] = ev.val_bpb
        if reported is not None and not abs(reported - ev.val_bpb) <= DISAGREE_BPB:
            notes["reported_disagrees"] = (
                f"train.py printed val_bpb {reported:.6f}; the sealed evaluator measured "
                f"{ev.val_bpb:.6f} (the record uses the evaluator's)"
            )
    elif ev.status == EvalStatus.rejected:
        crash_class = CrashClass.rejected
    elif ev.status == EvalStatus.no_checkpoint:
        crash_class = CrashClass.no_checkpoint
    elif ev.status == EvalStatus.ok:
        crash_class = CrashClass.nan
        ev.reason = f"the evaluator measured val_bpb {ev.val_bpb} (not finite)"
    elif ev.reason == "interrupted":
        crash_class = CrashClass.interrupted
    else:
        crash_class = CrashClass.eval
    log_tail = run.log_tail
    if crash_class is not None:
        notes["reason"] = ev.reason
        log_tail += f"\n[autoresearch] sealed evaluation: {ev.reason}"
        if crash_class == CrashClass.eval and ev.log_tail:
            log_tail += "\n" + ev.log_tail
    return replace(run, summary=summary, crash_class=crash_class, log_tail=log_tail), notes


def _child_command(root: Path) -> list[str]:
    """python in isolated mode (no cwd, no PYTHONPATH, no user site on sys.path, so a module
    planted in the workspace cannot shadow torch or json), given this process's import path
    minus the workspace so it finds the same torch and this package."""
    package_parent = str(Path(__file__).resolve().parents[1])
    workspace = str(root.resolve())
    paths = [package_parent] + [
        p for p in sys.path if p and p != "." and os.path.abspath(p) != workspace
    ]
    boot = (
        "import sys, json; sys.path[:0] = json.loads(sys.argv.pop(1)); "
        "from autoresearch.sealed_eval import main; sys.exit(main(sys.argv[1:]))"
    )
    return [sys.executable, "-I", "-u", "-c", boot, json.dumps(paths)]


def _parse_result(lines: list[str], nonce: str) -> dict | None:
    """The last output line that is a JSON object carrying our nonce and a known status."""
    for line in reversed(lines):
        text = line.strip()
        if not text.startswith("{"):
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            continue
        if (
            isinstance(value, dict)
            and value.get("nonce") == nonce
            and value.get("status") in STATUSES
        ):
            return value
    return None
