# =================================================================================================
#  prepare.py - THE TRUSTED SIDE.  The agent never edits this file; the harness fingerprints it.
#  It holds the fixed constants, the data (sources, downloads, tokenizer, token shards), the
#  loader and the metric.  train.py may import only the names listed in docs/architecture.md.
# =================================================================================================
"""Data preparation, the data loader and the val_bpb metric for autoresearch.

Guarantees:
- Importing this module is cheap and has no side effects: nothing is downloaded or written until
  `run_prepare` (or `python prepare.py`) is called.  Torch, numpy and tiktoken are the only heavy
  imports at the top; pyarrow and rustbpe are imported only where prepare-time work needs them.
- A prepared dataset lives in `<cache>/<name>/` and is complete exactly when its `manifest.json`
  exists: it is built in a temporary directory inside the cache and renamed into place at the end,
  so a failed prepare leaves the previous dataset (and `<cache>/ACTIVE`) untouched.
- `evaluate_bpb` scores a fixed, deterministic slice of the validation tokens; the model only ever
  sees inputs, never targets, and the loss is computed here in float32.

Not guaranteed: this module does not lock the cache against two concurrent prepares, and a
dataset whose source files change on disk is not rebuilt unless its arguments change (pass
`force=True` / `--force`).

Standalone on purpose: it imports nothing from the `autoresearch` package, so a workspace can run
it with nothing but the dependencies above.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import http.client
import json
import math
import os
import pickle
import random
import shutil
import sys
import sysconfig
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime, timezone
from fnmatch import fnmatchcase
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

# Prepare-time defaults.
DEFAULT_SOURCE = "climbmix"
DEFAULT_NUM_SHARDS = 10  # climbmix train shards (~100 MB of parquet each)
DOC_CHARS = 1500  # characters: long files are cut into documents of about this size
TOKENIZER_CHARS = 300_000_000  # characters of train text fed to BPE training; ample for 8192
VAL_FRACTION = 0.05  # share of files (files:/stdlib sources) held out for validation
TEST_FRACTION = 0.05  # share of files held out as the `test` split (used by `confirm`)
MIN_FILES_FOR_FILE_SPLIT = 3  # with fewer files, the split is made by document instead
SHUFFLE_SEED = 1337  # fixed seed for document order in files:/stdlib datasets
TRAIN_SHARD_TOKENS = 2**27  # tokens per train .bin file (256 MiB of uint16)
ENCODE_BATCH_DOCS = 4096  # documents handed to tiktoken per call
DOWNLOAD_RETRIES = 5  # attempts per file before giving up
DOWNLOAD_BACKOFF = 1.0  # seconds before the first retry; doubles on every retry
DOWNLOAD_TIMEOUT = 60.0  # seconds a socket may stay silent before the attempt is retried

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
    """The cache root: $AUTORESEARCH_CACHE, else ~/.cache/autoresearch.  Never created here."""
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


def _encoding_from_ranks(mergeable_ranks: dict[bytes, int], pattern: str) -> tiktoken.Encoding:
    return tiktoken.Encoding(
        name="autoresearch",
        pat_str=pattern,
        mergeable_ranks=mergeable_ranks,
        special_tokens={BOS_TOKEN: len(mergeable_ranks)},
    )


def train_tokenizer(texts: Iterable[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Train a byte-level BPE with rustbpe on `texts`; `vocab_size` counts the BOS token."""
    import rustbpe  # prepare-time only; keeps `import prepare` light

    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(iter(texts), vocab_size - 1, pattern=SPLIT_PATTERN)
    ranks = {bytes(token): rank for token, rank in bpe.get_mergeable_ranks()}
    return Tokenizer(_encoding_from_ranks(ranks, bpe.get_pattern()))


def _save_tokenizer(tokenizer: Tokenizer, path: Path) -> None:
    enc = tokenizer.encoding
    payload = {
        "name": enc.name,
        "pat_str": enc._pat_str,
        "mergeable_ranks": enc._mergeable_ranks,
        "special_tokens": enc._special_tokens,
    }
    path.write_bytes(pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))


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
# Sources.  Each yields the documents of the three splits (train, val, test) as lists of strings.
# -------------------------------------------------------------------------------------------------

RowRange = tuple[str, int, "int | None"]  # (parquet file name, first row, end row or None)


@dataclass(frozen=True)
class HubSource:
    """A dataset of parquet files with a `text` column under one base URL.

    `train(num_shards)` and `val`/`test` name the row ranges of each split, so the split rule is
    part of the definition: climbmix pins whole shards, tinystories slices one file by row.
    """

    name: str
    base_url: str
    train: Callable[[int], list[RowRange]]
    val: tuple[RowRange, ...]
    test: tuple[RowRange, ...]
    max_train_shards: int | None  # None: a fixed file set, --num-shards does not apply


