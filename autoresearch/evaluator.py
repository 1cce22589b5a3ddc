"""The sealed evaluator: val_bpb measured by harness-owned code, in a process that runs no
code of the candidate's.

The session never takes val_bpb from train.py's output. train.py saves its final model to
AUTORESEARCH_CHECKPOINT; once the training child has exited (and every process of it is gone),
`evaluate_checkpoint` starts this module as a separate process, the *trusted evaluator*:

    python -I -c BOOT --workspace WS --checkpoint PATH --split val|test --preset P --device D
                      [--box]

which prints one JSON line, `{"status": "ok", "val_bpb": ..., "num_params": ..., "causal":
true, "seconds": ...}` (or a status `rejected`, `no_checkpoint` or `error` with a `reason`, and
a non-zero exit).

Two kinds of process, split by trust:
- the **trusted evaluator** reads prepare.py once and checks its sha256 against the session's
  fingerprint, executes it from those bytes as a private module, reads the manifest,
  token_bytes and the split's tokens once, each checked by sha256, and computes the metric:
  prepare.py's `evaluate_bpb`, given those tokens and token_bytes as arguments (nothing is read
  from disk there). It never imports train.py, so no candidate code runs in it: an operator
  override (`torch.library`), a patched module, a frame walk, the garbage collector or a call
  to this module's functions have nothing here to reach.
- two **model processes** (`_SERVER`, in the box with `--box`, sandbox.py: no data, no
  network, no writable directory, no view of this process) each import train.py and call its
  `load_model` on the checkpoint. They answer only one question: the trusted side writes a
  batch of input tokens into shared memory, the model process writes float32 logits of shape
  (b, MAX_SEQ_LEN, VOCAB_SIZE) behind them and says `done` on a pipe. The trusted side copies
  the logits out, checks they are finite (shape and dtype are fixed by the buffer), and scores
  them. The model never sees a target it is not given as an input.

The causality probe, on the trusted side, on two batches (the first and one at random): the
unchanged batch, then the batch with the tokens after a random position t replaced, then with
the other rows replaced, go to the *second* model process, which shares no state with the
first; logits at positions <= t (and of row 0) must match the scoring process's. A model that
looks ahead, mixes rows, or answers from something other than its inputs is `rejected`.

Started ahead (`start_warm`, what a session on cuda does as each run starts), the trusted
evaluator is launched with `--wait` and without the checkpoint: it reads the fingerprints
from a first stdin line, checks prepare.py and reads the data, starts the two model processes
(their imports), and blocks on a second line, the go, which the harness writes once the
training child and all its processes are gone: the checkpoint, the train.py and the nonce
(which thus never exists in a file). Closing its stdin instead ends it.

The result line carries a nonce only this process read (from a file it deleted, or the go
line); what the model processes print goes to the log and is never read as a result.

Residual risks, stated plainly: the probe samples two batches, so a model that looks ahead
only now and then (in some batches, rows or positions) escapes unless a probe lands there.
Without the box (`--unsandboxed`, or no bubblewrap), the model processes run with the user's
rights: they can read the validation file and recognise contexts they have seen.

Cost: the logits cross the process boundary through host shared memory (4 bytes per vocabulary
entry per token: 134 MB per 16 x 256-token batch of the cpu preset); on a GPU they are copied
to the host and back, which the GPU measurements will say the cost of (CUDA IPC would avoid
it). Measured before the split, on an H200: 2.7 s of startup plus 36 ms per 32 x 2048-token
batch, about 12 s for EVAL_TOKENS.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import math
import mmap
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from . import runner

STATUSES = ("ok", "rejected", "no_checkpoint", "error")
CRASH_CLASSES = ("no_checkpoint", "eval")  # crash classes the loop records for evaluator failures
BATCH_SIZE = {"gpu": 32, "cpu": 16}  # rows of MAX_SEQ_LEN tokens per forward pass
PROBED_BATCHES = 2  # batches checked for causality: the first and one chosen at random
PROBE_ATOL = 1e-4  # logits may differ by this much (absolute) between probe and original...
PROBE_RTOL = 1e-4  # ...plus relative. Kernels are deterministic for a given shape: unchanged
# positions come out bitwise equal (seen on CPU, and on an H200 under bf16 autocast)
EXIT_REJECTED = 3  # the evaluator's exit codes besides 0 (ok) and 1 (an uncaught error)
EXIT_FAILED = 2
SERVER_EXIT_S = 5.0  # seconds a model process may take to exit once its pipes close
TAIL_LINES = 30  # lines of the evaluator's log kept in EvalResult.log_tail
DISAGREE_BPB = 0.005  # |printed - sealed| val_bpb above which the record notes the disagreement


# =============================================================================================
# The harness side: run the evaluator as a child process and read its one result line.
# =============================================================================================


@dataclass
class EvalResult:
    """What the sealed evaluator said about one checkpoint."""

    status: str  # one of STATUSES
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
        return self.status == "ok" and self.val_bpb is not None and math.isfinite(self.val_bpb)


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
    warm: runner.Prestarted | None = None,
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
    from . import runner, sandbox  # the harness side only

    boxed = sandbox.probe().available if boxed is None else boxed

    if warm is not None and (not warm.alive() or warm.key != _warm_key(locals())):
        warm.discard()
        warm = None
    if not checkpoint.is_file():
        if warm is not None:
            warm.discard()
        return EvalResult(
            "no_checkpoint",
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
            *_static_args(root, split, preset, device, boxed),
            *("--train", train, "--checkpoint", str(checkpoint)),
            *("--nonce-file", str(nonce_file), "--fingerprints", str(prints_file)),
        ]
        if warm is not None:  # told the same by its go line; `args` if it dies before
            warm.message = {"checkpoint": str(checkpoint), "train": train, "nonce": nonce}
            marker = warm.marker
        lines: list[str] = []
        run = runner.run_training(
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
        if run.crash_class in ("timeout", "stall", "interrupted"):
            reason = (
                f"the evaluator was stopped ({run.crash_class}) after {run.wall_seconds:.0f}s; "
                "does importing train.py start training? Keep the training run under "
                '`if __name__ == "__main__":`'
            )
            if run.crash_class == "interrupted":
                reason = "interrupted"
        else:
            reason = f"the evaluator exited {run.exit_code} without a result; see {log_path}"
        return EvalResult("error", None, None, None, None, run.wall_seconds, reason, log_path, tail)
    val_bpb = result.get("val_bpb")
    return EvalResult(
        status=result["status"],
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
) -> runner.Prestarted | None:
    """The evaluator started before the checkpoint exists (for `evaluate_checkpoint(warm=)`):
    it checks prepare.py and reads the split's data against `fingerprints`, imports torch and
    takes its snapshots, then waits for the go, which brings the checkpoint, train.py and the
    nonce; nothing untrusted runs in it before then. It touches no GPU until the go. None when
    no process could be started."""
    from . import runner, sandbox

    boxed = sandbox.probe().available if boxed is None else boxed
    command = [*prefix, *_child_command(root), *_static_args(root, split, preset, device, boxed)]
    try:
        return runner.Prestarted(
            [*command, "--wait"],
            root,
            _child_env(preset, device, gpu, dataset),
            stands_for=command,  # the go brings the rest of evaluate_checkpoint's arguments
            marker=marker,
            first={"fingerprints": dict(fingerprints or {})},
            key=_warm_key(locals()),
        )
    except OSError:
        return None


_WARM_KEY = ("root", "split", "preset", "device", "fingerprints", "dataset", "gpu", "prefix")
_WARM_KEY += ("boxed",)


def _warm_key(arguments: Mapping[str, object]) -> str:
    """What a warm evaluator must have been started with to serve a call: these arguments."""
    values = {k: arguments[k] for k in _WARM_KEY}
    values["fingerprints"] = dict(values["fingerprints"] or {})
    return json.dumps(values, sort_keys=True, default=str)  # paths as text, tuples as lists


def _static_args(root: Path, split: str, preset: str, device: str, boxed: bool) -> list[str]:
    args = ["--workspace", str(root), "--split", split, "--preset", preset, "--device", device]
    return [*args, "--box"] if boxed else args


def _child_env(preset: str, device: str, gpu: str | None, dataset: Path | None) -> dict[str, str]:
    from . import runner

    # One compile thread: no worker pool left behind by the evaluator's os._exit.
    extra = {"AUTORESEARCH_CHECKPOINT": "", "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    if dataset is not None:
        extra.update(AUTORESEARCH_CACHE=str(dataset.parent), AUTORESEARCH_DATASET=dataset.name)
    return runner.child_env(dict(os.environ), preset=preset, device=device, gpu=gpu, extra=extra)


def sealed_outcome(run, ev: EvalResult):
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
    elif ev.status == "rejected":
        crash_class = "rejected"
    elif ev.status == "no_checkpoint":
        crash_class = "no_checkpoint"
    elif ev.status == "ok":
        crash_class = "nan"
        ev.reason = f"the evaluator measured val_bpb {ev.val_bpb} (not finite)"
    elif ev.reason == "interrupted":
        crash_class = "interrupted"
    else:
        crash_class = "eval"
    log_tail = run.log_tail
    if crash_class is not None:
        notes["reason"] = ev.reason
        log_tail += f"\n[autoresearch] sealed evaluation: {ev.reason}"
        if crash_class == "eval" and ev.log_tail:
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
        "from autoresearch.evaluator import main; sys.exit(main(sys.argv[1:]))"
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


# =============================================================================================
# The child side: the trusted evaluator. It never imports train.py; the candidate's model runs
# in model processes of its own (_SERVER), boxed, and hands logits over shared memory.
# =============================================================================================


class _Rejected(Exception):
    """The model cheated: the run is rejected, with this reason."""

    def __init__(self, reason: str, *, causal: bool | None = None) -> None:
        super().__init__(reason)
        self.causal = causal  # False when a causality probe failed


class _Failed(Exception):
    """The checkpoint could not be evaluated (status no_checkpoint or error)."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status


