"""The tuner agent: hyperparameter search without an LLM, one constant of train.py at a time.

`find_knobs` reads the tunable literals of train.py's module-level UPPERCASE constants;
`knob_steps` says where each may move; `TunerAgent` picks the move (see its docstring).
Guarantees: a proposal changes exactly one literal and every other byte of train.py stays.
"""

from __future__ import annotations

import ast
import functools
import math
import random
import re
import time
from collections import Counter
from dataclasses import dataclass

from ..edits import DESCRIPTION_MAX_CHARS, check_compiles
from ..status import Status
from .base import (
    AgentExhausted,
    Context,
    HistoryEntry,
    InvalidProposal,
    Proposal,
    RegisteredAgent,
    _local_proposal,
)

TUNER_SEED = "autoresearch-tuner"
BETA_MIN_GAP = 0.001  # betas and momenta stop at 0.999: closer to 1 only averages longer
_CONSTANT_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")
# Constants that do not change what is learned, that measure, or that point at things: never
# tuned (UNTIMED_STEPS-like constants would buy training time outside the budget).
_NOT_TUNED = re.compile(
    r"(^|_)(SEED|EVERY|LOG|INTERVAL|PRINT|VERBOSE|DEBUG|PATH|DIR|FILE|DTYPE|COMPILE|UNTIMED)"
    r"(_|$)|^DEVICE$"
)
_OOM = re.compile(r"out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED", re.IGNORECASE)
_WINDOW = re.compile(r"^[SL]+$")

Value = bool | int | float | str


@dataclass(frozen=True)
class Knob:
    """One tunable literal: a constant, or one element of a tuple constant (`NAME[i]`)."""

    name: str
    value: Value
    start: int  # character offsets of the literal in the source
    end: int
    text: str  # the literal as written
    pow2: bool = False  # written as 2**N


def find_knobs(source: str, preset: str | None = None) -> dict[str, Knob]:
    """The tunable literals among the module-level UPPERCASE constants, in source order (a new
    dict each call; the parse is cached: a proposal reads the best's train.py several times).

    Tunable: int, float, bool, window-pattern strings (only S and L, e.g. "SSSL"), `2**N`, and
    tuples of numbers (one knob per element). A name assigned more than once at module level,
    negative numbers and other expressions are left alone. A source that does not parse has
    no knobs. With `preset`, constants that do nothing under it are left out too: see
    `preset_dead_names`.
    """
    return dict(_knobs(source, preset))


@functools.lru_cache(maxsize=256)
def _knobs(source: str, preset: str | None) -> tuple[tuple[str, Knob], ...]:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return ()
    dead = preset_dead_names(tree, preset) if preset else set()
    offsets = _line_offsets(source)
    found: dict[str, list[Knob]] = {}
    counts: Counter[str] = Counter()
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
            target, value = stmt.targets[0], stmt.value
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
            target, value = stmt.target, stmt.value
        else:
            continue
        if not isinstance(target, ast.Name) or not _CONSTANT_NAME.match(target.id):
            continue
        counts[target.id] += 1
        if _NOT_TUNED.search(target.id) or target.id in dead:
            continue
        if isinstance(value, ast.Tuple):
            knobs = [
                _knob(f"{target.id}[{i}]", e, source, offsets) for i, e in enumerate(value.elts)
            ]
            if all(k is not None and not isinstance(k.value, (bool, str)) for k in knobs):
                found[target.id] = [k for k in knobs if k is not None]
        else:
            knob = _knob(target.id, value, source, offsets)
            if knob is not None:
                found[target.id] = [knob]
    return tuple((k.name, k) for name, ks in found.items() if counts[name] == 1 for k in ks)


def preset_dead_names(tree: ast.Module, preset: str) -> set[str]:
    """Constants that cannot change a run under `preset`, from module-level blocks
    `if PRESET == "name":` (either operand order): under that preset, the names the block
    assigns are overwritten, so their first values are dead; under any other preset, the names
    the block reads and nothing else at module level reads (e.g. CPU_DEPTH) are dead."""
    dead: set[str] = set()
    blocks = [stmt for stmt in tree.body if isinstance(stmt, ast.If)]
    for block in blocks:
        name = _preset_test(block.test)
        if name is None:
            continue
        inside = [n for stmt in block.body for n in ast.walk(stmt) if isinstance(n, ast.Name)]
        assigned = {n.id for n in inside if isinstance(n.ctx, ast.Store)}
        if name == preset:
            dead |= assigned
            continue
        read = {n.id for n in inside if isinstance(n.ctx, ast.Load)} - assigned
        outside = {
            n.id
            for stmt in tree.body
            if stmt is not block
            for n in ast.walk(stmt)
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
        }
        dead |= read - outside
    return dead