CLIMBMIX = HubSource(
    name="climbmix",
    base_url="https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main",
    # shard_00000 ... shard_06542; the last is validation, the one before it the test split
    train=lambda n: [(f"shard_{i:05d}.parquet", 0, None) for i in range(n)],
    val=(("shard_06542.parquet", 0, None),),
    test=(("shard_06541.parquet", 0, None),),
    max_train_shards=6541,
)

TINYSTORIES = HubSource(
    name="tinystories",
    base_url="https://huggingface.co/datasets/karpathy/tinystories-gpt4-clean/resolve/main",
    # One pre-shuffled file; the dataset card's suggested split by row index:
    # rows 0..9,999 test, 10,000..19,999 validation, 20,000.. train.
    train=lambda n: [("tinystories_gpt4_clean.parquet", 20_000, None)],
    val=(("tinystories_gpt4_clean.parquet", 10_000, 20_000),),
    test=(("tinystories_gpt4_clean.parquet", 0, 10_000),),
    max_train_shards=None,
)

HUB_SOURCES = {s.name: s for s in (CLIMBMIX, TINYSTORIES)}
_SPLITS = ("train", "val", "test")
_FILE_KINDS = (".txt", ".md", ".py", ".jsonl", ".parquet")  # each optionally followed by .gz


class _DownloadRetry(Exception):
    """One download attempt failed in a way worth retrying."""

    def __init__(self, message: str, *, network: bool) -> None:
        super().__init__(message)
        self.network = network  # True: the host could not be reached at all


def _fetch_once(url: str, part: Path) -> None:
    """One attempt to complete `part` from `url`, resuming with a Range request if it exists."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "autoresearch-prepare"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=DOWNLOAD_TIMEOUT
        )
    except urllib.error.HTTPError as e:
        if e.code == 416:  # our partial file is not a prefix of anything the server has
            part.unlink()
            raise _DownloadRetry("HTTP 416 on resume; restarting", network=False) from None
        if e.code in (401, 403, 404, 410):
            raise PrepareError(f"cannot download {url}: HTTP {e.code} {e.reason}") from None
        raise _DownloadRetry(f"HTTP {e.code} {e.reason}", network=False) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise _DownloadRetry(str(getattr(e, "reason", e)), network=True) from None
    with response:
        resumed = have > 0 and response.status == 206
        if resumed and not response.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
            part.unlink()
            raise _DownloadRetry(
                "server sent a range we did not ask for; restarting", network=False
            )
        if response.status == 206 and not have:
            raise _DownloadRetry("server sent a partial answer to a plain request", network=False)
        # a 200 answer to a Range request is the whole file: start over
        length = response.headers.get("Content-Length")
        expected = int(length) + (have if resumed else 0) if length is not None else None
        with open(part, "ab" if resumed else "wb") as f:
            while True:
                try:
                    chunk = response.read(1 << 20)
                except (OSError, http.client.HTTPException) as e:
                    raise _DownloadRetry(f"connection broke: {e!r}", network=False) from None
                if not chunk:
                    break
                f.write(chunk)
    size = part.stat().st_size
    if expected is not None and size != expected:
        raise _DownloadRetry(f"got {size} of {expected} bytes", network=False)


def _download(url: str, dest: Path) -> None:
    """Download `url` to `dest` via `dest.part` and an atomic rename; retry with backoff."""
    part = dest.with_name(dest.name + ".part")
    error: _DownloadRetry | None = None
    for attempt in range(DOWNLOAD_RETRIES):
        if attempt:
            time.sleep(DOWNLOAD_BACKOFF * 2 ** (attempt - 1))
        try:
            _fetch_once(url, part)
        except _DownloadRetry as e:
            error = e
            continue
        os.replace(part, dest)
        return
    assert error is not None
    if error.network:
        host = urllib.parse.urlsplit(url).netloc
        raise PrepareError(
            f"cannot reach {host}: {error}; check your connection or use --source stdlib "
            "/ files:PATH"
        )
    raise PrepareError(f"cannot download {url} after {DOWNLOAD_RETRIES} attempts: {error}")


def _download_all(
    base_url: str, names: Sequence[str], dest_dir: Path, workers: int, log: Callable[[str], None]
) -> None:
    """Make sure every file of `names` is in `dest_dir`, downloading the missing ones in parallel."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    todo = [n for n in names if not (dest_dir / n).is_file()]
    if len(todo) < len(names):
        log(f"{len(names) - len(todo)} of {len(names)} files already downloaded")
    if not todo:
        return
    log(f"downloading {len(todo)} files from {base_url} with {workers} workers")
    pool = ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo))))
    futures = {pool.submit(_download, f"{base_url.rstrip('/')}/{n}", dest_dir / n): n for n in todo}
    try:
        for done, future in enumerate(as_completed(futures), 1):
            future.result()
            size = (dest_dir / futures[future]).stat().st_size
            log(f"  {futures[future]} ({size / 1e6:.1f} MB) [{done}/{len(todo)}]")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _parquet_texts(
    path: Path,
    start: int = 0,
    stop: int | None = None,
    *,
    data: bytes | None = None,
    hint: str = "",
) -> Iterator[list[str]]:
    """Batches of the non-empty `text` values of rows start..stop of a parquet file (read from
    `data` instead of the file when given).  `hint` ends the error message."""
    import pyarrow as pa  # prepare-time only
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(pa.BufferReader(data) if data is not None else path)
        if "text" not in pf.schema_arrow.names:
            raise PrepareError(f"{path} has no `text` column (columns: {pf.schema_arrow.names})")
        row = 0
        for batch in pf.iter_batches(batch_size=ENCODE_BATCH_DOCS, columns=["text"]):
            lo, hi = max(start - row, 0), batch.num_rows
            if stop is not None:
                hi = min(stop - row, hi)
            if lo < hi:
                texts = batch.column(0).slice(lo, hi - lo).to_pylist()
                yield [t for t in texts if isinstance(t, str) and t.strip()]
            row += batch.num_rows
            if stop is not None and row >= stop:
                break
    except (pa.ArrowException, OSError) as e:
        raise PrepareError(f"cannot read {path}: {e}{hint}") from None


