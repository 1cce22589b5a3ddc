"""prepare.py: presets, sources, tokenizer, token files, loader and the val_bpb metric.

Everything runs on the CPU without network: downloads come from a local HTTP server (FakeHub)
and every test gets its own cache through AUTORESEARCH_CACHE.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from loopkit import closed_port
from prepare_helpers import (
    ROOT,
    FakeHub,
    paragraphs,
    parquet_bytes,
    write_mixed_corpus,
    write_text_corpus,
)

import prepare
from autoresearch.data import files, hub, tokenizer
from prepare import PrepareError


def quiet(message: str) -> None:
    pass


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own empty cache and fast download retries."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(cache))
    monkeypatch.delenv("AUTORESEARCH_DATASET", raising=False)
    monkeypatch.setattr(hub, "DOWNLOAD_BACKOFF", 0.001)
    return cache


@pytest.fixture(scope="module")
def text_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache holding one dataset prepared from 20 small text files."""
    corpus = tmp_path_factory.mktemp("corpus")
    write_text_corpus(corpus, 20)
    cache = tmp_path_factory.mktemp("text-cache")
    prepare.run_prepare(f"files:{corpus}", cache_dir=cache, log=quiet)
    return cache


@pytest.fixture
def active(text_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The shared text dataset, made the active one; returns its directory."""
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(text_cache))
    return prepare.active_dataset_dir()


def split_tokens(dataset: Path, split: str) -> np.ndarray:
    manifest = prepare.load_manifest(dataset)
    return np.concatenate(
        [
            np.fromfile(dataset / s["file"], dtype=np.uint16)
            for s in manifest["splits"][split]["shards"]
        ]
    )


def split_text(dataset: Path, split: str) -> str:
    return prepare.load_tokenizer().decode(split_tokens(dataset, split).tolist())


# ------------------------------------------------------------------------------------------------
# presets and import
# ------------------------------------------------------------------------------------------------


def test_preset_defaults_follow_cuda() -> None:
    assert prepare.resolve_preset({}, cuda_available=True)[0] == "gpu"
    name, constants = prepare.resolve_preset({}, cuda_available=False)
    assert name == "cpu"
    assert constants == prepare.PRESETS["cpu"]
    gpu = prepare.resolve_preset({"AUTORESEARCH_PRESET": "GPU"}, cuda_available=False)[1]
    assert gpu == {
        "MAX_SEQ_LEN": 2048,
        "TIME_BUDGET": 300,
        "EVAL_TOKENS": 40 * 524288,
        "VOCAB_SIZE": 8192,
    }
    assert prepare.PRESETS["cpu"]["VOCAB_SIZE"] == gpu["VOCAB_SIZE"]


def test_unknown_preset_is_a_clear_error() -> None:
    with pytest.raises(PrepareError, match="unknown preset 'tpu'.*cpu, gpu"):
        prepare.resolve_preset({"AUTORESEARCH_PRESET": "tpu"}, cuda_available=False)


@pytest.mark.parametrize(("value", "expected"), [("7", 7), ("0.5", 0.5), (" 12 ", 12)])
def test_time_budget_override(value: str, expected: float) -> None:
    env = {"AUTORESEARCH_PRESET": "gpu", "AUTORESEARCH_TIME_BUDGET": value}
    assert prepare.resolve_preset(env, cuda_available=False)[1]["TIME_BUDGET"] == expected


@pytest.mark.parametrize("value", ["abc", "0", "-3", "nan", "inf"])
def test_bad_time_budget_is_rejected(value: str) -> None:
    with pytest.raises(PrepareError, match="AUTORESEARCH_TIME_BUDGET"):
        prepare.resolve_preset({"AUTORESEARCH_TIME_BUDGET": value}, cuda_available=False)


def _python(code: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
    full_env.update(env, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-B", "-c", code],
        cwd=tmp_path,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_import_is_side_effect_free_and_sets_constants(tmp_path: Path) -> None:
    cache = tmp_path / "never-created"
    code = (
        "import prepare as p; print(p.PRESET, p.MAX_SEQ_LEN, p.TIME_BUDGET, p.EVAL_TOKENS, "
        "p.VOCAB_SIZE); p.print_config()"
    )
    result = _python(
        code,
        tmp_path,
        AUTORESEARCH_CACHE=str(cache),
        AUTORESEARCH_PRESET="cpu",
        AUTORESEARCH_TIME_BUDGET="5",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "cpu 256 5 65536 8192"
    assert "TIME_BUDGET: 5 s of training  (from AUTORESEARCH_TIME_BUDGET)" in lines
    assert "dataset: (none: run `autoresearch prepare`)" in lines
    assert f"cache: {cache}" in lines
    assert not cache.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []

    bad = _python("import prepare", tmp_path, AUTORESEARCH_PRESET="tpu")
    assert bad.returncode != 0
    assert "PrepareError: unknown preset 'tpu'" in bad.stderr


def test_print_config_names_dataset_and_cache(
    active: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prepare.print_config()
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"preset: {prepare.PRESET}"
    assert f"MAX_SEQ_LEN: {prepare.MAX_SEQ_LEN} tokens" in out
    assert f"VOCAB_SIZE: {prepare.VOCAB_SIZE} tokens" in out
    assert f"EVAL_TOKENS: {prepare.EVAL_TOKENS} tokens" in out
    assert f"dataset: {active.name}" in out
    assert f"cache: {active.parent}" in out


# ------------------------------------------------------------------------------------------------
# tokenizer
# ------------------------------------------------------------------------------------------------


def test_tokenizer_round_trip(active: Path) -> None:
    tok = prepare.load_tokenizer()
    assert tok.vocab_size <= prepare.VOCAB_SIZE
    assert tok.bos_id == tok.vocab_size - 1
    for text in ["hello world", "héllo wörld — ñ", "数据 🎉 emoji\n\ttabs  ", "", "<|bos|>"]:
        ids = tok.encode(text)
        assert tok.bos_id not in ids  # BOS never comes from text
        assert tok.decode(ids) == text
        assert all(0 <= i < tok.vocab_size for i in ids)
    ids = tok.encode("ka lo", bos=True)
    assert ids[0] == tok.bos_id
    assert tok.decode(ids) == "<|bos|>ka lo"
    assert tok.encode_batch(["a b", "ü"], bos=True) == [
        tok.encode("a b", bos=True),
        tok.encode("ü", bos=True),
    ]


def test_token_bytes_counts_utf8_bytes(active: Path) -> None:
    tok = prepare.load_tokenizer()
    table = prepare.load_token_bytes()
    assert table.dtype == torch.int64 and table.shape == (tok.vocab_size,)
    assert table[tok.bos_id] == 0
    assert (table[: tok.bos_id] > 0).all()
    text = "kalo the ünïcode 数据 🎉"
    assert int(table[tok.encode(text, bos=True)].sum()) == len(text.encode("utf-8"))


def test_trained_tokenizer_uses_gpt4_split_and_full_vocab_on_enough_text() -> None:
    texts = [paragraphs(seed, 30) for seed in range(40)]
    tok = tokenizer.train_tokenizer(prepare, texts, vocab_size=300)
    assert tok.vocab_size == 300 and tok.bos_id == 299
    assert tok.encoding._pat_str == prepare.SPLIT_PATTERN
    assert tok.decode(tok.encode(texts[0])) == texts[0]


# ------------------------------------------------------------------------------------------------
# the metric
# ------------------------------------------------------------------------------------------------


class UniformModel(torch.nn.Module):
    """Returns all-zero logits and records what it was called with."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls: list[torch.Tensor] = []
        self.modes: list[tuple[bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.clone())
        self.modes.append((self.training, torch.is_grad_enabled()))
        return torch.zeros(*x.shape, self.vocab)


def test_bpb_of_uniform_logits_is_log2_vocab_per_byte(
    active: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seq_len = 64
    monkeypatch.setattr(prepare, "MAX_SEQ_LEN", seq_len)
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 5 * seq_len)
    val = split_tokens(active, "val").astype(np.int64)
    assert len(val) > 5 * seq_len + 1
    bos = prepare.load_manifest(active)["bos_id"]
    table = prepare.load_token_bytes().numpy()
    targets = val[1 : 5 * seq_len + 1]
    scored = targets[targets != bos]
    expected = math.log2(prepare.VOCAB_SIZE) * len(scored) / table[targets].sum()

    model = UniformModel(prepare.VOCAB_SIZE)
    model.train()
    bpb = prepare.evaluate_bpb(model, batch_size=2)
    assert bpb == pytest.approx(expected, rel=1e-6)
    # the model saw only inputs: contiguous rows of the val stream, in eval mode, without grad
    seen = torch.cat(model.calls).numpy()
    assert seen.shape == (5, seq_len)
    assert np.array_equal(seen.reshape(-1), val[: 5 * seq_len])
    assert [len(c) for c in model.calls] == [2, 2, 1]
    assert set(model.modes) == {(False, False)}
    assert model.training  # restored

    model.eval()
    assert prepare.evaluate_bpb(model, 4, split="val") == pytest.approx(bpb, rel=1e-9)
    assert not model.training
    test_bpb = prepare.evaluate_bpb(model, 4, split="test")
    assert math.isfinite(test_bpb) and test_bpb != bpb


def test_bpb_scores_all_tokens_when_split_is_short(
    active: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seq_len = 32
    monkeypatch.setattr(prepare, "MAX_SEQ_LEN", seq_len)
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 10**9)
    val = split_tokens(active, "val")
    model = UniformModel(prepare.VOCAB_SIZE)
    prepare.evaluate_bpb(model, batch_size=64)
    rows = (len(val) - 1) // seq_len
    assert sum(len(c) for c in model.calls) == rows
    assert "scoring all of them" in capsys.readouterr().out


def test_bpb_rejects_logits_of_the_wrong_shape(
    active: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prepare, "MAX_SEQ_LEN", 16)
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 32)

    class Flat(UniformModel):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.zeros(x.numel(), self.vocab)

    model = Flat(prepare.VOCAB_SIZE)
    with pytest.raises(PrepareError, match="logits of shape"):
        prepare.evaluate_bpb(model, 2)
    assert model.training


# ------------------------------------------------------------------------------------------------
# the loader
# ------------------------------------------------------------------------------------------------


def valid_rows(dataset: Path, split: str, seq_len: int) -> list[tuple[int, ...]]:
    """Every row the loader may produce: seq_len + 1 tokens from each usable document start."""
    manifest = prepare.load_manifest(dataset)
    rows = []
    for shard in manifest["splits"][split]["shards"]:
        tokens = np.fromfile(dataset / shard["file"], dtype=np.uint16)
        for s in np.load(dataset / shard["starts"]):
            if s + seq_len + 1 <= len(tokens):
                rows.append(tuple(tokens[s : s + seq_len + 1].tolist()))
    return rows


def test_loader_rows_start_at_documents_and_are_packed(active: Path) -> None:
    bos = prepare.load_manifest(active)["bos_id"]
    allowed = set(valid_rows(active, "train", 48))
    loader = prepare.make_dataloader(4, 48, seed=3)
    for _ in range(5):
        x, y, epoch = next(loader)
        assert x.dtype == y.dtype == torch.int64
        assert x.shape == y.shape == (4, 48)
        assert x.is_contiguous() and y.is_contiguous()
        assert (x[:, 0] == bos).all()
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
            assert (*row_x, row_y[-1]) in allowed  # a real, unpadded stretch of the stream
        assert epoch >= 1
    assert (x == bos).sum() >= 4  # rows run on into following documents


def test_loader_is_deterministic_per_seed(active: Path) -> None:
    def first(seed: int, n: int = 4) -> list[torch.Tensor]:
        loader = prepare.make_dataloader(3, 32, seed=seed)
        return [next(loader)[0] for _ in range(n)]

    a, b, c = first(0), first(0), first(1)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a, c, strict=True))


