"""Proposal agents: given the research context, return the next complete train.py.

Three agents share one protocol (`Agent`): `propose(ctx)` for a new experiment and
`fix(ctx, failed_source, crash_tail)` to repair a candidate that crashed.

- `OpenAIAgent` asks any OpenAI-compatible Chat Completions endpoint for a SEARCH/REPLACE
  edit (the prompt is built here). Network retries and backoff are the openai client's; this
  module adds bounded retries for replies that do not apply (the model is told exactly why)
  and prompt trimming when the endpoint reports the context is too long.
- `TunerAgent` needs no LLM: it changes one UPPERCASE constant of train.py per experiment.
- `ReplayAgent` applies prepared replies from a directory, in name order.

Guarantees: a returned Proposal's `source` is the complete new train.py, differs from the
text it was derived from, and compiles. Failure is always one of the AgentError family:
`InvalidProposal` (no valid edit this time: the loop records `invalid`), `AgentExhausted`
(nothing more to propose: end the session), or plain `AgentError` (endpoint unusable after the
client's retries: the loop decides whether to wait). The API key is never put in a message,
a record or an error.
"""

from __future__ import annotations

import ast
import functools
import math
import os
import random
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from json import JSONDecodeError
from pathlib import Path
from typing import Protocol

import openai
from openai.types.chat import ChatCompletion

from .edits import DESCRIPTION_MAX_CHARS, apply_edit, apply_reply, check_compiles, parse_reply
from .errors import AgentError, AutoresearchError, EditError, UsageError

AGENT_NAMES = ("openai", "tuner", "replay")
MAX_ATTEMPTS = 3  # replies per proposal (the first plus two corrected ones)
CLIENT_MAX_RETRIES = 4  # the openai client's retries of 429/5xx/timeouts, with its own backoff
LOCAL_PLACEHOLDER_KEY = "not-needed"  # local servers ignore the key, the client wants one
HISTORY_RECENT = 30  # experiments shown in full when the history is long (plus every keep)
NOISE_SIGMAS = 2.0  # |Δ| within this many σ of the noise is labelled "within-noise"
# Prompt trimming ladder, used when the endpoint says the context is too long: the history
# goes first, then the crash log (a repair keeps at least FIX_MIN_CRASH_LINES of it).
# (recent experiments shown, older keeps shown (None = all), crash-log lines shown).
PROMPT_LEVELS: tuple[tuple[int, int | None, int], ...] = (
    (HISTORY_RECENT, None, 50),
    (10, 10, 50),
    (3, 3, 50),
    (0, 0, 50),
    (0, 0, 10),
    (0, 0, 0),
)
FIX_MIN_CRASH_LINES = 10
CHECK_TIMEOUT_S = 60.0  # the check before the first run waits at most this per request
_UNKNOWN_MODEL = re.compile(
    r"model.{0,80}(not (be )?found|does not exist|doesn't exist|not exist|unknown|invalid|not "
    r"a valid|not supported|no such|not available|not served)|(unknown|invalid|no such) model",
    re.IGNORECASE,
)
_CONTEXT_TOO_LONG = re.compile(
    r"context[ _-]?(length|size|window)|maximum context|too many tokens|prompt is too long",
    re.IGNORECASE,
)


# ============================================================================ data types


@dataclass
class HistoryEntry:
    """One past experiment, oldest first."""

    id: int
    status: str  # keep | discard | crash | invalid | interrupted
    val_bpb: float | None
    delta: float | None  # val_bpb minus the best at the time (negative = better)
    description: str
    source: str | None = None  # train.py of that attempt (None if invalid)
    # win | within-noise | loss as the keep rule judged it (noise.judge); None: not judged
    verdict: str | None = None


@dataclass
class Context:
    """Everything an agent may look at to propose the next experiment."""

    program: str  # program.md text
    train_py: str  # current best train.py
    history: list[HistoryEntry] = field(default_factory=list)
    best_bpb: float | None = None
    last_crash_tail: str | None = None  # ≤ 50 lines of the last crash's log
    noise: float | None = None  # σ of val_bpb once known
    preset: str | None = None  # prepare.py's active preset: the tuner skips the other's constants


@dataclass
class Proposal:
    """A valid candidate: `source` is the complete new train.py and compiles."""

    description: str
    source: str
    messages: list[dict]  # the whole conversation sent (the last request), for the record
    reply: str  # the raw reply (all replies joined when retried)
    model: str
    attempts: int
    tokens_in: int
    tokens_out: int
    seconds: float
    agent: str  # the agent's name: openai | tuner | replay
    wait_s: float = 0.0  # how long the loop waited for it (0 when it was ready in time)
    rebased_from: str | None = None  # the best it was made on, when re-applied to a newer best


class InvalidProposal(AgentError):
    """No valid edit this time (after the retries); the loop records the attempt as invalid."""

    def __init__(
        self,
        message: str,
        *,
        messages: list[dict] | None = None,
        reply: str = "",
        attempts: int = 1,
        tokens_in: int = 0,
        tokens_out: int = 0,
        seconds: float = 0.0,
        description: str | None = None,
        model: str | None = None,
    ) -> None:
        super().__init__(message)
        self.messages = messages or []
        self.reply = reply
        self.attempts = attempts
        self.tokens_in = tokens_in
        self.tokens_out = tokens_out
        self.seconds = seconds
        self.description = description
        self.model = model


class AgentExhausted(AgentError):
    """The agent has nothing more to propose; the session ends cleanly."""