def _preset_test(test: ast.expr) -> str | None:
    """ "name" for a test `PRESET == "name"` or `"name" == PRESET`; None otherwise."""
    if not (
        isinstance(test, ast.Compare)
        and len(test.ops) == 1
        and isinstance(test.ops[0], ast.Eq)
        and len(test.comparators) == 1
    ):
        return None
    sides = (test.left, test.comparators[0])
    names = [s for s in sides if isinstance(s, ast.Name) and s.id == "PRESET"]
    values = [s.value for s in sides if isinstance(s, ast.Constant) and isinstance(s.value, str)]
    return values[0] if names and values else None


def _line_offsets(source: str) -> list[int]:
    offsets, total = [0], 0
    for line in source.splitlines(keepends=True):
        total += len(line)
        offsets.append(total)
    return offsets


def _char_offset(source: str, offsets: list[int], lineno: int, col_bytes: int) -> int:
    """ast columns count UTF-8 bytes; convert to a character offset in `source`."""
    line = source[offsets[lineno - 1] : offsets[lineno]]
    return offsets[lineno - 1] + len(line.encode("utf-8")[:col_bytes].decode("utf-8"))


def _knob(name: str, node: ast.expr, source: str, offsets: list[int]) -> Knob | None:
    value: Value
    pow2 = False
    if isinstance(node, ast.Constant) and isinstance(node.value, (bool, int, float, str)):
        value = node.value
        if isinstance(value, str) and not _WINDOW.match(value):
            return None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            return None
    elif (
        isinstance(node, ast.BinOp)
        and isinstance(node.op, ast.Pow)
        and isinstance(node.left, ast.Constant)
        and node.left.value == 2
        and isinstance(node.right, ast.Constant)
        and type(node.right.value) is int
        and 0 <= node.right.value < 64
    ):
        value, pow2 = 2**node.right.value, True
    else:
        return None
    assert node.end_lineno is not None and node.end_col_offset is not None
    start = _char_offset(source, offsets, node.lineno, node.col_offset)
    end = _char_offset(source, offsets, node.end_lineno, node.end_col_offset)
    return Knob(name, value, start, end, source[start:end], pow2)


def _values(source: str, preset: str | None) -> dict[str, Value] | None:
    """The knob values of a source (None when it has none); cached, every proposal reads the
    whole history."""
    items = _cached_values(source, preset)
    return dict(items) if items else None


@functools.lru_cache(maxsize=4096)
def _cached_values(source: str, preset: str | None) -> tuple[tuple[str, Value], ...]:
    return tuple((n, k.value) for n, k in find_knobs(source, preset).items())


def _config(values: dict[str, Value]) -> frozenset[tuple[str, str]]:
    # repr keeps 1, 1.0 and True apart
    return frozenset((n, repr(v)) for n, v in values.items())


def _round(x: float) -> float:
    return float(f"{x:.4g}")


def _l_fraction(pattern: str) -> float:
    return pattern.count("L") / len(pattern)


