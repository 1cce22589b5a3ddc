"""The `autoresearch` command. Thin: each command checks its options and calls one function.

Only this module turns an AutoresearchError into a message on stderr and an exit code.
"""

from __future__ import annotations

import datetime
import os
import sys
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console

from . import commands
from .errors import AutoresearchError

app = typer.Typer(
    help="Autonomous ML research: an agent edits train.py, trains for a fixed budget, "
    "and keeps what lowers val_bpb.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
err = Console(stderr=True)


class Preset(str, Enum):
    gpu = "gpu"
    cpu = "cpu"


class AgentName(str, Enum):
    openai = "openai"
    tuner = "tuner"
    replay = "replay"


class Device(str, Enum):
    cuda = "cuda"
    cpu = "cpu"


WorkspaceOpt = typer.Option(
    None, "--workspace", "-w", help="Workspace directory (default: the current one)."
)
PresetOpt = typer.Option(
    None, "--preset", "-p", help="gpu or cpu (default: gpu when CUDA is available)."
)
DeviceOpt = typer.Option(None, "--device", help="cuda or cpu (default: cuda when available).")
GpuOpt = typer.Option(None, "--gpu", help="GPU index to use (sets CUDA_VISIBLE_DEVICES).")
TagOpt = typer.Option(None, "--tag", "-t", help="Session tag (default: the most recent session).")


def default_tag() -> str:
    """Today's date as upstream names sessions, e.g. `nov26`."""
    return datetime.date.today().strftime("%b%d").lower()


@app.command()
def prepare(
    source: str = typer.Option(
        None,
        "--source",
        "-s",
        help="climbmix (default) | tinystories | stdlib (offline) | files:PATH (txt, md, py, "
        "jsonl, parquet, .gz). With --force and no --source: the active dataset's own.",
    ),
    num_shards: int | None = typer.Option(
        None, "--num-shards", min=1, help="Training shards to download (climbmix; default 10)."
    ),
    include: list[str] | None = typer.Option(
        None, "--include", help="Glob of files to use (files:PATH); repeatable."
    ),
    val_include: list[str] | None = typer.Option(
        None, "--val-include", help="Glob naming the validation files (files:PATH); repeatable."
    ),
    max_train_mb: float | None = typer.Option(
        None, "--max-train-mb", min=0.001, help="Cap on training text, MB."
    ),
    base_url: str | None = typer.Option(None, "--base-url", help="Mirror to download shards from."),
    workers: int = typer.Option(8, "--workers", min=1, max=64, help="Parallel downloads."),
    force: bool = typer.Option(
        False, "--force", help="Rebuild even if already prepared (damaged or missing files)."
    ),
    workspace: Path | None = WorkspaceOpt,
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


@app.command()
def train(
    preset: Preset | None = PresetOpt,
    device: Device | None = DeviceOpt,
    gpu: str | None = GpuOpt,
    workspace: Path | None = WorkspaceOpt,
) -> None:
    """Run train.py once with a live progress bar and print its summary block."""
    code = commands.train_once(
        workspace=workspace,
        preset=preset.value if preset else None,
        device=device.value if device else None,
        gpu=gpu,
    )
    raise typer.Exit(code)


@app.command()
def run(
    tag: str | None = typer.Option(
        None,
        "--tag",
        "-t",
        help="Session tag; the branch is autoresearch/<tag> (default: today's date, e.g. nov26).",
    ),
    agent: AgentName | None = typer.Option(
        None,
        "--agent",
        "-a",
        help="openai (an endpoint), tuner (offline, no LLM) or replay. "
        "Default: openai when a model or base URL is configured, else tuner.",
    ),
    model: str | None = typer.Option(None, "--model", "-m", help="Model name at the endpoint."),
    base_url: str | None = typer.Option(
        None, "--base-url", help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1."
    ),
    agent_timeout: float | None = typer.Option(
        None,
        "--agent-timeout",
        min=1.0,
        help="Seconds one request to the endpoint may take before it is retried (default 600).",
    ),
    patches: Path | None = typer.Option(
        None, "--patches", help="Directory of prepared replies (replay agent)."
    ),
    max_experiments: int | None = typer.Option(
        None,
        "--max-experiments",
        "-n",
        min=1,
        help="Stop after this many experiments (the baseline counts).",
    ),
    max_hours: float | None = typer.Option(
        None, "--max-hours", min=0.001, help="Start no experiment after this many hours."
    ),
    max_cost: float | None = typer.Option(
        None, "--max-cost", min=0.0, help="Stop once the agent's tokens cost this many USD."
    ),
    preset: Preset | None = PresetOpt,
    device: Device | None = DeviceOpt,
    gpu: str | None = GpuOpt,
    timeout: float | None = typer.Option(
        None,
        "--timeout",
        min=1.0,
        help="Hard limit per run in seconds (default: 2 x TIME_BUDGET + 120; 10 x on the cpu device).",
    ),
    stall_timeout: float | None = typer.Option(
        None,
        "--stall-timeout",
        min=1.0,
        help="Kill a run that prints nothing for this many seconds.",
    ),
    budget_grace: float | None = typer.Option(
        None,
        "--budget-grace",
        min=0.0,
        help="Seconds a run may take past TIME_BUDGET from its first step line to its exit; "
        "a run that takes longer is a crash, over_budget (default: the larger of 30 s and 10% of TIME_BUDGET).",
    ),
    startup_limit: float | None = typer.Option(
        None,
        "--startup-limit",
        min=1.0,
        help="Seconds a run may take from launch to its first step line (imports, data, "
        "compile), which is not counted as training; a later first step line makes the run a "
        "crash, over_budget (default 120).",
    ),
    fix_attempts: int | None = typer.Option(
        None,
        "--fix-attempts",
        min=0,
        max=10,
        help="Repairs the agent may try after a crash (default 1).",
    ),
    min_delta: float | None = typer.Option(
        None,
        "--min-delta",
        min=0.0,
        help="Keep only if val_bpb beats the best by more than this (default 0).",
    ),
    calibrate: int | None = typer.Option(
        None,
        "--calibrate",
        min=1,
        help="Runs of the baseline that measure the noise of val_bpb (default 3 on gpu, 2 on cpu).",
    ),
    max_repeats: int | None = typer.Option(
        None,
        "--max-repeats",
        min=1,
        help="Runs of a candidate whose gain is within noise (default 3 on gpu, 2 on cpu).",
    ),
    overlap: bool = typer.Option(
        True,
        "--overlap/--no-overlap",
        help="Let the agent propose the next experiment while the current one trains.",
    ),
    warm_start: bool = typer.Option(
        True,
        "--warm-start/--no-warm-start",
        help="Start training and evaluator processes (their `import torch`) before they are due.",
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the tag's session after any stop, kill -9 included."
    ),
    unsandboxed: bool = typer.Option(
        False,
        "--unsandboxed",
        help="Run candidate code without the box (bubblewrap) where it is missing; recorded.",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only one line per experiment."),
    workspace: Path | None = WorkspaceOpt,
) -> None:
    """Run the research loop: propose, train, keep or revert, until a budget ends it.

    Settings not given as flags come from AUTORESEARCH_* variables, then from
    [tool.autoresearch] in the workspace's pyproject.toml (see `autoresearch config`).
    """
    commands.run_session(
        workspace=workspace,
        tag=tag or default_tag(),
        flags={
            "agent": agent.value if agent else None,
            "model": model,
            "base_url": base_url,
            "agent_timeout": agent_timeout,
            "max_experiments": max_experiments,
            "max_hours": max_hours,
            "max_cost": max_cost,
            "preset": preset.value if preset else None,
            "device": device.value if device else None,
            "timeout": timeout,
            "stall_timeout": stall_timeout,
            "budget_grace": budget_grace,
            "startup_limit": startup_limit,
            "fix_attempts": fix_attempts,
            "min_delta": min_delta,
            "calibrate": calibrate,
            "max_repeats": max_repeats,
        },
        patches=patches,
        gpu=gpu,
        resume=resume,
        overlap=overlap,
        warm_start=warm_start,
        unsandboxed=unsandboxed,
        quiet=quiet,
    )


@app.command()
def config(workspace: Path | None = WorkspaceOpt) -> None:
    """Show each setting, its value and where it came from (flag > env > config > default)."""
    commands.show_config(workspace=workspace)


@app.command()
def report(tag: str | None = TagOpt, workspace: Path | None = WorkspaceOpt) -> None:
    """Write runs/<tag>/progress.png and a self-contained runs/<tag>/report.html."""
    commands.report(workspace=workspace, tag=tag)


@app.command()
def status(
    tag: str | None = TagOpt,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    workspace: Path | None = WorkspaceOpt,
) -> None:
    """Best result, counts by status and the table of experiments."""
    commands.status(workspace=workspace, tag=tag, as_json=as_json)


@app.command()
def log(tag: str | None = TagOpt, workspace: Path | None = WorkspaceOpt) -> None:
    """Accepted changes with val_bpb before → after."""
    commands.log(workspace=workspace, tag=tag)


@app.command()
def show(
    exp_id: int = typer.Argument(..., metavar="N", help="Experiment number."),
    tag: str | None = TagOpt,
    workspace: Path | None = WorkspaceOpt,
) -> None:
    """One experiment: description, diff, metrics and the tail of its log."""
    commands.show(workspace=workspace, tag=tag, exp_id=exp_id)


@app.command()
def confirm(
    tag: str | None = TagOpt,
    device: Device | None = DeviceOpt,
    workspace: Path | None = WorkspaceOpt,
) -> None:
    """Evaluate the baseline and the best on the held-out test split (never seen by the loop)."""
    commands.confirm(workspace=workspace, tag=tag, device=device.value if device else None)


@app.command()
def init(directory: Path = typer.Argument(..., help="Directory for the new workspace.")) -> None:
    """Create a workspace: a git repository with program.md, prepare.py, train.py."""
    commands.init(directory)


def main() -> None:
    """Entry point: run the app, turning project errors into a message and an exit code.

    Typer reports bad flags itself (exit 2); everything the commands raise from the
    AutoresearchError family is printed here as one line, never as a traceback.
    """
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        app()
    except AutoresearchError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(exc.exit_code)
