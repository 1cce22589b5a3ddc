"""`--backend ray`: a slot whose runs all train on one card of a Ray cluster, held by an actor.

A `RaySlot` is a `Slot` for the coordinator (coordinator.py). It owns one Ray actor, a
`CardHolder` created with `num_gpus=1` on cuda (`num_cpus=1` on the cpu), which holds that
card (or core) for the session and trains every run of the slot, the incumbent's pair runs and
the candidate's runs alike. So the runs a slot pairs with each other trained on one card by
construction. For each run the slot sends what the run needs to its actor and returns the
`RunOutcome` that came back. The actor builds a plain `Slot` on its node, in a scratch
directory holding the candidate's train.py and the workspace's prepare.py, and trains there
exactly as a local slot does.

What travels to the node: train.py and prepare.py (their bytes), the seed (the run number),
the session's options, its dataset path, fingerprints and time budget. The dataset is read on
the node at the session's path, or under the node's own `AUTORESEARCH_CACHE` when the node's
environment sets it (the data lives elsewhere there).

Every run's outcome names the Ray node id it trained on and, on cuda, the UUID of its card
(looked up on the node: Slot.place); the measurements record both, and the record's `card`
names the card and the actor (`Place.label`; on the cpu, where no card is pinned, the actor
stands in for it).

What comes back into the experiment's folder of the coordinator's runs/<tag>/: the run's log,
the evaluator's log, and the checkpoint when the run's checkpoint is kept (`keep`); the
summary and the evaluator's notes travel in the `RunOutcome`.

Guarantees:
- Every run of a slot trains on its actor's card. A slot pairs runs by that card
  (`RaySlot.card_key`, asked of the live actor before each pairing).
- In a sealed session the node checks the prepared data, prepare.py and the preset against
  the coordinator's fingerprints before the run, and after training and evaluation; a node
  whose data differs trains nothing: the run comes back `rejected` with the node named, and,
  as with a local slot, the session stops once it is recorded. The sealed evaluator runs on
  the node, in the node's box (sandbox.py) unless the session is unsandboxed.
- A run whose actor is lost (its process killed, its node gone) is trained again by a new
  actor, up to LOST_RETRIES times; only a run that came back is returned, so the coordinator
  records and measures it once. The new actor is asked for on the lost one's node first (a
  soft preference: the card the lost one held is free there); wherever it lands, its card is
  the slot's card from then on, so later pairs are made on it, and the record's `card` shows
  the change. The run itself, when its partner was chosen on the lost card, is paired again
  on the new one (trial.py trains the best there with its seed before recording it). After
  LOST_RETRIES losses in a row the run raises `WorkerLost`: the session stops with the
  experiment still in state.json, and `--resume` trains it again.
- A run's training processes die with the actor that started them (runner.run_training: the
  parent-death signal and a guard), so a lost actor leaves nothing holding the card.
- A session never asks for more cards than the cluster has: `--workers` above its GPUs (CPUs
  on the cpu) is a UsageError raised before the session creates its branch or anything else
  (`check_capacity`, called by commands._ray_slots): each slot holds its card for the whole
  session, so a slot beyond them would wait forever.
- Ray is optional: `require_ray` raises a UsageError naming the install command.

The sandbox is probed once per node and session (`node_box`), not per run: the first run of
the session on a node probes bubblewrap, and the node's later runs read the result back from
the node's cache directory, where probes no session used for PROBE_KEEP_S are removed.

What it does not do: show a run's step lines while it trains (the log comes back at the end);
choose which card of a node an actor gets (Ray does); keep a warm interpreter for the next run
on the node; kill runs on other nodes on `--resume` after a kill -9 of the coordinator (Ray
ends the actors of a driver that died); or copy the data to the nodes.
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
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import noise, runner, sandbox
from .errors import AutoresearchError, DataError, UsageError
from .fingerprint import FingerprintError
from .slot import CHECKPOINT_FILE, RunOutcome, Sealing, Slot, _rejected, gpu_uuid
from .workspace import TRAIN_FILE, cache_dir

PREPARE_FILE = "prepare.py"
INSTALL = "pip install 'autoresearch[ray]'"
LOST_RETRIES = 3  # losses of one run's actor in a row before the session stops
POLL_S = 0.5  # how often a waiting slot looks at Ctrl-C
BOX_PROBES_DIR = "box-probes"  # under a node's cache directory: its sandbox probes, by key
PROBE_KEEP_S = 7 * 24 * 3600  # a probe file no session read or wrote for a week is removed


class WorkerLost(AutoresearchError):
    """A run's Ray actor was lost LOST_RETRIES times in a row."""


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
class Place:
    """Where an actor trains: its node, its card (cuda) and itself."""

    node: str  # the Ray node id
    gpu: str | None  # the card's UUID (None on the cpu, or not known)
    host: str  # the node's host name
    actor: str  # the Ray actor id

    def key(self) -> tuple[str, str] | None:
        """The card key of noise.Measurements.partner: (node, UUID); None without a card."""
        return (self.node, self.gpu) if self.gpu is not None else None

    def label(self) -> str:
        """The record's `card`: the card (or, on the cpu, the core the actor holds) and the
        actor, so a run trained by a new actor reads differently from the runs before."""
        return f"{self.gpu or 'cpu'} on {self.host}, Ray actor {self.actor[:12]}"


