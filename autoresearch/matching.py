"""One SEARCH/REPLACE block applied to a text: where its SEARCH matches, and why it did not.

`apply_block` guarantees what edits.py's docstring lists for one block: the SEARCH applies
only where it matches exactly one place; exact lines first, then trailing whitespace, then
one uniform shift of indentation; each on the SEARCH as written, then with fence and
filename lines, the `NN | ` gutter, tabs and blank edge lines taken off; a SEARCH with `...`
lines matched piece by piece, in order. Zero or several matches raise EditError with a
message for the model (the nearest real lines, with their numbers).

Not here: reading the reply (replies.py), several blocks, whole files and the compile check
(edits.py). No fuzzy matching of lines that differ in content.
"""

from __future__ import annotations

import difflib
import re

from .errors import EditError
from .replies import FENCE, FILENAME, TARGET_FILE, Block, normalized

CLOSEST_CONTEXT_LINES = 2  # extra lines shown around the nearest match in a failure message

_GUTTER = re.compile(r"^\s*(\d+) ?\| ?")
_ELLIPSIS_LINE = re.compile(r"^\s*(\.\.\.|…)\s*$")
_ELISION_COMMENT = re.compile(
    r"^\s*(?:\.\.\.\s*)?#\s*(?:(?:\.{2,}|…)\s*$|.*\b(?:unchanged|as before|same as (?:before|"
    r"above|the original|original|current|existing)|rest of (?:the )?(?:file|code|function|"
    r"class|module|script|training|loop|method)|remain(?:s|ing)? (?:the same|unchanged)|"
    r"existing code|omitted|for brevity|not shown|no changes|elided|truncated|snip)\b)",
    re.IGNORECASE,
)
_COMMENT = re.compile(r"\s+#.*$")


def apply_block(text: str, block: Block, filename: str) -> str:
    lines = text.splitlines()
    ending = "\n" if text.endswith("\n") or not text else ""
    if not block.search.strip():
        if not text.strip():
            return block.replace.rstrip("\n") + "\n"
        raise EditError(
            f"Block {block.number} has an empty SEARCH part. {filename} is not empty, so the "
            "SEARCH must copy the existing lines the change replaces (or the lines just before "
            "where new lines go, repeated in the REPLACE part)."
        )
    search, replace = block.search.split("\n"), block.replace.split("\n") if block.replace else []
    for s, r in _variants(lines, search, replace):
        found = _find(lines, s, block)
        if found is not None:
            p, shift = found
            result = lines[:p] + _shifted(r, shift, lines) + lines[p + len(s) :]
            return "\n".join(result) + ending if result else ""
    elided = _apply_elided(lines, search, replace, block)
    if elided is not None:
        return "\n".join(elided) + ending
    raise EditError(_no_match_message(lines, search, replace, block, filename))


def _variants(
    lines: list[str], search: list[str], replace: list[str]
) -> list[tuple[list[str], list[str]]]:
    """The SEARCH/REPLACE without fence and filename lines around its parts (never code of
    train.py), then with what else is certainly not train.py taken off, one correction after
    another (each variant includes the ones before it)."""
    present = {line.strip() for line in lines}
    out = [_unwrap(search, replace, lines, present)]
    for correct in (_ungutter, _untab, _unblank):
        s, r = correct(out[-1][0], out[-1][1], lines, present)
        if (s, r) != out[-1] and any(x.strip() for x in s):
            out.append((s, r))
    tabbed = out[0][0] + out[0][1]
    if out[-1][0] + out[-1][1] != tabbed and any(x.startswith("\t") for x in tabbed):
        s, r = _ungutter(*out[0], lines, present)  # tabs as other units than 4 spaces
        for unit in (2, 8):
            out.append(_unblank(_expand_tabs(s, unit), _expand_tabs(r, unit), lines, present))
    return out


def _unwrap(s: list[str], r: list[str], lines: list[str], present: set[str]) -> tuple:
    """Fence lines and filename lines around a part, when the file has no such line."""

    def strip(part: list[str]) -> list[str]:
        part = list(part)
        while part and (not part[0].strip() or _wrapper(part[0], present)):
            if not part[0].strip() and not any(_wrapper(x, present) for x in part[:3]):
                break
            part.pop(0)
        while part and (not part[-1].strip() or _wrapper(part[-1], present)):
            if not part[-1].strip() and not any(_wrapper(x, present) for x in part[-3:]):
                break
            part.pop()
        return part

    return strip(s), strip(r)


def _wrapper(line: str, present: set[str]) -> bool:
    if line.strip() in present:
        return False
    return bool(FENCE.match(line)) or FILENAME.match(line.strip().strip("`*#: ")) is not None


