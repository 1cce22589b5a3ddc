"""The device and preset a command runs with, and the preset's constants from prepare.py.

prepare.py is the one source of the presets: they are read from its text where possible
(no torch in the CLI's process) and imported otherwise. `--device cuda` without a visible GPU
and a preset prepare.py does not define raise UsageError. AUTORESEARCH_TIME_BUDGET is checked
by prepare.py's rule, here too without the import when prepare.py names the variable as a
literal (a test holds the two checks to agree on the real prepare.py); a bad value raises
DataError, as prepare.py's own check does when it is imported.
"""

from __future__ import annotations

import ast
import math
import os
from pathlib import Path

from .errors import DataError, UsageError
from .workspace import load_prepare, prepare_assignment, read_presets

TIME_BUDGET_ENV = "AUTORESEARCH_TIME_BUDGET"  # seconds; replaces the preset's TIME_BUDGET


def resolve_device(device: str | None, preset: str | None) -> tuple[str, str]:
    """(device, preset): defaults follow the hardware; `--device cuda` without a GPU is an error."""
    if device == "cpu":  # nothing to ask the hardware (and no `import torch`, 2 CPU s)
        return device, preset or "cpu"
    import torch

    has_cuda = torch.cuda.is_available()
    if device == "cuda" and not has_cuda:
        raise UsageError("--device cuda: no CUDA GPU is visible to PyTorch (use --device cpu)")
    device = device or ("cuda" if has_cuda else "cpu")
    preset = preset or ("gpu" if device == "cuda" else "cpu")
    return device, preset


def preset_constants(root: Path, preset: str) -> dict:
    """The preset's constants as prepare.py defines them (prepare.py is the one source), with
    TIME_BUDGET replaced by AUTORESEARCH_TIME_BUDGET when that is set.

    Read from its source when it can be (read_presets), the budget checked by `time_budget`;
    imported when the presets are not literals, or when a budget is set and prepare.py does
    not name TIME_BUDGET_ENV as a literal (its import then checks the budget itself)."""
    override = os.environ.get(TIME_BUDGET_ENV, "").strip()  # blank: unset, as for prepare.py
    presets = read_presets(root)
    if (
        presets is not None
        and override
        and _read_string(root, "TIME_BUDGET_ENV") != TIME_BUDGET_ENV
    ):
        presets = None  # a prepare.py that reads another variable, or says so by code
    if presets is None:
        presets = load_prepare(root).PRESETS
    if preset not in presets:
        raise UsageError(f"unknown preset {preset!r}: prepare.py defines {', '.join(presets)}")
    constants = dict(presets[preset])
    if override:
        constants["TIME_BUDGET"] = time_budget(override, root / "prepare.py")
    return constants


def time_budget(value: str, prepare: Path) -> float:
    """AUTORESEARCH_TIME_BUDGET's seconds, by prepare.py's rule (resolve_preset): a positive,
    finite number, blanks around it ignored. DataError, worded as prepare.py's PrepareError
    reaches the user through load_prepare, for anything else."""
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not (seconds > 0 and math.isfinite(seconds)):
        raise DataError(
            f"{prepare}: {TIME_BUDGET_ENV}={text!r} is not a positive number of seconds"
        )
    return seconds


def _read_string(root: Path, name: str) -> str | None:
    """The string prepare.py assigns to `name` at module level, read from its source: None
    unless exactly one module-level statement names it and that one assigns a string literal."""
    value = prepare_assignment(root, name)
    if isinstance(value, ast.Constant) and isinstance(value.value, str):
        return value.value
    return None
