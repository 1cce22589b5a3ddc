"""Proposal agents: given the research context, return the next complete train.py.

Every agent follows one protocol (`base.Agent`): `propose(ctx)` for a new experiment and
`fix(ctx, failed_source, crash_tail)` to repair a candidate that crashed. The package:

- `base.py`: the data (Context, HistoryEntry, Proposal), the errors, the protocol and the
  registry. A class that subclasses `RegisteredAgent` with its own `name` is an `--agent`
  choice; `agent_names()` and `make_agent` read the registry, so no list of names exists.
- `prompts.py`: what an LLM is told, as data.
- `conversation.py`: `ChatAgent`, the one conversation loop over an abstract `complete`.
- `endpoint.py`: `OpenAIAgent` (`openai`), the transport to any OpenAI-compatible endpoint.
- `tuner.py`: `TunerAgent` (`tuner`), no LLM: one UPPERCASE constant per experiment.
- `replay.py`: `ReplayAgent` (`replay`), prepared replies from a directory.
Importing the package imports every module in it, so a built-in agent is one module file here:
defining its class registers it, with no import line or list of names to add.
(`external.py`'s ExternalAgent, the one proposal of `autoresearch try`, follows the protocol
but is not a choice of `run`.)

Guarantees: a returned Proposal's `source` is the complete new train.py, differs from the
text it was derived from, and compiles. Failure is always one of the AgentError family:
`InvalidProposal` (no valid edit this time: the loop records `invalid`), `AgentExhausted`
(nothing more to propose: end the session), or plain `AgentError` (endpoint unusable after the
client's retries: the loop decides whether to wait). The API key is never put in a message,
a record or an error.
"""

import importlib
import pkgutil

from .base import (
    Agent,
    AgentExhausted,
    AgentOptions,
    Context,
    EndpointError,
    HistoryEntry,
    InvalidProposal,
    Proposal,
    RegisteredAgent,
    _local_proposal,
    agent_class,
    agent_names,
    check_endpoint,
    make_agent,
    register,
    unregister,
)
from .conversation import MAX_ATTEMPTS, ChatAgent, Completion, ContextTooLong
from .endpoint import CHECK_TIMEOUT_S, CLIENT_MAX_RETRIES, OpenAIAgent, resolve_api_key
from .prompts import (
    EDIT_RULES,
    HISTORY_RECENT,
    PROMPT_LEVELS,
    build_fix_messages,
    build_messages,
    history_table,
    system_message,
)
from .replay import ReplayAgent
from .tuner import Knob, TunerAgent, find_knobs, knob_steps, preset_dead_names


def _import_every_module() -> None:
    """Import every other module of the package too, in name order: a built-in agent added as
    a module here is defined (so registered) with the package, without an import line in this
    file. Each is cheap to import: endpoint.py imports the openai SDK only when an agent is
    made, so the CLI's start-up does not pay for it."""
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")


_import_every_module()

__all__ = [
    "CHECK_TIMEOUT_S",
    "CLIENT_MAX_RETRIES",
    "EDIT_RULES",
    "HISTORY_RECENT",
    "MAX_ATTEMPTS",
    "PROMPT_LEVELS",
    "Agent",
    "AgentExhausted",
    "AgentOptions",
    "ChatAgent",
    "Completion",
    "Context",
    "ContextTooLong",
    "EndpointError",
    "HistoryEntry",
    "InvalidProposal",
    "Knob",
    "OpenAIAgent",
    "Proposal",
    "RegisteredAgent",
    "ReplayAgent",
    "TunerAgent",
    "_local_proposal",
    "agent_class",
    "agent_names",
    "build_fix_messages",
    "build_messages",
    "check_endpoint",
    "find_knobs",
    "history_table",
    "knob_steps",
    "make_agent",
    "preset_dead_names",
    "register",
    "resolve_api_key",
    "system_message",
    "unregister",
]