class EndpointError(AutoresearchError):
    """Checked before the first run: the endpoint cannot be reached, does not serve the model
    or rejects the key. Nothing has been written or trained yet; the message names the fix."""

    exit_code = 2


class Agent(Protocol):
    name: str
    # True when proposing takes long enough to be worth doing while a run trains (an LLM);
    # the loop then asks for the next proposal during training, against the best so far.
    overlaps: bool

    def propose(self, ctx: Context) -> Proposal: ...

    def fix(self, ctx: Context, failed_source: str, crash_tail: str) -> Proposal: ...


def check_endpoint(agent: Agent) -> None:
    """Before any GPU time is spent: the agent's `check()` where it has one (an agent behind
    an endpoint); offline agents (tuner, replay) need none. Raises EndpointError."""
    check = getattr(agent, "check", None)
    if check is not None:
        check()


def make_agent(
    name: str,
    *,
    model: str | None = None,
    base_url: str | None = None,
    patches_dir: Path | None = None,
    api_key: str | None = None,
    timeout: float = 600.0,
) -> Agent:
    """Build the named agent (openai | tuner | replay); UsageError for bad arguments."""
    if name == "openai":
        return OpenAIAgent(model=model, base_url=base_url, api_key=api_key, timeout=timeout)
    if name == "tuner":
        return TunerAgent()
    if name == "replay":
        if patches_dir is None:
            raise UsageError("the replay agent needs --patches DIR (a directory of replies)")
        return ReplayAgent(patches_dir)
    raise UsageError(f"unknown agent {name!r}: choose one of {', '.join(AGENT_NAMES)}")


# ============================================================================ the prompt

EDIT_RULES = """\
# How to reply

Reply with exactly one experiment: one idea you expect to lower val_bpb.

1. The first line is a one-line description of the idea (at most 120 characters), e.g.
   `Raise MATRIX_LR from 0.04 to 0.06`. It becomes the commit message.
2. Then the edit of train.py as one or more SEARCH/REPLACE blocks:

train.py
```python
<<<<<<< SEARCH
    x = self.norm(x)
    logits = self.lm_head(x)
=======
    x = self.norm(x)
    logits = self.lm_head(x).float()
>>>>>>> REPLACE
```

Rules:
- Only train.py may be edited; prepare.py and everything else are fixed.
- The SEARCH part must copy lines of the current train.py exactly (whole lines, with their
  indentation and comments) and must match one place only: add neighbouring lines until it
  is unique. Keep blocks short; use several blocks for changes in several places. Blocks are
  applied in order.
- The edited train.py must still run to the end within the time budget and print its
  summary block; it must not read or write any other file.
- Send blocks, not the whole file; never elide lines inside a block with `...` or
  "unchanged" comments, and never repeat a block (each one is applied once).
- Nothing after the blocks is needed.
"""


def system_message(program: str) -> dict:
    """program.md followed by the edit-format rules."""
    return {"role": "system", "content": program.rstrip() + "\n\n" + EDIT_RULES}


def build_messages(ctx: Context, level: int = 0) -> list[dict]:
    """The messages asking for the next experiment; higher `level`s trim the history and crash
    log (see PROMPT_LEVELS)."""
    recent, keeps, crash_lines = PROMPT_LEVELS[level]
    parts = [
        "# The current best train.py",
        _best_line(ctx),
        _fenced(ctx.train_py, "python"),
        _history_section(ctx, recent, keeps),
    ]
    if ctx.last_crash_tail and crash_lines:
        tail = _tail(ctx.last_crash_tail, crash_lines)
        parts += [
            f"# The last crash (last {tail.count(chr(10)) + 1} lines of its log)",
            _fenced(tail),
        ]
    parts += [
        "# Your task",
        "Propose the next experiment: one idea, different from what the table shows was "
        "already tried, as SEARCH/REPLACE blocks against the train.py above. First line: the "
        "one-line description.",
    ]
    return [system_message(ctx.program), {"role": "user", "content": "\n\n".join(parts)}]


def build_fix_messages(
    ctx: Context, failed_source: str, crash_tail: str, level: int = 0
) -> list[dict]:
    """The messages asking to repair a crashed candidate (edits apply to `failed_source`)."""
    recent, keeps, crash_lines = PROMPT_LEVELS[level]
    idea = next((h.description for h in reversed(ctx.history) if h.source == failed_source), None)
    tail = _tail(crash_tail, max(crash_lines, FIX_MIN_CRASH_LINES))
    parts = [
        "# The candidate train.py that crashed",
        f"Its idea: {idea}" if idea else "",
        _fenced(failed_source, "python"),
        f"# Its crash (last {tail.count(chr(10)) + 1} lines of its log)",
        _fenced(tail),
        _history_section(ctx, recent, keeps),
        "# Your task",
        "Fix the cause of the crash while keeping the idea, as SEARCH/REPLACE blocks against the "
        "crashed train.py shown above (not against any earlier version). If the idea cannot "
        "work as written, make the smallest change that lets it run. First line: the one-line "
        "description of the repaired experiment.",
    ]
    user = "\n\n".join(p for p in parts if p)
    return [system_message(ctx.program), {"role": "user", "content": user}]


