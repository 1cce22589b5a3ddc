"""`--backend ray`: a slot whose runs are Ray tasks, placed by Ray on any node of a cluster.

A `RaySlot` is a `Slot` for the coordinator (coordinator.py): its `train` sends what one run
needs to a Ray task (`num_gpus=1` on cuda, `num_cpus=1` on the cpu) and returns the
`RunOutcome` that came back. The task builds a plain `Slot` on its node, in a scratch
directory holding the candidate's train.py and the workspace's prepare.py, and trains there
exactly as a local slot does.

What travels to the node: train.py and prepare.py (their bytes), the seed (the run number),
the session's options, its dataset path, fingerprints and time budget. The dataset is read on
the node at the session's path, or under the node's own `AUTORESEARCH_CACHE` when the node's
environment sets it (the data lives elsewhere there).

Every run's outcome names the Ray node id it trained on and, on cuda, the UUID of its card
(looked up on the node: Slot.place); the measurements record both.

What comes back into the experiment's folder of the coordinator's runs/<tag>/: the run's log,
the evaluator's log, and the checkpoint when the run's checkpoint is kept (`keep`); the
summary and the evaluator's notes travel in the `RunOutcome`.

Guarantees:
- In a sealed session the node checks the prepared data, prepare.py and the preset against
  the coordinator's fingerprints before the run, and after training and evaluation; a node
  whose data differs trains nothing: the run comes back `rejected` with the node named, and,
  as with a local slot, the session stops once it is recorded. The sealed evaluator runs on
  the node, in the node's box (sandbox.py) unless the session is unsandboxed.
- A run whose Ray worker or node is lost (the task's process killed, the node gone) is trained
  again, up to LOST_RETRIES times; only a run that came back is returned, so the coordinator
  records and measures it once. After LOST_RETRIES losses in a row the run raises
  `WorkerLost`: the session stops with the experiment still in state.json, and `--resume`
  trains it again.
- A run's training processes die with the Ray worker that started them (runner.run_training:
  the parent-death signal and a guard), so a lost worker leaves nothing holding the card.
- Ray is optional: `require_ray` raises a UsageError naming the install command.

The sandbox is probed once per node and session (`node_box`), not per run: the first run of
the session on a node probes bubblewrap, and the node's later runs read the result back from
the node's cache directory.

What it does not do: show a run's step lines while it trains (the log comes back at the end),
choose the card a run trains on (Ray does: a candidate's run may land on another card than the
incumbent run it is paired with, see RaySlot.card_key), kill runs on other nodes on `--resume` after a
kill -9 of the coordinator (Ray ends the tasks of a driver that died), or copy the data to the
nodes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import noise, runner, sandbox
from .errors import AutoresearchError, DataError, UsageError
from .fingerprint import FingerprintError
from .slot import CHECKPOINT_FILE, RunOutcome, Sealing, Slot, _rejected
from .workspace import TRAIN_FILE, cache_dir

PREPARE_FILE = "prepare.py"
INSTALL = "pip install 'autoresearch[ray]'"
LOST_RETRIES = 3  # losses of one run's worker in a row before the session stops
POLL_S = 0.5  # how often a waiting slot looks at Ctrl-C
BOX_PROBES_DIR = "box-probes"  # under a node's cache directory: its sandbox probes, by key


class WorkerLost(AutoresearchError):
    """A run's Ray worker was lost LOST_RETRIES times in a row."""


def require_ray() -> Any:
    """The `ray` module; UsageError with the install command when it is not installed."""
    try:
        import ray
    except ImportError as exc:
        raise UsageError(
            f"--backend ray needs Ray, which is not installed here ({exc}): {INSTALL}"
        ) from None
    return ray


def connect(address: str | None) -> Any:
    """Ray, connected to the cluster at `address` (None: a cluster of this host, started
    for the session), unless this process is connected already."""
    ray = require_ray()
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    return ray


@dataclass(frozen=True)
class Payload:
    """What one run needs on a node."""

    train: bytes
    prepare: bytes | None
    run: int  # the seed is noise.seed_of(run)
    exp_id: int
    label: str
    log_name: str
    keep: bool
    opts: Any  # SessionOptions
    sealed: dict  # dataset, fingerprints, time_budget; empty when not sealed


