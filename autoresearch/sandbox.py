"""The box a candidate's code runs in: Linux namespaces through bubblewrap (`bwrap`, Debian's
`bubblewrap` package, what Flatpak uses), around every process that runs train.py's code.

A session probes the layers once (`probe`), records what it found in session.json and says
it on screen; where one is missing it stops unless the user passed `--unsandboxed`.

The layers, and what each stops:
- **Mount namespace, empty root.** The boxed process sees only what is bound into it, at the
  same paths as outside: the system (/usr, /etc, the /bin and /lib links, /sys), the Python
  environment and the toolchain torch.compile builds with where it lies elsewhere (the C
  compiler's prefix, CUDA_HOME, LD_LIBRARY_PATH: `toolchain_dirs`) read-only, the installed
  `autoresearch` package inside it hidden by an empty directory; train.py and prepare.py, copies the harness makes for this run; for training, the
  dataset's manifest, tokenizer, token_bytes and *train* shards read-only; one writable
  directory that is new and empty for every run (train.py saves its checkpoint there and the
  harness moves it out); a private /tmp (also HOME) in memory. Not there: the val and test
  shards (which sit in the same dataset directory: only files are bound, never that
  directory), the workspace's .git and runs/, the user's home, the compile cache, the
  harness's package and its bytecode, any earlier run's directory. So reading validation data,
  carrying weights from one run to the next, writing the record, git refs or hooks, the package
  or its bytecode, or a start-up file (.pth, sitecustomize) where a harness process reads it,
  fails: the path is not there, or it is read-only.
- **Network namespace.** Loopback only: nothing outside the box can be reached.
- **PID namespace.** The box's processes see no other process (no signals to the harness, no
  ptrace, no /proc/<pid> of anything outside); when the run's main process exits, bwrap's init
  exits and the kernel kills every process left in the namespace, so a daemon (setsid, double
  fork) cannot outlive its run. `--die-with-parent`: the box dies with the harness.
- **IPC, UTS, cgroup namespaces**: no System V shared memory or semaphores shared with
  processes outside.
- **User namespace**: all of the above without privileges; inside, the process has the user's
  rights over what is bound in, and nothing else.

Not a layer here, stated plainly: Landlock (the mount namespace already decides what exists);
seccomp (system calls are not filtered: a kernel bug reachable from a user namespace is out of
scope); limits on memory, on the size of the private directory, or on GPU time; and the GPU
itself, whose device nodes (/dev/nvidia*, /dev/dri) are bound so that CUDA works. What the
harness does with a box's output (a checkpoint, logits) is checked by the harness, not by the box.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import AutoresearchError

BWRAP = "bwrap"
PROBE_TIMEOUT_S = 20.0  # seconds the probe's boxed `python -c pass` may take
SYSTEM_DIRS = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
GPU_DEVICES = ("/dev/dri",)  # besides every /dev/nvidia* node
TOOLCHAIN_COMPILER_ENV = ("CC", "CXX")  # the compilers Triton and Inductor build with
COMPILERS = ("gcc", "clang", "cc")  # else each of these found on PATH (Triton takes gcc, clang)
TOOLCHAIN_DIR_ENV = ("CUDA_HOME", "CUDA_PATH")  # a CUDA toolkit outside /usr
NAMESPACES = ("--unshare-user", "--unshare-ipc", "--unshare-pid", "--unshare-net")
NAMESPACES += ("--unshare-uts", "--unshare-cgroup-try")
PACKAGE = "autoresearch"  # the harness's package: hidden inside a box
# where a boxed process writes what it must (HOME, caches); private, in memory, gone at its exit
BOX_TMP = "/tmp"
UNSANDBOXED_NOTE = "unsandboxed (--unsandboxed): candidate code runs with the user's rights"


class SandboxError(AutoresearchError):
    """The box is not available here and the user did not choose to run without it."""

    exit_code = 2


@dataclass(frozen=True)
class Box:
    """What `probe` found: whether candidate code can be boxed on this machine."""

    available: bool
    note: str  # one line for the screen and session.json
    version: str = ""  # bwrap's
    layers: tuple[str, ...] = ()  # the namespaces in use

    def record(self) -> dict:
        """session.json's `sandbox` field."""
        return {
            "boxed": self.available,
            "note": self.note,
            "bwrap": self.version,
            "layers": list(self.layers),
        }

    def cell(
        self,
        workdir: Path,
        *,
        dataset: Path | None = None,
        files: Iterable[Path] = (),
        writable: bool = True,
    ) -> Cell:
        """One run's box: `workdir`'s train.py and prepare.py (copied in at `stage`), the
        train split of `dataset`, `files` read-only, and (`writable`) a fresh private
        directory. Close it (`Cell.close`) when the run is over."""
        assert self.available, "no box on this machine"
        return Cell(Path(workdir), dataset=dataset, files=tuple(files), writable=writable)