def _capped(batches: Iterable[list[str]], max_bytes: int | None) -> Iterator[list[str]]:
    """The documents of `batches` up to a total of `max_bytes` UTF-8 bytes (at least one)."""
    total = 0
    for batch in batches:
        if max_bytes is None:
            yield batch
            continue
        kept = []
        for doc in batch:
            size = len(doc.encode("utf-8"))
            if total and total + size > max_bytes:
                if kept:
                    yield kept
                return
            kept.append(doc)
            total += size
        yield kept


@dataclass
class _Corpus:
    """The documents of one source, per split, and what the manifest should say about them.

    `splits[s]()` returns a fresh iterator of document batches; it is called once for tokenizer
    training (train only) and once for tokenization.
    """

    splits: dict[str, Callable[[], Iterator[list[str]]]]
    info: dict = field(default_factory=dict)


def _hub_corpus(
    source: HubSource,
    num_shards: int,
    base_url: str | None,
    workers: int,
    cache: Path,
    max_train_bytes: int | None,
    log: Callable[[str], None],
) -> _Corpus:
    ranges = {"train": source.train(num_shards), "val": source.val, "test": source.test}
    names = sorted({name for rs in ranges.values() for name, _, _ in rs})
    url = base_url or source.base_url
    downloads = cache / "downloads" / source.name
    _download_all(url, names, downloads, workers, log)

    def reader(split: str) -> Callable[[], Iterator[list[str]]]:
        def batches() -> Iterator[list[str]]:
            for name, lo, hi in ranges[split]:
                hint = "; delete it and prepare again to download it anew"
                yield from _parquet_texts(downloads / name, lo, hi, hint=hint)

        if split == "train":
            return lambda: _capped(batches(), max_train_bytes)
        return batches

    return _Corpus(
        splits={s: reader(s) for s in _SPLITS},
        info={"base_url": url, "inputs": {s: [list(r) for r in ranges[s]] for s in _SPLITS}},
    )


def _file_kind(name: str) -> str | None:
    base = name[:-3] if name.endswith(".gz") else name
    return next((k for k in _FILE_KINDS if base.endswith(k)), None)


def _matches(rel: str, globs: Sequence[str]) -> bool:
    # fnmatch's `*` also crosses `/`, so `networkx/**` and `*.py` work at any depth.
    return any(fnmatchcase(rel, g) for g in globs)


def _walk(root: Path, include: Sequence[str] | None, skip_dirs: frozenset[str]) -> list[str]:
    """Relative POSIX paths of the readable-kind files under `root`, in sorted order."""
    if root.is_file():
        names = [root.name] if _file_kind(root.name) else []
        return [n for n in names if not include or _matches(n, include)]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in skip_dirs)
        rel_dir = Path(dirpath).relative_to(root)
        for name in sorted(filenames):
            rel = (rel_dir / name).as_posix()
            if _file_kind(name) and (not include or _matches(rel, include)):
                found.append(rel)
    return sorted(found)


