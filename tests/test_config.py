"""Settings: precedence flags > environment > pyproject.toml > defaults, sources, validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from autoresearch import config
from autoresearch.agent import agent_names
from autoresearch.config import DEFAULTS, Settings, resolve
from autoresearch.errors import UsageError

PYPROJECT = """\
[project]
name = "my-research"

[tool.autoresearch]
model = "gpt-4.1"
max_experiments = 50
max_hours = 8
min_delta = 0.001

[tool.autoresearch.prices]
"my-model" = { input = 0.5, output = 1.5 }
"""


def workspace(tmp_path: Path, text: str = PYPROJECT) -> Path:
    (tmp_path / "pyproject.toml").write_text(text)
    return tmp_path


def test_defaults_without_pyproject(tmp_path: Path):
    settings = resolve({}, tmp_path, env={})
    assert isinstance(settings, Settings)
    for key, value in DEFAULTS.items():
        assert getattr(settings, key) == value
        assert settings.sources[key] == "default"


def test_config_values_and_their_source(tmp_path: Path):
    settings = resolve({}, workspace(tmp_path), env={})
    assert settings.model == "gpt-4.1"
    assert settings.max_experiments == 50
    assert settings.max_hours == 8.0 and isinstance(settings.max_hours, float)
    assert settings.prices == {"my-model": {"input": 0.5, "output": 1.5}}
    assert settings.sources["model"] == "pyproject.toml [tool.autoresearch]"
    assert settings.sources["agent"] == "default"


def test_precedence_flag_over_env_over_config_over_default(tmp_path: Path):
    ws = workspace(tmp_path)
    env = {"AUTORESEARCH_MODEL": "gpt-4o", "AUTORESEARCH_MAX_EXPERIMENTS": "7"}
    flags = {"model": "o3", "max_experiments": None, "max_hours": None}
    settings = resolve(flags, ws, env)
    assert (settings.model, settings.sources["model"]) == ("o3", "flag --model")
    assert settings.max_experiments == 7
    assert settings.sources["max_experiments"] == "env AUTORESEARCH_MAX_EXPERIMENTS"
    assert settings.sources["max_hours"] == "pyproject.toml [tool.autoresearch]"
    assert settings.sources["fix_attempts"] == "default"


def test_empty_environment_variable_counts_as_unset(tmp_path: Path):
    settings = resolve({}, workspace(tmp_path), {"AUTORESEARCH_MODEL": "  "})
    assert settings.sources["model"] == "pyproject.toml [tool.autoresearch]"


def test_env_values_are_parsed(tmp_path: Path):
    env = {
        "AUTORESEARCH_AGENT": "Tuner",
        "AUTORESEARCH_BASE_URL": "http://localhost:11434/v1",
        "AUTORESEARCH_PRESET": "cpu",
        "AUTORESEARCH_DEVICE": "cuda:1",
        "AUTORESEARCH_MAX_COST": "2.5",
        "AUTORESEARCH_TIMEOUT": "900",
        "AUTORESEARCH_FIX_ATTEMPTS": "0",
        "AUTORESEARCH_MIN_DELTA": "1e-3",
    }
    s = resolve({}, tmp_path, env)
    assert (s.agent, s.base_url, s.preset, s.device) == (
        "tuner",
        "http://localhost:11434/v1",
        "cpu",
        "cuda:1",
    )
    assert (s.max_cost, s.timeout, s.fix_attempts, s.min_delta) == (2.5, 900.0, 0, 0.001)


def test_rows_for_the_config_table(tmp_path: Path):
    rows = resolve({"agent": "replay"}, workspace(tmp_path), env={}).rows()
    assert [key for key, _, _ in rows] == list(DEFAULTS)
    assert ("agent", "replay", "flag --agent") in rows


@pytest.mark.parametrize(
    ("flags", "env", "words"),
    [
        ({"agent": "gpt"}, {}, ["agent", "flag --agent", ", ".join(agent_names())]),
        ({}, {"AUTORESEARCH_MAX_EXPERIMENTS": "ten"}, ["max_experiments", "AUTORESEARCH_MAX_"]),
        ({}, {"AUTORESEARCH_MAX_EXPERIMENTS": "0"}, ["max_experiments", ">= 1"]),
        ({}, {"AUTORESEARCH_MAX_HOURS": "0"}, ["max_hours", "> 0"]),
        ({}, {"AUTORESEARCH_MAX_COST": "-1"}, ["max_cost", ">= 0"]),
        ({}, {"AUTORESEARCH_TIMEOUT": "nan"}, ["timeout", "finite"]),
        ({"fix_attempts": 1.5}, {}, ["fix_attempts", "whole number"]),
        ({"base_url": "localhost:8000"}, {}, ["base_url", "http://"]),
        ({"device": "tpu"}, {}, ["device", "cuda:N"]),
        ({"preset": "huge"}, {}, ["preset", "auto, gpu, cpu"]),
    ],
)
def test_bad_values_are_usage_errors_naming_key_and_source(tmp_path, flags, env, words):
    with pytest.raises(UsageError) as caught:
        resolve(flags, tmp_path, env)
    assert caught.value.exit_code == 2
    for word in words:
        assert word in str(caught.value)


@pytest.mark.parametrize(
    ("table", "words"),
    [
        ("max_experiments = true", ["max_experiments", "pyproject.toml", "whole number"]),
        ('max_hours = "eight"', ["max_hours", "expected a number"]),
        ("model = 4", ["model", "non-empty string"]),
        ("prices = 3", ["prices", "table"]),
        ('prices = { "m" = { input = 1 } }', ["prices", "'m'"]),
        ('prices = { "m" = { input = 1, output = -2 } }', ["prices", "'m'", ">= 0"]),
    ],
)
def test_bad_config_values(tmp_path: Path, table: str, words: list[str]):
    ws = workspace(tmp_path, f"[tool.autoresearch]\n{table}\n")
    with pytest.raises(UsageError) as caught:
        resolve({}, ws, env={})
    for word in words:
        assert word in str(caught.value)


def test_unknown_config_key_is_named_with_a_suggestion(tmp_path: Path):
    ws = workspace(tmp_path, "[tool.autoresearch]\nmax_experiment = 3\n")
    with pytest.raises(UsageError, match="unknown key 'max_experiment'.*'max_experiments'"):
        resolve({}, ws, env={})
    ws = workspace(tmp_path, "[tool.autoresearch]\nbanana = 3\n")
    with pytest.raises(UsageError, match="unknown key 'banana'.*known keys: agent"):
        resolve({}, ws, env={})


def test_invalid_toml_is_a_usage_error(tmp_path: Path):
    ws = workspace(tmp_path, "[tool.autoresearch\nmodel = \n")
    with pytest.raises(UsageError, match="not valid TOML"):
        resolve({}, ws, env={})


def test_pyproject_without_our_table_is_fine(tmp_path: Path):
    ws = workspace(tmp_path, '[project]\nname = "x"\n')
    assert resolve({}, ws, env={}).sources["model"] == "default"


def test_flag_overrides_a_bad_config_value_without_reading_it(tmp_path: Path):
    """A bad value that is overridden is never used, so it does not stop the run."""
    ws = workspace(tmp_path, '[tool.autoresearch]\nmax_hours = "eight"\n')
    assert resolve({"max_hours": 2}, ws, env={}).max_hours == 2.0


def test_prices_are_not_shared_between_calls(tmp_path: Path):
    first = resolve({}, tmp_path, env={})
    first.prices["x"] = {"input": 1.0, "output": 1.0}
    assert resolve({}, tmp_path, env={}).prices == {}


def test_unknown_flag_is_a_programming_error(tmp_path: Path):
    with pytest.raises(ValueError, match="not settings: colour"):
        resolve({"colour": "red"}, tmp_path, env={})


def test_names():
    assert config.env_name("max_cost") == "AUTORESEARCH_MAX_COST"
    assert config.flag_name("max_cost") == "--max-cost"
