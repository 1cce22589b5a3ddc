"""The words of the record, each spelled once: an experiment's status, a run's crash class,
the keep rule's decision and the label the agent reads.

They are `str` enums: a member equals its string (`Status.keep == "keep"`), is written to
JSON and results.tsv as that string, and a record read back compares equal to it, so code
that still spells a word as a string keeps working. Nothing else is defined here.
"""

from __future__ import annotations

from enum import Enum


class Word(str, Enum):
    """A str enum that formats as its value (`f"{Status.keep}"` is "keep", as on Python 3.11
    and older for plain str enums; 3.12 changed format() of mixed-in enums)."""

    def __str__(self) -> str:
        return self.value

    def __hash__(self) -> int:  # as its string's, so a member finds a string key and back
        return str.__hash__(self)

    __format__ = str.__format__


class Status(Word):
    """What became of an experiment (experiments.jsonl's `status`)."""

    keep = "keep"  # it beat the best by the keep rule: the branch advanced
    discard = "discard"  # measured, not better by the rule: reset to the best
    crash = "crash"  # the run gave no val_bpb (crash_class says why)
    invalid = "invalid"  # no usable edit, or refused before training (extra.reason)
    interrupted = "interrupted"  # killed by the user; `--resume` trains it again
    rejected = "rejected"  # the sealed evaluator caught the model or the run cheating
    running = "running"  # in flight: only in what the agent is shown, never recorded

    @property
    def failed(self) -> bool:
        """No val_bpb to compare: crash, invalid or rejected."""
        return self in FAILED


FAILED = (Status.crash, Status.invalid, Status.rejected)
RECORDED = tuple(s for s in Status if s is not Status.running)  # what experiments.jsonl holds


class CrashClass(Word):
    """Why a run crashed (experiments.jsonl's `crash_class`)."""

    syntax = "syntax"  # train.py does not parse
    import_ = "import"  # an import failed
    oom = "oom"  # out of memory
    nan = "nan"  # the loss or val_bpb is not a number
    timeout = "timeout"  # past the hard limit per run
    stall = "stall"  # printed nothing for --stall-timeout seconds
    interrupted = "interrupted"  # stopped by the user
    over_budget = "over_budget"  # trained past TIME_BUDGET + grace, or started too late
    no_summary = "no_summary"  # exited without the summary block
    other = "other"  # any other non-zero exit
    no_checkpoint = "no_checkpoint"  # sealed: no checkpoint, or load_model fails on it
    eval = "eval"  # sealed: the evaluator failed (forward raises, timeout)
    rejected = "rejected"  # sealed: the evaluator rejected the run


class Decision(Word):
    """What the keep rule decides after a candidate's run (noise.judge)."""

    keep = "keep"
    discard = "discard"
    repeat = "repeat"  # one more paired run


class Label(Word):
    """The verdict the agent reads for a judged experiment (noise.prompt_label)."""

    win = "win"  # kept by the keep rule
    within_noise = "within-noise"  # not kept, and the mirrored test does not call it a loss
    loss = "loss"  # the mirrored test (the change loses the effect) would have crossed the bar
    not_better = "not-better"  # judged without a noise estimate (one run, the min_delta bar)
