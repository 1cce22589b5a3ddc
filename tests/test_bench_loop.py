"""bench/loop.py's fake agent: its replies are edits that apply to the real template train.py,
also when they travel through the real prompt, client and HTTP."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from autoresearch.agent import Context, OpenAIAgent
from autoresearch.edits import apply_reply

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ROOT / "autoresearch" / "templates"

_spec = importlib.util.spec_from_file_location("bench_loop", ROOT / "bench" / "loop.py")
bench_loop = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_loop)


def test_successive_replies_apply_and_never_repeat_a_train_py() -> None:
    source = (TEMPLATES / "train.py").read_text()
    seen = {source}
    for n in range(16):
        _, new = apply_reply(source, bench_loop.edit_reply(source, n))
        changed = [a for a, b in zip(source.splitlines(), new.splitlines(), strict=True) if a != b]
        assert len(changed) == 1 and changed[0].startswith(bench_loop.KNOBS[n % 2] + " = ")
        assert new not in seen
        seen.add(new)
        source = new


def test_every_kth_reply_edits_a_constant_of_the_compiled_graph() -> None:
    source = (TEMPLATES / "train.py").read_text()
    knobs = []
    for n in range(7):
        _, new = apply_reply(source, bench_loop.edit_reply(source, n, graph_every=3))
        changed = [a for a, b in zip(source.splitlines(), new.splitlines(), strict=True) if a != b]
        assert len(changed) == 1
        knobs.append(changed[0].split(" = ")[0])
        source = new
    lr = bench_loop.KNOBS
    graph = bench_loop.GRAPH_KNOB
    assert knobs == [lr[0], lr[1], graph, lr[1], lr[0], graph, lr[0]]
    assert "LOGIT_SOFTCAP = 14.85  #" in source  # 15 x 1.1 x 0.9: the factors in turn


def test_the_fake_endpoint_edits_the_train_py_of_the_real_prompt() -> None:
    template = (TEMPLATES / "train.py").read_text()
    ctx = Context(program=(TEMPLATES / "program.md").read_text(), train_py=template)
    with bench_loop.fake_endpoint(delay=0.0) as server:
        agent = OpenAIAgent(model="fake", base_url=server.base_url, max_retries=0)
        first = agent.propose(ctx)
        second = agent.propose(ctx)
    assert first.attempts == 1 and second.attempts == 1
    assert first.source == apply_reply(template, bench_loop.edit_reply(template, 0))[1]
    assert "MATRIX_LR = 0.044  #" in first.source
    assert "UNEMBEDDING_LR = 0.0044  #" in second.source
