"""bench/profile_step.py's pieces that run without a GPU: how kernels are grouped by kind (on
kernel names an H200 profile of train.py printed) and the compiler's phase table."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "bench_profile_step", ROOT / "bench" / "profile_step.py"
)
profile_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(profile_step)


@pytest.mark.parametrize(
    ("kernel", "kind"),
    [
        (
            "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x128",
            "attention",
        ),
        ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", "matmul"),
        ("triton_red_fused__to_copy_add_div_exp_log_mul_sub_sum_tanh_19", "cross-entropy"),
        (
            "triton_poi_fused__to_copy_arange_div_eq_exp_mul_rsub_scalar_tensor_sub_tanh_unsq",
            "cross-entropy",
        ),
        (
            "triton_red_fused__log_softmax__to_copy__unsafe_view_div_mul_prepare_softmax",
            "cross-entropy",
        ),
        (
            "triton_per_fused__to_copy__unsafe_view_embedding_dense_backward_logsumexp_mul",
            "embedding",
        ),
        ("triton_poi_fused__to_copy__unsafe_view_pow_relu_5", "fused elementwise"),
        ("void at::native::elementwise_kernel<128, 2>", "other"),
    ],
)
def test_kernels_are_grouped_by_kind(kernel: str, kind: str) -> None:
    assert profile_step.kind_of(kernel) == kind


def test_compile_phases_are_printed_largest_first(capsys: pytest.CaptureFixture[str]) -> None:
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: (x.sin() * 2).sum(), backend="eager")
    compiled(torch.randn(8))
    profile_step.print_compile_times(top=5)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "| compile phase (top 5, nested) | s |"
    rows = [line.strip("|").split("|") for line in lines[2:]]
    assert 1 <= len(rows) <= 5
    seconds = [float(s) for _, s in rows]
    assert seconds == sorted(seconds, reverse=True)
    assert any(name.strip() == "_compile.compile_inner" for name, _ in rows)
