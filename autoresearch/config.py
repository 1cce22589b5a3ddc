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
from collections.abc import Callable, Mapping
from pathlib import Path

from autoresearch.errors import AutoresearchError, UsageError
from autoresearch.settings import BY_KEY, ENV_PREFIX, SETTINGS  # noqa: F401 - ENV_PREFIX re-exported

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomli is the same parser under another name
    try:
        import tomli as tomllib  # type: ignore[no-redef]
    except ModuleNotFoundError:
        tomllib = None  # type: ignore[assignment]

CONFIG_FILE = "pyproject.toml"
CONFIG_TABLE = "[tool.autoresearch]"

# key -> built-in default, for the keys the config file and the environment accept; the
# defaults, checks and help live in settings.SETTINGS (None: see each setting's help there).
DEFAULTS: dict[str, object] = {s.key: s.default for s in SETTINGS if s.config}
CHECKS: dict[str, Callable[[object], object]] = {
    s.key: s.check for s in SETTINGS if s.config and s.check is not None
}
# Settings that make no sense in one environment variable.
NOT_FROM_ENV = frozenset(s.key for s in SETTINGS if s.config and not s.env)


class Settings:
    """Validated settings, one attribute per key of DEFAULTS; `sources[key]` says where each
    value came from."""

    def __init__(self, values: Mapping[str, object], sources: Mapping[str, str]) -> None:
        missing = set(DEFAULTS) - set(values)
        if missing:
            raise ValueError(f"settings without a value: {', '.join(sorted(missing))}")
        self._values = dict(values)
        self.sources = dict(sources)

    def __getattr__(self, key: str) -> object:
        values = self.__dict__.get("_values", {})
        if key not in values:
            raise AttributeError(key)
        return values[key]

    def __repr__(self) -> str:
        return f"Settings({self._values!r})"

    @property
    def agent_name(self) -> str:
        """The agent to use: as set, else openai when an endpoint is configured, else tuner."""
        if self.agent:
            return str(self.agent)
        return "openai" if (self.model or self.base_url) else "tuner"

    def rows(self) -> list[tuple[str, object, str]]:
        """(key, value, source) for every setting, in the order of DEFAULTS."""
        return [(key, self._values[key], self.sources[key]) for key in DEFAULTS]


def env_name(key: str) -> str:
    """The environment variable for a setting: `max_cost` -> `AUTORESEARCH_MAX_COST`."""
    return BY_KEY[key].env_name


def flag_name(key: str) -> str:
    """The command-line option for a setting: `max_cost` -> `--max-cost`."""
    return BY_KEY[key].flag_name


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
    return Settings(values, sources)
