"""`--backend ray`: each slot's runs on the card of a Ray actor of its own, on a local Ray
cluster standing in for many hosts.

One cluster for the module (`ray.init` in this process, two CPUs; HOME moved to a temporary
folder and the cluster's token given in RAY_AUTH_TOKEN, so Ray writes nothing into the user's
home); the sessions are the real CLI in subprocesses connected to it with `--address`, over a
stub workspace (loopkit.py) on the cpu preset; marked slow. On the cpu a slot's actor holds one
CPU of Ray, and the record's `card` names the actor (the stand-in for a card). An actor is
killed by the pid its run wrote (the parent of train.py); the coordinator is killed -9 and
resumed. The tests that need Ray skip where it is not installed; the one about a missing Ray
runs anyway.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from loopkit import (
    STUB_TRAIN,
    alive,
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
pytestmark = pytest.mark.xdist_group("ray")  # one worker, one cluster (pytest-xdist)
needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None,
    reason="Ray is not installed (pip install 'autoresearch[ray]')",
)


# the stub, writing at its first step the pid of its parent (the Ray actor training it) to
# GATE.pids; a run whose seed is GATE_SEED (None: any) then stops while GATE is missing, after
# writing "<actor pid> <own pid>" to GATE.held
GATED_TRAIN = STUB_TRAIN.replace(
    "import time\n", "import os\nimport time\nfrom pathlib import Path\n"
).replace(
    "        time.sleep(SLEEP)\n",
    "        time.sleep(SLEEP)\n"
    "        if GATE and i == 1:\n"
    "            with open(GATE + '.pids', 'a') as f:\n"
    "                f.write(f'{os.getppid()}\\n')\n"
    "            seed = os.environ.get('AUTORESEARCH_SEED')\n"
    "            if GATE_SEED in (None, seed) and not Path(GATE).exists():\n"
    "                with open(GATE + '.held', 'a') as f:\n"
    "                    f.write(f'{os.getppid()} {os.getpid()}\\n')\n"
    "                while not Path(GATE).exists():\n"
    "                    time.sleep(0.05)\n",
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """A Ray cluster of this host with two CPUs, for the module; its address. Ray 2.60 turns
    on token authentication for a cluster ray.init starts and, given no token, writes one to
    ~/.ray/auth_token: the token is given here (the sessions inherit it), and HOME is a
    temporary folder in which nothing may appear."""
    import ray

    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))
        mp.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            assert not (home / ".ray").exists(), list((home / ".ray").iterdir())
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


def _held(gate: Path, proc: subprocess.Popen, log: Path) -> tuple[int, int]:
    """(actor pid, train.py pid) of the run held at the gate, once it wrote them (a whole
    line), while the session lives."""
    held = Path(str(gate) + ".held")
    deadline = time.monotonic() + 300  # guards a hang only
    while not held.is_file() or not held.read_text().endswith("\n"):
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    actor, child = held.read_text().split()[:2]
    return int(actor), int(child)


def _gone(pid: int) -> bool:
    """Whether `pid` ended (or is a zombie) within a generous deadline."""
    deadline = time.monotonic() + 120  # guards a hang only
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


def _kill_and_finish(actor: int, child: int, gate: Path, proc: subprocess.Popen, log: Path) -> None:
    """SIGKILL the Ray actor training the run held at the gate; its train.py dies with it,
    still at the gate (nothing of the run keeps going); then the gate opens for the run
    trained again, and the session must end well."""
    os.kill(actor, signal.SIGKILL)
    assert _gone(child), f"train.py of the killed Ray actor still runs (pid {child})"
    gate.touch()
    assert proc.wait(timeout=600) == 0, log.read_text()


def _gated_workspace(tmp_path: Path, seed: int | None = None) -> tuple[Path, Path]:
    """A workspace whose train.py writes its actor's pid and, when its seed is `seed` (None:
    any), waits at its gate file (GATED_TRAIN); and that file."""
    gate = tmp_path / "gate"
    source = GATED_TRAIN.replace(
        "SLEEP = 0.0  # seconds per step\n",
        f"SLEEP = 0.0  # seconds per step\nGATE = {str(gate)!r}\n"
        f"GATE_SEED = {None if seed is None else str(seed)!r}\n",
    )
    return make_workspace(tmp_path / "ws", source), gate


def _session(ws: Path, env: dict, log: Path, *args: str) -> subprocess.Popen:
    """The CLI's `args` in a process group of its own, its output to `log`."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "autoresearch", *args, "--workspace", str(ws)],
            cwd=ws, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def _by_slot(rows: list[dict]) -> dict[str, list[str]]:
    """The `card` of each slot's rows, in the order they were measured."""
    cards: dict[str, list[str]] = {}
    for r in rows:
        cards.setdefault(r["slot"], []).append(r["card"])
    return cards


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
    assert not (ws / "runs" / TAG).exists()


