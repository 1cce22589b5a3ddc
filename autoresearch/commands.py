"""What each CLI command does, with keyword arguments only; no Typer here.

Every function raises AutoresearchError subclasses for the user's mistakes and writes
nothing before its checks pass.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import runner, sandbox
from .config import Settings, resolve
from .display import (
    STATUS_STYLE,
    Display,
    busy_line,
    busy_percent,
    device_name,
    format_delta,
    plural,
    result_line,
)
from .errors import DataError, UsageError, WorkspaceError
from .ledger import Experiment, Ledger, decision_of, measured_runs
from .settings import SETTINGS
from .status import Status
from .workspace import (
    RUNS_DIR,
    find_workspace,
    init_workspace,
    load_prepare,
    read_manifest,
    read_presets,
    stale_prepare,
)

if TYPE_CHECKING:
    from .options import SessionOptions

# Text from the record, shown literally; a line stays one line when piped (a table still fits)
out = Console(markup=False, highlight=False, soft_wrap=True)
CONFIRM_TIMEOUT_S = 1800.0  # seconds one test-split evaluation may take


# ------------------------------------------------------------------ settings


def resolve_device(device: str | None, preset: str | None) -> tuple[str, str]:
    """(device, preset): defaults follow the hardware; `--device cuda` without a GPU is an error."""
    if device == "cpu":  # nothing to ask the hardware (and no `import torch`, 2 CPU s)
        return device, preset or "cpu"
    import torch

    has_cuda = torch.cuda.is_available()
    if device == "cuda" and not has_cuda:
        raise UsageError("--device cuda: no CUDA GPU is visible to PyTorch (use --device cpu)")
    device = device or ("cuda" if has_cuda else "cpu")
    preset = preset or ("gpu" if device == "cuda" else "cpu")
    return device, preset


def preset_constants(root: Path, preset: str) -> dict:
    """The preset's constants as prepare.py defines them (prepare.py is the one source).

    Read from its source when it can be (read_presets); imported when not, or when
    AUTORESEARCH_TIME_BUDGET is set, whose check is prepare.py's own."""
    presets = None if os.environ.get("AUTORESEARCH_TIME_BUDGET") else read_presets(root)
    if presets is None:
        presets = load_prepare(root).PRESETS
    if preset not in presets:
        raise UsageError(f"unknown preset {preset!r}: prepare.py defines {', '.join(presets)}")
    constants = dict(presets[preset])
    override = os.environ.get("AUTORESEARCH_TIME_BUDGET")
    if override:
        constants["TIME_BUDGET"] = float(override)
    return constants


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
    """SessionOptions' slot fields for --backend ray: `workers` runs at once, each a Ray task
    with a card (cuda) or a core (cpu) of its own, placed by Ray."""
    from .rayslot import require_ray

    if gpus is not None or opts.gpu is not None:
        raise UsageError("--backend ray places each run on a card: give --workers N, not --gpu(s)")
    require_ray()
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


