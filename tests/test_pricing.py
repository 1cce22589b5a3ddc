"""Token prices: name matching, overrides, unknown models."""

from __future__ import annotations

import pytest

from autoresearch.pricing import PRICES, cost_usd, normalize, price


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("gpt-4o", "gpt-4o"),
        ("openai/gpt-4o", "gpt-4o"),
        ("OpenAI/GPT-4o-mini", "gpt-4o-mini"),
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("anthropic/claude-3-5-sonnet-20241022", "claude-3.5-sonnet"),
        ("claude-sonnet-4-5", "claude-sonnet-4.5"),
        ("anthropic/claude-sonnet-4.5", "claude-sonnet-4.5"),
        ("claude-opus-4-1-20250805", "claude-opus-4.1"),
        ("claude-3-5-haiku-latest", "claude-3.5-haiku"),
        ("deepseek/deepseek-chat:nitro", "deepseek-chat"),
        ("gpt-4.1-mini", "gpt-4.1-mini"),
        ("o4-mini", "o4-mini"),
        ("qwen2.5-72b-instruct", "qwen2.5-72b-instruct"),  # no false "version" rewrite
    ],
)
def test_normalize(name: str, key: str):
    assert normalize(name) == key


def test_every_table_key_is_already_normalized():
    assert all(normalize(key) == key for key in PRICES)


def test_known_model_cost():
    # gpt-4o: $2.50 in, $10.00 out per 1M tokens
    assert cost_usd("openai/gpt-4o", 1_000_000, 100_000) == pytest.approx(3.50)
    assert cost_usd("gpt-4o-mini", 0, 0) == 0.0


def test_unknown_model_is_none_not_zero():
    assert cost_usd("my-finetune-v7", 1000, 1000) is None
    assert cost_usd(None, 1000, 1000) is None
    assert price("gpt-4o-audio-preview") is None  # no guessing from a prefix


def test_local_and_free_models_cost_nothing():
    assert cost_usd("local", 10**6, 10**6) == 0.0
    assert cost_usd("ollama/llama3.1:8b", 10**6, 10**6) == 0.0
    assert cost_usd("meta-llama/llama-3.3-70b-instruct:free", 10**6, 10**6) == 0.0


def test_overrides_win_and_match_tolerantly():
    overrides = {"gpt-4o": {"input": 1.0, "output": 2.0}}
    assert cost_usd("openai/gpt-4o", 1_000_000, 1_000_000, overrides) == pytest.approx(3.0)
    custom = {"my-finetune-v7": {"input": 0.5, "output": 0.5}}
    assert cost_usd("my-finetune-v7", 2_000_000, 0, custom) == pytest.approx(1.0)


def test_exact_override_beats_normalized_override():
    overrides = {
        "gpt-4o": {"input": 1.0, "output": 1.0},
        "azure/gpt-4o": {"input": 9.0, "output": 9.0},
    }
    assert price("azure/gpt-4o", overrides) == (9.0, 9.0)
    assert price("openai/gpt-4o", overrides) == (1.0, 1.0)
