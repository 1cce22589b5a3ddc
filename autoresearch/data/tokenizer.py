"""Training the tokenizer: byte-level BPE (rustbpe) with the split pattern, special token
and vocabulary size that the workspace's prepare.py defines (`contract`), saved in the form its
`load_tokenizer` reads.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

import tiktoken


def train_tokenizer(contract: ModuleType, texts: Iterable[str], vocab_size: int | None = None):
    """Train a byte-level BPE with rustbpe on `texts`; a `contract.Tokenizer` whose
    `vocab_size` (default contract.VOCAB_SIZE) counts the BOS token."""
    import rustbpe  # prepare-time only

    vocab_size = vocab_size or contract.VOCAB_SIZE
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(iter(texts), vocab_size - 1, pattern=contract.SPLIT_PATTERN)
    ranks = {bytes(token): rank for token, rank in bpe.get_mergeable_ranks()}
    encoding = tiktoken.Encoding(
        name="autoresearch",
        pat_str=bpe.get_pattern(),
        mergeable_ranks=ranks,
        special_tokens={contract.BOS_TOKEN: len(ranks)},
    )
    return contract.Tokenizer(encoding)


def save_tokenizer(tokenizer, path: Path) -> None:
    """Write `tokenizer` (a contract.Tokenizer) as the pickle `load_tokenizer` reads."""
    enc = tokenizer.encoding
    payload = {
        "name": enc.name,
        "pat_str": enc._pat_str,
        "mergeable_ranks": enc._mergeable_ranks,
        "special_tokens": enc._special_tokens,
    }
    path.write_bytes(pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))
