"""Run-to-run noise of val_bpb, and the keep rule that respects it.

Measurements. Every training run's val_bpb is one row of `runs/<tag>/measurements.jsonl`
(flushed and fsync'd, a torn last line ignored), so after a kill the runs that finished are
reused, never repeated, and a session can be re-judged offline with another rule. A row holds
its number `n` (its line among the rows), the commit, val_bpb, the experiment, the purpose
(`calibrate`, `candidate`, `repeat`, `pair`), the seed the run trained with (train.py seeds
its initialisation and data order from AUTORESEARCH_SEED) and, for a candidate's run, `partner`:
the `n` of the incumbent's run it is compared with.

Pairing (common random numbers). A candidate's k-th run trains with seed `SEED_BASE + k`, and
is compared with a run of the incumbent that used the same seed on the same card: both see the
same initialisation and the same batches, and the budget is wall-clock time on one card (cards
of one model differ by up to ~3 % in speed), so what the seed and the card do to val_bpb
cancel in their difference. A row names its card by `node` (host or Ray node id) and `gpu`
(the card's UUID); rows without one (the cpu, rows from before cards were recorded) are
matched by their `slot`. The partner must be recent: the incumbent's latest run with that seed
there counts only when fewer than `window` runs were made on the same card (or slot) after it
(window 0: any age), so runs on other cards do not age it; otherwise the incumbent is trained
with that seed again just before the candidate. So a slow drift of the machine over a night (on a GPU
the same code has scored up to ~0.013 apart between calls) cancels too, at the price of one
incumbent run every `window` runs or so. Why not re-run the incumbent beside every candidate
run (window 1)? It doubles the GPU time, and within one call the drift measured so far is
smaller than the run-to-run noise; bench/keep_rule.py shows what each choice costs.

The decision: a sequential probability ratio test (Wald) on the paired gains
g_k = incumbent_k - candidate_k, as Gaussian with a standard deviation `sigma` taken from the
session. It weighs "the change gains min_delta" (H0) against "it gains min_delta + effect"
(H1, effect = EFFECT_SIGMAS sigma); after each run the log likelihood ratio
    L_n = (effect / sigma^2) * sum_k (g_k - min_delta - effect / 2)
keeps the change when L_n >= ln(1 / ALPHA), discards it when L_n <= ln(BETA / (1 - ALPHA)) or
after `max_repeats` runs, and otherwise asks for one more run. Under H0 (or any smaller gain)
exp(L_n) is a (super)martingale of mean 1, so by Ville's inequality the chance that it ever
reaches 1 / ALPHA is at most ALPHA: the false-keep rate of a change that gains nothing stays
under 5 % however many repeats are allowed. The rule that came before re-checked the same
two-standard-error bar after every repeat, and each repeat was another chance to cross it.
Why an SPRT and not a Bayesian rule with a prior from the session's history: its error bound
needs no prior, which a session of a few dozen experiments cannot learn well, and it stops as
early as the evidence allows (most changes that do nothing are discarded after one run).

sigma, the spread of a paired gain, is estimated from the session: a prior worth PRIOR_DOF
degrees of freedom, pooled with the spread of the paired gains of every earlier candidate
measured at least twice. The prior starts at sqrt(2) x the run-to-run sigma of one commit over
different seeds (what a pair that shares nothing would show: the safe side, and far too wide
when the seed is most of the noise); once MIN_FIRST candidates were judged it is the spread of
their first paired gains when that is smaller (a robust spread, so a few real gains among them
do not count, and real gains can only widen it). A candidate whose paired gains are all equal
(a change that does not change the computation) says nothing about that spread and is left
out. Without two runs of different seeds there is no sigma; the rule is then the fixed
`min_delta` on one run.

The label the agent reads for an experiment (win / within-noise / loss) comes from the same
test: win when it was kept, loss when the mirrored test (the change loses `effect`) would have
crossed the same bar, within-noise otherwise.

What it does not do: the bound holds for a sigma known in advance; the session's estimate
is a plug-in, so the rate can be somewhat above 5 % when the estimate runs low
(bench/keep_rule.py measures it with the estimate: 1.9-3.2 %); outliers that are not Gaussian
are not modelled. Nor is a gain that depends on the seed: on an H100 at a 45 s budget one
change gained 0.0004 to 0.0072 over six seeds (sd 0.0025 about a mean of 0.0037, each seed's
gain reproduced on another machine within 0.0006), so one run tells what a change does to
one seed, and σ, learned from such gains, widens the test (docs/benchmarks.md, "the gain that
depends on the seed"). A drift is cancelled only down to what it moves in the runs between a pair
(the incumbent's run comes first, so a steady drift leaves up to `window` runs' worth of it).
It does not tell the gain at a longer horizon (`autoresearch confirm --horizon K`).
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean, median

from .status import Decision, Label

FILE = "measurements.jsonl"
DEFAULT_SLOT = "0"  # the slot of a session with one: every run before slots existed
SEED_BASE = 1000  # the k-th run of a commit trains with AUTORESEARCH_SEED = SEED_BASE + k
ALPHA = 0.05  # false keeps of a change that gains nothing, over all its repeats
BETA = 0.2  # missed keeps of a change that gains `effect` (sets the early discard bound)
# the gain H1 names, in units of the paired sigma: about what two runs can resolve (the keep
# bar on the mean gain is sigma * (EFFECT_SIGMAS / 2 + ln(1/ALPHA) / (n EFFECT_SIGMAS)):
# 2.56 sigma after one run, 1.73 after two, 1.46 after three), and at least
# sqrt(2 ln((1 - ALPHA) / BETA)) = 1.77, so that a first run with no gain at all is discarded
EFFECT_SIGMAS = 1.8
PRIOR_DOF = 2  # weight, in degrees of freedom, of the prior on sigma (paired_sigma)
MIN_FIRST = 8  # judged candidates before their first gains' spread may replace the prior
MAD_TO_SIGMA = 1.4826  # median absolute deviation to standard deviation, for a Gaussian
PAIR_WINDOW = 6  # runs after which an incumbent run is too old to be a candidate's partner
PURPOSES = ("calibrate", "candidate", "repeat", "pair")


def seed_of(run: int) -> int:
    """The seed of a commit's `run`-th run (from 0); its partner used the same."""
    return SEED_BASE + run


