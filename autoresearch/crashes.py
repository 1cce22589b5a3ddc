"""Naming what kind of crash a training run was, from its log and exit code.

Guarantees: `classify_crash` always returns one of CRASH_CLASSES, the CrashClass members
(status.py) a training run can crash with; it reads text only, never raises. What it does not
do: decide whether a run crashed (runner.py does), or name the evaluator's failures.
"""

from __future__ import annotations

import re
import signal

from .status import CrashClass

_SEALED = (CrashClass.no_checkpoint, CrashClass.eval, CrashClass.rejected)  # the evaluator's
CRASH_CLASSES = tuple(c for c in CrashClass if c not in _SEALED)

_EXCEPTION_LINE = re.compile(
    r"^(?:[A-Za-z_][\w]*\.)*([A-Za-z_]\w*(?:Error|Exception))\b(?::\s*(.*))?$", re.MULTILINE
)
_EXCEPTION_CLASSES = {
    "SyntaxError": CrashClass.syntax,
    "IndentationError": CrashClass.syntax,
    "TabError": CrashClass.syntax,
    "ImportError": CrashClass.import_,
    "ModuleNotFoundError": CrashClass.import_,
    "OutOfMemoryError": CrashClass.oom,
    "MemoryError": CrashClass.oom,
    "FloatingPointError": CrashClass.nan,
}
_OOM_TEXT = re.compile(
    r"out of memory|OutOfMemoryError|\bMemoryError\b|Cannot allocate memory"
    r"|CUBLAS_STATUS_ALLOC_FAILED|killed by signal: Killed",
    re.IGNORECASE,
)
_NAN_TEXT = re.compile(
    r"\bNaN\b|(?:loss|bpb)\b[^\n]{0,40}?\b(?:nan|inf)\b|diverg|explo(?:de|ded|ding|sion)"
    r"|non-finite|not finite|FloatingPointError",
)
_NAN_TEXT_ANYCASE = re.compile(r"(?:loss|bpb)\b[^\n]{0,40}?\b(?:nan|inf)\b", re.IGNORECASE)
_TEXT_CLASSES = (
    (
        CrashClass.syntax,
        re.compile(r"^\s*(?:SyntaxError|IndentationError|TabError)\b", re.MULTILINE),
    ),
    (CrashClass.import_, re.compile(r"^\s*(?:ModuleNotFoundError|ImportError)\b", re.MULTILINE)),
    (CrashClass.oom, _OOM_TEXT),
    (CrashClass.nan, _NAN_TEXT),
    (CrashClass.nan, _NAN_TEXT_ANYCASE),
)
_SIGKILL_CODES = (-signal.SIGKILL, 128 + signal.SIGKILL)  # 137: SIGKILL seen through a shell


def _classify_message(name: str, message: str) -> CrashClass | None:
    if name in _EXCEPTION_CLASSES:
        return _EXCEPTION_CLASSES[name]
    if _OOM_TEXT.search(message):
        return CrashClass.oom
    if _NAN_TEXT.search(message) or _NAN_TEXT_ANYCASE.search(message):
        return CrashClass.nan
    return None


def classify_crash(
    log_text: str,
    exit_code: int | None,
    *,
    timed_out: bool,
    stalled: bool,
    interrupted: bool,
) -> CrashClass:
    """Name what kind of crash a run that is not ok was (one of CRASH_CLASSES).

    Order of evidence: what the harness did (interrupted, timeout, stall); then the last Python
    exception line in the log (its type and message); then known messages anywhere in the log
    (syntax, import, out of memory, NaN/diverged/exploded); then the exit code: 0 means the run
    finished without a valid val_bpb (CrashClass.no_summary), SIGKILL that the harness did not send is
    most often the kernel's OOM killer (CrashClass.oom); anything else is "other".
    """
    if interrupted:
        return CrashClass.interrupted
    if timed_out:
        return CrashClass.timeout
    if stalled:
        return CrashClass.stall
    exceptions = _EXCEPTION_LINE.findall(log_text)
    if exceptions:
        name, message = exceptions[-1]
        found = _classify_message(name, message)
        if found is not None:
            return found
    for crash_class, pattern in _TEXT_CLASSES:
        if pattern.search(log_text):
            return crash_class
    if exit_code == 0:
        return CrashClass.no_summary
    if exit_code in _SIGKILL_CODES:
        return CrashClass.oom
    return CrashClass.other
