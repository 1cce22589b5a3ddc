"""The record of a session: `runs/<tag>/`.

Files, and what is guaranteed about each:
- `experiments.jsonl`: the source of truth, one JSON object per experiment, appended with a
  single write and fsync'd before `append` returns. A kill -9 (or power loss) can leave at most
  a torn last line: readers ignore it, the next `append` moves it to `experiments.jsonl.torn`
  and truncates it away. A failed write (disk full) is cut back to the last complete line
  before the error is raised, so the file only ever holds whole records.
- `results.tsv`: upstream's five columns, derived from the jsonl and replaced atomically after
  every append (so a kill between the two writes is healed by the next append or by
  `rebuild_tsv`).
- `NNNN/`: one folder per experiment for its artifacts (patch.diff, run.log, prompt.json,
  reply.txt), each written atomically (temp file, fsync, rename).
- `state.json` (the loop's in-flight phase) and `session.json` (facts about the session):
  small JSON documents, replaced atomically.
Every file is created with the permissions the process's umask gives (0644 under umask 022),
since the record is read with other tools.

Writes that fail for lack of space or any other OS reason raise LedgerError; what was recorded
before stays intact. Not handled: two processes appending to the same run directory at once.
"""

from __future__ import annotations

import errno
import json
import math
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import AutoresearchError
from .experiment import (  # noqa: F401 - re-exported: the record's types were defined here
    STATUSES,
    Experiment,
    Extra,
    _from_record,
    _jsonable,
    _parse_line,
    _to_line,
)
from .status import FAILED, Status

TSV_HEADER = "commit\tval_bpb\tmemory_gb\tstatus\tdescription"
JSONL_FILE = "experiments.jsonl"
TORN_FILE = "experiments.jsonl.torn"  # torn last lines cut from the jsonl, kept for forensics
TSV_FILE = "results.tsv"
STATE_FILE = "state.json"
SESSION_FILE = "session.json"
FIRST_ID = 1  # the baseline's id
FILE_MODE = 0o666  # before the umask: 0644 under the usual umask 022
REJECTED_REASON_CHARS = 80  # of a rejection's reason appended to its results.tsv description


class LedgerError(AutoresearchError):
    """The record could not be written or read; the message says what to do next."""


def tsv_row(exp: Experiment) -> str:
    """The results.tsv row of an experiment (upstream's columns and formats).

    `rejected` (the sealed evaluator caught the model looking ahead or train.py tampering
    with the metric) is written as upstream's `crash`, with val_bpb 0.000000 and the reason
    after the description, so tools that know only keep/discard/crash read it as a failed
    run; experiments.jsonl keeps the status `rejected` and the full reason.
    """
    commit = exp.commit[:7] if exp.commit else "-"
    val = exp.val_bpb
    failed = exp.status in FAILED
    no_value = failed or val is None or not math.isfinite(val)
    memory = exp.memory_gb if math.isfinite(exp.memory_gb) else 0.0
    status, description = exp.status, exp.description
    if status == Status.rejected:
        reason = str(exp.extra.reason or "")
        status = Status.crash
        description += f" (rejected: {reason[:REJECTED_REASON_CHARS]})" if reason else " (rejected)"
    description = description.replace("\t", " ").replace("\r", " ").replace("\n", " ")
    return f"{commit}\t{0.0 if no_value else val:.6f}\t{memory:.1f}\t{status}\t{description}"


@dataclass(frozen=True)
class Grounds:
    """Why an experiment got its status, in the numbers the keep rule used, as recorded (the
    decision itself is the record's status; the rule's own is status.Decision).

    Every reader of the keep rule's numbers (`show`, the report, the live line) goes through
    `decision_of`, so a change to what the loop records is read in one place. A number the
    record does not hold is None.
    """

    gain: float | None  # the best's mean val_bpb minus the candidate's (positive = better)
    bar: float | None  # what the gain had to clear
    sigma: float | None  # spread of one commit's val_bpb over seeds when it was judged
    runs: int  # the candidate's runs
    incumbent_runs: int | None  # runs of the best it was compared with
    reason: str  # one line
    values: tuple[float, ...] = ()  # the candidate's val_bpb, run by run
    incumbent_values: tuple[float, ...] = ()  # the best's, when the record holds them


