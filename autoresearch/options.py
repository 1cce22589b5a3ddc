"""What a session is asked to do: `SessionOptions`, the one value the CLI, the config file and
the tests build and the loop, the display and `try` read."""

from __future__ import annotations

from dataclasses import dataclass, field

from . import noise, runner
from .settings import BY_KEY, calibrate_for, max_repeats_for

# seconds a run may take from launch to its first step line (imports, data, compile), unless
# set (SessionOptions.startup_limit)
STARTUP_LIMIT_S = 120.0
# on the cpu device the hard timeout is this many times TIME_BUDGET (plus the start-up limit):
# the budget is CPU time there, and a run got 1/7 of the cores it asked for on a loaded machine
HARD_TIMEOUT_CPU_FACTOR = 10


@dataclass
class SessionOptions:
    tag: str
    preset: str
    device: str
    time_budget: float  # seconds of training per experiment, from prepare.py's preset
    gpu: str | None = None
    max_experiments: int | None = None
    max_hours: float | None = None
    max_cost: float | None = None  # USD of agent tokens
    prices: dict = field(default_factory=dict)  # overrides of pricing.PRICES
    timeout: float | None = None  # hard limit per run; None: see hard_timeout
    # seconds a run may take past time_budget from its first step line to its exit (runner.Budget);
    # None = runner.budget_grace(time_budget)
    budget_grace: float | None = None
    # seconds a run may take from launch to its first step line (runner.Budget.startup);
    # None = STARTUP_LIMIT_S
    startup_limit: float | None = None
    stall_timeout: float | None = None
    fix_attempts: int = BY_KEY["fix_attempts"].default  # type: ignore[assignment]
    min_delta: float = BY_KEY["min_delta"].default  # type: ignore[assignment]
    # runs of the baseline to measure noise, and most runs of a candidate; None: the preset's
    # (settings.calibrate_for, settings.max_repeats_for), filled in at construction
    calibrate: int = None  # type: ignore[assignment]
    max_repeats: int = None  # type: ignore[assignment]
    # runs after which the best's run of a seed is too old to pair with a candidate's run of
    # that seed: the best is trained with it again first (0 = pair with any age)
    pair_window: int = noise.PAIR_WINDOW
    overlap: bool = True  # propose the next experiment while the current one trains
    # start the next training child (and, on cuda, the run's sealed evaluator) ahead, so
    # their `import torch` is done when they are due
    warm_start: bool = True
    # start them as a run starts (True) or once it has exited (False); None: True on cuda,
    # where the host's cores are idle while the card trains, False elsewhere
    start_ahead: bool | None = None
    resume: bool = False
    command: list[str] | None = None  # the training command; default: python train.py
    # val_bpb from the sealed evaluator on train.py's checkpoint, with the data fingerprinted;
    # False trusts train.py's printed val_bpb, as upstream does
    sealed: bool = BY_KEY["sealed"].default  # type: ignore[assignment]
    # run candidate code without the box (sandbox.py) even where it is available; recorded
    unsandboxed: bool = False
    # slots training at once (coordinator.py): `workers` on the cpu, one per card of `gpus`
    workers: int = 1
    gpus: tuple[str, ...] = ()
    # where the slots train: "local" (this host) or "ray" (each slot a Ray actor holding one
    # card of a cluster for the session, rayslot.py)
    backend: str = "local"
    address: str | None = None  # the Ray cluster's address; None: a cluster of this host

    @property
    def slotted(self) -> bool:
        """The coordinator runs the session: several slots, or slots on Ray."""
        return len(self.slot_gpus) > 1 or self.backend == "ray"

    @property
    def slot_gpus(self) -> list[str | None]:
        """The card of each slot (None: the session's `gpu`, or none on the cpu)."""
        if self.gpus:
            return list(self.gpus)
        return [self.gpu] * self.workers

    def __post_init__(self) -> None:
        if self.calibrate is None:
            self.calibrate = calibrate_for(self.preset)
        if self.max_repeats is None:
            self.max_repeats = max_repeats_for(self.preset)

    @property
    def hard_timeout(self) -> float:
        """Wall seconds after which a run is killed whatever it does. On the cpu device the
        budget is CPU time, which a loaded machine spreads over more wall time: room for that."""
        factor = HARD_TIMEOUT_CPU_FACTOR if self.device == "cpu" else 2
        return self.timeout or factor * self.time_budget + self.startup_seconds

    @property
    def startup_seconds(self) -> float:
        return STARTUP_LIMIT_S if self.startup_limit is None else self.startup_limit

    @property
    def budget(self) -> runner.Budget:
        """What each run is held to. On the cpu device, the run's CPU time from launch to exit
        (runner.Budget's cpu clock); on a GPU, wall time: sealed, train.py skips its own
        evaluation, so the clock runs to the child's exit; unsealed, to its last step line.
        train.py (the default command) must print step lines; another command may print none."""
        clock = "cpu" if self.device == "cpu" and runner.cpu_clock_available() else "wall"
        grace = self.budget_grace
        return runner.Budget(
            self.time_budget,
            runner.budget_grace(self.time_budget, clock) if grace is None else grace,
            self.startup_seconds,
            until_exit=self.sealed,
            steps_required=self.command is None,
            clock=clock,
        )
