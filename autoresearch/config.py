"""Settings for a session, from flags, the environment, the workspace's pyproject.toml, defaults.

Precedence: command-line flag > environment variable (`AUTORESEARCH_<KEY>`) > the
`[tool.autoresearch]` table of `<workspace>/pyproject.toml` > built-in default. `resolve`
records where each value came from, for `autoresearch config` to show.

Guarantees: every value in a returned `Settings` has been checked for type and range; a bad
value or an unknown key in the config table raises `UsageError` (exit code 2) naming the key
and where it came from. Nothing is written.

Not handled here: the API key (the openai client reads its own environment variable, and a key
never belongs in a config file that may be committed).
"""

from __future__ import annotations

import copy
import difflib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from autoresearch.errors import AutoresearchError, UsageError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomli is the same parser under another name
    try:
        import tomli as tomllib  # type: ignore[no-redef]
    except ModuleNotFoundError:
        tomllib = None  # type: ignore[assignment]

CONFIG_FILE = "pyproject.toml"
CONFIG_TABLE = "[tool.autoresearch]"
ENV_PREFIX = "AUTORESEARCH_"

AGENTS = ("openai", "tuner", "replay")
PRESETS = ("auto", "gpu", "cpu")  # auto: gpu when CUDA is available, else cpu
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")

# key -> default. None means "no limit" for the max_* keys, "the client's default" for
# base_url, and "derived from the preset's time budget" for timeout.
DEFAULTS: dict[str, object] = {
    "agent": None,  # None: openai when a model or base_url is set, else the offline tuner
    "model": None,
    "base_url": None,
    "agent_timeout": 600.0,  # seconds one request to the endpoint may take (slow local models)
    "preset": "auto",
    "device": "auto",
    "max_experiments": None,  # experiments, baseline included
    "max_hours": None,  # hours of wall time for the whole session
    "max_cost": None,  # USD of agent tokens; needs a known price for the model
    "timeout": None,  # seconds before a training run is killed
    "stall_timeout": None,  # seconds without output before a training run is killed
    # seconds a run may take past TIME_BUDGET from its first step line to its exit;
    # None: max(30, 10 % of TIME_BUDGET)
    "budget_grace": None,
    # seconds a run may take from launch to its first step line (imports, data, compile);
    # None: 120
    "startup_limit": None,
    "fix_attempts": 1,  # times the agent may try to fix its own crashed edit
    "min_delta": 0.0,  # val_bpb a change must beat the best by to be kept
    "calibrate": None,  # baseline runs to measure noise; None: 3 on the gpu preset, 2 on cpu
    "max_repeats": None,  # most runs of a candidate; None: 6 on gpu, 2 on cpu
    "prices": {},  # model -> {"input": usd_per_1M, "output": usd_per_1M}
    "sealed": True,  # val_bpb from the sealed evaluator (False: from train.py's own output)
}


@dataclass(frozen=True)
class Settings:
    """Validated settings; `sources[key]` says where each value came from."""

    agent: str | None
    model: str | None
    base_url: str | None
    preset: str
    device: str
    max_experiments: int | None
    max_hours: float | None
    max_cost: float | None
    timeout: float | None
    stall_timeout: float | None
    fix_attempts: int
    min_delta: float
    calibrate: int | None
    max_repeats: int | None
    prices: dict[str, dict[str, float]]
    sealed: bool = True
    agent_timeout: float = 600.0
    budget_grace: float | None = None
    startup_limit: float | None = None
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def agent_name(self) -> str:
        """The agent to use: as set, else openai when an endpoint is configured, else tuner."""
        if self.agent:
            return self.agent
        return "openai" if (self.model or self.base_url) else "tuner"

    def rows(self) -> list[tuple[str, object, str]]:
        """(key, value, source) for every setting, in the order of DEFAULTS."""
        return [(key, getattr(self, key), self.sources[key]) for key in DEFAULTS]


# --- validation: each checker returns the clean value or raises ValueError with the reason