def decision_of(exp: Experiment) -> Grounds:
    """The keep rule's numbers for `exp`, read from the record (fields `val_bpb`,
    `best_before`, `threshold`, `extra.paired_sigma` or else `extra.sigma`, `extra.runs`,
    `extra.incumbent_runs`, `extra.reason`, `crash_class`), and a one-line reason."""
    extra = exp.extra
    runs = extra.runs
    n = len(runs) if isinstance(runs, list) else 0
    inc = extra.incumbent_runs
    m = len(inc) if isinstance(inc, list) else inc if isinstance(inc, int) else None
    # The σ the rule used: a paired gain's spread where the record has one (a judged
    # candidate), else the run-to-run σ of val_bpb (the baseline's calibration, older records).
    key = "paired_sigma" if "paired_sigma" in extra and exp.best_before is not None else "sigma"
    sigma = _number_or_none(extra.get(key))
    judged = exp.status in (Status.keep, Status.discard) and exp.best_before is not None
    bar = _number_or_none(exp.threshold) if judged else None  # no bar without a comparison
    gain = None
    if _number_or_none(exp.val_bpb) is not None and _number_or_none(exp.best_before) is not None:
        gain = exp.best_before - exp.val_bpb
    return Grounds(
        gain,
        bar,
        sigma,
        n,
        m,
        _reason(exp, gain, bar, sigma, n, m),
        values=_numbers(runs),
        incumbent_values=_numbers(inc),
    )


def _numbers(values: Any) -> tuple[float, ...]:
    if not isinstance(values, list):
        return ()
    return tuple(v for v in map(_number_or_none, values) if v is not None)


