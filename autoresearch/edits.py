"""SEARCH/REPLACE edits: parse an agent's reply and apply it to train.py.

The reply format (Aider's), one or more blocks, optionally inside ``` fences and optionally
preceded by a line naming the file::

    Raise the matrix learning rate            <- first line outside any block: the description
    train.py
    <<<<<<< SEARCH
    MATRIX_LR = 0.04
    =======
    MATRIX_LR = 0.06
    >>>>>>> REPLACE

Guarantees of `apply_reply`:
- all or nothing: either every block applies and the result compiles, or `EditError` is raised
  and the caller's text is untouched;
- a SEARCH applies only where it matches exactly one place, trying exact lines first, then
  lines equal up to trailing whitespace, then lines equal up to a consistent indentation shift
  (the replacement is shifted the same way); several matches are refused, never resolved by
  taking the first;
- blocks apply in order, each to the text left by the blocks before it;
- a block that names another file than the one being edited is refused;
- the result differs from the input and compiles (`compile(..., "exec")`); it is not run.

Fallback: a reply without any SEARCH/REPLACE block but with a ```python (or unlabelled) fence
is taken as the complete new file when that fence holds a whole program, see
`WHOLE_FILE_MIN_FRACTION`.

Every `EditError` message is written for the model to read: what failed, the nearest real
lines of the file with their numbers, and what to send instead.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from .errors import EditError

TARGET_FILE = "train.py"
DESCRIPTION_MAX_CHARS = 120  # one line in results.tsv and the commit subject
# A fence is the whole new file when it has the `if __name__ == "__main__":` guard or at least
# this fraction of the original's lines: a snippet of a few lines is never mistaken for a file.
WHOLE_FILE_MIN_FRACTION = 0.6
CLOSEST_CONTEXT_LINES = 2  # extra lines shown around the nearest match in a failure message

_SEARCH = re.compile(r"^\s*<{5,9}\s*SEARCH\b.*$")
_DIVIDER = re.compile(r"^\s*={5,9}\s*$")
_REPLACE = re.compile(r"^\s*>{5,9}\s*REPLACE\b.*$")
_FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*(.*?)\s*$")
_THINK = re.compile(r"<think>.*?(</think>|\Z)", re.DOTALL | re.IGNORECASE)
_FILENAME = re.compile(r"^[\w.\-/\\]+\.\w+$")
_MAIN_GUARD = re.compile(r"^if\s+__name__\s*==\s*['\"]__main__['\"]\s*:", re.MULTILINE)
_PYTHON_LANGS = {"", "python", "py", "python3"}
_FORMAT_HINT = (
    "Send the edit as SEARCH/REPLACE blocks:\n"
    "<<<<<<< SEARCH\nexact lines copied from train.py\n=======\nthe new lines\n>>>>>>> REPLACE"
)


@dataclass
class Block:
    """One SEARCH/REPLACE block; `number` counts from 1 in reply order."""

    number: int
    search: str
    replace: str
    filename: str | None = None  # as named in the reply, None when not named


@dataclass
class Reply:
    """What a reply contains: the description, the blocks, and a whole-file candidate.

    `whole_file` is the largest python or unlabelled fence, set only when there are no blocks;
    whether it really is a whole program is decided against the original by `apply_reply`.
    """

    description: str | None
    blocks: list[Block] = field(default_factory=list)
    whole_file: str | None = None
    whole_file_name: str | None = None


def parse_reply(text: str) -> Reply:
    """Split a reply into description, blocks and whole-file candidate.

    Text inside <think>...</think> (reasoning models) is ignored. Raises EditError for a block
    that is not closed properly; a reply with no edit at all parses to a Reply without blocks
    and without whole_file (`apply_reply` explains that to the model).
    """
    lines = _THINK.sub("", text.replace("\r\n", "\n")).split("\n")
    blocks: list[Block] = []
    fences: list[tuple[str, str | None, list[str]]] = []  # (lang, filename, lines)
    description: str | None = None
    last_name: str | None = None
    in_fence: tuple[str, str | None, list[str]] | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if _SEARCH.match(line):
            name = _preceding_filename(lines, i, in_fence) or last_name
            block, i = _read_block(lines, i, len(blocks) + 1, name)
            blocks.append(block)
            last_name = name
            continue
        fence = _FENCE.match(line)
        if fence:
            if in_fence is None:
                lang, fname = _fence_label(fence.group(2))
                in_fence = (lang, fname or _preceding_filename(lines, i, None), [])
            else:
                fences.append(in_fence)
                in_fence = None
        elif in_fence is not None:
            in_fence[2].append(line)
        elif description is None and line.strip() and not _is_filename_line(line, lines, i):
            description = clean_description(line)
        i += 1
    if in_fence is not None:  # an unclosed fence at the end still counts
        fences.append(in_fence)
    reply = Reply(description=description or None, blocks=blocks)
    if not blocks:
        code = [f for f in fences if f[0] in _PYTHON_LANGS and "\n".join(f[2]).strip()]
        if code:
            lang, fname, body = max(code, key=lambda f: len(f[2]))
            reply.whole_file = "\n".join(body).rstrip("\n") + "\n"
            reply.whole_file_name = fname
    return reply


def clean_description(line: str) -> str:
    """One-line description: markdown marks and a leading 'Description:' stripped, ≤120 chars."""
    text = line.strip()
    previous = None
    while text != previous:
        previous = text
        text = re.sub(r"^(#+|\*\*|__|[-*]\s|>)\s*", "", text)
        text = re.sub(r"\s*(\*\*|__)$", "", text)
        text = re.sub(r"^(description|idea|experiment)\s*:\s*(\*\*)?\s*", "", text, flags=re.I)
    text = " ".join(text.split())
    if len(text) > DESCRIPTION_MAX_CHARS:
        cut = text[: DESCRIPTION_MAX_CHARS - 1]
        space = cut.rfind(" ")
        text = (cut[:space] if space > DESCRIPTION_MAX_CHARS // 2 else cut).rstrip() + "…"
    return text


def apply_reply(source: str, text: str, filename: str = TARGET_FILE) -> tuple[str, str]:
    """Apply a reply's edit to `source`; return (description, new_source).

    Raises EditError (message for the model) when the reply holds no usable edit, a block names
    another file, a SEARCH matches zero or several places, the result is unchanged, or the
    result does not compile. A missing description is replaced by a neutral one.
    """
    if not text.strip():
        raise EditError(f"The reply was empty. {_FORMAT_HINT}")
    reply = parse_reply(text)
    if reply.blocks:
        new = apply_blocks(source, reply.blocks, filename)
    elif reply.whole_file is not None:
        new = _whole_file(source, reply, filename)
    else:
        raise EditError(
            f"The reply contains no SEARCH/REPLACE block and no complete {filename}, so nothing "
            f"can be applied. {_FORMAT_HINT}"
        )
    if new == source:
        raise EditError(
            f"The edit changes nothing: {filename} would be identical to the current version. "
            "Propose an actual change; the REPLACE lines must differ from the SEARCH lines."
        )
    check_compiles(new, filename)
    description = reply.description or f"edit of {filename} (no description given)"
    return description, new


def apply_blocks(source: str, blocks: list[Block], filename: str = TARGET_FILE) -> str:
    """Apply blocks in order, all or nothing; see the module docstring for the matching rules."""
    text = source
    for k, block in enumerate(blocks):
        if block.filename is not None and PurePosixPath(block.filename).name != filename:
            raise EditError(
                f"Block {block.number} edits `{block.filename}`, but only {filename} may be "
                f"edited. Express the idea as a change to {filename} alone."
                + _applied_note(blocks[:k], block)
            )
        try:
            text = _apply_one(text, block, filename)
        except EditError as exc:
            raise EditError(str(exc) + _applied_note(blocks[:k], block)) from None
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


# ----------------------------------------------------------------------------- parsing


def _read_block(lines: list[str], start: int, number: int, name: str | None) -> tuple[Block, int]:
    """Read the block whose SEARCH marker is at `start`; return it and the index after it."""
    i = start + 1
    search: list[str] = []
    while i < len(lines) and not _DIVIDER.match(lines[i]):
        if _SEARCH.match(lines[i]) or _REPLACE.match(lines[i]):
            raise EditError(
                f"Block {number} has no `=======` line between its SEARCH and REPLACE parts. "
                + _FORMAT_HINT
            )
        search.append(lines[i])
        i += 1
    if i == len(lines):
        raise EditError(f"Block {number} ends before its `=======` line. " + _FORMAT_HINT)
    i += 1
    replace: list[str] = []
    while i < len(lines) and not _REPLACE.match(lines[i]):
        if _SEARCH.match(lines[i]) or _DIVIDER.match(lines[i]):
            raise EditError(
                f"Block {number} has no `>>>>>>> REPLACE` line before the next marker. "
                + _FORMAT_HINT
            )
        replace.append(lines[i])
        i += 1
    if i == len(lines):
        raise EditError(
            f"Block {number} is not closed by a `>>>>>>> REPLACE` line (was the reply cut "
            "off?). " + _FORMAT_HINT
        )
    return Block(number, "\n".join(search), "\n".join(replace), name), i + 1


def _fence_label(label: str) -> tuple[str, str | None]:
    """The language and filename of a fence opener: ```python, ```train.py, ```python train.py."""
    words = label.split()
    lang, name = "", None
    for word in words:
        if _FILENAME.match(word.strip("`*:")):
            name = word.strip("`*:")
        elif not lang:
            lang = word.lower()
    if name and not lang:
        lang = "python" if name.endswith(".py") else ""
    return lang, name