@dataclass(frozen=True)
class Returned:
    """What came back from a node: the outcome and the files for the experiment's folder."""

    outcome: RunOutcome
    files: dict[str, bytes]
    node: str
    place: Place | None = None  # the actor that trained it; None for a plain task


def node_dataset(session_dataset: str, environ: dict[str, str]) -> Path:
    """Where this node's copy of the session's dataset is: under the node's AUTORESEARCH_CACHE
    when set, else at the session's path (the same path on every node)."""
    cache = environ.get("AUTORESEARCH_CACHE")
    dataset = Path(session_dataset)
    return Path(cache).expanduser() / dataset.name if cache else dataset


class CardHolder:
    """The Ray actor of one RaySlot: created with the slot's card (`num_gpus=1`, Ray sets its
    CUDA_VISIBLE_DEVICES) or core (`num_cpus=1`), it holds it until it is killed, and trains
    every run the slot sends it there, one at a time."""

    def __init__(self, device: str) -> None:
        self.device = device

    def where(self) -> Place:
        """This actor's node and card. The card's UUID is looked up once per actor (a process
        of its own with torch: slot.gpu_uuid), so asking again costs a round trip only."""
        context = require_ray().get_runtime_context()
        gpu = gpu_uuid(os.environ.get("CUDA_VISIBLE_DEVICES")) if self.device == "cuda" else None
        return Place(context.get_node_id(), gpu, socket.gethostname(), context.get_actor_id())

    def train(self, payload: Payload) -> Returned:
        return replace(train_on_node(payload), place=self.where())