@dataclass(frozen=True)
class Verdict:
    decision: Decision  # keep | discard | repeat (a str enum)
    gain: float  # mean paired gain, incumbent - candidate (positive = better)
    threshold: float  # the mean gain that would have kept the change at this n
    runs: int  # candidate runs so far
    sigma: float | None  # spread of one paired gain, as used
    label: Label | None  # win | within-noise | loss (None without a sigma)


def judge(
    gains: Sequence[float],
    *,
    sigma: float | None,
    min_delta: float,
    max_repeats: int,
) -> Verdict:
    """keep, discard, or repeat (one more paired run): the SPRT of the module docstring."""
    n = len(gains)
    if n == 0:
        raise ValueError("judge needs at least one paired gain")
    gain = fmean(gains)
    if not sigma:
        decision = Decision.keep if gain > min_delta else Decision.discard
        return Verdict(decision, gain, min_delta, n, sigma, None)
    effect = EFFECT_SIGMAS * sigma
    upper, lower = math.log(1 / ALPHA), math.log(BETA / (1 - ALPHA))
    slope = effect / sigma**2
    llr = slope * sum(g - min_delta - effect / 2 for g in gains)
    keep_bar = min_delta + effect / 2 + upper / (slope * n)
    if llr >= upper:
        decision = Decision.keep
    elif llr <= lower or n >= max_repeats:
        decision = Decision.discard
    else:
        decision = Decision.repeat
    mirrored = -slope * sum(g + effect / 2 for g in gains)  # H1': the change loses `effect`
    if decision == Decision.keep:
        label = Label.win
    elif mirrored >= upper:
        label = Label.loss
    else:
        label = Label.within_noise
    return Verdict(decision, gain, keep_bar, n, sigma, label)


def prompt_label(status: str, label: str | None) -> Label:
    """The label the agent reads for an experiment the keep rule judged (kept or discarded):
    the rule's own (`Verdict.label`, as recorded); for one judged without a sigma, or
    recorded before labels were, the rule's decision: win when kept, not-better otherwise.
    So the agent is never told "win" about a change the rule discarded, nor the reverse."""
    if label:
        return Label(label)
    return Label.win if status == Decision.keep else Label.not_better


def paired_sigma(seed_sigma: float | None, gain_sets: Iterable[Sequence[float]]) -> float | None:
    """The spread of one paired gain: a prior pooled with the spread within each set of paired
    gains of one candidate (sets of one, or all equal, skipped). The prior is sqrt(2) x the
    seed sigma, or, once MIN_FIRST candidates were judged, the spread of their first paired
    gains (1.4826 x their median absolute deviation) when that is smaller."""
    if seed_sigma is None:
        return None
    gain_sets = [list(gains) for gains in gain_sets]
    prior = math.sqrt(2) * seed_sigma
    firsts = [gains[0] for gains in gain_sets if gains]
    if len(firsts) >= MIN_FIRST:
        middle = median(firsts)
        prior = min(prior, MAD_TO_SIGMA * median(abs(g - middle) for g in firsts))
    squares, dof = PRIOR_DOF * prior**2, PRIOR_DOF
    for gains in gain_sets:
        if len(gains) < 2 or len(set(gains)) == 1:
            continue
        m = fmean(gains)
        squares += sum((g - m) ** 2 for g in gains)
        dof += len(gains) - 1
    return math.sqrt(squares / dof)


def pooled_sigma(groups: Iterable[Sequence[float]]) -> float | None:
    """Pooled standard deviation of the groups with two values or more; None without any."""
    squares, dof = 0.0, 0
    for values in groups:
        if len(values) >= 2:
            m = fmean(values)
            squares += sum((v - m) ** 2 for v in values)
            dof += len(values) - 1
    return math.sqrt(squares / dof) if dof else None


