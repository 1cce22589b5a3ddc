"""Local sources (`files:PATH`, `stdlib`): text, markdown, Python, JSONL and parquet files,
optionally gzipped, cut into documents and split into train, val and test.

Guarantees: the split depends only on the files' relative paths (a hash), never on the order
the file system lists them; with `val_include` the named paths are the validation split; every
split's documents are shuffled with a fixed seed. Unreadable files are skipped and listed.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

from ..errors import DataError
from .corpus import ENCODE_BATCH_DOCS, SPLITS, Corpus, parquet_texts

VAL_FRACTION = 0.05  # share of files held out for validation
TEST_FRACTION = 0.05  # share of files held out as the `test` split (used by `confirm`)
MIN_FILES_FOR_FILE_SPLIT = 3  # with fewer files, the split is made by document instead
SHUFFLE_SEED = 1337  # fixed seed for document order
FILE_KINDS = (".txt", ".md", ".py", ".jsonl", ".parquet")  # each optionally followed by .gz


def _file_kind(name: str) -> str | None:
    base = name[:-3] if name.endswith(".gz") else name
    return next((k for k in FILE_KINDS if base.endswith(k)), None)


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
            return [t for batch in parquet_texts(path, data=data) for t in batch]
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read {path}: {e}") from None
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
            raise DataError(f"{path}:{lineno} is not JSON ({e})") from None
        value = record.get("text") if isinstance(record, dict) else None
        if not isinstance(value, str):
            raise DataError(f"{path}:{lineno} has no string `text` field")
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
    units: dict[str, list[list[str]]] = field(default_factory=lambda: {s: [] for s in SPLITS})
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


def files_corpus(
    root: Path,
    include: Sequence[str] | None,
    val_include: Sequence[str] | None,
    skip_dirs: frozenset[str],
    doc_chars: int,
    max_train_bytes: int | None,
    log: Callable[[str], None],
) -> Corpus:
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
        raise DataError(
            f"no .txt/.md/.py/.jsonl/.parquet files{globs} in {root}: nothing to prepare"
        )
    if val_include and not any(_matches(r, val_include) for r in rels):
        raise DataError(f"no files{globs} in {root} match --val-include {', '.join(val_include)}")
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
    for split in SPLITS:
        random.Random(SHUFFLE_SEED).shuffle(c.units[split])
        if not c.units[split]:
            raise DataError(
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
        "documents": {s: len(c.units[s]) for s in SPLITS},
        "train_text_bytes": c.train_bytes,
        "train_files_left_out": left_out,
        "skipped_files": c.skipped[:100],
    }
    return Corpus(splits={s: reader(s) for s in SPLITS}, info=info)
