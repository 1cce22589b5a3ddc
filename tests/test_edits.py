"""SEARCH/REPLACE parsing and application (autoresearch.edits)."""

from __future__ import annotations

import pytest

from autoresearch.edits import (
    DESCRIPTION_MAX_CHARS,
    Block,
    apply_blocks,
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


# ----------------------------------------------------------------------------- not whole


@pytest.mark.parametrize(
    ("tail", "says"),
    [
        ("<<<<<<< SEARCH\nDEPTH = 8  # lay", "ends inside block 2, before its `=======`"),
        ("<<<<<<< SEARCH\nDEPTH = 8  # layers\n=======\nDEPTH = 1", "ends inside block 2"),
        ("<<<<<<< SEA", "its last line `<<<<<<< SEA` is the start of a marker"),
        (
            "```python\n<<<<<<< SEARCH\nDEPTH = 8  # layers\n=======\nDEPTH = 9  # layers\n"
            ">>>>>>> REPLACE",
            "never closed",
        ),
        ("<think>\nand then maybe the depth", "inside its <think> section"),
    ],
    ids=["in-search", "in-replace", "partial-marker", "unclosed-fence", "in-think"],
)
def test_a_reply_cut_off_in_its_text_applies_nothing(tail, says):
    """Block 1 is whole and would apply; the reply ends inside what follows, so none of it is
    used: the model is told it was cut off and asked for a shorter edit."""
    reply = (
        "two changes\n"
        + block(
            "MATRIX_LR = 0.04  # learning rate for matrices",
            "MATRIX_LR = 0.06  # learning rate for matrices",
        )
        + tail
    )
    with pytest.raises(EditError) as exc:
        apply_reply(SOURCE, reply)
    message = str(exc.value)
    assert "cut off" in message and says in message
    assert "Nothing was applied" in message and "shorter" in message


LAZY = {
    "elision-comment": SOURCE.replace(
        SOURCE[SOURCE.index("def warmup") : SOURCE.index('print("val_bpb:"')],
        "# ... rest of the code unchanged ...\n\n\n",
    ),
    "bare-dots": SOURCE.replace(
        "    total = 0\n    for i in range(step):", "    ...\n    for i in range(step):"
    ),
    "dropped-def": SOURCE.replace(
        SOURCE[SOURCE.index("def cooldown") : SOURCE.index('print("val_bpb:"')], ""
    ),
}


@pytest.mark.parametrize("kind", sorted(LAZY))
def test_a_lazy_whole_file_is_refused(kind):
    new = LAZY[kind].replace("DEPTH = 8", "DEPTH = 6")
    with pytest.raises(EditError) as exc:
        apply_reply(SOURCE, "Shallower model\n```python\n" + new + "```\n")
    message = str(exc.value)
    assert ("leaves code out" if kind != "dropped-def" else "lacks `cooldown`") in message
    assert "Nothing was applied" in message and "SEARCH/REPLACE" in message


def test_a_whole_file_may_drop_what_the_reply_names_except_the_harness_contract():
    new = LAZY["dropped-def"].replace("DEPTH = 8", "DEPTH = 6")
    said = "Shallower model; remove the unused cooldown()\n```python\n" + new + "```\n"
    assert apply_reply(SOURCE, said)[1] == new
    with_contract = SOURCE + "\n\ndef load_model(path):\n    return path\n"
    without = with_contract.replace("\n\ndef load_model(path):\n    return path\n", "")
    reply = "Drop load_model, it is unused\n```python\n" + without.replace("8", "6") + "```\n"
    with pytest.raises(EditError, match="lacks `load_model`.*needed by the harness"):
        apply_reply(with_contract, reply)


def test_a_whole_file_that_lost_its_main_guard_is_refused():
    source = SOURCE + '\n\nif __name__ == "__main__":\n    print(schedule(0.1))\n'
    new = SOURCE.replace("DEPTH = 8", "DEPTH = 6")
    with pytest.raises(EditError, match="__main__"):
        apply_reply(source, "Shallower\n```python\n" + new + "```\n")


# ----------------------------------------------------------------------------- the answer, once


def test_everything_before_a_lone_closing_think_is_reasoning():
    reply = (
        "Description: Deeper\n"
        + block("DEPTH = 8  # layers", "DEPTH = 12  # layers")
        + "no, shallower.\n</think>\n\nShallower\n"
        + block("DEPTH = 8  # layers", "DEPTH = 6  # layers")
    )
    description, new = apply_reply(SOURCE, reply)
    assert (description, new) == ("Shallower", SOURCE.replace("DEPTH = 8", "DEPTH = 6"))


def test_thinking_tags_and_crlf():
    reply = "<thinking>\nDEPTH?\n</thinking>\nDeeper\n" + block(
        "DEPTH = 8  # layers", "DEPTH = 10  # layers"
    )
    description, new = apply_reply(SOURCE, reply.replace("\n", "\r\n"))
    assert (description, new) == ("Deeper", SOURCE.replace("DEPTH = 8", "DEPTH = 10"))


def test_a_restated_block_is_applied_once():
    # REPLACE holds its SEARCH: applied twice it would insert the new line twice
    insert = block("DEPTH = 8  # layers", "DEPTH = 8  # layers\nHEADS = 4")
    reply = "Add HEADS\n" + insert + "\nTo recap:\n" + insert.replace("layers\n", "layers  \n")
    assert apply_reply(SOURCE, reply)[1] == SOURCE.replace(
        "DEPTH = 8  # layers\n", "DEPTH = 8  # layers\nHEADS = 4\n"
    )


def test_two_different_replaces_of_one_search_are_ambiguous():
    reply = "depth\n" + block("DEPTH = 8  # layers", "DEPTH = 10  # layers")
    reply += "or rather\n" + block("DEPTH = 8  # layers", "DEPTH = 12  # layers")
    with pytest.raises(EditError, match="Blocks 1 and 2 have the same SEARCH but different"):
        apply_reply(SOURCE, reply)


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        ("Let me think about the depth.\nDescription: Deeper model\n", "Deeper model"),
        ("Okay, so.\n\n**Description:** Deeper model\n", "Deeper model"),
        ("**Description**: Deeper model\n", "Deeper model"),
        ("## Description\nDeeper model\n\n## Edit\n", "Deeper model"),
        ("## Deeper model\n\nMore layers help.\n", "Deeper model"),
        ("I think we should go deeper.\n\n### Deeper model\n", "Deeper model"),
        ("Here is the edit:\n\n**Deeper model**\n", "Deeper model"),
        ("## Analysis\n\nThe user wants lower val_bpb.\n\n## Deeper model\n", "Deeper model"),
        (
            "I'll make the model deeper (DEPTH 8 -> 10).\n",
            "I'll make the model deeper (DEPTH 8 -> 10).",
        ),
    ],
    ids=[
        "label-after-reasoning",
        "bold-label",
        "bold-word-label",
        "heading-then-line",
        "first-heading",
        "reasoning-then-heading",
        "preamble-then-bold",
        "generic-heading-skipped",
        "an-announcement-is-a-summary",
    ],
)
def test_the_description_is_the_answers_summary_never_reasoning(head, expected):
    reply = head + "\n" + block("DEPTH = 8  # layers", "DEPTH = 10  # layers")
    assert apply_reply(SOURCE, reply)[0] == expected


