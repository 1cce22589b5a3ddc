"""`--backend ray`: runs as Ray tasks on a local Ray cluster standing in for many hosts.

One cluster for the module (`ray.init` in this process, two CPUs); the sessions are the real
CLI in subprocesses connected to it with `--address`, over a stub workspace (loopkit.py) on
the cpu preset; marked slow. A Ray worker is killed by the pid its run wrote (the parent of
train.py); the coordinator is killed -9 and resumed. The tests that need Ray skip where it is
not installed; the one about a missing Ray runs anyway.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from loopkit import (
    STUB_TRAIN,
    cli,
    git,
    make_workspace,
    replay_args,
    reply,
    results_rows,
    run_args,
    stub_bpb,
    stub_cli_env,
)

from autoresearch.fingerprint import Fingerprinter, FingerprintError, sha256_file
from autoresearch.noise import seed_of
from autoresearch.options import SessionOptions

TAG = "r2"
needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None,
    reason="Ray is not installed (pip install 'autoresearch[ray]')",
)


# the stub, stopping after its first step while GATE is set and missing: it writes the pid of
# its parent (the Ray worker running the task) to GATE.pids and its own to GATE.runs first
GATED_TRAIN = STUB_TRAIN.replace(
    "import time\n", "import os\nimport time\nfrom pathlib import Path\n"
).replace(
    "        time.sleep(SLEEP)\n",
    "        time.sleep(SLEEP)\n"
    "        if GATE and i == 1:\n"
    "            with open(GATE + '.runs', 'a') as f:\n"
    "                f.write(f'{os.getpid()}\\n')\n"
    "            with open(GATE + '.pids', 'a') as f:\n"
    "                f.write(f'{os.getppid()}\\n')\n"
    "            while not Path(GATE).exists():\n"
    "                time.sleep(0.05)\n",
)


@pytest.fixture(scope="module")
def cluster():
    """A Ray cluster of this host with two CPUs, for the module; its address."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _records(ws: Path) -> list[dict]:
    path = ws / "runs" / TAG / "experiments.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _measurements(ws: Path) -> list[dict]:
    path = ws / "runs" / TAG / "measurements.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _dataset(path: Path, val: bytes) -> Path:
    """A dataset whose manifest records the sha256 of its files (what fingerprint.py reads)."""
    path.mkdir(parents=True, exist_ok=True)
    files = {"tokenizer.pkl": b"tokenizer", "token_bytes.pt": b"bytes", "val.bin": val}
    files["test.bin"] = b"test tokens"
    for name, data in files.items():
        (path / name).write_bytes(data)
    digest = {name: sha256_file(path / name) for name in files}
    manifest = {
        "tokenizer": {"file": "tokenizer.pkl", "sha256": digest["tokenizer.pkl"]},
        "token_bytes": {"file": "token_bytes.pt", "sha256": digest["token_bytes.pt"]},
        "splits": {
            split: {"shards": [{"file": f"{split}.bin"}], "sha256": digest[f"{split}.bin"]}
            for split in ("val", "test")
        },
    }
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def _wait_for(pids: Path, proc: subprocess.Popen, log: Path) -> None:
    """Until the run at the gate has written its pids (a whole line), while the session lives."""
    deadline = time.monotonic() + 300  # guards a hang only
    while not pids.is_file() or not pids.read_text().endswith("\n"):
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)


def _gone(pid: int) -> bool:
    """Whether `pid` ended (or is a zombie) within a generous deadline."""
    deadline = time.monotonic() + 120  # guards a hang only
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state in "ZX":
            return True
        time.sleep(0.05)
    return False


def _gated_workspace(tmp_path: Path) -> tuple[Path, Path]:
    """A workspace whose train.py waits at its gate file (GATED_TRAIN), and that file."""
    gate = tmp_path / "gate"
    source = GATED_TRAIN.replace(
        "SLEEP = 0.0  # seconds per step\n",
        f"SLEEP = 0.0  # seconds per step\nGATE = {str(gate)!r}\n",
    )
    return make_workspace(tmp_path / "ws", source), gate


def _patches(tmp_path: Path, *replies: str) -> Path:
    patches = tmp_path / "patches"
    patches.mkdir()
    for i, text in enumerate(replies, 1):
        (patches / f"{i:02d}.txt").write_text(text)
    return patches


def _lr(old: str, new: str) -> tuple[str, str]:
    return f"LR = {old}  # learning rate", f"LR = {new}  # learning rate"


