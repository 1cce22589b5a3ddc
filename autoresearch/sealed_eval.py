"""The trusted evaluator: the program that computes val_bpb of a checkpoint and runs no code of
the candidate's. evaluator.py starts it (`python -I -c BOOT --workspace WS --checkpoint PATH
--split val|test --preset P --device D [--box] [--wait]`, evalproto.py); it prints one JSON
line, `{"status": "ok", "val_bpb": ..., "num_params": ..., "causal": true, "seconds": ...}` (or
a status `rejected`, `no_checkpoint` or `error` with a `reason`, and a non-zero exit).

It reads prepare.py once and checks its sha256 against the session's fingerprint, executes it
from those bytes as a private module, reads the manifest, token_bytes and the split's tokens
once, each checked by sha256, and computes the metric: prepare.py's `evaluate_bpb`, given those
tokens and token_bytes as arguments (nothing is read from disk there). It never imports
train.py, so no candidate code runs in it: an operator override (`torch.library`), a patched
module, a frame walk, the garbage collector or a call to this module's functions have nothing
here to reach. The candidate's `load_model` and forward run in two model processes
(model_server.py; in the box with `--box`, sandbox.py: no data, no network, no writable
directory, no view of this process). The trusted side writes a batch of input tokens into
shared memory, the model process writes float32 logits of shape (b, MAX_SEQ_LEN, VOCAB_SIZE)
behind them and says `done` on a pipe; the trusted side copies the logits out, checks they are
finite (shape and dtype are fixed by the buffer), and scores them. The model never sees a
target it is not given as an input.

The causality probe, here, on two batches (the first and one at random): the unchanged batch,
then the batch with the tokens after a random position t replaced, then with the other rows
replaced, go to the *second* model process, which shares no state with the first; logits at
positions <= t (and of row 0) must match the scoring process's. A model that looks ahead, mixes
rows, or answers from something other than its inputs is `rejected`.

With `--wait` (started ahead) it reads the fingerprints from a first stdin line, checks
prepare.py, reads the data, starts the two model processes (their imports), and blocks on a
second line, the go: the checkpoint, the train.py and the nonce (which thus never exists in a
file). Its stdin closing instead ends it. The result line carries a nonce only this process
read (from a file it deleted, or the go line); what the model processes print goes to the log.

What it does not guarantee: the probe samples two batches, so a model that looks ahead only now
and then escapes unless a probe lands there; without `--box` the model processes run with the
user's rights and can read the validation file.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import mmap
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .evalproto import EXIT_FAILED, EXIT_REJECTED, FAILED, EvalStatus, parse_args

BATCH_SIZE = {"gpu": 32, "cpu": 16}  # rows of MAX_SEQ_LEN tokens per forward pass
PROBED_BATCHES = 2  # batches checked for causality: the first and one chosen at random
PROBE_ATOL = 1e-4  # logits may differ by this much (absolute) between probe and original...
PROBE_RTOL = 1e-4  # ...plus relative. Kernels are deterministic for a given shape: unchanged
# positions come out bitwise equal (seen on CPU, and on an H200 under bf16 autocast)
SERVER_EXIT_S = 5.0  # seconds a model process may take to exit once its pipes close


class _Rejected(Exception):
    """The model cheated: the run is rejected, with this reason."""

    def __init__(self, reason: str, *, causal: bool | None = None) -> None:
        super().__init__(reason)
        self.causal = causal  # False when a causality probe failed


class _Failed(Exception):
    """The checkpoint could not be evaluated (status no_checkpoint or error)."""

    def __init__(self, status: EvalStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status


_PRIVATE_PREPARE = "_autoresearch_sealed_prepare"  # never put in sys.modules
REPLY_BYTES = 2048  # the longest line a model process may answer with; the rest is cut
SERVER_PRELOAD = ("torch", "numpy")  # imported by a model process before its go

# The model process's program (model_server.py): run from its text with `python -c`, since the
# box it runs in hides this package.
_SERVER = (Path(__file__).parent / "model_server.py").read_text(encoding="utf-8")


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
            raise _Failed(EvalStatus.error, "the model's logits are not finite")
        return logits

    def _send(self, message: dict) -> None:
        try:
            os.write(self.requests, (json.dumps(message) + "\n").encode())
        except OSError:
            raise _Failed(EvalStatus.error, "the model process ended before it was asked") from None

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
            if status in FAILED:
                raise _Failed(EvalStatus(status), reason)
        raise _Failed(
            EvalStatus.error,
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
                EvalStatus.error,
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
        raise _Failed(
            EvalStatus.error, f"the dataset has no {split!r} split: run `autoresearch prepare`"
        )
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


def _read_line() -> dict | None:
    """One JSON object line from stdin; None when stdin closed first (the harness let go)."""
    line = sys.stdin.buffer.readline()
    return json.loads(line) if line.strip() else None


def main(argv: Sequence[str] | None = None) -> int:
    """Evaluate one checkpoint; print one JSON line; exit 0 (ok), 2 (failed) or 3 (rejected)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
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
        emit({"status": EvalStatus.ok, **_score(args, ready, monotonic)}, 0)
    except _Rejected as exc:
        emit(
            {"status": EvalStatus.rejected, "causal": exc.causal, "reason": str(exc)}, EXIT_REJECTED
        )
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
        raise _Failed(EvalStatus.error, str(exc)) from exc
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
        raise _Failed(EvalStatus.no_checkpoint, f"no checkpoint at {args.checkpoint}")
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
        raise _Failed(EvalStatus.error, str(exc)) from exc
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
