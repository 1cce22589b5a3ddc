"""evaluator.WarmKey: what an evaluator started ahead must match to be used."""

from __future__ import annotations

import inspect
from dataclasses import fields
from pathlib import Path

from autoresearch.evaluator import WarmKey, evaluate_checkpoint, start_warm

BASE = {
    "root": Path("/ws"),
    "split": "val",
    "preset": "cpu",
    "device": "cpu",
    "fingerprints": {"prepare.py": "ab", "data/val.bin": "cd"},
    "dataset": Path("/cache/ds"),
    "gpu": None,
    "prefix": (),
    "boxed": True,
}
OTHER = {
    "root": Path("/other"),
    "split": "test",
    "preset": "gpu",
    "device": "cuda",
    "fingerprints": {"prepare.py": "ab", "data/val.bin": "ef"},
    "dataset": Path("/cache/other"),
    "gpu": "1",
    "prefix": ("unshare", "--net"),
    "boxed": False,
}


def test_the_key_covers_every_argument_of_start_warm_but_the_marker() -> None:
    """A parameter added to or renamed in start_warm must be added to the key (or this fails):
    otherwise an evaluator started for other arguments could serve an evaluation."""
    started_with = set(inspect.signature(start_warm).parameters) - {"marker"}
    assert {f.name for f in fields(WarmKey)} == started_with == set(BASE)
    # and evaluate_checkpoint has each of them, under the same name, to build its own key
    assert started_with <= set(inspect.signature(evaluate_checkpoint).parameters)


def test_each_argument_changes_the_key_and_nothing_else_does() -> None:
    base = WarmKey.of(**BASE)
    for name, value in OTHER.items():
        assert WarmKey.of(**{**BASE, name: value}) != base, name
    same = {
        **BASE,
        "root": "/ws",
        "dataset": "/cache/ds",
        "prefix": [],
        "fingerprints": dict(reversed(list(BASE["fingerprints"].items()))),
    }
    assert WarmKey.of(**same) == base  # a path as text, a list for a tuple, another dict order
    assert WarmKey.of(**{**BASE, "fingerprints": None}) == WarmKey.of(
        **{**BASE, "fingerprints": {}}
    )
