"""SEARCH/REPLACE edits: apply an agent's reply (read by `autoresearch.replies`) to train.py.

Guarantees of `apply_reply` / `apply_edit`:
- a reply that is not whole is never applied, in any part: what `parse_reply` refuses (cut off
  inside a block, a marker, a fence or its reasoning), and a "complete train.py" that elides
  code (`# ... rest unchanged ...`, `...`) or drops top-level definitions the current file has
  without the reply naming them (`build_model`, `load_model` and the `__main__` guard never);
- all or nothing: either every block applies and the result compiles, or `EditError` is
  raised and the caller's text is untouched; blocks apply in order, each to the text left by
  the blocks before it;
- a SEARCH applies only where it matches exactly one place. Tried in order, the first that
  matches anywhere decides: exact lines; lines equal up to trailing whitespace (the REPLACE's
  is dropped then); lines equal up to one uniform shift of indentation (the REPLACE is shifted
  the same way). Each is tried on the SEARCH without fence and filename lines around its
  parts, then with what else is certainly not part of train.py taken off: the `NN | ` line
  number gutter of this module's own messages, tabs where the file indents with spaces (as
  4, 2 or 8 spaces), blank first and last lines. A SEARCH with `...` lines matches piece by
  piece, each piece in one place only, in order. Several matches are refused, never resolved
  by taking the first;
- a block, fence or label that names another file than train.py is refused (prepare.py
  with its own reason: it is fixed);
- the result differs from the input and compiles (`compile(..., "exec")`); it is not run.

Fallback: a reply without any SEARCH/REPLACE block but with a ```python (or unlabelled) fence
is taken as the complete new file when that fence holds a whole program (see
`WHOLE_FILE_MIN_FRACTION`), when it is the only such program, and when it passes the lazy-file
checks above.

Every `EditError` message is written for the model to read: which block, what failed, the
nearest real lines of the file with their numbers, and what to send instead.

Not done: fuzzy matching of lines that differ in content (a SEARCH must copy real lines), and
edits of any file but train.py.
"""

from __future__ import annotations

import difflib
import re

from .errors import EditError
from .replies import (
    DESCRIPTION_MAX_CHARS,
    FENCE,
    FILENAME,
    FORMAT_HINT,
    TARGET_FILE,
    Block,
    Reply,
    answer_text,
    basename,
    clean_description,
    normalized,
    parse_reply,
)

__all__ = [
    "DESCRIPTION_MAX_CHARS",
    "TARGET_FILE",
    "Block",
    "apply_blocks",
    "apply_edit",
    "apply_reply",
    "check_compiles",
    "clean_description",
    "parse_reply",
]

FIXED_FILE = "prepare.py"  # trusted: data, tokenizer and metric; never edited by the agent
# A fence is the whole new file when it has the `if __name__ == "__main__":` guard or at least
# this fraction of the original's lines: a snippet of a few lines is never mistaken for a file.
WHOLE_FILE_MIN_FRACTION = 0.6
CLOSEST_CONTEXT_LINES = 2  # extra lines shown around the nearest match in a failure message
# Definitions the harness calls (docs/architecture.md): a whole file may never drop them.
CONTRACT_NAMES = ("build_model", "load_model")
MAIN_GUARD = 'the `if __name__ == "__main__":` guard'

_MAIN_GUARD = re.compile(r"^if\s+__name__\s*==\s*['\"]__main__['\"]\s*:", re.MULTILINE)
_TOP_DEF = re.compile(r"^(?:async\s+def|def|class)\s+(\w+)", re.MULTILINE)
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


def apply_reply(source: str, text: str, filename: str = TARGET_FILE) -> tuple[str, str]:
    """Apply a reply's edit to `source`; return (description, new_source).

    A missing description is replaced by a neutral one; `apply_edit` tells the two apart.
    """
    description, new = apply_edit(source, text, filename)
    return description or f"edit of {filename} (no description given)", new


