"""Hub sources (climbmix, tinystories): parquet files under a base URL, downloaded with
retries into `<cache>/downloads/<source>/`.

Guarantees: a file is renamed into place only once complete, so an interrupted download is
started again, never used half-written; a host that cannot be reached fails fast with a
message naming the mirror option. Not guaranteed: that the hub's files never change (their
names are pinned, their bytes are not).
"""

from __future__ import annotations

import http.client
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from .corpus import SPLITS, Corpus, capped, parquet_texts

DOWNLOAD_RETRIES = 5  # attempts per file before giving up
DOWNLOAD_BACKOFF = 1.0  # seconds before the first retry; doubles on every retry
DOWNLOAD_TIMEOUT = 60.0  # seconds a socket may stay silent before the attempt is retried

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
            raise DataError(f"cannot download {url}: HTTP {e.code} {e.reason}") from None
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
        raise DataError(
            f"cannot reach {host}: {error}; check your connection or use --source stdlib "
            "/ files:PATH"
        )
    raise DataError(f"cannot download {url} after {DOWNLOAD_RETRIES} attempts: {error}")


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


def hub_corpus(
    source: HubSource,
    num_shards: int,
    base_url: str | None,
    workers: int,
    cache: Path,
    max_train_bytes: int | None,
    log: Callable[[str], None],
) -> Corpus:
    ranges = {"train": source.train(num_shards), "val": source.val, "test": source.test}
    names = sorted({name for rs in ranges.values() for name, _, _ in rs})
    url = base_url or source.base_url
    downloads = cache / "downloads" / source.name
    _download_all(url, names, downloads, workers, log)

    def reader(split: str) -> Callable[[], Iterator[list[str]]]:
        def batches() -> Iterator[list[str]]:
            for name, lo, hi in ranges[split]:
                hint = "; delete it and prepare again to download it anew"
                yield from parquet_texts(downloads / name, lo, hi, hint=hint)

        if split == "train":
            return lambda: capped(batches(), max_train_bytes)
        return batches

    return Corpus(
        splits={s: reader(s) for s in SPLITS},
        info={"base_url": url, "inputs": {s: [list(r) for r in ranges[s]] for s in SPLITS}},
    )
