"""
The model, the optimizer and the training loop: the one file the agent edits.

What the harness relies on (docs/architecture.md), and so what every edit must keep:
- `import train` builds nothing; `build_model(device)` returns the default model, and
  `model(x)` maps int64 tokens (B, T) to float logits (B, T, VOCAB_SIZE).
- `python train.py` trains for TIME_BUDGET seconds of training time (compilation excluded),
  prints `step ...` lines while it trains, then a `---` line and the summary `key: value` lines.
  The harness holds it to the budget: from the first step line (printed after step 0, which
  compiles) to the exit, at most TIME_BUDGET plus a grace, and from launch to the first step
  line at most the start-up limit (120 s by default), else the run does not count.
- Exit code 3 means the loss diverged (nan or exploding) and the run stopped early.
- AUTORESEARCH_DEVICE=cpu|cuda picks the device (default: cuda when available).
- AUTORESEARCH_SEED=N seeds the model's initialisation and the order of the training data
  (default 42); the record of a session says which seed each run used.
- AUTORESEARCH_CHECKPOINT=PATH saves {"config": ..., "state_dict": ...} after training;
  `load_model(PATH, device)` rebuilds the model from it. In a session the harness's sealed
  evaluator measures val_bpb from that checkpoint, in a process of its own; nothing this file
  prints is taken as the result.
- AUTORESEARCH_SKIP_EVAL=1 (set by the harness with the checkpoint) skips the evaluation
  here and leaves val_bpb out of the summary.
The preset (model size class) comes from prepare.py; this file only sizes the model to it.
"""

# ruff: noqa: E402  (the clock starts before torch's import, so total_seconds includes it)
import time

T_START = time.time()

import gc
import math
import os
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from prepare import (
    EVAL_TOKENS,
    MAX_SEQ_LEN,
    PRESET,
    TIME_BUDGET,
    VOCAB_SIZE,
    evaluate_bpb,
    load_tokenizer,
    make_dataloader,
    print_config,
)

# ---------------------------------------------------------------------------
# Hyperparameters: the gpu preset (one H100-class card, 300 s of training)
# ---------------------------------------------------------------------------
DEPTH = 8  # transformer blocks
ASPECT_RATIO = 64  # width = DEPTH * ASPECT_RATIO, rounded up to a multiple of HEAD_DIM
HEAD_DIM = 128  # channels per attention head
WINDOW_PATTERN = "L"  # per layer, cycled: S = half of MAX_SEQ_LEN, L = all; last layer is L
TOTAL_BATCH_SIZE = 2**18  # tokens per optimizer step (gradient accumulation reaches it)
DEVICE_BATCH_SIZE = 128  # sequences per forward/backward pass
MATRIX_LR = 0.04  # Muon learning rate for the 2D matrices inside the blocks
EMBEDDING_LR = 0.6  # AdamW, token and value embeddings (tuned at width 768, see adam_lr_scale)
UNEMBEDDING_LR = 0.004  # AdamW, lm_head (same width scaling)
SCALAR_LR = 0.1  # AdamW, per-layer scalars (the x0 skip weights)
WEIGHT_DECAY = 0.1  # Muon decoupled weight decay, applied as lr * WEIGHT_DECAY per step
ADAM_BETAS = (0.8, 0.95)  # AdamW (beta1, beta2)
MUON_MOMENTUM = (0.85, 0.95, 300)  # Muon momentum: (start, end, steps to ramp from start to end)
WARMUP_RATIO = 0.0  # fraction of TIME_BUDGET over which learning rates ramp up from 0
WARMDOWN_RATIO = 0.5  # fraction of TIME_BUDGET at the end over which they ramp down
FINAL_LR_FRAC = 0.0  # learning rate at the end of warmdown, as a fraction of the peak
LOGIT_SOFTCAP = 15.0  # logits = LOGIT_SOFTCAP * tanh(logits / LOGIT_SOFTCAP)
UNTIMED_STEPS = 2  # first steps not counted as training time: step 0 compiles
# model init and data order: the harness sets AUTORESEARCH_SEED per run (a candidate trains
# with the seeds of the runs it is compared with); 42 when run by hand
SEED = int(os.environ.get("AUTORESEARCH_SEED", "42"))
LOG_INTERVAL = 1.0  # seconds between live step lines (keeps logs small)

