"""Reading an agent's reply: the answer without its reasoning, its SEARCH/REPLACE blocks, its
whole-file fences and its one-line description. `autoresearch.edits` applies what is read here.

The format (Aider's), one or more blocks, optionally inside ``` fences and optionally preceded
by a line naming the file::

    Raise the matrix learning rate            <- the description (see `find_description`)
    train.py
    <<<<<<< SEARCH
    MATRIX_LR = 0.04
    =======
    MATRIX_LR = 0.06
    >>>>>>> REPLACE

Guarantees of `parse_reply`:
- only the answer counts: CRLF is read as LF; text inside <think>...</think> (or <thinking>),
  and everything before a lone </think>, contributes neither blocks nor the description;
- a reply that is not whole raises EditError: one that ends inside a block, inside a partial
  marker (`<<<<<<< SEA`), inside an unclosed fence or inside its <think> section;
- fences close as in CommonMark (the opener's character, at least its width, no info string),
  so a ```` fence may hold ``` lines; blocks are read raw, whatever fences they contain;
- a block repeated verbatim (a recap) is kept once; two different blocks with the same SEARCH
  raise EditError as ambiguous;
- each block carries the file it names (a header line, `File: x`, `Changes to x:`, a fence
  label, a filename line at the top of its SEARCH), or None; deciding what may be edited is
  the caller's.

Every EditError message is written for the model to read: what failed and what to send instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import EditError

DESCRIPTION_MAX_CHARS = 120  # one line in results.tsv and the commit subject
TARGET_FILE = "train.py"
_SEARCH = re.compile(r"^\s*<{5,9}\s*SEARCH\b.*$")
_DIVIDER = re.compile(r"^\s*={5,9}\s*$")
_REPLACE = re.compile(r"^\s*>{5,9}\s*REPLACE\b.*$")
FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})\s*([^`]*?)\s*$")
# the last line of a reply cut off while writing a marker or a fence
_PARTIAL_MARKER = re.compile(r"^\s*(<{2,}|>{2,}|={2,}|`{1,2})\s*([A-Za-z]*)$")
_THINK = re.compile(r"<(think|thinking)>.*?</\1>", re.DOTALL | re.IGNORECASE)
_THINK_OPEN = re.compile(r"<(think|thinking)>", re.IGNORECASE)
_THINK_CLOSE = re.compile(r"</(think|thinking)>", re.IGNORECASE)
# a file name with an extension models name (a bare `model.forward` is not one)
_NAME = r"[\w.\-/\\]*\w\.(?:py|pyi|ipynb|md|txt|toml|json|ya?ml|cfg|ini|sh)\b"
FILENAME = re.compile(rf"^{_NAME}$")
_NAMING = (  # lines that name the file the next block or fence is for
    re.compile(rf"^(?:file(?:name)?|path)\s*:\s*({_NAME})\s*:?$", re.I),
    re.compile(rf"^({_NAME})\s*:?$"),
    re.compile(
        rf"^.{{0,60}}?\b(?:in|to|of|for|edit|editing|edited|update|updated|modify|modified|"
        rf"change|changes|changed)\s+(?:the\s+)?(?:file\s+)?`?({_NAME})`?\s*:$",
        re.I,
    ),
)
_PYTHON_LANGS = {"", "python", "py", "python3"}
# a line that says it is the description, wherever it stands in the answer
_LABEL = re.compile(
    r"^(description|title|commit message)(?:\*\*|__)?\s*(?::(?:\*\*|__)?\s*(.*))?$", re.I
)
# section titles, not summaries: never the description
_GENERIC_HEADING = re.compile(
    r"^(analysis|reasoning|thinking|thoughts|plan|idea|proposal|experiment|changes?|edits?|"
    r"summary|explanation|rationale|implementation|code|diff|patch|search/replace( blocks?)?|"
    r"hypothesis|why|notes?|description|the edit|the change|solution|answer|result)\W*$",
    re.I,
)
# openers of thinking aloud or of a preamble: such a first line is not the description
_REASONING = re.compile(
    r"^(let me|let's|let us|i think|i need to|i should|i wonder|"
    r"looking at|okay|ok\b|alright|hmm|so,|so the|first,|now,|well,|the user|we need|"
    r"based on|here's|here is|here are|sure\b|certainly|of course|my (reasoning|analysis))",
    re.I,
)
FORMAT_HINT = (
    "Send the edit as SEARCH/REPLACE blocks:\n"
    "<<<<<<< SEARCH\nexact lines copied from train.py\n=======\nthe new lines\n>>>>>>> REPLACE"
)
_RESEND = "Nothing was applied. Send the whole edit again, complete and shorter: "
_SHORTER = "only the description line and short SEARCH/REPLACE blocks, without explanation."


@dataclass
class Block:
    """One SEARCH/REPLACE block; `number` counts from 1 in reply order."""

    number: int
    search: str
    replace: str
    filename: str | None = None  # as named in the reply, None when not named


@dataclass
class Reply:
    """What a reply's answer contains: the description, the blocks, a whole-file candidate.

    `whole_file` is set only when there are no blocks, from the python or unlabelled fences;
    whether it is a whole program is decided against the original by `apply_reply`.
    `prose` is the answer's text outside blocks and fences; `restated` lists the numbers of
    blocks dropped as verbatim repeats of an earlier one.
    """

    description: str | None
    blocks: list[Block] = field(default_factory=list)
    whole_file: str | None = None
    whole_file_name: str | None = None
    # every python or unlabelled fence: (the filename it is labelled with, its text)
    whole_files: list[tuple[str | None, str]] = field(default_factory=list)
    prose: list[str] = field(default_factory=list)
    restated: list[int] = field(default_factory=list)


@dataclass
class _Fence:
    char: str
    width: int
    lang: str
    name: str | None
    body: list[str] = field(default_factory=list)


def answer_text(text: str) -> str:
    """The reply without its reasoning: CRLF as LF, <think> sections and everything before a
    lone </think> removed. Raises EditError when the reply ends inside its <think> section."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _THINK.sub("", text)
    closes = list(_THINK_CLOSE.finditer(text))
    if closes:  # DeepSeek-R1 style: the opening tag is in the prompt template, not the reply
        text = text[closes[-1].end() :]
    opened = _THINK_OPEN.search(text)
    if opened:
        raise EditError(
            "The reply was cut off: it ends inside its <think> section, before any answer. "
            + _RESEND
            + _SHORTER
        )
    return text


