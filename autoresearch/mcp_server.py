"""`autoresearch mcp`: the `try` workflow as Model Context Protocol tools, over stdio.

For coding agents that speak MCP: `try_experiment(description)` runs the working tree's
train.py as one experiment and returns the verdict `autoresearch try --json` prints;
`status`, `show(experiment_id)` and `history` read the session's record.

Guarantees: each experiment runs as its own `autoresearch try` process, so it is exactly
the CLI's (the workspace lock, the refusals, the exit statuses, a kill -9 of it leaves what a
killed `try` leaves) and nothing it prints can reach the protocol's stdout. The reading tools
only read runs/<tag>/. The SDK (`pip install 'autoresearch[mcp]'`) is imported only when the
server starts.

What it does not do: edit train.py (the agent does), or run more than one experiment at a time
(a second call while one runs gets the `busy` verdict).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .commands import run_log_name, session_ledger
from .errors import UsageError
from .ledger import baseline_of, decision_of
from .workspace import find_workspace

LOG_TAIL_LINES = 30
INSTRUCTIONS = (
    "Research loop for train.py: edit train.py in the workspace, then call try_experiment "
    "with a one-line description; the verdict says keep, discard, crash or refused, and the "
    "working tree is left at the best train.py. Never edit prepare.py or run git yourself."
)


def serve(*, workspace: Path | None, tag: str | None) -> None:
    """Run the MCP server on stdin/stdout until the client closes it."""
    try:
        from mcp.server.mcpserver import MCPServer
    except ImportError:
        raise UsageError(
            "`autoresearch mcp` needs the MCP Python SDK (version 2): install it with "
            "`pip install 'autoresearch[mcp]'`"
        ) from None
    root = find_workspace(workspace)
    server = MCPServer("autoresearch", instructions=INSTRUCTIONS)

    @server.tool()
    async def try_experiment(description: str) -> dict:
        """Run the working tree's train.py as one experiment (baseline first on a new session)
        and return the verdict: status (keep, discard, crash, invalid, refused, busy),
        val_bpb, delta against the best, noise_bar, sigma, runs, crash_class and log_tail."""
        import anyio

        proc = await anyio.run_process(
            _try_command(root, tag, description), check=False, stderr=subprocess.PIPE
        )
        return _verdict_of(proc.returncode, proc.stdout.decode(), proc.stderr.decode())

    @server.tool()
    def status() -> dict:
        """The session: best experiment, counts by status, and why it last ended."""
        return session_status(root, tag)

    @server.tool()
    def show(experiment_id: int) -> dict:
        """One experiment: its record, the keep rule's reason, its diff and its log tail."""
        return show_experiment(root, tag, experiment_id)

    @server.tool()
    def history() -> list[dict]:
        """Every experiment in order: id, status, val_bpb, delta against the best before it,
        description."""
        return session_history(root, tag)

    server.run("stdio")


def _try_command(root: Path, tag: str | None, description: str) -> list[str]:
    tag_args = ["--tag", tag] if tag else []
    return [
        sys.executable,
        "-m",
        "autoresearch",
        "try",
        "-m",
        description,
        "--json",
        *tag_args,
        "--workspace",
        str(root),
    ]


def _verdict_of(code: int, stdout: str, stderr: str) -> dict:
    """The `try --json` verdict, or, when it printed none (an error before the experiment),
    its exit status and message."""
    try:
        return json.loads(stdout)
    except ValueError:
        message = "\n".join(stderr.strip().splitlines()[-LOG_TAIL_LINES:])
        return {"status": "error", "exit_code": code, "reason": message}


def session_status(root: Path, tag: str | None) -> dict:
    ledger = session_ledger(root, tag)
    exps = ledger.experiments()
    best, baseline = ledger.best(), baseline_of(exps)
    counts: dict[str, int] = {}
    for e in exps:
        counts[e.status] = counts.get(e.status, 0) + 1
    session = ledger.read_session() or {}
    return {
        "tag": ledger.run_dir.name,
        "branch": session.get("branch"),
        "baseline_bpb": baseline.val_bpb if baseline else None,
        "best": None
        if best is None
        else {"id": best.id, "val_bpb": best.val_bpb, "description": best.description},
        "counts": counts,
        "end_reason": session.get("end_reason"),
    }


def session_history(root: Path, tag: str | None) -> list[dict]:
    return [
        {
            "id": e.id,
            "status": e.status,
            "val_bpb": e.val_bpb,
            "delta": None
            if e.val_bpb is None or e.best_before is None
            else e.val_bpb - e.best_before,
            "description": e.description,
            "crash_class": e.crash_class,
        }
        for e in session_ledger(root, tag).experiments()
    ]


def show_experiment(root: Path, tag: str | None, experiment_id: int) -> dict:
    ledger = session_ledger(root, tag)
    exp = ledger.get(experiment_id)
    if exp is None:
        raise UsageError(f"no experiment {experiment_id} in session {ledger.run_dir.name}")
    folder = ledger.run_dir / f"{experiment_id:04d}"  # read only: never created here
    runs = len((exp.extra or {}).get("runs") or []) or 1
    log = folder / run_log_name(runs)
    patch = folder / "patch.diff"
    return {
        "id": exp.id,
        "status": exp.status,
        "description": exp.description,
        "val_bpb": exp.val_bpb,
        "best_before": exp.best_before,
        "reason": decision_of(exp).reason,
        "crash_class": exp.crash_class,
        "commit": exp.commit,
        "attempt_ref": exp.attempt_ref,
        "metrics": exp.metrics,
        "diff": patch.read_text(encoding="utf-8") if patch.is_file() else "",
        "log_tail": "\n".join(
            log.read_text(encoding="utf-8", errors="replace").splitlines()[-LOG_TAIL_LINES:]
        )
        if log.is_file()
        else "",
    }
