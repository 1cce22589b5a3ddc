"""The sealed evaluator: val_bpb measured by harness-owned code, in a process of its own.

The session never takes val_bpb from train.py's output. train.py saves its final model to
AUTORESEARCH_CHECKPOINT; once the training child has exited (and every process of it is gone),
`evaluate_checkpoint` starts this module as a separate process:

    python -I -c BOOT --workspace WS --checkpoint PATH --split val|test --preset P --device D

which prints one JSON line, `{"status": "ok", "val_bpb": ..., "num_params": ..., "causal":
true, "seconds": ...}` (or a status `rejected`, `no_checkpoint` or `error` with a `reason`, and
a non-zero exit).

Started ahead (`start_warm`, what a session on cuda does as each run starts), the same process
is launched with `--wait` and without the checkpoint: it reads the fingerprints from a first
stdin line, does steps 1 and 2 and the imports (no GPU is touched), and blocks on a second
line, the go, which the harness writes once the training child and all its processes are gone:
the checkpoint, the train.py and the nonce (which thus never exists in a file). Nothing
untrusted runs in the process before the go; a failure found before it is reported after it,
with the go's nonce. Closing its stdin instead (the harness let it go, or died) ends it.

What the evaluator process does, in this order:
1. reads prepare.py once and checks its sha256 against the session's fingerprint; executes it
   twice from those bytes: a private copy, reachable by no module name, that computes the
   metric, and the public `prepare` module that train.py imports;
2. reads the manifest, token_bytes and the split's token file into memory, checking each
   against the manifest's and the session's sha256, and pins the private copy to exactly those
   bytes (its `evaluate_bpb` cannot read anything else from disk); its torch, numpy, math,
   torch.nn.functional and builtins are private copies of the namespaces as they are now;
3. snapshots the namespaces the metric and this module rely on, then imports the untrusted
   train.py (its `load_model` is the one thing used) and rebuilds the model from the checkpoint;
4. runs the private `evaluate_bpb` on a wrapper of the model that checks every output is a plain
   tensor, that no torch function/dispatch mode was left active, and on two batches (the first
   and one picked at random) probes causality on the very inputs being scored: changing the
   tokens after a random position t must not change the logits at positions <= t, and changing
   the other rows of a batch must not change a row's logits;
5. compares the snapshots: any name replaced in builtins, math, numpy, torch,
   torch.nn.functional, torch.Tensor (also names added there, which shadow methods), the
   private prepare or this module means the run is `rejected`;
6. prints the result with a nonce that only this process read (from a file it deleted before
   train.py was imported), through references taken before the import, and exits at once.

So a train.py that skips training and prints a good number, wraps or replaces
`prepare.evaluate_bpb`, changes prepare's constants, patches torch's loss functions, returns
a tensor subclass, prints a forged result line, or builds a model that looks ahead (within its
row or across rows) does not get a better val_bpb. Changing the data files is caught by the
loop's fingerprint checks, and by step 2 here.

Residual risks, stated plainly: untrusted code runs in this process, with the user's rights.
Code that inspects stack frames or uses the garbage collector to reach the private objects,
patches something and restores it between two calls, writes memory through ctypes, or shadows a
method on a C-level type this module does not snapshot is not stopped. A model may read the
validation file from disk and recognise contexts it has seen (the probes use real text but not
every position); train.py may train on the val or test files, or keep weights on disk from an
earlier run and warm-start from them, since both processes can read and write what the user
can. The held-out test split (`autoresearch confirm`) is the check on the first two; nothing
here checks the last. The causality probe samples: a model that looks ahead only now and then
(in some batches, rows or positions) escapes unless a probe lands there.

Cost, measured: on an H200, 2.7 s of startup (imports, data, train.py, the checkpoint) plus the
evaluation itself, run eagerly (compiling the model would cost more than it saves once): 36 ms
per 32 x 2048-token batch of the default gpu-preset model, so about 12 s for EVAL_TOKENS, where
train.py's own compiled evaluation costs about 4 s once compiled; the probes add 4 forward
passes. On 16 CPU cores, the cpu preset: 2.9 s of startup and 1.9 s of evaluation.
"""

from __future__ import annotations

