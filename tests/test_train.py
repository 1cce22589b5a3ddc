"""train.py: the model's contract (shape, causality, windows), the optimizer, the schedule, the
checkpoint, and one real end-to-end CPU run (marked slow) that must learn within its budget.

All on the CPU with no network; the slow test prepares the offline `stdlib` corpus into its
own cache and runs `python train.py` as the harness would.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from prepare_helpers import ROOT

_saved_preset = os.environ.get("AUTORESEARCH_PRESET")
os.environ["AUTORESEARCH_PRESET"] = "cpu"  # read once, when prepare is first imported
try:
    import train
finally:
    if _saved_preset is None:
        del os.environ["AUTORESEARCH_PRESET"]
    else:
        os.environ["AUTORESEARCH_PRESET"] = _saved_preset

pytestmark = pytest.mark.skipif(
    train.PRESET != "cpu", reason="prepare was imported earlier under another preset"
)

SUMMARY_KEYS = [
    "val_bpb",
    "training_seconds",
    "total_seconds",
    "peak_vram_mb",
    "mfu_percent",
    "total_tokens_M",
    "num_steps",
    "num_params_M",
    "depth",
]
STEP_LINE = re.compile(
    r"^step (\d{5}) \((\d+\.\d)%\) \| loss (\d+\.\d{6}) \| dt (\d+)ms \| tok/sec ([\d,]+) "
    r"\| mfu (\d+\.\d)% \| remaining (\d+)s$"
)


@pytest.fixture
def model() -> train.GPT:
    """The cpu-preset model with every weight perturbed, so that all paths carry signal (at
    init the zeroed output projections make each block the identity)."""
    torch.manual_seed(0)
    model = train.build_model("cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def tokens(batch: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, train.VOCAB_SIZE, (batch, seq_len), generator=g)


def test_forward_returns_logits_for_every_position(model: train.GPT) -> None:
    x = tokens(2, 48)
    logits = model(x)
    assert logits.shape == (2, 48, train.VOCAB_SIZE)
    assert logits.dtype == torch.float32
    assert logits.abs().max() <= train.LOGIT_SOFTCAP
    loss = model(x, tokens(2, 48, seed=1))
    assert loss.ndim == 0 and math.isfinite(loss.item())


def test_logits_at_t_ignore_tokens_after_t(model: train.GPT) -> None:
    seq_len = train.MAX_SEQ_LEN  # full length, so the S layers' windows really slide
    x = tokens(2, seq_len)
    t = seq_len // 2 + 7
    changed = x.clone()
    changed[:, t + 1 :] = tokens(2, seq_len - t - 1, seed=3)
    with torch.no_grad():
        before, after = model(x), model(changed)
    torch.testing.assert_close(before[:, : t + 1], after[:, : t + 1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before[:, t + 1 :], after[:, t + 1 :])


def test_sliding_window_sees_only_the_last_window_keys() -> None:
    seq_len, window = 64, 16
    (mask,) = train.attention_masks([window], seq_len, torch.device("cpu"))
    q, k, v = (
        torch.randn(1, 2, seq_len, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)
    )
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 0], v2[:, :, 0] = 5.0, -5.0  # change only the first key/value
    out, out2 = train.attend(q, k, v, mask), train.attend(q, k2, v2, mask)
    assert not torch.allclose(out[:, :, :window], out2[:, :, :window])
    torch.testing.assert_close(out[:, :, window:], out2[:, :, window:])
    assert train.attention_masks([seq_len], seq_len, torch.device("cpu")) == [None]


def test_one_optimizer_step_lowers_the_loss_on_its_batch(model: train.GPT) -> None:
    optimizers = train.build_optimizers(model, fused=False)
    x, y = tokens(4, 64, seed=5), tokens(4, 64, seed=6)
    loss_before = model(x, y)
    loss_before.backward()
    train.set_learning_rates(optimizers, progress=0.0, step=0)
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        loss_after = model(x, y)
    assert loss_after.item() < loss_before.item() - 0.01
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("cap", [15.0, 40.0, 60.0])  # 60: past the fixed-shift limit
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softcap_cross_entropy_matches_cross_entropy_on_capped_logits(
    cap: float, dtype: torch.dtype
) -> None:
    """The hand-written loss and backward against autograd through F.cross_entropy, with
    logits spread past the cap and ignored (-1) targets mixed in."""
    g = torch.Generator().manual_seed(0)
    logits = (25 * torch.randn(48, 300, generator=g)).to(dtype).requires_grad_()
    targets = torch.randint(0, 300, (48,), generator=g)
    targets[::5] = -1
    loss = train.SoftcapCrossEntropy.apply(logits, targets, cap)
    (ours,) = torch.autograd.grad(loss, logits)
    capped = cap * torch.tanh(logits.float() / cap)
    expected = F.cross_entropy(capped, targets, ignore_index=-1)
    (theirs,) = torch.autograd.grad(expected, logits)
    assert ours.dtype == dtype
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    rtol = 1e-4 if dtype == torch.float32 else 2**-7  # bf16: one rounding step apart at most
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=rtol, atol=1e-9)
    assert (ours[::5] == 0).all() and ours[1::5].abs().sum() > 0


def test_softcap_cross_entropy_ignores_a_batch_of_nothing_but_ignored_targets() -> None:
    logits = torch.randn(4, 10, requires_grad=True)
    loss = train.SoftcapCrossEntropy.apply(logits, torch.full((4,), -1), 15.0)
    loss.backward()
    assert loss.item() == 0.0 and (logits.grad == 0).all()


def test_model_loss_is_the_mean_cross_entropy_of_its_logits(model: train.GPT) -> None:
    x, y = tokens(2, 32, seed=3), tokens(2, 32, seed=4)
    with torch.no_grad():
        logits, loss = model(x), model(x, y)
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), y.flatten()))


def test_compiled_model_takes_the_fused_loss_with_the_eager_gradients(model: train.GPT) -> None:
    """Under torch.compile the model's loss is SoftcapCrossEntropy (in the graph as one
    autograd function), eagerly F.cross_entropy; loss and gradients agree. Dynamo alone traces
    here (no inductor), which is what picks the branch."""
    graphs = []

    def capture(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        return gm.forward

    x, y = tokens(2, 32, seed=7), tokens(2, 32, seed=8)
    eager_loss = model(x, y)
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    compiled_loss = torch.compile(model, backend=capture, dynamic=False)(x, y)
    compiled_grads = torch.autograd.grad(compiled_loss, list(model.parameters()))
    targets = [node.target for gm in graphs for node in gm.graph.nodes]
    assert torch.ops.higher_order.autograd_function_apply in targets
    assert F.cross_entropy not in targets
    torch.testing.assert_close(compiled_loss, eager_loss)
    for ours, theirs in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


def test_every_parameter_has_exactly_one_optimizer(model: train.GPT) -> None:
    optimizers = train.build_optimizers(model, fused=False)
    owned = [id(p) for opt in optimizers for g in opt.param_groups for p in g["params"]]
    assert sorted(owned) == sorted(id(p) for p in model.parameters())
    muon = next(opt for opt in optimizers if isinstance(opt, train.Muon))
    assert all(p.ndim == 2 for g in muon.param_groups for p in g["params"])


@pytest.mark.parametrize("shape", [(3, 32, 96), (2, 96, 32), (1, 40, 40)])
def test_orthogonalize_pushes_singular_values_near_one(shape: tuple[int, int, int]) -> None:
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(train.orthogonalize(g))
    assert s.min() > 0.5 and s.max() < 1.5


def _muon_reference(params, grads, buf, lr, momentum, weight_decay):
    """Muon's step written out per matrix, as the update is defined."""
    a, b, c = 3.4445, -4.7750, 2.0315
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        buf[i] = momentum * buf[i] + (1 - momentum) * g
        x = (1 - momentum) * g + momentum * buf[i]
        tall = x.size(0) > x.size(1)
        x = x.T if tall else x
        x = x / (x.norm() + 1e-7)
        for _ in range(5):
            gram = x @ x.T
            x = a * x + (b * gram + c * gram @ gram) @ x
        x = x.T if tall else x
        scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
        p.copy_(p * (1 - lr * weight_decay) - lr * scale * x)


