"""Proposal agents (autoresearch.agent): OpenAI-compatible over real HTTP, tuner, replay."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from fakellm import FakeLLM

from autoresearch.agent import (
    PROMPT_LEVELS,
    AgentExhausted,
    Context,
    EndpointError,
    HistoryEntry,
    InvalidProposal,
    OpenAIAgent,
    ReplayAgent,
    TunerAgent,
    build_messages,
    check_endpoint,
    find_knobs,
    history_table,
    knob_steps,
    make_agent,
    resolve_api_key,
)
from autoresearch.errors import AgentError, UsageError
from autoresearch.noise import judge, prompt_label

TEMPLATE = Path(__file__).resolve().parents[1] / "autoresearch" / "templates" / "train.py"
SECRET = "sk-test-secret-0123456789"

TRAIN_PY = '''\
"""A small stand-in for train.py with the upstream constant block."""

from prepare import MAX_SEQ_LEN, TIME_BUDGET

# Model architecture
ASPECT_RATIO = 64  # model_dim = depth * ASPECT_RATIO
HEAD_DIM = 128  # target head dimension
WINDOW_PATTERN = "SSSL"  # L = full context, S = half context

# Optimization
TOTAL_BATCH_SIZE = 2**19  # tokens per optimizer step
EMBEDDING_LR = 0.6  # token embeddings (Adam)
UNEMBEDDING_LR = 0.004  # lm_head (Adam)
MATRIX_LR = 0.04  # matrices (Muon)
SCALAR_LR = 0.5  # per-layer scalars (Adam)
WEIGHT_DECAY = 0.2  # cautious weight decay
ADAM_BETAS = (0.8, 0.95)  # Adam beta1, beta2
WARMUP_RATIO = 0.0  # fraction of the budget for warmup
WARMDOWN_RATIO = 0.5  # fraction of the budget for warmdown
FINAL_LR_FRAC = 0.0  # final LR as a fraction of the initial one
USE_QK_NORM = True  # normalize queries and keys

# Model size
DEPTH = 8  # transformer layers
DEVICE_BATCH_SIZE = 128  # per-device batch (reduce if OOM)
SEED = 42


def lr_multiplier(progress):
    if progress < 1.0 - WARMDOWN_RATIO:
        return 1.0
    cooldown = (1.0 - progress) / WARMDOWN_RATIO
    return cooldown + (1 - cooldown) * FINAL_LR_FRAC


print("---")
print("val_bpb: 1.0")
'''

GOOD_REPLY = """Raise MATRIX_LR to 0.06