# Model size and batch of the cpu preset (2 cores, 25 s: most of the cost is the 8192-way
# output layer); under PRESET == "cpu" these replace the five constants above of the same name
CPU_DEPTH = 3
CPU_ASPECT_RATIO = 40  # width 3 * 40 = 120, rounded up to 128: two heads of 64
CPU_HEAD_DIM = 64
CPU_TOTAL_BATCH_SIZE = 2**12  # tokens per optimizer step
CPU_DEVICE_BATCH_SIZE = 16  # sequences per forward/backward pass

if PRESET == "cpu":
    DEPTH, ASPECT_RATIO, HEAD_DIM = CPU_DEPTH, CPU_ASPECT_RATIO, CPU_HEAD_DIM
    TOTAL_BATCH_SIZE, DEVICE_BATCH_SIZE = CPU_TOTAL_BATCH_SIZE, CPU_DEVICE_BATCH_SIZE
    UNTIMED_STEPS = 1  # nothing to compile on the CPU path

# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


@dataclass
class GPTConfig:
    vocab_size: int
    sequence_len: int  # rotary tables and the S/L windows are sized from it
    n_layer: int
    n_embd: int
    head_dim: int
    window_pattern: str
    softcap: float
    ve_gate_channels: int = 32  # leading channels of x that compute the value-embedding gate


def norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm with no learnable scale."""
    return F.rms_norm(x, (x.size(-1),))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on (B, T, H, D): rotates the pairs (x[:D/2], x[D/2:]) by position."""
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def layer_windows(config: GPTConfig) -> list[int]:
    pattern = config.window_pattern.upper()
    assert pattern and set(pattern) <= {"S", "L"}, f"bad WINDOW_PATTERN {pattern!r}"
    size = {"S": config.sequence_len // 2, "L": config.sequence_len}
    windows = [size[pattern[i % len(pattern)]] for i in range(config.n_layer)]
    windows[-1] = config.sequence_len  # the last layer always sees the whole context
    return windows


def has_value_embedding(layer: int, n_layer: int) -> bool:
    """Every other layer, counting back from the last one (which always has one)."""
    return (n_layer - 1 - layer) % 2 == 0


_MASKS: dict[tuple, object] = {}  # (kind, window, T, device) -> mask; built once, reused
_COMPILED_FLEX = []  # flex_attention compiled once for eager callers (eager flex is slow)


@torch.compiler.disable
def attention_masks(windows: list[int], seq_len: int, device: torch.device) -> list:
    """One mask per layer: None for a full causal window, else a sliding-window causal mask
    (a FlexAttention BlockMask on CUDA, a boolean SDPA mask elsewhere). Runs outside any
    torch.compile graph so masks are built once, eagerly, and enter the graph as inputs."""
    masks = []
    for window in windows:
        if window >= seq_len:
            masks.append(None)
            continue
        kind = "flex" if device.type == "cuda" else "bool"
        key = (kind, window, seq_len, str(device))
        if key not in _MASKS:
            if kind == "flex":

                def sliding_causal(b, h, q, kv, window=window):
                    return (q >= kv) & (q - kv < window)

                _MASKS[key] = create_block_mask(
                    sliding_causal, None, None, seq_len, seq_len, device=device
                )
            else:
                pos = torch.arange(seq_len, device=device)
                dist = pos[:, None] - pos[None, :]
                _MASKS[key] = (dist >= 0) & (dist < window)
        masks.append(_MASKS[key])
    return masks


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """Causal attention on (B, H, T, D). Full windows use SDPA (cuDNN on CUDA, see main);
    sliding windows use FlexAttention on CUDA and a masked SDPA elsewhere."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if torch.compiler.is_compiling():
        return flex_attention(q, k, v, block_mask=mask)
    if not _COMPILED_FLEX:
        _COMPILED_FLEX.append(torch.compile(flex_attention, dynamic=False))
    return _COMPILED_FLEX[0](q, k, v, block_mask=mask)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        d, self.head_dim = config.n_embd, config.head_dim
        self.n_head = d // config.head_dim
        self.c_q = nn.Linear(d, d, bias=False)
        self.c_k = nn.Linear(d, d, bias=False)
        self.c_v = nn.Linear(d, d, bias=False)
        self.c_proj = nn.Linear(d, d, bias=False)
        self.gate_channels = config.ve_gate_channels
        self.ve_gate = None
        if has_value_embedding(layer, config.n_layer):
            # per-head gate in (0, 2) on how much of the value embedding enters V; starts at 1
            self.ve_gate = nn.Linear(self.gate_channels, self.n_head, bias=False)

    def forward(self, x, ve, cos, sin, mask):
        B, T, _ = x.shape
        shape = (B, T, self.n_head, self.head_dim)
        q, k, v = self.c_q(x).view(shape), self.c_k(x).view(shape), self.c_v(x).view(shape)
        if ve is not None:
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., : self.gate_channels]))
            v = v + gate.unsqueeze(-1) * ve.view(shape).to(v.dtype)  # keep V in bf16
        # QK-norm then rotary; cast back because autocast may run rms_norm in fp32
        q = rotate(norm(q), cos, sin).to(v.dtype)
        k = rotate(norm(k), cos, sin).to(v.dtype)
        y = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, mask):
        x = x + self.attn(norm(x), ve, cos, sin, mask)
        return x + self.mlp(norm(x))


class SoftcapCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of cap * tanh(logits / cap) over the targets that are not -1, from
    (N, V) logits in any float dtype. Same value and gradient as F.cross_entropy on the capped
    fp32 logits, but it keeps only the raw logits and one log-sum-exp per row for the backward,
    which recomputes the rest: compiled, the forward is one reduction over the logits and the
    backward one elementwise pass, with no (N, V) fp32 tensor written to memory. The capped
    logits lie in [-cap, cap], so for cap <= 40 the log-sum-exp can shift by cap instead of by
    the row's maximum (every exp(s - cap) >= e^-80 is a normal fp32 number): one pass over the
    row instead of two."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, cap: float) -> torch.Tensor:
        capped = cap * torch.tanh(logits.float() / cap)
        if cap <= 40:
            lse = cap + torch.log(torch.exp(capped - cap).sum(dim=-1))
        else:
            lse = torch.logsumexp(capped, dim=-1)
        valid = targets != -1
        hit = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1).float()
        count = valid.sum().clamp(min=1)
        loss = torch.where(valid, lse - cap * torch.tanh(hit / cap), 0.0).sum() / count
        ctx.save_for_backward(logits, targets, lse, count)
        ctx.cap = cap
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, targets, lse, count = ctx.saved_tensors
        t = torch.tanh(logits.float() / ctx.cap)
        probs = torch.exp(ctx.cap * t - lse.unsqueeze(-1))
        columns = torch.arange(logits.size(-1), device=logits.device)
        onehot = (columns == targets.unsqueeze(-1)).float()
        scale = torch.where(targets != -1, grad / count, 0.0).unsqueeze(-1)
        return ((probs - onehot) * (1 - t * t) * scale).to(logits.dtype), None, None


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.head_dim == 0 and config.head_dim % 2 == 0
        self.config = config
        self.windows = layer_windows(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.value_embeds = nn.ModuleDict(
            {
                str(i): nn.Embedding(config.vocab_size, config.n_embd)
                for i in range(config.n_layer)
                if has_value_embedding(i, config.n_layer)
            }
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # untied
        # learned weight of the embedding output x0 added back before each block
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        inv_freq = 10000.0 ** (-torch.arange(0, config.head_dim, 2).float() / config.head_dim)
        angles = torch.outer(torch.arange(config.sequence_len).float(), inv_freq)
        self.register_buffer("cos", angles.cos()[None, :, None, :], persistent=False)
        self.register_buffer("sin", angles.sin()[None, :, None, :], persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        d = self.config.n_embd
        bound = (3 / d) ** 0.5  # uniform with std 1/sqrt(d): unit-RMS outputs for unit-RMS inputs
        nn.init.normal_(self.wte.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for emb in self.value_embeds.values():
            nn.init.uniform_(emb.weight, -bound, bound)
        for block in self.blocks:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.zeros_(block.attn.c_proj.weight)  # each block starts as the identity
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.zeros_(block.attn.ve_gate.weight)
        self.x0_lambdas.fill_(0.1)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V) in fp32, or the mean cross-entropy when targets are given."""
        T = idx.size(1)
        assert T <= self.config.sequence_len, f"sequence of {T} > {self.config.sequence_len}"
        masks = attention_masks(self.windows, T, idx.device)
        cos, sin = self.cos[:, :T], self.sin[:, :T]
        x = x0 = norm(self.wte(idx))
        for i, block in enumerate(self.blocks):
            x = x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, masks[i])
        logits = self.lm_head(norm(x))
        cap = self.config.softcap
        if targets is not None and torch.compiler.is_compiling():
            # compiled, the fused loss never writes the fp32 logits; eager, it would only add
            # passes over them (30 % fewer steps on the cpu preset), so eager takes the plain path
            return SoftcapCrossEntropy.apply(logits.flatten(0, 1), targets.flatten(), cap)
        logits = cap * torch.tanh(logits.float() / cap)
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)

    def matmul_params(self) -> int:
        """Parameters used in matrix products: everything but embeddings and scalars."""
        embeds = self.wte.weight.numel() + sum(e.weight.numel() for e in self.value_embeds.values())
        return sum(p.numel() for p in self.parameters()) - embeds - self.x0_lambdas.numel()

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 per matmul parameter plus attention (PaLM's convention,
        12 * width * attended keys per layer, counting the whole window, masked half too)."""
        attention = sum(12 * self.config.n_embd * min(w, seq_len) for w in self.windows)
        return 6 * self.matmul_params() + attention


def model_config() -> GPTConfig:
    width = -(-DEPTH * ASPECT_RATIO // HEAD_DIM) * HEAD_DIM  # round up to whole heads
    return GPTConfig(
        vocab_size=VOCAB_SIZE,
        sequence_len=MAX_SEQ_LEN,
        n_layer=DEPTH,
        n_embd=width,
        head_dim=HEAD_DIM,
        window_pattern=WINDOW_PATTERN,
        softcap=LOGIT_SOFTCAP,
    )


def build_model(device: str | torch.device = "cpu") -> GPT:
    """The default model for the active preset, initialized, on `device`."""
    with torch.device(device):
        return GPT(model_config())


def save_checkpoint(model: GPT, path: str) -> None:
    """The weights plus the GPTConfig that rebuilds the model around them."""
    torch.save({"config": asdict(model.config), "state_dict": model.state_dict()}, path)


def load_model(path: str, device: str | torch.device = "cpu") -> GPT:
    """Rebuild a model saved by save_checkpoint (a run with AUTORESEARCH_CHECKPOINT set)."""
    checkpoint = torch.load(path, map_location=device, weights_only=True)
    with torch.device(device):
        model = GPT(GPTConfig(**checkpoint["config"]))
    model.load_state_dict(checkpoint["state_dict"])
    return model


# ---------------------------------------------------------------------------
# Optimizer: Muon for the hidden matrices, AdamW for the rest
# ---------------------------------------------------------------------------


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately replace a batch of matrices (N, m, n) by U V^T from their SVD, with a
    quintic Newton–Schulz iteration (coefficients pushed for speed, not exact convergence:
    singular values land near 1, roughly in [0.7, 1.2], which is all Muon needs)."""
    x = g.bfloat16() if g.is_cuda else g.float()
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the wide orientation: the Gram matrix is the smaller one
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= 1
    a, b, c = 3.4445, -4.7750, 2.0315
    for _ in range(steps):  # x <- a x + (b G + c G^2) x, G = x x^T: three batched matmuls
        gram = x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, poly, x, beta=a)
    return x.mT if tall else x