_PRIVATE_PREPARE = "_autoresearch_sealed_prepare"  # never put in sys.modules
REPLY_BYTES = 2048  # the longest line a model process may answer with; the rest is cut
SERVER_PRELOAD = ("torch", "numpy")  # imported by a model process before its go

# The model process: candidate code runs here and only here. It imports what it can ahead,
# then reads one go line (train.py to import, the checkpoint, the batch geometry), loads the
# model and answers each request ("b" rows of inputs are in the shared buffer) by writing
# float32 logits behind them and a line "done". It speaks on two inherited pipe fds, so what
# train.py prints (stdout, stderr: the log) is never read as an answer.
_SERVER = r"""
import json, mmap, os, sys
requests, replies, shared = (int(a) for a in sys.argv[1:4])
for _name in json.loads(sys.argv[4]):
    try:
        __import__(_name)
    except Exception:
        pass
inbox = os.fdopen(requests, "rb", buffering=0)
def say(text):
    os.write(replies, (text.replace("\n", " ")[:2000] + "\n").encode())
line = inbox.readline()
if not line.strip():
    os._exit(0)
go = json.loads(line)
os.chdir(go["workdir"])
sys.path[:0] = [os.path.dirname(go["train"]), go["workdir"]]
import importlib.util, torch
B, T, V = go["B"], go["T"], go["V"]
try:
    spec = importlib.util.spec_from_file_location("train", go["train"])
    train = importlib.util.module_from_spec(spec)
    sys.modules["train"] = train
    spec.loader.exec_module(train)
except BaseException as e:
    say(f"fail error importing train.py failed: {type(e).__name__}: {e}")
    os._exit(0)
if not callable(getattr(train, "load_model", None)):
    say("fail no_checkpoint train.py defines no load_model(path, device): the harness cannot "
        "rebuild the model")
    os._exit(0)
device = torch.device(go["device"])
try:
    model = train.load_model(go["checkpoint"], device)
    params = sum(p.numel() for p in model.parameters())
    model.eval()
except BaseException as e:
    say(f"fail no_checkpoint load_model could not load the checkpoint: {type(e).__name__}: {e}")
    os._exit(0)
buffer = mmap.mmap(shared, B * T * 8 + B * T * V * 4)
inputs = torch.frombuffer(buffer, dtype=torch.int64, count=B * T)
outputs = torch.frombuffer(buffer, dtype=torch.float32, count=B * T * V, offset=B * T * 8)
autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
say(f"ready {params}")
while True:
    line = inbox.readline()
    if not line.strip():
        os._exit(0)
    b = json.loads(line)["b"]
    try:
        with torch.no_grad(), autocast:
            logits = model(inputs[: b * T].view(b, T).to(device))
        if tuple(logits.shape) != (b, T, V):
            say(f"shape model(x) must return logits of shape ({b}, {T}, {V}), got "
                f"{tuple(logits.shape)}")
            continue
        outputs[: b * T * V].view(b, T, V).copy_(logits.detach().float())
    except BaseException as e:
        say(f"fail error the model's forward failed: {type(e).__name__}: {e}")
        os._exit(0)
    say("done")
"""