class Cell:
    """The files and the bwrap command of one boxed run. The directory `root` (on the host,
    mode 0700) holds `code/` (the copies of train.py and prepare.py the box sees) and `out/`
    (the box's one writable directory, bound at the same path)."""

    def __init__(
        self, workdir: Path, *, dataset: Path | None, files: tuple[Path, ...], writable: bool
    ) -> None:
        self.workdir = workdir
        self.dataset = dataset
        self.root = Path(tempfile.mkdtemp(prefix="autoresearch-box-"))
        self.code = self.root / "code"
        self.out = self.root / "out"
        self.inbox = self.root / "in"  # read-only in the box: what the harness hands in
        for folder in (self.code, self.out, self.inbox):
            folder.mkdir()
        # the files exist before the box is made (a warm child's box is made before the run's
        # train.py is known) and are rewritten in place, so the bound inode stays the same
        for name in ("train.py", "prepare.py"):
            (self.code / name).touch()
        self.prefix = tuple(_command(workdir, self, dataset, files, writable))

    def stage(self, train: Path | None = None) -> None:
        """Copy the workspace's train.py (or `train`) and prepare.py in (in place: see
        __init__)."""
        for name in ("train.py", "prepare.py"):
            source = train if name == "train.py" and train is not None else self.workdir / name
            data = source.read_bytes() if source.is_file() else b""
            with open(self.code / name, "r+b") as f:
                f.truncate(0)
                f.write(data)

    def env(self, env: Mapping[str, str]) -> dict[str, str]:
        """`env` as the boxed process gets it: the checkpoint into the private directory,
        HOME and every cache in the box's private /tmp."""
        inside = dict(env)
        if self.dataset is not None:  # named outright: <cache>/ACTIVE is not in the box
            inside.update(
                AUTORESEARCH_CACHE=str(self.dataset.parent), AUTORESEARCH_DATASET=self.dataset.name
            )
        if inside.get("AUTORESEARCH_CHECKPOINT"):
            inside["AUTORESEARCH_CHECKPOINT"] = str(self.out / "checkpoint.pt")
        inside.update(
            HOME=BOX_TMP,
            TMPDIR=BOX_TMP,
            XDG_CACHE_HOME=f"{BOX_TMP}/.cache",
            TORCHINDUCTOR_CACHE_DIR=f"{BOX_TMP}/torchinductor",
            TRITON_CACHE_DIR=f"{BOX_TMP}/triton",
            PYTHONDONTWRITEBYTECODE="1",
        )
        return inside

    def take_checkpoint(self, dest: str | None) -> None:
        """Move the checkpoint the run left in its private directory to `dest` (the path the
        harness asked for); only a regular file, never a link the candidate planted."""
        if not dest:
            return
        found = self.out / "checkpoint.pt"
        if found.is_symlink() or not found.is_file():
            return
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(found), dest)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _command(
    workdir: Path, cell: Cell, dataset: Path | None, files: tuple[Path, ...], writable: bool
) -> list[str]:
    # --as-pid-1: the command is the box's init, so bwrap waits for it (its CPU time reaches
    # the harness through wait4) and its exit ends every other process in the box
    args = [BWRAP, *NAMESPACES, "--as-pid-1", "--die-with-parent"]
    args += ["--proc", "/proc", "--dev", "/dev"]
    args += ["--tmpfs", BOX_TMP]
    for path in SYSTEM_DIRS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    args += ["--ro-bind", "/sys", "/sys"] if os.path.isdir("/sys") else []
    for node in _gpu_nodes():
        args += ["--dev-bind", node, node]
    for path in python_dirs():
        args += ["--ro-bind", path, path]
        hidden = Path(path) / PACKAGE
        if hidden.is_dir():  # the harness installed (not editable) into this environment
            args += ["--tmpfs", str(hidden)]
    keep_out = [workdir, cell.root] + ([dataset.parent] if dataset is not None else [])
    for path in toolchain_dirs(os.environ, keep_out=keep_out):
        args += ["--ro-bind", path, path]
    for name in ("train.py", "prepare.py"):
        args += ["--ro-bind", str(cell.code / name), str(workdir / name)]
    if dataset is not None:
        for path in train_files(dataset):
            args += ["--ro-bind", str(path), str(path)]
    for path in files:
        args += ["--ro-bind", str(path), str(path)]
    args += ["--ro-bind", str(cell.inbox), str(cell.inbox)]
    if writable:
        args += ["--bind", str(cell.out), str(cell.out)]
    return [*args, "--chdir", str(workdir), "--"]