def parse_reply(text: str) -> Reply:
    """Split a reply's answer into description, blocks and whole-file candidates.

    Raises EditError for a reply that is not whole (cut off inside a block, a marker, a fence
    or its reasoning), for a block that is not closed properly, and for two different blocks
    with the same SEARCH. A reply with no edit at all parses to a Reply without blocks and
    without whole_file (`apply_reply` explains that to the model).
    """
    lines = answer_text(text).split("\n")
    blocks: list[Block] = []
    fences: list[_Fence] = []
    prose: list[tuple[int, str]] = []  # (index, line) outside blocks and fences
    last_name: str | None = None
    fence: _Fence | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if _SEARCH.match(line):
            name = _preceding_filename(lines, i, fence) or last_name
            block, i = _read_block(lines, i, len(blocks) + 1, name)
            blocks.append(block)
            last_name = block.filename
            continue
        opener = FENCE.match(line)
        if fence is None and opener:
            lang, fname = _fence_label(opener.group(2))
            fname = fname or _preceding_filename(lines, i, None)
            fence = _Fence(opener.group(1)[0], len(opener.group(1)), lang, fname)
        elif fence is not None and opener and _closes(fence, opener):
            fences.append(fence)
            fence = None
        elif fence is not None:
            fence.body.append(line)
        elif line.strip():
            prose.append((i, line))
        i += 1
    if fence is not None:
        raise EditError(
            f"The reply was cut off: it ends inside a {fence.char * fence.width} fence that is "
            "never closed. " + _RESEND + _SHORTER
        )
    _refuse_partial_marker(prose, lines)
    blocks, restated = _drop_restated(blocks)
    reply = Reply(
        description=find_description(lines, prose),
        blocks=blocks,
        prose=[line for _, line in prose],
        restated=restated,
    )
    if not blocks:
        code = [f for f in fences if _is_python(f) and "\n".join(f.body).strip()]
        if code:
            biggest = max(code, key=lambda f: len(f.body))
            reply.whole_file = "\n".join(biggest.body).rstrip("\n") + "\n"
            reply.whole_file_name = biggest.name
            reply.whole_files = [(f.name, "\n".join(f.body).rstrip("\n") + "\n") for f in code]
    return reply


