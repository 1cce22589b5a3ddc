"""horizon.py's runs go through the same box as a session's (sandbox.py), unless the session
ran with --unsandboxed. Real boxed children on the prepared stdlib data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from autoresearch import horizon, sandbox
from autoresearch.fingerprint import active_dataset

pytestmark = pytest.mark.skipif(not sandbox.probe().available, reason=sandbox.probe().note)

# a train.py that tries to read the validation shard, then saves a checkpoint as train.py does
TRAIN = """\
import os
try:
    open({val!r}, "rb").read(1)
    print("DONE read val", flush=True)
except OSError as error:
    print("BLOCKED read val:", error, flush=True)
print("outside", "visible" if os.path.exists({outside!r}) else "hidden", flush=True)
with open(os.environ["AUTORESEARCH_CHECKPOINT"], "wb") as f:
    f.write(b"weights")
print("---")
print("num_steps: 1")
"""


@pytest.fixture
def cache(stdlib_prepared: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in [n for n in os.environ if n.startswith(("AUTORESEARCH_", "OPENAI_"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(stdlib_prepared))
    return stdlib_prepared


@pytest.mark.parametrize("boxed", [True, False], ids=["boxed", "unsandboxed"])
def test_a_horizon_run_trains_in_the_box(cache: Path, tmp_path: Path, boxed: bool) -> None:
    """Boxed, the run cannot read the validation shard or a file of the user's outside the run, and its
    checkpoint is taken out of the box to where the evaluation looks for it; unsandboxed
    (the session's recorded choice), it runs with the user's rights, as the session's did."""
    dataset = active_dataset()
    manifest = json.loads((dataset / "manifest.json").read_text())
    val = dataset / manifest["splits"]["val"]["shards"][0]["file"]
    workdir = tmp_path / "work"
    workdir.mkdir()
    outside = tmp_path / "earlier-run-weights.pt"  # a file of the user's, outside the run
    outside.write_bytes(b"old weights")
    (workdir / "train.py").write_text(TRAIN.format(val=str(val), outside=str(outside)))
    result, checkpoint = horizon.train(
        workdir,
        tmp_path / "run.log",
        seed=1000,
        budget=1.0,
        preset="cpu",
        device="cpu",
        dataset=dataset,
        prefix=(),
        box=sandbox.probe() if boxed else None,
    )
    log = result.log_path.read_text()
    assert result.exit_code == 0, log
    assert checkpoint.read_bytes() == b"weights"
    if boxed:
        assert "BLOCKED read val" in log and "outside hidden" in log, log
    else:
        assert "DONE read val" in log and "outside visible" in log, log


def test_the_box_follows_the_sessions_choice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """None: as the session ran (session.json's sandbox.unsandboxed); where the box is
    missing and the session did not choose to run without it, confirm stops."""
    run_dir = tmp_path / "runs" / "tag"
    run_dir.mkdir(parents=True)
    assert horizon.box_for(run_dir, None) == sandbox.probe()  # no record: boxed
    (run_dir / "session.json").write_text(json.dumps({"sandbox": {"unsandboxed": True}}))
    assert horizon.box_for(run_dir, None) is None
    (run_dir / "session.json").write_text(json.dumps({"sandbox": {"unsandboxed": False}}))
    assert horizon.box_for(run_dir, None) == sandbox.probe()
    assert horizon.box_for(run_dir, True) is None
    # the one fake: a machine without the box
    monkeypatch.setattr(sandbox, "probe", lambda: sandbox.Box(False, "no box: test"))
    with pytest.raises(sandbox.SandboxError, match="--unsandboxed"):
        horizon.box_for(run_dir, None)
    (run_dir / "session.json").write_text(json.dumps({"sandbox": {"unsandboxed": True}}))
    assert horizon.box_for(run_dir, None) is None