@dataclass(frozen=True)
class Returned:
    """What came back from a node: the outcome and the files for the experiment's folder."""

    outcome: RunOutcome
    files: dict[str, bytes]
    node: str


def node_dataset(session_dataset: str, environ: dict[str, str]) -> Path:
    """Where this node's copy of the session's dataset is: under the node's AUTORESEARCH_CACHE
    when set, else at the session's path (the same path on every node)."""
    cache = environ.get("AUTORESEARCH_CACHE")
    dataset = Path(session_dataset)
    return Path(cache).expanduser() / dataset.name if cache else dataset


def train_on_node(payload: Payload) -> Returned:
    """One run on this node (the body of the Ray task): a Slot in a scratch directory."""
    node = socket.gethostname()
    scratch = Path(tempfile.mkdtemp(prefix="autoresearch-ray-"))
    try:
        root, exp_dir = scratch / "work", scratch / "exp"
        root.mkdir()
        exp_dir.mkdir()
        (root / TRAIN_FILE).write_bytes(payload.train)
        if payload.prepare is not None:
            (root / PREPARE_FILE).write_bytes(payload.prepare)
        opts = replace(payload.opts, warm_start=False)  # one run per task: nothing to warm
        sealed = dict(payload.sealed)
        if sealed:
            sealed["dataset"] = str(node_dataset(sealed["dataset"], dict(os.environ)))
        context = require_ray().get_runtime_context()
        box = None
        if not opts.unsandboxed:
            probed = node_box(
                context.get_node_id(), context.get_job_id(), cache_dir(dict(os.environ))
            )
            box = sandbox.require(probed, unsandboxed=False)
        sealing = Sealing(box, runner.network_isolation(), sealed)
        try:
            sealing.check(root, opts, f"on node {node} before experiment {payload.exp_id:04d}")
        except DataError as exc:  # FingerprintError included: this node's data differs
            return Returned(_refused(exp_dir / payload.log_name, exc, node, payload.run), {}, node)
        slot = Slot(
            root, opts, sealing, _Quiet(), threading.Event(), mark=lambda key, marker: None,
            node=context.get_node_id(),
        )  # fmt: skip
        try:
            outcome = slot.train(
                payload.exp_id, exp_dir, payload.label, payload.log_name, payload.run,
                keep=payload.keep,
            )  # fmt: skip
        finally:
            slot.close()
        files = {}
        for name in (payload.log_name, payload.log_name.replace(".log", ".eval.log")):
            if (exp_dir / name).is_file():
                files[name] = (exp_dir / name).read_bytes()
        if payload.keep and (exp_dir / CHECKPOINT_FILE).is_file():
            files[CHECKPOINT_FILE] = (exp_dir / CHECKPOINT_FILE).read_bytes()
        notes = {**(outcome.notes or {}), "node": node} if outcome.notes else outcome.notes
        return Returned(replace(outcome, notes=notes), files, node)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def node_box(node: str, session: str, cache: Path) -> sandbox.Box:
    """The sandbox probe (sandbox.probe) of this node for the session: made by the session's
    first run on the node, read back by the others from `cache`/box-probes/<key>.json. The
    key is the node, the session (the Ray job), this interpreter and the bwrap binary (its
    path, size and mtime), so a changed tool is probed again. Only a box that works is kept:
    a failed probe (perhaps a busy node's timeout) is made again by the next run."""
    bwrap = shutil.which(sandbox.BWRAP)
    stamp = None
    if bwrap is not None:
        info = os.stat(bwrap)
        stamp = [bwrap, info.st_size, info.st_mtime_ns]
    key = json.dumps([node, session, sys.executable, stamp])
    path = cache / BOX_PROBES_DIR / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"
    try:
        kept = json.loads(path.read_text(encoding="utf-8"))
        if kept["boxed"]:
            return sandbox.Box(True, kept["note"], kept["bwrap"], tuple(kept["layers"]))
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or torn: probe
        pass
    box = sandbox.probe()
    if box.available:
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_suffix(f".{os.getpid()}.part")  # runs of one node may race here
        part.write_text(json.dumps(box.record()), encoding="utf-8")
        os.replace(part, path)
    return box


