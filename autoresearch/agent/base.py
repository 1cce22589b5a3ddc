"""What every proposal agent shares: the data it reads and returns, its errors, the protocol,
and the registry that `run --agent` chooses from.

An agent class is registered by subclassing `RegisteredAgent` with its own `name`: that name
is then a choice of `--agent`, a valid `agent` setting and an entry of `agent_names()`, with
no list to edit anywhere else. `make_agent` builds one through its class's `create`.

Guarantees: a name is registered once (a second class with the same name is a programming
error); `make_agent` raises UsageError for an unknown name or arguments the agent cannot use.
Not here: how an agent talks to a model (conversation.py, endpoint.py) or what it shows it
(prompts.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

from ..errors import AgentError, AutoresearchError, UsageError
from ..settings import BY_KEY

# seconds one request to an endpoint may take (the `agent_timeout` setting's default)
AGENT_TIMEOUT_S: float = BY_KEY["agent_timeout"].default  # type: ignore[assignment]

# ============================================================================ data types


@dataclass
class HistoryEntry:
    """One past experiment, oldest first."""

    id: int
    status: str  # a Status: keep | discard | crash | invalid | interrupted | rejected | running
    val_bpb: float | None
    delta: float | None  # val_bpb minus the best at the time (negative = better)
    description: str
    source: str | None = None  # train.py of that attempt (None if invalid)
    # the keep rule's label as it judged it (noise.Verdict.label); None: judged without one
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
    agent: str  # the agent's registered name (or `external` for `try`)
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


# ============================================================================ the protocol


class Agent(Protocol):
    name: str
    # True when proposing takes long enough to be worth doing while a run trains (an LLM);
    # the loop then asks for the next proposal during training, against the best so far.
    overlaps: bool

    def propose(self, ctx: Context) -> Proposal: ...

    def fix(self, ctx: Context, failed_source: str, crash_tail: str) -> Proposal: ...


@dataclass(frozen=True)
class AgentOptions:
    """What the command line and the config give an agent to be built with; each agent's
    `create` takes what it uses and refuses what it needs and lacks."""

    model: str | None = None
    base_url: str | None = None
    patches_dir: Path | None = None
    api_key: str | None = None
    timeout: float = AGENT_TIMEOUT_S  # seconds one request to an endpoint may take


# ============================================================================ the registry

_REGISTRY: dict[str, type[RegisteredAgent]] = {}


class RegisteredAgent:
    """Base of the agents `run --agent` can name. A subclass that sets its own `name` is
    registered under it when the class is defined."""

    name: ClassVar[str]
    model: str | None = None  # the model named in the record
    overlaps: ClassVar[bool] = False
    # one line for `--help` and the docs: what it is and what it needs
    summary: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:  # a subclass that keeps its parent's name is not another
            register(cls)

    @classmethod
    def create(cls, options: AgentOptions) -> RegisteredAgent:
        """Build the agent from the session's options; UsageError for what it cannot use."""
        return cls()

    def propose(self, ctx: Context) -> Proposal:
        raise NotImplementedError

    def fix(self, ctx: Context, failed_source: str, crash_tail: str) -> Proposal:
        raise NotImplementedError


def agent_names() -> tuple[str, ...]:
    """The registered agents' names, in the order they were defined. The built-in agents are
    defined when the package is imported (its __init__ imports their modules), which
    importing this module implies."""
    return tuple(_REGISTRY)


def agent_class(name: str) -> type[RegisteredAgent]:
    """The class registered as `name`; UsageError naming the choices for any other."""
    if name not in _REGISTRY:
        raise UsageError(f"unknown agent {name!r}: choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def register(cls: type[RegisteredAgent]) -> None:
    """Register `cls` under its `name` (defining a subclass does this); again after
    `unregister`, for tests."""
    known = _REGISTRY.get(cls.name)
    if known is not None and known.__qualname__ != cls.__qualname__:
        raise TypeError(f"agent name {cls.name!r} is taken by {known.__qualname__}")
    _REGISTRY[cls.name] = cls


def unregister(name: str) -> None:
    """Forget an agent (for tests that define one)."""
    _REGISTRY.pop(name, None)


def make_agent(
    name: str,
    *,
    model: str | None = None,
    base_url: str | None = None,
    patches_dir: Path | None = None,
    api_key: str | None = None,
    timeout: float = AGENT_TIMEOUT_S,
) -> Agent:
    """Build the registered agent `name`; UsageError for an unknown name or bad arguments."""
    options = AgentOptions(model, base_url, patches_dir, api_key, timeout)
    return agent_class(name).create(options)  # type: ignore[return-value]


def check_endpoint(agent: Agent) -> None:
    """Before any GPU time is spent: the agent's `check()` where it has one (an agent behind
    an endpoint); offline agents (tuner, replay) need none. Raises EndpointError."""
    check = getattr(agent, "check", None)
    if check is not None:
        check()


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
        model=agent.model,  # type: ignore[attr-defined]
        attempts=1,
        tokens_in=0,
        tokens_out=0,
        seconds=time.monotonic() - started,
        agent=agent.name,
        rebased_from=rebased_from,
    )