def _gpu_nodes() -> list[str]:
    dev = Path("/dev")
    nodes = sorted(str(p) for p in dev.glob("nvidia*")) if dev.is_dir() else []
    return nodes + [d for d in GPU_DEVICES if os.path.exists(d)]


@functools.cache
def python_dirs() -> tuple[str, ...]:
    """The directories this interpreter needs, outermost first, none inside another: its
    prefixes (a virtual environment's included) and site-packages, minus any directory that
    holds the harness's package as source (an editable install's checkout)."""
    found: list[str] = []
    candidates = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]
    candidates += list(sysconfig.get_paths().values())
    candidates += list(site.getsitepackages()) + [site.getusersitepackages()]
    candidates.append(os.path.dirname(os.path.realpath(sys.executable)))
    for path in candidates:
        real = os.path.realpath(path)
        if not os.path.isdir(real) or any(real == d for d in SYSTEM_DIRS):
            continue
        if _holds_source_package(real):
            continue
        found.append(real)
    outer: list[str] = []
    for path in sorted(set(found), key=len):
        if not any(path.startswith(o.rstrip("/") + "/") for o in outer):
            outer.append(path)
    return tuple(p for p in outer if not any(p.startswith(s + "/") for s in SYSTEM_DIRS))


def toolchain_dirs(environ: Mapping[str, str], *, keep_out: Iterable[Path]) -> tuple[str, ...]:
    """The directories outside the system's that training's toolchain lives in, to be bound
    read-only: the C compiler that torch.compile's Triton and Inductor build with (`CC`,
    `CXX`, else every `gcc`, `clang` and `cc` found on `PATH`), by its install prefix (the parent
    of its `bin/`, where it finds its own programs, headers and libraries); `CUDA_HOME` and
    `CUDA_PATH`; the entries of `LD_LIBRARY_PATH`. Without them a compiler installed under
    /opt is missing in the box and the first compiled step fails. Left out: a directory that
    is or holds a `keep_out` path (the workspace, the data cache, the box's own files), the
    home directory or the root, or lies inside a `keep_out` path or a system directory."""
    search = environ.get("PATH", os.defpath)
    found: list[str] = []
    compilers = [environ[k] for k in TOOLCHAIN_COMPILER_ENV if environ.get(k)]
    compilers = compilers or list(COMPILERS)
    for name in compilers:
        exe = shutil.which(name.split()[0], path=search)
        if exe is None:
            continue
        folder = Path(os.path.realpath(exe)).parent
        found.append(str(folder.parent if folder.name == "bin" else folder))
    found += [environ[k] for k in TOOLCHAIN_DIR_ENV if environ.get(k)]
    found += [p for p in environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    outside = [os.path.realpath(p) for p in keep_out]
    home = os.path.realpath(os.path.expanduser("~"))
    dirs: list[str] = []
    for path in found:
        real = os.path.realpath(path)
        if not os.path.isabs(real) or not os.path.isdir(real) or real in ("/", home):
            continue
        if any(_within(real, s) for s in SYSTEM_DIRS) or any(_within(real, o) for o in outside):
            continue
        if any(_within(o, real) for o in [*outside, home]):
            continue
        if _holds_source_package(real) or real in dirs:
            continue
        dirs.append(real)
    return tuple(dirs)


def _within(path: str, folder: str) -> bool:
    """`path` is `folder` or inside it."""
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _holds_source_package(path: str) -> bool:
    """True for a checkout holding autoresearch/ as source (not a site-packages)."""
    name = os.path.basename(path)
    if name in ("site-packages", "dist-packages"):
        return False
    return os.path.isfile(os.path.join(path, PACKAGE, "__init__.py"))


def train_files(dataset: Path) -> list[Path]:
    """The dataset files training may read: the manifest, the tokenizer, token_bytes and the
    train split's shards and document starts. Never the val or test files."""
    dataset = Path(dataset)
    manifest_path = dataset / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return [manifest_path] if manifest_path.is_file() else []
    names = [manifest.get(k, {}).get("file") for k in ("tokenizer", "token_bytes")]
    for shard in manifest.get("splits", {}).get("train", {}).get("shards", []):
        names += [shard.get("file"), shard.get("starts")]
    paths = [manifest_path] + [dataset / n for n in names if n]
    return [p for p in paths if p.is_file()]


def dataset_of(env: Mapping[str, str]) -> Path | None:
    """The dataset directory a child with `env` reads (prepare.py's rule: AUTORESEARCH_CACHE,
    else ~/.cache/autoresearch; AUTORESEARCH_DATASET, else the name in <cache>/ACTIVE)."""
    root = env.get("AUTORESEARCH_CACHE", "").strip()
    cache = Path(root).expanduser() if root else Path.home() / ".cache" / "autoresearch"
    name = env.get("AUTORESEARCH_DATASET", "").strip()
    if not name:
        try:
            name = (cache / "ACTIVE").read_text(encoding="utf-8").strip()
        except OSError:
            return None
    if not name or "/" in name or name in (".", ".."):
        return None
    return cache / name


@functools.cache
def probe() -> Box:
    """Whether candidate code can be boxed here: a boxed `python -c pass` (the interpreter of
    this process, through the same bind list a run gets) must succeed. Probed once."""
    if not sys.platform.startswith("linux"):
        return Box(False, f"no box on {sys.platform}: bubblewrap needs Linux namespaces")
    if shutil.which(BWRAP) is None:
        return Box(False, "no box: `bwrap` not found (install the bubblewrap package)")
    try:
        version = subprocess.run(
            [BWRAP, "--version"], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S
        ).stdout.split()[-1:]
        with tempfile.TemporaryDirectory(prefix="autoresearch-probe-") as tmp:
            cell = Cell(Path(tmp), dataset=None, files=(), writable=True)
            try:
                proc = subprocess.run(
                    [*cell.prefix, sys.executable, "-c", "pass"],
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    timeout=PROBE_TIMEOUT_S,
                )
            finally:
                cell.close()
    except (OSError, subprocess.TimeoutExpired, IndexError) as error:
        return Box(False, f"no box: {error}")
    if proc.returncode != 0:
        lines = proc.stderr.decode(errors="replace").strip().splitlines()
        why = lines[-1] if lines else f"exit {proc.returncode}"
        return Box(False, f"no box: bwrap failed here ({why}); user namespaces may be off")
    layers = tuple(n.removeprefix("--unshare-").removesuffix("-try") for n in NAMESPACES)
    return Box(
        True,
        f"boxed: bubblewrap {version[0] if version else '?'} ({', '.join(layers)} namespaces)",
        version[0] if version else "",
        layers,
    )


def require(box: Box, *, unsandboxed: bool) -> Box | None:
    """The box a session uses: `box` where it is available, None with `unsandboxed` (the
    user's choice, recorded); SandboxError where it is missing and the user did not choose."""
    if unsandboxed:
        return None
    if not box.available:
        raise SandboxError(
            f"{box.note}. Candidate code would run with your rights (it could read the "
            "validation data, the record and your files). Install bubblewrap "
            "(`apt-get install bubblewrap`) and allow unprivileged user namespaces, or pass "
            "--unsandboxed to run without the box (recorded in session.json)."
        )
    return box
