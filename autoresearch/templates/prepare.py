# =================================================================================================
#  prepare.py - THE TRUSTED SIDE.  The agent never edits this file; the harness fingerprints it.
#  It holds the fixed constants, the tokenizer's loading, the loader and the metric.  train.py may
#  import only the names listed in docs/architecture.md.
# =================================================================================================
"""The runtime contract of autoresearch: presets and constants, the prepared data's format,
the tokenizer, the data loader and the val_bpb metric.

Guarantees:
- Importing this module is cheap and has no side effects: nothing is downloaded or written.
  Torch, numpy and tiktoken are the only heavy imports.
- It reads a prepared dataset in `<cache>/<name>/`, complete exactly when its `manifest.json`
  exists; the tokenizer, token byte lengths and the val/test tokens are checked against the
  sha256 the manifest records before use.
- `evaluate_bpb` scores a fixed, deterministic slice of the validation tokens; the model only ever
  sees inputs, never targets, and the loss is computed here in float32.

Reading needs nothing from the `autoresearch` package, so a workspace runs train.py with only
the dependencies above.  Building data does: `run_prepare` and `python prepare.py ...` hand this
file (the format it reads) to the pipeline in `autoresearch.data`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tiktoken
import torch
import torch.nn.functional as F

# -------------------------------------------------------------------------------------------------
# Presets: the fixed constants.  `gpu` is the original one-H100 setting; `cpu` lets the whole loop
# run on a laptop (2 cores) in well under a minute per experiment.  Both use the same vocabulary,
# so one prepared cache serves both presets.
# -------------------------------------------------------------------------------------------------

PRESETS: dict[str, dict[str, int]] = {
    "gpu": {
        "MAX_SEQ_LEN": 2048,  # tokens per row of context (model input length)
        "TIME_BUDGET": 300,  # seconds of training, excluding startup and compilation
        "EVAL_TOKENS": 40 * 524288,  # validation tokens scored by evaluate_bpb (~21M)
        "VOCAB_SIZE": 8192,  # tokens, including the one BOS special token
    },
    "cpu": {
        "MAX_SEQ_LEN": 256,  # tokens per row of context (model input length)
        "TIME_BUDGET": 25,  # seconds of training, excluding startup and compilation
        "EVAL_TOKENS": 2**16,  # validation tokens: a few seconds on 2 cores for a ~1-3M model
        "VOCAB_SIZE": 8192,  # tokens, including BOS; same as gpu so one cache serves both
    },
}

PRESET_ENV = "AUTORESEARCH_PRESET"  # gpu | cpu; unset: gpu when CUDA is available, else cpu
TIME_BUDGET_ENV = "AUTORESEARCH_TIME_BUDGET"  # seconds; overrides TIME_BUDGET (smoke tests)
CACHE_ENV = "AUTORESEARCH_CACHE"  # root of all prepared data; default ~/.cache/autoresearch
DATASET_ENV = "AUTORESEARCH_DATASET"  # dataset name inside the cache; overrides <cache>/ACTIVE

# Tokenizer: byte-level BPE with the GPT-4 (cl100k) split pattern and one special token.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}|"""
    r""" ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
BOS_TOKEN = "<|bos|>"  # starts every document; the only special token

MANIFEST = "manifest.json"
ACTIVE = "ACTIVE"
TOKENIZER_FILE = "tokenizer.pkl"
TOKEN_BYTES_FILE = "token_bytes.npy"
FORMAT_VERSION = 1


class PrepareError(Exception):
    """Something the user can fix (no data, bad source, no network); the message says what next."""


def resolve_preset(environ: Mapping[str, str], cuda_available: bool) -> tuple[str, dict[str, int]]:
    """Return (preset name, its constants) for an environment.

    AUTORESEARCH_PRESET picks the preset; unset means `gpu` when CUDA is available, else `cpu`.
    AUTORESEARCH_TIME_BUDGET (seconds, > 0) replaces TIME_BUDGET.  Raises PrepareError on an
    unknown preset or a malformed budget.
    """
    name = environ.get(PRESET_ENV, "").strip().lower() or ("gpu" if cuda_available else "cpu")
    if name not in PRESETS:
        raise PrepareError(
            f"unknown preset {name!r} in {PRESET_ENV}: use one of {', '.join(sorted(PRESETS))}"
        )
    constants = dict(PRESETS[name])
    override = environ.get(TIME_BUDGET_ENV, "").strip()
    if override:
        try:
            seconds = float(override)
        except ValueError:
            seconds = -1.0
        if not (seconds > 0 and math.isfinite(seconds)):
            raise PrepareError(
                f"{TIME_BUDGET_ENV}={override!r} is not a positive number of seconds"
            )
        constants["TIME_BUDGET"] = int(seconds) if seconds.is_integer() else seconds
    return name, constants


PRESET, _CONSTANTS = resolve_preset(os.environ, torch.cuda.is_available())
MAX_SEQ_LEN: int = _CONSTANTS["MAX_SEQ_LEN"]
TIME_BUDGET: float = _CONSTANTS["TIME_BUDGET"]
EVAL_TOKENS: int = _CONSTANTS["EVAL_TOKENS"]
VOCAB_SIZE: int = _CONSTANTS["VOCAB_SIZE"]


# -------------------------------------------------------------------------------------------------
# The cache: where prepared datasets live and which one is active.
# -------------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """The cache root: $AUTORESEARCH_CACHE (`~` expanded), else ~/.cache/autoresearch.  Never
    created here.  The same rule as the tool's `workspace.cache_dir` (a test holds them
    together)."""
    root = os.environ.get(CACHE_ENV, "").strip()
    return Path(root).expanduser() if root else Path.home() / ".cache" / "autoresearch"


def _no_data(where: Path) -> PrepareError:
    return PrepareError(f"no prepared data in {where}: run `autoresearch prepare` first")


def active_dataset_name(cache: Path | None = None) -> str | None:
    """The dataset in use: $AUTORESEARCH_DATASET, else the name in <cache>/ACTIVE, else None."""
    name = os.environ.get(DATASET_ENV, "").strip()
    if not name:
        try:
            name = ((cache or cache_root()) / ACTIVE).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise PrepareError(f"bad dataset name {name!r}: expected a directory name in the cache")
    return name


def active_dataset_dir(cache: Path | None = None) -> Path:
    """The directory of the active, complete dataset; PrepareError when there is none."""
    cache = cache or cache_root()
    name = active_dataset_name(cache)
    if name is None:
        raise _no_data(cache)
    path = cache / name
    if not (path / MANIFEST).is_file():
        raise _no_data(path)
    return path


def load_manifest(dataset: Path | None = None) -> dict:
    """The manifest of a dataset directory (default: the active one)."""
    dataset = dataset or active_dataset_dir()
    try:
        return json.loads((dataset / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _no_data(dataset) from None
    except json.JSONDecodeError as e:
        raise PrepareError(
            f"{dataset / MANIFEST} is corrupt ({e}): run `autoresearch prepare --force`"
        ) from None


def print_config() -> None:
    """Print the preset, its constants, the active dataset and the cache directory."""
    cache = cache_root()
    budget_note = f"  (from {TIME_BUDGET_ENV})" if os.environ.get(TIME_BUDGET_ENV) else ""
    try:
        name = active_dataset_name(cache) or "(none: run `autoresearch prepare`)"
    except PrepareError as e:
        name = f"(invalid: {e})"
    print(f"preset: {PRESET}")
    print(f"MAX_SEQ_LEN: {MAX_SEQ_LEN} tokens")
    print(f"TIME_BUDGET: {TIME_BUDGET} s of training{budget_note}")
    print(f"EVAL_TOKENS: {EVAL_TOKENS} tokens")
    print(f"VOCAB_SIZE: {VOCAB_SIZE} tokens")
    print(f"dataset: {name}")
    print(f"cache: {cache}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _checked_file(dataset: Path, entry: dict) -> Path:
    """The path of a manifest file entry after checking its sha256."""
    path = dataset / entry["file"]
    if not path.is_file():
        raise PrepareError(f"{path} is missing: run `autoresearch prepare --force`")
    if _sha256(path) != entry["sha256"]:
        raise PrepareError(
            f"{path} does not match its manifest: run `autoresearch prepare --force`"
        )
    return path


def verify_dataset(dataset: Path | None = None) -> dict:
    """Check every hashed file of a dataset (tokenizer, token_bytes, val, test) against its
    manifest and that every token file has the size the manifest says; return the manifest."""
    dataset = dataset or active_dataset_dir()
    manifest = load_manifest(dataset)
    _checked_file(dataset, manifest["tokenizer"])
    _checked_file(dataset, manifest["token_bytes"])
    for split, info in manifest["splits"].items():
        if "sha256" in info:
            _checked_file(dataset, {"file": info["shards"][0]["file"], "sha256": info["sha256"]})
        for shard in info["shards"]:
            path = dataset / shard["file"]
            if not path.is_file() or path.stat().st_size != 2 * shard["tokens"]:
                raise PrepareError(
                    f"{split} shard {path} is missing or truncated: "
                    "run `autoresearch prepare --force`"
                )
    return manifest


# -------------------------------------------------------------------------------------------------
# Tokenizer
# -------------------------------------------------------------------------------------------------


class Tokenizer:
    """A byte-level BPE tokenizer (tiktoken) whose only special token is BOS.

    `encode` never produces BOS from text: a literal "<|bos|>" in text is encoded as ordinary
    bytes.  `vocab_size` is at most VOCAB_SIZE (smaller only when the training text had too few
    distinct pairs to learn every merge); token ids are 0..vocab_size-1 and `bos_id` is the last.
    """

    def __init__(self, encoding: tiktoken.Encoding) -> None:
        self.encoding = encoding
        self.bos_id: int = encoding.encode_single_token(BOS_TOKEN)
        self.vocab_size: int = encoding.n_vocab

    def encode(self, text: str, *, bos: bool = False) -> list[int]:
        """Token ids of `text`, with BOS in front when `bos` is true."""
        ids = self.encoding.encode_ordinary(text)
        return [self.bos_id, *ids] if bos else ids

    def encode_batch(
        self, texts: Sequence[str], *, bos: bool = False, num_threads: int = 8
    ) -> list[list[int]]:
        """`encode` for many texts, using threads."""
        batch = self.encoding.encode_ordinary_batch(list(texts), num_threads=num_threads)
        return [[self.bos_id, *ids] for ids in batch] if bos else batch

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids; BOS decodes to "<|bos|>", invalid UTF-8 to U+FFFD."""
        return self.encoding.decode(list(ids))

    def token_bytes(self) -> np.ndarray:
        """int32 array: the UTF-8 byte length of every token id, 0 for the special token."""
        table = np.zeros(self.vocab_size, dtype=np.int32)
        for token_id in range(self.vocab_size):
            if token_id != self.bos_id:
                table[token_id] = len(self.encoding.decode_single_token_bytes(token_id))
        return table


