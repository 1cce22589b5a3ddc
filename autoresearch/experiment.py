"""One experiment as the record holds it: `Experiment`, its declared further values `Extra`,
and the JSON line of experiments.jsonl that each is written as and read back from.

Guarantees: a record written by an earlier version loads (missing fields take their
defaults; an older `extra` key set reads with defaults where absent); keys a newer writer
added are kept and written back unchanged; a status or crash class this version knows reads
as its enum (status.py), which compares equal to its string. Not here: where records are
stored and how they survive a kill (ledger.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from .status import RECORDED, CrashClass, Status

STATUSES = tuple(s.value for s in RECORDED)  # the statuses a record may hold


@dataclass(eq=False)
class Extra(MutableMapping[str, Any]):
    """An experiment's further values (experiments.jsonl's `extra` object), each declared here.

    Read as attributes (`exp.extra.verdict`) or, as before, as a mapping
    (`exp.extra.get("verdict")`, `exp.extra["reason"] = ...`): a key counts as present only when the record holds it, so
    `"cost_usd" in exp.extra` still tells an unknown price (None recorded) from a record
    written before costs were (absent). Keys this version does not declare (a newer writer's)
    are kept in `other` and written back unchanged. An older record simply lacks some keys.
    A new value is one field here, with a default.
    """

    cost_usd: float | None = None  # USD of the agent's tokens; None: no known price
    log_tail: str | None = None  # a crashed or interrupted run's last log lines
    runs: list | None = None  # val_bpb of each run judged (the baseline's calibration runs)
    seeds: list | None = None  # the seed of each of those runs
    paired_gains: list | None = None  # best's val_bpb minus the candidate's, pair by pair
    incumbent_runs: int | list | None = None  # runs of the best compared with (older: a list)
    sigma: float | None = None  # run-to-run σ of val_bpb when it was judged
    paired_sigma: float | None = None  # σ of one paired gain, as the keep rule used it
    verdict: str | None = None  # the keep rule's label (status.Label); None: not judged
    gpu_busy_s: float | None = None  # the session's training seconds so far
    session_s: float | None = None  # the session's wall seconds so far
    slot: str | None = None  # a session of slots: the slot that trained it (record.session_extra)
    card: str | None = None  # its card: `3: NVIDIA H100 80GB HBM3` (--gpus); Ray: and the actor
    node: str | None = None  # --backend ray: the host name its last run trained on
    rebased: dict | None = None  # merged onto a newer best: the first measurement's commit,
    # parent and runs (then measured again before a keep)
    eval_wall_s: float | None = None  # sealed: wall seconds of the last run's evaluation
    reason: str | None = None  # why invalid, rejected, or discarded without a verdict, in words
    reported_val_bpb: float | None = None  # sealed: train.py's own printed val_bpb
    reported_disagrees: str | None = None  # sealed: how far that is from the measured one
    other: dict[str, Any] = field(default_factory=dict)
    present: frozenset[str] = field(default=frozenset(), repr=False)

    @classmethod
    def of(cls, values: Mapping[str, Any] | None) -> Extra:
        """From a record's mapping: declared keys to fields, the rest to `other`."""
        if isinstance(values, Extra):
            return values
        values = dict(values or {})
        declared = {k: values.pop(k) for k in list(values) if k in _EXTRA_FIELDS}
        return cls(**declared, other=values, present=frozenset(declared))

    def __post_init__(self) -> None:
        # Built with keywords (not `of`): a field given a value other than its default counts
        # as present.
        set_ = {f.name for f in fields(self) if f.name in _EXTRA_FIELDS and _is_set(self, f)}
        self.present = frozenset(self.present | set_)

    def to_dict(self) -> dict[str, Any]:
        """The record's `extra` object: the present keys, then the undeclared ones."""
        return {**{k: getattr(self, k) for k in _EXTRA_ORDER if k in self.present}, **self.other}

    def __getitem__(self, key: str) -> Any:
        if key in self.present:
            return getattr(self, key)
        return self.other[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if key in _EXTRA_FIELDS:
            setattr(self, key, value)
            self.present = self.present | {key}
        else:
            self.other[key] = value

    def __delitem__(self, key: str) -> None:
        if key in self.present:
            setattr(self, key, None)
            self.present = self.present - {key}
        else:
            del self.other[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.present) + len(self.other)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and self.to_dict() == dict(other.items())

    __hash__ = None  # type: ignore[assignment]


def _is_set(extra: Extra, f: Any) -> bool:
    default = f.default if f.default is not MISSING else f.default_factory()
    return getattr(extra, f.name) != default


_EXTRA_ORDER = tuple(f.name for f in fields(Extra) if f.name not in ("other", "present"))
_EXTRA_FIELDS = frozenset(_EXTRA_ORDER)


@dataclass
class Experiment:
    """One experiment, as recorded in experiments.jsonl."""

    id: int
    status: str  # a Status (a str enum: compares equal to its string)
    description: str
    commit: str | None  # full sha of the candidate commit (None if invalid before commit)
    parent: str  # full sha of the best commit it was based on
    val_bpb: float | None
    memory_gb: float
    best_before: float | None
    threshold: float
    crash_class: str | None = None  # a CrashClass when the run crashed
    exit_code: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # the whole summary block
    started_at: str = ""  # ISO 8601 UTC
    ended_at: str = ""
    train_seconds: float | None = None  # harness-measured wall time of the child
    agent: dict = field(
        default_factory=dict
    )  # name, model, attempts, tokens_in, tokens_out, seconds
    attempt_ref: str | None = None  # refs/autoresearch/<tag>/attempts/NNNN
    fix_of: int | None = None  # id of the crashed experiment this repairs
    extra: Extra = field(default_factory=Extra)  # further values, declared in Extra

    def __post_init__(self) -> None:
        # Records and older callers give plain strings and dicts; keep the declared types.
        if self.status in Status.__members__.values():
            self.status = Status(self.status)
        if self.crash_class in CrashClass.__members__.values():
            self.crash_class = CrashClass(self.crash_class)
        self.extra = Extra.of(self.extra)


_FIELDS = {f.name for f in fields(Experiment)}
_REQUIRED = ("id", "status", "description", "commit", "parent", "val_bpb", "memory_gb")


def _jsonable(value: Any) -> Any:
    """JSON has no NaN or infinity: non-finite floats are recorded as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _to_line(exp: Experiment) -> bytes:
    record = {**asdict(exp), "extra": exp.extra.to_dict()}
    return (json.dumps(_jsonable(record), allow_nan=False) + "\n").encode("ascii")


def _from_record(record: Any) -> Experiment:
    """An Experiment from a parsed jsonl object; unknown keys (a newer writer) go to `extra`."""
    if not isinstance(record, dict) or any(key not in record for key in _REQUIRED):
        raise ValueError("not an experiment record")
    if not isinstance(record["id"], int) or record["status"] not in STATUSES:
        raise ValueError("bad id or status")
    known = {k: v for k, v in record.items() if k in _FIELDS}
    for key in ("best_before", "threshold"):
        known.setdefault(key, None if key == "best_before" else 0.0)
    extra = dict(known.pop("extra", None) or {})
    for key, value in record.items():
        if key not in _FIELDS:
            extra.setdefault(key, value)
    return Experiment(**known, extra=Extra.of(extra))


def _parse_line(line: bytes) -> Experiment:
    return _from_record(json.loads(line))