def muon_update(params, grads, buf, lr, momentum, weight_decay):
    """One Muon step for same-shaped matrices (lr, momentum, weight_decay: 0-D tensors)."""
    g = torch.stack(grads)
    buf.lerp_(g, 1 - momentum)  # buf <- momentum * buf + (1 - momentum) * g
    g.lerp_(buf, momentum)  # Nesterov: (1 - momentum) * g + momentum * buf
    update = orthogonalize(g)
    rows, cols = g.shape[-2:]
    scale = max(1.0, rows / cols) ** 0.5  # tall matrices: same per-entry update size
    # one kernel each for the whole group instead of two or three per matrix; with the lerps
    # and the fused polynomial: about 1 ms less per step on an H200 (fewer, larger launches)
    torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_sub_(params, (update.to(g.dtype) * (lr * scale)).unbind(0))


class Muon(torch.optim.Optimizer):
    """SGD with Nesterov momentum whose update is orthogonalized per matrix. Matrices of one
    shape share a group and are orthogonalized in one batched pass. It runs eagerly: compiled,
    each of the four matrix shapes was a graph of its own (~17 s of the first step's compile
    on an H200) for no measurable gain in step time."""

    def __init__(self, params, lr: float, weight_decay: float):
        params = list(params)
        shapes = sorted({tuple(p.shape) for p in params})
        groups = [{"params": [p for p in params if tuple(p.shape) == s]} for s in shapes]
        defaults = {"lr": lr, "momentum": MUON_MOMENTUM[1], "weight_decay": weight_decay}
        super().__init__(groups, defaults)
        # 0-D tensors on the params' device: setting them each step never waits for the GPU
        device = params[0].device
        self._scalars = {k: torch.zeros((), device=device) for k in defaults}

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            state = self.state[params[0]]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = params[0].new_zeros(len(params), *params[0].shape)
            for key, t in self._scalars.items():
                t.fill_(group[key])
            muon_update(
                params,
                [p.grad for p in params],
                state["momentum_buffer"],
                self._scalars["lr"],
                self._scalars["momentum"],
                self._scalars["weight_decay"],
            )


