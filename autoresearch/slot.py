"""A slot: the place one training run happens, and the run's measurement by the sealed evaluator.

A `Slot` trains the train.py in its working tree (`root`) with one seed and, in a sealed
session, has the sealed evaluator measure the checkpoint; `train` returns a `RunOutcome` value
(the run's result, what the evaluation said, and a fingerprint error to raise once the
experiment is recorded). It keeps the next run's interpreter warm (runner.WarmChild).

Guarantees: every run's outcome names where it trained: the node (`node`: the host's name, or
what the caller names it, e.g. a Ray node id) and, on cuda, the card (`gpu`: its UUID, as
nvidia-smi prints it, looked up on the host where the run trains); every process of a run
carries a marker that is handed to `mark` (which records
it in state.json) before the process starts, so `--resume` can kill what a kill -9 left
running; in a sealed session the fingerprints are checked before and after training and after
evaluation, and a run whose data moved comes back as `rejected`.

What it does not do: decide anything, write the record or measurements.jsonl, or run git
(the caller checks out what the slot trains).
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from . import evaluator, fingerprint, noise, runner, sandbox
from .display import Display
from .options import SessionOptions
from .status import CrashClass
from .workspace import TRAIN_FILE, cache_dir

CHECKPOINT_FILE = "checkpoint.pt"  # in the experiment's folder while its runs are judged
# crash classes of runs whose checkpoint is not evaluated: the harness ended them, or they
# trained past the budget
NOT_EVALUATED = (
    CrashClass.timeout,
    CrashClass.stall,
    CrashClass.interrupted,
    CrashClass.over_budget,
)
GPU_UUID_TIMEOUT_S = 120.0  # the lookup's torch import and CUDA start, on a busy host
# prints the UUID of the first card this process sees, with nvidia-smi's `GPU-` prefix
_GPU_UUID_SCRIPT = (
    "import torch\n"
    "u = str(torch.cuda.get_device_properties(0).uuid)\n"
    "print(u if u.startswith('GPU-') else 'GPU-' + u)\n"
)


@dataclass(frozen=True)
class Sealing:
    """How candidate code is contained and what the metric depends on, for the whole session."""

    box: sandbox.Box | None  # the box candidate code runs in; None: unboxed
    isolation: runner.Isolation
    sealed: Mapping  # dataset, fingerprints, time_budget; empty when not sealed

    def check(self, root: Path, opts: SessionOptions, when: str) -> None:
        """Raises fingerprint.FingerprintError when what the metric depends on moved."""
        if self.sealed:
            fingerprinter(root, opts, Path(self.sealed["dataset"])).check(
                self.sealed["fingerprints"], tag=opts.tag, when=when
            )

    def env(self) -> dict[str, str]:
        """The session's dataset, pinned for the children (ACTIVE may change under us)."""
        dataset = Path(self.sealed["dataset"])
        return {"AUTORESEARCH_CACHE": str(dataset.parent), "AUTORESEARCH_DATASET": dataset.name}


def fingerprinter(root: Path, opts: SessionOptions, dataset: Path) -> fingerprint.Fingerprinter:
    return fingerprint.Fingerprinter(root, dataset, opts.preset, opts.time_budget)


@dataclass(frozen=True)
class RunOutcome:
    """One run of one train.py: what the runner (and the sealed evaluator) said."""

    result: runner.RunResult
    seed: int
    notes: Mapping  # what the sealed evaluation said (goes to Experiment.extra)
    fatal: fingerprint.FingerprintError | None = None  # raise after the record is written
    node: str | None = None  # where it trained: the host, or the Ray node
    gpu: str | None = None  # the card's UUID on cuda (None on the cpu, or not known)

    @property
    def summary(self) -> dict:
        return self.result.summary