# ----------------------------------------------------------------------------- tolerance

WARMUP_BODY = "    if step < 10:\n        scale = step / 10\n        return scale"
WARMUP_NEW = "    if step < 20:\n        scale = step / 20\n        return scale"
WARMUP_RESULT = SOURCE.replace(WARMUP_BODY, WARMUP_NEW)


@pytest.mark.parametrize(
    ("search", "replace"),
    [
        (
            WARMUP_BODY.replace("        ", "\t\t").replace("    ", "\t"),
            WARMUP_NEW.replace("        ", "\t\t").replace("    ", "\t"),
        ),
        ("\n" + WARMUP_BODY, "\n" + WARMUP_NEW),
        (WARMUP_BODY.replace("\n", "  \n"), WARMUP_NEW),
        (
            "\n".join("        " + x for x in WARMUP_BODY.split("\n")),
            "\n".join("        " + x for x in WARMUP_NEW.split("\n")),
        ),
        (
            "\n".join(f"{14 + k:>5} | {x}" for k, x in enumerate(WARMUP_BODY.split("\n"))),
            WARMUP_NEW,
        ),
        ("```python\n" + WARMUP_BODY + "\n```", "```python\n" + WARMUP_NEW + "\n```"),
        ("train.py\n" + WARMUP_BODY, WARMUP_NEW),
    ],
    ids=[
        "tabs",
        "blank-first-line",
        "trailing-space",
        "extra-indent",
        "gutter",
        "fenced-parts",
        "filename-in-search",
    ],
)
def test_unambiguous_variants_of_a_search_apply(search, replace):
    assert apply_reply(SOURCE, "longer warmup\n" + block(search, replace))[1] == WARMUP_RESULT


def test_elided_lines_match_piece_by_piece():
    search = "def cooldown(step):\n    ...\n        total += i\n    return total"
    replace = "def cooldown(step):\n    ...\n        total += i\n    return 2 * total"
    _, new = apply_reply(SOURCE, "x\n" + block(search, replace))
    assert new == SOURCE.replace("    return total", "    return 2 * total")
    ambiguous = "def cooldown(step):\n    ...\n        total += i"
    with pytest.raises(EditError, match="matches 2 places"):
        apply_reply(SOURCE, "x\n" + block(ambiguous, ambiguous.replace("+=", "-=")))


def test_an_ambiguous_search_is_refused_even_after_indentation_tolerance():
    with pytest.raises(EditError, match="matches 2 places"):
        apply_reply(SOURCE, "x\n" + block("total += i", "total += 2 * i"))


def test_a_whole_file_in_a_four_backtick_fence_may_hold_triple_backticks():
    new = SOURCE.replace("import math\n", 'import math\n\nDOC = """\n```\nexample\n```\n"""\n')
    reply = "Document\n\ntrain.py\n````python\n" + new + "````\n"
    assert apply_reply(SOURCE, reply)[1] == new