train.py
```python
<<<<<<< SEARCH
MATRIX_LR = 0.04  # matrices (Muon)
=======
MATRIX_LR = 0.06  # matrices (Muon)
>>>>>>> REPLACE
```
"""
BAD_REPLY = """Raise MATRIX_LR
<<<<<<< SEARCH
MATRIX_LR = 0.05  # not in the file
=======
MATRIX_LR = 0.06
>>>>>>> REPLACE
"""


def make_ctx(history: list[HistoryEntry] | None = None, **kw) -> Context:
    return Context(
        program="# program.md\nLower val_bpb.",
        train_py=kw.pop("train_py", TRAIN_PY),
        history=history or [],
        best_bpb=kw.pop("best_bpb", 1.0),
        **kw,
    )


@pytest.fixture
def llm():
    with FakeLLM() as server:
        yield server


def openai_agent(server: FakeLLM, **kw) -> OpenAIAgent:
    kw.setdefault("max_retries", 2)
    kw.setdefault("timeout", 5.0)
    return OpenAIAgent(model="fake-model", base_url=server.base_url, api_key=SECRET, **kw)


# ------------------------------------------------------------------------ OpenAIAgent


def test_good_edit_in_one_attempt(llm):
    llm.enqueue(GOOD_REPLY, prompt_tokens=1200, completion_tokens=80)
    proposal = openai_agent(llm).propose(make_ctx())
    assert proposal.description == "Raise MATRIX_LR to 0.06"
    assert proposal.source == TRAIN_PY.replace("MATRIX_LR = 0.04", "MATRIX_LR = 0.06")
    assert (proposal.attempts, proposal.tokens_in, proposal.tokens_out) == (1, 1200, 80)
    assert (proposal.agent, proposal.model, proposal.reply) == ("openai", "fake-model", GOOD_REPLY)
    request = llm.requests[0]
    assert request["model"] == "fake-model"
    assert request["messages"] == proposal.messages
    system, user = request["messages"]
    assert system["content"].startswith("# program.md\nLower val_bpb.")
    assert "<<<<<<< SEARCH" in system["content"]
    assert TRAIN_PY.strip() in user["content"]


def test_malformed_reply_is_corrected_with_the_error_message(llm):
    llm.enqueue(BAD_REPLY)
    llm.enqueue(GOOD_REPLY)
    proposal = openai_agent(llm).propose(make_ctx())
    assert proposal.attempts == 2
    assert len(llm.requests) == 2
    second = llm.requests[1]["messages"]
    assert second[-2] == {"role": "assistant", "content": BAD_REPLY}
    assert "does not match any lines of train.py" in second[-1]["content"]
    assert "MATRIX_LR = 0.04  # matrices (Muon)" in second[-1]["content"]  # the closest line
    assert BAD_REPLY in proposal.reply and GOOD_REPLY in proposal.reply


@pytest.mark.parametrize("bad", ["refusal", "empty", "no_choices", "prose"])
def test_refusing_or_empty_reply_is_a_failed_attempt(llm, bad):
    {
        "refusal": llm.enqueue_refusal,
        "empty": llm.enqueue_empty,
        "no_choices": lambda: llm.enqueue_empty(no_choices=True),
        "prose": lambda: llm.enqueue("I would raise the learning rate."),
    }[bad]()
    llm.enqueue(GOOD_REPLY)
    proposal = openai_agent(llm).propose(make_ctx())
    assert proposal.attempts == 2


def test_truncated_reply_is_told_it_was_cut_off(llm):
    llm.enqueue(GOOD_REPLY[:-40], finish_reason="length")
    llm.enqueue(GOOD_REPLY)
    proposal = openai_agent(llm).propose(make_ctx())
    assert proposal.attempts == 2
    assert "cut off at the output token limit" in llm.requests[1]["messages"][-1]["content"]


DEEPER = GOOD_REPLY.replace("Raise MATRIX_LR to 0.06", "Deeper model").replace(
    "MATRIX_LR = 0.04  # matrices (Muon)\n=======\nMATRIX_LR = 0.06  # matrices (Muon)",
    "DEPTH = 8  # transformer layers\n=======\nDEPTH = 10  # transformer layers",
)
AFTER_GOOD = TRAIN_PY.replace("MATRIX_LR = 0.04", "MATRIX_LR = 0.06")
AFTER_DEEPER = TRAIN_PY.replace("DEPTH = 8", "DEPTH = 10")


@pytest.mark.parametrize("finish_reason", ["length", "max_tokens"])
def test_a_reply_cut_off_at_the_limit_is_never_applied_even_when_it_looks_whole(llm, finish_reason):
    """Checked before parsing: the first reply would apply (it may have been cut between two
    blocks), but the limit was hit, so none of it is used; the model is asked for less."""
    llm.enqueue(GOOD_REPLY, finish_reason=finish_reason)
    llm.enqueue(DEEPER)
    proposal = openai_agent(llm).propose(make_ctx())
    assert (proposal.attempts, proposal.source) == (2, AFTER_DEEPER)
    correction = llm.requests[1]["messages"][-1]["content"]
    assert "cut off at the output token limit before its end" in correction
    assert "none of it was applied" in correction and "shorter edit" in correction


def test_content_filtered_reply_is_never_applied(llm):
    llm.enqueue(GOOD_REPLY, finish_reason="content_filter")
    llm.enqueue(DEEPER)
    proposal = openai_agent(llm).propose(make_ctx())
    assert (proposal.attempts, proposal.source) == (2, AFTER_DEEPER)
    assert "content filter" in llm.requests[1]["messages"][-1]["content"]


def test_reasoning_content_never_contributes(llm):
    """`reasoning_content` (vLLM, DeepSeek) holds a block and a description of its own: only
    the answer in `content` is applied, and an empty answer is a failed attempt."""
    llm.enqueue(GOOD_REPLY, reasoning=DEEPER)
    proposal = openai_agent(llm).propose(make_ctx())
    assert (proposal.description, proposal.source) == ("Raise MATRIX_LR to 0.06", AFTER_GOOD)
    llm.enqueue("", reasoning=DEEPER)
    llm.enqueue(GOOD_REPLY)
    proposal = openai_agent(llm).propose(make_ctx())
    assert (proposal.attempts, proposal.source) == (2, AFTER_GOOD)
    assert "only reasoning" in llm.requests[-1]["messages"][-1]["content"]


def test_cut_off_while_reasoning_says_so(llm):
    llm.enqueue("", finish_reason="length", reasoning="Let me think. " * 100)
    llm.enqueue(GOOD_REPLY)
    openai_agent(llm).propose(make_ctx())
    assert "while reasoning" in llm.requests[1]["messages"][-1]["content"]


def test_a_corrected_reply_without_description_keeps_the_one_given_before(llm):
    llm.enqueue(BAD_REPLY)  # "Raise MATRIX_LR" and a SEARCH that matches nothing
    llm.enqueue(GOOD_REPLY.split("\n", 2)[2])  # the blocks only
    proposal = openai_agent(llm).propose(make_ctx())
    assert (proposal.attempts, proposal.source) == (2, AFTER_GOOD)
    assert proposal.description == "Raise MATRIX_LR"


# ------------------------------------------------------------------------ the endpoint check


def test_check_passes_on_the_models_list_without_a_completion(llm):
    openai_agent(llm).check()
    assert llm.requests == []  # GET /models only: no scripted reply consumed


def test_check_picks_the_listed_model_when_none_is_given(llm):
    agent = OpenAIAgent(model=None, base_url=llm.base_url, api_key=SECRET, max_retries=0)
    agent.check()
    assert agent.model == "fake-model"


def test_check_asks_for_one_token_where_there_is_no_models_route():
    with FakeLLM(list_models=False) as server:
        server.enqueue("OK")
        openai_agent(server).check()
        assert server.requests[0]["max_tokens"] == 1 and server.pending() == 0


def test_check_refused_connection_names_the_url_and_the_fix():
    with FakeLLM() as server:
        url = server.base_url  # closed once the block ends: nothing listens there
    agent = OpenAIAgent(model="m", base_url=url, api_key=SECRET, max_retries=0, timeout=5)
    with pytest.raises(EndpointError) as exc:
        agent.check()
    message = str(exc.value)
    assert message.startswith(f"Cannot reach {url} (")
    assert "check --base-url" in message and "\n" not in message
    assert exc.value.exit_code == 2


def test_check_unknown_model_gives_the_endpoints_words_and_its_models():
    with FakeLLM(strict_model=True) as server:
        agent = OpenAIAgent(model="gpt-nope", base_url=server.base_url, api_key=SECRET)
        with pytest.raises(EndpointError) as exc:
            agent.check()
        assert server.pending() == 0
    message = str(exc.value)
    assert "does not serve model 'gpt-nope' (HTTP 404: The model `gpt-nope` does not exist.)" in (
        message
    )
    assert "--model" in message and "it lists: fake-model" in message


def test_check_rejected_key_names_the_variables_never_the_key():
    with FakeLLM(api_key="sk-the-right-one") as server:
        with pytest.raises(EndpointError) as exc:
            openai_agent(server).check()
    message = str(exc.value)
    assert "rejected the API key (HTTP 401: Incorrect API key provided" in message
    assert "OPENAI_API_KEY" in message and SECRET not in message


def test_check_of_offline_agents_is_nothing(tmp_path):
    check_endpoint(TunerAgent())  # no endpoint, nothing to check, nothing raised
    (tmp_path / "01.txt").write_text(GOOD_REPLY)
    check_endpoint(ReplayAgent(tmp_path))


def test_non_json_response_is_an_agent_error(llm):
    llm.enqueue_raw(200, b"<html>not an API</html>")
    with pytest.raises(AgentError, match="not JSON"):
        openai_agent(llm).propose(make_ctx())


def test_three_bad_replies_raise_invalid_proposal(llm):
    for _ in range(3):
        llm.enqueue(BAD_REPLY, prompt_tokens=100, completion_tokens=10)
    with pytest.raises(InvalidProposal) as exc:
        openai_agent(llm).propose(make_ctx())
    err = exc.value
    assert isinstance(err, AgentError)
    assert (err.attempts, err.tokens_in, err.tokens_out) == (3, 300, 30)
    assert len(llm.requests) == 3 and llm.pending() == 0
    assert err.messages == llm.requests[-1]["messages"]
    assert err.reply.count("MATRIX_LR = 0.05") == 3
    assert "does not match" in str(err)
    assert err.description == "Raise MATRIX_LR"


def test_usage_is_summed_over_attempts(llm):
    llm.enqueue(BAD_REPLY, prompt_tokens=1000, completion_tokens=50)
    llm.enqueue(GOOD_REPLY, prompt_tokens=1400, completion_tokens=70)
    proposal = openai_agent(llm).propose(make_ctx())
    assert (proposal.tokens_in, proposal.tokens_out) == (2400, 120)


def test_rate_limit_is_retried_by_the_client(llm):
    llm.enqueue_error(429)
    llm.enqueue(GOOD_REPLY)
    proposal = openai_agent(llm).propose(make_ctx())
    assert proposal.attempts == 1  # a retried request is not a failed attempt
    assert len(llm.requests) == 2


def test_persistent_server_error_raises_agent_error(llm):
    for _ in range(3):  # the first request and two client retries
        llm.enqueue_error(500)
    with pytest.raises(AgentError) as exc:
        openai_agent(llm, max_retries=2).propose(make_ctx())
    assert not isinstance(exc.value, InvalidProposal)
    assert "HTTP 500 after 2 retries" in str(exc.value)
    assert len(llm.requests) == 3


def test_timeout_raises_agent_error(llm):
    llm.enqueue_delay(5, GOOD_REPLY)
    with pytest.raises(AgentError, match="did not answer within"):
        openai_agent(llm, timeout=0.2, max_retries=0).propose(make_ctx())


def test_unreachable_endpoint_raises_agent_error():
    with FakeLLM() as server:
        url = server.base_url
    agent = OpenAIAgent(model="m", base_url=url, api_key=SECRET, max_retries=0, timeout=2)
    with pytest.raises(AgentError, match="Could not connect"):
        agent.propose(make_ctx())


def test_bad_key_is_reported_without_the_key(llm):
    llm.enqueue_error(401)
    with pytest.raises(AgentError) as exc:
        openai_agent(llm).propose(make_ctx())
    assert "OPENAI_API_KEY" in str(exc.value)
    assert SECRET not in str(exc.value)


def long_history(n: int) -> list[HistoryEntry]:
    return [
        HistoryEntry(
            id=i,
            status="keep" if i % 7 == 0 else "discard",
            val_bpb=1.0 - i * 1e-4,
            delta=None if i == 0 else -1e-4,
            description=f"experiment number {i} with a fairly long description of the idea",
            source=None,
        )
        for i in range(n)
    ]


def test_context_length_error_retries_with_a_shorter_prompt(llm):
    ctx = make_ctx(long_history(60), last_crash_tail="\n".join(f"log {i}" for i in range(50)))
    sizes = [len(json.dumps(build_messages(ctx, level))) for level in range(len(PROMPT_LEVELS))]
    assert sizes == sorted(sizes, reverse=True)
    llm.enqueue_context_length_error()
    llm.enqueue(GOOD_REPLY)
    proposal = openai_agent(llm).propose(ctx)
    assert proposal.attempts == 1
    first, second = (r["messages"][1]["content"] for r in llm.requests)
    assert len(second) < len(first)
    assert "experiment number 45 " in first and "experiment number 45 " not in second
    assert "log 0" in first and "log 45" in second  # history trimmed before the crash log


def test_context_limit_trims_history_then_crash_log_until_it_fits(llm):
    ctx = make_ctx(long_history(60), last_crash_tail="\n".join(f"log {i}" for i in range(50)))
    levels = range(len(PROMPT_LEVELS))
    chars = [sum(len(m["content"]) for m in build_messages(ctx, lv)) for lv in levels]
    llm.context_limit = chars[4]  # no history and a 10-line crash log is the first that fits
    llm.enqueue(GOOD_REPLY)
    proposal = openai_agent(llm).propose(ctx)
    assert len(llm.requests) == 5
    user = proposal.messages[1]["content"]
    assert "experiment number" not in user
    assert "log 40" in user and "log 39" not in user


def test_prompt_too_long_even_without_history_is_an_agent_error(llm):
    llm.context_limit = 10
    with pytest.raises(AgentError, match="too long"):
        openai_agent(llm).propose(make_ctx())
    # without history or crash log every level is the same prompt: sent once, not six times
    assert len(llm.requests) == 1


def test_api_key_is_sent_but_never_recorded(llm, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    llm.enqueue(BAD_REPLY)
    llm.enqueue(GOOD_REPLY)
    agent = OpenAIAgent(model="fake-model", base_url=llm.base_url, api_key=None, max_retries=0)
    proposal = agent.propose(make_ctx())
    assert llm.headers[0]["authorization"] == f"Bearer {SECRET}"
    assert SECRET not in json.dumps(proposal.messages)
    assert SECRET not in proposal.reply and SECRET not in repr(agent)
    assert all(SECRET not in json.dumps(r) for r in llm.requests)


def test_fix_edits_the_crashed_candidate(llm):
    failed = TRAIN_PY.replace("DEPTH = 8", "DEPTH = 64")
    history = [
        HistoryEntry(0, "keep", 1.0, None, "baseline", TRAIN_PY),
        HistoryEntry(1, "crash", None, None, "Much deeper model", failed),
    ]
    llm.enqueue(
        "Deeper model, smaller batch\n<<<<<<< SEARCH\nDEVICE_BATCH_SIZE = 128  # per-device "
        "batch (reduce if OOM)\n=======\nDEVICE_BATCH_SIZE = 32\n>>>>>>> REPLACE\n"
    )
    tail = "torch.OutOfMemoryError: CUDA out of memory"
    proposal = openai_agent(llm).fix(make_ctx(history), failed, tail)
    assert "DEPTH = 64" in proposal.source and "DEVICE_BATCH_SIZE = 32\n" in proposal.source
    user = llm.requests[0]["messages"][1]["content"]
    assert tail in user and "Its idea: Much deeper model" in user and "DEPTH = 64" in user


def test_model_defaults_to_the_one_a_local_server_lists(llm):
    llm.enqueue(GOOD_REPLY)
    agent = OpenAIAgent(model=None, base_url=llm.base_url, max_retries=0)
    assert agent.propose(make_ctx()).model == llm.model
    assert llm.requests[0]["model"] == llm.model


def test_api_key_resolution(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("AUTORESEARCH_API_KEY", raising=False)
    assert resolve_api_key(None, "http://localhost:8000/v1") == "not-needed"
    with pytest.raises(AgentError, match="No API key found"):
        resolve_api_key(None, None)
    monkeypatch.setenv("OPENAI_API_KEY", "a")
    assert resolve_api_key(None, None) == "a"
    monkeypatch.setenv("AUTORESEARCH_API_KEY", "b")
    assert resolve_api_key(None, None) == "b"
    assert resolve_api_key("c", None) == "c"


def test_make_agent(tmp_path):
    assert make_agent("tuner").name == "tuner"
    (tmp_path / "001.txt").write_text(GOOD_REPLY)
    assert make_agent("replay", patches_dir=tmp_path).name == "replay"
    assert make_agent("openai", model="m", base_url="http://127.0.0.1:9/v1").name == "openai"
    with pytest.raises(UsageError):
        make_agent("gpt")
    with pytest.raises(UsageError):
        make_agent("replay", patches_dir=None)


# ------------------------------------------------------------------------ history table


def test_history_table_keeps_recent_and_all_keeps_when_long():
    table = history_table(long_history(60), noise=None)
    ids = [int(row.split("|")[1]) for row in table.splitlines()[2:] if row.startswith("| ")]
    assert ids == [0, 7, 14, 21, 28] + list(range(30, 60))
    assert "(25 older experiments not shown.)" in table


def test_history_table_labels_against_noise():
    history = [
        HistoryEntry(0, "keep", 1.0, None, "baseline"),
        HistoryEntry(1, "keep", 0.99, -0.01, "big win", verdict="win"),
        HistoryEntry(2, "discard", 0.9905, 0.0005, "noise | pipe", verdict="within-noise"),
        HistoryEntry(3, "discard", 1.01, 0.02, "loss", verdict="loss"),
        HistoryEntry(4, "crash", None, None, "oom"),
        HistoryEntry(5, "invalid", None, None, "bad edit"),
    ]
    rows = history_table(history, noise=0.001).splitlines()[2:]
    verdicts = [row.split("|")[5].strip() for row in rows]
    assert verdicts == ["baseline", "win", "within-noise", "loss", "crash", "invalid"]
    assert "(-10.0σ)" in rows[1] and "noise \\| pipe" in rows[2]


def test_the_prompts_labels_are_the_keep_rules_verdicts():
    """The label is what noise.judge decided, never a rule of the prompt's own: a change the
    rule discarded is not called a win however large its single-run Δ looks, and one judged
    without a label (no sigma yet, or an older record) is labelled by the decision."""
    gains = [0.004]  # one paired run, 4 σ better
    verdict = judge(gains, sigma=0.001, min_delta=0.0, max_repeats=1)
    assert verdict.decision == "keep" and verdict.label == "win"
    shy = judge([0.0015], sigma=0.001, min_delta=0.0, max_repeats=1)
    assert shy.decision == "discard" and shy.label == "within-noise"
    history = [
        HistoryEntry(0, "keep", 1.0, None, "baseline"),
        HistoryEntry(1, "keep", 0.996, -0.004, "kept", verdict=verdict.label),
        HistoryEntry(2, "discard", 0.9945, -0.0015, "1.5σ lower", verdict=shy.label),
        HistoryEntry(3, "discard", 0.99, -0.006, "6σ lower, judged without σ"),
        HistoryEntry(4, "keep", 0.99, -0.006, "kept without σ"),
    ]
    rows = history_table(history, noise=0.001).splitlines()[2:]
    verdicts = [row.split("|")[5].strip() for row in rows]
    assert verdicts == ["baseline", "win", "within-noise", "not-better", "win"]
    for h, label in zip(history[1:], verdicts[1:], strict=True):
        assert label == prompt_label(h.status, h.verdict)


# ------------------------------------------------------------------------ TunerAgent


def fake_val_bpb(source: str) -> float:
    """A smooth bowl over the knobs: the tuner's moves change it, nothing random."""
    knobs = find_knobs(source)
    score = 1.0
    for name, knob in knobs.items():
        v = knob.value
        if isinstance(v, bool):
            score += 0.001 * v
        elif isinstance(v, str):
            score += 0.002 * abs(v.count("L") / len(v) - 0.5)
        elif v > 0:
            score += 0.003 * abs(math.log2(v) - (1 if name == "MATRIX_LR" else 0)) / 10
    return score