class _Model:
    """One model process and the shared buffer it answers in. Started before its go (the
    imports), told the checkpoint and train.py at `go`, then `forward(x)` per batch. What
    comes back is read as data only: a line of at most REPLY_BYTES (a status word, an int or
    a reason), and logits, copied out of the buffer before they are checked."""

    def __init__(self, args: argparse.Namespace, rows: int, seq_len: int, vocab: int, torch):
        from . import sandbox

        self.torch, self.B, self.T, self.V = torch, rows, seq_len, vocab
        self.workspace = args.workspace
        self.shared = tempfile.TemporaryFile(prefix="autoresearch-logits-")
        self.shared.truncate(rows * seq_len * 8 + rows * seq_len * vocab * 4)
        self.mapped = mmap.mmap(self.shared.fileno(), 0)
        self.inputs = torch.frombuffer(self.mapped, dtype=torch.int64, count=rows * seq_len)
        self.outputs = torch.frombuffer(
            self.mapped,
            dtype=torch.float32,
            count=rows * seq_len * vocab,
            offset=rows * seq_len * 8,
        )
        to_server, self.requests = os.pipe()
        self.replies, from_server = os.pipe()
        box = sandbox.probe() if args.box else None
        self.cell = box.cell(args.workspace, writable=False) if box is not None else None
        command = [sys.executable, "-I", "-u", "-c", _SERVER]
        command += [str(to_server), str(from_server), str(self.shared.fileno())]
        command.append(json.dumps(list(SERVER_PRELOAD)))
        env = dict(os.environ)  # the harness made it: secret-free, with the run's marker
        if self.cell is not None:
            command, env = [*self.cell.prefix, *command], self.cell.env(env)
        self.proc = subprocess.Popen(
            command,
            cwd=args.workspace,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=2,  # its prints go to the evaluator's log, never read as an answer
            stderr=2,
            pass_fds=(to_server, from_server, self.shared.fileno()),
        )
        os.close(to_server)
        os.close(from_server)
        self.params: int | None = None

    def go(self, train: Path, checkpoint: Path, device: str) -> None:
        """Load the candidate's model: train.py's load_model on the checkpoint, in the box."""
        if self.cell is not None:  # the box sees its own copies, nothing else
            self.cell.stage(train)
            inside = self.cell.inbox / "checkpoint.pt"
            shutil.copyfile(checkpoint, inside)
            train, checkpoint = self.cell.workdir / "train.py", inside
        message = {
            "workdir": str(self.workspace),
            "train": str(train),
            "checkpoint": str(checkpoint),
            "device": device,
            "B": self.B,
            "T": self.T,
            "V": self.V,
        }
        self._send(message)
        word, rest = self._reply()
        if word != "ready" or not rest.isdigit():
            self._failed(word, rest)
        self.params = int(rest)

    def forward(self, x):
        """The logits of `x` (b, T): a private float32 copy, checked finite."""
        torch = self.torch
        b = x.shape[0]
        self.inputs[: b * self.T].copy_(x.reshape(-1).cpu())
        self._send({"b": b})
        word, rest = self._reply()
        if word == "shape":
            raise _Rejected(rest)
        if word != "done":
            self._failed(word, rest)
        logits = self.outputs[: b * self.T * self.V].view(b, self.T, self.V).clone()
        if not bool(torch.isfinite(logits).all()):
            raise _Failed("error", "the model's logits are not finite")
        return logits

    def _send(self, message: dict) -> None:
        try:
            os.write(self.requests, (json.dumps(message) + "\n").encode())
        except OSError:
            raise _Failed("error", "the model process ended before it was asked") from None

    def _reply(self) -> tuple[str, str]:
        data = b""
        while not data.endswith(b"\n") and len(data) < REPLY_BYTES:
            chunk = os.read(self.replies, REPLY_BYTES - len(data))
            if not chunk:
                break
            data += chunk
        word, _, rest = data.decode("utf-8", errors="replace").strip().partition(" ")
        return word, rest

    def _failed(self, word: str, rest: str) -> None:
        if word == "fail":
            status, _, reason = rest.partition(" ")
            if status in ("no_checkpoint", "error"):
                raise _Failed(status, reason)
        raise _Failed(
            "error",
            "the model process ended without an answer (did importing train.py exit, or "
            'start training? Keep the training run under `if __name__ == "__main__":`)',
        )

    def close(self) -> None:
        for fd in (self.requests, self.replies):
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            self.proc.wait(SERVER_EXIT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.cell is not None:
            self.cell.close()


class _Scored:
    """What evaluate_bpb calls as the model: the scoring model process's logits; on two
    batches (the first and one at random) the causality probe, whose changed inputs go to a
    second, separate model process, so no state kept by the first can answer it."""

    def __init__(self, model: _Model, probe: _Model, torch, probed: set[int], seed: int):
        self.model, self.probe_model, self.torch = model, probe, torch
        self.probed = probed
        self.generator = torch.Generator().manual_seed(seed)
        self.calls = 0
        self.training = False

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def __call__(self, x):
        logits = self.model.forward(x)
        if self.calls in self.probed:
            self._probe(x.cpu(), logits)
        self.calls += 1
        return logits.to(x.device)

    def _probe(self, x, logits) -> None:
        torch = self.torch
        b, t_len = x.shape
        t = int(torch.randint(0, t_len - 1, (), generator=self.generator))
        # the unchanged batch first, so the probe process's answers are compared like for like
        again = self.probe_model.forward(x)
        if not self._same(again, logits):
            raise _Rejected(
                "the model's logits depend on more than the inputs: two model processes gave "
                f"different logits for the same batch (max |difference| {self._gap(again, logits):.3g})",
                causal=False,
            )
        changed = x.clone()
        future = x.roll(1, dims=0) if b > 1 else x.flip(1)
        changed[:, t + 1 :] = future[:, t + 1 :]
        if not torch.equal(changed, x):
            again = self.probe_model.forward(changed)
            if not self._same(again[:, : t + 1], logits[:, : t + 1]):
                raise _Rejected(
                    f"the model looks ahead: changing the tokens after position {t} changed "
                    f"its logits at positions <= {t} (max |difference| "
                    f"{self._gap(again[:, : t + 1], logits[:, : t + 1]):.3g})",
                    causal=False,
                )
        if b > 1:
            others = x.clone()
            others[1:] = x[1:].flip(1)
            if not torch.equal(others, x):
                again = self.probe_model.forward(others)
                if not self._same(again[0], logits[0]):
                    raise _Rejected(
                        "the model mixes rows: changing the other rows of a batch changed the "
                        f"logits of row 0 (max |difference| {self._gap(again[0], logits[0]):.3g})",
                        causal=False,
                    )

    def _same(self, a, b) -> bool:
        return bool(self.torch.allclose(a, b, atol=PROBE_ATOL, rtol=PROBE_RTOL, equal_nan=True))

    def _gap(self, a, b) -> float:
        return float((a - b).abs().nan_to_num(0.0).max())


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _expect(label: str, data: bytes, *expected: str | None) -> None:
    digest = _sha256(data)
    for want in expected:
        if want is not None and digest != want:
            raise _Failed(
                "error",
                f"{label} does not match its fingerprint (changed since the session started)",
            )


def _exec_module(name: str, source: bytes, path: Path):
    """A module executed from `source` (the bytes that were hashed, not a second read)."""
    spec = importlib.util.spec_from_loader(name, loader=None, origin=str(path))
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    module.__file__ = str(path)
    sys.modules[name] = module  # dataclasses look their module up while the classes are made
    try:
        exec(compile(source, str(path), "exec"), module.__dict__)
    finally:
        del sys.modules[name]
    return module


@dataclass
class _Data:
    dataset: Path
    manifest: dict
    split_path: Path
    tokens: object  # numpy uint16 array of the whole split, read from the hashed bytes
    token_bytes: object  # torch int64 tensor


def _read_data(trusted, split: str, expected: Mapping[str, str]) -> _Data:
    """The manifest, token_bytes and the split's tokens, read once and checked by sha256."""
    dataset = Path(trusted.active_dataset_dir())
    manifest_bytes = (dataset / "manifest.json").read_bytes()
    _expect("manifest.json", manifest_bytes, expected.get("data/manifest.json"))
    manifest = json.loads(manifest_bytes)
    if split not in manifest["splits"]:
        raise _Failed("error", f"the dataset has no {split!r} split: run `autoresearch prepare`")
    entry = manifest["splits"][split]
    name = entry["shards"][0]["file"]
    data = (dataset / name).read_bytes()
    _expect(f"{split} tokens {name}", data, entry.get("sha256"), expected.get("data/" + name))
    tb_entry = manifest["token_bytes"]
    tb_bytes = (dataset / tb_entry["file"]).read_bytes()
    _expect("token_bytes", tb_bytes, tb_entry["sha256"], expected.get("data/" + tb_entry["file"]))
    np, torch = trusted.np, trusted.torch
    tokens = np.frombuffer(data, dtype=np.uint16)
    token_bytes = torch.from_numpy(np.load(io.BytesIO(tb_bytes)).astype(np.int64))
    return _Data(dataset, manifest, dataset / name, tokens, token_bytes)


def _arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="autoresearch.evaluator", description=__doc__)
    parser.add_argument("--workspace", required=True, type=Path)
    parser.add_argument("--train", type=Path, help="train.py to import (default: the workspace's)")
    parser.add_argument("--checkpoint", type=Path, help="required unless --wait")
    parser.add_argument("--split", default="val")
    parser.add_argument("--preset", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--nonce-file", type=Path)
    parser.add_argument("--fingerprints", type=Path)
    parser.add_argument("--box", action="store_true", help="run the model processes boxed")
    parser.add_argument(
        "--wait",
        action="store_true",
        help="started ahead: read the fingerprints from a first stdin line, get ready, then wait "
        "for a go line with the checkpoint, train.py and the nonce",
    )
    args = parser.parse_args(argv)
    if args.checkpoint is None and not args.wait:
        parser.error("--checkpoint is required")
    return args


def _read_line() -> dict | None:
    """One JSON object line from stdin; None when stdin closed first (the harness let go)."""
    line = sys.stdin.buffer.readline()
    return json.loads(line) if line.strip() else None


def main(argv: Sequence[str] | None = None) -> int:
    """Evaluate one checkpoint; print one JSON line; exit 0 (ok), 2 (failed) or 3 (rejected)."""
    args = _arguments(sys.argv[1:] if argv is None else argv)
    nonce = ""
    if args.nonce_file is not None:
        nonce = args.nonce_file.read_text().strip()
        args.nonce_file.unlink()
    monotonic = time.perf_counter
    ready: _Ready | None = None

    def emit(payload: dict, code: int):
        payload["started_ahead"] = args.wait
        payload["nonce"] = nonce
        sys.stdout.flush()
        os.write(1, (json.dumps(payload) + "\n").encode())
        if ready is not None:
            ready.close()
        os._exit(code)

    try:
        expected = {}
        if args.wait:
            first = _read_line()
            if first is None:
                os._exit(0)
            expected = first["fingerprints"]
        elif args.fingerprints:
            expected = json.loads(args.fingerprints.read_text())
        try:
            ready, failure = _prepare(args, expected, monotonic), None
        except (_Rejected, _Failed) as exc:  # said after the go, with the go's nonce
            ready, failure = None, exc
        if args.wait:  # the checkpoint exists now
            go = _read_line()
            if go is None:
                if ready is not None:
                    ready.close()
                os._exit(0)
            nonce = go["nonce"]
            args.checkpoint = Path(go["checkpoint"])
            args.train = Path(go["train"]) if go.get("train") else None
        if failure is not None:
            raise failure
        assert ready is not None
        emit({"status": "ok", **_score(args, ready, monotonic)}, 0)
    except _Rejected as exc:
        emit({"status": "rejected", "causal": exc.causal, "reason": str(exc)}, EXIT_REJECTED)
    except _Failed as exc:
        emit({"status": exc.status, "reason": str(exc)}, EXIT_FAILED)
    return 1  # not reached: emit exits


@dataclass
class _Ready:
    """What the evaluator loads before it needs the checkpoint: the checked data, and the two
    model processes, their imports done, waiting for their go."""

    trusted: types.ModuleType
    data: _Data
    torch: types.ModuleType
    rows: int
    batch_size: int
    models: tuple[_Model, _Model]
    startup_seconds: float

    def close(self) -> None:
        for model in self.models:
            model.close()


def _prepare(args: argparse.Namespace, expected: Mapping[str, str], clock) -> _Ready:
    started = clock()
    os.environ["AUTORESEARCH_PRESET"] = args.preset
    prepare_path = args.workspace / "prepare.py"
    source = prepare_path.read_bytes()
    _expect("prepare.py", source, expected.get("prepare.py"))
    trusted = _exec_module(_PRIVATE_PREPARE, source, prepare_path)
    try:
        data = _read_data(trusted, args.split, expected)
    except trusted.PrepareError as exc:
        raise _Failed("error", str(exc)) from exc
    import torch

    rows = min(
        trusted.EVAL_TOKENS // trusted.MAX_SEQ_LEN, (len(data.tokens) - 1) // trusted.MAX_SEQ_LEN
    )
    batch_size = min(args.batch_size or BATCH_SIZE.get(args.preset, 16), max(rows, 1))
    shape = (args, batch_size, trusted.MAX_SEQ_LEN, trusted.VOCAB_SIZE, torch)
    models = (_Model(*shape), _Model(*shape))
    return _Ready(trusted, data, torch, rows, batch_size, models, clock() - started)


def _score(args: argparse.Namespace, ready: _Ready, clock) -> dict:
    loaded = clock()
    trusted, data, torch = ready.trusted, ready.data, ready.torch
    train = args.train or args.workspace / "train.py"
    if not args.checkpoint.is_file():
        raise _Failed("no_checkpoint", f"no checkpoint at {args.checkpoint}")
    for model in ready.models:
        model.go(train, args.checkpoint, args.device)
    batches = max(1, -(-ready.rows // ready.batch_size))
    seed = secrets.randbits(32)
    others = list(range(1, batches))
    probed = {0, *secrets.SystemRandom().sample(others, min(PROBED_BATCHES - 1, len(others)))}
    scored = _Scored(*ready.models, torch, probed, seed)
    eval_started = clock()
    try:
        bpb = trusted.evaluate_bpb(
            scored,
            ready.batch_size,
            torch.device(args.device),
            split=args.split,
            tokens=data.tokens,
            token_bytes=data.token_bytes,
        )
    except trusted.PrepareError as exc:
        raise _Failed("error", str(exc)) from exc
    seconds = clock() - eval_started
    return {
        "val_bpb": bpb,
        "split": args.split,
        "num_params": ready.models[0].params,
        "causal": True,
        "seconds": round(seconds, 3),
        "startup_seconds": round(ready.startup_seconds, 3),
        "load_seconds": round(eval_started - loaded, 3),
        "probed_batches": len(probed),
        "batch_size": ready.batch_size,
        "scored_tokens": ready.rows * trusted.MAX_SEQ_LEN,
        "boxed": args.box,
    }


if __name__ == "__main__":
    sys.exit(main())
