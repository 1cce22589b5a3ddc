"""Building a dataset: the plan a source resolves to, the tokenizer, the token shards, the
manifest, and the swap into place; `run_prepare` is the one entry point.

Guarantees: a build happens in a temporary directory inside the cache and replaces the old
dataset only when complete, so a failed prepare leaves the previous dataset and <cache>/ACTIVE
untouched; a dataset is complete exactly when its manifest exists. The format (file names,
vocabulary, tokenizer) is the one the workspace's prepare.py (`contract`) reads.

Not guaranteed: a lock against two concurrent prepares of one cache, or a rebuild when a
source's files change on disk with the same arguments (pass `force`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import sysconfig
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType

import numpy as np

from ..errors import DataError
from ..workspace import cache_dir as default_cache
from .corpus import SPLITS, Corpus
from .files import files_corpus
from .hub import HUB_SOURCES, hub_corpus
from .tokenizer import save_tokenizer, train_tokenizer

DEFAULT_SOURCE = "climbmix"
DEFAULT_NUM_SHARDS = 10  # climbmix train shards (~100 MB of parquet each)
DOC_CHARS = 1500  # characters: long files are cut into documents of about this size
TOKENIZER_CHARS = 300_000_000  # characters of train text fed to BPE training; ample for 8192
TRAIN_SHARD_TOKENS = 2**27  # tokens per train .bin file (256 MiB of uint16)


@dataclass
class _Plan:
    """What a source resolves to before anything is read: the dataset name, the arguments that
    define its content (the idempotency key) and how to get its documents."""

    name: str
    args: dict
    corpus: Callable[[Callable[[str], None]], Corpus]


def _plan(
    contract: ModuleType,
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
        "format": contract.FORMAT_VERSION,
        "vocab_size": contract.VOCAB_SIZE,
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
            raise DataError(f"--include / --val-include apply to files: sources, not {source}")
        if hub.max_train_shards is not None and not 1 <= num_shards <= hub.max_train_shards:
            raise DataError(f"--num-shards must be 1..{hub.max_train_shards} for {source}")
        args = {"source": source, **common}
        if hub.max_train_shards is not None:
            args["num_shards"] = num_shards
        return _Plan(
            hub.name,
            args,
            lambda log: hub_corpus(hub, num_shards, base_url, workers, cache, max_train_bytes, log),
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
            lambda log: files_corpus(root, ["*.py"], None, skip, doc_chars, max_train_bytes, log),
        )
    if source.startswith("files:") and source[len("files:") :].strip():
        root = Path(source[len("files:") :].strip()).expanduser().resolve()
        if not root.exists():
            raise DataError(f"{root} does not exist")
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
            lambda log: files_corpus(
                root, include, val_include, skip, doc_chars, max_train_bytes, log
            ),
        )
    raise DataError(f"unknown source {source!r}: use climbmix, tinystories, stdlib or files:PATH")


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
    contract: ModuleType,
    tmp: Path,
    corpus: Corpus,
    header: dict,
    tokenizer_chars: int,
    log: Callable[[str], None],
) -> dict:
    """Train the tokenizer, write all token files and finally the manifest into `tmp`."""
    started = time.time()
    log(
        f"training the BPE tokenizer ({contract.VOCAB_SIZE} tokens) on up to {tokenizer_chars:,} chars"
    )
    tokenizer = train_tokenizer(contract, _take_chars(corpus.splits["train"](), tokenizer_chars))
    if tokenizer.vocab_size < contract.VOCAB_SIZE:
        log(f"note: the text allowed only {tokenizer.vocab_size} tokens (< {contract.VOCAB_SIZE})")
    log(f"  tokenizer trained in {time.time() - started:.1f}s")
    save_tokenizer(tokenizer, tmp / contract.TOKENIZER_FILE)
    np.save(tmp / contract.TOKEN_BYTES_FILE, tokenizer.token_bytes())

    threads = max(1, os.cpu_count() or 1)
    splits = {}
    for split in SPLITS:
        t0 = time.time()
        writer = _ShardWriter(
            tmp, split, tokenizer.bos_id, TRAIN_SHARD_TOKENS if split == "train" else None
        )
        for batch in corpus.splits[split]():
            writer.add(tokenizer.encode_batch(batch, num_threads=threads))
        splits[split] = writer.close()
        if not splits[split]["tokens"]:
            raise DataError(f"the {split} split has no text: nothing to tokenize")
        log(
            f"  {split}: {splits[split]['tokens']:,} tokens, {splits[split]['docs']:,} documents, "
            f"{len(splits[split]['shards'])} file(s) in {time.time() - t0:.1f}s"
        )
    for split in ("val", "test"):
        splits[split]["sha256"] = contract._sha256(tmp / splits[split]["shards"][0]["file"])
    manifest = {
        **header,
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "tokenizer": {
            "file": contract.TOKENIZER_FILE,
            "sha256": contract._sha256(tmp / contract.TOKENIZER_FILE),
        },
        "token_bytes": {
            "file": contract.TOKEN_BYTES_FILE,
            "sha256": contract._sha256(tmp / contract.TOKEN_BYTES_FILE),
        },
        "splits": splits,
        **corpus.info,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (tmp / contract.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _is_complete(contract: ModuleType, dataset: Path, args: dict) -> bool:
    """True when `dataset` holds a finished build made with exactly `args`."""
    try:
        manifest = json.loads((dataset / contract.MANIFEST).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    if manifest.get("args") != json.loads(json.dumps(args)):
        return False
    try:
        contract.verify_dataset(dataset)
    except contract.PrepareError:
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


def _set_active(contract: ModuleType, cache: Path, name: str, log: Callable[[str], None]) -> None:
    path = cache / contract.ACTIVE
    try:
        if path.read_text(encoding="utf-8").strip() == name:
            return
    except FileNotFoundError:
        pass
    tmp = cache / f".{contract.ACTIVE}.{os.getpid()}.tmp"
    tmp.write_text(name + "\n", encoding="utf-8")
    os.replace(tmp, path)
    log(f"active dataset: {name}")


def run_prepare(
    contract: ModuleType,
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

    `contract` is the workspace's prepare.py (a module): its vocabulary size, tokenizer and
    file names define what is built, so that its loader reads it.
    `source` is `climbmix`, `tinystories`, `stdlib` or `files:PATH`.  Idempotent: when the
    dataset already holds a complete build with the same arguments it only says "already
    prepared" (and re-points ACTIVE at it); `force` rebuilds anyway.  A build happens in a
    temporary directory inside the cache and replaces the old dataset only when complete, so on
    any DataError the previous dataset and ACTIVE are unchanged.  Downloads are kept in
    `<cache>/downloads/<source>/` and reused by later builds.
    """
    for label, value, low in (
        ("num_shards", num_shards, 1),
        ("workers", workers, 1),
        ("doc_chars", doc_chars, 100),
        ("tokenizer_chars", tokenizer_chars, 1000),
    ):
        if value < low:
            raise DataError(f"{label} must be at least {low}, got {value}")
    if max_train_bytes is not None and max_train_bytes < 1:
        raise DataError(f"max_train_bytes must be positive, got {max_train_bytes}")
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache()
    plan = _plan(
        contract,
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
    if not force and _is_complete(contract, dest, plan.args):
        log(f"{plan.name} already prepared in {dest}")
        _set_active(contract, cache, plan.name, log)
        return dest

    started = time.time()
    cache.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(cache)
    tmp = cache / f".tmp-{plan.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        corpus = plan.corpus(log)
        header = {"name": plan.name, "source": plan.args["source"], "args": plan.args}
        _build(contract, tmp, corpus, header, tokenizer_chars, log)
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
    _set_active(contract, cache, plan.name, log)
    return dest
