"""What each CLI command does, with keyword arguments only; no Typer here.

This module holds the commands that build or run something: `prepare`, `train`, `init`,
`run` (a session's options and slots) and `try`. The read-only commands live in views.py and
`confirm` in confirm.py; both are re-exported here, so every command is `commands.NAME`.

Every function raises AutoresearchError subclasses for the user's mistakes and writes
nothing before its checks pass.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.text import Text

from . import runner, sandbox
from .config import Settings, resolve
from .confirm import CONFIRM_TIMEOUT_S, confirm
from .display import Display
from .errors import DataError, UsageError
from .ledger import Experiment
from .presets import preset_constants, resolve_device
from .settings import SETTINGS
from .status import Status
from .views import (
    in_flight,
    in_flight_lines,
    log,
    out,
    report,
    run_log_name,
    session_ledger,
    session_state,
    show,
    show_config,
    status,
)
from .workspace import (
    RUNS_DIR,
    find_workspace,
    init_workspace,
    load_prepare,
    read_manifest,
    stale_prepare,
)

# The read-only commands (views.py) and confirm (confirm.py) are re-exported: the CLI calls
# every command through this module.
__all__ = [
    "CONFIRM_TIMEOUT_S",
    "confirm",
    "in_flight",
    "in_flight_lines",
    "init",
    "log",
    "prepare",
    "preset_constants",
    "report",
    "resolve_device",
    "run_log_name",
    "run_session",
    "session_ledger",
    "session_options",
    "session_state",
    "show",
    "show_config",
    "status",
    "train_once",
    "try_once",
]

if TYPE_CHECKING:
    from .options import SessionOptions


# ------------------------------------------------------------------ prepare / train / init


def prepare(
    *,
    workspace: Path | None,
    source: str | None,
    num_shards: int | None,
    include: list[str] | None,
    val_include: list[str] | None,
    max_train_mb: float | None,
    base_url: str | None,
    workers: int,
    force: bool,
) -> None:
    root = find_workspace(workspace)
    module = load_prepare(root)
    options = {
        "num_shards": num_shards,
        "include": include or None,
        "val_include": val_include or None,
        "max_train_bytes": int(max_train_mb * 1e6) if max_train_mb else None,
    }
    if source is None and force:
        source, recorded = _active_dataset_args()
        options = {**recorded, **{k: v for k, v in options.items() if v is not None}}
        out.print(f"rebuilding the active dataset ({source})", highlight=False, markup=False)
    from .data.build import run_prepare

    try:
        run_prepare(
            module,  # the workspace's prepare.py: the format its loader reads
            source or "climbmix",
            **{k: v for k, v in options.items() if v is not None},
            base_url=base_url,
            workers=workers,
            force=force,
            log=lambda msg: out.print(msg, highlight=False, markup=False),
        )
    except module.PrepareError as exc:
        raise DataError(str(exc)) from exc


def _active_dataset_args() -> tuple[str, dict]:
    """The source and options the active dataset was prepared with, from its manifest, so
    `prepare --force` rebuilds the same data; climbmix when nothing is prepared."""
    try:
        manifest = read_manifest()
    except DataError:
        return "climbmix", {}
    args = manifest.get("args") or {}
    source = args.get("source", "climbmix")
    if source == "files":
        source = f"files:{args['root']}"
    options = {
        key: args[key]
        for key in (
            "num_shards",
            "include",
            "val_include",
            "max_train_bytes",
            "doc_chars",
            "tokenizer_chars",
        )
        if args.get(key) is not None
    }
    return source, options


def train_once(
    *, workspace: Path | None, preset: str | None, device: str | None, gpu: str | None
) -> int:
    """Run train.py once; returns its exit code (0 when it printed a valid summary)."""
    from .workspace import data_manifest

    root = find_workspace(workspace)
    device, preset = resolve_device(device, preset)
    data_manifest()
    constants = preset_constants(root, preset)
    display = Display(out, device=device)
    display.note(
        f"preset {preset} on {device}: " + ", ".join(f"{k} {v}" for k, v in constants.items())
    )
    log_path = root / RUNS_DIR / "train" / "run.log"
    display.training(0, "train.py", constants["TIME_BUDGET"])
    try:
        result = runner.run_training(
            root,
            log_path,
            env=runner.child_env(
                dict(os.environ), preset=preset, device=device, gpu=gpu, extra=None
            ),
            timeout=2 * constants["TIME_BUDGET"] + 120,
            on_step=display.step,
        )
    finally:
        display.close()  # the live progress, also on Ctrl-C
    display.result(
        Experiment(
            id=0,
            status=Status.keep if result.ok else Status.crash,
            description="train.py",
            commit=None,
            parent="",
            val_bpb=result.summary.get("val_bpb"),
            memory_gb=0.0,
            best_before=None,
            threshold=0.0,
            crash_class=result.crash_class,
        )
    )
    if result.ok:
        out.print("---")
        for key, value in result.summary.items():
            out.print(f"{key + ':':<18}{value}", highlight=False)
        return 0
    out.print(result.log_tail, highlight=False, markup=False)
    out.print(
        Text(f"train.py failed ({result.crash_class}); full log: {log_path}", style="red"),
        highlight=False,
    )
    return 1


def init(directory: Path, *, agent_external: bool = False) -> None:
    from .workspace import EXTERNAL_PROGRAM

    root = init_workspace(directory, program=EXTERNAL_PROGRAM if agent_external else "program.md")
    then = (
        "then start your coding agent there with: Read program.md and follow it."
        if agent_external
        else "autoresearch run"
    )
    out.print(
        f"workspace ready in {root}\nnext: cd {root} && autoresearch prepare && {then}",
        highlight=False,
        markup=False,
    )


# ------------------------------------------------------------------ run


def run_session(
    *,
    workspace: Path | None,
    tag: str,
    flags: dict[str, object | None],
    patches: Path | None,
    gpu: str | None,
    resume: bool,
    overlap: bool,
    quiet: bool,
    warm_start: bool = True,
    unsandboxed: bool = False,
    workers: int = 1,
    gpus: str | None = None,
    backend: str = "local",
    address: str | None = None,
) -> None:
    from .agent import make_agent
    from .loop import Session

    if not tag.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise UsageError(f"--tag {tag!r}: use letters, digits, '-', '_' or '.' only")
    root = find_workspace(workspace)
    settings = resolve(flags, root, os.environ)
    agent = settings.agent_name
    if agent == "replay" and patches is None:
        raise UsageError("--agent replay needs --patches DIR (a directory of prepared replies)")
    box = sandbox.require(sandbox.probe(), unsandboxed=unsandboxed)
    first = _first_warm_child(root, gpu, box) if warm_start else None
    try:
        opts = session_options(
            root,
            settings,
            tag=tag,
            gpu=gpu,
            resume=resume,
            overlap=overlap,
            warm_start=warm_start,
            unsandboxed=unsandboxed,
        )
        if backend not in ("local", "ray"):
            raise UsageError(f"--backend {backend!r}: local or ray")
        if backend == "ray":
            opts = replace(opts, **_ray_slots(opts, workers, gpus, address))
        else:
            if address is not None:
                raise UsageError("--address names a Ray cluster: use it with --backend ray")
            opts = replace(opts, **_slots(opts, workers, gpus))
        device, preset = opts.device, opts.preset
        agent_obj = make_agent(
            agent,
            model=settings.model,
            base_url=settings.base_url,
            patches_dir=patches,
            api_key=os.environ.get("AUTORESEARCH_API_KEY") or os.environ.get("OPENAI_API_KEY"),
            timeout=settings.agent_timeout,
        )
        display = Display(out, quiet=quiet, device=device)
        display.note(
            f"session {tag} on branch autoresearch/{tag}: agent {agent_obj.name}"
            + (f" ({settings.model})" if agent == "openai" and settings.model else "")
            + f", preset {preset} on {device}, TIME_BUDGET {opts.time_budget:g}s, "
            f"hard timeout {opts.hard_timeout:g}s"
            + ("" if opts.sealed else "; unsealed: val_bpb as train.py prints it")
        )
        if stale := stale_prepare(root, session_running=True):  # this one, about to start
            display.note(stale)
        Session(root, opts, agent_obj, display, warm=first).run()
    finally:
        if first is not None:  # a no-op once the session has taken it
            first.discard(grace=0.0)  # an error before the first run is not kept waiting


def _ray_slots(opts: SessionOptions, workers: int, gpus: str | None, address: str | None) -> dict:
    """SessionOptions' slot fields for --backend ray: `workers` slots, each with a Ray actor
    that holds a card (cuda) or a core (cpu) of the cluster for the session (rayslot.py).
    Connects to the cluster (or starts one on this host) to check it has that many, before
    the session creates anything."""
    from .rayslot import check_capacity, connect

    if gpus is not None or opts.gpu is not None:
        raise UsageError("--backend ray places each run on a card: give --workers N, not --gpu(s)")
    check_capacity(connect(address), "GPU" if opts.device == "cuda" else "CPU", workers)
    return {"workers": workers, "gpus": (), "backend": "ray", "address": address}


def _slots(opts: SessionOptions, workers: int, gpus: str | None) -> dict:
    """SessionOptions' `workers` and `gpus` from --workers and --gpus: slots on the cpu, or
    one slot per card; never two trainings on one card."""
    if gpus is None:
        if workers > 1 and opts.device == "cuda":
            raise UsageError(
                f"--workers {workers} on cuda would put {workers} trainings on one card: "
                "name the cards with --gpus (e.g. --gpus 0,1), one slot each"
            )
        return {"workers": workers, "gpus": ()}
    if opts.device != "cuda":
        raise UsageError("--gpus needs --device cuda; on the cpu use --workers N")
    if opts.gpu is not None:
        raise UsageError("--gpu and --gpus: give one of them")
    if gpus.strip() == "all":
        import torch

        cards = tuple(str(i) for i in range(torch.cuda.device_count()))
    else:
        cards = tuple(g.strip() for g in gpus.split(",") if g.strip())
    if not cards or not all(c.isdigit() for c in cards) or len(set(cards)) != len(cards):
        raise UsageError(f"--gpus {gpus!r}: give distinct card indices (e.g. 0,1,2,3) or all")
    return {"workers": len(cards), "gpus": cards}


def session_options(
    root: Path,
    settings: Settings,
    *,
    tag: str,
    gpu: str | None,
    resume: bool,
    overlap: bool = True,
    warm_start: bool = True,
    unsandboxed: bool = False,
) -> SessionOptions:
    """A session's options from the resolved settings, with the hardware's defaults (the
    device, the preset and its TIME_BUDGET, calibration and repeats); `run` and `try` share it."""
    from .options import SessionOptions

    device, preset = resolve_device(_auto(settings.device), _auto(settings.preset))
    constants = preset_constants(root, preset)
    # Every setting that fills a session field, from the table; a setting left unset whose
    # default depends on the preset (calibrate, max_repeats) takes the preset's value.
    fields = {
        s.field_name: getattr(settings, s.key)
        for s in SETTINGS
        if s.config and s.field_name is not None
    }
    fields.update(
        {
            s.field_name: s.by_preset(preset)
            for s in SETTINGS
            if s.by_preset is not None and s.field_name and fields.get(s.field_name) is None
        }
    )
    fields.update(
        tag=tag,
        preset=preset,  # resolved: the settings may say auto
        device=device,
        time_budget=float(constants["TIME_BUDGET"]),
        gpu=gpu,
        unsandboxed=unsandboxed,
        resume=resume,
        overlap=overlap,
        warm_start=warm_start,
    )
    return SessionOptions(**fields)


def _first_warm_child(
    root: Path, gpu: str | None, box: sandbox.Box | None
) -> runner.WarmChild | None:
    """The first run's interpreter, started before this process imports torch to pick the
    device (seconds on a GPU host), so that the two imports overlap. Its environment is the
    run's but for AUTORESEARCH_PRESET and AUTORESEARCH_DEVICE, which the go brings (torch
    does not read them at import)."""
    from .loop import compile_cache_env, warm_child_for

    extra = compile_cache_env(os.environ)
    env = runner.child_env(dict(os.environ), preset="", device="", gpu=gpu, extra=extra)
    return warm_child_for(root, env, runner.network_isolation().prefix, box)


def _auto(value: str | None) -> str | None:
    return None if value in (None, "auto") else value


# ------------------------------------------------------------------ try


def try_once(
    *,
    workspace: Path | None,
    tag: str | None,
    fallback_tag: str,
    description: str,
    as_json: bool,
    flags: dict[str, object | None],
    gpu: str | None,
    unsandboxed: bool = False,
) -> int:
    """One experiment of an outside agent's train.py (external.py); prints the verdict and
    returns its exit status. A refusal is a verdict too (printed, exit 12 or 13)."""
    from .external import TryRefused, default_tag, refusal, try_experiment, verdict, verdict_text
    from .lock import WorkspaceBusy

    root = find_workspace(workspace)
    tag = tag or default_tag(root, fallback_tag)
    if not tag.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise UsageError(f"--tag {tag!r}: use letters, digits, '-', '_' or '.' only")
    settings = resolve(flags, root, os.environ)
    opts = session_options(root, settings, tag=tag, gpu=gpu, resume=False, unsandboxed=unsandboxed)
    # Progress goes to stderr, one line per experiment: stdout holds the verdict alone.
    display = Display(
        Console(stderr=True, markup=False, highlight=False), quiet=True, device=opts.device
    )
    try:
        result = verdict(try_experiment(root, description=description, opts=opts, display=display))
    except (TryRefused, WorkspaceBusy) as exc:
        result = refusal(exc)
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        out.print(verdict_text(result))
    return result["exit_code"]
