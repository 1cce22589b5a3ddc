"""Fingerprints of everything val_bpb depends on, and the check that none of it changed.

A session is only a fair comparison if every experiment is measured the same way. The metric
depends on the workspace's prepare.py (the metric, the loader and the preset constants live
there), on the prepared dataset's manifest, tokenizer, token byte lengths and validation tokens,
on the held-out test tokens (what `autoresearch confirm` measures), and on the preset the session
runs with. `take` hashes all of them (sha256 of the bytes; for the preset, of its name and time
budget, the rest of its constants being part of prepare.py); the loop records the result in
`runs/<tag>/session.json` at the start and calls `check` before and after every training run, so
a change made by a person, by a prepare, or by train.py while it trained stops the session with
a FingerprintError that says what changed and what to do.

At the start, `take` also checks the data against the sha256 the manifest recorded when it was
prepared, so a session never starts on a damaged dataset.

Not hashed: the train shards (gigabytes; they change what is learned, not how it is measured)
and the `.starts.npy` files (the metric does not read them). Cost: sha256 runs at about 1.7
GB/s here, so the cpu preset's stdlib data (~2 MB of val and test) costs a few milliseconds per
check, and a gpu dataset's ~100 MB val file about 0.06 s.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError
from .workspace import active_dataset  # noqa: F401 (callers import it from here too)

PREPARE_FILE = "prepare.py"
MANIFEST_FILE = "manifest.json"
HASHED_SPLITS = ("val", "test")  # the splits the metric and `confirm` read
DATA_PREFIX = "data/"  # fingerprint keys of dataset files: data/<file name in the dataset>
PRESET_KEY = "preset"


class FingerprintError(DataError):
    """prepare.py, the prepared data or the preset changed during a session."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_json(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _manifest(dataset: Path) -> dict:
    try:
        return json.loads((dataset / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(
            f"cannot read {dataset / MANIFEST_FILE} ({exc}): run `autoresearch prepare --force`"
        ) from exc


def hashed_files(manifest: dict) -> dict[str, str | None]:
    """{file name in the dataset: sha256 the manifest recorded, or None} for the hashed files."""
    try:
        files: dict[str, str | None] = {
            manifest["tokenizer"]["file"]: manifest["tokenizer"]["sha256"],
            manifest["token_bytes"]["file"]: manifest["token_bytes"]["sha256"],
        }
        for split in HASHED_SPLITS:
            shards = manifest["splits"][split]["shards"]
            for i, shard in enumerate(shards):
                files[shard["file"]] = manifest["splits"][split].get("sha256") if i == 0 else None
    except (KeyError, TypeError, IndexError) as exc:
        raise DataError(
            f"the dataset's manifest lacks {exc} (made by an older prepare.py?): "
            "run `autoresearch prepare --force`"
        ) from exc
    return files


@dataclass(frozen=True)
class Fingerprinter:
    """Hashes what the metric depends on for one workspace, dataset and preset."""

    root: Path  # the workspace (its prepare.py)
    dataset: Path  # the prepared dataset's directory
    preset: str
    time_budget: float  # seconds of training per run

    def take(self) -> dict[str, str]:
        """Fingerprints now, after checking the data against its manifest.

        Keys: `prepare.py`, `data/manifest.json`, `data/<file>` for the tokenizer, token_bytes
        and every val and test token file, and `preset`. Raises DataError when a file is
        missing or does not match the sha256 its manifest recorded.
        """
        prints = {PREPARE_FILE: sha256_file(self.root / PREPARE_FILE)}
        prints[DATA_PREFIX + MANIFEST_FILE] = sha256_file(self.dataset / MANIFEST_FILE)
        for name, recorded in hashed_files(_manifest(self.dataset)).items():
            path = self.dataset / name
            if not path.is_file():
                raise DataError(f"{path} is missing: run `autoresearch prepare --force`")
            digest = sha256_file(path)
            if recorded is not None and digest != recorded:
                raise DataError(
                    f"{path} does not match its manifest (damaged or modified): "
                    "run `autoresearch prepare --force`"
                )
            prints[DATA_PREFIX + name] = digest
        prints[PRESET_KEY] = self._preset_print()
        return prints

    def current(self, keys: Iterable[str]) -> dict[str, str | None]:
        """The fingerprints of `keys` as the files are now (None for a missing file)."""
        now: dict[str, str | None] = {}
        for key in keys:
            if key == PRESET_KEY:
                now[key] = self._preset_print()
                continue
            path = self.path_of(key)
            now[key] = sha256_file(path) if path.is_file() else None
        return now

    def check(self, recorded: Mapping[str, str], *, tag: str, when: str) -> None:
        """Raise FingerprintError when anything in `recorded` differs from the files now.

        `when` says at which point of the session the check ran; it goes into the message
        (e.g. "before experiment 0004 trained").
        """
        now = self.current(recorded)
        changed = [key for key in recorded if now.get(key) != recorded[key]]
        if changed:
            raise FingerprintError(self._message(changed, tag, when))

    def path_of(self, key: str) -> Path:
        if key == PREPARE_FILE:
            return self.root / PREPARE_FILE
        return self.dataset / key.removeprefix(DATA_PREFIX)

    def _preset_print(self) -> str:
        return sha256_json({"preset": self.preset, "TIME_BUDGET": float(self.time_budget)})

    def _message(self, changed: list[str], tag: str, when: str) -> str:
        names = ", ".join(k if k == PRESET_KEY else str(self.path_of(k)) for k in changed)
        advice = []
        if PREPARE_FILE in changed:
            advice.append(
                "restore prepare.py (`git diff prepare.py` shows the change; "
                "`git checkout -- prepare.py` undoes it)"
            )
        if any(k.startswith(DATA_PREFIX) for k in changed):
            advice.append(
                "rebuild the data with `autoresearch prepare --force` (same source and options)"
            )
        if PRESET_KEY in changed:
            advice.append(
                "use the same --preset and AUTORESEARCH_TIME_BUDGET as when the session started"
            )
        return (
            f"{names} changed since the session started (noticed {when}); val_bpb would no "
            f"longer be measured the same way, so the session stopped. To continue: "
            f"{'; '.join(advice)}; then `autoresearch run --resume --tag {tag}`. If the files "
            "cannot be restored exactly, start a new --tag."
        )