@pytest.mark.slow  # with the cluster's start (about 15 s on two cores): about 30 s
@needs_ray
def test_every_run_of_a_slot_trains_on_its_actors_card_and_pairs_there(
    cluster: str, tmp_path: Path
) -> None:
    """`--backend ray --workers 2`, five experiments: every run of a slot, pair runs and
    candidate runs alike, names one card (the slot's actor) in measurements.jsonl, the two
    slots two; every paired run is paired with a run on its own card; two actors trained
    every run."""
    ws, gate = _gated_workspace(tmp_path)
    gate.touch()  # no run waits: each writes its actor's pid only
    patches = _patches(
        tmp_path,
        reply("LR to 0.06", _lr("0.04", "0.06")),
        reply("WIDTH to 128", ("WIDTH = 64  # model width", "WIDTH = 128  # model width")),
        reply("LR to 0.07", _lr("0.06", "0.07")),
        reply("WIDTH to 96", ("WIDTH = 128  # model width", "WIDTH = 96  # model width")),
    )
    args = run_args(TAG, *replay_args(patches), "--backend", "ray", "--workers", "2", n=5)
    log = tmp_path / "run.log"
    proc = _session(ws, stub_cli_env(tmp_path), log, *args, "--unsandboxed", "--address", cluster)
    try:
        assert proc.wait(timeout=600) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    rows = _measurements(ws)
    cards = _by_slot(rows)
    assert sorted(cards) == ["0", "1"], rows  # both slots trained
    assert all(len(set(c)) == 1 for c in cards.values()), cards  # one card per slot
    assert cards["0"][0] != cards["1"][0], cards  # one actor per slot
    assert all("Ray actor" in c[0] for c in cards.values()), cards
    assert any(r["purpose"] == "pair" for r in rows), rows  # the best was trained again
    paired = [r for r in rows if r["partner"] is not None]
    assert paired, rows
    for r in paired:  # a candidate's run and its partner: one card, one seed
        partner = rows[r["partner"]]
        assert (partner["card"], partner["seed"]) == (r["card"], r["seed"]), (r, partner)
    actors = Path(str(gate) + ".pids").read_text().split()  # the actor of every run
    assert len(actors) == len(rows)  # every run trained once
    assert len(set(actors)) == 2, actors  # by the two slots' actors, nothing else
    recs = _records(ws)
    assert sorted(r["id"] for r in recs) == [1, 2, 3, 4, 5]
    trained = [r for r in recs if r["status"] != "invalid"]  # a patch may no longer apply
    assert {r["extra"]["card"] for r in trained} == {cards["0"][0], cards["1"][0]}, recs