import argparse
import builtins
import hashlib
import importlib.util
import io
import json
import math
import os
import secrets
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
    """
    from . import runner  # the harness side only; the child never imports the package

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
            *_static_args(root, split, preset, device),
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
) -> runner.Prestarted | None:
    """The evaluator started before the checkpoint exists (for `evaluate_checkpoint(warm=)`):
    it checks prepare.py and reads the split's data against `fingerprints`, imports torch and
    takes its snapshots, then waits for the go, which brings the checkpoint, train.py and the
    nonce; nothing untrusted runs in it before then. It touches no GPU until the go. None when
    no process could be started."""
    from . import runner

    command = [*prefix, *_child_command(root), *_static_args(root, split, preset, device)]
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


def _warm_key(arguments: Mapping[str, object]) -> str:
    """What a warm evaluator must have been started with to serve a call: these arguments."""
    values = {k: arguments[k] for k in _WARM_KEY}
    values["fingerprints"] = dict(values["fingerprints"] or {})
    return json.dumps(values, sort_keys=True, default=str)  # paths as text, tuples as lists


def _static_args(root: Path, split: str, preset: str, device: str) -> list[str]:
    return ["--workspace", str(root), "--split", split, "--preset", preset, "--device", device]


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
# The child side. Only the standard library at import; torch arrives with prepare.py.
# =============================================================================================


class _Rejected(Exception):
    """The model or train.py cheated: the run is rejected, with this reason."""

    def __init__(self, reason: str, *, causal: bool | None = None) -> None:
        super().__init__(reason)
        self.causal = causal  # False when a causality probe failed


class _Failed(Exception):
    """The checkpoint could not be evaluated (status no_checkpoint or error)."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status


_PRIVATE_PREPARE = "_autoresearch_sealed_prepare"  # never put in sys.modules


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


def _exec_module(name: str, source: bytes, path: Path, private_builtins: bool):
    """A module executed from `source` (the bytes that were hashed, not a second read)."""
    spec = importlib.util.spec_from_loader(name, loader=None, origin=str(path))
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    module.__file__ = str(path)
    if private_builtins:
        module.__dict__["__builtins__"] = dict(vars(builtins))
    sys.modules[name] = module  # dataclasses look their module up while the classes are made
    try:
        exec(compile(source, str(path), "exec"), module.__dict__)
    finally:
        if private_builtins:
            del sys.modules[name]
    return module


def _frozen(namespace: object) -> types.SimpleNamespace:
    """A copy of a module's names as they are now: later monkeypatching does not reach it."""
    return types.SimpleNamespace(**vars(namespace))


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


def _seal(trusted, data: _Data) -> None:
    """Pin the private prepare to the bytes that were checked, and to private namespaces."""
    import torch
    import torch.nn.functional as F

    trusted.torch, trusted.F = _frozen(torch), _frozen(F)
    trusted.np, trusted.math = _frozen(trusted.np), _frozen(math)
    trusted.active_dataset_dir = lambda cache=None: data.dataset
    trusted.load_manifest = lambda dataset=None: json.loads(json.dumps(data.manifest))

    def tokens(path):
        if Path(path) != data.split_path:
            raise _Failed("error", f"evaluate_bpb asked for {path}, not the checked split file")
        return data.tokens

    trusted._tokens = tokens
    trusted.load_token_bytes = lambda device="cpu": data.token_bytes.to(device)


class _Snapshot:
    """Identity of every name in some namespaces, to tell afterwards what was replaced."""

    def __init__(self, spaces: Mapping[str, tuple[object, bool]]) -> None:
        # label -> (namespace, whether names added later count as tampering)
        self.spaces = dict(spaces)
        self.before = {label: dict(vars(obj)) for label, (obj, _) in self.spaces.items()}
        self.codes = {
            label: {k: v.__code__ for k, v in names.items() if isinstance(v, types.FunctionType)}
            for label, names in self.before.items()
        }

    def changed(self) -> list[str]:
        found = []
        for label, (obj, strict) in self.spaces.items():
            now = vars(obj)
            before = self.before[label]
            for key, value in before.items():
                if now.get(key, _Snapshot) is not value:
                    found.append(f"{label}.{key}")
                elif key in self.codes[label] and value.__code__ is not self.codes[label][key]:
                    found.append(f"{label}.{key}.__code__")
            if strict:
                found += [f"{label}.{key}" for key in now if key not in before]
        return found


