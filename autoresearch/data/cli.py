"""`python prepare.py ...`: the data pipeline's command line (prepare.py delegates here)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import ModuleType

from ..errors import DataError
from .build import DEFAULT_NUM_SHARDS, DEFAULT_SOURCE, DOC_CHARS, TOKENIZER_CHARS, run_prepare


def main(contract: ModuleType, argv: Sequence[str] | None = None) -> int:
    """Prepare a dataset from the command line for `contract` (the prepare.py being run);
    return the exit status."""
    parser = argparse.ArgumentParser(
        prog="prepare.py",
        description="Download/read a corpus, train the tokenizer and write token shards into "
        "the cache ($AUTORESEARCH_CACHE, default ~/.cache/autoresearch).",
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
    parser.add_argument("--cache-dir", help="cache root (default $AUTORESEARCH_CACHE)")
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
            contract,
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
    except (DataError, contract.PrepareError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