class Measurements:
    """Append-only record of every run's val_bpb, with its seed, purpose and partner."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / FILE
        self._rows: list[dict] | None = None
        self._lock = threading.Lock()

    def rows(self) -> list[dict]:
        if self._rows is None:
            self._rows = []
            if self.path.is_file():
                for line in self.path.read_text(encoding="utf-8").splitlines():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:  # torn by a kill mid-write: that run is redone
                        continue
                    if isinstance(row, dict) and "commit" in row and "val_bpb" in row:
                        row["n"] = len(self._rows)  # the position is the reference
                        self._rows.append(row)
        return self._rows

    def add(
        self,
        commit: str,
        val_bpb: float,
        *,
        exp_id: int,
        purpose: str,
        seed: int,
        partner: int | None = None,
        slot: str = DEFAULT_SLOT,
        card: str | None = None,
        node: str | None = None,
        gpu: str | None = None,
    ) -> dict:
        """Record one run; `partner` is the `n` of the incumbent run it is compared with,
        `slot` where it trained (and `card`, the GPU's name, on cuda); `node` the host or Ray
        node it trained on and `gpu` its card's UUID (None on the cpu)."""
        with self._lock:  # slots record from threads of their own; `n` must stay unique
            return self._append(
                {
                    "n": len(self.rows()),
                    "commit": commit,
                    "val_bpb": val_bpb,
                    "exp": exp_id,
                    "purpose": purpose,
                    "seed": seed,
                    "partner": partner,
                    "slot": slot,
                    **({"card": card} if card is not None else {}),
                    **({"node": node, "gpu": gpu} if node is not None else {}),
                }
            )

    def _append(self, row: dict) -> dict:
        """Write `row` durably to the file, then to the rows in memory."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = (json.dumps(row) + "\n").encode()
        with open(self.path, "ab") as f:
            if f.tell() and not self._ends_with_newline():
                f.write(b"\n")  # seal a torn line so this row parses
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self.rows().append(row)
        return row

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def values(self, commit: str) -> list[float]:
        return [r["val_bpb"] for r in self.rows() if r["commit"] == commit]

    def mean(self, commit: str) -> float | None:
        values = self.values(commit)
        return fmean(values) if values else None

    def candidate_rows(self, exp_id: int, commit: str) -> list[dict]:
        """The runs of `commit` made for experiment `exp_id` (calibration or candidate runs)."""
        return [
            r
            for r in self.rows()
            if r["exp"] == exp_id and r["commit"] == commit and r.get("purpose") != "pair"
        ]

    def partner(
        self,
        incumbent: str,
        seed: int,
        window: int,
        *,
        slot: str = DEFAULT_SLOT,
        card: tuple[str, str] | None = None,
    ) -> dict | None:
        """The incumbent's latest run with `seed` at the same place, if fewer than `window`
        runs were made at that place after it (window 0: whatever its age). The place is the
        card, `card` = (node, GPU UUID), for rows that name one; else `slot` (the cpu, rows
        recorded before cards were, or a `card` not known). A row recorded before slots
        existed was trained on the one slot there was, DEFAULT_SLOT."""
        here = [r for r in self.rows() if _same_place(r, slot, card)]
        for r in reversed(here[-window:] if window > 0 else here):
            if r["commit"] == incumbent and r.get("seed") == seed:
                return r
        return None

    def gains(self, rows: Sequence[dict]) -> list[float]:
        """Paired gains (partner - candidate) of candidate rows that have a partner."""
        table = self.rows()
        return [table[r["partner"]]["val_bpb"] - r["val_bpb"] for r in rows if _paired(r)]

    def gain_sets(self, exclude_exp: int | None = None) -> list[list[float]]:
        """The paired gains of every experiment but `exclude_exp`, one list per experiment."""
        by_exp: dict[int, list[dict]] = {}
        for r in self.rows():
            if _paired(r) and r["exp"] != exclude_exp:
                by_exp.setdefault(r["exp"], []).append(r)
        return [self.gains(rows) for rows in by_exp.values()]

    def sigma(self) -> float | None:
        """Run-to-run sigma of one commit over different seeds, pooled over the groups of runs
        of one commit made for one experiment (runs close in time, so a drift of the machine
        does not enter) with two seeds or more, the latest run per seed; None before that."""
        groups: dict[tuple, dict] = {}
        for r in self.rows():
            groups.setdefault((r["commit"], r["exp"]), {})[r.get("seed")] = r["val_bpb"]
        return pooled_sigma(list(seeds.values()) for seeds in groups.values())

    def paired_sigma(self, exclude_exp: int | None = None) -> float | None:
        """The spread of one paired gain, for judging experiment `exclude_exp`."""
        return paired_sigma(self.sigma(), self.gain_sets(exclude_exp))


def _same_place(row: dict, slot: str, card: tuple[str, str] | None) -> bool:
    """Whether `row` trained on `card` when both name a card, else on `slot`."""
    if card is not None and row.get("gpu") is not None:
        return (row.get("node"), row["gpu"]) == card
    return row.get("slot", DEFAULT_SLOT) == slot


def _paired(row: dict) -> bool:
    return row.get("partner") is not None and row.get("purpose") in ("candidate", "repeat")