def _string(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a non-empty string")
    return value.strip()


def _choice(choices: tuple[str, ...]) -> Callable[[object], str]:
    def check(value: object) -> str:
        text = _string(value).lower()
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return text

    return check


def _device(value: object) -> str:
    text = _string(value).lower()
    if not _DEVICE.match(text):
        raise ValueError("expected auto, cpu, mps, cuda or cuda:N")
    return text


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _url(value: object) -> str:
    text = _string(value)
    if not text.startswith(("http://", "https://")):
        raise ValueError("expected a URL starting with http:// or https://")
    return text


def _number(value: object) -> float:
    if isinstance(value, bool):  # bool is an int; `max_hours = true` is a mistake
        raise ValueError("expected a number")
    if isinstance(value, str):
        value = value.strip()
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError("expected a number") from None
    if not math.isfinite(number):
        raise ValueError("expected a finite number")
    return number


def _integer(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError("expected a whole number")
    if isinstance(value, str):
        value = value.strip()
        if not re.fullmatch(r"[+-]?\d+", value):
            raise ValueError("expected a whole number")
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ValueError("expected a whole number")


def _at_least(
    check: Callable[[object], float], low: float, strict: bool = False
) -> Callable[[object], float]:
    def bounded(value: object) -> float:
        number = check(value)
        if number < low or (strict and number == low):
            raise ValueError(f"expected a number {'>' if strict else '>='} {low:g}")
        return number

    return bounded


def _prices(value: object) -> dict[str, dict[str, float]]:
    if not isinstance(value, Mapping):
        raise ValueError("expected a table of model = { input = USD, output = USD } per 1M tokens")
    table: dict[str, dict[str, float]] = {}
    for model, rates in value.items():
        if not isinstance(rates, Mapping) or set(rates) != {"input", "output"}:
            raise ValueError(f"model {model!r}: expected {{ input = USD, output = USD }}")
        try:
            table[str(model)] = {k: _at_least(_number, 0.0)(rates[k]) for k in ("input", "output")}
        except ValueError as e:
            raise ValueError(f"model {model!r}: {e}") from None
    return table


CHECKS: dict[str, Callable[[object], object]] = {
    "agent": _choice(AGENTS),
    "model": _string,
    "base_url": _url,
    "agent_timeout": _at_least(_number, 0.0, strict=True),
    "preset": _choice(PRESETS),
    "device": _device,
    "max_experiments": _at_least(_integer, 1),
    "max_hours": _at_least(_number, 0.0, strict=True),
    "max_cost": _at_least(_number, 0.0),
    "timeout": _at_least(_number, 0.0, strict=True),
    "stall_timeout": _at_least(_number, 0.0, strict=True),
    "budget_grace": _at_least(_number, 0.0),
    "startup_limit": _at_least(_number, 0.0, strict=True),
    "fix_attempts": _at_least(_integer, 0),
    "min_delta": _at_least(_number, 0.0),
    "calibrate": _at_least(_integer, 1),
    "max_repeats": _at_least(_integer, 1),
    "prices": _prices,
    "sealed": _boolean,
}
# Settings that make no sense in one environment variable.
NOT_FROM_ENV = frozenset({"prices"})


def env_name(key: str) -> str:
    """The environment variable for a setting: `max_cost` -> `AUTORESEARCH_MAX_COST`."""
    return ENV_PREFIX + key.upper()


def flag_name(key: str) -> str:
    """The command-line option for a setting: `max_cost` -> `--max-cost`."""
    return "--" + key.replace("_", "-")


def read_config(workspace: Path) -> dict[str, object]:
    """The `[tool.autoresearch]` table of `<workspace>/pyproject.toml`; {} when there is none.

    Raises UsageError for invalid TOML, a table that is not a table, or an unknown key;
    AutoresearchError on Python 3.10 without tomli when the file has a table to read.
    """
    path = workspace / CONFIG_FILE
    if not path.is_file():
        return {}
    text = path.read_text(encoding="utf-8")
    if tomllib is None:
        if "tool.autoresearch" in text:
            raise AutoresearchError(
                f"{path} has {CONFIG_TABLE} but this Python cannot read TOML - "
                "install tomli (pip install tomli) or use Python 3.11+"
            )
        return {}
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path} is not valid TOML: {e} - fix the file and retry") from None
    table = document.get("tool", {}).get("autoresearch", {})
    if not isinstance(table, dict):
        raise UsageError(f"{path}: tool.autoresearch must be a table like {CONFIG_TABLE}")
    for key in table:
        if key not in DEFAULTS:
            raise UsageError(f"{path} {CONFIG_TABLE}: unknown key {key!r}{_suggest(key)}")
    return table


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key.replace("-", "_"), list(DEFAULTS), n=1)
    known = ", ".join(DEFAULTS)
    return f" - did you mean {close[0]!r}?" if close else f" - known keys: {known}"


def resolve(
    flags: Mapping[str, object | None], workspace: Path, env: Mapping[str, str]
) -> Settings:
    """Settings from flags > env > config > defaults, each validated, with its source.

    `flags` maps setting keys to values from the command line; None means "not given".
    An empty environment variable counts as unset. Raises UsageError (exit code 2) naming the
    key and its source for a bad value or an unknown config key. A key in `flags` that is
    not a setting is a programming error (ValueError).
    """
    unknown = set(flags) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"not settings: {', '.join(sorted(unknown))}")
    config = read_config(workspace)
    config_source = f"{CONFIG_FILE} {CONFIG_TABLE}"
    values: dict[str, object] = {}
    sources: dict[str, str] = {}
    for key, default in DEFAULTS.items():
        raw_env = None if key in NOT_FROM_ENV else env.get(env_name(key))
        if flags.get(key) is not None:
            raw, source = flags[key], f"flag {flag_name(key)}"
        elif raw_env is not None and raw_env.strip():
            raw, source = raw_env, f"env {env_name(key)}"
        elif key in config:
            raw, source = config[key], config_source
        else:
            values[key], sources[key] = copy.deepcopy(default), "default"
            continue
        try:
            values[key] = CHECKS[key](raw)
        except ValueError as e:
            raise UsageError(f"{key} = {raw!r} from {source}: {e}") from None
        sources[key] = source
    return Settings(**values, sources=sources)  # type: ignore[arg-type]