def test_backend_ray_without_ray_says_how_to_install_it(tmp_path: Path) -> None:
    """With `import ray` failing (a sitecustomize hides it), the session does not start."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['ray'] = None\n")
    ws = make_workspace(tmp_path / "ws")
    env = stub_cli_env(tmp_path)
    env["PYTHONPATH"] = f"{hide}{os.pathsep}{env['PYTHONPATH']}"
    patches = _patches(tmp_path, reply("LR to 0.06", _lr("0.04", "0.06")))
    args = run_args(TAG, *replay_args(patches), "--backend", "ray", "--workers", "2", n=2)
    done = cli(ws, *args, "--unsandboxed", env=env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "pip install 'autoresearch[ray]'" in " ".join((done.stdout + done.stderr).split())
    assert git(ws, "branch", "--list", f"autoresearch/{TAG}") == ""  # nothing started


@pytest.mark.slow  # with the cluster's start (about 15 s on two cores): about 30 s
@needs_ray
def test_a_session_on_ray_retrains_a_run_whose_worker_was_killed_and_records_it_once(
    cluster: str, tmp_path: Path
) -> None:
    """`--backend ray --workers 2`: the baseline's Ray worker is killed mid-run (SIGKILL to the
    pid the run wrote); the baseline is trained again and recorded once, then two candidates
    train as Ray tasks; the record, the branch and the measurements agree."""
    ws, gate = _gated_workspace(tmp_path)
    env = stub_cli_env(tmp_path)
    patches = _patches(
        tmp_path,
        reply("LR to 0.06", _lr("0.04", "0.06")),
        reply("WIDTH to 128", ("WIDTH = 64  # model width", "WIDTH = 128  # model width")),
    )
    # unsandboxed: the box would hide the gate (a file of the test's) from the run
    args = run_args(TAG, *replay_args(patches), "--backend", "ray", "--workers", "2", n=3)
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "autoresearch", *args, "--unsandboxed",
             "--address", cluster, "--workspace", str(ws)],
            cwd=ws, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    pids = Path(str(gate) + ".pids")
    try:
        _wait_for(pids, proc, log)
        worker = int(pids.read_text().split()[0])
        child = int(Path(str(gate) + ".runs").read_text().split()[0])
        os.kill(worker, signal.SIGKILL)  # the Ray worker running the baseline's task
        # its training child dies with it, still at the gate: nothing of the run keeps going
        assert _gone(child), f"train.py of the killed Ray worker still runs (pid {child})"
        gate.touch()  # the run trained again passes the gate
        assert proc.wait(timeout=600) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        gate.touch()
    text = " ".join(log.read_text().split())
    assert "its Ray worker was lost" in text, text
    trained = pids.read_text().split()  # the worker of every run that reached step 1
    assert trained[0] not in trained[1:]  # the killed worker trained nothing more
    recs = _records(ws)
    assert sorted(r["id"] for r in recs) == [1, 2, 3]  # every id once
    assert len(results_rows(ws, TAG)) == 3
    assert recs[0]["status"] == "keep" and recs[0]["val_bpb"] == pytest.approx(stub_bpb())
    rows = _measurements(ws)
    # the baseline's two calibration runs (the cpu default), each seed once: the lost run
    # (seed 1000) was trained again and counted once
    assert sorted(r["seed"] for r in rows if r["exp"] == 1) == [seed_of(0), seed_of(1)]
    assert len(trained) == len(rows) + 1  # every run measured once, and the lost one
    import ray

    node = ray.get_runtime_context().get_node_id()  # the one node of the test's cluster
    assert all(r["node"] == node and r["gpu"] is None for r in rows), rows  # where it trained
    best = [r for r in recs if r["status"] == "keep"][-1]
    assert git(ws, "rev-parse", "HEAD") == best["commit"]
    assert git(ws, "status", "--porcelain") == ""
    assert {r["extra"]["slot"] for r in recs[1:]} == {"0", "1"}  # both slots trained
    for rec in recs:  # the run's log came back into the experiment's folder
        logs = list((ws / "runs" / TAG / f"{rec['id']:04d}").glob("*.log"))
        assert logs and "val_bpb" in logs[0].read_text(), rec


@pytest.mark.slow  # with the cluster's start (about 15 s on two cores): about 30 s
@needs_ray
def test_a_node_whose_data_differs_refuses_to_train(cluster: str, tmp_path: Path) -> None:
    """The task on a node whose AUTORESEARCH_CACHE holds a modified copy of the dataset comes
    back `rejected` without training; on an unmodified copy the check passes. Sandboxed: each
    node (here: each AUTORESEARCH_CACHE) keeps its sandbox probe for the session."""
    import ray

    from autoresearch import sandbox
    from autoresearch.rayslot import BOX_PROBES_DIR, Payload, train_on_node

    ws = make_workspace(tmp_path / "ws")
    dataset = _dataset(tmp_path / "cache" / "stub", b"val tokens")
    boxed = sandbox.probe().available  # where bubblewrap works, as a session's default
    opts = SessionOptions(TAG, "cpu", "cpu", 10.0, sealed=True, unsandboxed=not boxed)
    prints = Fingerprinter(ws, dataset, opts.preset, opts.time_budget).take()
    payload = Payload(
        train=(ws / "train.py").read_bytes(), prepare=(ws / "prepare.py").read_bytes(),
        run=0, exp_id=1, label="baseline", log_name="run.log", keep=False, opts=opts,
        sealed={"dataset": str(dataset), "fingerprints": prints, "time_budget": 10.0},
    )  # fmt: skip
    same, other = tmp_path / "same", tmp_path / "other"
    shutil.copytree(dataset.parent, same)
    shutil.copytree(dataset.parent, other)
    _dataset(other / "stub", b"other val tokens")  # consistent in itself, but not the same
    task = ray.remote(max_retries=0, num_cpus=1)(train_on_node)

    def on_node(cache: Path):
        env = {"AUTORESEARCH_CACHE": str(cache)}
        return ray.get(task.options(runtime_env={"env_vars": env}).remote(payload))

    refused = on_node(other)
    assert refused.outcome.result.crash_class == "rejected"
    assert isinstance(refused.outcome.fatal, FingerprintError)
    assert "val.bin" in str(refused.outcome.fatal)
    assert f"node {refused.node} refused to train" in refused.outcome.result.log_tail
    assert refused.files == {}  # nothing trained, no log
    passed = on_node(same)
    assert passed.outcome.result.crash_class != "rejected"
    assert passed.outcome.fatal is None
    for cache in (other, same):  # where the node's runs of this session find the probe
        assert len(list((cache / BOX_PROBES_DIR).glob("*.json"))) == (1 if boxed else 0)
    assert "run.log" in passed.files  # it trained


@pytest.mark.slow  # about 30 s
@needs_ray
def test_a_session_on_ray_killed_9_mid_run_resumes_and_records_every_run_once(
    cluster: str, tmp_path: Path
) -> None:
    """The coordinator is killed (SIGKILL) while its baseline trains as a Ray task; `--resume`
    trains it again on the cluster and the record holds every experiment once."""
    ws, gate = _gated_workspace(tmp_path)
    env = stub_cli_env(tmp_path)
    patches = _patches(tmp_path, reply("LR to 0.06", _lr("0.04", "0.06")))
    args = run_args(TAG, *replay_args(patches), "--backend", "ray", "--workers", "2", n=2)
    command = [sys.executable, "-m", "autoresearch", *args, "--unsandboxed",
               "--address", cluster, "--workspace", str(ws)]  # fmt: skip
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command, cwd=ws, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    pids = Path(str(gate) + ".pids")
    try:
        _wait_for(pids, proc, log)
        os.killpg(proc.pid, signal.SIGKILL)  # the coordinator, with its baseline in flight
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        gate.touch()  # the orphaned run ends; the runs trained from now on pass the gate
    state = json.loads((ws / "runs" / TAG / "state.json").read_text())
    assert [e["id"] for e in state["slots"].values()] == [1]  # the baseline in flight
    resumed = cli(ws, *command[3:-2], "--resume", env=env)  # less --workspace: cli adds it
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    recs = _records(ws)
    assert [r["id"] for r in recs] == [1, 2]  # every experiment once
    assert recs[0]["status"] == "keep" and recs[0]["val_bpb"] == pytest.approx(stub_bpb())
    rows = _measurements(ws)
    assert sorted(r["seed"] for r in rows if r["exp"] == 1) == [seed_of(0), seed_of(1)]
    assert git(ws, "status", "--porcelain") == ""
    assert not (ws / "runs" / TAG / "state.json").exists()  # nothing in flight


def test_a_node_probes_its_sandbox_once_per_session(tmp_path: Path) -> None:
    """The first run of a session on a node probes bubblewrap and keeps the result in the
    node's cache; a later run of that session on that node reads it back (the note doctored in
    the file shows it was read, not probed); another session probes again."""
    from autoresearch import sandbox
    from autoresearch.rayslot import BOX_PROBES_DIR, node_box

    first = node_box("node-a", "job-1", tmp_path)
    if not first.available:
        pytest.skip(f"no box on this machine: {first.note}")
    assert first == sandbox.probe()
    (kept,) = (tmp_path / BOX_PROBES_DIR).iterdir()
    record = json.loads(kept.read_text())
    kept.write_text(json.dumps({**record, "note": "read back"}))
    assert node_box("node-a", "job-1", tmp_path).note == "read back"
    assert node_box("node-a", "job-2", tmp_path) == first  # another session: probed
    assert node_box("node-b", "job-1", tmp_path) == first  # another node: probed
    assert len(list((tmp_path / BOX_PROBES_DIR).iterdir())) == 3