def test_loader_epoch_is_one_pass_over_a_permutation_of_starts(active: Path) -> None:
    seq_len, batch = 32, 5
    rows = valid_rows(active, "train", seq_len)
    n = len(rows)
    assert n > 2 * batch and n % batch != 0
    loader = prepare.make_dataloader(batch, seq_len, seed=7)
    seen, epochs = [], []
    for i in range(-(-2 * n // batch)):
        x, y, epoch = next(loader)
        epochs.append(epoch)
        assert epoch == 1 + (i * batch) // n  # the epoch of the batch's first row
        seen += [(*rx, ry[-1]) for rx, ry in zip(x.tolist(), y.tolist(), strict=True)]
    assert Counter(seen[:n]) == Counter(rows)
    assert Counter(seen[n : 2 * n]) == Counter(rows)
    assert seen[:n] != seen[n : 2 * n]  # each epoch is a new permutation
    assert epochs[0] == 1 and epochs[-1] == 2


def test_prefetching_loader_gives_the_same_batches(active: Path) -> None:
    plain = prepare.make_dataloader(4, 40, seed=5, prefetch=0)
    ahead = prepare.make_dataloader(4, 40, seed=5, prefetch=3)
    for _ in range(6):
        (x1, y1, e1), (x2, y2, e2) = next(plain), next(ahead)
        assert torch.equal(x1, x2) and torch.equal(y1, y2) and e1 == e2
    ahead.close()


def test_loader_other_splits_and_errors(active: Path) -> None:
    x, _, _ = next(prepare.make_dataloader(2, 16, split="val"))
    assert x.shape == (2, 16)
    with pytest.raises(PrepareError, match="unknown split 'dev'"):
        prepare.make_dataloader(2, 16, split="dev")
    with pytest.raises(PrepareError, match="shorter seq_len"):
        prepare.make_dataloader(2, 10**7)


# ------------------------------------------------------------------------------------------------
# files: and stdlib sources
# ------------------------------------------------------------------------------------------------


def test_files_source_reads_every_kind_and_splits_by_file(tmp_path: Path, isolated: Path) -> None:
    markers = write_mixed_corpus(tmp_path / "src")
    dataset = prepare.run_prepare(f"files:{tmp_path / 'src'}", log=quiet)
    assert dataset.parent == isolated and dataset.name.startswith("files-")
    assert (isolated / "ACTIVE").read_text().strip() == dataset.name
    manifest = prepare.load_manifest()
    assert manifest["split_by"] == "file"
    assert manifest["files"] == {"train": 8, "val": 1, "test": 1}
    texts = {split: split_text(dataset, split) for split in ("train", "val", "test")}
    for rel, marker in markers.items():
        found = [split for split, text in texts.items() if marker in text]
        assert len(found) == 1, (rel, found)  # every file lands whole in exactly one split
    everything = "".join(texts.values())
    assert "ZQIGNORED" not in everything
    assert "# Title" in everything and "def f():" in everything and "para\u2028graph" in everything
    for split in ("train", "val", "test"):
        info = manifest["splits"][split]
        assert info["tokens"] == len(split_tokens(dataset, split))
        assert info["docs"] == texts[split].count("<|bos|>")
    assert manifest["splits"]["val"]["sha256"] == prepare._sha256(dataset / "val.bin")


def test_file_split_is_deterministic(tmp_path: Path) -> None:
    keys = [f"pkg{i}/mod{j}.py" for i in range(10) for j in range(10)]
    split = files.split_by_hash(keys, 0.05, 0.05)
    assert split == files.split_by_hash(reversed(keys), 0.05, 0.05)
    assert Counter(split.values()) == {"train": 90, "val": 5, "test": 5}
    assert Counter(files.split_by_hash(keys[:3], 0.05, 0.05).values()) == {
        "train": 1,
        "val": 1,
        "test": 1,
    }
    # two builds of the same files give byte-identical token files
    corpus = tmp_path / "corpus"
    write_text_corpus(corpus, 8)
    first = prepare.run_prepare(f"files:{corpus}", cache_dir=tmp_path / "c1", log=quiet)
    second = prepare.run_prepare(f"files:{corpus}", cache_dir=tmp_path / "c2", log=quiet)
    for name in ("val.bin", "test.bin", "train_00000.bin", "tokenizer.pkl"):
        assert (first / name).read_bytes() == (second / name).read_bytes()


def test_include_and_val_include_globs(tmp_path: Path) -> None:
    src = tmp_path / "src"
    markers = write_mixed_corpus(src)
    only_sub = prepare.run_prepare(f"files:{src}", include=["sub/**"], doc_chars=200, log=quiet)
    everything = "".join(split_text(only_sub, s) for s in ("train", "val", "test"))
    for rel, marker in markers.items():
        assert (marker in everything) == rel.startswith("sub/"), rel

    same = prepare.run_prepare(f"files:{src}", include="sub/**", doc_chars=200, log=quiet)
    assert same == only_sub  # a single glob may be a plain string

    pinned = prepare.run_prepare(f"files:{src}", val_include=["sub/**"], log=quiet)
    assert pinned != only_sub  # the globs are part of the dataset name
    val, rest = split_text(pinned, "val"), split_text(pinned, "train") + split_text(pinned, "test")
    for rel, marker in markers.items():
        assert (marker in val) == rel.startswith("sub/"), rel
        assert (marker in rest) != rel.startswith("sub/"), rel
    assert prepare.load_manifest(pinned)["files"] == {"train": 7, "val": 2, "test": 1}
    with pytest.raises(PrepareError, match="match --val-include nothing/\\*\\*"):
        prepare.run_prepare(f"files:{src}", val_include=["nothing/**"], log=quiet)


def test_long_files_are_cut_at_paragraphs_and_pieces_stay_in_order(tmp_path: Path) -> None:
    text = paragraphs(1, 60)
    pieces = files.cut_document(text, 500)
    assert "".join(pieces) == text
    assert all(len(p) <= 500 for p in pieces)
    assert all(p.endswith("\n\n") for p in pieces[:-1])
    assert files.cut_document("x" * 1000, 300) == ["x" * 300] * 3 + ["x" * 100]
    assert files.cut_document("line\n" * 100, 103)[0] == "line\n" * 20

    corpus = tmp_path / "corpus"
    write_text_corpus(corpus, 6, paragraphs_each=40)
    dataset = prepare.run_prepare(f"files:{corpus}", doc_chars=400, log=quiet)
    manifest = prepare.load_manifest(dataset)
    assert manifest["splits"]["train"]["docs"] > 4 * manifest["documents"]["train"]
    # a document's pieces follow each other: removing the BOS between them gives back the file
    train = split_text(dataset, "train").replace("<|bos|>", "")
    for path in corpus.rglob("*.txt"):
        content = path.read_text()
        if content.split("\n")[0] in train:
            assert content.rstrip("\n") in train


def test_single_file_is_split_by_document_piece(tmp_path: Path) -> None:
    book = tmp_path / "book.txt"
    book.write_text(paragraphs(3, 200))
    dataset = prepare.run_prepare(f"files:{book}", doc_chars=300, log=quiet)
    manifest = prepare.load_manifest(dataset)
    assert manifest["split_by"] == "document piece"
    docs = {s: manifest["splits"][s]["docs"] for s in ("train", "val", "test")}
    assert docs["val"] >= 1 and docs["test"] >= 1 and docs["train"] > 10 * docs["val"]


def test_max_train_bytes_caps_the_train_split(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus = tmp_path / "corpus"
    write_text_corpus(corpus, 30)
    full = prepare.run_prepare(f"files:{corpus}", cache_dir=tmp_path / "a", log=quiet)
    capped = prepare.run_prepare(
        f"files:{corpus}", cache_dir=tmp_path / "b", max_train_bytes=10_000, log=quiet
    )
    m_full, m_capped = prepare.load_manifest(full), prepare.load_manifest(capped)
    assert 0 < m_capped["train_text_bytes"] <= 10_000
    assert m_capped["train_files_left_out"] > 0
    assert m_capped["splits"]["train"]["tokens"] < m_full["splits"]["train"]["tokens"] / 2
    val_texts = []
    for dataset in (full, capped):
        monkeypatch.setenv("AUTORESEARCH_CACHE", str(dataset.parent))
        val_texts.append(split_text(dataset, "val"))
    assert val_texts[0] == val_texts[1]  # the cap takes nothing from val


def test_non_utf8_files_are_skipped_and_recorded(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    write_text_corpus(corpus, 5)
    for name in ("latin1.txt", "cp1252.md", "koi8.py"):
        (corpus / name).write_bytes("caf\xe9 ".encode("latin-1") * 50)
    messages: list[str] = []
    dataset = prepare.run_prepare(f"files:{corpus}", log=messages.append)
    manifest = prepare.load_manifest(dataset)
    assert sorted(manifest["skipped_files"]) == ["cp1252.md", "koi8.py", "latin1.txt"]
    assert manifest["files"] == {"train": 3, "val": 1, "test": 1}  # held-out files are readable
    assert any("not UTF-8" in m for m in messages)


def test_stdlib_source_on_a_capped_size() -> None:
    messages: list[str] = []
    dataset = prepare.run_prepare(
        "stdlib", max_train_bytes=150_000, tokenizer_chars=150_000, log=messages.append
    )
    manifest = prepare.load_manifest(dataset)
    assert dataset.name == "stdlib"
    assert manifest["args"]["python"] == sys.version.split()[0]
    assert manifest["split_by"] == "file" and manifest["files"]["val"] > 10
    assert 0 < manifest["train_text_bytes"] <= 150_000
    assert "def " in split_text(dataset, "val")
    assert any(m.startswith("prepared stdlib") for m in messages)


# ------------------------------------------------------------------------------------------------
# download sources through a local HTTP server
# ------------------------------------------------------------------------------------------------


def climbmix_files(docs_per_shard: int = 30) -> dict[str, bytes]:
    shards = [0, 1, 2, 6541, 6542]
    return {
        f"shard_{i:05d}.parquet": parquet_bytes(
            [f"S{i} " + paragraphs(i * 1000 + d, 3) for d in range(docs_per_shard)]
        )
        for i in shards
    }


def test_climbmix_downloads_in_parallel_and_retries(isolated: Path) -> None:
    files = climbmix_files()
    with FakeHub(files) as hub:
        hub.fail["shard_00000.parquet"] = [503, 500]
        hub.fail["shard_06542.parquet"] = [429]
        dataset = prepare.run_prepare(
            "climbmix", num_shards=2, base_url=hub.url, workers=3, log=quiet
        )
    assert dataset == isolated / "climbmix"
    downloads = isolated / "downloads" / "climbmix"
    names = ["shard_00000.parquet", "shard_00001.parquet", "shard_06541.parquet"]
    for name in [*names, "shard_06542.parquet"]:
        assert (downloads / name).read_bytes() == files[name]
    assert not list(downloads.glob("*.part"))
    assert len(hub.requests_for("shard_00000.parquet")) == 3
    assert hub.requests_for("shard_00002.parquet") == []
    manifest = prepare.load_manifest()
    assert {s: manifest["splits"][s]["docs"] for s in ("train", "val", "test")} == {
        "train": 60,
        "val": 30,
        "test": 30,
    }
    assert split_text(dataset, "val").count("S6542 ") == 30
    assert split_text(dataset, "test").count("S6541 ") == 30
    assert manifest["args"]["num_shards"] == 2
    assert manifest["base_url"] == hub.url


def test_partial_download_is_resumed_with_a_range_request(isolated: Path) -> None:
    files = climbmix_files()
    downloads = isolated / "downloads" / "climbmix"
    downloads.mkdir(parents=True)
    data = files["shard_00000.parquet"]
    (downloads / "shard_00000.parquet.part").write_bytes(data[:100])
    with FakeHub(files) as hub:
        prepare.run_prepare("climbmix", num_shards=1, base_url=hub.url, log=quiet)
    assert hub.requests_for("shard_00000.parquet") == ["bytes=100-"]
    assert (downloads / "shard_00000.parquet").read_bytes() == data


def test_partial_download_restarts_when_server_ignores_ranges(isolated: Path) -> None:
    files = climbmix_files()
    downloads = isolated / "downloads" / "climbmix"
    downloads.mkdir(parents=True)
    (downloads / "shard_00000.parquet.part").write_bytes(b"garbage from an older attempt")
    with FakeHub(files, ranges=False) as hub:
        prepare.run_prepare("climbmix", num_shards=1, base_url=hub.url, log=quiet)
    assert (downloads / "shard_00000.parquet").read_bytes() == files["shard_00000.parquet"]


def test_broken_transfer_is_retried_and_resumed(isolated: Path) -> None:
    files = climbmix_files()
    with FakeHub(files) as hub:
        hub.truncate["shard_00000.parquet"] = 2
        prepare.run_prepare("climbmix", num_shards=1, base_url=hub.url, log=quiet)
    got = hub.requests_for("shard_00000.parquet")
    assert got[0] is None and len(got) == 3 and got[1] is not None and got[1].startswith("bytes=")
    final = isolated / "downloads" / "climbmix" / "shard_00000.parquet"
    assert final.read_bytes() == files["shard_00000.parquet"]


def test_persistent_server_errors_give_up_cleanly(isolated: Path) -> None:
    with FakeHub(climbmix_files()) as hub:
        hub.fail["shard_06541.parquet"] = [503] * 10
        with pytest.raises(PrepareError, match="after 5 attempts: HTTP 503"):
            prepare.run_prepare("climbmix", num_shards=1, base_url=hub.url, log=quiet)
        with pytest.raises(PrepareError, match="HTTP 404"):
            prepare.run_prepare("climbmix", num_shards=4, base_url=hub.url, log=quiet)
    assert not (isolated / "climbmix").exists()
    assert not (isolated / "ACTIVE").exists()
    assert not list(isolated.glob(".tmp-*"))


def test_unreachable_network_is_a_clean_error(isolated: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}/data"
    with pytest.raises(PrepareError) as info:
        prepare.run_prepare("tinystories", base_url=url, log=quiet)
    message = str(info.value)
    assert message.startswith(f"cannot reach 127.0.0.1:{url.split(':')[2].split('/')[0]}: ")
    assert "check your connection or use --source stdlib / files:PATH" in message
    assert not (isolated / "tinystories").exists()


def test_tinystories_is_split_by_row(isolated: Path) -> None:
    rows = [f"R{i} Once upon a time." for i in range(20_040)]
    rows[15_000] = None  # a null row is skipped
    files = {"tinystories_gpt4_clean.parquet": parquet_bytes(rows)}
    with FakeHub(files) as hub:
        dataset = prepare.run_prepare("tinystories", base_url=hub.url, log=quiet)
    manifest = prepare.load_manifest()
    assert dataset.name == "tinystories"
    assert "num_shards" not in manifest["args"]
    assert {s: manifest["splits"][s]["docs"] for s in ("train", "val", "test")} == {
        "train": 40,
        "val": 9_999,
        "test": 10_000,
    }
    train = split_text(dataset, "train")
    assert train.startswith("<|bos|>R20000 Once") and "R19999 " not in train


# ------------------------------------------------------------------------------------------------
# idempotency, bad input, nothing half-written
# ------------------------------------------------------------------------------------------------


def test_rerun_with_same_arguments_does_nothing(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    write_text_corpus(corpus, 6)
    dataset = prepare.run_prepare(f"files:{corpus}", log=quiet)
    before = prepare.load_manifest(dataset)["created"], (dataset / "val.bin").stat().st_mtime_ns
    messages: list[str] = []
    assert prepare.run_prepare(f"files:{corpus}", log=messages.append) == dataset
    assert messages == [f"{dataset.name} already prepared in {dataset}"]
    after = prepare.load_manifest(dataset)["created"], (dataset / "val.bin").stat().st_mtime_ns
    assert after == before

    time.sleep(1.1)  # `created` has one-second resolution
    rebuilt = prepare.run_prepare(f"files:{corpus}", doc_chars=600, log=messages.append)
    assert rebuilt == dataset
    manifest = prepare.load_manifest(dataset)
    assert manifest["args"]["doc_chars"] == 600 and manifest["created"] != before[0]
    assert not list(dataset.parent.glob(".tmp-*")) and not list(dataset.parent.glob(".old-*"))


def test_rerun_downloads_only_missing_shards(isolated: Path) -> None:
    with FakeHub(climbmix_files()) as hub:
        prepare.run_prepare("climbmix", num_shards=1, base_url=hub.url, log=quiet)
        count = len(hub.requests)
        prepare.run_prepare("climbmix", num_shards=1, base_url=hub.url, log=quiet)
        assert len(hub.requests) == count
        prepare.run_prepare("climbmix", num_shards=2, base_url=hub.url, log=quiet)
        assert [n for n, _ in hub.requests[count:]] == ["shard_00001.parquet"]
    assert prepare.load_manifest()["splits"]["train"]["docs"] == 60


def test_unknown_source_and_bad_arguments(isolated: Path) -> None:
    with pytest.raises(PrepareError, match="unknown source 'wikipedia'"):
        prepare.run_prepare("wikipedia", log=quiet)
    with pytest.raises(PrepareError, match="num-shards must be 1..6541"):
        prepare.run_prepare("climbmix", num_shards=6542, log=quiet)
    with pytest.raises(PrepareError, match="does not exist"):
        prepare.run_prepare(f"files:{isolated / 'nope'}", log=quiet)
    assert not isolated.exists()


def test_failed_prepare_leaves_the_previous_dataset_intact(tmp_path: Path, isolated: Path) -> None:
    corpus = tmp_path / "corpus"
    write_text_corpus(corpus, 6)
    good = prepare.run_prepare(f"files:{corpus}", log=quiet)
    manifest = (good / "manifest.json").read_bytes()

    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "data.csv").write_text("a,b\n")
    with pytest.raises(PrepareError, match="no .txt/.md/.py/.jsonl/.parquet files"):
        prepare.run_prepare(f"files:{empty}", log=quiet)
    (corpus / "broken.txt.gz").write_bytes(b"not gzip at all")
    with pytest.raises(PrepareError, match="cannot read .*broken.txt.gz"):
        prepare.run_prepare(f"files:{corpus}", force=True, log=quiet)
    bad_jsonl = tmp_path / "jsonl"
    write_text_corpus(bad_jsonl, 3)
    (bad_jsonl / "x.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(PrepareError, match="x.jsonl:2 has no string `text` field"):
        prepare.run_prepare(f"files:{bad_jsonl}", log=quiet)

    assert (isolated / "ACTIVE").read_text().strip() == good.name
    assert (good / "manifest.json").read_bytes() == manifest
    prepare.verify_dataset()
    next(prepare.make_dataloader(2, 16))
    assert prepare.load_tokenizer().decode(prepare.load_tokenizer().encode("kalo")) == "kalo"
    assert sorted(p.name for p in isolated.iterdir()) == ["ACTIVE", good.name]


def test_missing_data_says_to_run_prepare(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hint = "run `autoresearch prepare` first"
    with pytest.raises(PrepareError, match=f"no prepared data in {isolated}: {hint}"):
        prepare.load_tokenizer()
    with pytest.raises(PrepareError, match=hint):
        prepare.make_dataloader(2, 16)
    with pytest.raises(PrepareError, match=hint):
        prepare.evaluate_bpb(UniformModel(8), 2)
    isolated.mkdir()
    (isolated / "ACTIVE").write_text("gone\n")
    with pytest.raises(PrepareError, match=f"no prepared data in {isolated / 'gone'}"):
        prepare.load_token_bytes()
    monkeypatch.setenv("AUTORESEARCH_DATASET", "../elsewhere")
    with pytest.raises(PrepareError, match="bad dataset name"):
        prepare.active_dataset_dir()


def test_dataset_env_overrides_active(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    write_text_corpus(one, 4)
    write_text_corpus(two, 5)
    first = prepare.run_prepare(f"files:{one}", log=quiet)
    second = prepare.run_prepare(f"files:{two}", log=quiet)
    assert prepare.active_dataset_dir() == second
    monkeypatch.setenv("AUTORESEARCH_DATASET", first.name)
    assert prepare.active_dataset_dir() == first
    assert prepare.load_manifest()["args"]["root"] == str(one.resolve())


def test_tampered_files_are_detected(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    write_text_corpus(corpus, 4)
    dataset = prepare.run_prepare(f"files:{corpus}", log=quiet)
    data = bytearray((dataset / "val.bin").read_bytes())
    data[10] ^= 1
    (dataset / "val.bin").write_bytes(bytes(data))
    with pytest.raises(PrepareError, match="val.bin does not match its manifest"):
        prepare.verify_dataset()
    messages: list[str] = []
    prepare.run_prepare(f"files:{corpus}", log=messages.append)  # not complete: rebuilt
    assert not any("already prepared" in m for m in messages)
    prepare.verify_dataset()


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------


def test_main_prepares_and_reports_errors(
    tmp_path: Path, isolated: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = tmp_path / "corpus"
    write_text_corpus(corpus, 4)
    (corpus / "notes.md").write_text(paragraphs(99, 5))
    args = ["--source", f"files:{corpus}", "--include", "*.txt", "--cache-dir", str(isolated)]
    assert prepare.main(args) == 0
    manifest = prepare.load_manifest()
    assert manifest["args"]["include"] == ["*.txt"]
    assert sum(manifest["files"].values()) == 4
    assert prepare.main(["--source", "nope"]) == 1
    assert "error: unknown source 'nope'" in capsys.readouterr().err


def test_help_runs_standalone(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-B", str(ROOT / "prepare.py"), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0
    assert "--source" in result.stdout and "files:PATH" in result.stdout


def test_gzip_corrupt_parquet_is_unreadable(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    write_text_corpus(corpus, 3)
    (corpus / "bad.parquet").write_bytes(b"PAR1 not really")
    (corpus / "ok.txt.gz").write_bytes(gzip.compress(b"fine"))
    with pytest.raises(PrepareError, match="cannot read .*bad.parquet"):
        prepare.run_prepare(f"files:{corpus}", log=quiet)


def test_full_stdlib_prepare_from_the_command_line(stdlib_prepared: Path) -> None:
    """conftest's `python prepare.py --source stdlib` (once per test session): the full
    vocabulary and more than 2**16 validation tokens."""
    manifest = json.loads((stdlib_prepared / "stdlib" / "manifest.json").read_text())
    assert manifest["vocab_size"] == 8192
    assert manifest["splits"]["val"]["tokens"] > 2**16
