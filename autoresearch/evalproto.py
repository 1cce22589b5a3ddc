"""What the harness and the trusted evaluator agree on: the evaluator's command line, its result
statuses and exit codes. Both sides import it; it imports nothing of either (status.py's `Word`
only), and no candidate code ever runs with it loaded (the model process, model_server.py, does
not import the package, so it still spells a failure's status as the string).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from .status import Word


class EvalStatus(Word):
    """The result line's `status`: what the evaluator said about a checkpoint."""

    ok = "ok"  # evaluated: val_bpb is the metric on the split
    rejected = "rejected"  # the model looks ahead or mixes rows (exit EXIT_REJECTED)
    no_checkpoint = "no_checkpoint"  # no checkpoint, or load_model fails on it (EXIT_FAILED)
    error = "error"  # anything else that stopped the evaluation (EXIT_FAILED)


STATUSES = tuple(EvalStatus)  # the statuses a result line may carry
FAILED = (EvalStatus.no_checkpoint, EvalStatus.error)  # said with EXIT_FAILED and a reason
EXIT_REJECTED = 3  # the evaluator's exit codes besides 0 (ok) and 1 (an uncaught error)
EXIT_FAILED = 2


def command_args(root: Path, split: str, preset: str, device: str, boxed: bool) -> list[str]:
    """The arguments that fix what an evaluator evaluates on, known before the checkpoint exists
    (what an evaluator started ahead is started with)."""
    args = ["--workspace", str(root), "--split", split, "--preset", preset, "--device", device]
    return [*args, "--box"] if boxed else args


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The trusted evaluator's command line (command_args, plus what the run brings)."""
    parser = argparse.ArgumentParser(
        prog="autoresearch.sealed_eval", description="the trusted evaluator"
    )
    parser.add_argument("--workspace", required=True, type=Path)
    parser.add_argument("--train", type=Path, help="train.py to import (default: the workspace's)")
    parser.add_argument("--checkpoint", type=Path, help="required unless --wait")
    parser.add_argument("--split", default="val")
    parser.add_argument("--preset", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--nonce-file", type=Path)
    parser.add_argument("--fingerprints", type=Path)
    parser.add_argument("--box", action="store_true", help="run the model processes boxed")
    parser.add_argument(
        "--wait",
        action="store_true",
        help="started ahead: read the fingerprints from a first stdin line, get ready, then wait "
        "for a go line with the checkpoint, train.py and the nonce",
    )
    args = parser.parse_args(argv)
    if args.checkpoint is None and not args.wait:
        parser.error("--checkpoint is required")
    return args