def load_tokenizer() -> Tokenizer:
    """The active dataset's tokenizer (checked against its manifest)."""
    dataset = active_dataset_dir()
    path = _checked_file(dataset, load_manifest(dataset)["tokenizer"])
    payload = pickle.loads(path.read_bytes())  # our own file, verified by sha256 above
    return Tokenizer(
        tiktoken.Encoding(
            payload["name"],
            pat_str=payload["pat_str"],
            mergeable_ranks=payload["mergeable_ranks"],
            special_tokens=payload["special_tokens"],
        )
    )


def load_token_bytes(device: str | torch.device = "cpu") -> torch.Tensor:
    """int64 tensor (vocab_size,): UTF-8 byte length of every token, 0 for BOS."""
    dataset = active_dataset_dir()
    path = _checked_file(dataset, load_manifest(dataset)["token_bytes"])
    return torch.from_numpy(np.load(path).astype(np.int64)).to(device)


# -------------------------------------------------------------------------------------------------
# The loader
# -------------------------------------------------------------------------------------------------


def _split_entry(dataset: Path, split: str) -> dict:
    splits = load_manifest(dataset)["splits"]
    if split not in splits:
        raise PrepareError(f"unknown split {split!r}: use one of {', '.join(splits)}")
    return splits[split]


def _tokens(path: Path) -> np.ndarray:
    # a plain ndarray view of the memmap: slicing it skips np.memmap's Python-level overhead
    return np.memmap(path, dtype=np.uint16, mode="r").view(np.ndarray)