def build_optimizers(model: GPT, fused: bool) -> list[torch.optim.Optimizer]:
    adam_lr_scale = (model.config.n_embd / 768) ** -0.5  # the AdamW LRs were tuned at width 768
    adam_groups = [
        {"params": [model.wte.weight], "lr": EMBEDDING_LR * adam_lr_scale},
        {"params": list(model.value_embeds.parameters()), "lr": EMBEDDING_LR * adam_lr_scale},
        {"params": [model.lm_head.weight], "lr": UNEMBEDDING_LR * adam_lr_scale},
        {"params": [model.x0_lambdas], "lr": SCALAR_LR},
    ]
    adam = torch.optim.AdamW(
        adam_groups, betas=ADAM_BETAS, eps=1e-10, weight_decay=0.0, fused=fused
    )
    muon = Muon(model.blocks.parameters(), lr=MATRIX_LR, weight_decay=WEIGHT_DECAY)
    n_assigned = sum(len(g["params"]) for opt in (adam, muon) for g in opt.param_groups)
    assert n_assigned == len(list(model.parameters())), "a parameter has no optimizer"
    for opt in (adam, muon):
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return [adam, muon]


def lr_multiplier(progress: float) -> float:
    """progress = training seconds / TIME_BUDGET: warmup, constant, linear warmdown."""
    if progress < WARMUP_RATIO:
        return progress / WARMUP_RATIO
    if progress <= 1 - WARMDOWN_RATIO:
        return 1.0
    frac = (1 - progress) / WARMDOWN_RATIO
    return FINAL_LR_FRAC + (1 - FINAL_LR_FRAC) * max(frac, 0.0)


def muon_momentum(step: int) -> float:
    start, end, steps = MUON_MOMENTUM
    return start + (end - start) * min(step / steps, 1.0)


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------

PEAK_BF16_FLOPS = {  # dense bf16 tensor-core peak per card; first name contained in the card's wins
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989.5e12,
    "H200": 989.5e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
}