def confirm(
    *,
    workspace: Path | None,
    tag: str | None,
    device: str | None,
    horizon: float | None = None,
    seeds: int = 1,
) -> None:
    """Evaluate the baseline's and the best's checkpoints on the held-out test split; with
    `horizon`, train both again for horizon x TIME_BUDGET first (horizon.confirm_horizon)."""
    from .evaluator import evaluate_checkpoint
    from .fingerprint import Fingerprinter
    from .gitrepo import GitRepo

    root = find_workspace(workspace)
    ledger = session_ledger(root, tag)
    tag = ledger.run_dir.name
    session = ledger.read_session() or {}
    if not session.get("fingerprints"):
        raise WorkspaceError(
            f"session {tag} was not sealed: `confirm` needs the checkpoints and data "
            "fingerprints a sealed session keeps (run one with the default `sealed = true`)"
        )
    exps = ledger.experiments()
    best = ledger.best()
    if not exps or exps[0].status != Status.keep or best is None:
        raise WorkspaceError(f"session {tag} has no measured baseline: nothing to confirm")
    preset = session["preset"]
    device, _ = resolve_device(device, preset)
    dataset = Path(session["dataset"])
    prints = {k: v for k, v in session["fingerprints"].items() if k != "preset"}
    Fingerprinter(root, dataset, preset, session.get("time_budget", 0.0)).check(
        prints, tag=tag, when="by `autoresearch confirm`"
    )
    isolation = runner.network_isolation()
    if horizon is not None:
        _confirm_horizon(
            root, ledger, session, (exps[0], best), horizon, seeds, device, prints, isolation
        )
        return
    rows = []
    for role, exp in (("baseline", exps[0]), ("best", best)):
        if rows and exp.id == rows[0]["id"]:
            break  # nothing was kept after the baseline
        checkpoint = ledger.run_dir / "checkpoints" / f"{exp.id:04d}.pt"
        if not checkpoint.is_file():
            raise WorkspaceError(
                f"no checkpoint kept for experiment {exp.id:04d} ({checkpoint} is missing): "
                "confirm works on sessions run with sealed evaluation"
            )
        repo = GitRepo(root)
        try:
            source = repo.show_file(exp.commit, "train.py")
        finally:
            repo.close()
        out.print(f"evaluating exp {exp.id:04d} ({role}) on the test split…", highlight=False)
        with tempfile.TemporaryDirectory(prefix="autoresearch-confirm-") as tmp:
            train_file = Path(tmp) / "train.py"
            train_file.write_text(source, encoding="utf-8")
            result = evaluate_checkpoint(
                root,
                checkpoint,
                split="test",
                preset=preset,
                device=device,
                timeout=CONFIRM_TIMEOUT_S,
                log_path=ledger.run_dir / "confirm" / f"{exp.id:04d}.test.log",
                fingerprints=prints,
                train_file=train_file,
                dataset=dataset,
                prefix=isolation.prefix,
            )
        rows.append(
            {
                "id": exp.id,
                "role": role,
                "val_bpb": exp.val_bpb,
                "test_bpb": result.val_bpb if result.ok else None,
                "status": result.status,
                "reason": result.reason,
            }
        )
    _confirm_table(tag, rows)
    ledger.update_session(confirm={"at": _now(), "split": "test", "rows": rows})


