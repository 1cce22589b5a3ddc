"""The box (autoresearch/sandbox.py): each attack is a real candidate train.py run through a
real sealed session, and is either unable (the file is not there, the write fails) or caught.

The candidates are the tiny bigram trainer of test_sealed.py with one attack put at the top of
its main(); each attack prints `BLOCKED <what>: <error>` when the box stops it, and `DONE
<what>` when it worked, then trains honestly, so the record shows what happened.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import uuid
from pathlib import Path

import pytest
from loopkit import adopting_orphans, cmdline, make_workspace, own_descendants
from test_sealed import STUB, TAG, Scripted, edit, records, session

import autoresearch
from autoresearch import sandbox
from autoresearch.evalproto import EvalStatus
from autoresearch.fingerprint import active_dataset

pytestmark = pytest.mark.skipif(not sandbox.probe().available, reason=sandbox.probe().note)

MAIN = "def main():\n"


def attack(name: str, body: str) -> tuple[str, str]:
    """An edit that runs `body` (indented code that may raise OSError) first in main()."""
    lines = "".join(f"        {line}\n" for line in body.strip("\n").splitlines())
    return (
        MAIN,
        MAIN + "    try:\n" + lines + f"        print('DONE {name}', flush=True)\n"
        "    except OSError as error:\n"
        f"        print('BLOCKED {name}:', error, flush=True)\n",
    )


def log_of(ws: Path, record: dict) -> str:
    return (ws / "runs" / TAG / f"{record['id']:04d}" / "run.log").read_text()


@pytest.fixture
def cache(stdlib_prepared: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in [n for n in os.environ if n.startswith(("AUTORESEARCH_", "OPENAI_"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(stdlib_prepared))
    return stdlib_prepared


def test_train_files_are_the_train_split_only(cache: Path) -> None:
    names = {p.name for p in sandbox.train_files(active_dataset())}
    assert "manifest.json" in names and "tokenizer.pkl" in names and "token_bytes.npy" in names
    assert any(n.startswith("train") and n.endswith(".bin") for n in names)
    assert not any(n.startswith(("val", "test")) for n in names)


def _tool(path: Path, says: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho {says}\n")
    path.chmod(0o755)
    return path


def test_the_toolchain_outside_the_system_is_bound_and_nothing_private(tmp_path: Path) -> None:
    gcc = _tool(tmp_path / "opt" / "gcc" / "bin" / "gcc", "gcc")
    cuda = tmp_path / "cuda"
    cuda.mkdir()
    ws = tmp_path / "ws"
    (ws / "lib").mkdir(parents=True)
    env = {
        "CC": str(gcc),
        "CUDA_HOME": str(cuda),
        "LD_LIBRARY_PATH": os.pathsep.join(
            [str(ws / "lib"), str(tmp_path), "/usr/lib", str(tmp_path / "missing")]
        ),
        "PATH": "/usr/bin:/bin",
    }
    # the compiler by its prefix, CUDA; not the workspace, what holds it, the system, a ghost
    assert sandbox.toolchain_dirs(env, keep_out=[ws]) == (
        str((tmp_path / "opt" / "gcc").resolve()),
        str(cuda.resolve()),
    )
    # no CC: the compilers found on PATH (here gcc and cc, one prefix); not one in the workspace
    _tool(tmp_path / "opt" / "gcc" / "bin" / "cc", "cc")
    env = {"PATH": f"{tmp_path / 'opt' / 'gcc' / 'bin'}:/usr/bin"}
    prefix = str((tmp_path / "opt" / "gcc").resolve())
    assert sandbox.toolchain_dirs(env, keep_out=[ws]) == (prefix,)
    inside = _tool(ws / "tc" / "bin" / "cc", "inside")
    assert sandbox.toolchain_dirs({"CC": str(inside)}, keep_out=[ws]) == ()


def test_a_compiler_outside_the_system_runs_in_the_box(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.compile's Triton builds its launcher with $CC: a compiler under /opt (or any
    prefix outside the system's directories) must be there inside the box."""
    cc = _tool(tmp_path / "opt" / "tc" / "bin" / "cc", "compiled")
    monkeypatch.setenv("CC", str(cc))
    ws = tmp_path / "ws"
    ws.mkdir()
    cell = sandbox.probe().cell(ws, writable=False)
    try:
        done = subprocess.run(
            [*cell.prefix, "/bin/sh", "-c", '"$CC"'],
            env=cell.env(os.environ),
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        cell.close()
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "compiled"


def test_python_dirs_leave_out_the_package_source() -> None:
    source = str(Path(autoresearch.__file__).resolve().parents[1])
    assert all(not source.startswith(d + "/") and d != source for d in sandbox.python_dirs())


@pytest.mark.slow
def test_attacks_from_training_are_unable(cache: Path, tmp_path: Path) -> None:
    """One session, one candidate per attack: every attack is BLOCKED, nothing outside the
    box changed, and a daemon started by a run does not outlive it."""
    ws = make_workspace(tmp_path / "ws", STUB)
    dataset = active_dataset()
    manifest = json.loads((dataset / "manifest.json").read_text())
    val = dataset / manifest["splits"]["val"]["shards"][0]["file"]
    test = dataset / manifest["splits"]["test"]["shards"][0]["file"]
    package = Path(autoresearch.__file__).resolve().parent
    site_dir = Path(sysconfig.get_paths()["purelib"])  # where a .pth file would run
    token = "autoresearch-daemon-" + uuid.uuid4().hex
    places = [str(ws / "w.pt"), str(dataset.parent / "w.pt"), str(Path.home() / "w.pt")]
    places += ["/tmp/w.pt", str(tmp_path / "w.pt")]
    attacks = {
        "read val": f"open({str(val)!r}, 'rb').read()",
        "read test": f"open({str(test)!r}, 'rb').read()",
        "write runs": f"open({str(ws / 'runs' / TAG / 'results.tsv')!r}, 'a').write('x')",
        "move the branch": (
            f"open({str(ws / '.git' / 'refs' / 'heads' / 'autoresearch' / TAG)!r}, 'w')"
            ".write('0' * 40)"
        ),
        "plant a hook": f"open({str(ws / '.git' / 'hooks' / 'post-checkout')!r}, 'w').write('x')",
        "patch the package": f"open({str(package / 'evaluator.py')!r}, 'a').write('x')",
        "plant bytecode": (
            f"open({str(package / '__pycache__' / 'evaluator.cpython-3.pyc')!r}, 'wb').write(b'x')"
        ),
        "plant a .pth": f"open({str(site_dir / 'zz_evil.pth')!r}, 'w').write('import os\\n')",
        "keep weights": (
            "import torch\n"
            f"for place in {places!r}:\n"
            "    try:\n"
            "        torch.save({'w': torch.ones(3)}, place)\n"
            "        print('SAVED', place, flush=True)\n"
            "    except OSError as error:\n"
            "        print('NOT SAVED', place, error, flush=True)\n"
            f"if not [p for p in {places!r} if os.path.exists(p)]:\n"
            "    raise OSError('no weights kept from an earlier run')\n"
            "raise OSError('weights kept here: only in this run')"
        ),
        "start a daemon": (
            "import subprocess, sys\n"
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)', "
            f"{token!r}], start_new_session=True)\n"
            "raise OSError('started; it must not outlive the run')"
        ),
    }
    steps = [
        (name, lambda s, n=name, b=body: edit(s, attack(n, b))) for name, body in attacks.items()
    ]
    look = (
        f"found = [p for p in {places!r} if os.path.exists(p)]\n"
        "if not found:\n"
        "    raise OSError('no weights kept from an earlier run')\n"
        "print('CARRIED', found, flush=True)"
    )
    # the weights saved by the run before, looked for by the next
    steps.append(("look for kept weights", lambda s: edit(s, attack("carry weights", look))))
    with adopting_orphans():  # a daemon that outlived its box would be re-parented here
        session(ws, Scripted(steps), unsandboxed=False).run()
        daemons = [pid for pid in own_descendants() if token.encode() in cmdline(pid)]
    recs = {r["description"]: r for r in records(ws)}
    for name in [*attacks, "look for kept weights"]:
        log = log_of(ws, recs[name])
        assert "BLOCKED" in log and "DONE" not in log, (name, log)
        assert recs[name]["status"] in ("keep", "discard"), recs[name]  # it trained honestly
    kept = log_of(ws, recs["look for kept weights"])
    assert "no weights kept from an earlier run" in kept
    assert not [p for p in places if p != "/tmp/w.pt" and os.path.exists(p)]
    assert not (ws / ".git" / "hooks" / "post-checkout").exists()
    assert not (site_dir / "zz_evil.pth").exists()
    assert "x" not in (package / "evaluator.py").read_text()[-2:]
    assert daemons == []
    session_json = json.loads((ws / "runs" / TAG / "session.json").read_text())
    assert session_json["sandbox"]["boxed"] is True
    assert session_json["sandbox"]["unsandboxed"] is False


