"""val_bpb scored the way upstream autoresearch scores it, beside this project's own metric,
on one checkpoint: how much of a gap between the two projects' figures is the metric itself.

    python bench/doc_eval.py --checkpoint model.pt      # in a directory with train.py, prepare.py

This project's `prepare.evaluate_bpb` scores the validation token stream cut into rows of
MAX_SEQ_LEN + 1 tokens: every token once, and a row may begin mid-document with little context.
Upstream scores BOS-aligned rows instead: each row starts at a document's first token; documents
are packed whole, the largest one that fits the rest of the row first (from a buffer of
BUFFER_DOCS documents); when none fits, the shortest is cropped to fill the row and its tail is
dropped; rows are drawn until EVAL_TOKENS targets, going round the split's documents again when
they run out. So every scored token has its document's beginning in context, and document
beginnings are scored more often than their ends. The byte accounting is the same in both:
nats summed over targets that are not special tokens, over the UTF-8 bytes of those targets.

Prints one JSON line: {"doc_bpb": ..., "stream_bpb": ..., "rows": ..., "docs": ...}.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

BUFFER_DOCS = 1000  # documents the packer chooses from


def documents(tokens: np.ndarray, bos: int) -> list[np.ndarray]:
    """The documents of a token stream in which each document starts with `bos` (anything
    before the first `bos` is a document of its own)."""
    starts = np.flatnonzero(tokens == bos).tolist()
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    ends = [*starts[1:], len(tokens)]
    return [tokens[a:b] for a, b in zip(starts, ends, strict=True) if b > a]


def packed_rows(docs: list[np.ndarray], row_len: int, n_rows: int) -> np.ndarray:
    """`n_rows` rows of `row_len` tokens, each starting at a document's beginning: best fit
    from a buffer of BUFFER_DOCS documents, the shortest cropped when none fits the rest."""
    supply: Iterator[np.ndarray] = itertools.cycle(docs)
    order = itertools.count()  # ties between equal lengths: the older document first
    buffer: list[tuple[int, int, np.ndarray]] = []  # (length, order, doc), sorted
    lengths: list[int] = []  # the buffer's lengths, kept in step for bisect
    rows = np.empty((n_rows, row_len), dtype=np.int64)
    for r in range(n_rows):
        pos = 0
        while pos < row_len:
            while len(buffer) < BUFFER_DOCS:
                doc = next(supply)
                entry = (len(doc), next(order), doc)
                i = bisect.bisect_left(buffer, entry[:2], key=lambda e: e[:2])
                buffer.insert(i, entry)
                lengths.insert(i, entry[0])
            room = row_len - pos
            i = bisect.bisect_right(lengths, room) - 1  # the largest that fits
            if i >= 0:
                i = bisect.bisect_left(lengths, lengths[i])  # the oldest of that length
                n, _, doc = buffer.pop(i)
                lengths.pop(i)
                rows[r, pos : pos + n] = doc
                pos += n
            else:  # nothing fits: crop the shortest to fill the row
                _, _, doc = buffer.pop(0)
                lengths.pop(0)
                rows[r, pos:] = doc[:room]
                pos = row_len
    return rows


def doc_aligned_bpb(
    model, rows: np.ndarray, token_bytes, batch_size: int, device, autocast
) -> float:
    """Bits per byte of `model` on the packed `rows` (inputs row[:-1], targets row[1:])."""
    import torch
    import torch.nn.functional as F

    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    model.eval()
    with torch.no_grad():
        for first in range(0, len(rows), batch_size):
            block = torch.from_numpy(rows[first : first + batch_size]).to(device)
            x, y = block[:, :-1], block[:, 1:].reshape(-1)
            with autocast():
                logits = model(x)
            nats = F.cross_entropy(logits.float().flatten(0, 1), y, reduction="none")
            weights = token_bytes[y]
            total_nats += torch.where(weights > 0, nats, 0.0).sum(dtype=torch.float64)
            total_bytes += weights.sum()
    return float(total_nats) / (math.log(2) * int(total_bytes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    sys.path.insert(0, str(Path.cwd()))  # the version's train.py and prepare.py
    import torch

    import prepare
    import train

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    model = train.load_model(args.checkpoint, device)
    dataset = prepare.active_dataset_dir()
    entry = prepare._split_entry(dataset, "val")
    tokens = np.asarray(prepare._tokens(dataset / entry["shards"][0]["file"]), dtype=np.int64)
    bos = prepare.load_tokenizer().bos_id
    docs = documents(tokens, bos)
    rows = packed_rows(docs, prepare.MAX_SEQ_LEN + 1, prepare.EVAL_TOKENS // prepare.MAX_SEQ_LEN)
    token_bytes = prepare.load_token_bytes(device)
    doc_bpb = doc_aligned_bpb(model, rows, token_bytes, args.batch_size, device, autocast)
    with autocast():
        stream_bpb = prepare.evaluate_bpb(model, args.batch_size, device)
    result = {"doc_bpb": doc_bpb, "stream_bpb": stream_bpb, "rows": len(rows), "docs": len(docs)}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