class Slot:
    """Trains one run at a time in `root`; `name` is how records and the display call it."""

    def __init__(
        self,
        root: Path,
        opts: SessionOptions,
        sealing: Sealing,
        display: Display,
        cancel: threading.Event,
        *,
        mark: Callable[[str, str], None],
        name: str = noise.DEFAULT_SLOT,
        gpu: str | None = None,
        card: str | None = None,
        node: str | None = None,
        shown: bool = False,
        warm: runner.WarmChild | None = None,
    ) -> None:
        """`mark(key, marker)` records a process marker ("run_marker", "eval_marker") where a
        resume finds it; `gpu`: the card this slot trains on (default: the session's), `card`
        its name for the record; `node`: the name of this host in the record (default: its
        host name); `shown`: the display shows this slot's line (one of several)."""
        self.root = root
        self.opts = opts
        self.sealing = sealing
        self.display = display
        self.cancel = cancel
        self.mark = mark
        self.name = name
        self.gpu = gpu if gpu is not None else opts.gpu
        self.card = card
        self.node = node or socket.gethostname()
        self._shown = name if shown else None
        self.train_wall = 0.0  # seconds this slot spent training
        self._warm = warm  # the next run's interpreter, imports done
        self._warm_eval: runner.Prestarted | None = None  # the run in flight's evaluator

    def train(
        self, exp_id: int, exp_dir: Path, label: str, log_name: str, run: int, *, keep: bool
    ) -> RunOutcome:
        """One training run of the train.py in `root` with seed noise.seed_of(run).

        Sealed: train.py saves its model to the experiment's checkpoint and the val_bpb is the
        sealed evaluator's; `keep` False deletes the checkpoint after (a pair run: the best
        keeps the checkpoint it was kept with).
        """
        seed = noise.seed_of(run)
        opts = self.opts
        if self._shown is None:
            self.display.training(exp_id, label, opts.time_budget)
        else:
            self.display.training(exp_id, label, opts.time_budget, slot=self._shown)
        checkpoint = exp_dir / CHECKPOINT_FILE
        extra = {"AUTORESEARCH_SEED": str(seed), **compile_cache_env(os.environ)}
        if opts.sealed:
            self.sealing.check(self.root, opts, f"before experiment {exp_id:04d} trained")
            checkpoint.unlink(missing_ok=True)
            extra.update(self.sealing.env(), AUTORESEARCH_CHECKPOINT=str(checkpoint))
            extra["AUTORESEARCH_SKIP_EVAL"] = "1"  # the evaluator measures; train.py need not
        warm = self._take_warm()
        marker = warm.marker if warm is not None else uuid.uuid4().hex
        self.mark("run_marker", marker)
        ahead = opts.start_ahead
        if ahead is None:
            ahead = opts.device == "cuda"  # the card trains: the host has cores to spare
        if ahead:
            self._start_warm()  # the next run's imports, done long before they are needed
            self._start_warm_eval()  # this run's evaluator, ready when the checkpoint is
        box = self.sealing.box
        result = runner.run_training(
            self.root,
            exp_dir / log_name,
            command=[
                *(() if box else self.sealing.isolation.prefix),
                *(opts.command or [sys.executable, TRAIN_FILE]),
            ],
            env=self._child_env(extra),
            timeout=opts.hard_timeout,
            stall_timeout=opts.stall_timeout,
            on_step=self._on_step,
            cancel=self.cancel,
            marker=marker,
            warm=warm,
            budget=opts.budget,
            box=box,
        )
        self.train_wall += result.wall_seconds
        if not ahead and not self.cancel.is_set():
            # on the cpu preset the imports would slow the run itself: start them after it,
            # while it is evaluated and recorded
            self._start_warm()
        node, gpu = self.place()
        if not opts.sealed:
            return RunOutcome(result, seed, {}, node=node, gpu=gpu)
        outcome = self._evaluate(exp_id, result, seed, checkpoint, log_name, marker)
        if not keep:
            checkpoint.unlink(missing_ok=True)
        return replace(outcome, node=node, gpu=gpu)

    def place(self) -> tuple[str, str | None]:
        """(node, card UUID) of this slot's runs: the card is the one its children see (the
        slot's `gpu`, else this process's CUDA_VISIBLE_DEVICES); None on the cpu."""
        if self.opts.device != "cuda":
            return self.node, None
        return self.node, gpu_uuid(self.gpu if self.gpu is not None else _visible())

    def card_key(self) -> tuple[str, str] | None:
        """Where this slot's next run trains, for pairing it (noise.Measurements.partner):
        (node, card UUID), or None when not known (the cpu)."""
        node, gpu = self.place()
        return (node, gpu) if gpu is not None else None

    def _on_step(self, step) -> None:
        if self._shown is None:
            self.display.step(step)
        else:
            self.display.step(step, slot=self._shown)

    def _evaluate(
        self,
        exp_id: int,
        result: runner.RunResult,
        seed: int,
        checkpoint: Path,
        log_name: str,
        marker: str,
    ) -> RunOutcome:
        """The run with val_bpb measured by the sealed evaluator, in a process of its own.

        A run that exited 0 (on its own) is trained; its checkpoint is evaluated. The
        fingerprints are checked after training and after evaluation (train.py's code runs in
        both): a change is returned as `rejected` with the error as `fatal`.
        """
        trained = result.exit_code == 0 and result.crash_class not in NOT_EVALUATED
        warm, self._warm_eval = self._warm_eval, None
        fatal = self._moved(f"after experiment {exp_id:04d} trained")
        if fatal is not None or not trained:
            if warm is not None:
                warm.discard()
            checkpoint.unlink(missing_ok=True)
            if fatal is not None:
                return _rejected(RunOutcome(result, seed, {}, fatal))
            return RunOutcome(result, seed, {})
        self.display.note(f"exp {exp_id:04d}: sealed evaluation of the checkpoint")
        sealed = self.sealing.sealed
        ev = evaluator.evaluate_checkpoint(
            self.root,
            checkpoint,
            split="val",
            preset=self.opts.preset,
            device=self.opts.device,
            gpu=self.gpu,
            timeout=self.opts.hard_timeout,
            log_path=checkpoint.parent / log_name.replace(".log", ".eval.log"),
            fingerprints=sealed["fingerprints"],
            dataset=Path(sealed["dataset"]),
            prefix=self.sealing.isolation.prefix,
            cancel=self.cancel,
            marker=marker,
            warm=warm,
            boxed=self.sealing.box is not None,
        )
        result, notes = evaluator.sealed_outcome(result, ev)
        outcome = RunOutcome(result, seed, notes)
        fatal = self._moved(f"after experiment {exp_id:04d} was evaluated")
        if fatal is not None:
            outcome = _rejected(replace(outcome, fatal=fatal))
        if not outcome.result.ok:
            checkpoint.unlink(missing_ok=True)
        return outcome

    def _moved(self, when: str) -> fingerprint.FingerprintError | None:
        try:
            self.sealing.check(self.root, self.opts, when)
        except fingerprint.FingerprintError as exc:
            return exc
        return None

    # ----------------------------------------------------------------- warm children

    def _start_warm(self) -> None:
        """Start the next run's interpreter now (runner.WarmChild), when the run command is
        the default and the train.py in the working tree imports torch or numpy and sets no
        environment variables; its environment is the next run's minus the per-run variables.
        On cuda it is started as a run starts, elsewhere once the run has exited."""
        self.discard_warm()
        if not self.opts.warm_start or self.opts.command is not None:
            return
        env = self._child_env(compile_cache_env(os.environ))
        self._warm = warm_child_for(self.root, env, self.sealing.isolation.prefix, self.sealing.box)

    def _take_warm(self) -> runner.WarmChild | None:
        """The warm child, if it may run the train.py now in the working tree (it was started
        for the one before: the candidate checked out since may set environment variables)."""
        warm, self._warm = self._warm, None
        if warm is None:
            return None
        source = (self.root / TRAIN_FILE).read_text(encoding="utf-8", errors="replace")
        if not runner.warm_start_ok(source):
            warm.discard()
            return None
        return warm

    def _start_warm_eval(self) -> None:
        """In a sealed session with warm starts, start the sealed evaluator as the run starts
        (evaluator.start_warm): its imports and data checks are done when the checkpoint is."""
        self._discard_warm_eval()
        if self.opts.sealed and self.opts.warm_start:
            self._warm_eval = evaluator.start_warm(
                self.root,
                split="val",
                preset=self.opts.preset,
                device=self.opts.device,
                gpu=self.gpu,
                fingerprints=self.sealing.sealed["fingerprints"],
                dataset=Path(self.sealing.sealed["dataset"]),
                prefix=self.sealing.isolation.prefix,
                boxed=self.sealing.box is not None,
            )
        if self._warm_eval is not None:  # its own marker: a resume kills it too
            self.mark("eval_marker", self._warm_eval.marker)

    def _child_env(self, extra: dict[str, str]) -> dict[str, str]:
        """A training child's environment: this process's minus secrets, plus `extra`."""
        return runner.child_env(
            dict(os.environ),
            preset=self.opts.preset,
            device=self.opts.device,
            gpu=self.gpu,
            extra=extra,
        )

    def discard_warm(self) -> None:
        warm, self._warm = self._warm, None
        if warm is not None:
            warm.discard()

    def _discard_warm_eval(self) -> None:
        warm, self._warm_eval = self._warm_eval, None
        if warm is not None:
            warm.discard()

    def close(self) -> None:
        """Discard the processes waiting for a next run."""
        self.discard_warm()
        self._discard_warm_eval()


