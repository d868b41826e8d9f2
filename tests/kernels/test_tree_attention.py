"""tree_attention: Triton kernel vs its torch reference (core.tree_attention.tree_attention_paged) on
random trees over shuffled paged blocks, and vs plain causal attention along every root-to-leaf branch.

Without a GPU the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so
the default cases are small; realistic GPU sizes are `-m gpu`."""

from __future__ import annotations

import math

import pytest
import torch

from tests.core.test_tree_attention import check_against_branches, make_case
from vllm_specx.kernels import tree_attention as ta

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

requires_triton_path = pytest.mark.skipif(
    not ta.triton_path_available(DEVICE),
    reason="triton not installed, or TRITON_INTERPRET=1 was not set before the kernel module was imported",
)


def _run(case, scale, fn, device=DEVICE):
    to = lambda x: x.to(device)  # noqa: E731
    return fn(to(case["query"]), to(case["qsl"]), to(case["key_cache"]), to(case["value_cache"]),
              to(case["block_table"]), to(case["ctx"]), to(case["buf"].ancestor_mask), scale).cpu()


CASES = [  # (ctx_lens, n_nodes, N, Hq, Hkv, D, block_size, dtype)
    ([5, 0, 23], [4, 7, 1], 8, 4, 2, 32, 4, torch.float32),     # empty context, single-node tree, GQA 2
    ([37, 2], [9, 3], 9, 3, 1, 40, 16, torch.float32),          # odd head dim (BLOCK_D 64 masks 24), MQA
    ([17, 64, 1, 8], [6, 2, 8, 5], 8, 4, 4, 64, 8, torch.float16),
    ([30, 3], [8, 8], 8, 2, 1, 24, 16, torch.bfloat16),
]


@requires_triton_path
@pytest.mark.parametrize("block_l", [8, 32])  # cache positions per kernel tile: many tiles per row, or few
@pytest.mark.parametrize("ctx_lens, n_nodes, N, Hq, Hkv, D, block_size, dtype", CASES)
def test_kernel_matches_reference_and_branches(ctx_lens, n_nodes, N, Hq, Hkv, D, block_size, dtype, block_l):
    case = make_case(sum(ctx_lens) + D, ctx_lens, n_nodes, N, Hq, Hkv, D, block_size, dtype)
    scale = 1 / math.sqrt(D)
    out = _run(case, scale, lambda *a: ta.tree_attention_triton(*a, block_l=block_l))
    ref = _run(case, scale, ta.tree_attention_reference, device="cpu")
    assert torch.isfinite(out.float()).all()  # unwritten (NaN) cache slots are never read
    tol = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    check_against_branches(case, out, scale, atol=tol * 10)


@requires_triton_path
def test_a_wrong_mask_is_detected():
    """The comparison can fail: the kernel with every tree position visible differs from the reference."""
    case = make_case(7, [6, 4], [7, 5], 8, 2, 1, 32, 4)
    scale = 1 / math.sqrt(32)
    ref = _run(case, scale, ta.tree_attention_reference, device="cpu")
    case["buf"].ancestor_mask[:] = True
    wrong = _run(case, scale, ta.tree_attention_triton)
    assert not torch.allclose(wrong, ref, atol=1e-3)


def test_dispatch_falls_back_to_the_reference_without_a_triton_path(monkeypatch):
    case = make_case(3, [4], [3], 4, 2, 2, 16, 4)
    monkeypatch.setattr(ta, "triton_path_available", lambda device: False)
    out = _run(case, 0.25, ta.tree_attention, device="cpu")
    torch.testing.assert_close(out, _run(case, 0.25, ta.tree_attention_reference, device="cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_on_gpu_realistic_sizes(dtype):
    """Llama-8B-like heads (32 query / 8 KV heads, D 128), vLLM's block size 16, 32 requests with
    contexts up to 2k and trees up to 16 nodes."""
    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(1, 2048, (32,), generator=g).tolist()
    nodes = torch.randint(1, 17, (32,), generator=g).tolist()
    case = make_case(1, ctx, nodes, 16, 32, 8, 128, 16, dtype)
    scale = 1 / math.sqrt(128)
    out = _run(case, scale, ta.tree_attention_triton, device="cuda")
    ref = _run(case, scale, ta.tree_attention_reference, device="cpu")
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