def simulate(train_py: str, steps: int) -> tuple[list[HistoryEntry], list[str]]:
    """Run `steps` tuner proposals through a fake keep/discard loop."""
    tuner, best_src = TunerAgent(), train_py
    best = fake_val_bpb(train_py)
    history = [HistoryEntry(0, "keep", best, None, "baseline", train_py)]
    descriptions = []
    for i in range(1, steps + 1):
        ctx = make_ctx(history, train_py=best_src, best_bpb=best)
        proposal = tuner.propose(ctx)
        compile(proposal.source, "train.py", "exec")
        score = fake_val_bpb(proposal.source)
        status = "keep" if score < best else "discard"
        history.append(
            HistoryEntry(i, status, score, score - best, proposal.description, proposal.source)
        )
        descriptions.append(proposal.description)
        if status == "keep":
            best, best_src = score, proposal.source
    return history, descriptions


def tuner_source() -> str:
    """The real template train.py when the checkout has it, else the stand-in."""
    return TEMPLATE.read_text(encoding="utf-8") if TEMPLATE.exists() else TRAIN_PY


def test_tuner_never_repeats_a_configuration_in_50_proposals():
    source = tuner_source()
    history, _ = simulate(source, 50)
    configs = [
        tuple(sorted((n, repr(k.value)) for n, k in find_knobs(h.source).items())) for h in history
    ]
    assert len(set(configs)) == len(configs) == 51
    assert len({h.source for h in history}) == 51