def _host_batches(
    shards: list[np.ndarray],
    shard_of: np.ndarray,
    offset: np.ndarray,
    batch_size: int,
    seq_len: int,
    seed: int,
    pin: bool,
) -> Iterator[tuple[torch.Tensor, int]]:
    """(2, B, T) int64 CPU tensors holding x and y, and the epoch of each batch's first row."""
    rng = np.random.default_rng(seed)
    n, epoch, pos = len(offset), 1, 0
    order = rng.permutation(n)
    while True:
        if pos == n:
            order, pos, epoch = rng.permutation(n), 0, epoch + 1
        batch_epoch = epoch
        buf = torch.empty((2, batch_size, seq_len), dtype=torch.int64, pin_memory=pin)
        out = buf.numpy()
        for i in range(batch_size):
            if pos == n:
                order, pos, epoch = rng.permutation(n), 0, epoch + 1
            j = order[pos]
            pos += 1
            start = offset[j]
            row = shards[shard_of[j]][start : start + seq_len + 1]
            out[0, i] = row[:-1]
            out[1, i] = row[1:]
        yield buf, batch_epoch


def _prefetched(batches: Iterator, depth: int) -> Iterator:
    """`batches`, computed `depth` items ahead on one background thread (same order)."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare-loader")
    pending = [pool.submit(next, batches) for _ in range(depth)]
    try:
        while True:
            item = pending.pop(0).result()
            pending.append(pool.submit(next, batches))
            yield item
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def make_dataloader(
    batch_size: int,
    seq_len: int,
    split: str = "train",
    seed: int = 0,
    device: str | torch.device = "cpu",
    *,
    prefetch: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """An endless iterator of (x, y, epoch) over a split of the active dataset.

    x and y are int64 (batch_size, seq_len) tensors on `device`; y is x shifted by one token.
    Every row starts at a document start (BOS) and runs on through the following documents with
    no padding.  Rows are drawn from a seeded permutation of all document starts that leave room
    for seq_len + 1 tokens; `epoch` (from 1) counts passes over that permutation and is the epoch
    of each batch's first row.  The same seed gives the same batches.  On CUDA, batches are built
    in pinned memory `prefetch` batches ahead (default 2) on a background thread and copied with
    non_blocking=True.
    """
    if batch_size < 1 or seq_len < 1:
        raise PrepareError(f"batch_size and seq_len must be positive, got {batch_size}, {seq_len}")
    dataset = active_dataset_dir()
    entry = _split_entry(dataset, split)
    shards, shard_of, offset = [], [], []
    for k, shard in enumerate(entry["shards"]):
        tokens = _tokens(dataset / shard["file"])
        starts = np.load(dataset / shard["starts"]).astype(np.int64)
        starts = starts[starts + seq_len + 1 <= len(tokens)]
        shards.append(tokens)
        shard_of.append(np.full(len(starts), k, dtype=np.int32))
        offset.append(starts)
    offsets = np.concatenate(offset)
    if not len(offsets):
        raise PrepareError(
            f"the {split} split has no document start with {seq_len + 1} tokens after it: "
            "use a shorter seq_len or prepare more data"
        )
    device = torch.device(device)
    pin = device.type == "cuda"
    batches = _host_batches(
        shards, np.concatenate(shard_of), offsets, batch_size, seq_len, seed, pin
    )
    depth = (2 if pin else 0) if prefetch is None else prefetch
    if depth > 0:
        batches = _prefetched(batches, depth)
    return _on_device(batches, device)


def _on_device(
    batches: Iterator[tuple[torch.Tensor, int]], device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    for buf, epoch in batches:
        if device.type != "cpu":
            buf = buf.to(device, non_blocking=True)
        yield buf[0], buf[1], epoch


# -------------------------------------------------------------------------------------------------
# The metric
# -------------------------------------------------------------------------------------------------


def evaluate_bpb(
    model: torch.nn.Module,
    batch_size: int,
    device: str | torch.device = "cpu",
    *,
    split: str = "val",
    tokens: np.ndarray | None = None,
    token_bytes: torch.Tensor | None = None,
) -> float:
    """Bits per byte of `model` on the first EVAL_TOKENS target tokens of a split.

    The data come from the active dataset (`split`), or as arguments: `tokens`, the split's
    whole uint16 token stream, and `token_bytes`, the byte length of every token id (what the
    sealed evaluator passes: the bytes it checked, so nothing is read from disk here).

    The split's token stream is cut into contiguous rows of MAX_SEQ_LEN + 1 tokens that overlap
    by one (row i starts at token i * MAX_SEQ_LEN), so every scored target appears exactly once;
    when the split is shorter than EVAL_TOKENS, all of it is scored (and a line says so).  Only
    `logits = model(x)` is called: the model never sees targets.  Cross-entropy is computed here
    in float32; targets that are special tokens (BOS) are left out of both sums.
    bpb = total nats / (ln 2 * total UTF-8 bytes of the targets).  Runs under torch.no_grad with
    model.eval(), and restores the model's training mode afterwards.
    """
    if tokens is None:
        dataset = active_dataset_dir()
        tokens = _tokens(dataset / _split_entry(dataset, split)["shards"][0]["file"])
    seq_len = MAX_SEQ_LEN
    available = (len(tokens) - 1) // seq_len
    rows = min(EVAL_TOKENS // seq_len, available)
    if rows < 1:
        raise PrepareError(
            f"the {split} split has {len(tokens)} tokens, fewer than one row of {seq_len + 1}: "
            "prepare more data"
        )
    if rows < EVAL_TOKENS // seq_len:
        print(
            f"evaluate_bpb: the {split} split holds only {rows * seq_len:,} scorable tokens "
            f"(< EVAL_TOKENS = {EVAL_TOKENS:,}); scoring all of them"
        )
    device = torch.device(device)
    token_bytes = (load_token_bytes() if token_bytes is None else token_bytes).to(device)
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for first in range(0, rows, batch_size):
                b = min(batch_size, rows - first)
                block = np.asarray(
                    tokens[first * seq_len : (first + b) * seq_len + 1], dtype=np.int64
                )
                block = torch.from_numpy(block).to(device)
                x, y = block[:-1].view(b, seq_len), block[1:].view(b, seq_len)
                logits = model(x)
                if logits.dim() != 3 or tuple(logits.shape[:2]) != (b, seq_len):
                    raise PrepareError(
                        f"model(x) must return logits of shape ({b}, {seq_len}, vocab), "
                        f"got {tuple(logits.shape)}"
                    )
                nats = F.cross_entropy(
                    logits.float().reshape(b * seq_len, -1), y.reshape(-1), reduction="none"
                )
                weights = token_bytes[y.reshape(-1)]
                scored = weights > 0
                total_nats += torch.where(scored, nats, 0.0).sum(dtype=torch.float64)
                total_bytes += weights.sum()
    finally:
        model.train(was_training)
    return total_nats.item() / (math.log(2) * total_bytes.item())


# -------------------------------------------------------------------------------------------------
# Building data: the pipeline (sources, downloads, splits, tokenizer training, token shards) lives
# in the installed `autoresearch` package; these two names hand it this file as the contract.
# -------------------------------------------------------------------------------------------------


def run_prepare(source: str = "climbmix", **options) -> Path:
    """Prepare a dataset for this file's preset and format and make it active; its directory.

    See `autoresearch.data.build.run_prepare` for the options.  PrepareError on a problem the
    user can fix.
    """
    from autoresearch.data.build import run_prepare as build
    from autoresearch.errors import DataError

    try:
        return build(sys.modules[__name__], source, **options)
    except DataError as e:
        raise PrepareError(str(e)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """`python prepare.py --source S ...`; the exit status."""
    from autoresearch.data.cli import main as cli

    return cli(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
