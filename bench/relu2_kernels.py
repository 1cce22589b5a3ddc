"""The fused relu² matmul kernels of bench/variants/fused-mlp.patch against what they replace.

    git show 7b30949:train.py > fused.py && patch fused.py bench/variants/fused-mlp.patch
    python bench/relu2_kernels.py fused.py

(The patch is against train.py as of commit 7b30949.)

Loads a train.py that defines `relu2_matmul` (the patch's custom op) and, at one MLP's shapes
of the gpu preset (tokens 128 × 2048, width 512, hidden 2048, bf16), checks both kernels
against an fp32 reference, then times each against the cuBLAS matmul plus the compiled
elementwise pass it replaces and prints a table with the autotuner's choices. Needs a CUDA
device and Triton.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from profile_step import load_train  # this directory is on sys.path when run as a script


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("train", type=Path, help="a train.py with the fused-mlp patch applied")
    parser.add_argument("--tokens", type=int, default=128 * 2048)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    os.environ.setdefault("AUTORESEARCH_PRESET", "gpu")

    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        raise SystemExit("relu2_kernels needs a CUDA device")
    train = load_train(args.train.resolve())
    if not hasattr(train, "relu2_matmul") or train.triton is None:
        raise SystemExit(f"{args.train} defines no Triton relu2_matmul (apply the patch first)")

    torch.manual_seed(0)
    M, d, bf = args.tokens, args.width, torch.bfloat16
    x = torch.randn(M, d, device="cuda", dtype=bf)
    w_fc = (torch.randn(4 * d, d, device="cuda") / d**0.5).to(bf)
    w_proj = (torch.randn(d, 4 * d, device="cuda") / (4 * d) ** 0.5).to(bf)
    grad = torch.randn(M, d, device="cuda", dtype=bf)

    h32 = x.float() @ w_fc.float().t()
    r = train.relu2_matmul(x, w_fc.t(), None)
    want = F.relu(h32).square()
    fwd_err = ((r.float() - want).abs().max() / want.abs().max()).item()
    grad_h = train.relu2_matmul(grad, w_proj, r)
    want = (grad.float() @ w_proj.float()) * 2 * F.relu(h32)
    bwd_err = ((grad_h.float() - want).abs().max() / want.abs().max()).item()

    def timed(fn) -> float:
        fn()
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / args.reps

    relu2 = torch.compile(lambda h: F.relu(h).square())
    drelu2 = torch.compile(lambda g, h: g * 2 * F.relu(h))
    h = x @ w_fc.t()
    g_r = grad @ w_proj
    rows = [
        ("cuBLAS x @ w_fc^T", timed(lambda: x @ w_fc.t())),
        ("compiled relu²(h)", timed(lambda: relu2(h))),
        ("fused forward: relu(x @ w_fc^T)²", timed(lambda: train.relu2_matmul(x, w_fc.t(), None))),
        ("cuBLAS grad @ w_proj", timed(lambda: grad @ w_proj)),
        ("compiled grad_r * 2 relu(h)", timed(lambda: drelu2(g_r, h))),
        (
            "fused backward: (grad @ w_proj) * 2 sqrt(r)",
            timed(lambda: train.relu2_matmul(grad, w_proj, r)),
        ),
    ]
    flops = 2 * M * d * 4 * d
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {train.triton.__version__}"
    )
    print(
        f"tokens {M:,}, width {d}, hidden {4 * d}; largest error against fp32, as a share of "
        f"the largest value: forward {fwd_err:.2%}, backward {bwd_err:.2%}\n"
    )
    print("| kernel | ms | TFLOP/s of the matmul |\n|---|---|---|")
    for name, ms in rows:
        rate = "—" if name.startswith("compiled") else f"{flops / ms / 1e9:.0f}"
        print(f"| {name} | {ms:.3f} | {rate} |")
    print(
        f"\nsaved per layer: forward {rows[0][1] + rows[1][1] - rows[2][1]:+.3f} ms, "
        f"backward {rows[3][1] + rows[4][1] - rows[5][1]:+.3f} ms"
    )
    for key, config in train._relu2_matmul_kernel.cache.items():
        print(f"autotuned {key[:4]}: {config}")


if __name__ == "__main__":
    main()