def train_on_node(payload: Payload) -> Returned:
    """One run on this node (in a slot's CardHolder actor; a test calls it as a plain Ray
    task): a Slot in a scratch directory."""
    node = socket.gethostname()
    scratch = Path(tempfile.mkdtemp(prefix="autoresearch-ray-"))
    try:
        root, exp_dir = scratch / "work", scratch / "exp"
        root.mkdir()
        exp_dir.mkdir()
        (root / TRAIN_FILE).write_bytes(payload.train)
        if payload.prepare is not None:
            (root / PREPARE_FILE).write_bytes(payload.prepare)
        # no warm interpreter: it would wait in the actor for a run that may never come
        opts = replace(payload.opts, warm_start=False)
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
    a failed probe (perhaps a busy node's timeout) is made again by the next run. A probe read
    back is touched; writing one removes the others untouched for PROBE_KEEP_S (sessions long
    over), so the folder holds about one file per session of the last PROBE_KEEP_S."""
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
            os.utime(path)  # in use: not pruned while its session lasts
            return sandbox.Box(True, kept["note"], kept["bwrap"], tuple(kept["layers"]))
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or torn: probe
        pass
    box = sandbox.probe()
    if box.available:
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_suffix(f".{os.getpid()}.part")  # runs of one node may race here
        part.write_text(json.dumps(box.record()), encoding="utf-8")
        os.replace(part, path)
        prune_probes(path.parent, time.time() - PROBE_KEEP_S)
    return box


def prune_probes(folder: Path, before: float) -> list[Path]:
    """Remove the probe files (and torn `.part` files) in `folder` last touched before
    `before` (seconds since the epoch); the removed paths. Another node's run removing the
    same file at once is no error."""
    removed = []
    for path in folder.iterdir():
        if not path.name.endswith((".json", ".part")):
            continue
        try:
            if path.stat().st_mtime < before:
                path.unlink()
                removed.append(path)
        except FileNotFoundError:
            pass
    return removed


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


class _Cancelled(AutoresearchError):
    """Ctrl-C while a slot waited on its actor (RaySlot turns it into an interrupted run)."""


class RaySlot(Slot):
    """A slot of the coordinator whose runs train on the card of its own Ray actor; see the
    module docstring."""

    def __init__(self, *args, address: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._ray = connect(address)
        cuda = self.opts.device == "cuda"
        resources = {"num_gpus": 1} if cuda else {"num_cpus": 1}
        # max_restarts=0: a lost actor is replaced here, where its run is counted
        self._holder = self._ray.remote(max_restarts=0, max_task_retries=0, **resources)(CardHolder)
        exceptions = self._ray.exceptions
        self._lost = (
            exceptions.RayActorError,  # ActorDiedError, ActorUnavailableError
            exceptions.WorkerCrashedError,
            exceptions.NodeDiedError,
            exceptions.TaskCancelledError,
            exceptions.ObjectLostError,
        )
        self._actor: Any = None
        self._place: Place | None = None  # where the last answer of an actor came from
        self._answered = False  # whether the live actor has answered (so _place is its)

    def place(self) -> tuple[str, str | None]:
        """(Ray node id, card UUID) of this slot's actor, asked of it now (see card_key)."""
        place = self._where()
        return place.node, place.gpu

    def card_key(self) -> tuple[str, str] | None:
        """The card of this slot's actor (None on the cpu), asked of the actor now: one that
        died since its last run is replaced first, so the pairing is made on the card the next
        run trains on. None after Ctrl-C."""
        try:
            return self._where().key()
        except _Cancelled:
            return None

    def _where(self) -> Place:
        """The place of a live actor (started, or replaced after a loss, as needed)."""
        for attempt in range(1, LOST_RETRIES + 1):
            if self._actor is None:
                self._start_actor()
            try:
                return self._placed(self._wait(self._actor.where.remote()))
            except self._lost as exc:
                self._lose(exc, f"slot {self.name}", "a new actor is started", attempt)
        raise WorkerLost(
            f"slot {self.name}: its Ray actor was lost {LOST_RETRIES} times in a row before "
            "a run; check the cluster (`ray status`) and continue with --resume"
        )

    def train(
        self, exp_id: int, exp_dir: Path, label: str, log_name: str, run: int, *, keep: bool
    ) -> RunOutcome:
        """One run of the train.py in `root` on this slot's actor; see Slot.train."""
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
        for attempt in range(1, LOST_RETRIES + 1):
            if self.cancel.is_set():  # its actor is killed: start none for a run not to train
                return _interrupted(exp_dir / log_name, run)
            if self._actor is None:
                self._start_actor()
            try:
                returned = self._wait(self._actor.train.remote(payload))
            except _Cancelled:
                return _interrupted(exp_dir / log_name, run)
            except self._lost as exc:
                if self.cancel.is_set():
                    return _interrupted(exp_dir / log_name, run)
                self._lose(exc, f"exp {exp_id:04d}", "a new actor trains it again", attempt)
                continue
            return self._landed(returned, exp_dir, log_name)
        raise WorkerLost(
            f"exp {exp_id:04d}: its Ray actor was lost {LOST_RETRIES} times in a row; "
            "check the cluster (`ray status`) and continue with --resume"
        )

    def _start_actor(self) -> None:
        """A new actor for this slot; after a loss, preferably on the lost one's node (soft:
        anywhere else when that node is gone or has no free card)."""
        options: dict[str, Any] = {}
        if self._place is not None:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
                self._place.node, soft=True
            )
        self._actor = self._holder.options(**options).remote(self.opts.device)
        self._answered = False

    def _lose(self, exc: Exception, what: str, then: str, attempt: int) -> None:
        """The actor is lost: killed for good (an unreachable one might still train), its
        replacement started at the next call."""
        was = f" ({self._place.label()})" if self._place is not None and self._answered else ""
        self.display.note(
            f"{what}: its Ray actor{was} was lost ({type(exc).__name__}); "
            f"{then} ({attempt}/{LOST_RETRIES})"
        )
        self._kill()

    def _kill(self) -> None:
        actor, self._actor = self._actor, None
        if actor is not None:
            self._ray.kill(actor, no_restart=True)

    def _wait(self, ref) -> Any:
        """The call's result; raises _Cancelled, with the actor killed (and its run with it),
        once Ctrl-C cancelled the session's runs."""
        while True:
            done, _ = self._ray.wait([ref], timeout=POLL_S)
            if done:
                return self._ray.get(ref)
            if self.cancel.is_set():
                self._kill()
                raise _Cancelled("the session's runs were cancelled (Ctrl-C)")

    def _placed(self, place: Place) -> Place:
        """`place` as this slot's card from now on; a change is shown."""
        if self._place is not None and self._place.label() != place.label():
            self.display.note(f"slot {self.name} now trains on {place.label()}")
        self._place, self._answered = place, True
        self.card = place.label()
        return place

    def _landed(self, returned: Returned, exp_dir: Path, log_name: str) -> RunOutcome:
        """The files written into the experiment's folder; the outcome pointing at them."""
        if returned.place is not None:
            self._placed(returned.place)
        exp_dir.mkdir(parents=True, exist_ok=True)
        for name, data in returned.files.items():
            (exp_dir / name).write_bytes(data)
        outcome = returned.outcome
        result = replace(outcome.result, log_path=exp_dir / log_name)
        self.train_wall += result.wall_seconds
        return replace(outcome, result=result)

    def close(self) -> None:
        """Give the actor's card back to the cluster."""
        self._kill()
        super().close()


def check_capacity(ray: Any, resource: str, workers: int) -> None:
    """UsageError when the cluster has fewer `resource` (GPU, CPU) than `workers` slots: each
    slot's actor holds one for the session, so a slot beyond them would wait forever. Called
    before the session creates anything (commands._ray_slots)."""
    has = int(ray.cluster_resources().get(resource, 0))
    if has < workers:
        more = f"add nodes with {resource}s to the cluster"
        then = f"give --workers {has} or fewer, or {more}" if has else more
        raise UsageError(
            f"--workers {workers}: the Ray cluster has {has or 'no'} {resource}s, and each "
            f"slot holds one for the session; {then}"
        )


def _interrupted(log_path: Path, run: int) -> RunOutcome:
    result = runner.RunResult(
        exit_code=None,
        summary={},
        crash_class="interrupted",
        wall_seconds=0.0,
        log_path=log_path,
        log_tail="[autoresearch] interrupted: its Ray actor was killed",
        last_step=None,
    )
    return RunOutcome(result, noise.seed_of(run), {})