def _ungutter(s: list[str], r: list[str], lines: list[str], present: set[str]) -> tuple:
    """The `NN | ` gutter of this module's messages, when every SEARCH line has it."""
    numbered = [_GUTTER.match(x) for x in s if x.strip()]
    if not numbered or not all(numbered):
        return s, r
    numbers = [int(m.group(1)) for m in numbered if m]
    if any(b <= a for a, b in zip(numbers, numbers[1:], strict=False)):
        return s, r
    return [_GUTTER.sub("", x, count=1) for x in s], [_GUTTER.sub("", x, count=1) for x in r]


def _untab(s: list[str], r: list[str], lines: list[str], present: set[str]) -> tuple:
    """Leading tabs as spaces, when the file indents with spaces (the unit is tried by
    `_variants`: 4, then 2, then 8 spaces)."""
    if any(x.startswith("\t") for x in lines) or not any(x.startswith("\t") for x in s + r):
        return s, r
    return _expand_tabs(s, 4), _expand_tabs(r, 4)


def _expand_tabs(part: list[str], unit: int) -> list[str]:
    out = []
    for x in part:
        body = x.lstrip("\t")
        out.append(" " * (unit * (len(x) - len(body))) + body)
    return out


def _unblank(s: list[str], r: list[str], lines: list[str], present: set[str]) -> tuple:
    """Blank first and last SEARCH lines (and as many of the REPLACE's)."""
    s, r = list(s), list(r)
    while len(s) > 1 and not s[0].strip():
        s.pop(0)
        if r and not r[0].strip():
            r.pop(0)
    while len(s) > 1 and not s[-1].strip():
        s.pop()
        if r and not r[-1].strip():
            r.pop()
    return s, r


