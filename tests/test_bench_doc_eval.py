"""bench/doc_eval.py: the document-aligned packing and scoring used to compare this project's
val_bpb with upstream's, on synthetic documents whose packing is worked out by hand."""

from __future__ import annotations

import contextlib
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_doc_eval", ROOT / "bench" / "doc_eval.py")
doc_eval = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(doc_eval)

BOS = 99


def _doc(n: int, first: int) -> np.ndarray:
    """BOS then n - 1 distinct tokens."""
    return np.array([BOS, *range(first, first + n - 1)], dtype=np.int64)


def test_documents_start_at_each_bos() -> None:
    stream = np.array([BOS, 1, 2, BOS, 3, BOS, 4, 5, 6], dtype=np.int64)
    docs = doc_eval.documents(stream, BOS)
    assert [d.tolist() for d in docs] == [[BOS, 1, 2], [BOS, 3], [BOS, 4, 5, 6]]
    assert [d.tolist() for d in doc_eval.documents(stream[1:], BOS)][0] == [1, 2]


def test_rows_are_packed_best_fit_and_the_shortest_is_cropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Documents A (5 tokens), B (3), C (7), D (2), in turn, with a buffer of 3:
    row 0: C fits best (7 of 8); nothing fits the last token, so the shortest (D) is cropped;
    row 1: the oldest 5 (A), then B fills the row exactly."""
    monkeypatch.setattr(doc_eval, "BUFFER_DOCS", 3)
    a, b, c, d = _doc(5, 10), _doc(3, 20), _doc(7, 30), _doc(2, 40)
    rows = doc_eval.packed_rows([a, b, c, d], row_len=8, n_rows=2)
    assert rows.tolist() == [
        [*c.tolist(), BOS],
        [*a.tolist(), *b.tolist()],
    ]
    assert all(row[0] == BOS for row in rows)


def test_a_uniform_model_scores_log_vocab_nats_per_scored_token() -> None:
    vocab = 100
    docs = [_doc(n, 1 + 7 * i) for i, n in enumerate([6, 4, 9, 3, 5, 7])]
    rows = doc_eval.packed_rows(docs, row_len=10, n_rows=5)
    token_bytes = torch.ones(vocab, dtype=torch.int64) * 2
    token_bytes[BOS] = 0  # a special token: not scored, no bytes

    class Uniform(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.zeros(*x.shape, vocab)

    bpb = doc_eval.doc_aligned_bpb(
        Uniform(), rows, token_bytes, 2, torch.device("cpu"), contextlib.nullcontext
    )
    targets = torch.from_numpy(rows[:, 1:]).reshape(-1)
    scored = int((token_bytes[targets] > 0).sum())
    expected = scored * math.log(vocab) / (math.log(2) * int(token_bytes[targets].sum()))
    assert bpb == pytest.approx(expected, rel=1e-6)  # float32 cross-entropy
    assert scored < targets.numel()  # some targets were BOS and left out