def history_table(
    history: list[HistoryEntry],
    noise: float | None,
    recent: int = HISTORY_RECENT,
    keeps: int | None = None,
) -> str:
    """A markdown table of past experiments, oldest first.

    Shows everything when there are at most `recent` entries; otherwise the last `recent` plus
    the earlier keeps (the last `keeps` of them, or all when None), and a line saying how many
    were left out. With `noise` known, Δ is also given in units of σ and each row is labelled
    win / within-noise / loss / crash.
    """
    if not history:
        return "(no experiments yet)"
    cut = max(0, len(history) - recent)
    older, shown = history[:cut], history[cut:]
    older_keeps = [h for h in older if h.status == "keep"]
    if keeps is not None:
        older_keeps = older_keeps[-keeps:] if keeps else []
    rows = older_keeps + shown
    header = "| id | val_bpb | Δ vs best | status | description |"
    rule = "|---:|---:|---:|---|---|"
    if noise:
        header = "| id | val_bpb | Δ vs best | status | verdict | description |"
        rule = "|---:|---:|---:|---|---|---|"
    lines = [header, rule]
    for h in rows:
        cells = [str(h.id), _num(h.val_bpb), _delta(h.delta, noise), h.status]
        if noise:
            cells.append(_verdict(h, noise))
        cells.append(" ".join(h.description.split()).replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    omitted = len(history) - len(rows)
    if omitted:
        lines.append(f"\n({omitted} older experiments not shown.)")
    return "\n".join(lines)


def _history_section(ctx: Context, recent: int, keeps: int | None) -> str:
    title = f"# Experiments so far ({len(ctx.history)}, oldest first; Δ is vs the best at the time)"
    return title + "\n\n" + history_table(ctx.history, ctx.noise, recent, keeps)


def _best_line(ctx: Context) -> str:
    line = "No val_bpb measured yet (lower is better)."
    if ctx.best_bpb is not None:
        line = f"Its val_bpb is {ctx.best_bpb:.6f} (lower is better)."
    if ctx.noise:
        line += (
            f" Run-to-run noise: σ ≈ {ctx.noise:.6f} val_bpb; a difference within "
            f"±{NOISE_SIGMAS:g}σ cannot be told apart from noise."
        )
    return line


def _verdict(h: HistoryEntry, noise: float) -> str:
    if h.status == "crash" or (
        h.val_bpb is None and h.status not in ("invalid", "interrupted", "running", "rejected")
    ):
        return "crash"
    if h.val_bpb is None:
        return h.status
    if h.delta is None:
        return "baseline"
    if h.verdict:
        return h.verdict
    if h.delta < -NOISE_SIGMAS * noise:
        return "win"
    if h.delta > NOISE_SIGMAS * noise:
        return "loss"
    return "within-noise"


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.6f}"


def _delta(delta: float | None, noise: float | None) -> str:
    if delta is None:
        return "—"
    text = f"{delta:+.6f}"
    return f"{text} ({delta / noise:+.1f}σ)" if noise else text


def _tail(text: str, n: int) -> str:
    return "\n".join(text.rstrip("\n").split("\n")[-n:])


def _fenced(text: str, lang: str = "") -> str:
    fence = "````" if "```" in text else "```"
    return f"{fence}{lang}\n{text.rstrip()}\n{fence}"


# ============================================================================ OpenAI-compatible


class _ContextTooLong(Exception):
    """Internal: the endpoint said the prompt is too long."""


