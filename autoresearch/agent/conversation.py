"""One conversation loop for every agent that asks a chat model for an edit.

`ChatAgent.converse` sends the prompt, applies the reply, and when the reply cannot be used
sends back the precise reason and asks again, up to `max_attempts` replies; when the transport
says the context is too long it rebuilds the prompt at the next level of PROMPT_LEVELS. It
talks to the model only through `complete(messages)`, which a transport (endpoint.py)
implements: the loop knows no HTTP, the transport no edits.

Guarantees: a returned Proposal's source is the edit of `base` that applied and compiled;
token usage is summed over all attempts; failure is InvalidProposal (no usable reply) or
AgentError (the transport gave up, or the prompt cannot be made short enough).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from ..edits import apply_edit, parse_reply
from ..errors import AgentError, EditError
from .base import Context, InvalidProposal, Proposal, RegisteredAgent
from .prompts import PROMPT_LEVELS, build_fix_messages, build_messages, correction

MAX_ATTEMPTS = 3  # replies per proposal (the first plus two corrected ones)


@dataclass
class Completion:
    """One reply of the model, as a transport hands it to the conversation."""

    text: str
    problem: str = ""  # "" for a reply worth parsing, else what to tell the model
    tokens_in: int = 0
    tokens_out: int = 0


class ContextTooLong(Exception):
    """Raised by a transport's `complete` when the model said the prompt is too long; the
    conversation catches it and trims. Never leaves this package."""


class ChatAgent(RegisteredAgent):
    """An agent that converses with a chat model. A subclass is a transport: it implements
    `complete` (and `resolve_model` when the model may be found at run time)."""

    overlaps = True
    max_attempts: int = MAX_ATTEMPTS

    def complete(self, model: str, messages: list[dict]) -> Completion:
        """One request to the model. Raises ContextTooLong, or AgentError when unusable."""
        raise NotImplementedError

    def resolve_model(self) -> str:
        """The model to ask; a transport may look it up (a local server's first model)."""
        if self.model is None:
            raise AgentError("no model configured: pass --model")
        return self.model

    def propose(self, ctx: Context) -> Proposal:
        """A new experiment, edited against ctx.train_py."""
        return self.converse(ctx.train_py, lambda level: build_messages(ctx, level))

    def fix(self, ctx: Context, failed_source: str, crash_tail: str) -> Proposal:
        """A repair of the crashed candidate, edited against failed_source."""
        return self.converse(
            failed_source, lambda level: build_fix_messages(ctx, failed_source, crash_tail, level)
        )

    def converse(self, base: str, build: Callable[[int], list[dict]]) -> Proposal:
        """Ask until a reply's edit applies to `base` (see the module docstring)."""
        started = time.monotonic()
        model = self.resolve_model()
        level, attempts, tokens_in, tokens_out = 0, 0, 0, 0
        turns: list[dict] = []  # earlier replies and the corrections sent back
        replies: list[str] = []
        messages: list[dict] = []
        problem = ""
        while attempts < self.max_attempts:
            messages = build(level) + turns
            try:
                reply = self.complete(model, messages)
            except ContextTooLong:
                level += 1  # skip levels that would send the same prompt again
                while level < len(PROMPT_LEVELS) and build(level) + turns == messages:
                    level += 1
                if level >= len(PROMPT_LEVELS):
                    raise AgentError(
                        f"The prompt is too long for {model} even without the history: "
                        "program.md and train.py alone exceed its context window. Use a "
                        "model with a longer context or shorten program.md."
                    ) from None
                continue
            attempts += 1
            tokens_in += reply.tokens_in
            tokens_out += reply.tokens_out
            text, problem = reply.text, reply.problem
            replies.append(text)
            if not problem:
                try:
                    description, source = apply_edit(base, text)
                except EditError as exc:
                    problem = str(exc)
                else:
                    return Proposal(
                        description=description or _earlier_description(replies),
                        source=source,
                        messages=messages,
                        reply=_join(replies),
                        model=model,
                        attempts=attempts,
                        tokens_in=tokens_in,
                        tokens_out=tokens_out,
                        seconds=time.monotonic() - started,
                        agent=self.name,
                    )
            turns += [
                {"role": "assistant", "content": text},
                {"role": "user", "content": correction(problem)},
            ]
        raise InvalidProposal(
            f"no valid edit after {attempts} attempts; last problem: {problem.splitlines()[0]}",
            description=_last_description(replies),
            messages=messages,
            reply=_join(replies),
            attempts=attempts,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            seconds=time.monotonic() - started,
            model=model,
        )


def _earlier_description(replies: list[str]) -> str:
    """The description an earlier reply of this conversation gave, when the applied one gave
    none (a corrected reply often resends only the blocks); else a neutral placeholder."""
    return _last_description(replies[:-1]) or "edit of train.py (no description given)"


def _last_description(replies: list[str]) -> str | None:
    """The description of the latest reply that gave one, for the record."""
    for reply in reversed(replies):
        description = description_of(reply)
        if description:
            return description
    return None


def description_of(reply: str) -> str | None:
    """The description line of a reply that did not apply, for the record."""
    try:
        return parse_reply(reply).description
    except EditError:
        return None


def _join(replies: list[str]) -> str:
    if len(replies) == 1:
        return replies[0]
    return "\n\n".join(f"===== attempt {k} =====\n{r}" for k, r in enumerate(replies, 1))
