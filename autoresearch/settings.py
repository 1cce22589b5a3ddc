"""The settings of `autoresearch run`, each defined once: `SETTINGS`.

One `Setting` holds everything about a setting: its name, type, built-in default, help text,
help panel, whether the config file and the environment may set it, and which
`SessionOptions` field it fills. From this table come the `run` command's options (cli.py),
the keys `[tool.autoresearch]` and `AUTORESEARCH_<KEY>` accept (config.py) and the
`SessionOptions` a session is built with (commands.session_options). Adding a setting is one
entry here (plus the field in options.py when it is new to the session).

Guarantees: every value a check returns has been validated for type and range (a check
raises ValueError with the reason); the table is the only place a setting's default is
written, and a test holds the CLI, the config and SessionOptions to it. Not here: the API key
(never a setting), or what a setting does.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from .noise import PAIR_WINDOW

# Help panels of `run`, in the order they are shown.
AGENT_PANEL = "The agent"
LIMITS_PANEL = "When the session ends"
HARDWARE_PANEL = "Hardware"
RUN_PANEL = "Each training run"
KEEP_PANEL = "The keep rule"


class Preset(str, Enum):
    auto = "auto"  # gpu when CUDA is available, else cpu
    gpu = "gpu"
    cpu = "cpu"


class Backend(str, Enum):
    local = "local"  # slots on this host (coordinator.py)
    ray = "ray"  # each slot a Ray actor holding one card of a cluster (rayslot.py)


# --- validation: each check returns the clean value or raises ValueError with the reason


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


def _agent(value: object) -> str:
    from .agent import agent_names  # the registry: each agent class names itself

    return _choice(agent_names())(value)


_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


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


# --- preset-dependent defaults: the one rule, for the CLI's sessions and SessionOptions alike


def calibrate_for(preset: str) -> int:
    """Runs of the baseline that measure the noise: 3 on the gpu preset, 2 on cpu."""
    return 3 if preset == "gpu" else 2


def max_repeats_for(preset: str) -> int:
    """Most runs of a candidate the keep rule may ask for: 6 on gpu, 2 on cpu."""
    return 6 if preset == "gpu" else 2


# --- the table

ENV_PREFIX = "AUTORESEARCH_"  # a setting's environment variable is this plus its key, upper case
SAME = "="  # Setting.field: the SessionOptions field of the same name as the key


@dataclass(frozen=True)
class Setting:
    key: str  # the name: config key, AUTORESEARCH_<KEY>, --key-with-dashes, SessionOptions field
    type: type  # the command line's type (bool: a flag)
    default: object  # the built-in default; None: not set (`default_text` says what applies)
    help: str  # without the default: the CLI adds it
    panel: str | None = None  # the help panel of `run`
    check: Callable[[object], object] | None = None  # validates config and env values
    config: bool = True  # accepted in [tool.autoresearch] and AUTORESEARCH_<KEY>
    env: bool = True  # accepted as AUTORESEARCH_<KEY> (when config)
    cli: bool = True  # an option of `run`
    field: str | None = SAME  # the SessionOptions field it fills; None: none
    short: str | None = None  # a one-letter alias, e.g. "-n"
    flag: str | None = None  # the option's spelling when not --key (e.g. "--overlap/--no-overlap")
    low: float | None = None  # the CLI's range
    high: float | None = None
    default_text: str | None = None  # what "not set" means, for the help
    by_preset: Callable[[str], object] | None = None  # the default when not set, by preset

    @property
    def field_name(self) -> str | None:
        return self.key if self.field == SAME else self.field

    @property
    def env_name(self) -> str:
        return ENV_PREFIX + self.key.upper()

    @property
    def flag_name(self) -> str:
        return "--" + self.key.replace("_", "-")


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "agent", str, None, "The agent that proposes experiments (the registered agents are "
        "the choices).", AGENT_PANEL, _agent, field=None, short="-a",
        default_text="openai when a model or base URL is configured, else tuner",
    ),
    Setting("model", str, None, "Model name at the endpoint.", AGENT_PANEL, _string,
            field=None, short="-m"),
    Setting("base_url", str, None, "OpenAI-compatible endpoint, e.g. http://localhost:8000/v1.",
            AGENT_PANEL, _url, field=None),
    Setting("agent_timeout", float, 600.0, "Seconds one request to the endpoint may take "
            "before it is retried.", AGENT_PANEL, _at_least(_number, 0.0, strict=True),
            field=None, low=1.0),
    Setting("patches", Path, None, "Directory of prepared replies (replay agent).", AGENT_PANEL,
            config=False, field=None),
    Setting("overlap", bool, True, "Let the agent propose the next experiment while the "
            "current one trains.", AGENT_PANEL, config=False, flag="--overlap/--no-overlap"),
    Setting("max_experiments", int, None, "Stop after this many experiments (the baseline "
            "counts).", LIMITS_PANEL, _at_least(_integer, 1), short="-n", low=1,
            default_text="no limit"),
    Setting("max_hours", float, None, "Start no experiment after this many hours.",
            LIMITS_PANEL, _at_least(_number, 0.0, strict=True), low=0.001,
            default_text="no limit"),
    Setting("max_cost", float, None, "Stop once the agent's tokens cost this many USD.",
            LIMITS_PANEL, _at_least(_number, 0.0), low=0.0, default_text="no limit"),
    Setting("preset", Preset, "auto", "gpu or cpu: prepare.py's preset.", HARDWARE_PANEL,
            _choice(tuple(p.value for p in Preset)), short="-p",
            default_text="gpu when CUDA is available, else cpu"),
    Setting("device", str, "auto", "cuda, cuda:N, mps or cpu.", HARDWARE_PANEL, _device,
            default_text="cuda when available, else cpu"),
    Setting("gpu", str, None, "GPU index to use (sets CUDA_VISIBLE_DEVICES).", HARDWARE_PANEL,
            config=False),
    Setting("workers", int, 1, "Candidates trained at once on the cpu, each in a worktree of "
            "its own.", HARDWARE_PANEL, config=False, field=None, low=1),
    Setting("gpus", str, None, "Cards to train on at once, one candidate per card: e.g. "
            "0,1,2,3, or all.", HARDWARE_PANEL, config=False, field=None,
            default_text="one card"),
    Setting("backend", Backend, "local", "Where runs train: local (this host), or ray (--workers "
            "N slots, each a Ray actor holding one card of a cluster; needs Ray installed).",
            HARDWARE_PANEL, config=False, field=None),
    Setting("address", str, None, "The Ray cluster to use with --backend ray (e.g. "
            "10.0.0.1:6379).", HARDWARE_PANEL, config=False, field=None,
            default_text="a cluster of this host"),
    Setting("timeout", float, None, "Hard limit per run in seconds.", RUN_PANEL,
            _at_least(_number, 0.0, strict=True), low=1.0,
            default_text="2 x TIME_BUDGET + 120; 10 x on the cpu device"),
    Setting("stall_timeout", float, None, "Kill a run that prints nothing for this many "
            "seconds.", RUN_PANEL, _at_least(_number, 0.0, strict=True), low=1.0,
            default_text="none"),
    Setting("budget_grace", float, None, "Seconds a run may take past TIME_BUDGET from its "
            "first step line to its exit; a run that takes longer is a crash, over_budget.",
            RUN_PANEL, _at_least(_number, 0.0), low=0.0,
            default_text="the larger of 30 s and 10% of TIME_BUDGET"),
    Setting("startup_limit", float, None, "Seconds a run may take from launch to its first "
            "step line (imports, data, compile), which is not counted as training; a later "
            "first step line makes the run a crash, over_budget.", RUN_PANEL,
            _at_least(_number, 0.0, strict=True), low=1.0, default_text="120"),
    Setting("fix_attempts", int, 1, "Repairs the agent may try after a crash.", RUN_PANEL,
            _at_least(_integer, 0), low=0, high=10),
    Setting("warm_start", bool, True, "Start training and evaluator processes (their `import "
            "torch`) before they are due.", RUN_PANEL, config=False,
            flag="--warm-start/--no-warm-start"),
    Setting("unsandboxed", bool, False, "Run candidate code without the box (bubblewrap) where "
            "it is missing; recorded.", RUN_PANEL, config=False),
    Setting("sealed", bool, True, "val_bpb from the sealed evaluator (false: as train.py "
            "prints it, as upstream does).", RUN_PANEL, _boolean, cli=False),
    Setting("min_delta", float, 0.0, "Keep only if val_bpb beats the best by more than this.",
            KEEP_PANEL, _at_least(_number, 0.0), low=0.0),
    Setting("calibrate", int, None, "Runs of the baseline that measure the noise of val_bpb.",
            KEEP_PANEL, _at_least(_integer, 1), low=1, default_text="3 on gpu, 2 on cpu",
            by_preset=calibrate_for),
    Setting("max_repeats", int, None, "Most runs of a candidate the keep rule may ask for.",
            KEEP_PANEL, _at_least(_integer, 1), low=1, default_text="6 on gpu, 2 on cpu",
            by_preset=max_repeats_for),
    Setting("pair_window", int, PAIR_WINDOW, "Runs after which the best's run of a seed is too "
            "old to pair with a candidate's run of that seed: the best is trained with that "
            "seed again first (0: pair with any age).", KEEP_PANEL, _at_least(_integer, 0),
            low=0),
    Setting("prices", dict, {}, "USD per 1M tokens by model: model = { input = USD, output = "
            "USD }.", check=_prices, env=False, cli=False),
    Setting("resume", bool, False, "Continue the tag's session after any stop, kill -9 "
            "included; what did not finish is trained again.", config=False),
    Setting("quiet", bool, False, "Only one line per experiment.", config=False, field=None,
            short="-q"),
)  # fmt: skip

BY_KEY: dict[str, Setting] = {s.key: s for s in SETTINGS}
CONFIG_KEYS: tuple[str, ...] = tuple(s.key for s in SETTINGS if s.config)


def default_help(setting: Setting) -> str:
    """The help text with the default, as `run --help` shows it."""
    if setting.type is bool and setting.default is not None:
        return setting.help
    shown = setting.default_text
    if shown is None and setting.default not in (None, {}):
        shown = f"{setting.default:g}" if isinstance(setting.default, float) else setting.default
    return f"{setting.help} (default: {shown})" if shown is not None else setting.help