@pytest.mark.slow  # with the cluster's start (about 15 s on two cores): about 30 s
@needs_ray
def test_a_session_on_ray_retrains_a_run_whose_actor_was_killed_and_records_it_once(
    cluster: str, tmp_path: Path
) -> None:
    """`--backend ray --workers 2`: the Ray actor training the baseline's second calibration
    run is killed mid-run (SIGKILL to the pid the run wrote); the run dies with it, is trained
    again by a new actor and recorded once; the slot's rows name the old actor before the
    kill and the new one after; two candidates train; the record, the branch and the
    measurements agree."""
    ws, gate = _gated_workspace(tmp_path, seed=seed_of(1))
    patches = _patches(
        tmp_path,
        reply("LR to 0.06", _lr("0.04", "0.06")),
        reply("WIDTH to 128", ("WIDTH = 64  # model width", "WIDTH = 128  # model width")),
    )
    # unsandboxed: the box would hide the gate (a file of the test's) from the run
    args = run_args(TAG, *replay_args(patches), "--backend", "ray", "--workers", "2", n=3)
    log = tmp_path / "run.log"
    proc = _session(ws, stub_cli_env(tmp_path), log, *args, "--unsandboxed", "--address", cluster)
    pids = Path(str(gate) + ".pids")
    try:
        actor, child = _held(gate, proc, log)
        before = pids.read_text().split()  # the runs that reached step 1 until the kill
        _kill_and_finish(actor, child, gate, proc, log)  # the baseline's second run's actor
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        gate.touch()
    text = " ".join(log.read_text().split())
    assert "its Ray actor (cpu on" in text and "was lost (ActorDiedError)" in text, text
    trained = pids.read_text().split()  # the actor of every run that reached step 1
    assert before == [str(actor), str(actor)]  # the baseline's two runs, on one actor
    assert str(actor) not in trained[len(before) :]  # the killed actor trained nothing more
    recs = _records(ws)
    assert sorted(r["id"] for r in recs) == [1, 2, 3]  # every id once
    assert len(results_rows(ws, TAG)) == 3
    assert recs[0]["status"] == "keep" and recs[0]["val_bpb"] == pytest.approx(stub_bpb())
    rows = _measurements(ws)
    # the baseline's two calibration runs (the cpu default), each seed once: the lost run
    # (seed 1001) was trained again and counted once
    baseline = [r for r in rows if r["exp"] == 1]
    assert [r["seed"] for r in baseline] == [seed_of(0), seed_of(1)]
    old, new = (r["card"] for r in baseline)
    assert old != new, baseline  # the record shows the new actor
    assert f"slot {baseline[0]['slot']} now trains on {new}" in text, text
    assert len(trained) == len(rows) + 1  # every run measured once, and the lost one
    cards = _by_slot(rows)
    killed = baseline[0]["slot"]
    assert set(cards[killed][1:]) == {new}, cards  # the new actor trained the rest of the slot
    other = cards[str(1 - int(killed))]
    assert len(set(other)) == 1 and other[0] not in (old, new), cards
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
def test_a_candidates_run_whose_actor_was_killed_is_paired_on_its_new_card(
    cluster: str, tmp_path: Path
) -> None:
    """`--backend ray --workers 1`: the candidate's first run was to pair with the baseline's
    run of its seed on the slot's actor, which is killed mid-run; the new actor trains the run
    again on a card of its own (the cpu's stand-in: the actor), so the best is trained with
    that seed there first (a `pair` row), and the candidate's row is paired with it: the gain
    judged compares two runs of one card. The killed run is recorded nowhere."""
    gate = tmp_path / "gate"
    line = "GATE = ''  # the candidate's edit names a gate file"
    source = GATED_TRAIN.replace(
        "SLEEP = 0.0  # seconds per step\n",
        f"SLEEP = 0.0  # seconds per step\n{line}\nGATE_SEED = None\n",
    )
    ws = make_workspace(tmp_path / "ws", source)  # the baseline and its pair runs: no gate
    patches = _patches(tmp_path, reply("gate the run", (line, f"GATE = {str(gate)!r}")))
    args = run_args(TAG, *replay_args(patches), "--backend", "ray", "--workers", "1", n=2)
    log = tmp_path / "run.log"
    proc = _session(ws, stub_cli_env(tmp_path), log, *args, "--unsandboxed", "--address", cluster)
    try:
        actor, child = _held(gate, proc, log)  # the candidate's first run
        _kill_and_finish(actor, child, gate, proc, log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        gate.touch()
    text = " ".join(log.read_text().split())
    rows = _measurements(ws)
    baseline = [r for r in rows if r["exp"] == 1]
    assert [r["purpose"] for r in baseline] == ["calibrate", "calibrate"]
    old = baseline[0]["card"]
    pair, first = (r for r in rows if r["exp"] == 2 and r["seed"] == seed_of(0))
    new = first["card"]
    assert new != old and "Ray actor" in new, rows  # a new actor trained it again
    assert (pair["purpose"], pair["commit"], pair["card"]) == ("pair", baseline[0]["commit"], new)
    assert first["purpose"] == "candidate" and first["partner"] == pair["n"], rows
    for r in rows:  # every gain the keep rule judged: two runs of one card and one seed
        if r["partner"] is not None:
            partner = rows[r["partner"]]
            assert (partner["card"], partner["seed"]) == (r["card"], r["seed"]), (r, partner)
    assert f"its partner on {old}" in text, text
    actors = Path(str(gate) + ".pids").read_text().split()  # the candidate's runs only
    assert actors[0] == str(actor) and str(actor) not in actors[1:], actors
    assert len(actors) == len([r for r in rows if r["exp"] == 2 and r["purpose"] != "pair"]) + 1
    recs = _records(ws)
    assert [r["id"] for r in recs] == [1, 2] and recs[1]["status"] == "discard", recs
    assert recs[1]["extra"]["card"] == new, recs


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
    """The coordinator is killed (SIGKILL) while its baseline trains on a Ray actor; Ray ends
    the actor and its run; `--resume` trains it again on the cluster and the record holds
    every experiment once."""
    ws, gate = _gated_workspace(tmp_path)
    env = stub_cli_env(tmp_path)
    patches = _patches(tmp_path, reply("LR to 0.06", _lr("0.04", "0.06")))
    args = run_args(TAG, *replay_args(patches), "--backend", "ray", "--workers", "2", n=2)
    args += ["--unsandboxed", "--address", cluster]
    log = tmp_path / "run.log"
    proc = _session(ws, env, log, *args)
    try:
        _, child = _held(gate, proc, log)
        os.killpg(proc.pid, signal.SIGKILL)  # the coordinator, with its baseline in flight
        proc.wait(timeout=60)
        assert _gone(child), f"train.py of the dead coordinator's actor still runs ({child})"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        gate.touch()  # the runs trained from now on pass the gate
    state = json.loads((ws / "runs" / TAG / "state.json").read_text())
    assert [e["id"] for e in state["slots"].values()] == [1]  # the baseline in flight
    resumed = cli(ws, *args, "--resume", env=env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    recs = _records(ws)
    assert [r["id"] for r in recs] == [1, 2]  # every experiment once
    assert recs[0]["status"] == "keep" and recs[0]["val_bpb"] == pytest.approx(stub_bpb())
    rows = _measurements(ws)
    assert sorted(r["seed"] for r in rows if r["exp"] == 1) == [seed_of(0), seed_of(1)]
    assert git(ws, "status", "--porcelain") == ""
    assert not (ws / "runs" / TAG / "state.json").exists()  # nothing in flight


def _ray_slot(tmp_path: Path, cluster: str, seed: int | None = None):
    """A RaySlot of this process over a gated workspace (see _gated_workspace), unsealed and
    unboxed; the slot, its gate and what its display printed."""
    from rich.console import Console

    from autoresearch.display import Display
    from autoresearch.rayslot import RaySlot
    from autoresearch.runner import network_isolation
    from autoresearch.slot import Sealing

    ws, gate = _gated_workspace(tmp_path, seed)
    opts = SessionOptions(TAG, "cpu", "cpu", 10.0, sealed=False, unsandboxed=True,
                          backend="ray", address=cluster)  # fmt: skip
    shown = io.StringIO()
    slot = RaySlot(
        ws, opts, Sealing(None, network_isolation(), {}), Display(Console(file=shown, width=400)),
        threading.Event(), mark=lambda key, marker: None, name="0", address=cluster,
    )  # fmt: skip
    return slot, gate, shown


@pytest.mark.slow  # the cluster's start, unless another test of the module started it
@needs_ray
def test_a_slot_whose_actor_died_between_runs_pairs_on_its_new_actor(
    cluster: str, tmp_path: Path
) -> None:
    """The actor of a slot is killed while the slot waits between runs: asking for the slot's
    card (before a pairing) finds it dead and starts a new actor, whose card is the slot's
    from then on; the next run trains there; closing the slot ends its actor."""
    slot, gate, shown = _ray_slot(tmp_path, cluster)
    gate.touch()
    pids = Path(str(gate) + ".pids")
    try:
        first = slot.train(1, tmp_path / "0001", "baseline", "run.log", 0, keep=False)
        assert first.result.ok, first.result.log_tail
        assert (tmp_path / "0001" / "run.log").is_file()  # the log came back
        old, actor = slot.card, int(pids.read_text().split()[0])
        os.kill(actor, signal.SIGKILL)
        assert _gone(actor)
        assert slot.card_key() is None  # the cpu: pairs within the slot
        assert slot.card != old and "Ray actor" in slot.card
        text = " ".join(shown.getvalue().split())
        assert f"slot 0: its Ray actor ({old}) was lost" in text, text
        assert f"slot 0 now trains on {slot.card}" in text, text
        second = slot.train(1, tmp_path / "0001", "baseline", "run-2.log", 1, keep=False)
        assert second.result.ok, second.result.log_tail
        new = int(pids.read_text().split()[1])
        assert new != actor  # the new actor trained it
        assert slot.card != old
    finally:
        slot.close()
    assert _gone(new)  # its card went back to the cluster


@pytest.mark.slow  # the cluster's start, unless another test of the module started it
@needs_ray
def test_ctrl_c_twice_kills_a_ray_slots_actor_and_its_run(cluster: str, tmp_path: Path) -> None:
    """With a run in flight, cancelling the session's runs (Ctrl-C twice) kills the slot's
    actor, and with it the run, which comes back `interrupted`."""
    slot, gate, _ = _ray_slot(tmp_path, cluster)
    try:
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(
                slot.train, 1, tmp_path / "0001", "baseline", "run.log", 0, keep=False
            )
            deadline = time.monotonic() + 300  # guards a hang only
            held = Path(str(gate) + ".held")
            while not held.is_file() or not held.read_text().endswith("\n"):
                assert not running.done(), running.result()
                assert time.monotonic() < deadline
                time.sleep(0.05)
            actor, child = (int(pid) for pid in held.read_text().split())
            slot.cancel.set()
            outcome = running.result(timeout=300)
        assert outcome.result.crash_class == "interrupted"
        assert _gone(actor) and _gone(child)
    finally:
        gate.touch()
        slot.close()


def test_a_node_probes_its_sandbox_once_per_session(tmp_path: Path) -> None:
    """The first run of a session on a node probes bubblewrap and keeps the result in the
    node's cache; a later run of that session on that node reads it back (the note doctored in
    the file shows it was read, not probed) and touches it; another session probes again, and
    its new file removes the probes no session touched for PROBE_KEEP_S."""
    from autoresearch import sandbox
    from autoresearch.rayslot import BOX_PROBES_DIR, PROBE_KEEP_S, node_box

    first = node_box("node-a", "job-1", tmp_path)
    if not first.available:
        pytest.skip(f"no box on this machine: {first.note}")
    assert first == sandbox.probe()
    probes = tmp_path / BOX_PROBES_DIR
    (kept,) = probes.iterdir()
    record = json.loads(kept.read_text())
    kept.write_text(json.dumps({**record, "note": "read back"}))
    now = time.time()
    almost = now - PROBE_KEEP_S + 3600  # an hour from being pruned
    os.utime(kept, (almost, almost))
    stale = [probes / "0123abcd.json", probes / "0123abcd.77.part"]  # sessions long over
    for path in stale:
        path.write_text("{}")
        os.utime(path, (now - PROBE_KEEP_S - 3600,) * 2)
    assert node_box("node-a", "job-1", tmp_path).note == "read back"
    assert kept.stat().st_mtime > almost  # touched: in use
    assert node_box("node-a", "job-2", tmp_path) == first  # another session: probed
    assert node_box("node-b", "job-1", tmp_path) == first  # another node: probed
    assert not any(path.exists() for path in stale)
    assert len(list(probes.iterdir())) == 3


def test_pruning_probes_removes_only_old_probe_files(tmp_path: Path) -> None:
    """prune_probes removes the .json and .part files last touched before the bound, and
    nothing else; a file another node removed first is no error."""
    from autoresearch.rayslot import prune_probes

    old, part, new, other = (tmp_path / n for n in ("a.json", "b.1.part", "c.json", "d.txt"))
    for path in (old, part, new, other):
        path.write_text("{}")
    for path in (old, part, other):
        os.utime(path, (1000.0, 1000.0))
    os.utime(new, (3000.0, 3000.0))
    assert sorted(prune_probes(tmp_path, 2000.0)) == [old, part]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json", "d.txt"]
    assert prune_probes(tmp_path, 4000.0) == [new]


@pytest.mark.slow  # the cluster's start, unless another test of the module started it
@needs_ray
def test_a_session_asks_for_no_more_slots_than_the_cluster_has_cards(
    cluster: str, tmp_path: Path
) -> None:
    """Each slot's actor holds its card (here: a CPU) for the session: more slots than the
    cluster has would wait forever, so they are refused with the number to give, before the
    session creates anything (no branch, no runs/<tag>/, no slot's worktree)."""
    import ray

    from autoresearch.errors import UsageError
    from autoresearch.rayslot import check_capacity

    check_capacity(ray, "CPU", 2)  # the module's cluster: two CPUs
    with pytest.raises(UsageError, match="has 2 CPUs.*give --workers 2 or fewer"):
        check_capacity(ray, "CPU", 3)
    with pytest.raises(UsageError, match="has no GPUs"):
        check_capacity(ray, "GPU", 1)
    ws = make_workspace(tmp_path / "ws")
    patches = _patches(tmp_path, reply("LR to 0.06", _lr("0.04", "0.06")))
    args = run_args(TAG, *replay_args(patches), "--backend", "ray", "--workers", "3", n=2)
    done = cli(ws, *args, "--unsandboxed", "--address", cluster, env=stub_cli_env(tmp_path))
    assert done.returncode == 2, done.stdout + done.stderr
    text = " ".join((done.stdout + done.stderr).split())
    assert "--workers 3: the Ray cluster has 2 CPUs" in text, text
    assert git(ws, "branch", "--list", f"autoresearch/{TAG}") == ""  # nothing started
    assert not (ws / "runs" / TAG).exists()
    assert git(ws, "worktree", "list").count("\n") == 0  # the workspace's own only