def test_tuner_changes_one_literal_and_keeps_comments():
    proposal = TunerAgent().propose(make_ctx())
    before, after = TRAIN_PY.splitlines(), proposal.source.splitlines()
    changed = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert len(changed) == 1
    old, new = changed[0]
    assert old.split("#")[1] == new.split("#")[1]  # the comment is untouched
    name, rest = proposal.description.split(" ", 1)
    assert old.startswith(name.split("[")[0] + " = ") and " -> " in rest
    assert proposal.agent == "tuner" and proposal.tokens_in == 0


def test_tuner_continues_in_the_same_direction_after_a_keep():
    step1 = TRAIN_PY.replace("MATRIX_LR = 0.04", "MATRIX_LR = 0.08")
    history = [
        HistoryEntry(0, "keep", 1.0, None, "baseline", TRAIN_PY),
        HistoryEntry(1, "keep", 0.99, -0.01, "MATRIX_LR 0.04 -> 0.08", step1),
    ]
    proposal = TunerAgent().propose(make_ctx(history, train_py=step1))
    assert proposal.description == "MATRIX_LR 0.08 -> 0.16"


def test_tuner_tries_the_other_direction_after_a_discard():
    up = TRAIN_PY.replace("MATRIX_LR = 0.04", "MATRIX_LR = 0.08")
    history = [
        HistoryEntry(0, "keep", 1.0, None, "baseline", TRAIN_PY),
        HistoryEntry(1, "discard", 1.01, 0.01, "MATRIX_LR 0.04 -> 0.08", up),
    ]
    proposal = TunerAgent().propose(make_ctx(history))
    assert proposal.description == "MATRIX_LR 0.04 -> 0.02"