def _hash_unit(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")


def _rank_by_hash(keys: Iterable[str]) -> list[str]:
    return sorted(set(keys), key=lambda k: (_hash_unit(k), k))


def _held_out_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """How many of `n` keys go to val and test: each a fraction of n, and at least one when the
    fraction is positive and there are at least 3 keys."""
    if n < 3:
        return 0, 0
    return tuple(max(1, round(f * n)) if f > 0 else 0 for f in (val_fraction, test_fraction))


def split_by_hash(keys: Iterable[str], val_fraction: float, test_fraction: float) -> dict[str, str]:
    """Assign every key to train/val/test by the rank of its sha256: deterministic and independent
    of the order of `keys`; the lowest-ranked keys go to val, the next ones to test."""
    ranked = _rank_by_hash(keys)
    n_val, n_test = _held_out_counts(len(ranked), val_fraction, test_fraction)
    split = {k: "val" for k in ranked[:n_val]}
    split.update({k: "test" for k in ranked[n_val : n_val + n_test]})
    split.update({k: "train" for k in ranked[n_val + n_test :]})
    return split


def cut_document(text: str, doc_chars: int) -> list[str]:
    """Cut `text` into pieces of at most `doc_chars` characters, at a blank line when one falls
    in the second half of the window, else at a line end, else mid-line.  Whitespace-only pieces
    are dropped; otherwise the pieces concatenate back to `text`."""
    pieces, start = [], 0
    while len(text) - start > doc_chars:
        lo, hi = start + doc_chars // 2, start + doc_chars
        cut = text.rfind("\n\n", lo, hi)
        if cut != -1:
            cut += 2
        else:
            cut = text.rfind("\n", lo, hi)
            cut = cut + 1 if cut != -1 else hi
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return [p for p in pieces if p.strip()]


def _read_documents(path: Path) -> list[str] | None:
    """The documents of one file: its whole text (txt/md/py) or one per record (jsonl `text`
    field, parquet `text` column).  None when the file is not UTF-8 text (it is skipped)."""
    kind = _file_kind(path.name)
    try:
        if kind == ".parquet":
            data = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else None
            return [t for batch in _parquet_texts(path, data=data) for t in batch]
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise PrepareError(f"cannot read {path}: {e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if kind != ".jsonl":
        return [text] if text.strip() else []
    docs = []
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 is legal
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise PrepareError(f"{path}:{lineno} is not JSON ({e})") from None
        value = record.get("text") if isinstance(record, dict) else None
        if not isinstance(value, str):
            raise PrepareError(f"{path}:{lineno} has no string `text` field")
        if value.strip():
            docs.append(value)
    return docs


@dataclass
class _Collector:
    """Gathers the documents of a files:/stdlib corpus per split, as lists of pieces, and stops
    adding train documents once `max_train_bytes` UTF-8 bytes are in (always keeping one)."""

    base: Path
    doc_chars: int
    max_train_bytes: int | None
    units: dict[str, list[list[str]]] = field(default_factory=lambda: {s: [] for s in _SPLITS})
    skipped: list[str] = field(default_factory=list)
    train_bytes: int = 0
    train_full: bool = False

    def read(self, rel: str) -> list[str] | None:
        docs = _read_documents(self.base / rel)
        if docs is None:
            self.skipped.append(rel)
        return docs

    def add(self, split: str, docs: list[str]) -> bool:
        """Add documents to a split; False when the train cap left none of them in."""
        if split == "train" and self.max_train_bytes is not None:
            kept: list[str] = []
            for doc in docs if not self.train_full else []:
                size = len(doc.encode("utf-8"))
                if self.train_bytes + size > self.max_train_bytes and self.train_bytes:
                    self.train_full = True
                    break
                kept.append(doc)
                self.train_bytes += size
            docs = kept
        elif split == "train":
            self.train_bytes += sum(len(doc.encode("utf-8")) for doc in docs)
        self.units[split] += [u for u in (cut_document(d, self.doc_chars) for d in docs) if u]
        return bool(docs)


def _split_by_piece(c: _Collector, rels: list[str], log: Callable[[str], None]) -> dict:
    """Too few files to split by file: cut them into pieces and split the pieces by hash."""
    log(f"only {len(rels)} file(s): splitting by document piece instead of by file")
    keyed: dict[str, str] = {}
    for rel in rels:
        pieces = [p for doc in c.read(rel) or [] for p in cut_document(doc, c.doc_chars)]
        keyed.update((f"{rel}#{i}", piece) for i, piece in enumerate(pieces))
    where = split_by_hash(keyed, VAL_FRACTION, TEST_FRACTION)
    for key, piece in keyed.items():
        c.add(where[key], [piece])
    return {"train": len(rels) - len(c.skipped), "val": 0, "test": 0}


def _split_by_file(c: _Collector, rels: list[str], val_include: Sequence[str] | None) -> dict:
    """Val is the files matching `val_include`, else the lowest-hash readable files; test the
    next ones; train the rest, read in a seeded random order until the cap is reached."""
    held: dict[str, list[str]] = {"val": [], "test": []}
    candidates = rels
    if val_include:
        candidates = [r for r in rels if not _matches(r, val_include)]
        for rel in (r for r in rels if _matches(r, val_include)):
            if (docs := c.read(rel)) is not None:
                c.add("val", docs)
                held["val"].append(rel)
    fractions = (0.0 if val_include else VAL_FRACTION, TEST_FRACTION)
    n_val, n_test = _held_out_counts(len(candidates), *fractions)
    ranked = _rank_by_hash(candidates)
    for rel in ranked:
        split = "val" if len(held["val"]) < n_val and not val_include else "test"
        if split == "test" and len(held["test"]) >= n_test:
            break
        if (docs := c.read(rel)) is not None:
            c.add(split, docs)
            held[split].append(rel)
    taken = {*held["val"], *held["test"], *c.skipped}
    train = [r for r in ranked if r not in taken]
    random.Random(SHUFFLE_SEED).shuffle(train)
    n_train = 0
    for rel in train:
        if c.train_full:
            break
        if (docs := c.read(rel)) is not None and c.add("train", docs):
            n_train += 1
    return {"train": n_train, "val": len(held["val"]), "test": len(held["test"])}


def _files_corpus(
    root: Path,
    include: Sequence[str] | None,
    val_include: Sequence[str] | None,
    skip_dirs: frozenset[str],
    doc_chars: int,
    max_train_bytes: int | None,
    log: Callable[[str], None],
) -> _Corpus:
    """Documents from local files, split by file (by document piece when there are fewer than
    MIN_FILES_FOR_FILE_SPLIT files and no `val_include`), so near-duplicate pieces of one file
    never straddle splits.

    Each split's documents are shuffled with SHUFFLE_SEED; the pieces a long document is cut into
    stay in order, one after another, so a loader row that starts at a piece runs on into the
    rest of the same document.  Train files are read in a seeded random order until
    `max_train_bytes` of text is in, so a cap takes a random sample of files.
    """
    rels = _walk(root, include, skip_dirs)
    globs = f" matching {', '.join(include)}" if include else ""
    if not rels:
        raise PrepareError(
            f"no .txt/.md/.py/.jsonl/.parquet files{globs} in {root}: nothing to prepare"
        )
    if val_include and not any(_matches(r, val_include) for r in rels):
        raise PrepareError(
            f"no files{globs} in {root} match --val-include {', '.join(val_include)}"
        )
    c = _Collector(root if root.is_dir() else root.parent, doc_chars, max_train_bytes)
    if len(rels) < MIN_FILES_FOR_FILE_SPLIT and not val_include:
        files = _split_by_piece(c, rels, log)
    else:
        files = _split_by_file(c, rels, val_include)
    if c.skipped:
        log(f"skipped {len(c.skipped)} file(s) that are not UTF-8 text, e.g. {c.skipped[0]}")
    left_out = len(rels) - len(c.skipped) - sum(files.values()) if files["val"] else 0
    if c.train_full:
        log(f"max_train_bytes reached: {left_out} train file(s) left out")
    for split in _SPLITS:
        random.Random(SHUFFLE_SEED).shuffle(c.units[split])
        if not c.units[split]:
            raise PrepareError(
                f"the {split} split of {root} is empty: add more text (at least 3 files, or "
                "one file with 3 documents) or adjust --include / --val-include"
            )

    def reader(split: str) -> Callable[[], Iterator[list[str]]]:
        pieces = [p for unit in c.units[split] for p in unit]
        step = ENCODE_BATCH_DOCS
        return lambda: (pieces[i : i + step] for i in range(0, len(pieces), step))

    info = {
        "root": str(root),
        "split_by": "file" if files["val"] else "document piece",
        "files": files,
        "documents": {s: len(c.units[s]) for s in _SPLITS},
        "train_text_bytes": c.train_bytes,
        "train_files_left_out": left_out,
        "skipped_files": c.skipped[:100],
    }
    return _Corpus(splits={s: reader(s) for s in _SPLITS}, info=info)


# -------------------------------------------------------------------------------------------------
# Building a dataset: tokenizer, token shards, manifest; then the swap into place.
# -------------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """What a source resolves to before anything is read: the dataset name, the arguments that
    define its content (the idempotency key) and how to get its documents."""

    name: str
    args: dict
    corpus: Callable[[Callable[[str], None]], _Corpus]


def _plan(
    source: str,
    *,
    num_shards: int,
    include: Sequence[str] | None,
    val_include: Sequence[str] | None,
    base_url: str | None,
    workers: int,
    cache: Path,
    max_train_bytes: int | None,
    doc_chars: int,
    tokenizer_chars: int,
) -> _Plan:
    common = {
        "format": FORMAT_VERSION,
        "vocab_size": VOCAB_SIZE,
        "max_train_bytes": max_train_bytes,
        "tokenizer_chars": tokenizer_chars,
    }
    # globs are a set: sorted so the dataset name does not depend on their order
    include = sorted([include] if isinstance(include, str) else include) if include else None
    if val_include:
        val_include = sorted([val_include] if isinstance(val_include, str) else val_include)
    else:
        val_include = None
    if source in HUB_SOURCES:
        hub = HUB_SOURCES[source]
        if include or val_include:
            raise PrepareError(f"--include / --val-include apply to files: sources, not {source}")
        if hub.max_train_shards is not None and not 1 <= num_shards <= hub.max_train_shards:
            raise PrepareError(f"--num-shards must be 1..{hub.max_train_shards} for {source}")
        args = {"source": source, **common}
        if hub.max_train_shards is not None:
            args["num_shards"] = num_shards
        return _Plan(
            hub.name,
            args,
            lambda log: _hub_corpus(
                hub, num_shards, base_url, workers, cache, max_train_bytes, log
            ),
        )
    if source == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"]).resolve()
        skip = frozenset({"__pycache__", "site-packages", "dist-packages"})
        args = {
            "source": "stdlib",
            "python": sys.version.split()[0],
            "root": str(root),
            "doc_chars": doc_chars,
            **common,
        }
        return _Plan(
            "stdlib",
            args,
            lambda log: _files_corpus(root, ["*.py"], None, skip, doc_chars, max_train_bytes, log),
        )
    if source.startswith("files:") and source[len("files:") :].strip():
        root = Path(source[len("files:") :].strip()).expanduser().resolve()
        if not root.exists():
            raise PrepareError(f"{root} does not exist")
        key = json.dumps([str(root), include, val_include])
        name = "files-" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:10]
        args = {
            "source": "files",
            "root": str(root),
            "include": include,
            "val_include": val_include,
            "doc_chars": doc_chars,
            **common,
        }
        skip = frozenset({"__pycache__"})
        return _Plan(
            name,
            args,
            lambda log: _files_corpus(
                root, include, val_include, skip, doc_chars, max_train_bytes, log
            ),
        )
    raise PrepareError(
        f"unknown source {source!r}: use climbmix, tinystories, stdlib or files:PATH"
    )


def _take_chars(batches: Iterable[list[str]], max_chars: int) -> Iterator[str]:
    """Documents from `batches` until `max_chars` characters (the last one cut short)."""
    left = max_chars
    for batch in batches:
        for doc in batch:
            if left <= 0:
                return
            yield doc[:left]
            left -= len(doc)


class _ShardWriter:
    """Writes tokenized documents of one split as uint16 `.bin` files plus the start offset of
    every document (`.starts.npy`, int64).  Each document is [BOS] + its tokens and lies whole
    in one file; train rolls over to a new file after `max_tokens`."""

    def __init__(self, directory: Path, split: str, bos: int, max_tokens: int | None) -> None:
        self.directory, self.split, self.bos, self.max_tokens = directory, split, bos, max_tokens
        self.shards: list[dict] = []
        self._file = None
        self._tokens = 0
        self._starts: list[np.ndarray] = []

    def _stem(self) -> str:
        return f"{self.split}_{len(self.shards):05d}" if self.max_tokens else self.split

    def add(self, docs: list[list[int]]) -> None:
        docs = [d for d in docs if d]
        if not docs:
            return
        lengths = np.fromiter((len(d) + 1 for d in docs), dtype=np.int64, count=len(docs))
        count = int(lengths.sum())
        if self._file and self.max_tokens and self._tokens + count > self.max_tokens:
            self._finish()
        if self._file is None:
            self._file = open(self.directory / f"{self._stem()}.bin", "wb")
        flat: list[int] = []
        for ids in docs:
            flat.append(self.bos)
            flat.extend(ids)
        self._file.write(np.asarray(flat, dtype=np.uint16).tobytes())
        self._starts.append(self._tokens + np.cumsum(lengths) - lengths)
        self._tokens += count

    def _finish(self) -> None:
        assert self._file is not None
        self._file.close()
        stem = self._stem()
        starts = np.concatenate(self._starts)
        np.save(self.directory / f"{stem}.starts.npy", starts)
        self.shards.append(
            {
                "file": f"{stem}.bin",
                "starts": f"{stem}.starts.npy",
                "tokens": self._tokens,
                "docs": len(starts),
            }
        )
        self._file, self._tokens, self._starts = None, 0, []

    def close(self) -> dict:
        """Finish the last file; return the split's manifest entry."""
        if self._file is not None:
            self._finish()
        return {
            "shards": self.shards,
            "tokens": sum(s["tokens"] for s in self.shards),
            "docs": sum(s["docs"] for s in self.shards),
        }


def _build(
    tmp: Path,
    corpus: _Corpus,
    header: dict,
    tokenizer_chars: int,
    log: Callable[[str], None],
) -> dict:
    """Train the tokenizer, write all token files and finally the manifest into `tmp`."""
    started = time.time()
    log(f"training the BPE tokenizer ({VOCAB_SIZE} tokens) on up to {tokenizer_chars:,} chars")
    tokenizer = train_tokenizer(_take_chars(corpus.splits["train"](), tokenizer_chars))
    if tokenizer.vocab_size < VOCAB_SIZE:
        log(f"note: the text allowed only {tokenizer.vocab_size} tokens (< {VOCAB_SIZE})")
    log(f"  tokenizer trained in {time.time() - started:.1f}s")
    _save_tokenizer(tokenizer, tmp / TOKENIZER_FILE)
    np.save(tmp / TOKEN_BYTES_FILE, tokenizer.token_bytes())

    threads = max(1, os.cpu_count() or 1)
    splits = {}
    for split in _SPLITS:
        t0 = time.time()
        writer = _ShardWriter(
            tmp, split, tokenizer.bos_id, TRAIN_SHARD_TOKENS if split == "train" else None
        )
        for batch in corpus.splits[split]():
            writer.add(tokenizer.encode_batch(batch, num_threads=threads))
        splits[split] = writer.close()
        if not splits[split]["tokens"]:
            raise PrepareError(f"the {split} split has no text: nothing to tokenize")
        log(
            f"  {split}: {splits[split]['tokens']:,} tokens, {splits[split]['docs']:,} documents, "
            f"{len(splits[split]['shards'])} file(s) in {time.time() - t0:.1f}s"
        )
    for split in ("val", "test"):
        splits[split]["sha256"] = _sha256(tmp / splits[split]["shards"][0]["file"])
    manifest = {
        **header,
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "tokenizer": {"file": TOKENIZER_FILE, "sha256": _sha256(tmp / TOKENIZER_FILE)},
        "token_bytes": {"file": TOKEN_BYTES_FILE, "sha256": _sha256(tmp / TOKEN_BYTES_FILE)},
        "splits": splits,
        **corpus.info,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _is_complete(dataset: Path, args: dict) -> bool:
    """True when `dataset` holds a finished build made with exactly `args`."""
    try:
        manifest = json.loads((dataset / MANIFEST).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    if manifest.get("args") != json.loads(json.dumps(args)):
        return False
    try:
        verify_dataset(dataset)
    except PrepareError:
        return False
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_builds(cache: Path) -> None:
    """Delete temporary build directories left by a prepare that was killed outright."""
    for path in cache.glob(".tmp-*"):
        pid = path.name.rsplit("-", 2)[-2]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _set_active(cache: Path, name: str, log: Callable[[str], None]) -> None:
    path = cache / ACTIVE
    try:
        if path.read_text(encoding="utf-8").strip() == name:
            return
    except FileNotFoundError:
        pass
    tmp = cache / f".{ACTIVE}.{os.getpid()}.tmp"
    tmp.write_text(name + "\n", encoding="utf-8")
    os.replace(tmp, path)
    log(f"active dataset: {name}")


def run_prepare(
    source: str = DEFAULT_SOURCE,
    *,
    num_shards: int = DEFAULT_NUM_SHARDS,
    include: Sequence[str] | None = None,
    val_include: Sequence[str] | None = None,
    base_url: str | None = None,
    workers: int = 8,
    cache_dir: str | Path | None = None,
    max_train_bytes: int | None = None,
    doc_chars: int = DOC_CHARS,
    tokenizer_chars: int = TOKENIZER_CHARS,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Prepare a dataset and make it the active one; return its directory.

    `source` is `climbmix`, `tinystories`, `stdlib` or `files:PATH`.  Idempotent: when the
    dataset already holds a complete build with the same arguments it only says "already
    prepared" (and re-points ACTIVE at it); `force` rebuilds anyway.  A build happens in a
    temporary directory inside the cache and replaces the old dataset only when complete, so on
    any PrepareError the previous dataset and ACTIVE are unchanged.  Downloads are kept in
    `<cache>/downloads/<source>/` and reused by later builds.
    """
    for label, value, low in (
        ("num_shards", num_shards, 1),
        ("workers", workers, 1),
        ("doc_chars", doc_chars, 100),
        ("tokenizer_chars", tokenizer_chars, 1000),
    ):
        if value < low:
            raise PrepareError(f"{label} must be at least {low}, got {value}")
    if max_train_bytes is not None and max_train_bytes < 1:
        raise PrepareError(f"max_train_bytes must be positive, got {max_train_bytes}")
    cache = Path(cache_dir).expanduser() if cache_dir else cache_root()
    plan = _plan(
        source,
        num_shards=num_shards,
        include=include,
        val_include=val_include,
        base_url=base_url,
        workers=workers,
        cache=cache,
        max_train_bytes=max_train_bytes,
        doc_chars=doc_chars,
        tokenizer_chars=tokenizer_chars,
    )
    dest = cache / plan.name
    if not force and _is_complete(dest, plan.args):
        log(f"{plan.name} already prepared in {dest}")
        _set_active(cache, plan.name, log)
        return dest

    started = time.time()
    cache.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(cache)
    tmp = cache / f".tmp-{plan.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        corpus = plan.corpus(log)
        header = {"name": plan.name, "source": plan.args["source"], "args": plan.args}
        _build(tmp, corpus, header, tokenizer_chars, log)
        old = None
        if dest.exists():
            old = cache / f".old-{plan.name}-{uuid.uuid4().hex[:8]}"
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"prepared {plan.name} in {dest} ({time.time() - started:.1f}s)")
    _set_active(cache, plan.name, log)
    return dest


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


def evaluate_bpb_split(
    model: torch.nn.Module, batch_size: int, split: str, device: str | torch.device = "cpu"
) -> float:
    """`evaluate_bpb` on another split, e.g. `test` for the held-out confirmation."""
    return evaluate_bpb(model, batch_size, device, split=split)


# -------------------------------------------------------------------------------------------------
# Command line: python prepare.py --source S ...
# -------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Prepare a dataset from the command line; return the exit status."""
    parser = argparse.ArgumentParser(
        prog="prepare.py",
        description="Download/read a corpus, train the tokenizer and write token shards into "
        f"the cache (${CACHE_ENV}, default ~/.cache/autoresearch).",
    )
    parser.add_argument(
        "--source",
        default=DEFAULT_SOURCE,
        help="climbmix (default), tinystories, stdlib (offline) or files:PATH",
    )
    parser.add_argument(
        "--num-shards",
        type=int,
        default=DEFAULT_NUM_SHARDS,
        help=f"climbmix train shards to download (default {DEFAULT_NUM_SHARDS})",
    )
    parser.add_argument(
        "--include",
        action="append",
        metavar="GLOB",
        help="files: only paths matching GLOB (repeatable; * also matches /)",
    )
    parser.add_argument(
        "--val-include",
        action="append",
        metavar="GLOB",
        help="files: these paths are the validation split (repeatable)",
    )
    parser.add_argument("--base-url", help="download from this mirror instead of the hub")
    parser.add_argument("--workers", type=int, default=8, help="parallel downloads (default 8)")
    parser.add_argument("--cache-dir", help=f"cache root (default ${CACHE_ENV})")
    parser.add_argument(
        "--max-train-bytes", type=int, help="cap the train text at this many UTF-8 bytes"
    )
    parser.add_argument(
        "--doc-chars",
        type=int,
        default=DOC_CHARS,
        help=f"files/stdlib: cut long files into documents of about this many characters "
        f"(default {DOC_CHARS})",
    )
    parser.add_argument(
        "--tokenizer-chars",
        type=int,
        default=TOKENIZER_CHARS,
        help=f"characters of train text used to train the tokenizer (default {TOKENIZER_CHARS:,})",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    args = parser.parse_args(argv)
    try:
        run_prepare(
            args.source,
            num_shards=args.num_shards,
            include=args.include,
            val_include=args.val_include,
            base_url=args.base_url,
            workers=args.workers,
            cache_dir=args.cache_dir,
            max_train_bytes=args.max_train_bytes,
            doc_chars=args.doc_chars,
            tokenizer_chars=args.tokenizer_chars,
            force=args.force,
        )
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
