"""A corpus of replies as real models send them (tests/replies/), each with the exact train.py
it must produce or the refusal it must get.

tests/replies/base_train.py is a frozen copy of the default train.py that every reply edits;
`cases.json` says, per reply file, either the description and the (old, new) substitutions
that give the expected train.py, or the words the refusal must contain. Replies are read as
bytes, so CRLF cases keep their line endings. `finish_reason` and `reasoning_content` cases
are about the transport: they run through OpenAIAgent against the fake endpoint only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fakellm import FakeLLM

from autoresearch.agent import Context, OpenAIAgent
from autoresearch.edits import apply_edit
from autoresearch.errors import EditError

CORPUS = Path(__file__).resolve().parent / "replies"
BASE = (CORPUS / "base_train.py").read_text(encoding="utf-8")
CASES: dict[str, dict] = json.loads((CORPUS / "cases.json").read_text(encoding="utf-8"))
TRANSPORT = ("finish_reason", "reasoning_content")
# The reply the agent-level cases send after a refused one: a change no corpus reply makes.
SCALAR = "SCALAR_LR = 0.1  # AdamW, per-layer scalars (the x0 skip weights)"
FOLLOW_UP = (
    "Raise SCALAR_LR to 0.2\n<<<<<<< SEARCH\n"
    + SCALAR
    + "\n=======\n"
    + SCALAR.replace("0.1", "0.2", 1)
    + "\n>>>>>>> REPLACE\n"
)


def reply_text(name: str) -> str:
    return (CORPUS / f"{name}.txt").read_bytes().decode("utf-8")


def expected_source(case: dict) -> str:
    """The base with the case's substitutions, each of a text that occurs exactly once."""
    source = BASE
    for old, new in case["edits"]:
        assert BASE.count(old) == 1, old
        source = source.replace(old, new)
    return source


def test_the_corpus_is_complete() -> None:
    files = {p.stem for p in CORPUS.glob("*.txt")}
    assert files == set(CASES)
    assert len(CASES) >= 60
    refused = [n for n, c in CASES.items() if c["expect"] == "refuse"]
    assert len(refused) >= 20 and len(CASES) - len(refused) >= 20
    assert any(b"\r\n" in (CORPUS / f"{n}.txt").read_bytes() for n in CASES)


@pytest.mark.parametrize(
    "name", sorted(n for n, c in CASES.items() if not any(k in c for k in TRANSPORT))
)
def test_reply(name: str) -> None:
    case = CASES[name]
    if case["expect"] == "apply":
        description, source = apply_edit(BASE, reply_text(name))
        assert source == expected_source(case)
        assert description == case["description"]
    else:
        with pytest.raises(EditError) as exc:
            apply_edit(BASE, reply_text(name))
        for words in case["says"]:
            assert words in str(exc.value)


@pytest.fixture(scope="module")
def llm():
    with FakeLLM() as server:
        yield server


@pytest.mark.parametrize("name", sorted(CASES))
def test_reply_through_the_agent(llm: FakeLLM, name: str) -> None:
    """Every case over real HTTP: an applied one in one attempt; a refused one is never
    applied in any part, the correction carries the refusal, and the next reply is used."""
    case = CASES[name]
    llm.requests.clear()
    llm.enqueue(
        reply_text(name),
        finish_reason=case.get("finish_reason", "stop"),
        reasoning=case.get("reasoning_content"),
    )
    if case["expect"] == "refuse":
        llm.enqueue(FOLLOW_UP)
    agent = OpenAIAgent(model="fake-model", base_url=llm.base_url, api_key="k", max_retries=0)
    proposal = agent.propose(Context(program="Lower val_bpb.", train_py=BASE))
    assert llm.pending() == 0
    if case["expect"] == "apply":
        assert proposal.attempts == 1
        assert proposal.source == expected_source(case)
        assert proposal.description == (
            case["description"] or "edit of train.py (no description given)"
        )
        return
    assert proposal.attempts == 2
    assert proposal.source == BASE.replace(SCALAR, SCALAR.replace("0.1", "0.2", 1))
    correction = llm.requests[1]["messages"][-1]["content"]
    for words in case["says"]:
        assert words in correction
