"""`autoresearch confirm`: the baseline's and the best's checkpoints evaluated on the held-out
test split, and with `--horizon K` both trained again for K x TIME_BUDGET (horizon.py).

It needs a sealed session with a measured baseline and data that still match the session's
fingerprints; otherwise it raises (WorkspaceError, or the fingerprint check's error) before
any evaluation. A checkpoint found missing raises WorkspaceError when its turn comes. The results go to session.json (`confirm`)
or the horizon file, never into the experiments' record.
"""

from __future__ import annotations

import json
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from rich.table import Table

from . import runner
from .errors import WorkspaceError
from .evalproto import EvalStatus
from .ledger import Experiment, Ledger
from .presets import resolve_device
from .status import Status
from .views import out, session_ledger
from .workspace import find_workspace

CONFIRM_TIMEOUT_S = 1800.0  # seconds one test-split evaluation may take


def confirm(
    *,
    workspace: Path | None,
    tag: str | None,
    device: str | None,
    horizon: float | None = None,
    seeds: int = 1,
    unsandboxed: bool | None = None,
) -> None:
    """Evaluate the baseline's and the best's checkpoints on the held-out test split; with
    `horizon`, train both again for horizon x TIME_BUDGET first (horizon.confirm_horizon).
    The candidate code runs in the box, as the session's did: SandboxError where it is
    missing, unless `unsandboxed` (or the session ran without it, for None)."""
    from .evaluator import evaluate_checkpoint
    from .fingerprint import Fingerprinter
    from .gitrepo import GitRepo
    from .horizon import box_for

    root = find_workspace(workspace)
    ledger = session_ledger(root, tag)
    tag = ledger.run_dir.name
    session = ledger.read_session() or {}
    if not session.get("fingerprints"):
        raise WorkspaceError(
            f"session {tag} was not sealed: `confirm` needs the checkpoints and data "
            "fingerprints a sealed session keeps (run one with the default `sealed = true`)"
        )
    baseline, best = ledger.baseline(), ledger.best()
    if baseline is None or baseline.status != Status.keep or best is None:
        raise WorkspaceError(f"session {tag} has no measured baseline: nothing to confirm")
    preset = session["preset"]
    device, _ = resolve_device(device, preset)
    dataset = Path(session["dataset"])
    prints = {k: v for k, v in session["fingerprints"].items() if k != "preset"}
    Fingerprinter(root, dataset, preset, session.get("time_budget", 0.0)).check(
        prints, tag=tag, when="by `autoresearch confirm`"
    )
    isolation = runner.network_isolation()
    box = box_for(ledger.run_dir, unsandboxed)  # before any run: a missing box is said first
    if horizon is not None:
        _confirm_horizon(
            root, ledger, session, (baseline, best), horizon, seeds, device, prints, isolation,
            unsandboxed=box is None,
        )  # fmt: skip
        return
    rows = []
    for role, exp in (("baseline", baseline), ("best", best)):
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
                boxed=box is not None,
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
    ledger.update_session(
        confirm={"at": _now(), "split": "test", "boxed": box is not None, "rows": rows}
    )


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
    *,
    unsandboxed: bool,
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
        unsandboxed=unsandboxed,
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
        test = (
            num(r["test_bpb"]) if r["status"] == EvalStatus.ok else f"{r['status']}: {r['reason']}"
        )
        table.add_row(f"{r['id']:04d}", r["role"], num(r["val_bpb"]), test)
    if len(rows) == 2 and all(r["val_bpb"] is not None and r["test_bpb"] is not None for r in rows):
        dv = rows[1]["val_bpb"] - rows[0]["val_bpb"]
        dt = rows[1]["test_bpb"] - rows[0]["test_bpb"]
        table.add_row("", "Δ", f"{dv:+.6f}", f"{dt:+.6f}")
    out.print(table)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