class OpenAIAgent:
    """An LLM behind any OpenAI-compatible Chat Completions endpoint.

    Per proposal: up to `max_attempts` replies; a reply that is empty, refused, or whose edit
    does not apply or compile is answered with the precise reason and asked again. Token usage
    is summed over all attempts. When the endpoint reports the context is too long the prompt
    is rebuilt at the next PROMPT_LEVELS (history first, then the crash log) and sent again.
    """

    name = "openai"
    overlaps = True

    def __init__(
        self,
        *,
        model: str | None,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 600.0,
        max_retries: int = CLIENT_MAX_RETRIES,
        max_attempts: int = MAX_ATTEMPTS,
    ) -> None:
        if model is None and base_url is None:
            raise UsageError(
                "name the model with --model (e.g. --model gpt-4.1), or give --base-url"
            )
        self.model = model
        self.base_url = base_url
        self.max_attempts = max_attempts
        self.timeout = timeout
        self._client = openai.OpenAI(
            base_url=base_url,
            api_key=resolve_api_key(api_key, base_url),
            max_retries=max_retries,
            timeout=timeout,
        )

    def __repr__(self) -> str:  # the client holds the key: never show it
        return f"OpenAIAgent(model={self.model!r}, base_url={self.base_url!r})"

    def propose(self, ctx: Context) -> Proposal:
        """A new experiment, edited against ctx.train_py."""
        return self._converse(ctx.train_py, lambda level: build_messages(ctx, level))

    def check(self) -> None:
        """One cheap request before the first run: the endpoint answers, serves the model and
        accepts the key. Raises EndpointError with the endpoint's own words and the fix.

        GET /models first (free); when the endpoint has no such route or does not list the
        model (llama.cpp serves any name, proxies list aliases), a one-token completion decides.
        A rate limit here is not a failure: the endpoint exists and the session waits it out.
        """
        client = self._client.with_options(
            max_retries=1, timeout=min(CHECK_TIMEOUT_S, self.timeout)
        )
        listed: list[str] | None = None
        try:
            listed = [m.id for m in client.models.list()]
        except (openai.APIError, JSONDecodeError) as exc:
            self._check_failure(exc, route="/models")
        if self.model is None:
            if not listed:
                raise EndpointError(
                    f"No --model given and {self.base_url} lists no models; pass --model."
                )
            self.model = listed[0]
            return
        if listed and self.model in listed:
            return
        try:
            client.chat.completions.create(
                model=self.model,
                messages=[{"role": "user", "content": "Reply with OK."}],
                max_tokens=1,
            )
        except openai.RateLimitError:
            return
        except (openai.APIError, JSONDecodeError) as exc:
            self._check_failure(exc, route="/chat/completions", listed=listed)

    def _check_failure(
        self, exc: Exception, *, route: str, listed: list[str] | None = None
    ) -> None:
        """Raise EndpointError for a failed check request, or return when the failure says
        nothing against the endpoint (a route it does not have, a parameter it refuses)."""
        where = self.base_url or "the OpenAI API"
        if isinstance(exc, openai.APIConnectionError):
            reason = (
                str(exc.__cause__ or exc)
                if not isinstance(exc, openai.APITimeoutError)
                else (f"no answer within {CHECK_TIMEOUT_S:g}s")
            )
            raise EndpointError(
                f"Cannot reach {where} ({' '.join(reason.split())[:200]}): check --base-url (it "
                "usually ends in /v1, e.g. http://localhost:8000/v1) and that the server is "
                "running."
            ) from None
        if isinstance(exc, JSONDecodeError) or not isinstance(exc, openai.APIStatusError):
            if route == "/models":
                return  # judged by the completion that follows
            raise EndpointError(
                f"{where} answered {route} with something that is not the OpenAI API "
                f"({' '.join(str(exc).split())[:200]}): check --base-url (it usually ends in /v1)."
            ) from None
        status, said = exc.status_code, _endpoint_words(exc)
        if status in (401, 403):
            raise EndpointError(
                f"{where} rejected the API key (HTTP {status}: {said}): set OPENAI_API_KEY or "
                "AUTORESEARCH_API_KEY to a valid key for this endpoint."
            ) from None
        if route == "/models":
            return  # no /models route (or a broken one): the completion decides
        model_unknown = status == 404 or (status in (400, 422) and _UNKNOWN_MODEL.search(said))
        if model_unknown:
            offered = f" (it lists: {', '.join(listed[:10])})" if listed else ""
            raise EndpointError(
                f"{where} does not serve model {self.model!r} (HTTP {status}: {said}): pass a "
                f"model it serves with --model{offered}, or check --base-url."
            ) from None
        if status in (400, 413, 422):
            return  # it understood the model and the key, and refused the probe's parameters
        raise EndpointError(
            f"{where} failed the first request (HTTP {status}: {said}) even after a retry: "
            "check that the server is healthy, then start again."
        ) from None

    def fix(self, ctx: Context, failed_source: str, crash_tail: str) -> Proposal:
        """A repair of the crashed candidate, edited against failed_source."""
        return self._converse(
            failed_source, lambda level: build_fix_messages(ctx, failed_source, crash_tail, level)
        )

    def _converse(self, base: str, build: Callable[[int], list[dict]]) -> Proposal:
        started = time.monotonic()
        model = self._model()
        level, attempts, tokens_in, tokens_out = 0, 0, 0, 0
        turns: list[dict] = []  # earlier replies and the corrections sent back
        replies: list[str] = []
        messages: list[dict] = []
        problem = ""
        while attempts < self.max_attempts:
            messages = build(level) + turns
            try:
                completion = self._complete(model, messages)
            except _ContextTooLong:
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
            if completion.usage is not None:
                tokens_in += completion.usage.prompt_tokens or 0
                tokens_out += completion.usage.completion_tokens or 0
            text, problem = _reply_text(completion)
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
                {"role": "user", "content": _correction(problem)},
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

    def _model(self) -> str:
        """The configured model, or the first one a local server lists."""
        if self.model is None:
            try:
                models = [m.id for m in self._client.models.list()]
            except openai.APIError as exc:
                raise AgentError(
                    f"No --model given and {self.base_url} did not list its models "
                    f"({_describe(exc)}); pass --model."
                ) from None
            if not models:
                raise AgentError(f"No --model given and {self.base_url} lists none; pass --model.")
            self.model = models[0]
        return self.model

    def _complete(self, model: str, messages: list[dict]) -> ChatCompletion:
        """One request; the client retries 429/5xx/timeouts itself. Maps failures to AgentError."""
        where = self.base_url or "the OpenAI API"
        try:
            return self._client.chat.completions.create(model=model, messages=messages)
        except openai.APIStatusError as exc:
            if exc.status_code == 413 or (
                exc.status_code == 400
                and (exc.code == "context_length_exceeded" or _CONTEXT_TOO_LONG.search(exc.message))
            ):
                raise _ContextTooLong from None
            if exc.status_code in (401, 403):
                raise AgentError(
                    f"{where} rejected the API key (HTTP {exc.status_code}) - set OPENAI_API_KEY "
                    "or AUTORESEARCH_API_KEY to a valid key."
                ) from None
            if exc.status_code == 404:
                raise AgentError(
                    f"{where} does not know model {model!r} or the URL (HTTP 404): check --model "
                    "and --base-url (it usually ends in /v1)."
                ) from None
            if exc.status_code == 429 or exc.status_code >= 500:
                raise AgentError(
                    f"{where} still answered HTTP {exc.status_code} after "
                    f"{self._client.max_retries} retries: {_describe(exc)}. Wait and try again."
                ) from None
            raise AgentError(f"{where} refused the request: {_describe(exc)}") from None
        except openai.APITimeoutError:
            raise AgentError(
                f"{where} did not answer within {self._client.timeout}s "
                f"({self._client.max_retries} retries); is it overloaded? Wait, or raise --agent-timeout."
            ) from None
        except openai.APIConnectionError:
            raise AgentError(
                f"Could not connect to {where} ({self._client.max_retries} retries): is the "
                "server running and --base-url right?"
            ) from None
        except openai.APIError as exc:
            raise AgentError(f"{where} sent an unusable response: {_describe(exc)}") from None
        except JSONDecodeError:
            raise AgentError(
                f"{where} answered with a body that is not JSON; is --base-url right?"
            ) from None