def _number_or_none(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _runs(n: int, m: int | None) -> str:
    against = f" against {m} of the best" if m else ""
    return f"{n} run{'s' * (n != 1)}{against}"


def _reason(
    exp: Experiment,
    gain: float | None,
    bar: float | None,
    sigma: float | None,
    n: int,
    m: int | None,
) -> str:
    noise = "σ not measured yet" if sigma is None else f"σ {sigma:.6f}"
    said = " ".join(str(exp.extra.reason or "").split())
    if exp.status == Status.keep and exp.best_before is None:
        return f"the baseline, the first best ({_runs(n, None)}, {noise})"
    if exp.status == Status.keep and gain is not None and bar is not None:
        return f"kept: gain {gain:.6f} cleared the bar {bar:.6f} ({_runs(n, m)}, {noise})"
    if exp.status == Status.discard and said:  # discarded for a reason of its own, e.g. a
        return f"discarded: {said}"  # stale base it no longer merges onto
    if exp.status == Status.discard and gain is not None and gain <= 0:
        return f"discarded: no gain (val_bpb {-gain:+.6f} against the best, {_runs(n, m)})"
    if exp.status == Status.discard and gain is not None and bar is not None:
        return (
            f"discarded: gain {gain:.6f} within noise, not above the bar {bar:.6f} "
            f"({_runs(n, m)}, {noise})"
        )
    if exp.status == Status.crash:
        return f"crashed ({exp.crash_class or 'unknown class'}): the run gave no val_bpb"
    if exp.status == Status.interrupted:
        return "interrupted by Ctrl-C twice: killed before it was judged"
    if exp.status in (Status.invalid, Status.rejected):
        return f"{exp.status}: {said}" if said else str(exp.status)
    return str(exp.status)


def measured_runs(run_dir: Path, exp: Experiment) -> list[dict]:
    """Every training run measured for `exp`, in order: dicts with `val_bpb`, `seed`,
    `purpose` (calibrate, candidate, repeat, remeasure) and, for a run paired with one of the
    best's, `partner_val_bpb`; from measurements.jsonl."""
    from .noise import Measurements

    rows = Measurements(Path(run_dir)).rows()
    runs = []
    for r in rows:
        if r.get("exp") != exp.id or (exp.commit is not None and r.get("commit") != exp.commit):
            continue
        partner = r.get("partner")  # the best's run of the same seed it was paired with
        if isinstance(partner, int) and 0 <= partner < len(rows):
            r = {**r, "partner_val_bpb": rows[partner].get("val_bpb")}
        runs.append(r)
    return runs


# ---------------------------------------------------------------------------------------------
# Durable file primitives (raise OSError; Ledger turns that into LedgerError)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable (not supported everywhere: then skip)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data`: readers see the old or the new file, never a part."""
    # Not mkstemp, which makes the file 0600: the record is read with other tools (pandas,
    # a browser, another user's shell), so it gets the permissions the user's umask gives.
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


class Ledger:
    """The record of one session in `run_dir` (runs/<tag>/). Nothing is written until asked."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.jsonl_path = self.run_dir / JSONL_FILE
        self.tsv_path = self.run_dir / TSV_FILE

    # ----------------------------------------------------------------------------- errors

    def _error(self, path: Path, error: OSError) -> LedgerError:
        resume = f"`autoresearch run --resume --tag {self.run_dir.name}`"
        if error.errno == errno.ENOSPC:
            return LedgerError(
                f"disk full while writing {path}: free some space, then continue with {resume}"
                " (everything recorded before this point is intact)"
            )
        return LedgerError(
            f"could not write {path}: {error.strerror or error}; fix that (permissions, disk),"
            f" then continue with {resume}"
        )

    # ----------------------------------------------------------------------------- reading

    def _read(self) -> tuple[list[Experiment], bytes, int]:
        """(experiments, bytes after the last newline, offset of those bytes)."""
        try:
            data = self.jsonl_path.read_bytes()
        except FileNotFoundError:
            return [], b"", 0
        except OSError as error:
            raise LedgerError(f"could not read {self.jsonl_path}: {error.strerror}") from error
        cut = data.rfind(b"\n") + 1
        experiments = []
        for number, line in enumerate(data[:cut].split(b"\n")[:-1], start=1):
            if not line.strip():
                continue
            try:
                experiments.append(_parse_line(line))
            except (ValueError, TypeError) as error:
                raise LedgerError(
                    f"{self.jsonl_path} line {number} is not a valid experiment record ({error}):"
                    " the file was damaged outside this tool; repair or remove that line"
                ) from error
        tail = data[cut:]
        complete = self._complete_tail(tail)
        if complete is not None:
            experiments.append(complete)
        return experiments, tail, cut

    @staticmethod
    def _complete_tail(tail: bytes) -> Experiment | None:
        """The last line when it is a whole record that only lacks its newline."""
        if not tail.strip(b" \t\r\0"):
            return None
        try:
            return _parse_line(tail)
        except (ValueError, TypeError):
            return None

    def experiments(self) -> list[Experiment]:
        """All recorded experiments in order; a torn last line is ignored."""
        return self._read()[0]

    def get(self, id: int) -> Experiment | None:
        return next((e for e in self.experiments() if e.id == id), None)

    def next_id(self) -> int:
        """The id for the next experiment: one more than the largest recorded (FIRST_ID if none)."""
        return max((e.id for e in self.experiments()), default=FIRST_ID - 1) + 1

    def best(self) -> Experiment | None:
        """The incumbent: the latest experiment with status keep."""
        return next((e for e in reversed(self.experiments()) if e.status == Status.keep), None)

    def baseline(self) -> Experiment | None:
        """The session's baseline (baseline_of)."""
        return baseline_of(self.experiments())

    # ----------------------------------------------------------------------------- writing

    def append(self, exp: Experiment) -> None:
        """Record `exp`: its jsonl line is written and fsync'd first, then results.tsv rebuilt.

        Raises ValueError for an unknown status or an id already recorded (a caller bug), and
        LedgerError when the disk refuses the write — the jsonl is then left as it was.
        """
        if exp.status not in STATUSES:
            raise ValueError(f"unknown status {exp.status!r}; expected one of {STATUSES}")
        line = _to_line(exp)
        experiments, tail, cut = self._read()
        if any(e.id == exp.id for e in experiments):
            raise ValueError(f"experiment {exp.id} is already recorded in {self.jsonl_path}")
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._append_line(line, tail, cut)
        except OSError as error:
            raise self._error(self.jsonl_path, error) from error
        self.rebuild_tsv()

    def _append_line(self, line: bytes, tail: bytes, cut: int) -> None:
        created = not self.jsonl_path.exists()
        fd = os.open(self.jsonl_path, os.O_RDWR | os.O_CREAT | os.O_APPEND, FILE_MODE)
        try:
            if tail:
                if self._complete_tail(tail) is not None:
                    _write_all(fd, b"\n")  # a whole record that only lacked its newline
                else:
                    self._set_aside_torn(tail)
                    os.ftruncate(fd, cut)
                os.fsync(fd)
            size = os.fstat(fd).st_size
            try:
                _write_all(fd, line)
                os.fsync(fd)
            except OSError:
                os.ftruncate(fd, size)  # never leave a partial line behind
                os.fsync(fd)
                raise
        finally:
            os.close(fd)
        if created:
            _fsync_dir(self.run_dir)

    def _set_aside_torn(self, tail: bytes) -> None:
        with open(self.run_dir / TORN_FILE, "ab") as torn:
            torn.write(tail + b"\n")
            torn.flush()
            os.fsync(torn.fileno())

    def rebuild_tsv(self) -> None:
        """Regenerate results.tsv from experiments.jsonl, atomically."""
        experiments = self.experiments()
        text = "\n".join([TSV_HEADER, *(tsv_row(e) for e in experiments)]) + "\n"
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            _atomic_write(self.tsv_path, text.encode("utf-8", errors="replace"))
        except OSError as error:
            raise self._error(self.tsv_path, error) from error

    def experiment_dir(self, id: int) -> Path:
        """`run_dir/NNNN/` (created if missing) for the artifacts of experiment `id`."""
        path = self.run_dir / f"{id:04d}"
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise self._error(path, error) from error
        return path

    def write_artifact(self, id: int, name: str, text: str | bytes) -> Path:
        """Write `NNNN/name` atomically (text as UTF-8); returns its path."""
        if not name or name in (".", "..") or "/" in name or os.sep in name:
            raise ValueError(f"artifact name must be a plain file name, got {name!r}")
        path = self.experiment_dir(id) / name
        data = text if isinstance(text, bytes) else text.encode("utf-8", errors="replace")
        self._write_file(path, data)
        return path

    def _write_file(self, path: Path, data: bytes) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(path, data)
        except OSError as error:
            raise self._error(path, error) from error

    # ----------------------------------------------------------------------------- state

    def _read_json(self, path: Path) -> dict | None:
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            raise LedgerError(
                f"could not read {path} ({error}): move it away to continue without it"
            ) from error
        if not isinstance(value, dict):
            raise LedgerError(f"{path} does not hold a JSON object: move it away to continue")
        return value

    def write_state(self, state: dict | None) -> None:
        """Replace state.json atomically with `state`; None removes it (nothing in flight)."""
        path = self.run_dir / STATE_FILE
        if state is None:
            try:
                path.unlink(missing_ok=True)
            except OSError as error:
                raise self._error(path, error) from error
            return
        self._write_file(path, json.dumps(_jsonable(state), indent=2).encode())

    def read_state(self) -> dict | None:
        """The in-flight state written last, or None when nothing is in flight."""
        return self._read_json(self.run_dir / STATE_FILE)

    def update_session(self, **fields: Any) -> dict:
        """Merge `fields` into session.json (atomically); returns the merged document."""
        session = {**(self.read_session() or {}), **fields}
        path = self.run_dir / SESSION_FILE
        self._write_file(path, json.dumps(_jsonable(session), indent=2).encode())
        return session

    def read_session(self) -> dict | None:
        """session.json, or None when the session has not been started here."""
        return self._read_json(self.run_dir / SESSION_FILE)


def baseline_of(exps: list[Experiment]) -> Experiment | None:
    """The baseline among a session's experiments, oldest first: the first one kept (every
    later experiment is judged against a best, so the first keep is the unchanged train.py
    measured), or, when none was kept, the first (a baseline that crashed). A baseline that
    crashed and was trained again after a fix (`--resume`) is not it: its re-run is."""
    return next((e for e in exps if e.status == Status.keep), exps[0] if exps else None)