def _filename_in(line: str) -> str | None:
    """The file a line names, when the line is nothing but a filename (maybe decorated)."""
    text = line.strip()
    text = re.sub(r"^(#+\s*|[-*]\s+)", "", text)
    text = re.sub(r"^(file(name)?|path)\s*:\s*", "", text, flags=re.I)
    text = text.strip("`*_:").strip()
    text = re.sub(r"^(file(name)?|path)\s*:\s*", "", text, flags=re.I).strip("`*_ ")
    return text if _FILENAME.match(text) else None


def _preceding_filename(
    lines: list[str], i: int, in_fence: tuple[str, str | None, list[str]] | None
) -> str | None:
    """The filename named just before line i (skipping blank lines and a fence opener)."""
    if in_fence is not None and in_fence[1]:
        return in_fence[1]
    j = i - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    if j >= 0 and _FENCE.match(lines[j]):
        j -= 1
        while j >= 0 and not lines[j].strip():
            j -= 1
    return _filename_in(lines[j]) if j >= 0 else None


def _is_filename_line(line: str, lines: list[str], i: int) -> bool:
    """A filename line that introduces a fence or a block is not a description."""
    if _filename_in(line) is None:
        return False
    j = i + 1
    while j < len(lines) and not lines[j].strip():
        j += 1
    return j < len(lines) and bool(_FENCE.match(lines[j]) or _SEARCH.match(lines[j]))