def resolve_api_key(api_key: str | None, base_url: str | None) -> str:
    """The key to send: the argument, else AUTORESEARCH_API_KEY, else OPENAI_API_KEY; a
    placeholder for a custom base_url (local servers need none)."""
    key = api_key or os.environ.get("AUTORESEARCH_API_KEY") or os.environ.get("OPENAI_API_KEY")
    if key:
        return key
    if base_url:
        return LOCAL_PLACEHOLDER_KEY
    raise AgentError(
        "No API key found - set OPENAI_API_KEY (or AUTORESEARCH_API_KEY), or pass --base-url "
        "for a local OpenAI-compatible server that needs none."
    )


def _reply_text(completion: ChatCompletion) -> tuple[str, str]:
    """(text, problem): problem is "" for a reply worth parsing, else what to tell the model."""
    if not completion.choices:
        return "", "The reply contained no message (no choices). Reply with the edit."
    choice = completion.choices[0]
    message = choice.message
    text = message.content or ""
    if message.refusal:
        return text, (
            f"You declined ({message.refusal}). This is a benign machine-learning experiment on "
            "a small language model: propose a change to train.py."
        )
    # Checked before the text is parsed: a cut-off reply may look whole (it may stop between
    # two blocks, or a whole file before its end), so no part of it is ever applied.
    if choice.finish_reason in _CUT_OFF:
        where = "while reasoning, before any answer" if not text.strip() else "before its end"
        return text, (
            f"Your reply was cut off at the output token limit {where}, so none of it was "
            "applied. Reply with a shorter edit: only the description line and short "
            "SEARCH/REPLACE blocks, no whole file and no explanation."
        )
    if choice.finish_reason == "content_filter":
        return text, (
            "Your reply was stopped by the endpoint's content filter, so none of it was applied. "
            "This is a benign machine-learning experiment: reply with the description line and "
            "SEARCH/REPLACE blocks for train.py."
        )
    if not text.strip():
        # Some servers return the reasoning in `reasoning_content`: it is never the answer.
        if (message.model_extra or {}).get("reasoning_content"):
            return text, (
                "Your reply held only reasoning and an empty answer. After reasoning, write the "
                "answer: the description line and SEARCH/REPLACE blocks."
            )
        return text, "The reply was empty. Reply with a description line and SEARCH/REPLACE blocks."
    return text, ""


# finish_reason values meaning the output limit was hit (OpenAI and vLLM say "length")
_CUT_OFF = ("length", "max_tokens")


def _earlier_description(replies: list[str]) -> str:
    """The description an earlier reply of this conversation gave, when the applied one gave
    none (a corrected reply often resends only the blocks); else a neutral placeholder."""
    return _last_description(replies[:-1]) or "edit of train.py (no description given)"


def _last_description(replies: list[str]) -> str | None:
    """The description of the latest reply that gave one, for the record."""
    for reply in reversed(replies):
        description = _description_of(reply)
        if description:
            return description
    return None


def _description_of(reply: str) -> str | None:
    """The description line of a reply that did not apply, for the record."""
    try:
        return parse_reply(reply).description
    except EditError:
        return None


def _correction(problem: str) -> str:
    return (
        f"Your edit could not be used:\n\n{problem}\n\nReply again with the complete edit: the "
        "one-line description first, then SEARCH/REPLACE blocks against the same train.py as "
        "before."
    )


def _join(replies: list[str]) -> str:
    if len(replies) == 1:
        return replies[0]
    return "\n\n".join(f"===== attempt {k} =====\n{r}" for k, r in enumerate(replies, 1))


def _endpoint_words(exc: openai.APIStatusError) -> str:
    """The endpoint's own error message (the body's `message`), else the client's summary."""
    body = exc.body.get("error", exc.body) if isinstance(exc.body, dict) else None
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return " ".join(body["message"].split())[:300]
    return _describe(exc)


def _describe(exc: openai.APIError) -> str:
    return " ".join(str(exc.message).split())[:300]


# ============================================================================ tuner

TUNER_SEED = "autoresearch-tuner"
BETA_MIN_GAP = 0.001  # betas and momenta stop at 0.999: closer to 1 only averages longer
_CONSTANT_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")
# Constants that do not change what is learned, that measure, or that point at things: never
# tuned (UNTIMED_STEPS-like constants would buy training time outside the budget).
_NOT_TUNED = re.compile(
    r"(^|_)(SEED|EVERY|LOG|INTERVAL|PRINT|VERBOSE|DEBUG|PATH|DIR|FILE|DTYPE|COMPILE|UNTIMED)"
    r"(_|$)|^DEVICE$"
)
_OOM = re.compile(r"out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED", re.IGNORECASE)
_WINDOW = re.compile(r"^[SL]+$")

Value = bool | int | float | str


@dataclass(frozen=True)
class Knob:
    """One tunable literal: a constant, or one element of a tuple constant (`NAME[i]`)."""

    name: str
    value: Value
    start: int  # character offsets of the literal in the source
    end: int
    text: str  # the literal as written
    pow2: bool = False  # written as 2**N