def test_tuner_moves_on_after_both_directions_lost():
    up = TRAIN_PY.replace("MATRIX_LR = 0.04", "MATRIX_LR = 0.08")
    down = TRAIN_PY.replace("MATRIX_LR = 0.04", "MATRIX_LR = 0.02")
    history = [
        HistoryEntry(0, "keep", 1.0, None, "baseline", TRAIN_PY),
        HistoryEntry(1, "discard", 1.01, 0.01, "up", up),
        HistoryEntry(2, "discard", 1.01, 0.01, "down", down),
    ]
    proposal = TunerAgent().propose(make_ctx(history))
    assert not proposal.description.startswith("MATRIX_LR")


def test_tuner_is_deterministic():
    _, first = simulate(TRAIN_PY, 12)
    _, second = simulate(TRAIN_PY, 12)
    assert first == second


def test_tuner_finds_patterns_tuples_booleans_and_powers_of_two():
    knobs = find_knobs(TRAIN_PY)
    assert knobs["WINDOW_PATTERN"].value == "SSSL"
    assert knobs["TOTAL_BATCH_SIZE"].value == 2**19 and knobs["TOTAL_BATCH_SIZE"].pow2
    assert knobs["ADAM_BETAS[1]"].value == 0.95
    assert knobs["USE_QK_NORM"].value is True
    assert "SEED" not in knobs and "MAX_SEQ_LEN" not in knobs