def _confirm_horizon(
    root: Path,
    ledger: Ledger,
    session: dict,
    pair: tuple[Experiment, Experiment],
    horizon: float,
    seeds: int,
    device: str,
    prints: dict,
    isolation: runner.Isolation,
) -> None:
    from .gitrepo import GitRepo
    from .horizon import FILE, confirm_horizon

    if pair[0].id == pair[1].id:
        raise WorkspaceError(
            f"session {ledger.run_dir.name} kept nothing after its baseline: no gain to confirm"
        )
    repo = GitRepo(root)
    try:
        sources = [repo.show_file(exp.commit, "train.py") for exp in pair]
    finally:
        repo.close()
    budget = float(session.get("time_budget") or 0.0)
    out.print(
        f"training the baseline (exp {pair[0].id:04d}) and the best (exp {pair[1].id:04d}) for "
        f"{horizon:g} x {budget:g} s, {seeds} seed(s) each…",
        highlight=False,
    )
    record = confirm_horizon(
        root,
        ledger.run_dir,
        baseline=(pair[0], sources[0]),
        best=(pair[1], sources[1]),
        horizon=horizon,
        seeds=seeds,
        time_budget=budget,
        preset=session["preset"],
        device=device,
        dataset=Path(session["dataset"]),
        fingerprints=prints,
        prefix=isolation.prefix,
        on_run=lambda r: out.print(
            f"  {r['role']} seed {r['seed']}: {r['status']}, val_bpb {r['val_bpb']}, "
            f"test_bpb {r['test_bpb']}",
            highlight=False,
        ),
    )
    (ledger.run_dir / FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")
    gains = ", ".join(
        f"{k} {record[k]:+.6f}" if record[k] is not None else f"{k} —"
        for k in ("session_gain", "val_gain", "test_gain")
    )
    answer = {True: "holds", False: "does NOT hold", None: "is unknown (a run failed)"}
    out.print(
        f"gain (baseline − best): {gains}. At {horizon:g} x TIME_BUDGET the session's gain "
        f"{answer[record['holds']]}; recorded in {ledger.run_dir / FILE}",
        highlight=False,
    )


def _confirm_table(tag: str, rows: list[dict]) -> None:
    table = Table(title=f"session {tag}: held-out test split", title_justify="left")
    for col in ("exp", "", "val_bpb", "test_bpb"):
        table.add_column(col)

    def num(x: float | None) -> str:
        return "—" if x is None else f"{x:.6f}"

    for r in rows:
        test = num(r["test_bpb"]) if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
        table.add_row(f"{r['id']:04d}", r["role"], num(r["val_bpb"]), test)
    if len(rows) == 2 and all(r["val_bpb"] is not None and r["test_bpb"] is not None for r in rows):
        dv = rows[1]["val_bpb"] - rows[0]["val_bpb"]
        dt = rows[1]["test_bpb"] - rows[0]["test_bpb"]
        table.add_row("", "Δ", f"{dv:+.6f}", f"{dt:+.6f}")
    out.print(table)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def show_config(*, workspace: Path | None) -> None:
    root = find_workspace(workspace)
    settings = resolve({}, root, os.environ)
    table = Table(title=Text(f"settings for {root}"), title_justify="left")
    for col in ("setting", "value", "from"):
        table.add_column(col)
    for key, value, source in settings.rows():
        # Text cells: a value or a source such as "pyproject.toml [tool.autoresearch]"
        # would otherwise be read as rich markup and lose its brackets.
        table.add_row(Text(key), Text("—" if value is None else str(value)), Text(source))
    out.print(table)
    out.print(
        f"agent in use: {settings.agent_name}. Precedence: flag > environment > "
        "pyproject.toml [tool.autoresearch] > default.",
        highlight=False,
        markup=False,
    )


def report(*, workspace: Path | None, tag: str | None) -> None:
    from .report import write_report

    root = find_workspace(workspace)
    ledger = session_ledger(root, tag)
    png, html = write_report(root, ledger.run_dir.name)
    out.print(f"wrote {png}\nwrote {html}", highlight=False, markup=False)


# ------------------------------------------------------------------ reading the record


def session_ledger(root: Path, tag: str | None) -> Ledger:
    """The ledger of `tag`, or of the most recently started session."""
    runs = root / RUNS_DIR
    if tag is None:
        candidates = (
            sorted((p for p in runs.glob("*/experiments.jsonl")), key=lambda p: p.stat().st_mtime)
            if runs.is_dir()
            else []
        )
        if not candidates:
            raise WorkspaceError(f"no sessions in {runs}: start one with `autoresearch run`")
        return Ledger(candidates[-1].parent)
    ledger = Ledger(runs / tag)
    if not (runs / tag / "experiments.jsonl").is_file():
        known = (
            sorted(p.parent.name for p in runs.glob("*/experiments.jsonl")) if runs.is_dir() else []
        )
        raise WorkspaceError(
            f"no session {tag!r} in {runs}" + (f" (sessions: {', '.join(known)})" if known else "")
        )
    return ledger


def _counts(exps: list[Experiment]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for e in exps:
        counts[e.status] = counts.get(e.status, 0) + 1
    return counts


def status(*, workspace: Path | None, tag: str | None, as_json: bool) -> None:
    root = find_workspace(workspace)
    ledger = session_ledger(root, tag)
    exps = ledger.experiments()
    best = ledger.best()
    baseline = exps[0] if exps else None
    session = ledger.read_session() or {}
    busy = busy_percent(exps)
    device = session.get("device") or session.get("preset")
    state = session_state(session)
    if as_json:
        payload = {
            "tag": ledger.run_dir.name,
            "branch": session.get("branch"),
            "state": state,
            "end_reason": session.get("end_reason"),
            "baseline_bpb": baseline.val_bpb if baseline else None,
            "best": {
                "id": best.id,
                "val_bpb": best.val_bpb,
                "commit": best.commit,
                "description": best.description,
            }
            if best
            else None,
            "counts": _counts(exps),
            "in_flight": in_flight(ledger.read_state()) if state == "running" else [],
            "busy": {"device": device_name(device), "percent": busy},
            # the same number under its older name, for GPU sessions only
            "gpu_busy_percent": busy if device_name(device) == "GPU" else None,
            "experiments": [
                {
                    "id": e.id,
                    "status": e.status,
                    "val_bpb": e.val_bpb,
                    "commit": e.commit,
                    "description": e.description,
                    "crash_class": e.crash_class,
                    "memory_gb": e.memory_gb,
                    "train_seconds": e.train_seconds,
                    "agent": e.agent,
                }
                for e in exps
            ],
        }
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        return
    table = Table(title=f"session {ledger.run_dir.name}", title_justify="left")
    for col in ("exp", "commit", "val_bpb", "Δ", "status", "description"):
        table.add_column(col, no_wrap=col != "description")
    for e in exps:
        table.add_row(
            f"{e.id:04d}",
            (e.commit or "")[:7],
            f"{e.val_bpb:.6f}" if e.val_bpb is not None else "—",
            format_delta(e),
            Text(e.status, style=STATUS_STYLE.get(e.status, ""))
            + Text(f" ({e.crash_class})" if e.crash_class else ""),
            e.description,
        )
    out.print(table)
    counts = ", ".join(f"{n} {s}" for s, n in sorted(_counts(exps).items()))
    out.print(f"{plural(len(exps), 'experiment')}: {counts or 'none'}")
    if best and baseline and best.val_bpb is not None and baseline.val_bpb is not None:
        out.print(
            f"best: exp {best.id:04d} val_bpb {best.val_bpb:.6f} "
            f"(baseline {baseline.val_bpb:.6f}, Δ {best.val_bpb - baseline.val_bpb:+.6f}) "
            f"{best.description}"
        )
    out.print(busy_line(exps, device))
    out.print(_state_line(state, session, ledger.run_dir.name))
    if state == "running":
        for line in in_flight_lines(ledger.read_state()):
            out.print(line, highlight=False, markup=False)
    if stale := stale_prepare(root, session_running=state == "running"):
        out.print(stale, markup=False, highlight=False)


def in_flight(state: dict | None) -> list[dict]:
    """What a running session has in flight, one entry per slot (state.json)."""
    if not state:
        return []
    if "slots" in state:
        return [{"slot": name, **entry} for name, entry in sorted(state["slots"].items())]
    return [{"slot": "0", **state}] if state.get("id") is not None else []


def in_flight_lines(state: dict | None) -> list[str]:
    """`slot 1: exp 0003 training for 2m05s: WIDTH to 128`, one line per slot."""
    lines = []
    for e in in_flight(state):
        since = e.get("since")
        took = ""
        if since:
            seconds = (datetime.now(timezone.utc) - datetime.fromisoformat(since)).total_seconds()
            took = f" for {int(seconds // 60)}m{int(seconds % 60):02d}s"
        what = f": {e['description']}" if e.get("description") else ""
        card = f" (card {e['card']})" if e.get("card") else ""
        lines.append(f"slot {e['slot']}{card}: exp {e['id']:04d} {e.get('phase', '?')}{took}{what}")
    return lines


def session_state(session: dict) -> str:
    """`ended` (session.json says why), `running` (its process is alive) or `killed`
    (neither: it died without a word, kill -9 or power loss)."""
    if session.get("end_reason"):
        return "ended"
    pid = session.get("pid")
    if isinstance(pid, int) and pid > 0:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return "killed"
        except PermissionError:
            return "running"  # alive, another user's
        return "running"
    return "killed"


def _state_line(state: str, session: dict, tag: str) -> str:
    if state == "ended":
        return f"ended: {session['end_reason']}"
    if state == "running":
        return f"running (pid {session['pid']})"
    return (
        "not running, and no end was recorded: the session was killed; continue it with "
        f"`autoresearch run --resume --tag {tag}`"
    )


def log(*, workspace: Path | None, tag: str | None) -> None:
    root = find_workspace(workspace)
    exps = session_ledger(root, tag).experiments()
    keeps = [e for e in exps if e.status == Status.keep]
    if not keeps:
        out.print("no experiments kept yet")
        return
    for e in keeps:
        if e.best_before is None:
            out.print(f"exp {e.id:04d} {(e.commit or '')[:7]} baseline val_bpb {e.val_bpb:.6f}")
            continue
        out.print(
            f"exp {e.id:04d} {(e.commit or '')[:7]} val_bpb {e.best_before:.6f} → {e.val_bpb:.6f} "
            f"({e.val_bpb - e.best_before:+.6f})  {e.description}"
        )


def run_log_name(run: int) -> str:
    """The log file of a commit's run number `run` (1-based) in its experiment's folder,
    as the loop names them: run.log, run-2.log, …"""
    return "run.log" if run <= 1 else f"run-{run}.log"


def show(*, workspace: Path | None, tag: str | None, exp_id: int) -> None:
    """One experiment, every number labelled with the run it comes from."""
    root = find_workspace(workspace)
    ledger = session_ledger(root, tag)
    exp = ledger.get(exp_id)
    if exp is None:
        raise UsageError(
            f"no experiment {exp_id} in session {ledger.run_dir.name} (see `autoresearch status`)"
        )
    runs = [r for r in measured_runs(ledger.run_dir, exp) if r.get("purpose") != "remeasure"]
    judged = len((exp.extra or {}).get("runs") or []) or len(runs)
    out.print(result_line(exp))
    out.print(f"why: {decision_of(exp).reason}")
    if exp.val_bpb is not None and judged > 1:
        out.print(f"val_bpb {exp.val_bpb:.6f} is the mean of runs 1–{judged}")
    out.print(f"commit {exp.commit or '—'}  parent {exp.parent[:12]}  ref {exp.attempt_ref or '—'}")
    if exp.agent:
        # Fields the agent did not use (None) say nothing: left out.
        shown = ", ".join(f"{k} {v}" for k, v in exp.agent.items() if v is not None)
        out.print(f"agent {shown}")
    if exp.extra.get("reason"):
        out.print(f"reason: {exp.extra['reason']}")
    exp_dir = ledger.run_dir / f"{exp_id:04d}"
    if runs:
        out.rule("runs")
        for number, r in enumerate(runs, start=1):
            paired = r.get("partner_val_bpb")
            against = f"  · the best, same seed: {paired:.6f}" if paired is not None else ""
            out.print(
                f"run {number}  seed {r.get('seed', '—')}  val_bpb {r['val_bpb']:.6f}  "
                f"({r.get('purpose', '')}; log {run_log_name(number)}){against}"
            )
    patch = exp_dir / "patch.diff"
    if patch.is_file():
        out.rule("diff")
        out.print(patch.read_text(encoding="utf-8"))
    # The record keeps the summary of the last run only (a crashed repeat included): the
    # last log on disk is that run's.
    last = max(judged, 1)
    while (exp_dir / run_log_name(last + 1)).is_file():
        last += 1
    if exp.metrics:
        out.rule(f"metrics: train.py's summary of the last run, run {last}")
        for key, value in exp.metrics.items():
            out.print(f"{key + ':':<18}{value}")
    run_log = exp_dir / run_log_name(last)
    if run_log.is_file():
        out.rule(f"log tail: {run_log.name}")
        lines = run_log.read_text(encoding="utf-8", errors="replace").splitlines()
        out.print("\n".join(lines[-30:]))


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
