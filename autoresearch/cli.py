"""The `autoresearch` command. Thin: each command checks its options and calls one function.

Only this module turns an AutoresearchError into a message on stderr and an exit code.
Help text is rich markup (Typer's default): a literal `[` is written `\\[`.
"""

from __future__ import annotations

import datetime
import inspect
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from . import __version__, commands
from .errors import AutoresearchError
from .settings import (  # noqa: F401 - the panels are re-exported for tests and docs
    AGENT_PANEL,
    HARDWARE_PANEL,
    KEEP_PANEL,
    LIMITS_PANEL,
    RUN_PANEL,
    SETTINGS,
    Preset,
    Setting,
    default_help,
)


class _NoFlagTypes:
    """Leaves the type column of a flag empty: Typer shows `<bool>` after every
    `--flag` (and after `--help`), which reads as if the flag took a value."""

    def get_params(self, ctx):  # noqa: ANN001, ANN201 - click's signature
        params = super().get_params(ctx)  # type: ignore[misc]
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params


class _Group(_NoFlagTypes, TyperGroup):
    pass


class _Command(_NoFlagTypes, TyperCommand):
    pass


app = typer.Typer(
    cls=_Group,
    help="Autonomous ML research: an agent edits train.py, trains for a fixed budget, "
    "and keeps what lowers val_bpb.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
err = Console(stderr=True)


class Device(str, Enum):
    cuda = "cuda"
    cpu = "cpu"


Workspace = Annotated[
    Path | None,
    typer.Option(
        "--workspace",
        "-w",
        help="Workspace directory (default: the current one, or the nearest above it).",
    ),
]
PresetOpt = Annotated[
    Preset | None,
    typer.Option(
        "--preset",
        "-p",
        help="gpu or cpu (default: gpu when CUDA is available).",
        rich_help_panel=HARDWARE_PANEL,
    ),
]
DeviceOpt = Annotated[
    Device | None,
    typer.Option(
        "--device",
        help="cuda or cpu (default: cuda when available).",
        rich_help_panel=HARDWARE_PANEL,
    ),
]
GpuOpt = Annotated[
    str | None,
    typer.Option(
        "--gpu",
        help="GPU index to use (sets CUDA_VISIBLE_DEVICES).",
        rich_help_panel=HARDWARE_PANEL,
    ),
]
Tag = Annotated[
    str | None,
    typer.Option("--tag", "-t", help="Session tag (default: the most recent session)."),
]


def default_tag() -> str:
    """Today's date as upstream names sessions, e.g. `nov26`."""
    return datetime.date.today().strftime("%b%d").lower()


def _version(value: bool) -> None:
    if value:
        print(f"autoresearch {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    pass


@app.command(cls=_Command)
def prepare(
    source: Annotated[
        str | None,
        typer.Option(
            "--source",
            "-s",
            help="climbmix (default) | tinystories | stdlib (offline) | files:PATH (txt, md, "
            "py, jsonl, parquet, .gz). With --force and no --source: the active dataset's own.",
        ),
    ] = None,
    num_shards: Annotated[
        int | None,
        typer.Option(
            "--num-shards", min=1, help="Training shards to download (climbmix; default 10)."
        ),
    ] = None,
    include: Annotated[
        list[str] | None,
        typer.Option("--include", help="Glob of files to use (files:PATH); repeatable."),
    ] = None,
    val_include: Annotated[
        list[str] | None,
        typer.Option(
            "--val-include", help="Glob naming the validation files (files:PATH); repeatable."
        ),
    ] = None,
    max_train_mb: Annotated[
        float | None, typer.Option("--max-train-mb", min=0.001, help="Cap on training text, MB.")
    ] = None,
    base_url: Annotated[
        str | None, typer.Option("--base-url", help="Mirror to download shards from.")
    ] = None,
    workers: Annotated[
        int, typer.Option("--workers", min=1, max=64, help="Parallel downloads.")
    ] = 8,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Rebuild even if already prepared (damaged or missing files)."
        ),
    ] = False,
    workspace: Workspace = None,
) -> None:
    """Download or collect text, train the tokenizer and write token shards (once)."""
    commands.prepare(
        workspace=workspace,
        source=source,
        num_shards=num_shards,
        include=include,
        val_include=val_include,
        max_train_mb=max_train_mb,
        base_url=base_url,
        workers=workers,
        force=force,
    )


