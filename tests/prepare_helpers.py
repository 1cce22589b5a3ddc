"""Fakes for testing prepare.py: a local parquet 'hub' over real HTTP and small text corpora.

Importing this module puts the repository root on sys.path so that `import prepare` (a
standalone top-level file, not part of the package) works from the tests.
"""

from __future__ import annotations

import gzip
import io
import json
import random
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

_SYLLABLES = "ka lo mi ne ru sa to vi ze pa qu the and of in on ly ing ed er".split()


def words(rng: random.Random, n: int) -> str:
    """`n` pseudo-words from a small syllable set: varied enough to train a small BPE."""
    return " ".join(
        "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(n)
    )


def paragraphs(seed: int, n: int, words_each: int = 40) -> str:
    """`n` paragraphs separated by blank lines, deterministic for `seed`."""
    rng = random.Random(seed)
    return "\n\n".join(words(rng, words_each) + "." for _ in range(n)) + "\n"


def parquet_bytes(texts: list[str | None], column: str = "text") -> bytes:
    """A parquet file (as bytes) with one string column."""
    sink = io.BytesIO()
    pq.write_table(pa.table({column: pa.array(texts, type=pa.string())}), sink)
    return sink.getvalue()


def write_text_corpus(root: Path, n_files: int, paragraphs_each: int = 12) -> list[Path]:
    """`n_files` .txt files under `root` (some in subdirectories), each with a unique marker."""
    paths = []
    for i in range(n_files):
        path = root / f"dir{i % 3}" / f"doc{i:03d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"MARKER{i:03d}\n\n" + paragraphs(i, paragraphs_each), encoding="utf-8")
        paths.append(path)
    return paths


def write_mixed_corpus(root: Path) -> dict[str, str]:
    """One file of every supported kind (and some that must be ignored); returns
    {relative path: marker} for the files that must be read."""
    markers: dict[str, str] = {}

    def marker(rel: str) -> str:
        markers[rel] = "ZQ" + "".join(c for c in rel if c.isalnum()).upper()
        return markers[rel]

    def text(rel: str, seed: int) -> str:
        return f"{marker(rel)} " + paragraphs(seed, 4)

    root.mkdir(parents=True, exist_ok=True)
    (root / "sub" / "deep").mkdir(parents=True)
    (root / "a.txt").write_text(text("a.txt", 1), encoding="utf-8")
    (root / "b.md").write_text("# Title\n\n" + text("b.md", 2), encoding="utf-8")
    (root / "c.py").write_text("def f():\n    return 1\n\n# " + text("c.py", 3), encoding="utf-8")
    # a raw U+2028 inside a JSON string is legal and must not split the record
    records = [{"text": text("d.jsonl", 4)}, {"text": "para\u2028graph " + paragraphs(5, 3)}]
    records.append({"text": ""})
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    (root / "d.jsonl").write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    (root / "e.parquet").write_bytes(parquet_bytes([text("e.parquet", 6), None, paragraphs(7, 2)]))
    (root / "f.txt.gz").write_bytes(gzip.compress(text("f.txt.gz", 8).encode()))
    g_records = [json.dumps({"text": text("g.jsonl.gz", 9)})]
    (root / "g.jsonl.gz").write_bytes(gzip.compress("\n".join(g_records).encode()))
    (root / "k.parquet.gz").write_bytes(gzip.compress(parquet_bytes([text("k.parquet.gz", 10)])))
    (root / "sub" / "h.py").write_text(text("sub/h.py", 11), encoding="utf-8")
    (root / "sub" / "deep" / "i.md").write_text(text("sub/deep/i.md", 12), encoding="utf-8")
    # ignored: unknown suffix, hidden directory, __pycache__
    (root / "skip.bin").write_text("ZQIGNOREDBIN " + paragraphs(13, 2))
    (root / ".hidden").mkdir()
    (root / ".hidden" / "j.txt").write_text("ZQIGNOREDHIDDEN " + paragraphs(14, 2))
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "x.py").write_text("ZQIGNOREDCACHE " + paragraphs(15, 2))
    return markers


class FakeHub:
    """Serves `files` over HTTP on 127.0.0.1 with injectable failures.

    fail[name]: statuses to answer (one per request) before serving the file.
    truncate[name]: how many responses send only half the body (then close the connection).
    ranges: whether Range requests are honored (else the whole file comes back with 200).
    requests: (name, Range header or None) for every request, in order.
    """

    def __init__(self, files: dict[str, bytes], *, ranges: bool = True) -> None:
        self.files = files
        self.ranges = ranges
        self.fail: dict[str, list[int]] = {}
        self.truncate: dict[str, int] = {}
        self.requests: list[tuple[str, str | None]] = []
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hub._serve(self)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/data"

    def requests_for(self, name: str) -> list[str | None]:
        return [r for n, r in self.requests if n == name]

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        name = h.path.removeprefix("/data/")
        range_header = h.headers.get("Range")
        with self._lock:
            self.requests.append((name, range_header))
            queued = self.fail.get(name)
            status = queued.pop(0) if queued else None
            cut = self.truncate.get(name, 0) > 0
            if cut:
                self.truncate[name] -= 1
        if status is not None:
            h.send_error(status)
            return
        data = self.files.get(name)
        if data is None:
            h.send_error(404)
            return
        start = 0
        if range_header and self.ranges:
            start = int(range_header.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                h.send_error(416)
                return
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            h.send_response(200)
        body = data[start:]
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body[: len(body) // 2] if cut else body)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