def find_description(lines: list[str], prose: list[tuple[int, str]]) -> str | None:
    """The answer's one-line summary, from its prose lines (outside blocks and fences).

    In order: a labelled line (`Description: …`, `**Description:** …`, `## Description` with
    the next line); the first line, unless it is reasoning or a preamble ("Let me…",
    "Here is the edit:"); the first heading that is not a generic section title ("## Analysis").
    None when the answer gives none of these.
    """
    for k, (_, line) in enumerate(prose):
        label = _LABEL.match(_unmark(line))
        if not label:
            continue
        if label.group(2) and label.group(2).strip():
            return clean_description(label.group(2))
        if k + 1 < len(prose):
            nxt = prose[k + 1][1]
            if not _is_filename_line(nxt, lines, prose[k + 1][0]):
                return clean_description(nxt)
    candidates = [(i, line) for i, line in prose if not _is_filename_line(line, lines, i)]
    if candidates:
        first = _strip_marks(candidates[0][1])
        if first and _plausible(first) and not _GENERIC_HEADING.match(first):
            return clean_description(first)
    for _, line in candidates:
        if re.match(r"^\s*#{1,6}\s", line) or re.match(r"^\s*\*\*[^*]+\*\*\s*$", line):
            text = _strip_marks(line)
            if text and _plausible(text) and not _GENERIC_HEADING.match(text):
                return clean_description(text)
    return None


