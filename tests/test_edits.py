"""SEARCH/REPLACE parsing and application (autoresearch.edits)."""

from __future__ import annotations

import pytest

from autoresearch.edits import (
    DESCRIPTION_MAX_CHARS,
    apply_reply,
    check_compiles,
    clean_description,
    parse_reply,
)
from autoresearch.errors import EditError

SOURCE = """\
import math

MATRIX_LR = 0.04  # learning rate for matrices
DEPTH = 8  # layers


def schedule(progress):
    if progress < 0.5:
        return 1.0
    return 0.5


def warmup(step):
    if step < 10:
        scale = step / 10
        return scale
    return 1.0


def cooldown(step):
    total = 0
    for i in range(step):
        total += i
        total += i
    return total


print("val_bpb:", math.pi)
"""


def block(search: str, replace: str) -> str:
    return f"<<<<<<< SEARCH\n{search}\n=======\n{replace}\n>>>>>>> REPLACE\n"


def test_exact_match_applies_and_keeps_the_rest():
    reply = "Raise MATRIX_LR\n" + block(
        "MATRIX_LR = 0.04  # learning rate for matrices",
        "MATRIX_LR = 0.06  # learning rate for matrices",
    )
    description, new = apply_reply(SOURCE, reply)
    assert description == "Raise MATRIX_LR"
    assert new == SOURCE.replace("MATRIX_LR = 0.04", "MATRIX_LR = 0.06")


def test_blocks_apply_in_order_to_the_evolving_text():
    reply = "two steps\n" + block("DEPTH = 8  # layers", "DEPTH = 9  # layers")
    reply += block("DEPTH = 9  # layers", "DEPTH = 10  # layers")
    _, new = apply_reply(SOURCE, reply)
    assert "DEPTH = 10  # layers" in new and "DEPTH = 8" not in new


def test_trailing_whitespace_is_tolerated():
    reply = "deeper\n" + block("DEPTH = 8  # layers   ", "DEPTH = 12  # layers")
    _, new = apply_reply(SOURCE, reply)
    assert "DEPTH = 12  # layers\n" in new


def test_indentation_shift_is_tolerated_and_replacement_reindented():
    # The SEARCH is the body of warmup() written without its 4-space indentation.
    search = "if step < 10:\n    scale = step / 10\n    return scale"
    replace = "if step < 20:\n    scale = step / 20\n    return scale"
    _, new = apply_reply(SOURCE, "longer warmup\n" + block(search, replace))
    assert "    if step < 20:\n        scale = step / 20\n        return scale\n" in new
    compile(new, "train.py", "exec")


def test_several_matches_are_refused_with_the_count():
    reply = "double count\n" + block("        total += i", "        total += 2 * i")
    with pytest.raises(EditError) as exc:
        apply_reply(SOURCE, reply)
    message = str(exc.value)
    assert "matches 2 places" in message
    assert "more surrounding lines" in message


def test_other_file_is_refused():
    reply = "change the data\nprepare.py\n```python\n" + block("X = 1", "X = 2") + "```\n"
    with pytest.raises(EditError, match=r"`prepare.py`, but only train.py may be edited"):
        apply_reply(SOURCE, reply)


@pytest.mark.parametrize("name_line", ["train.py", "`train.py`", "**train.py**", "### train.py:"])
def test_fences_and_filename_line_are_accepted(name_line):
    reply = (
        "## Deeper model\n\n"
        f"{name_line}\n"
        "```python\n" + block("DEPTH = 8  # layers", "DEPTH = 10  # layers") + "```\n"
    )
    description, new = apply_reply(SOURCE, reply)
    assert description == "Deeper model"
    assert "DEPTH = 10  # layers" in new


def test_filename_in_the_fence_opener():
    reply = "Deeper\n```train.py\n" + block("DEPTH = 8  # layers", "DEPTH = 10  # layers") + "```"
    assert "DEPTH = 10" in apply_reply(SOURCE, reply)[1]


def test_whole_file_fallback_accepts_a_complete_program():
    new_source = SOURCE.replace("DEPTH = 8", "DEPTH = 6")
    reply = "Shallower model\n\nHere is the new file:\n```python\n" + new_source + "```\nDone."
    description, new = apply_reply(SOURCE, reply)
    assert description == "Shallower model"
    assert new == new_source


def test_whole_file_fallback_accepts_a_short_program_with_main_guard():
    # a rewrite that drops definitions must say so (a silent drop is a lazy file, see below)
    program = 'def main():\n    print("hi")\n\n\nif __name__ == "__main__":\n    main()\n'
    reply = "Rewrite: drop schedule, warmup and cooldown\n```python\n" + program + "```"
    assert apply_reply(SOURCE, reply)[1] == program


