"""What a training child gets from the harness besides its command: its environment (no
secrets) and, outside the box, a network namespace of its own where the OS allows.

Guarantees of `child_env`: no variable whose name looks secret reaches the child. What it does
not do: isolate files or processes (sandbox.py's box does).
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass

# Environment variables never passed to the child: names containing any of these words.
SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL")
SECRET_NAMES = ("OPENAI_API_KEY", "AUTORESEARCH_API_KEY")
# Known names that contain a secret word but hold no secret.
NOT_SECRET_NAMES = ("TOKENIZERS_PARALLELISM",)


def _is_secret(name: str) -> bool:
    upper = name.upper()
    if upper in NOT_SECRET_NAMES:
        return False
    return upper in SECRET_NAMES or any(word in upper for word in SECRET_WORDS)


def child_env(
    base: Mapping[str, str],
    *,
    preset: str,
    device: str,
    gpu: str | None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment for a training child: `base` plus `extra`, minus anything secret.

    Dropped: every variable whose name contains KEY, TOKEN, SECRET, PASSWORD, PASSWD or
    CREDENTIAL (any case), also when it comes from `extra` (TOKENIZERS_PARALLELISM is kept).
    Set: PYTHONUNBUFFERED=1 (so lines arrive as they are printed), AUTORESEARCH_PRESET,
    AUTORESEARCH_DEVICE, CUDA_VISIBLE_DEVICES when `gpu` is given (otherwise as in base), and
    OMP_WAIT_POLICY=PASSIVE unless given: the cpu clock counts the run's CPU time, and
    OpenMP's default of spinning while a thread waits for a core another program holds burned
    CPU time without work on a loaded machine (a 10 CPU s run at load ~5 took 4 steps where
    it took 7 with PASSIVE, one run each; 7 is what the same budget gives on an idle machine).
    """
    merged = {**base, **(extra or {})}
    env = {name: value for name, value in merged.items() if not _is_secret(name)}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env["PYTHONUNBUFFERED"] = "1"
    env["AUTORESEARCH_PRESET"] = preset
    env["AUTORESEARCH_DEVICE"] = device
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


# ---------------------------------------------------------------------------------------------
# Network isolation


@dataclass(frozen=True)
class Isolation:
    """How training children are cut off from the network on this machine."""

    prefix: tuple[str, ...]  # put in front of the child's command; () when unavailable
    note: str  # what was found, for session.json and the display


NO_NETWORK = ("unshare", "--net", "--map-root-user")  # util-linux: a new, empty network namespace
PROBE_TIMEOUT_S = 10.0


@functools.cache
def network_isolation() -> Isolation:
    """Probe once whether this OS lets an unprivileged process drop its network.

    On Linux with unprivileged user namespaces, `unshare --net --map-root-user CMD` runs CMD in
    a network namespace of its own, with no interface but a down loopback: no connection in
    or out, also to localhost. The command keeps the pid (unshare execs it), so the process
    group, signals and /proc bookkeeping of `run_training` work unchanged. Elsewhere (macOS,
    containers without user namespaces, no util-linux) the child keeps the network.
    """
    if not sys.platform.startswith("linux"):
        return Isolation((), f"network isolation unavailable on {sys.platform}")
    if shutil.which(NO_NETWORK[0]) is None:
        return Isolation((), "network isolation unavailable: no `unshare` (util-linux)")
    try:
        proc = subprocess.run(
            [*NO_NETWORK, "true"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=PROBE_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return Isolation((), f"network isolation unavailable: {error}")
    if proc.returncode != 0:
        reason = proc.stderr.decode(errors="replace").strip().splitlines()
        return Isolation(
            (), f"network isolation unavailable: {reason[-1] if reason else proc.returncode}"
        )
    return Isolation(NO_NETWORK, "training runs without network (unshare --net)")