def _refused(log_path: Path, exc: DataError, node: str, run: int) -> RunOutcome:
    result = runner.RunResult(
        exit_code=None,
        summary={},
        crash_class=None,
        wall_seconds=0.0,
        log_path=log_path,
        log_tail=f"[autoresearch] node {node} refused to train: {exc}",
        last_step=None,
    )
    fatal = exc if isinstance(exc, FingerprintError) else FingerprintError(str(exc))
    outcome = _rejected(RunOutcome(result, noise.seed_of(run), {}, fatal))
    return replace(outcome, notes={**outcome.notes, "node": node})


class _Quiet:
    """The display of a slot on a node: the coordinator's display shows the run."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


class RaySlot(Slot):
    """A slot of the coordinator whose runs train as Ray tasks; see the module docstring."""

    def __init__(self, *args, address: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._ray = connect(address)
        resources = {"num_gpus": 1} if self.opts.device == "cuda" else {"num_cpus": 1}
        # max_retries=0: a lost run is trained again here, where it is counted
        self._task = self._ray.remote(max_retries=0, **resources)(train_on_node)
        self._last_card: tuple[str, str] | None = None

    def train(
        self, exp_id: int, exp_dir: Path, label: str, log_name: str, run: int, *, keep: bool
    ) -> RunOutcome:
        """One run of the train.py in `root` on a node Ray chooses; see Slot.train."""
        if self._shown is None:
            self.display.training(exp_id, label, self.opts.time_budget)
        else:
            self.display.training(exp_id, label, self.opts.time_budget, slot=self._shown)
        prepare = self.root / PREPARE_FILE
        payload = Payload(
            train=(self.root / TRAIN_FILE).read_bytes(),
            prepare=prepare.read_bytes() if prepare.is_file() else None,
            run=run, exp_id=exp_id, label=label, log_name=log_name, keep=keep,
            opts=self.opts, sealed=dict(self.sealing.sealed),
        )  # fmt: skip
        exceptions = self._ray.exceptions
        lost = (
            exceptions.WorkerCrashedError,
            exceptions.NodeDiedError,
            exceptions.TaskCancelledError,
            exceptions.ObjectLostError,
        )
        for attempt in range(1, LOST_RETRIES + 1):
            ref = self._task.remote(payload)
            try:
                returned = self._wait(ref)
            except lost as exc:
                if self.cancel.is_set():
                    return _interrupted(exp_dir / log_name, run)
                self.display.note(
                    f"exp {exp_id:04d}: its Ray worker was lost ({type(exc).__name__}), "
                    f"training it again ({attempt}/{LOST_RETRIES})"
                )
                continue
            if returned is None:
                return _interrupted(exp_dir / log_name, run)
            return self._landed(returned, exp_dir, log_name)
        raise WorkerLost(
            f"exp {exp_id:04d}: its Ray worker was lost {LOST_RETRIES} times in a row; "
            "check the cluster (`ray status`) and continue with --resume"
        )

    def _wait(self, ref) -> Returned | None:
        """The task's result; None once Ctrl-C cancelled it."""
        while True:
            done, _ = self._ray.wait([ref], timeout=POLL_S)
            if done:
                return self._ray.get(ref)
            if self.cancel.is_set():
                self._ray.cancel(ref, force=True)
                return None

    def card_key(self) -> tuple[str, str] | None:
        """The card of this slot's last run (None before it, and on the cpu): Ray places each
        task, so the next run's card is not known before it trains; a slot's tasks tend to
        land where its last one did, once the cluster is full."""
        return self._last_card

    def _landed(self, returned: Returned, exp_dir: Path, log_name: str) -> RunOutcome:
        """The files written into the experiment's folder; the outcome pointing at them."""
        exp_dir.mkdir(parents=True, exist_ok=True)
        for name, data in returned.files.items():
            (exp_dir / name).write_bytes(data)
        outcome = returned.outcome
        if outcome.node is not None and outcome.gpu is not None:
            self._last_card = (outcome.node, outcome.gpu)
        result = replace(outcome.result, log_path=exp_dir / log_name)
        self.train_wall += result.wall_seconds
        return replace(outcome, result=result)


def _interrupted(log_path: Path, run: int) -> RunOutcome:
    result = runner.RunResult(
        exit_code=None,
        summary={},
        crash_class="interrupted",
        wall_seconds=0.0,
        log_path=log_path,
        log_tail="[autoresearch] interrupted: its Ray task was cancelled",
        last_step=None,
    )
    return RunOutcome(result, noise.seed_of(run), {})