def _whole_file(source: str, reply: Reply, filename: str) -> str:
    assert reply.whole_file is not None
    name = reply.whole_file_name
    if name is not None and PurePosixPath(name).name != filename:
        raise EditError(
            f"The code block is `{name}`, but only {filename} may be edited. {_FORMAT_HINT}"
        )
    new = reply.whole_file
    original_lines = max(1, len(source.splitlines()))
    if _MAIN_GUARD.search(new) or len(new.splitlines()) >= WHOLE_FILE_MIN_FRACTION * original_lines:
        return new
    raise EditError(
        f"The reply has a code block of {len(new.splitlines())} lines but no SEARCH/REPLACE "
        f"block. A code block is used only when it is the complete new {filename} "
        f"({original_lines} lines now); a fragment cannot be placed. {_FORMAT_HINT}"
    )


# ----------------------------------------------------------------------------- matching


def _apply_one(text: str, block: Block, filename: str) -> str:
    lines = text.splitlines()
    search = block.search.split("\n")
    replace = block.replace.split("\n") if block.replace else []
    if not block.search.strip():
        if not text.strip():
            return block.replace.rstrip("\n") + "\n"
        raise EditError(
            f"Block {block.number} has an empty SEARCH part. {filename} is not empty, so the "
            "SEARCH must copy the existing lines the change replaces (or the lines just before "
            "where new lines go, repeated in the REPLACE part)."
        )
    for how, match in (("exact", _same), ("trailing", _same_rstrip), ("indent", _same_indent)):
        positions = [p for p in range(len(lines) - len(search) + 1) if match(lines, p, search)]
        if len(positions) == 1:
            p = positions[0]
            new_lines = replace if how != "indent" else _reindent(lines, p, search, replace)
            result = lines[:p] + new_lines + lines[p + len(search) :]
            ending = "\n" if text.endswith("\n") or not text else ""
            return "\n".join(result) + ending if result else ""
        if len(positions) > 1:
            where = ", ".join(str(p + 1) for p in positions[:10])
            raise EditError(
                f"Block {block.number}: its SEARCH matches {len(positions)} places in {filename} "
                f"(starting at lines {where}), so it is ambiguous and nothing was applied. Add "
                "more surrounding lines to the SEARCH (and the REPLACE) so that it matches "
                "exactly one place.\n" + _first_lines(block)
            )
    raise EditError(
        f"Block {block.number}: its SEARCH does not match any lines of {filename}. The SEARCH "
        "must copy existing lines exactly, whole lines, with their indentation.\n"
        + _first_lines(block)
        + "\n"
        + _closest(lines, search, filename)
    )