def apply_edit(source: str, text: str, filename: str = TARGET_FILE) -> tuple[str | None, str]:
    """Apply a reply's edit to `source`; return (description or None, new_source).

    Raises EditError (message for the model) when the reply is not whole, holds no usable
    edit, a block names another file, a SEARCH matches zero or several places, the result is
    unchanged, or the result does not compile.
    """
    if not text.strip():
        raise EditError(f"The reply was empty. {FORMAT_HINT}")
    reply = parse_reply(text)
    if reply.blocks:
        new = apply_blocks(source, reply.blocks, filename, prose=reply.prose)
    elif reply.whole_file is not None:
        new = _whole_file(source, reply, filename)
    else:
        if not answer_text(text).strip():
            raise EditError(
                "The reply holds only reasoning (a <think> section) and no answer. After the "
                f"reasoning, write the description line and the edit. {FORMAT_HINT}"
            )
        raise EditError(
            f"The reply contains no SEARCH/REPLACE block and no complete {filename}, so nothing "
            f"can be applied.{_fixed_note(reply.prose, filename)} {FORMAT_HINT}"
        )
    if new == source:
        raise EditError(
            f"The edit changes nothing: {filename} would be identical to the current version. "
            "Propose an actual change; the REPLACE lines must differ from the SEARCH lines."
        )
    check_compiles(new, filename)
    return reply.description, new


def apply_blocks(
    source: str, blocks: list[Block], filename: str = TARGET_FILE, prose: list[str] | None = None
) -> str:
    """Apply blocks in order, all or nothing; see the module docstring for the matching rules."""
    for block in blocks:
        if block.filename is not None and basename(block.filename) != filename:
            raise EditError(
                f"Block {block.number} edits `{block.filename}`, "
                + _only_target(block.filename, filename)
                + _applied_note([], block)
            )
    text = source
    for k, block in enumerate(blocks):
        try:
            text = _apply_one(text, block, filename)
        except EditError as exc:
            hint = _fixed_note(prose or [], filename) if "does not match" in str(exc) else ""
            raise EditError(str(exc) + hint + _applied_note(blocks[:k], block)) from None
    return text


def check_compiles(src: str, filename: str = TARGET_FILE) -> None:
    """Raise EditError with line, column and the offending line unless `src` compiles."""
    try:
        compile(src, filename, "exec")
    except SyntaxError as exc:
        where = f"line {exc.lineno}, column {exc.offset}" if exc.lineno else "unknown line"
        shown = ""
        if exc.lineno:
            lines = src.split("\n")
            if 0 < exc.lineno <= len(lines):
                bad = lines[exc.lineno - 1]
                caret = " " * (max(exc.offset or 1, 1) - 1 + len(f"{exc.lineno:>5} | ")) + "^"
                shown = f"\n{exc.lineno:>5} | {bad}\n{caret}"
        raise EditError(
            f"After the edit {filename} does not compile: {type(exc).__name__}: {exc.msg} "
            f"at {where}:{shown}\nFix the edit so that the whole file is valid Python."
        ) from None
    except ValueError as exc:  # e.g. a NUL byte in the source
        raise EditError(f"After the edit {filename} does not compile: {exc}.") from None


# ----------------------------------------------------------------------------- whole files


def _whole_file(source: str, reply: Reply, filename: str) -> str:
    assert reply.whole_file is not None
    for name, _ in reply.whole_files:
        if name is not None and basename(name) != filename:
            raise EditError(f"The code block is `{name}`, " + _only_target(name, filename))
    _refuse_elided(source, reply.whole_file, filename)
    original_lines = max(1, len(source.splitlines()))
    complete = [
        f
        for _, f in reply.whole_files
        if _MAIN_GUARD.search(f) or len(f.splitlines()) >= WHOLE_FILE_MIN_FRACTION * original_lines
    ]
    if len(set(complete)) > 1:
        raise EditError(
            f"The reply holds {len(set(complete))} different complete versions of {filename}, so "
            f"it is ambiguous which one is meant; nothing was applied. Send one: preferably "
            f"SEARCH/REPLACE blocks. {FORMAT_HINT}"
        )
    new = reply.whole_file
    if not complete:
        raise EditError(
            f"The reply has a code block of {len(new.splitlines())} lines but no SEARCH/REPLACE "
            f"block. A code block is used only when it is the complete new {filename} "
            f"({original_lines} lines now); a fragment cannot be placed. {FORMAT_HINT}"
        )
    new = complete[0]
    _refuse_lazy(source, new, reply.prose, filename)
    return new


