"""Tree attention over a paged KV cache: the Triton kernel for GPUs (PCT verification).

The tree nodes of all requests are packed along T (query_start_loc [B+1], node order within a
request). Request b has context_lens[b] tokens in its cache before the tree; its node k has its
K/V at cache position context_lens[b] + k (one KV slot per node). A node attends to every context
token and to the tree nodes that tree_mask marks (ancestors-or-self). The plain-torch reference
is `core.tree_attention.tree_attention_paged` (also the CPU implementation used inside vLLM-CPU);
`tree_attention_reference` below is that function.

Kernel: one program per (packed node, query head), flash-decoding style: it walks the request's
cache positions 0 .. context + nodes - 1 in tiles of BLOCK_L, reads each tile's block ids from
the block table, masks tree positions by the node's row of tree_mask, and keeps an online softmax
in fp32 (running max, normaliser, [D] accumulator). GQA: query head h reads KV head h // (Hq / Hkv).
Positions a node may not see are never loaded, so unwritten cache slots (NaN, other requests'
data) cannot leak in. Any strides: vLLM's GPU cache views [num_blocks, block_size, Hkv, D] work
as they are.
"""

from __future__ import annotations

import torch

from vllm_specx.core.tree_attention import packed_index
from vllm_specx.core.tree_attention import tree_attention_paged as tree_attention_reference
from vllm_specx.kernels.topk_lm_head import HAS_TRITON, triton_path_available

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _tree_attention_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, req_ptr, node_ptr, block_table_ptr, ctx_ptr, num_nodes_ptr, mask_ptr,
        scale,
        stride_qt, stride_qh, stride_qd,
        stride_kb, stride_ks, stride_kh, stride_kd,
        stride_vb, stride_vs, stride_vh, stride_vd,
        stride_ot, stride_oh, stride_od,
        stride_bt_b, stride_mask_b, stride_mask_n,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, CACHE_BLOCK: tl.constexpr,
        GROUP: tl.constexpr,
    ):
        t = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.load(req_ptr + t)
        n = tl.load(node_ptr + t)
        ctx = tl.load(ctx_ptr + b)
        kv_len = ctx + tl.load(num_nodes_ptr + b)
        kvh = h // GROUP
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q = tl.load(q_ptr + t * stride_qt + h * stride_qh + d * stride_qd, mask=d_ok, other=0.0).to(tl.float32)
        # finite start: a tile with nothing visible must not produce exp(-inf - -inf)
        m_i = tl.full((), -1.0e30, tl.float32)
        l_i = tl.zeros((), tl.float32)
        acc = tl.zeros((BLOCK_D,), tl.float32)
        for start in range(0, kv_len, BLOCK_L):
            pos = start + tl.arange(0, BLOCK_L)
            in_range = pos < kv_len
            blk = tl.load(block_table_ptr + b * stride_bt_b + pos // CACHE_BLOCK, mask=in_range, other=0).to(tl.int64)
            off = pos % CACHE_BLOCK
            tree_pos = pos - ctx
            in_tree = in_range & (tree_pos >= 0)
            anc = tl.load(mask_ptr + b * stride_mask_b + n * stride_mask_n + tree_pos, mask=in_tree, other=0)
            visible = in_range & ((pos < ctx) | (anc != 0))
            kv_ok = visible[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + blk[:, None] * stride_kb + off[:, None] * stride_ks + kvh * stride_kh
                        + d[None, :] * stride_kd, mask=kv_ok, other=0.0).to(tl.float32)  # [BLOCK_L, BLOCK_D]
            s = tl.where(visible, tl.sum(k * q[None, :], axis=1) * scale, float("-inf"))  # [BLOCK_L]
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new)
            v = tl.load(v_ptr + blk[:, None] * stride_vb + off[:, None] * stride_vs + kvh * stride_vh
                        + d[None, :] * stride_vd, mask=kv_ok, other=0.0).to(tl.float32)
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            m_i = m_new
        out = acc / l_i
        tl.store(out_ptr + t * stride_ot + h * stride_oh + d * stride_od, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def tree_attention_triton(
    query: torch.Tensor,            # [T, Hq, D] tree nodes of all requests, packed
    query_start_loc: torch.Tensor,  # [B+1] int
    key_cache: torch.Tensor,        # [num_blocks, block_size, Hkv, D] (any strides)
    value_cache: torch.Tensor,      # [num_blocks, block_size, Hkv, D]
    block_table: torch.Tensor,      # [B, max_blocks] int
    context_lens: torch.Tensor,     # [B] tokens in the cache before the tree
    tree_mask: torch.Tensor,        # [B, N, N] bool ancestor-or-self mask
    scale: float,
    block_l: int = 32,
) -> torch.Tensor:                  # [T, Hq, D]
    """Same contract as `tree_attention_reference`; every request must have >= 1 visible position
    per node (a node sees itself)."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed: use tree_attention_reference")
    T, Hq, D = query.shape
    block_size, Hkv = key_cache.shape[1], key_cache.shape[2]
    if Hq % Hkv:
        raise ValueError(f"Hq ({Hq}) must be a multiple of Hkv ({Hkv})")
    out = torch.empty_like(query)
    if T == 0:
        return out
    qsl = query_start_loc.long()
    num_nodes = qsl[1:] - qsl[:-1]  # [B]
    req, node = packed_index(qsl, num_tokens=T)  # [T] each
    mask = tree_mask.to(torch.uint8)
    table = block_table.to(torch.int32)
    _tree_attention_kernel[(T, Hq)](
        query, key_cache, value_cache, out, req, node, table, context_lens.to(torch.int64), num_nodes, mask,
        float(scale),
        *query.stride(), *key_cache.stride(), *value_cache.stride(), *out.stride(),
        table.stride(0), mask.stride(0), mask.stride(1),
        HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_L=block_l, CACHE_BLOCK=block_size,
        GROUP=Hq // Hkv,
    )
    return out


def tree_attention(query, query_start_loc, key_cache, value_cache, block_table, context_lens, tree_mask,
                   scale: float) -> torch.Tensor:
    """The Triton kernel where it runs for the tensors' device (CUDA, or the interpreter), else the
    torch reference."""
    if triton_path_available(query.device):
        return tree_attention_triton(query, query_start_loc, key_cache, value_cache, block_table, context_lens,
                                     tree_mask, scale)
    return tree_attention_reference(query, query_start_loc, key_cache, value_cache, block_table, context_lens,
                                    tree_mask, scale)