def _same(lines: list[str], p: int, search: list[str]) -> bool:
    return lines[p : p + len(search)] == search


def _same_rstrip(lines: list[str], p: int, search: list[str]) -> bool:
    return all(
        a.rstrip() == b.rstrip() for a, b in zip(lines[p : p + len(search)], search, strict=True)
    )


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip(" \t"))]


def _common_indent(lines: list[str]) -> str:
    indents = [_indent(x) for x in lines if x.strip()]
    return min(indents, key=len) if indents else ""


def _same_indent(lines: list[str], p: int, search: list[str]) -> bool:
    """Equal after removing each side's common indentation (blank lines match blank lines)."""
    window = lines[p : p + len(search)]
    a_ind, b_ind = _common_indent(window), _common_indent(search)
    for a, b in zip(window, search, strict=True):
        if not a.strip() and not b.strip():
            continue
        if not (a.startswith(a_ind) and b.startswith(b_ind)):
            return False
        if a[len(a_ind) :].rstrip() != b[len(b_ind) :].rstrip():
            return False
    return True


def _reindent(lines: list[str], p: int, search: list[str], replace: list[str]) -> list[str]:
    """Shift the replacement by the indentation difference between the file and the SEARCH."""
    file_ind = _common_indent(lines[p : p + len(search)])
    search_ind = _common_indent(search)
    out = []
    for line in replace:
        if not line.strip():
            out.append("")
        elif line.startswith(search_ind):
            out.append(file_ind + line[len(search_ind) :])
        else:  # less indented than the SEARCH: keep its offset relative to the SEARCH's
            extra = len(search_ind) - len(_indent(line))
            out.append(file_ind[: max(0, len(file_ind) - extra)] + line.lstrip(" \t"))
    return out


# ----------------------------------------------------------------------------- messages


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
    wanted = "\n".join(x.strip() for x in search)
    best_ratio, best_p = -1.0, 0
    matcher = difflib.SequenceMatcher(autojunk=False)
    matcher.set_seq2(wanted)
    for p in range(len(lines) - n + 1):
        matcher.set_seq1("\n".join(x.strip() for x in lines[p : p + n]))
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
            f"those lines exactly:\n{shown}"
        )
    return f"The closest lines in {filename} ({where}, {best_ratio:.0%} similar) are:\n{shown}"


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