def _refuse_elided(source: str, new: str, filename: str) -> None:
    """Refuse a file (or fence) with elision lines that the current file does not have."""
    old_lines = {line.strip() for line in source.splitlines()}
    elided = [
        (k, line.strip())
        for k, line in enumerate(new.splitlines(), 1)
        if (_ELLIPSIS_LINE.match(line) or _ELISION_COMMENT.match(line))
        and line.strip() not in old_lines
    ]
    if elided:
        shown = "; ".join(f"line {k}: `{text}`" for k, text in elided[:3])
        raise EditError(
            f"The {filename} you sent leaves code out ({shown}), so it is not the whole "
            f"file. Nothing was applied. Instead of the whole file, send only the lines that "
            f"change. {FORMAT_HINT}"
        )


def _refuse_lazy(source: str, new: str, prose: list[str], filename: str) -> None:
    """A whole file must be the whole file: no elided code, no definitions silently dropped."""
    _refuse_elided(source, new, filename)
    said = " ".join(prose)
    missing = []
    old_defs, new_defs = set(_TOP_DEF.findall(source)), set(_TOP_DEF.findall(new))
    for name in sorted(old_defs - new_defs, key=source.find):
        if name in CONTRACT_NAMES or not re.search(rf"\b{re.escape(name)}\b", said):
            missing.append(f"`{name}`")
    if _MAIN_GUARD.search(source) and not _MAIN_GUARD.search(new):
        missing.append(MAIN_GUARD)
    if missing:
        named = ", ".join(missing[:-1]) + (" and " if len(missing) > 1 else "") + missing[-1]
        raise EditError(
            f"The complete {filename} you sent lacks {named}, which the current file has (top "
            f"level), and the reply does not say it removes them: a whole file must be the "
            f"whole file (was it cut short?), and {', '.join(CONTRACT_NAMES)} and the "
            f"`__main__` guard are needed by the harness. Nothing was applied. Instead of the "
            f"whole file, send only the lines that change. {FORMAT_HINT}"
        )


# ----------------------------------------------------------------------------- matching


def _apply_one(text: str, block: Block, filename: str) -> str:
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


def _is_elision(line: str) -> bool:
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
        if _is_elision(line):
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


def _only_target(name: str, filename: str) -> str:
    said = f"but only {filename} may be edited"
    if basename(name) == FIXED_FILE:
        said += (
            f": {FIXED_FILE} is fixed (the data, the tokenizer and the metric are trusted "
            f"code) and only {filename} may change"
        )
    return f"{said}. Express the idea as a change to {filename} alone. {FORMAT_HINT}"


def _fixed_note(prose: list[str], filename: str) -> str:
    """A reminder when the reply's prose speaks of editing prepare.py."""
    if any(FIXED_FILE in line for line in prose):
        return (
            f"\nThe reply speaks of {FIXED_FILE}: {FIXED_FILE} is fixed and only {filename} may "
            f"change, so every SEARCH must copy lines of {filename}."
        )
    return ""


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


def _applied_note(applied: list[Block], failed: Block) -> str:
    if applied:
        numbers = ", ".join(str(b.number) for b in applied)
        said = f"Applied blocks: {numbers} (they matched)."
    else:
        said = "Applied blocks: none."
    return (
        f"\n{said} Nothing is saved unless every block applies: send the whole edit again, "
        f"all blocks, with block {failed.number} fixed."
    )
