"""The settings table (autoresearch.settings) is the one source of `run`'s options, the config
file's keys and the SessionOptions a session gets: the layers agree with it and each other."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import typer.main
from loopkit import make_workspace

from autoresearch import cli, commands, config
from autoresearch.config import resolve
from autoresearch.options import SessionOptions
from autoresearch.settings import SETTINGS, default_help

FIELDS = {f.name: f for f in dataclasses.fields(SessionOptions)}


def run_params() -> dict:
    command = typer.main.get_command(cli.app).commands["run"]  # type: ignore[attr-defined]
    return {p.name: p for p in command.params}


def test_every_cli_setting_is_an_option_of_run_with_the_tables_default() -> None:
    params = run_params()
    for s in SETTINGS:
        if not s.cli:
            assert s.key not in params, s.key
            continue
        param = params[s.key]
        spelled = (s.flag or s.flag_name).split("/")[0]
        assert spelled in param.opts, (s.key, param.opts)
        # a setting the config may set is "not given" on the command line, so the env, the
        # config and then the table's default apply; the help shows the table's default
        assert param.default == (None if s.config else s.default), s.key
        assert param.help == default_help(s), s.key
    assert set(params) - {s.key for s in SETTINGS} == {"tag", "workspace"}


def test_the_config_accepts_exactly_the_config_settings_with_the_tables_defaults(
    tmp_path: Path,
) -> None:
    table = {s.key: s.default for s in SETTINGS if s.config}
    assert config.DEFAULTS == table
    assert set(config.CHECKS) == set(table)
    resolved = resolve({}, tmp_path, env={})
    assert {key: value for key, value, _ in resolved.rows()} == table


def test_every_session_field_of_the_table_is_a_sessionoptions_field_with_its_default() -> None:
    for s in SETTINGS:
        name = s.field_name
        if name is None:
            continue
        assert name in FIELDS, s.key
        field = FIELDS[name]
        if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            continue  # required (preset, device): session_options always resolves it
        for preset in ("gpu", "cpu"):
            opts = SessionOptions(tag="t", preset=preset, device="cpu", time_budget=1.0)
            expected = s.by_preset(preset) if s.by_preset else s.default
            assert getattr(opts, name) == expected, (s.key, preset)


@pytest.mark.parametrize("preset", ["cpu"])
def test_a_cli_session_and_sessionoptions_agree_on_calibrate_and_sealed(
    tmp_path: Path, preset: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The two defaults that once disagreed between the layers (calibrate: 1 in
    SessionOptions, 2 or 3 from the CLI; sealed: False in SessionOptions, True from the
    config) are the same whichever layer builds the session."""
    monkeypatch.delenv("AUTORESEARCH_TIME_BUDGET", raising=False)
    ws = make_workspace(tmp_path / "ws")
    settings = resolve({"preset": preset, "device": "cpu"}, ws, env={})
    from_cli = commands.session_options(ws, settings, tag="t", gpu=None, resume=False)
    direct = SessionOptions(tag="t", preset=preset, device="cpu", time_budget=1.0)
    for key in ("calibrate", "max_repeats", "sealed", "fix_attempts", "min_delta", "overlap"):
        assert getattr(from_cli, key) == getattr(direct, key), key
    assert from_cli.sealed is True and from_cli.calibrate == 2


def test_config_values_reach_the_session(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AUTORESEARCH_TIME_BUDGET", raising=False)
    ws = make_workspace(tmp_path / "ws")
    (ws / "pyproject.toml").write_text(
        "[tool.autoresearch]\ncalibrate = 4\nmax_repeats = 5\nsealed = false\nmin_delta = 0.01\n"
        "stall_timeout = 30\nmax_cost = 2.5\n"
    )
    settings = resolve({"preset": "cpu", "device": "cpu", "max_hours": 1.5}, ws, env={})
    opts = commands.session_options(ws, settings, tag="t", gpu=None, resume=False)
    assert (opts.calibrate, opts.max_repeats, opts.sealed, opts.min_delta) == (4, 5, False, 0.01)
    assert (opts.stall_timeout, opts.max_cost, opts.max_hours) == (30.0, 2.5, 1.5)