def _modes_active(torch) -> bool:
    """True when a TorchFunctionMode or TorchDispatchMode is active (it could rewrite the loss)."""
    from torch.overrides import _get_current_function_mode_stack
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return bool(_get_current_function_mode_stack() or _get_current_dispatch_mode_stack())


class _SealedModel:
    """What evaluate_bpb calls instead of the model: checks outputs and probes causality.

    Not an nn.Module on purpose: patching nn.Module's call machinery cannot reach it.
    """

    def __init__(self, model, torch, autocast, probed: set[int], seed: int) -> None:
        self.model = model
        self.torch = torch
        self.autocast = autocast
        self.probed = probed
        self.generator = torch.Generator().manual_seed(seed)
        self.calls = 0
        self.training = model.training

    def eval(self):
        self.model.eval()
        self.training = False
        return self

    def train(self, mode: bool = True):
        self.model.train(mode)
        self.training = mode
        return self

    def __call__(self, x):
        logits = self._forward(x)
        if self.calls in self.probed:
            self._probe(x, logits)
        self.calls += 1
        return logits

    def _forward(self, x):
        torch = self.torch
        with self.autocast():
            out = self.model(x)
        if type(out) is not torch.Tensor:
            raise _Rejected(f"model(x) returned a {type(out).__name__}, not a plain torch.Tensor")
        if _modes_active(torch):
            raise _Rejected("model(x) left a torch function or dispatch mode active")
        return out.detach()

    def _probe(self, x, logits) -> None:
        torch = self.torch
        b, t_len = x.shape
        t = int(torch.randint(0, t_len - 1, (), generator=self.generator))
        changed = x.clone()
        future = x.roll(1, dims=0) if b > 1 else x.flip(1)
        changed[:, t + 1 :] = future[:, t + 1 :]
        if not torch.equal(changed, x):
            again = self._forward(changed)
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
                again = self._forward(others)
                if not self._same(again[0], logits[0]):
                    raise _Rejected(
                        "the model mixes rows: changing the other rows of a batch changed the "
                        f"logits of row 0 (max |difference| {self._gap(again[0], logits[0]):.3g})",
                        causal=False,
                    )

    def _same(self, a, b) -> bool:
        return bool(
            self.torch.allclose(
                a.float(), b.float(), atol=PROBE_ATOL, rtol=PROBE_RTOL, equal_nan=True
            )
        )

    def _gap(self, a, b) -> float:
        return float((a.float() - b.float()).abs().nan_to_num(0.0).max())


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
        args.nonce_file.unlink()  # gone before train.py is imported
    # References for the way out, taken before any untrusted code runs.
    out_fd, write, dumps, exit_now = os.dup(1), os.write, json.dumps, os._exit
    flush, monotonic = sys.stdout.flush, time.perf_counter

    def emit(payload: dict, code: int):
        payload["started_ahead"] = args.wait
        payload["nonce"] = nonce
        flush()
        write(out_fd, (dumps(payload) + "\n").encode())
        exit_now(code)

    try:
        expected = {}
        if args.wait:
            first = _read_line()
            if first is None:
                exit_now(0)
            expected = first["fingerprints"]
        elif args.fingerprints:
            expected = json.loads(args.fingerprints.read_text())
        try:
            ready, failure = _prepare(args, expected, monotonic), None
        except (_Rejected, _Failed) as exc:  # said after the go, with the go's nonce
            ready, failure = None, exc
        if args.wait:  # the checkpoint exists now; nothing untrusted has run in this process
            go = _read_line()
            if go is None:
                exit_now(0)
            nonce = go["nonce"]
            args.checkpoint = Path(go["checkpoint"])
            args.train = Path(go["train"]) if go.get("train") else None
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)  # train.py gets no stdin, as in a cold start
            os.close(null)
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
    """What the evaluator loads before it needs the checkpoint (steps 1-2 and the snapshot)."""

    trusted: types.ModuleType
    data: _Data
    torch: types.ModuleType
    snapshot: _Snapshot
    startup_seconds: float