def test_a_fragment_is_not_taken_for_the_whole_file():
    with pytest.raises(EditError, match="complete new train.py"):
        apply_reply(SOURCE, "deeper\n```python\nDEPTH = 10\n```\n")


def test_no_edit_at_all_is_explained():
    with pytest.raises(EditError, match="no SEARCH/REPLACE block"):
        apply_reply(SOURCE, "I think the learning rate is fine as it is.")
    with pytest.raises(EditError, match="empty"):
        apply_reply(SOURCE, "   \n")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("# Raise the LR", "Raise the LR"),
        ("**Raise the LR**", "Raise the LR"),
        ("Description: Raise the LR", "Raise the LR"),
        ("**Description:** Raise the LR", "Raise the LR"),
        ("### Description: **Raise the LR**", "Raise the LR"),
        ("- Raise the LR", "Raise the LR"),
    ],
)
def test_description_marks_are_stripped(line, expected):
    assert clean_description(line) == expected


def test_description_is_at_most_120_characters():
    long = "Raise " + " ".join(["the learning rate"] * 20)
    text = clean_description(long)
    assert len(text) <= DESCRIPTION_MAX_CHARS
    assert text.startswith("Raise the learning rate")


def test_description_skips_filename_and_fenced_lines():
    reply = "train.py\n```python\n" + block("DEPTH = 8  # layers", "DEPTH = 10  # layers")
    reply += "```\nDeeper is better here.\n"
    assert parse_reply(reply).description == "Deeper is better here."


def test_think_sections_are_ignored():
    reply = "<think>\nMaybe DEPTH... train.py\n</think>\nDeeper\n" + block(
        "DEPTH = 8  # layers", "DEPTH = 10  # layers"
    )
    assert apply_reply(SOURCE, reply)[0] == "Deeper"


def test_failure_message_shows_closest_lines_and_applied_blocks():
    reply = "two changes\n" + block("DEPTH = 8  # layers", "DEPTH = 10  # layers")
    reply += block("def schedule(progress):\n    if progress < 0.6:", "def schedule(p):\n    if p:")
    with pytest.raises(EditError) as exc:
        apply_reply(SOURCE, reply)
    message = str(exc.value)
    assert message.startswith("Block 2: its SEARCH does not match")
    assert "def schedule(progress):" in message  # the first lines of the failed block
    assert "closest lines in train.py (lines 7-8" in message
    assert "    8 |     if progress < 0.5:" in message
    assert "Applied blocks: 1" in message
    assert "with block 2 fixed" in message


def test_indentation_only_difference_is_named():
    reply = "x\n" + block("def cooldown(step):\n  total = 0", "def cooldown(step):\n  total = 1")
    with pytest.raises(EditError, match="only in indentation"):
        apply_reply(SOURCE, reply)


def test_unclosed_block_is_reported():
    with pytest.raises(EditError, match="not closed"):
        apply_reply(SOURCE, "x\n<<<<<<< SEARCH\nDEPTH = 8  # layers\n=======\nDEPTH = 9\n")


def test_empty_search_is_refused_unless_the_file_is_empty():
    reply = "new file\n" + block("", "print('hello')")
    with pytest.raises(EditError, match="empty SEARCH"):
        apply_reply(SOURCE, reply)
    assert apply_reply("", reply)[1] == "print('hello')\n"


def test_syntax_error_is_reported_with_line_and_offending_line():
    reply = "broken\n" + block("DEPTH = 8  # layers", "DEPTH = (8  # layers")
    with pytest.raises(EditError) as exc:
        apply_reply(SOURCE, reply)
    message = str(exc.value)
    assert "does not compile" in message
    assert "line 4" in message
    assert "DEPTH = (8  # layers" in message


def test_check_compiles_accepts_valid_source():
    check_compiles(SOURCE)


def test_a_no_op_edit_is_refused():
    reply = "nothing\n" + block("DEPTH = 8  # layers", "DEPTH = 8  # layers")
    with pytest.raises(EditError, match="changes nothing"):
        apply_reply(SOURCE, reply)


def test_a_failed_edit_leaves_no_partial_result():
    reply = "x\n" + block("DEPTH = 8  # layers", "DEPTH = 10  # layers") + block("nope", "nada")
    original = SOURCE
    with pytest.raises(EditError):
        apply_reply(original, reply)
    assert original == SOURCE


def test_missing_description_gets_a_neutral_one():
    reply = block("DEPTH = 8  # layers", "DEPTH = 10  # layers")
    assert apply_reply(SOURCE, reply)[0] == "edit of train.py (no description given)"
