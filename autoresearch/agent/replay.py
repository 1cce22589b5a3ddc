"""The replay agent: prepared replies, applied one per proposal, in file-name order.

For demos, benchmarks and tests that need a fixed sequence of edits without a model.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..edits import apply_reply
from ..errors import EditError, UsageError
from ..status import Status
from .base import (
    AgentExhausted,
    AgentOptions,
    Context,
    InvalidProposal,
    Proposal,
    RegisteredAgent,
    _local_proposal,
)
from .conversation import description_of


class ReplayAgent(RegisteredAgent):
    """Applies prepared replies (files in the reply format), one per call, in name order.

    Hidden files are skipped. propose() and fix() each consume the next file; an invalid file
    raises InvalidProposal at once (no retries); when the files run out, AgentExhausted.
    """

    name = "replay"
    model = "replay"
    summary = "prepared replies from a directory, in name order (--patches DIR)"
    overlaps = False  # each reply was written against the best of its time

    @classmethod
    def create(cls, options: AgentOptions) -> ReplayAgent:
        if options.patches_dir is None:
            raise UsageError("the replay agent needs --patches DIR (a directory of replies)")
        return cls(options.patches_dir)

    def __init__(self, patches_dir: Path) -> None:
        if not patches_dir.is_dir():
            raise UsageError(f"--patches {patches_dir} is not a directory of prepared replies")
        self.files = sorted(
            p for p in patches_dir.iterdir() if p.is_file() and not p.name.startswith(".")
        )
        if not self.files:
            raise UsageError(f"--patches {patches_dir} holds no reply files")
        self.position = 0

    def propose(self, ctx: Context) -> Proposal:
        self._catch_up(ctx)
        return self._next(ctx.train_py)

    def fix(self, ctx: Context, failed_source: str, crash_tail: str) -> Proposal:
        self._catch_up(ctx)
        return self._next(failed_source)

    def _catch_up(self, ctx: Context) -> None:
        """Skip the files already used by recorded experiments (after --resume).

        Every experiment after the baseline (the first kept; before it, only baselines that
        crashed) consumed exactly one file, so a resumed session replays from where the record
        ends: an attempt killed before it was recorded gets its own file again.
        """
        kept = next((i for i, h in enumerate(ctx.history) if h.status == Status.keep), None)
        used = 0 if kept is None else len(ctx.history) - kept - 1
        self.position = max(self.position, used)

    def _next(self, base: str) -> Proposal:
        started = time.monotonic()
        if self.position >= len(self.files):
            raise AgentExhausted(
                f"all {len(self.files)} replies in {self.files[0].parent} were used"
            )
        path = self.files[self.position]
        self.position += 1
        text = path.read_text(encoding="utf-8")
        messages = [{"role": "user", "content": f"(replayed from {path.name})"}]
        try:
            description, source = apply_reply(base, text)
        except EditError as exc:
            raise InvalidProposal(
                f"{path.name}: {exc}",
                description=description_of(text),
                messages=messages,
                reply=text,
                model=self.model,
            ) from None
        return _local_proposal(self, description, source, started, messages, text)