@pytest.mark.parametrize("name", ["src\\train.py", "./train.py", "File: `train.py`"])
def test_paths_that_name_train_py_are_accepted(name):
    reply = f"Deeper\n\n{name}\n```python\n" + block("DEPTH = 8  # layers", "DEPTH = 10  # layers")
    assert "DEPTH = 10" in apply_reply(SOURCE, reply + "```\n")[1]


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "reply",
    [
        "Longer context\n\nprepare.py\n```python\n" + block("X = 1", "X = 2") + "```\n",
        "Longer context\n\nFile: prepare.py\n```python\nMAX_SEQ_LEN = 4096\n```\n",
        "Longer context\n\n### Changes to `prepare.py`:\n" + block("X = 1", "X = 2"),
    ],
    ids=["block-header", "file-label", "heading"],
)
def test_a_reply_for_prepare_py_is_told_it_is_fixed(reply):
    with pytest.raises(EditError) as exc:
        apply_reply(SOURCE, reply)
    message = str(exc.value)
    assert "prepare.py is fixed" in message and "only train.py may" in message
    assert "<<<<<<< SEARCH" in message  # what to send instead


def test_prose_about_prepare_py_is_answered_when_its_search_fails():
    reply = "I'll raise MAX_SEQ_LEN in prepare.py.\n" + block(
        "MAX_SEQ_LEN = 2048", "MAX_SEQ_LEN = 4096"
    )
    with pytest.raises(EditError, match="prepare.py is fixed and only train.py may change"):
        apply_reply(SOURCE, reply)


def test_a_replace_already_in_the_file_says_so():
    reply = "x\n" + block("DEPTH = 4  # layers", "DEPTH = 8  # layers")
    with pytest.raises(EditError) as exc:
        apply_reply(SOURCE, reply)
    message = str(exc.value)
    assert message.startswith("Block 1: its SEARCH does not match")
    assert "REPLACE lines are already there (line 4)" in message
    assert "Propose a different change" in message


# ----------------------------------------------------------------------------- Aider's cases

AIDER_WHITESPACE = [
    # (file, SEARCH, REPLACE, result): the leading-whitespace cases of Aider's edit-block tests
    (
        "\n    line1\n    line2\n        line3\n    line4\n",
        "line2\n    line3",
        "new_line2\n    new_line3",
        "\n    line1\n    new_line2\n        new_line3\n    line4\n",
    ),
    (
        "    line1\n    line2\n    line3\n",
        "line1\nline2",
        "new_line1\nnew_line2",
        "    new_line1\n    new_line2\n    line3\n",
    ),
    (
        "    line1\n    line2\n    line3\n",
        " line1\n line2",
        " new_line1\n     new_line2",
        "    new_line1\n        new_line2\n    line3\n",
    ),
    (
        "    line1\n    line2\n    line3\n",
        "\n  line1\n  line2",
        "  new_line1\n  new_line2",
        "    new_line1\n    new_line2\n    line3\n",
    ),
    ("one\ntwo\nthree\n", "two", "new", "one\nnew\nthree\n"),
]


@pytest.mark.parametrize(("source", "search", "replace", "result"), AIDER_WHITESPACE)
def test_aiders_whitespace_cases(source, search, replace, result):
    assert apply_blocks(source, [Block(1, search, replace)]) == result


@pytest.mark.parametrize(
    "source", ["line1\nline2\nline1\nline3\n", "    line1\n    line2\n    line1\n"]
)
def test_where_aider_takes_the_first_match_this_refuses(source):
    with pytest.raises(EditError, match="matches 2 places"):
        apply_blocks(source, [Block(1, "line1", "new_line")])


AIDER_REPLIES = {
    "fence-then-filename": "Here's the change:\n\n```text\ntrain.py\n{b}```\n\nHope you like it!\n",
    "filename-then-fence": "Here's the change:\n\ntrain.py\n```text\n{b}```\n\nHope you like it!\n",
    "two-blocks-dots-between": "Change:\n\n```text\ntrain.py\n{b}\n...\n\n{c}```\n",
    "no-final-newline": "train.py\n{b}\ntrain.py\n{c}",
    "no-filename": "Change:\n\n```python\n{b}```\n",
    "filename-in-own-fence": "Change:\n\n ```python\ntrain.py\n```\n```python\n{b}```\n",
}


@pytest.mark.parametrize("name", sorted(AIDER_REPLIES))
def test_aiders_reply_layouts_parse(name):
    one = block("DEPTH = 8  # layers", "DEPTH = 10  # layers")
    two = block(
        "MATRIX_LR = 0.04  # learning rate for matrices",
        "MATRIX_LR = 0.06  # learning rate for matrices",
    )
    text = AIDER_REPLIES[name].format(b=one, c=two)
    if name == "no-final-newline":
        text = text.rstrip("\n")
    blocks = parse_reply(text).blocks
    assert [b.search.split()[0] for b in blocks] == ["DEPTH", "MATRIX_LR"][: len(blocks)]
    assert all(b.filename in (None, "train.py") for b in blocks)
    assert len(blocks) == (2 if "{c}" in AIDER_REPLIES[name] else 1)
