"""What the agent's tokens cost, in US dollars.

Guarantees: `cost_usd` never raises for an unknown model; it returns None, so a report can say
"cost unknown" instead of a wrong number. Model names are matched case-insensitively and
tolerate provider prefixes (`openai/gpt-4o`, `anthropic/claude-sonnet-4`), dated snapshots
(`gpt-4o-2024-08-06`, `claude-3-5-sonnet-20241022`), `-latest`, and OpenRouter variants
(`:nitro`; `:free` costs nothing).

Not guaranteed: that the built-in prices are current. Providers change them; these are list
prices as last checked by hand. `[tool.autoresearch.prices]` in the workspace's pyproject.toml
(passed here as `overrides`) always wins over this table.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

# USD per 1M tokens: (input, output). List prices, uncached, standard tier. Prices change;
# a config override (`[tool.autoresearch.prices]`) is the way to correct one without a release.
PRICES: dict[str, tuple[float, float]] = {
    # OpenAI
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "o1": (15.00, 60.00),
    "o3": (2.00, 8.00),
    "o3-mini": (1.10, 4.40),
    "o4-mini": (1.10, 4.40),
    "gpt-5": (1.25, 10.00),
    "gpt-5-mini": (0.25, 2.00),
    "gpt-5-nano": (0.05, 0.40),
    # Anthropic (also the OpenRouter names after the `anthropic/` prefix)
    "claude-3.5-haiku": (0.80, 4.00),
    "claude-haiku-4.5": (1.00, 5.00),
    "claude-3.5-sonnet": (3.00, 15.00),
    "claude-3.7-sonnet": (3.00, 15.00),
    "claude-sonnet-4": (3.00, 15.00),
    "claude-sonnet-4.5": (3.00, 15.00),
    "claude-opus-4": (15.00, 75.00),
    "claude-opus-4.1": (15.00, 75.00),
    "claude-opus-4.5": (5.00, 25.00),
    # Google
    "gemini-2.5-pro": (1.25, 10.00),
    "gemini-2.5-flash": (0.30, 2.50),
    # DeepSeek (direct API names and OpenRouter's)
    "deepseek-chat": (0.27, 1.10),
    "deepseek-v3": (0.27, 1.10),
    "deepseek-reasoner": (0.55, 2.19),
    "deepseek-r1": (0.55, 2.19),
    # A model served on this machine (Ollama, llama.cpp, vLLM) costs no tokens.
    "local": (0.0, 0.0),
}

# Provider prefixes that mean "served locally": every model behind them is free.
LOCAL_PROVIDERS = ("local", "ollama", "lmstudio", "llamacpp", "vllm")

_DATE_SUFFIX = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8})$")  # gpt-4o-2024-08-06, ...-20241022
_HYPHENATED_VERSION = re.compile(r"(?<=\d)-(?=\d(?:\D|$))")  # claude-3-5-sonnet -> 3.5


def normalize(model: str) -> str:
    """The table key for a model name: lower case, no provider prefix, variant, date or -latest.

    `anthropic/claude-3-5-sonnet-20241022:beta` -> `claude-3.5-sonnet`.
    """
    name = model.strip().lower()
    name = name.rsplit("/", 1)[-1]
    name = name.split(":", 1)[0]
    name = name.removesuffix("-latest")
    name = _DATE_SUFFIX.sub("", name)
    return _HYPHENATED_VERSION.sub(".", name)


def price(
    model: str, overrides: Mapping[str, Mapping[str, float]] | None = None
) -> tuple[float, float] | None:
    """USD per 1M (input, output) tokens for `model`, or None when it is not known.

    An override matches by its exact (case-insensitive) name first, then by the plain
    normalized name, then by any name that normalizes the same (first in the table wins);
    so `{"openai/gpt-4o": ...}` and `{"gpt-4o": ...}` both apply to `openai/gpt-4o`.
    """
    rates = _override(model, overrides or {})
    if rates is not None:
        return float(rates["input"]), float(rates["output"])
    lowered = model.strip().lower()
    if lowered.endswith(":free") or lowered.split("/", 1)[0] in LOCAL_PROVIDERS:
        return 0.0, 0.0
    return PRICES.get(normalize(model))


def _override(
    model: str, overrides: Mapping[str, Mapping[str, float]]
) -> Mapping[str, float] | None:
    by_name = {name.strip().lower(): rates for name, rates in overrides.items()}
    key = normalize(model)
    for candidate in (model.strip().lower(), key):
        if candidate in by_name:
            return by_name[candidate]
    return next((rates for name, rates in by_name.items() if normalize(name) == key), None)


def cost_usd(
    model: str | None,
    tokens_in: int,
    tokens_out: int,
    overrides: Mapping[str, Mapping[str, float]] | None = None,
) -> float | None:
    """Dollars spent on `tokens_in` prompt and `tokens_out` completion tokens of `model`.

    None when the model is unknown (or None): the caller should show "unknown", not $0.
    `overrides` maps model name -> {"input": usd_per_1M, "output": usd_per_1M}.
    """
    if model is None:
        return None
    rates = price(model, overrides)
    if rates is None:
        return None
    rate_in, rate_out = rates
    return (tokens_in * rate_in + tokens_out * rate_out) / 1_000_000