def find_knobs(source: str, preset: str | None = None) -> dict[str, Knob]:
    """The tunable literals among the module-level UPPERCASE constants, in source order.

    Tunable: int, float, bool, window-pattern strings (only S and L, e.g. "SSSL"), `2**N`, and
    tuples of numbers (one knob per element). A name assigned more than once at module level,
    negative numbers and other expressions are left alone. A source that does not parse has
    no knobs. With `preset`, constants that do nothing under it are left out too: see
    `preset_dead_names`.
    """
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return {}
    dead = preset_dead_names(tree, preset) if preset else set()
    offsets = _line_offsets(source)
    found: dict[str, list[Knob]] = {}
    counts: Counter[str] = Counter()
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
            target, value = stmt.targets[0], stmt.value
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
            target, value = stmt.target, stmt.value
        else:
            continue
        if not isinstance(target, ast.Name) or not _CONSTANT_NAME.match(target.id):
            continue
        counts[target.id] += 1
        if _NOT_TUNED.search(target.id) or target.id in dead:
            continue
        if isinstance(value, ast.Tuple):
            knobs = [
                _knob(f"{target.id}[{i}]", e, source, offsets) for i, e in enumerate(value.elts)
            ]
            if all(k is not None and not isinstance(k.value, (bool, str)) for k in knobs):
                found[target.id] = [k for k in knobs if k is not None]
        else:
            knob = _knob(target.id, value, source, offsets)
            if knob is not None:
                found[target.id] = [knob]
    return {k.name: k for name, ks in found.items() if counts[name] == 1 for k in ks}


def preset_dead_names(tree: ast.Module, preset: str) -> set[str]:
    """Constants that cannot change a run under `preset`, from module-level blocks
    `if PRESET == "name":` (either operand order): under that preset, the names the block
    assigns are overwritten, so their first values are dead; under any other preset, the names
    the block reads and nothing else at module level reads (e.g. CPU_DEPTH) are dead."""
    dead: set[str] = set()
    blocks = [stmt for stmt in tree.body if isinstance(stmt, ast.If)]
    for block in blocks:
        name = _preset_test(block.test)
        if name is None:
            continue
        inside = [n for stmt in block.body for n in ast.walk(stmt) if isinstance(n, ast.Name)]
        assigned = {n.id for n in inside if isinstance(n.ctx, ast.Store)}
        if name == preset:
            dead |= assigned
            continue
        read = {n.id for n in inside if isinstance(n.ctx, ast.Load)} - assigned
        outside = {
            n.id
            for stmt in tree.body
            if stmt is not block
            for n in ast.walk(stmt)
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
        }
        dead |= read - outside
    return dead


def _preset_test(test: ast.expr) -> str | None:
    """ "name" for a test `PRESET == "name"` or `"name" == PRESET`; None otherwise."""
    if not (
        isinstance(test, ast.Compare)
        and len(test.ops) == 1
        and isinstance(test.ops[0], ast.Eq)
        and len(test.comparators) == 1
    ):
        return None
    sides = (test.left, test.comparators[0])
    names = [s for s in sides if isinstance(s, ast.Name) and s.id == "PRESET"]
    values = [s.value for s in sides if isinstance(s, ast.Constant) and isinstance(s.value, str)]
    return values[0] if names and values else None


def _line_offsets(source: str) -> list[int]:
    offsets, total = [0], 0
    for line in source.splitlines(keepends=True):
        total += len(line)
        offsets.append(total)
    return offsets


def _char_offset(source: str, offsets: list[int], lineno: int, col_bytes: int) -> int:
    """ast columns count UTF-8 bytes; convert to a character offset in `source`."""
    line = source[offsets[lineno - 1] : offsets[lineno]]
    return offsets[lineno - 1] + len(line.encode("utf-8")[:col_bytes].decode("utf-8"))


def _knob(name: str, node: ast.expr, source: str, offsets: list[int]) -> Knob | None:
    value: Value
    pow2 = False
    if isinstance(node, ast.Constant) and isinstance(node.value, (bool, int, float, str)):
        value = node.value
        if isinstance(value, str) and not _WINDOW.match(value):
            return None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            return None
    elif (
        isinstance(node, ast.BinOp)
        and isinstance(node.op, ast.Pow)
        and isinstance(node.left, ast.Constant)
        and node.left.value == 2
        and isinstance(node.right, ast.Constant)
        and type(node.right.value) is int
        and 0 <= node.right.value < 64
    ):
        value, pow2 = 2**node.right.value, True
    else:
        return None
    assert node.end_lineno is not None and node.end_col_offset is not None
    start = _char_offset(source, offsets, node.lineno, node.col_offset)
    end = _char_offset(source, offsets, node.end_lineno, node.end_col_offset)
    return Knob(name, value, start, end, source[start:end], pow2)


def _values(source: str, preset: str | None) -> dict[str, Value] | None:
    """The knob values of a source (None when it has none); cached, every proposal reads the
    whole history."""
    items = _cached_values(source, preset)
    return dict(items) if items else None


@functools.lru_cache(maxsize=4096)
def _cached_values(source: str, preset: str | None) -> tuple[tuple[str, Value], ...]:
    return tuple((n, k.value) for n, k in find_knobs(source, preset).items())


def _config(values: dict[str, Value]) -> frozenset[tuple[str, str]]:
    # repr keeps 1, 1.0 and True apart
    return frozenset((n, repr(v)) for n, v in values.items())


def _round(x: float) -> float:
    return float(f"{x:.4g}")


def _l_fraction(pattern: str) -> float:
    return pattern.count("L") / len(pattern)