def peak_flops(device: torch.device) -> float:
    """The card's bf16 dense peak in FLOP/s, or 0 where unknown (mfu is then reported as 0)."""
    if device.type != "cuda":
        print("mfu: not measured on the cpu, reported as 0")
        return 0.0
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    print(f"mfu: no bf16 peak known for {name!r} (add it to PEAK_BF16_FLOPS); reported as 0")
    return 0.0


def pick_device() -> torch.device:
    name = os.environ.get("AUTORESEARCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        sys.exit(f"AUTORESEARCH_DEVICE must be 'cpu' or 'cuda', not {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("AUTORESEARCH_DEVICE=cuda but torch sees no CUDA device; unset it to use the cpu")
    return torch.device(name)


def set_learning_rates(optimizers: list[torch.optim.Optimizer], progress: float, step: int):
    multiplier = lr_multiplier(progress)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * multiplier
            if isinstance(opt, Muon):
                group["momentum"] = muon_momentum(step)


def fail_if_diverged(loss: float, step: int) -> None:
    """Fast fail: stop a run that cannot recover instead of spending its whole budget."""
    bound = 3 * math.log(VOCAB_SIZE)  # softcapped logits keep the loss under ~2*cap + ln V anyway
    if math.isfinite(loss) and loss <= bound:
        return
    print(
        f"FAIL: training loss {loss} at step {step} is nan or above {bound:.1f}: the run "
        "diverged. Lower the learning rates or undo the last change.",
        flush=True,
    )
    sys.exit(3)


def configure_compiler() -> None:
    """torch.compile settings for this process (main() on CUDA; bench/profile_step.py too)."""
    import torch._functorch.config  # here, not at the top: ~1 s the cpu path never needs
    import torch._inductor.config

    # inductor's generated elementwise kernels take their heuristic launch config instead of
    # timing several at step 0: about 4 s less compile on an H200, same step time
    torch._inductor.config.triton.autotune_pointwise = False
    # let the AOTAutograd cache keep graphs that hold SoftcapCrossEntropy, so a warm start skips
    # tracing the joint graph (bypassed, a warm step 0 took 11.2 s on an H200, against 4.0 s
    # with the plain loss). The cached graph holds the function's traced forward and backward,
    # so an edit to either changes the cache key
    torch._functorch.config.autograd_cache_allow_custom_autograd_functions = True


def main() -> None:
    print_config()
    device = pick_device()
    on_cuda = device.type == "cuda"
    torch.manual_seed(SEED)
    if on_cuda:
        torch.set_float32_matmul_precision("high")
        configure_compiler()
        # cuDNN attention first for full windows (fwd+bwd 0.76 ms vs 1.20 ms for flash on an
        # H200 at B16 H4 T2048 D128); entered for the rest of the process, compiled graphs included
        backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]
        sdpa_kernel(backends + [SDPBackend.EFFICIENT_ATTENTION], set_priority=True).__enter__()
    else:
        torch.set_num_threads(os.cpu_count() or 1)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda)

    tokenizer = load_tokenizer()
    assert tokenizer.vocab_size <= VOCAB_SIZE, "tokenizer outgrew VOCAB_SIZE; rerun prepare.py"
    raw_model = build_model(device)
    model = torch.compile(raw_model, dynamic=False) if on_cuda else raw_model
    optimizers = build_optimizers(raw_model, fused=on_cuda)
    tokens_per_pass = DEVICE_BATCH_SIZE * MAX_SEQ_LEN
    assert TOTAL_BATCH_SIZE % tokens_per_pass == 0, "TOTAL_BATCH_SIZE must be whole passes"
    grad_accum = TOTAL_BATCH_SIZE // tokens_per_pass
    num_params = sum(p.numel() for p in raw_model.parameters())
    flops_per_token = raw_model.flops_per_token(MAX_SEQ_LEN)
    peak = peak_flops(device)
    cfg = raw_model.config
    print(f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if on_cuda else ""))
    print(f"model: depth {cfg.n_layer}, width {cfg.n_embd}, heads {cfg.n_embd // cfg.head_dim}")
    print(f"params: {num_params / 1e6:.2f}M ({raw_model.matmul_params() / 1e6:.2f}M in matmuls)")
    print(f"windows: {raw_model.windows}")
    print(f"batch: {TOTAL_BATCH_SIZE:,} tokens/step, {grad_accum} passes of {tokens_per_pass:,}")
    print(f"eval_tokens: {EVAL_TOKENS:,}", flush=True)

    loader = make_dataloader(
        DEVICE_BATCH_SIZE, MAX_SEQ_LEN, split="train", seed=SEED, device=device
    )
    x, y, _ = next(loader)
    step, training_time, smooth_loss, losses_read, last_log = 0, 0.0, 0.0, 0, -math.inf
    pending = None  # the last step's loss, still on the device: read during the next step
    while True:
        t0 = time.perf_counter()
        for _ in range(grad_accum):
            with autocast:
                loss = model(x, y)
            (loss / grad_accum).backward()
            x, y, _ = next(loader)
        set_learning_rates(optimizers, training_time / TIME_BUDGET, step)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if step < UNTIMED_STEPS:  # wait for this step (step 0's dt is then the compile)
            read, read_step, pending = loss, step, None
        else:  # wait for the step before only: the card never idles while this one is queued,
            # and dt summed over the steps is still the card's time
            read, read_step, pending = pending, step - 1, loss.detach()
        if read is not None:
            loss_value = read.item()
            fail_if_diverged(loss_value, read_step)
            smooth_loss = 0.9 * smooth_loss + 0.1 * loss_value
            losses_read += 1
        dt = time.perf_counter() - t0
        if step >= UNTIMED_STEPS:
            training_time += dt
        if step == 0:  # freeze what exists now so the collector never pauses training
            gc.collect()
            gc.freeze()
            gc.disable()
        done = training_time >= TIME_BUDGET
        if done or step < UNTIMED_STEPS or time.perf_counter() - last_log >= LOG_INTERVAL:
            last_log = time.perf_counter()
            tok_per_sec = TOTAL_BATCH_SIZE / dt
            mfu = 100 * flops_per_token * tok_per_sec / peak if peak else 0.0
            print(
                f"step {step:05d} ({100 * min(training_time / TIME_BUDGET, 1):.1f}%) "
                f"| loss {smooth_loss / (1 - 0.9**losses_read):.6f} | dt {1000 * dt:.0f}ms "
                f"| tok/sec {tok_per_sec:,.0f} | mfu {mfu:.1f}% "
                f"| remaining {max(TIME_BUDGET - training_time, 0):.0f}s",
                flush=True,
            )
        step += 1
        if done:
            break
    if pending is not None:  # the last step's loss
        fail_if_diverged(pending.item(), step - 1)

    timed_tokens = (step - min(step, UNTIMED_STEPS)) * TOTAL_BATCH_SIZE
    mfu_percent = 100 * flops_per_token * timed_tokens / training_time / peak if peak else 0.0
    checkpoint = os.environ.get("AUTORESEARCH_CHECKPOINT")
    if checkpoint:
        save_checkpoint(raw_model, checkpoint)
    skip_eval = os.environ.get("AUTORESEARCH_SKIP_EVAL") == "1"  # the harness evaluates
    if not skip_eval:  # eagerly: recompiling for no-grad mode and the last batch costs more
        with autocast:
            val_bpb = evaluate_bpb(raw_model, DEVICE_BATCH_SIZE, device)
    peak_vram_mb = torch.cuda.max_memory_allocated(device) / 2**20 if on_cuda else 0.0
    print("---")
    if not skip_eval:
        print(f"val_bpb:          {val_bpb:.6f}")
    print(f"training_seconds: {training_time:.1f}")
    print(f"total_seconds:    {time.time() - T_START:.1f}")
    print(f"peak_vram_mb:     {peak_vram_mb:.1f}")
    print(f"mfu_percent:      {mfu_percent:.2f}")
    print(f"total_tokens_M:   {step * TOTAL_BATCH_SIZE / 1e6:.1f}")
    print(f"num_steps:        {step}")
    print(f"num_params_M:     {num_params / 1e6:.1f}")
    print(f"depth:            {cfg.n_layer}", flush=True)


if __name__ == "__main__":
    main()