def knob_steps(knob: Knob, direction: int) -> list[Value]:
    """Candidate new values for `knob` in `direction` (+1 up, -1 down), best first.

    floats ×2 / ×1.5 up and ÷2 / ÷1.5 down (0.0 goes up to 0.1 or 0.05); names with RATIO or
    FRAC stay within [0, 1] and may go down to 0.0; names with BETA or MOMENTUM in (0, 1)
    step on 1 - value instead, staying ≤ 1 - BETA_MIN_GAP; ints ×2 and ÷2, staying ≥ 1; booleans flip; window patterns
    move one layer to L (up) or to S (down), or to the shorter "SL" / "L".
    """
    v, name = knob.value, knob.name
    if isinstance(v, bool):
        return [not v]
    if isinstance(v, str):
        return _pattern_steps(v, direction)
    if isinstance(v, int):
        if v <= 0:
            return [1] if direction > 0 else []
        return [v * 2] if direction > 0 else ([v // 2] if v // 2 >= 1 else [])
    if re.search(r"BETA|MOMENTUM", name):
        if not 0 < v < 1:
            return []
        gap = 1 - v
        gaps = [gap / 2, gap / 1.5] if direction > 0 else [gap * 2, gap * 1.5]
        # round the gap, not the value: 0.99995 must not become 1.0
        out: list[Value] = [float(f"{1 - _round(g):.12g}") for g in gaps if BETA_MIN_GAP <= g < 1]
    elif v == 0:
        out = [0.1, 0.05] if direction > 0 else []
    else:
        out = (
            [_round(v * 2), _round(v * 1.5)] if direction > 0 else [_round(v / 2), _round(v / 1.5)]
        )
        if re.search(r"RATIO|FRAC", name):
            out = [x for x in out if x <= 1] + ([0.0] if direction < 0 else [])
    return [x for x in out if x != v]


def _pattern_steps(p: str, direction: int) -> list[Value]:
    if direction > 0:
        i = p.rfind("S")
        out = [p[:i] + "L" + p[i + 1 :]] if i >= 0 else []
        out += [q for q in ("SL", "L") if _l_fraction(q) > _l_fraction(p)]
    else:
        i = p.find("L")
        out = [p[:i] + "S" + p[i + 1 :]] if i >= 0 and p.count("L") > 1 else []
        if p.endswith("L") and len(p) < 8:
            out.append("S" * (2 * len(p) - 1) + "L")
        out = [q for q in out if _l_fraction(q) < _l_fraction(p)]
    seen: list[Value] = []
    for q in out:
        if q != p and q not in seen:
            seen.append(q)
    return seen


def _direction(old: Value, new: Value) -> int:
    if isinstance(old, str) and isinstance(new, str):
        return 1 if _l_fraction(new) >= _l_fraction(old) else -1
    return 1 if new > old else -1  # type: ignore[operator]


def _literal(knob: Knob, value: Value) -> str:
    """`value` written the way `knob` was: same quotes, 2**N form, underscores."""
    if isinstance(value, bool):
        return repr(value)
    if isinstance(value, str):
        quote = knob.text[0] if knob.text[:1] in ("'", '"') else '"'
        return f"{quote}{value}{quote}"
    if isinstance(value, int):
        if knob.pow2 and value > 0 and value & (value - 1) == 0:
            return f"2**{value.bit_length() - 1}"
        return f"{value:_}" if "_" in knob.text else str(value)
    return repr(value)


def _rewrite(source: str, knob: Knob, value: Value) -> tuple[str, str]:
    """(new source, description) with `knob`'s literal replaced; comments untouched."""
    new_text = _literal(knob, value)
    new = source[: knob.start] + new_text + source[knob.end :]
    return new, f"{knob.name} {knob.text} -> {new_text}"[:DESCRIPTION_MAX_CHARS]


class TunerAgent(RegisteredAgent):
    """Hyperparameter search without an LLM: one constant of train.py per experiment.

    Guarantees: never proposes a configuration (all knob values together) that any history
    source or the current train.py already has; deterministic for a given history; the result
    compiles and keeps every other byte of train.py. Strategy: after a keep, the same knob again
    in the same direction; after a discard or crash, the same knob the other way; otherwise the
    least-explored knob (floats first, then booleans and patterns, then integer sizes; ties in
    a seeded order), both directions in a seeded order. Raises AgentExhausted when
    no untried neighbour of the current best is left.
    """

    name = "tuner"
    model = "tuner"
    summary = "offline, no LLM: one UPPERCASE constant of train.py per experiment"
    overlaps = False  # instant, and better with the latest result

    def propose(self, ctx: Context) -> Proposal:
        started = time.monotonic()
        knobs = find_knobs(ctx.train_py, ctx.preset)
        if not knobs:
            raise AgentExhausted(
                "the tuner found no UPPERCASE numeric constants in train.py to change; use an "
                "LLM agent (--model / --base-url)"
            )
        tried = _tried(ctx)
        current = {n: k.value for n, k in knobs.items()}
        moves, explored = _moves(ctx.history, ctx.preset)
        settled = [m for m in moves if m[2] != Status.running]  # a run in flight has no result yet
        plan: list[tuple[str, int, bool]] = []  # (knob, direction, primary step only)
        if settled:
            name, direction, status = settled[-1]
            plan.append((name, direction if status == Status.keep else -direction, True))
        rng = random.Random(f"{TUNER_SEED}:{len(ctx.history)}")
        names = list(knobs)
        rng.shuffle(names)
        names.sort(key=lambda n: (explored[n], _kind_rank(knobs[n].value)))
        for name in names:
            directions = [1, -1]
            rng.shuffle(directions)
            plan += [(name, d, False) for d in directions]
        for name, direction, primary in plan:
            if name not in knobs:
                continue
            steps = knob_steps(knobs[name], direction)
            for value in steps[:1] if primary else steps:
                if _config({**current, name: value}) in tried:
                    continue
                source, description = _rewrite(ctx.train_py, knobs[name], value)
                return self._proposal(description, source, started)
        raise AgentExhausted(
            "the tuner has tried every one-constant neighbour of the current best train.py"
        )

    def fix(self, ctx: Context, failed_source: str, crash_tail: str) -> Proposal:
        """Out of memory: halve the device batch size. Otherwise move the one changed knob
        halfway back toward the best's value. InvalidProposal when neither makes sense."""
        started = time.monotonic()
        best, failed = find_knobs(ctx.train_py, ctx.preset), find_knobs(failed_source, ctx.preset)
        tried = _tried(ctx)
        values = {n: k.value for n, k in failed.items()}
        if _OOM.search(crash_tail):
            batch = _batch_knob(failed)
            if batch is not None and isinstance(batch.value, int) and batch.value >= 2:
                value = batch.value // 2
                if _config({**values, batch.name: value}) not in tried:
                    source, description = _rewrite(failed_source, batch, value)
                    return self._proposal(description + " (out of memory)", source, started)
        changed = [n for n in failed if n in best and failed[n].value != best[n].value]
        if len(changed) == 1:
            name = changed[0]
            mid = _midpoint(best[name].value, failed[name].value)
            if mid is not None and _config({**values, name: mid}) not in tried:
                source, description = _rewrite(failed_source, failed[name], mid)
                return self._proposal(
                    description + " (halfway back after a crash)", source, started
                )
        raise InvalidProposal(
            "the tuner has no sensible repair for this crash (it changes one constant, and "
            "moving it back toward the best value gives nothing new)",
            model=self.model,
        )

    def _proposal(self, description: str, source: str, started: float) -> Proposal:
        check_compiles(source)  # a literal swapped for a literal: compiles by construction
        return _local_proposal(self, description, source, started, [], description)


def _kind_rank(value: Value) -> int:
    """Explore rates and ratios before switches and patterns, and sizes (which change the
    compute per step) last."""
    if isinstance(value, float):
        return 0
    return 1 if isinstance(value, (bool, str)) else 2


def _tried(ctx: Context) -> set[frozenset[tuple[str, str]]]:
    tried = set()
    for src in [ctx.train_py] + [h.source for h in ctx.history if h.source]:
        values = _values(src, ctx.preset)
        if values is not None:
            tried.add(_config(values))
    return tried


def _moves(
    history: list[HistoryEntry], preset: str | None
) -> tuple[list[tuple[str, int, str]], Counter[str]]:
    """Single-knob moves (knob, direction, status) relative to the best at the time, and how
    often each knob was changed at all."""
    moves: list[tuple[str, int, str]] = []
    explored: Counter[str] = Counter()
    parent: dict[str, Value] | None = None
    for h in history:
        values = _values(h.source, preset) if h.source else None
        if values is None:
            continue
        if parent is None:
            parent = values
            continue
        changed = [n for n in values if n in parent and values[n] != parent[n]]
        explored.update(changed)
        if len(changed) == 1:
            n = changed[0]
            moves.append((n, _direction(parent[n], values[n]), h.status))
        if h.status == Status.keep:
            parent = values
    return moves, explored


def _batch_knob(knobs: dict[str, Knob]) -> Knob | None:
    if "DEVICE_BATCH_SIZE" in knobs:
        return knobs["DEVICE_BATCH_SIZE"]
    return next((k for n, k in knobs.items() if "BATCH" in n and "TOTAL" not in n), None)


def _midpoint(best: Value, failed: Value) -> Value | None:
    """A value strictly between best and failed (geometric for positive floats), or None."""
    if isinstance(best, (bool, str)) or isinstance(failed, (bool, str)):
        return None
    if isinstance(best, int) and isinstance(failed, int):
        mid: Value = (best + failed) // 2
    elif best > 0 and failed > 0:
        mid = _round(math.sqrt(best * failed))
    else:
        mid = _round((best + failed) / 2)
    return mid if min(best, failed) < mid < max(best, failed) else None