def _prepare(args: argparse.Namespace, expected: Mapping[str, str], clock) -> _Ready:
    started = clock()
    os.environ["AUTORESEARCH_PRESET"] = args.preset
    prepare_path = args.workspace / "prepare.py"
    source = prepare_path.read_bytes()
    _expect("prepare.py", source, expected.get("prepare.py"))
    trusted = _exec_module(_PRIVATE_PREPARE, source, prepare_path, private_builtins=True)
    _exec_module("prepare", source, prepare_path, private_builtins=False)  # train.py's
    try:
        data = _read_data(trusted, args.split, expected)
    except trusted.PrepareError as exc:
        raise _Failed("error", str(exc)) from exc
    _seal(trusted, data)

    import torch
    import torch._dynamo  # noqa: F401  (wraps torch.manual_seed on import: before the snapshot)
    import torch.nn.functional as F

    snapshot = _Snapshot(
        {
            "builtins": (builtins, False),
            "math": (math, False),
            "numpy": (sys.modules["numpy"], False),
            "torch": (torch, False),
            "torch.nn.functional": (F, False),
            "torch._C._nn": (torch._C._nn, False),
            "torch.Tensor": (torch.Tensor, True),
            "prepare(private)": (trusted, True),
            "prepare": (sys.modules["prepare"], False),
            "autoresearch.evaluator": (sys.modules[__name__], False),
        }
    )
    return _Ready(trusted, data, torch, snapshot, clock() - started)


def _score(args: argparse.Namespace, ready: _Ready, clock) -> dict:
    loaded = clock()
    trusted, data, torch, snapshot = ready.trusted, ready.data, ready.torch, ready.snapshot
    device = torch.device(args.device)
    train = _import_train(args.train or args.workspace / "train.py")
    model = _load_model(train, args.checkpoint, device, torch)
    num_params = sum(p.numel() for p in model.parameters())
    rows = min(
        trusted.EVAL_TOKENS // trusted.MAX_SEQ_LEN, (len(data.tokens) - 1) // trusted.MAX_SEQ_LEN
    )
    batch_size = args.batch_size or BATCH_SIZE.get(args.preset, 16)
    batches = max(1, -(-rows // batch_size))
    seed = secrets.randbits(32)
    others = list(range(1, batches))
    probed = {0, *secrets.SystemRandom().sample(others, min(PROBED_BATCHES - 1, len(others)))}
    on_cuda = device.type == "cuda"

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda)

    sealed = _SealedModel(model, torch, autocast, probed, seed)
    eval_started = clock()
    try:
        bpb = trusted.evaluate_bpb(sealed, batch_size, device, split=args.split)
    except trusted.PrepareError as exc:
        raise _Failed("error", str(exc)) from exc
    seconds = clock() - eval_started
    replaced = snapshot.changed()
    if replaced:
        raise _Rejected("train.py replaced names the metric relies on: " + ", ".join(replaced[:8]))
    return {
        "val_bpb": bpb,
        "split": args.split,
        "num_params": num_params,
        "causal": True,
        "seconds": round(seconds, 3),
        "startup_seconds": round(ready.startup_seconds, 3),
        "load_seconds": round(eval_started - loaded, 3),
        "probed_batches": len(probed),
        "batch_size": batch_size,
        "scored_tokens": rows * trusted.MAX_SEQ_LEN,
    }


def _import_train(path: Path):
    """Import the untrusted train.py (its module-level code runs here: it must not train)."""
    spec = importlib.util.spec_from_file_location("train", path)
    if spec is None or spec.loader is None:
        raise _Failed("error", f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train"] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # untrusted code: any failure is data about the run, not a bug here
        raise _Failed("error", f"importing train.py failed: {type(exc).__name__}: {exc}") from exc
    if not callable(getattr(module, "load_model", None)):
        raise _Failed(
            "no_checkpoint",
            "train.py defines no load_model(path, device): the harness cannot rebuild the model",
        )
    return module


def _load_model(train, checkpoint: Path, device, torch):
    try:
        model = train.load_model(str(checkpoint), device)
    except Exception as exc:  # untrusted code: an unloadable checkpoint is a crash of the run
        raise _Failed(
            "no_checkpoint",
            f"load_model could not load the checkpoint: {type(exc).__name__}: {exc}",
        ) from exc
    if not isinstance(model, torch.nn.Module):
        raise _Failed("no_checkpoint", f"load_model returned a {type(model).__name__}, not a model")
    return model


if __name__ == "__main__":
    sys.exit(main())