def _width(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def _find(lines: list[str], search: list[str], block: Block) -> tuple[int, int | None] | None:
    """(position, indentation shift) of the one place `search` matches; None when none;
    EditError when several match at the strictest level that matches at all. The shift is
    None when the match needed trailing whitespace ignored (the REPLACE's is then dropped)."""
    n = len(search)
    for level in (_same, _same_rstrip, _shift):
        found = [
            (p, d) for p in range(len(lines) - n + 1) if (d := level(lines, p, search)) is not None
        ]
        if len(found) == 1:
            return found[0] if level is not _same_rstrip else (found[0][0], None)
        if found:
            where = ", ".join(str(p + 1) for p, _ in found[:10])
            raise EditError(
                f"Block {block.number}: its SEARCH matches {len(found)} places in "
                f"{TARGET_FILE} (starting at lines {where}), so it is ambiguous and nothing was "
                "applied. Add more surrounding lines to the SEARCH (and the REPLACE) so that it "
                "matches exactly one place.\n" + _first_lines(block)
            )
    return None


def _same(lines: list[str], p: int, search: list[str]) -> int | None:
    return 0 if lines[p : p + len(search)] == search else None


def _same_rstrip(lines: list[str], p: int, search: list[str]) -> int | None:
    window = lines[p : p + len(search)]
    return 0 if all(a.rstrip() == b.rstrip() for a, b in zip(window, search, strict=True)) else None


def _shift(lines: list[str], p: int, search: list[str]) -> int | None:
    """The one indentation shift (file minus SEARCH) that makes the lines equal, or None."""
    shift = None
    for a, b in zip(lines[p : p + len(search)], search, strict=True):
        if not a.strip() and not b.strip():
            continue
        if a.strip() != b.strip() or ("\t" in a[: _width(a)]) != ("\t" in b[: _width(b)]):
            return None
        d = _width(a) - _width(b)
        if shift is None:
            shift = d
        elif d != shift:
            return None
    return shift


def _shifted(replace: list[str], shift: int | None, lines: list[str]) -> list[str]:
    if shift is None:
        return [line.rstrip() for line in replace]
    if not shift:
        return replace
    out = []
    for line in replace:
        if not line.strip():
            out.append("")
            continue
        width = max(0, _width(line) + shift)
        out.append(" " * width + line.lstrip(" \t").rstrip())
    return out


def is_elision(line: str) -> bool:
    return bool(_ELLIPSIS_LINE.match(line) or _ELISION_COMMENT.match(line))


def _apply_elided(
    lines: list[str], search: list[str], replace: list[str], block: Block
) -> list[str] | None:
    """Apply a SEARCH/REPLACE that elides lines with `...`: piece by piece, in order, each
    piece matching one place. None when the block has no elision lines."""
    s_pieces, r_pieces = _split_elided(search), _split_elided(replace)
    if len(s_pieces) == 1:
        return None
    if len(s_pieces) != len(r_pieces):
        raise EditError(
            f"Block {block.number}: its SEARCH has {len(s_pieces) - 1} `...` lines and its "
            f"REPLACE {len(r_pieces) - 1}; they must pair up, so nothing was applied. Send the "
            "block with the same `...` lines in both parts, or copy the elided lines out.\n"
            + _first_lines(block)
        )
    out, start = list(lines), 0
    for k, (s, r) in enumerate(zip(s_pieces, r_pieces, strict=True), 1):
        if not any(x.strip() for x in s):
            if any(x.strip() for x in r):
                raise EditError(
                    f"Block {block.number}: piece {k} of its SEARCH (between `...` lines) is "
                    "empty but its REPLACE adds lines, so where they go is ambiguous; nothing "
                    "was applied. Put real lines of train.py around the new ones.\n"
                    + _first_lines(block)
                )
            continue
        piece = Block(block.number, "\n".join(s), "\n".join(r), block.filename)
        found = _find(out, s, piece)
        if found is None or found[0] < start:
            raise EditError(
                f"Block {block.number}: piece {k} of its SEARCH (between `...` lines) does not "
                f"match any lines of {TARGET_FILE} after the piece before it; nothing was "
                "applied. Copy each piece exactly, in file order.\n" + _first_lines(piece)
            )
        p, shift = found
        new = _shifted(r, shift, out)
        out = out[:p] + new + out[p + len(s) :]
        start = p + len(new)
    return out


def _split_elided(part: list[str]) -> list[list[str]]:
    pieces: list[list[str]] = [[]]
    for line in part:
        if is_elision(line):
            pieces.append([])
        else:
            pieces[-1].append(line)
    return pieces


# ----------------------------------------------------------------------------- messages


def _no_match_message(
    lines: list[str], search: list[str], replace: list[str], block: Block, filename: str
) -> str:
    first = _first_lines(block)
    if replace and any(x.strip() for x in replace):
        for r, _ in _variants(lines, replace, []):
            try:
                found = _find(lines, r, block)
            except EditError:
                found = None
            if found is not None and normalized("\n".join(search)) != normalized(
                "\n".join(replace)
            ):
                at = found[0] + 1
                where = f"line {at}" if len(r) == 1 else f"lines {at}-{at + len(r) - 1}"
                return (
                    f"Block {block.number}: its SEARCH does not match any lines of {filename}, "
                    f"but its REPLACE lines are already there ({where}): "
                    "this change is already made. Propose a different change, with a SEARCH "
                    f"copied from the current {filename}.\n" + first
                )
    return (
        f"Block {block.number}: its SEARCH does not match any lines of {filename}. The SEARCH "
        "must copy existing lines exactly, whole lines, with their indentation.\n"
        + first
        + "\n"
        + _closest(lines, search, filename)
    )


def _first_lines(block: Block, n: int = 3) -> str:
    search = block.search.split("\n")
    shown = "\n".join(f"    {x}" for x in search[:n])
    more = f"\n    ... ({len(search) - n} more lines)" if len(search) > n else ""
    return f"The SEARCH of block {block.number} begins:\n{shown}{more}"


def _closest(lines: list[str], search: list[str], filename: str) -> str:
    """The window of the file most similar to the SEARCH (difflib), with line numbers."""
    if not lines:
        return f"{filename} is empty."
    n = min(len(search), len(lines))
    best_ratio, best_p = -1.0, 0
    # twice: as written, and without trailing comments (a SEARCH that left a long comment out)
    for strip in (str.strip, lambda x: _COMMENT.sub("", x).strip()):
        matcher = difflib.SequenceMatcher(autojunk=False)
        matcher.set_seq2("\n".join(strip(x) for x in search))
        for p in range(len(lines) - n + 1):
            matcher.set_seq1("\n".join(strip(x) for x in lines[p : p + n]))
            if matcher.real_quick_ratio() <= best_ratio or matcher.quick_ratio() <= best_ratio:
                continue
            ratio = matcher.ratio()
            if ratio > best_ratio:
                best_ratio, best_p = ratio, p
    lo = max(0, best_p - CLOSEST_CONTEXT_LINES)
    hi = min(len(lines), best_p + n + CLOSEST_CONTEXT_LINES)
    shown = "\n".join(f"{k + 1:>5} | {lines[k]}" for k in range(lo, hi))
    where = f"line {best_p + 1}" if n == 1 else f"lines {best_p + 1}-{best_p + n}"
    if best_ratio == 1.0:
        return (
            f"The SEARCH differs from {filename} {where} only in indentation or spacing; copy "
            f"those lines exactly (without the `NN | ` line numbers):\n{shown}"
        )
    return (
        f"The closest lines in {filename} ({where}, {best_ratio:.0%} similar) are (copy them "
        f"without the `NN | ` line numbers):\n{shown}"
    )