def _rejected(outcome: RunOutcome) -> RunOutcome:
    reason = f"the run changed what the metric depends on: {outcome.fatal}"
    result = replace(
        outcome.result,
        crash_class=CrashClass.rejected,
        log_tail=outcome.result.log_tail + f"\n[autoresearch] {reason}",
    )
    return replace(outcome, result=result, notes={**(outcome.notes or {}), "reason": reason})


def warm_child_for(
    root: Path, env: Mapping[str, str], prefix: Sequence[str], box: sandbox.Box | None = None
) -> runner.WarmChild | None:
    """A WarmChild for the train.py in `root` (the default command), or None when it imports
    nothing worth preloading, writes the environment, or no process could be started (the run
    then starts cold). With `box`, it waits in a box of its own (for its run's `box=`)."""
    try:
        source = (root / TRAIN_FILE).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    preload = runner.warm_preload(source)
    if not preload or not runner.warm_start_ok(source):
        return None
    try:
        cell = box.cell(root, dataset=sandbox.dataset_of(env)) if box is not None else None
        return runner.WarmChild(root, env, preload=preload, prefix=prefix, cell=cell)
    except OSError:
        return None


def _visible() -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")


@functools.cache
def gpu_uuid(visible: str | None) -> str | None:
    """The UUID (`GPU-...`) of the first card a process sees with CUDA_VISIBLE_DEVICES set to
    `visible` (None: this process's), or None when it cannot be told (no CUDA). torch is asked
    in a process of its own, so this one opens no CUDA context on the card; once per value
    and process, the answer cached."""
    env = dict(os.environ)
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    try:
        done = subprocess.run(
            [sys.executable, "-c", _GPU_UUID_SCRIPT],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=GPU_UUID_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = done.stdout.strip()
    return found if done.returncode == 0 and found.startswith("GPU-") else None


def compile_cache_env(environ: Mapping[str, str]) -> dict[str, str]:
    """Keep torch.compile's caches between experiments, in the data cache, not in /tmp.

    Most edits change constants, not shapes, so the next run finds its compiled graphs and
    autotuning results on disk instead of compiling from scratch. A user's own setting wins.
    """
    if environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return {}
    return {
        "TORCHINDUCTOR_CACHE_DIR": str(cache_dir(dict(environ)) / "compile"),
        "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
        "TORCHINDUCTOR_AUTOGRAD_CACHE": "1",
    }