@app.command(cls=_Command)
def train(
    preset: PresetOpt = None,
    device: DeviceOpt = None,
    gpu: GpuOpt = None,
    workspace: Workspace = None,
) -> None:
    """Run train.py once with a live progress bar and print its summary block."""
    code = commands.train_once(
        workspace=workspace,
        preset=preset.value if preset and preset is not Preset.auto else None,
        device=device.value if device else None,
        gpu=gpu,
    )
    raise typer.Exit(code)


class _Run:
    """Run the research loop: propose, train, keep or revert, until a budget ends it.

    Settings not given as flags come from AUTORESEARCH_* variables, then from
    \\[tool.autoresearch] in the workspace's pyproject.toml (see `autoresearch config`).
    """

    # Its options are settings.SETTINGS, read whenever Typer builds the command: the
    # signature is made from the table, and `--agent`'s choices from the agent registry.
    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.Signature(
            [
                _parameter("tag", Annotated[str | None, _TAG_OPTION], None),
                *(_setting_parameter(s) for s in SETTINGS if s.cli),
                _parameter("workspace", Workspace, None),
            ]
        )

    @property
    def __annotations__(self) -> dict[str, object]:  # type: ignore[override]
        return {p.name: p.annotation for p in self.__signature__.parameters.values()}

    def __call__(self, **values: object) -> None:
        flags = {s.key: values.pop(s.key) for s in SETTINGS if s.cli and s.config}
        flags = {k: v.value if isinstance(v, Enum) else v for k, v in flags.items()}
        values = {k: v.value if isinstance(v, Enum) else v for k, v in values.items()}
        commands.run_session(tag=values.pop("tag") or default_tag(), flags=flags, **values)


_TAG_OPTION = typer.Option(
    "--tag",
    "-t",
    help="Session tag; the branch is autoresearch/<tag> (default: today's date, e.g. nov26).",
)


def _parameter(name: str, annotation: object, default: object) -> inspect.Parameter:
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation
    )


def _setting_parameter(setting: Setting) -> inspect.Parameter:
    """`run`'s option for a setting. One the config file may also set defaults to None here
    (not given), so the environment, the config and then the table's default apply."""
    names = [setting.flag or setting.flag_name] + ([setting.short] if setting.short else [])
    option = typer.Option(
        *names,
        help=default_help(setting),
        rich_help_panel=setting.panel,
        min=setting.low,
        max=setting.high,
        show_default=False,  # default_help already says it, with what "not set" means
    )
    kind: object = setting.type
    if setting.key == "agent":
        from .agent import agent_names

        kind = Enum("AgentName", {name: name for name in agent_names()}, type=str)
    default = None if setting.config else setting.default
    if default is None:
        kind = kind | None  # type: ignore[operator]
    return _parameter(setting.key, Annotated[kind, option], default)


app.command("run", cls=_Command)(_Run())


