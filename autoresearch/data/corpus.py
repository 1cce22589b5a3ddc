"""What every source yields: the documents of the three splits, as batches of strings.

Guarantees: `Corpus.splits[s]()` starts a fresh pass over split `s` each time it is called;
`capped` never cuts a document in two. Reading parquet needs pyarrow, imported only there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError

SPLITS = ("train", "val", "test")
ENCODE_BATCH_DOCS = 4096  # documents read (and handed to tiktoken) per batch


def parquet_texts(
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
            raise DataError(f"{path} has no `text` column (columns: {pf.schema_arrow.names})")
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
        raise DataError(f"cannot read {path}: {e}{hint}") from None


def capped(batches: Iterable[list[str]], max_bytes: int | None) -> Iterator[list[str]]:
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
class Corpus:
    """The documents of one source, per split, and what the manifest should say about them.

    `splits[s]()` returns a fresh iterator of document batches; it is called once for tokenizer
    training (train only) and once for tokenization.
    """

    splits: dict[str, Callable[[], Iterator[list[str]]]]
    info: dict = field(default_factory=dict)
