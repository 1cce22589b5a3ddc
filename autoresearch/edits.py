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

Where one block's SEARCH matches, and the message when it does not, is matching.py's.
"""

from __future__ import annotations

import re

from .errors import EditError
from .matching import apply_block, is_elision
from .replies import (
    DESCRIPTION_MAX_CHARS,
    FORMAT_HINT,
    TARGET_FILE,
    Block,
    Reply,
    answer_text,
    basename,
    clean_description,
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
# Definitions the harness calls (docs/architecture.md): a whole file may never drop them.
CONTRACT_NAMES = ("build_model", "load_model")
MAIN_GUARD = 'the `if __name__ == "__main__":` guard'

_MAIN_GUARD = re.compile(r"^if\s+__name__\s*==\s*['\"]__main__['\"]\s*:", re.MULTILINE)
_TOP_DEF = re.compile(r"^(?:async\s+def|def|class)\s+(\w+)", re.MULTILINE)


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
            text = apply_block(text, block, filename)
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
        if is_elision(line) and line.strip() not in old_lines
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


# ----------------------------------------------------------------------------- messages


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