def knob_steps(knob: Knob, direction: int) -> list[Value]:
    """Candidate new values for `knob` in `direction` (+1 up, -1 down), best first.

    floats ×2 / ×1.5 up and ÷2 / ÷1.5 down (0.0 goes up to 0.1 or 0.05); names with RATIO or
    FRAC stay within [0, 1] and may go down to 0.0; names with BETA or MOMENTUM in (0, 1)
    step on 1 - value instead, staying ≤ 1 - BETA_MIN_GAP; ints ×2 and ÷2, staying ≥ 1; booleans flip; window patterns
    move one layer to L (up) or to S (down), or to the shorter "SL" / "L".
    """
    v, name = knob.value, knob.name
    if isinstance(v, bool):
        return [not v]
    if isinstance(v, str):
        return _pattern_steps(v, direction)
    if isinstance(v, int):
        if v <= 0:
            return [1] if direction > 0 else []
        return [v * 2] if direction > 0 else ([v // 2] if v // 2 >= 1 else [])
    if re.search(r"BETA|MOMENTUM", name):
        if not 0 < v < 1:
            return []
        gap = 1 - v
        gaps = [gap / 2, gap / 1.5] if direction > 0 else [gap * 2, gap * 1.5]
        # round the gap, not the value: 0.99995 must not become 1.0
        out: list[Value] = [float(f"{1 - _round(g):.12g}") for g in gaps if BETA_MIN_GAP <= g < 1]
    elif v == 0:
        out = [0.1, 0.05] if direction > 0 else []
    else:
        out = (
            [_round(v * 2), _round(v * 1.5)] if direction > 0 else [_round(v / 2), _round(v / 1.5)]
        )
        if re.search(r"RATIO|FRAC", name):
            out = [x for x in out if x <= 1] + ([0.0] if direction < 0 else [])
    return [x for x in out if x != v]


def _pattern_steps(p: str, direction: int) -> list[Value]:
    if direction > 0:
        i = p.rfind("S")
        out = [p[:i] + "L" + p[i + 1 :]] if i >= 0 else []
        out += [q for q in ("SL", "L") if _l_fraction(q) > _l_fraction(p)]
    else:
        i = p.find("L")
        out = [p[:i] + "S" + p[i + 1 :]] if i >= 0 and p.count("L") > 1 else []
        if p.endswith("L") and len(p) < 8:
            out.append("S" * (2 * len(p) - 1) + "L")
        out = [q for q in out if _l_fraction(q) < _l_fraction(p)]
    seen: list[Value] = []
    for q in out:
        if q != p and q not in seen:
            seen.append(q)
    return seen


def _direction(old: Value, new: Value) -> int:
    if isinstance(old, str) and isinstance(new, str):
        return 1 if _l_fraction(new) >= _l_fraction(old) else -1
    return 1 if new > old else -1  # type: ignore[operator]


def _literal(knob: Knob, value: Value) -> str:
    """`value` written the way `knob` was: same quotes, 2**N form, underscores."""
    if isinstance(value, bool):
        return repr(value)
    if isinstance(value, str):
        quote = knob.text[0] if knob.text[:1] in ("'", '"') else '"'
        return f"{quote}{value}{quote}"
    if isinstance(value, int):
        if knob.pow2 and value > 0 and value & (value - 1) == 0:
            return f"2**{value.bit_length() - 1}"
        return f"{value:_}" if "_" in knob.text else str(value)
    return repr(value)


def _rewrite(source: str, knob: Knob, value: Value) -> tuple[str, str]:
    """(new source, description) with `knob`'s literal replaced; comments untouched."""
    new_text = _literal(knob, value)
    new = source[: knob.start] + new_text + source[knob.end :]
    return new, f"{knob.name} {knob.text} -> {new_text}"[:DESCRIPTION_MAX_CHARS]


class TunerAgent:
    """Hyperparameter search without an LLM: one constant of train.py per experiment.

    Guarantees: never proposes a configuration (all knob values together) that any history
    source or the current train.py already has; deterministic for a given history; the result
    compiles and keeps every other byte of train.py. Strategy: after a keep, the same knob again
    in the same direction; after a discard or crash, the same knob the other way; otherwise the
    least-explored knob (floats first, then booleans and patterns, then integer sizes; ties in
    a seeded order), both directions in a seeded order. Raises AgentExhausted when
    no untried neighbour of the current best is left.
    """

    name = "tuner"
    model = "tuner"
    overlaps = False  # instant, and better with the latest result

    def propose(self, ctx: Context) -> Proposal:
        started = time.monotonic()
        knobs = find_knobs(ctx.train_py, ctx.preset)
        if not knobs:
            raise AgentExhausted(
                "the tuner found no UPPERCASE numeric constants in train.py to change; use an "
                "LLM agent (--model / --base-url)"
            )
        tried = _tried(ctx)
        current = {n: k.value for n, k in knobs.items()}
        moves, explored = _moves(ctx.history, ctx.preset)
        settled = [m for m in moves if m[2] != "running"]  # a run in flight has no result yet
        plan: list[tuple[str, int, bool]] = []  # (knob, direction, primary step only)
        if settled:
            name, direction, status = settled[-1]
            plan.append((name, direction if status == "keep" else -direction, True))
        rng = random.Random(f"{TUNER_SEED}:{len(ctx.history)}")
        names = list(knobs)
        rng.shuffle(names)
        names.sort(key=lambda n: (explored[n], _kind_rank(knobs[n].value)))
        for name in names:
            directions = [1, -1]
            rng.shuffle(directions)
            plan += [(name, d, False) for d in directions]
        for name, direction, primary in plan:
            if name not in knobs:
                continue
            steps = knob_steps(knobs[name], direction)
            for value in steps[:1] if primary else steps:
                if _config({**current, name: value}) in tried:
                    continue
                source, description = _rewrite(ctx.train_py, knobs[name], value)
                return self._proposal(description, source, started)
        raise AgentExhausted(
            "the tuner has tried every one-constant neighbour of the current best train.py"
        )

    def fix(self, ctx: Context, failed_source: str, crash_tail: str) -> Proposal:
        """Out of memory: halve the device batch size. Otherwise move the one changed knob
        halfway back toward the best's value. InvalidProposal when neither makes sense."""
        started = time.monotonic()
        best, failed = find_knobs(ctx.train_py, ctx.preset), find_knobs(failed_source, ctx.preset)
        tried = _tried(ctx)
        values = {n: k.value for n, k in failed.items()}
        if _OOM.search(crash_tail):
            batch = _batch_knob(failed)
            if batch is not None and isinstance(batch.value, int) and batch.value >= 2:
                value = batch.value // 2
                if _config({**values, batch.name: value}) not in tried:
                    source, description = _rewrite(failed_source, batch, value)
                    return self._proposal(description + " (out of memory)", source, started)
        changed = [n for n in failed if n in best and failed[n].value != best[n].value]
        if len(changed) == 1:
            name = changed[0]
            mid = _midpoint(best[name].value, failed[name].value)
            if mid is not None and _config({**values, name: mid}) not in tried:
                source, description = _rewrite(failed_source, failed[name], mid)
                return self._proposal(
                    description + " (halfway back after a crash)", source, started
                )
        raise InvalidProposal(
            "the tuner has no sensible repair for this crash (it changes one constant, and "
            "moving it back toward the best value gives nothing new)",
            model=self.model,
        )

    def _proposal(self, description: str, source: str, started: float) -> Proposal:
        check_compiles(source)  # a literal swapped for a literal: compiles by construction
        return _local_proposal(self, description, source, started, [], description)


def _kind_rank(value: Value) -> int:
    """Explore rates and ratios before switches and patterns, and sizes (which change the
    compute per step) last."""
    if isinstance(value, float):
        return 0
    return 1 if isinstance(value, (bool, str)) else 2


def _tried(ctx: Context) -> set[frozenset[tuple[str, str]]]:
    tried = set()
    for src in [ctx.train_py] + [h.source for h in ctx.history if h.source]:
        values = _values(src, ctx.preset)
        if values is not None:
            tried.add(_config(values))
    return tried


def _moves(
    history: list[HistoryEntry], preset: str | None
) -> tuple[list[tuple[str, int, str]], Counter[str]]:
    """Single-knob moves (knob, direction, status) relative to the best at the time, and how
    often each knob was changed at all."""
    moves: list[tuple[str, int, str]] = []
    explored: Counter[str] = Counter()
    parent: dict[str, Value] | None = None
    for h in history:
        values = _values(h.source, preset) if h.source else None
        if values is None:
            continue
        if parent is None:
            parent = values
            continue
        changed = [n for n in values if n in parent and values[n] != parent[n]]
        explored.update(changed)
        if len(changed) == 1:
            n = changed[0]
            moves.append((n, _direction(parent[n], values[n]), h.status))
        if h.status == "keep":
            parent = values
    return moves, explored


def _batch_knob(knobs: dict[str, Knob]) -> Knob | None:
    if "DEVICE_BATCH_SIZE" in knobs:
        return knobs["DEVICE_BATCH_SIZE"]
    return next((k for n, k in knobs.items() if "BATCH" in n and "TOTAL" not in n), None)


def _midpoint(best: Value, failed: Value) -> Value | None:
    """A value strictly between best and failed (geometric for positive floats), or None."""
    if isinstance(best, (bool, str)) or isinstance(failed, (bool, str)):
        return None
    if isinstance(best, int) and isinstance(failed, int):
        mid: Value = (best + failed) // 2
    elif best > 0 and failed > 0:
        mid = _round(math.sqrt(best * failed))
    else:
        mid = _round((best + failed) / 2)
    return mid if min(best, failed) < mid < max(best, failed) else None


# ============================================================================ replay


class ReplayAgent:
    """Applies prepared replies (files in the reply format), one per call, in name order.

    Hidden files are skipped. propose() and fix() each consume the next file; an invalid file
    raises InvalidProposal at once (no retries); when the files run out, AgentExhausted.
    """

    name = "replay"
    model = "replay"
    overlaps = False  # each reply was written against the best of its time

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

        Every experiment but the baseline consumed exactly one file, so a resumed session
        replays from where the record ends: an attempt killed before it was recorded gets
        its own file again.
        """
        self.position = max(self.position, len(ctx.history) - 1)

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
                description=_description_of(text),
                messages=messages,
                reply=text,
                model=self.model,
            ) from None
        return _local_proposal(self, description, source, started, messages, text)


def _local_proposal(
    agent: Agent,
    description: str,
    source: str,
    started: float,
    messages: list[dict],
    reply: str,
    rebased_from: str | None = None,
) -> Proposal:
    """A proposal made in one attempt without an LLM: no tokens, timed from `started`."""
    return Proposal(
        description=description,
        source=source,
        messages=messages,
        reply=reply,
        model=agent.model,
        attempts=1,
        tokens_in=0,
        tokens_out=0,
        seconds=time.monotonic() - started,
        agent=agent.name,
        rebased_from=rebased_from,
    )