def test_unsandboxed_is_recorded(cache: Path, tmp_path: Path) -> None:
    ws = make_workspace(tmp_path / "ws")  # loopkit's stub trainer: what it trains is no matter
    session(ws, Scripted([]), unsandboxed=True, sealed=False).run()  # the record is the point
    recorded = json.loads((ws / "runs" / TAG / "session.json").read_text())["sandbox"]
    assert recorded["unsandboxed"] is True
    assert sys.platform != "linux" or recorded["boxed"] is True  # available, not used


@pytest.mark.slow
def test_attacks_from_evaluation_are_unable(cache: Path, tmp_path: Path) -> None:
    """The candidate's load_model and forward run in a boxed model process of their own: the
    validation file is not there, nor the evaluator's code or frames; an operator it
    overrides is overridden there only, so the metric, computed in the trusted process, is
    the honest one."""
    from test_sealed import _checkpoint, _evaluate

    ws = make_workspace(tmp_path / "ws", STUB)
    dataset = active_dataset()
    manifest = json.loads((dataset / "manifest.json").read_text())
    val = dataset / manifest["splits"]["val"]["shards"][0]["file"]
    site_dir = Path(sysconfig.get_paths()["purelib"])  # where a .pth file would run
    attacks = {
        "read val": f"lambda: open({str(val)!r}, 'rb').read()",
        "plant a .pth": f"lambda: open({str(site_dir / 'zz_evil.pth')!r}, 'w').write('x')",
        "call the evaluator": "lambda: __import__('autoresearch.sealed_eval')",
        "override an operator": "override",
    }
    calls = "".join(f"    attempt({name!r}, {action})\n" for name, action in attacks.items())
    helpers = (
        "def attempt(name, action):\n"
        "    try:\n"
        "        action()\n"
        "        print('DONE', name, flush=True)\n"
        "    except Exception as error:\n"
        "        print('BLOCKED', name + ':', type(error).__name__, error, flush=True)\n\n\n"
        "LIBRARY = []\n\n\n"
        "def override():  # every log_softmax on the CPU returns 0: a loss of 0\n"
        "    LIBRARY.append(torch.library.Library('aten', 'IMPL'))\n"
        "    LIBRARY[0].impl('_log_softmax', lambda x, dim, half: torch.zeros_like(x), 'CPU')\n\n\n"
        "def walk():  # look for the metric's running sums in the frames above\n"
        "    import sys\n"
        "    frame = sys._getframe()\n"
        "    while frame is not None:\n"
        "        if 'total_nats' in frame.f_locals:\n"
        "            frame.f_locals['total_nats'].zero_()\n"
        "            print('DONE frame walk', flush=True)\n"
        "            return\n"
        "        frame = frame.f_back\n"
        "    print('BLOCKED frame walk: no frame of the metric', flush=True)\n\n\n"
    )
    cheat = edit(
        STUB,
        ("class Bigram(nn.Module):\n", helpers + "class Bigram(nn.Module):\n"),
        (
            "        return self.out(self.emb(x))\n",
            "        walk()\n        return self.out(self.emb(x))\n",
        ),
        ("    return model\n", calls + "    return model\n"),
    )
    (tmp_path / "honest").mkdir()
    honest = _evaluate(ws, *_checkpoint(ws, STUB, tmp_path / "honest"), tmp_path / "honest")
    result = _evaluate(ws, *_checkpoint(ws, cheat, tmp_path), tmp_path)
    assert honest.status == EvalStatus.ok and result.status == EvalStatus.ok, result
    assert result.val_bpb == pytest.approx(honest.val_bpb)
    log = result.log_path.read_text()
    for name in ("read val", "plant a .pth", "call the evaluator", "frame walk"):
        assert f"BLOCKED {name}" in log, log
    assert "DONE override an operator" in log  # it ran, in its own process only
    assert not (site_dir / "zz_evil.pth").exists()


def test_a_missing_box_stops_the_session_unless_unsandboxed(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where bubblewrap or user namespaces are missing (the probe's answer is the one fake
    here), a session stops before anything is written, saying what to install and that
    --unsandboxed runs without the box; with --unsandboxed it runs and says so in
    session.json."""
    ws = make_workspace(tmp_path / "ws")  # loopkit's stub trainer: what it trains is no matter
    missing = sandbox.Box(False, "no box: `bwrap` not found (install the bubblewrap package)")
    monkeypatch.setattr(sandbox, "probe", lambda: missing)
    # unsealed: the box is required all the same, and no evaluator process is needed here
    with pytest.raises(sandbox.SandboxError) as stopped:
        session(ws, Scripted([]), sealed=False).run()
    assert "apt-get install bubblewrap" in str(stopped.value)
    assert "--unsandboxed" in str(stopped.value)
    assert not (ws / "runs" / TAG / "experiments.jsonl").exists()
    session(ws, Scripted([]), unsandboxed=True, resume=False, sealed=False).run()
    recorded = json.loads((ws / "runs" / TAG / "session.json").read_text())["sandbox"]
    assert recorded == {**missing.record(), "unsandboxed": True}