@pytest.mark.parametrize(
    ("name", "up", "down"),
    [
        ("MATRIX_LR", [0.08, 0.06], [0.02, 0.02667]),
        ("DEPTH", [16], [4]),
        ("TOTAL_BATCH_SIZE", [2**20], [2**18]),
        ("WINDOW_PATTERN", ["SSLL", "SL", "L"], ["SSSSSSSL"]),
        ("ADAM_BETAS[1]", [0.975, 0.96667], [0.9, 0.925]),
        ("WARMUP_RATIO", [0.1, 0.05], []),
        ("WARMDOWN_RATIO", [1.0, 0.75], [0.25, 0.3333, 0.0]),
        ("USE_QK_NORM", [False], [False]),
    ],
)
def test_tuner_steps(name, up, down):
    knob = find_knobs(TRAIN_PY)[name]
    assert knob_steps(knob, +1) == up
    assert knob_steps(knob, -1) == down


def test_tuner_rewrites_powers_of_two_and_strings_in_their_own_form():
    only = {"TOTAL_BATCH_SIZE", "WINDOW_PATTERN"}
    source = "\n".join(
        line for line in TRAIN_PY.splitlines() if line.split(" = ")[0] in only or "=" not in line
    )
    seen = set()
    history = [HistoryEntry(0, "keep", 1.0, None, "baseline", source)]
    for i in range(1, 4):
        proposal = TunerAgent().propose(make_ctx(history, train_py=source))
        seen.add(proposal.description)
        history.append(HistoryEntry(i, "discard", 1.1, 0.1, proposal.description, proposal.source))
    assert {"TOTAL_BATCH_SIZE 2**19 -> 2**20", 'WINDOW_PATTERN "SSSL" -> "SSLL"'} <= seen


