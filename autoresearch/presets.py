"""The device and preset a command runs with, and the preset's constants from prepare.py.

prepare.py is the one source of the presets: they are read from its text where possible
(no torch in the CLI's process) and imported otherwise. `--device cuda` without a visible GPU
and a preset prepare.py does not define raise UsageError.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UsageError
from .workspace import load_prepare, read_presets


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
    """The preset's constants as prepare.py defines them (prepare.py is the one source).

    Read from its source when it can be (read_presets); imported when not, or when
    AUTORESEARCH_TIME_BUDGET is set, whose check is prepare.py's own."""
    presets = None if os.environ.get("AUTORESEARCH_TIME_BUDGET") else read_presets(root)
    if presets is None:
        presets = load_prepare(root).PRESETS
    if preset not in presets:
        raise UsageError(f"unknown preset {preset!r}: prepare.py defines {', '.join(presets)}")
    constants = dict(presets[preset])
    override = os.environ.get("AUTORESEARCH_TIME_BUDGET")
    if override:
        constants["TIME_BUDGET"] = float(override)
    return constants
