"""Short texts for the terminal: an experiment as one line, its Δ, the busy share, the
status colours, durations and counts.

Every function returns plain text: nothing here prints, and nothing is parsed as rich
markup. Text from the agent or the user goes through `printable`, which replaces newlines
and control characters, so a line stays one line.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from .ledger import Experiment, decision_of
from .status import FAILED, Status

STATUS_STYLE = {
    Status.keep: "bold green",
    Status.discard: "dim",
    Status.crash: "bold red",
    Status.invalid: "yellow",
    Status.interrupted: "magenta",
    Status.rejected: "red",
}
STATUS_ORDER = {status: i for i, status in enumerate(STATUS_STYLE)}


def plural(n: int, word: str) -> str:
    """'1 experiment', '2 experiments'."""
    return f"{n} {word}{'s' * (n != 1)}"


def device_name(device: str | None) -> str:
    """What the user calls the device a session trains on: GPU for cuda, else CPU (MPS)."""
    device = (device or "").lower()
    if device.startswith("cuda") or device == "gpu":
        return "GPU"
    return "MPS" if device == "mps" else "CPU"


def busy_percent(experiments: Iterable[Experiment]) -> float | None:
    """The one definition of busy, shown by the dashboard and by `status`: the share of the
    session's wall time that its training runs took (launch to exit, every run of every
    experiment), as of the last experiment recorded, since the session was last started.
    Read from that experiment's `extra.gpu_busy_s` and `extra.session_s`; None before."""
    for e in reversed(list(experiments)):
        busy, total = (e.extra or {}).get("gpu_busy_s"), (e.extra or {}).get("session_s")
        if is_finite(busy) and is_finite(total) and total > 0:
            return round(100.0 * busy / total, 1)
    return None


def busy_line(experiments: Iterable[Experiment], device: str | None) -> str:
    busy = busy_percent(experiments)
    share = "—" if busy is None else f"{busy:.1f}%"
    return f"{device_name(device)} busy training {share} of the session"


def format_delta(exp: Experiment) -> str:
    if exp.val_bpb is None or exp.best_before is None:
        return ""
    return f"Δ {exp.val_bpb - exp.best_before:+.6f}"


def result_line(exp: Experiment) -> str:
    """One plain line for a finished experiment (also used by `status`)."""
    bpb = f"val_bpb {exp.val_bpb:.6f}" if exp.val_bpb is not None else "val_bpb    —    "
    extra = (
        exp.crash_class or exp.extra.get("reason", "")
        if exp.status in FAILED
        else format_delta(exp)
    )
    line = f"exp {exp.id:04d} {exp.status:<11} {bpb}  {extra:<18} {exp.description}"
    return printable(line + _noise_note(exp))


def _noise_note(exp: Experiment) -> str:
    """Why a lower val_bpb was still discarded: its gain did not clear the noise bar."""
    if exp.status == Status.discard and exp.extra.get("reason"):  # e.g. a stale base, no merge
        return f"  [{' '.join(str(exp.extra['reason']).split())}]"
    d = decision_of(exp)
    if exp.status != Status.discard or d.gain is None or d.gain <= 0 or d.bar is None:
        return ""
    runs = max(d.runs, 1)
    return f"  [within noise: gain {d.gain:.6f} <= bar {d.bar:.6f} after {plural(runs, 'run')}]"


def printable(value: object) -> str:
    """One printable line: an LLM's text may hold newlines or escape sequences."""
    text = "" if value is None else str(value)
    return "".join(ch if ch.isprintable() else " " for ch in text)


def is_finite(x: float | None) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def short_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def short_count(n: float) -> str:
    if n < 1000:
        return f"{n:.0f}"
    if n < 1_000_000:
        return f"{n / 1000:.1f}k"
    return f"{n / 1_000_000:.2f}M"


def one_of(parts: list[str]) -> str:
    """'a', 'a or b', 'a, b or c'."""
    return " or ".join(filter(None, [", ".join(parts[:-1]), parts[-1]]))


def hours_text(h: float) -> str:
    return f"{h:g}h"