@app.command("try", cls=_Command)
def try_(
    message: Annotated[
        str,
        typer.Option(
            "--message", "-m", help="One line describing the change (the commit message)."
        ),
    ],
    tag: Annotated[
        str | None,
        typer.Option(
            "--tag",
            "-t",
            help="Session tag (default: the session whose branch is checked out, else today's "
            "date). A new tag starts a session: the baseline is measured first.",
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the verdict as JSON on stdout.")
    ] = False,
    preset: PresetOpt = None,
    device: DeviceOpt = None,
    gpu: GpuOpt = None,
    unsandboxed: Annotated[
        bool,
        typer.Option(
            "--unsandboxed",
            help="Run candidate code without the box (bubblewrap) where it is missing; recorded.",
        ),
    ] = False,
    workspace: Workspace = None,
) -> None:
    """Run the working tree's train.py as one experiment, exactly as `run` would, and print
    the verdict: for a coding agent that edits train.py itself.

    Exit status: 0 keep, 10 discard, 11 crash (also rejected, interrupted), 12 refused (a file
    other than train.py differs from the best commit, train.py is unchanged, or the edit was
    recorded invalid), 13 busy (another `run` or `try` is working in this workspace).
    """
    code = commands.try_once(
        workspace=workspace,
        tag=tag,
        fallback_tag=default_tag(),
        description=message,
        as_json=as_json,
        flags={
            "preset": preset.value if preset else None,
            "device": device.value if device else None,
        },
        gpu=gpu,
        unsandboxed=unsandboxed,
    )
    raise typer.Exit(code)


@app.command(cls=_Command)
def mcp(
    tag: Annotated[
        str | None,
        typer.Option(
            "--tag",
            "-t",
            help="Session tag for every tool (default: as `try` picks it, call by call).",
        ),
    ] = None,
    workspace: Workspace = None,
) -> None:
    """Serve try_experiment, status, show and history as MCP tools over stdio, for coding
    agents that speak the Model Context Protocol (needs `pip install 'autoresearch\\[mcp]'`)."""
    from .mcp_server import serve

    serve(workspace=workspace, tag=tag)


@app.command(cls=_Command)
def config(workspace: Workspace = None) -> None:
    """Show each setting, its value and where it came from (flag > env > config > default)."""
    commands.show_config(workspace=workspace)


@app.command(cls=_Command)
def report(tag: Tag = None, workspace: Workspace = None) -> None:
    """Write runs/<tag>/progress.png and a self-contained runs/<tag>/report.html."""
    commands.report(workspace=workspace, tag=tag)


@app.command(cls=_Command)
def status(
    tag: Tag = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    workspace: Workspace = None,
) -> None:
    """Best result, counts by status, how busy the device was, and the table of experiments."""
    commands.status(workspace=workspace, tag=tag, as_json=as_json)


@app.command(cls=_Command)
def log(tag: Tag = None, workspace: Workspace = None) -> None:
    """Accepted changes with val_bpb before → after."""
    commands.log(workspace=workspace, tag=tag)


@app.command(cls=_Command)
def show(
    exp_id: Annotated[int, typer.Argument(metavar="N", help="Experiment number.")],
    tag: Tag = None,
    workspace: Workspace = None,
) -> None:
    """One experiment: why it got its status, every run, the diff, metrics and log tail."""
    commands.show(workspace=workspace, tag=tag, exp_id=exp_id)


@app.command(cls=_Command)
def confirm(
    tag: Tag = None,
    device: DeviceOpt = None,
    horizon: Annotated[
        float | None,
        typer.Option(
            "--horizon",
            min=1.0,
            help="Train the baseline and the best again for this many times TIME_BUDGET (paired "
            "seeds) and say whether the session's gain holds, on val and test; written to "
            "runs/<tag>/confirm-horizon.json.",
        ),
    ] = None,
    seeds: Annotated[
        int, typer.Option("--seeds", min=1, help="Seeds per version with --horizon.")
    ] = 1,
    unsandboxed: Annotated[
        bool,
        typer.Option(
            "--unsandboxed",
            help="Run the candidate code (the model's definition, and its training with "
            "--horizon) without the box, where bubblewrap is missing. Default: as the session ran.",
        ),
    ] = False,
    workspace: Workspace = None,
) -> None:
    """Evaluate the baseline and the best on the held-out test split (never seen by the loop)."""
    commands.confirm(
        workspace=workspace,
        tag=tag,
        device=device.value if device else None,
        horizon=horizon,
        seeds=seeds,
        unsandboxed=True if unsandboxed else None,
    )


@app.command(cls=_Command)
def init(
    directory: Annotated[Path, typer.Argument(help="Directory for the new workspace.")],
    agent_external: Annotated[
        bool,
        typer.Option(
            "--agent-external",
            help="Write program.md for a coding agent (Claude Code, Codex, Aider, …) that "
            "edits train.py itself and calls `autoresearch try` in a loop.",
        ),
    ] = False,
) -> None:
    """Create a workspace: a git repository with program.md, prepare.py, train.py."""
    commands.init(directory, agent_external=agent_external)


def main() -> None:
    """Entry point: run the app, turning project errors into a message and an exit code.

    Typer reports bad flags itself (exit 2); everything the commands raise from the
    AutoresearchError family is printed here as one line, never as a traceback.
    """
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        app()
    except AutoresearchError as exc:
        # The message may quote paths, settings or TOML tables: never read it as markup.
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