@pytest.mark.parametrize("shape", [(3, 32, 96), (2, 96, 32), (4, 40, 40)])
def test_muon_update_matches_the_update_written_out(shape: tuple[int, int, int]) -> None:
    """The batched step (stacked momentum, fused polynomial, one foreach kernel per group)
    moves every matrix as the per-matrix definition does, over several steps."""
    gen = torch.Generator().manual_seed(1)
    ours = [torch.randn(*shape[1:], generator=gen) for _ in range(shape[0])]
    ref = [p.clone() for p in ours]
    ours_buf, ref_buf = torch.zeros(shape), torch.zeros(shape)
    lr, momentum, weight_decay = 0.04, 0.9, 0.1
    for _ in range(3):
        grads = [torch.randn(*shape[1:], generator=gen) for _ in range(shape[0])]
        train.muon_update(
            ours,
            grads,
            ours_buf,
            torch.tensor(lr),
            torch.tensor(momentum),
            torch.tensor(weight_decay),
        )
        _muon_reference(ref, grads, ref_buf, lr, momentum, weight_decay)
    torch.testing.assert_close(ours_buf, ref_buf)
    for p, q in zip(ours, ref, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_learning_rate_schedule_follows_training_time() -> None:
    values = [train.lr_multiplier(p / 100) for p in range(101)]
    peak_at = max(train.WARMUP_RATIO, 1e-9)
    assert train.lr_multiplier(peak_at) == pytest.approx(1.0)
    assert values[-1] == pytest.approx(train.FINAL_LR_FRAC)
    after_peak = values[math.ceil(100 * peak_at) :]
    assert all(a >= b for a, b in zip(after_peak[:-1], after_peak[1:], strict=True))


def test_diverged_loss_exits_with_status_3(capsys: pytest.CaptureFixture[str]) -> None:
    train.fail_if_diverged(5.0, step=3)  # a healthy loss passes
    for bad in (float("nan"), float("inf"), 1e4):
        with pytest.raises(SystemExit) as exc:
            train.fail_if_diverged(bad, step=3)
        assert exc.value.code == 3
    assert "FAIL: training loss" in capsys.readouterr().out


def test_checkpoint_rebuilds_the_same_model(model: train.GPT, tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    train.save_checkpoint(model, str(path))
    rebuilt = train.load_model(str(path), "cpu")
    x = tokens(1, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))


def test_flops_per_token_counts_matmuls_and_attention(model: train.GPT) -> None:
    cfg = model.config
    n_matmul = model.matmul_params()
    assert n_matmul < sum(p.numel() for p in model.parameters())
    attention = sum(12 * cfg.n_embd * w for w in model.windows)
    assert model.flops_per_token(cfg.sequence_len) == 6 * n_matmul + attention


COMPILED_LOSS = """
import sys
sys.path.insert(0, sys.argv[1])
import torch, train
from torch._dynamo.utils import counters
train.configure_compiler()
logits = torch.linspace(-30, 30, 8 * 50).reshape(8, 50).requires_grad_()
targets = torch.arange(8) * 5
loss = torch.compile(lambda z, t: train.SoftcapCrossEntropy.apply(z, t, 15.0))(logits, targets)
loss.backward()
print(sorted(k for k in counters["aot_autograd"] if k.startswith("autograd_cache")))
print(float(logits.grad.abs().sum()))
"""


@pytest.mark.slow
def test_compiled_fused_loss_is_cached_and_an_edit_to_its_backward_is_not_served_stale(
    tmp_path: Path,
) -> None:
    """configure_compiler() lets the compile cache keep the graph with SoftcapCrossEntropy (a
    warm start then skips the joint trace), and the cache key covers the hand-written backward:
    a copy of train.py whose backward doubles the gradient misses the cache and gets its own."""
    edited = tmp_path / "edited"
    edited.mkdir()
    source = (ROOT / "train.py").read_text()
    old = "return ((probs - onehot) * (1 - t * t) * scale).to(logits.dtype), None, None"
    assert old in source
    (edited / "train.py").write_text(source.replace(old, old.replace("* scale)", "* 2 * scale)")))
    (edited / "prepare.py").write_bytes((ROOT / "prepare.py").read_bytes())
    env = _env(tmp_path / "data", TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))

    def run(directory: Path) -> tuple[str, float]:
        done = subprocess.run(
            [sys.executable, "-c", COMPILED_LOSS, str(directory)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        counters, grad = done.stdout.strip().splitlines()[-2:]
        return counters, float(grad)

    first, grad = run(ROOT)
    assert first == "['autograd_cache_miss', 'autograd_cache_saved']"
    again, grad_again = run(ROOT)
    assert again == "['autograd_cache_hit']" and grad_again == grad
    other, grad_other = run(edited)
    assert other == "['autograd_cache_miss', 'autograd_cache_saved']"
    assert grad_other == pytest.approx(2 * grad)


# ---------------------------------------------------------------------------------------------
# End to end: real data, a real subprocess, the real output contract
# ---------------------------------------------------------------------------------------------


def _env(cache: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
    env.update(AUTORESEARCH_CACHE=str(cache), AUTORESEARCH_PRESET="cpu", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


UNIFORM_BPB = """
import torch, prepare
class Uniform(torch.nn.Module):
    def forward(self, x):
        return torch.zeros(*x.shape, prepare.VOCAB_SIZE)
print(prepare.evaluate_bpb(Uniform(), 16, "cpu"))
"""


@pytest.fixture(scope="session")
def stdlib_cache(stdlib_prepared: Path) -> tuple[Path, float]:
    """The offline stdlib corpus (prepared once per test session), and the bits per byte of the
    uniform model on the same scored validation tokens (log2(V) * tokens / bytes)."""
    cache = stdlib_prepared
    uniform = subprocess.run(
        [sys.executable, "-c", UNIFORM_BPB],
        cwd=ROOT,
        env=_env(cache),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert uniform.returncode == 0, uniform.stderr
    return cache, float(uniform.stdout.split()[-1])


@pytest.mark.slow
def test_cpu_run_learns_within_budget_and_prints_the_contract(
    stdlib_cache: tuple[Path, float], tmp_path: Path
) -> None:
    cache, uniform_bpb = stdlib_cache
    checkpoint = tmp_path / "final.pt"
    run = subprocess.run(
        [sys.executable, "train.py"],
        cwd=ROOT,
        env=_env(cache, AUTORESEARCH_DEVICE="cpu", AUTORESEARCH_CHECKPOINT=str(checkpoint)),
        capture_output=True,
        text=True,
        timeout=600,  # a hang guard, not a speed check: a busy machine may be slow
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    lines = run.stdout.splitlines()
    steps = [STEP_LINE.match(line) for line in lines if line.startswith("step ")]
    assert len(steps) >= 5 and all(steps), [line for line in lines if line.startswith("step ")]
    numbers = [int(m.group(1)) for m in steps]
    assert numbers == sorted(numbers) and numbers[0] == 0
    assert float(steps[-1].group(2)) == 100.0 and steps[-1].group(7) == "0"

    summary_at = lines.index("---")
    summary = dict(line.split(":", 1) for line in lines[summary_at + 1 :])
    assert list(summary) == SUMMARY_KEYS
    values = {key: float(value) for key, value in summary.items()}
    assert math.isfinite(values["val_bpb"])
    assert values["val_bpb"] < 0.8 * uniform_bpb, (values["val_bpb"], uniform_bpb)
    assert values["training_seconds"] >= train.TIME_BUDGET
    assert values["total_seconds"] >= values["training_seconds"]
    assert values["num_steps"] == numbers[-1] + 1
    assert values["peak_vram_mb"] == 0.0 and values["depth"] == train.DEPTH

    rebuilt = train.load_model(str(checkpoint), "cpu")
    assert sum(p.numel() for p in rebuilt.parameters()) / 1e6 == pytest.approx(
        values["num_params_M"], abs=0.05
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "budget",
    [
        "30",  # caught one step late, while step 2 is queued: the run stops there
        "0.01",  # step 1 is the last: caught after the loop, before any summary
    ],
)
def test_a_run_whose_loss_turns_nan_exits_3_without_a_summary(
    stdlib_cache: tuple[Path, float], tmp_path: Path, budget: str
) -> None:
    """The loss is read one step late (train.py never waits for the step it just queued), so
    a nan is caught at the next step or, on the last step, after the loop."""
    cache, _ = stdlib_cache
    source = (ROOT / "train.py").read_text()
    assert "\nMATRIX_LR = " in source
    # a nan learning rate: step 0's loss is finite, every weight Muon touches is nan after it
    (tmp_path / "train.py").write_text(
        source.replace("\nMATRIX_LR = ", '\nMATRIX_LR = float("nan")  # ', 1)
    )
    (tmp_path / "prepare.py").write_text((ROOT / "prepare.py").read_text())
    run = subprocess.run(
        [sys.executable, "train.py"],
        cwd=tmp_path,
        env=_env(cache, AUTORESEARCH_DEVICE="cpu", AUTORESEARCH_TIME_BUDGET=budget),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 3, run.stdout[-3000:] + run.stderr[-3000:]
    assert "FAIL: training loss nan at step 1 " in run.stdout
    assert "---" not in run.stdout.splitlines()