def clean_description(line: str) -> str:
    """One-line description: markdown marks and a leading 'Description:' stripped, ≤120 chars."""
    text = _strip_marks(line)
    text = " ".join(text.split())
    if len(text) > DESCRIPTION_MAX_CHARS:
        cut = text[: DESCRIPTION_MAX_CHARS - 1]
        space = cut.rfind(" ")
        text = (cut[:space] if space > DESCRIPTION_MAX_CHARS // 2 else cut).rstrip() + "…"
    return text


# ----------------------------------------------------------------------------- helpers


def _read_block(lines: list[str], start: int, number: int, name: str | None) -> tuple[Block, int]:
    """Read the block whose SEARCH marker is at `start`; return it and the index after it."""
    i = start + 1
    search: list[str] = []
    while i < len(lines) and not _DIVIDER.match(lines[i]):
        if _SEARCH.match(lines[i]) or _REPLACE.match(lines[i]):
            raise EditError(
                f"Block {number} has no `=======` line between its SEARCH and REPLACE parts. "
                + FORMAT_HINT
            )
        search.append(lines[i])
        i += 1
    if i == len(lines):
        raise EditError(
            f"The reply was cut off: it ends inside block {number}, before its `=======` line "
            "(the block is not closed). " + _RESEND + _SHORTER
        )
    i += 1
    replace: list[str] = []
    while i < len(lines) and not _REPLACE.match(lines[i]):
        if _SEARCH.match(lines[i]) or _DIVIDER.match(lines[i]):
            raise EditError(
                f"Block {number} has no `>>>>>>> REPLACE` line before the next marker. "
                + FORMAT_HINT
            )
        replace.append(lines[i])
        i += 1
    if i == len(lines):
        raise EditError(
            f"The reply was cut off: it ends inside block {number}, whose REPLACE part is not "
            "closed by a `>>>>>>> REPLACE` line. " + _RESEND + _SHORTER
        )
    named = _named_in_part(search)
    if named is not None and basename(named) != TARGET_FILE:
        name = named
    return Block(number, "\n".join(search), "\n".join(replace), name), i + 1


def _refuse_partial_marker(prose: list[tuple[int, str]], lines: list[str]) -> None:
    """A reply whose last line is the start of a marker (`<<<<<<< SEA`, `>>>`) was cut off."""
    last = next((line for line in reversed(lines) if line.strip()), "")
    if not prose or prose[-1][1] != last:
        return
    partial = _PARTIAL_MARKER.match(last)
    if partial and (
        not partial.group(2)
        or "SEARCH".startswith(partial.group(2).upper())
        or "REPLACE".startswith(partial.group(2).upper())
    ):
        raise EditError(
            f"The reply was cut off: its last line `{last.strip()}` is the start of a marker "
            "or fence. " + _RESEND + _SHORTER
        )


def _drop_restated(blocks: list[Block]) -> tuple[list[Block], list[int]]:
    """Keep the first of blocks repeated verbatim; refuse two different REPLACEs of one SEARCH."""
    kept: list[Block] = []
    restated: list[int] = []
    for block in blocks:
        key = normalized(block.search)
        twin = next((b for b in kept if normalized(b.search) == key), None)
        if twin is None:
            kept.append(block)
        elif (
            normalized(twin.replace) == normalized(block.replace)
            and twin.filename == block.filename
        ):
            restated.append(block.number)
        elif key.strip():
            raise EditError(
                f"Blocks {twin.number} and {block.number} have the same SEARCH but different "
                "REPLACE parts, so it is ambiguous which change is meant; nothing was applied. "
                "Send one block per place, each with the one REPLACE you mean."
            )
        else:
            kept.append(block)
    return kept, restated


def normalized(text: str) -> str:
    """A part as compared for sameness: no blank lines around it, no trailing whitespace."""
    return "\n".join(line.rstrip() for line in text.strip("\n").split("\n"))


def _closes(fence: _Fence, match: re.Match) -> bool:
    """A closing fence: the opener's character, at least its width, no info string."""
    marks, info = match.group(1), match.group(2)
    return marks[0] == fence.char and len(marks) >= fence.width and not info


def _is_python(fence: _Fence) -> bool:
    if fence.name is not None:
        return fence.name.endswith(".py")
    return fence.lang in _PYTHON_LANGS


def _fence_label(label: str) -> tuple[str, str | None]:
    """The language and filename of a fence opener: ```python, ```train.py, ```python train.py."""
    lang, name = "", None
    for word in label.split():
        if FILENAME.match(word.strip("`*:")):
            name = word.strip("`*:")
        elif not lang:
            lang = word.lower()
    if name and not lang:
        lang = "python" if name.endswith(".py") else ""
    return lang, name


def _unmark(line: str) -> str:
    """A line without markdown marks around it (heading, bold, list, quote)."""
    text = line.strip()
    previous = None
    while text != previous:
        previous = text
        text = re.sub(r"^(#+|\*\*|__|[-*+]\s|>|\d+\.\s)\s*", "", text)
        text = re.sub(r"\s*(\*\*|__)$", "", text)
    return text


def _strip_marks(line: str) -> str:
    """A line without markdown marks and without a leading label such as `Description:`."""
    text = _unmark(line)
    previous = None
    while text != previous:
        previous = text
        text = re.sub(
            r"^(description|idea|experiment|title)\s*(\*\*|__)?\s*:\s*(\*\*|__)?\s*",
            "",
            text,
            flags=re.I,
        )
        text = _unmark(text)
    return text.strip("` ").strip()


def _plausible(text: str) -> bool:
    """Could this line be the one-line summary (not reasoning, not a preamble)?"""
    return not (
        text.endswith(":")
        or _REASONING.match(text)
        or len(text) > 2 * DESCRIPTION_MAX_CHARS
        or _SEARCH.match(text)
        or _PARTIAL_MARKER.match(text)
    )


def _filename_in(line: str) -> str | None:
    """The file a line names, when the line only introduces a file: `train.py`, `File:
    prepare.py`, `### Changes to train.py:`; backslashes (Windows paths) are accepted."""
    text = line.strip()
    text = re.sub(r"^(#+\s*|[-*]\s+|>\s*)", "", text)
    text = text.replace("**", "").replace("__", "").strip()
    text = re.sub(r"`([^`]*)`", r"\1", text).strip("`* ").strip()
    for pattern in _NAMING:
        named = pattern.match(text)
        if named:
            return named.group(1)
    return None


def _named_in_part(part: list[str]) -> str | None:
    """A filename line at the top of a SEARCH part (a model that put the header inside)."""
    first = next((line for line in part if line.strip()), "")
    return first.strip().strip("`*#: ") if FILENAME.match(first.strip().strip("`*#: ")) else None


def basename(name: str) -> str:
    """The file name of a path written with / or \\ (`src\\train.py` names train.py)."""
    return re.split(r"[\\/]", name.strip())[-1]


def _preceding_filename(lines: list[str], i: int, fence: _Fence | None) -> str | None:
    """The filename named just before line i (skipping blank lines and a fence opener)."""
    if fence is not None and fence.name:
        return fence.name
    j = i - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    if j >= 0 and FENCE.match(lines[j]):
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
    return j < len(lines) and bool(FENCE.match(lines[j]) or _SEARCH.match(lines[j]))