def test_tuner_fix_halves_the_batch_after_out_of_memory():
    failed = TRAIN_PY.replace("DEPTH = 8", "DEPTH = 16")
    history = [
        HistoryEntry(0, "keep", 1.0, None, "baseline", TRAIN_PY),
        HistoryEntry(1, "crash", None, None, "DEPTH 8 -> 16", failed),
    ]
    proposal = TunerAgent().fix(
        make_ctx(history), failed, "torch.OutOfMemoryError: CUDA out of memory"
    )
    assert proposal.description.startswith("DEVICE_BATCH_SIZE 128 -> 64")
    assert "DEPTH = 16" in proposal.source


def test_tuner_fix_moves_halfway_back_or_gives_up():
    failed = TRAIN_PY.replace("MATRIX_LR = 0.04", "MATRIX_LR = 0.16")
    history = [
        HistoryEntry(0, "keep", 1.0, None, "baseline", TRAIN_PY),
        HistoryEntry(1, "crash", None, None, "MATRIX_LR 0.04 -> 0.16", failed),
    ]
    proposal = TunerAgent().fix(make_ctx(history), failed, "loss is nan")
    assert proposal.description.startswith("MATRIX_LR 0.16 -> 0.08")
    flipped = TRAIN_PY.replace("USE_QK_NORM = True", "USE_QK_NORM = False")
    with pytest.raises(InvalidProposal):
        TunerAgent().fix(make_ctx(), flipped, "RuntimeError: shapes do not match")


