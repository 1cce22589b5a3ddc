"""Where one training step of train.py spends its GPU time.

    python bench/profile_step.py                  # this repository's train.py, gpu preset
    python bench/profile_step.py --train other.py --steps 3

Builds train.py's model and optimizers exactly as its main() does (same compile settings),
runs warm-up steps on random tokens (timing does not depend on the data), then profiles
`--steps` optimizer steps and prints: the compiler's phase timers for step 0, the wall time per
step, the CUDA kernel time per step grouped by kind (matmul, attention, cross-entropy, fused
elementwise, embedding, optimizer, copies), and the kernels that take the most time. Needs a
CUDA device; no prepared data is read.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

KINDS = (  # (kind, substrings of a kernel name), first match wins
    ("attention", ("flash", "cudnn", "fmha", "attention", "flex", "sdpa")),
    ("matmul", ("gemm", "cutlass", "sm90_xmma", "nvjet", "wgmma", "matmul", "mm_")),
    ("cross-entropy", ("log_softmax", "nll_loss", "tanh")),  # tanh: the logit softcap's kernels
    ("embedding", ("embedding", "index", "scatter", "gather")),
    ("optimizer", ("adam", "foreach", "multi_tensor")),
    ("fused elementwise", ("triton",)),  # generated kernels: norms, activations, casts
    ("copy", ("memcpy", "memset", "copy", "cat")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def load_train(path: Path):
    sys.path.insert(0, str(path.parent))
    sys.path.insert(1, str(ROOT))  # prepare.py, when the version sits elsewhere
    spec = importlib.util.spec_from_file_location("train", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train"] = module
    spec.loader.exec_module(module)
    return module


def print_compile_times(top: int) -> None:
    """The compiler's own timers after step 0, largest first. They nest (a phase's time
    includes the phases it calls), so the rows do not add up to the step's time."""
    from torch._dynamo.utils import compilation_time_metrics

    totals = sorted(((sum(v), k) for k, v in compilation_time_metrics.items()), reverse=True)
    print(f"\n| compile phase (top {top}, nested) | s |\n|---|---|")
    for seconds, name in totals[:top]:
        print(f"| {name} | {seconds:.2f} |")
    print(flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=Path, default=ROOT / "train.py")
    parser.add_argument("--warmup", type=int, default=5, help="steps before profiling")
    parser.add_argument("--steps", type=int, default=2, help="steps profiled")
    parser.add_argument("--top", type=int, default=25, help="kernels listed")
    args = parser.parse_args()
    os.environ.setdefault("AUTORESEARCH_PRESET", "gpu")

    import torch
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():
        raise SystemExit("profile_step needs a CUDA device")
    train = load_train(args.train.resolve())
    device = torch.device("cuda")
    torch.manual_seed(0)
    torch.set_float32_matmul_precision("high")
    if hasattr(train, "configure_compiler"):  # as its main() does on CUDA
        train.configure_compiler()
    backends = [
        torch.nn.attention.SDPBackend.CUDNN_ATTENTION,
        torch.nn.attention.SDPBackend.FLASH_ATTENTION,
        torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION,
    ]
    torch.nn.attention.sdpa_kernel(backends, set_priority=True).__enter__()
    raw = train.build_model(device)
    if getattr(train, "COMPILE_REGIONS", False):
        model = raw.compile_regions()
    else:
        model = torch.compile(raw, dynamic=False)
    optimizers = train.build_optimizers(raw, fused=True)
    batch, seq = train.DEVICE_BATCH_SIZE, train.MAX_SEQ_LEN
    accum = train.TOTAL_BATCH_SIZE // (batch * seq)
    x = torch.randint(0, train.VOCAB_SIZE, (batch, seq), device=device)
    y = torch.randint(0, train.VOCAB_SIZE, (batch, seq), device=device)

    def step(i: int) -> None:
        for _ in range(accum):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(x, y)
            (loss / accum).backward()
        train.set_learning_rates(optimizers, 0.1, i)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        loss.item()

    started = time.perf_counter()
    step(0)
    print(f"first step (compile): {time.perf_counter() - started:.1f}s", flush=True)
    print_compile_times(args.top)
    for i in range(1, args.warmup):
        step(i)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for i in range(args.steps):
        step(args.warmup + i)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - started) / args.steps
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(args.steps):
            step(args.warmup + args.steps + i)
        torch.cuda.synchronize()

    kernels: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        us = getattr(event, "self_device_time_total", 0.0) or getattr(event, "cuda_time_total", 0.0)
        if us > 0:
            kernels[event.key] += us / 1000 / args.steps  # ms per step
    total = sum(kernels.values())
    by_kind: dict[str, float] = defaultdict(float)
    for name, ms in kernels.items():
        by_kind[kind_of(name)] += ms
    tokens = train.TOTAL_BATCH_SIZE
    print(f"\ncard: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    print(
        f"step: {1000 * wall:.1f} ms wall, {total:.1f} ms of kernels ({tokens / wall:,.0f} tok/s)"
    )
    print("\n| kind | ms/step | share |\n|---|---|---|")
    for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {ms:.1f} | {100 * ms / total:.1f} % |")
    print(f"\n| kernel (top {args.top}) | kind | ms/step | share |\n|---|---|---|---|")
    for name, ms in sorted(kernels.items(), key=lambda kv: -kv[1])[: args.top]:
        short = name if len(name) <= 90 else name[:87] + "..."
        print(f"| {short} | {kind_of(name)} | {ms:.2f} | {100 * ms / total:.1f} % |")


if __name__ == "__main__":
    main()