def test_tuner_without_constants_is_exhausted():
    with pytest.raises(AgentExhausted):
        TunerAgent().propose(make_ctx(train_py="print('no constants')\n"))


# ------------------------------------------------------------------------ ReplayAgent


def test_replay_applies_files_in_name_order_then_is_exhausted(tmp_path):
    (tmp_path / "002.txt").write_text(
        GOOD_REPLY.replace("0.06", "0.07").replace("to 0.07", "second")
    )
    (tmp_path / "001.txt").write_text(GOOD_REPLY)
    (tmp_path / ".hidden").write_text("ignored")
    agent = ReplayAgent(tmp_path)
    first = agent.propose(make_ctx())
    assert first.description == "Raise MATRIX_LR to 0.06" and "MATRIX_LR = 0.06" in first.source
    assert agent.propose(make_ctx()).description == "Raise MATRIX_LR second"
    with pytest.raises(AgentExhausted):
        agent.propose(make_ctx())


def test_replay_fix_consumes_the_next_file_against_the_failed_source(tmp_path):
    (tmp_path / "1.md").write_text(
        "smaller batch\n<<<<<<< SEARCH\nDEPTH = 16  # transformer layers\n=======\n"
        "DEPTH = 12  # transformer layers\n>>>>>>> REPLACE\n"
    )
    failed = TRAIN_PY.replace("DEPTH = 8", "DEPTH = 16")
    proposal = ReplayAgent(tmp_path).fix(make_ctx(), failed, "oom")
    assert "DEPTH = 12" in proposal.source


def test_replay_invalid_file_is_an_invalid_proposal_without_retry(tmp_path):
    (tmp_path / "1.txt").write_text(BAD_REPLY)
    (tmp_path / "2.txt").write_text(GOOD_REPLY)
    agent = ReplayAgent(tmp_path)
    with pytest.raises(InvalidProposal) as exc:
        agent.propose(make_ctx())
    assert exc.value.attempts == 1 and exc.value.reply == BAD_REPLY
    assert "1.txt" in str(exc.value)
    assert agent.propose(make_ctx()).description == "Raise MATRIX_LR to 0.06"


@pytest.mark.parametrize(
    ("preset", "used", "unused"),
    [
        ("gpu", {"DEPTH", "DEVICE_BATCH_SIZE"}, {"CPU_DEPTH", "CPU_DEVICE_BATCH_SIZE"}),
        ("cpu", {"CPU_DEPTH", "CPU_DEVICE_BATCH_SIZE"}, {"DEPTH", "DEVICE_BATCH_SIZE"}),
    ],
)
def test_tuner_leaves_out_constants_the_preset_does_not_use(preset, used, unused):
    source = tuner_source()
    if "CPU_DEPTH" not in source:
        pytest.skip("the template train.py has no cpu-preset constants")
    assert used | unused <= set(find_knobs(source))  # without a preset, all of them
    knobs = find_knobs(source, preset)
    assert used <= set(knobs) and not unused & set(knobs)
    assert {"MATRIX_LR", "WINDOW_PATTERN"} <= set(knobs)  # shared by both presets
    history = [HistoryEntry(0, "keep", 1.0, None, "baseline", source)]
    for i in range(1, 25):
        proposal = TunerAgent().propose(make_ctx(history, train_py=source, preset=preset))
        changed = proposal.description.split(" ")[0].split("[")[0]
        assert changed not in unused, proposal.description
        history.append(HistoryEntry(i, "discard", 1.1, 0.1, proposal.description, proposal.source))


def test_preset_blocks_are_read_in_either_operand_order():
    source = (
        "DEPTH = 8\nSMALL_DEPTH = 2\nLR = 0.1\n"
        'if "small" == PRESET:\n    DEPTH = SMALL_DEPTH\n'
        "if PRESET != 'big':\n    LR = 0.2\n"  # not an equality test: ignored
    )
    assert set(find_knobs(source, "small")) == {"SMALL_DEPTH", "LR"}
    assert set(find_knobs(source, "big")) == {"DEPTH", "LR"}
    assert set(find_knobs(source)) == {"DEPTH", "SMALL_DEPTH", "LR"}


def test_check_of_an_endpoint_that_is_not_the_api_names_the_base_url():
    with FakeLLM(list_models=False) as server:
        server.enqueue_raw(200, b"<html>a login page</html>")
        with pytest.raises(EndpointError, match="not the OpenAI API.*check --base-url"):
            openai_agent(server, max_retries=0).check()
