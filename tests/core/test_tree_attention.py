import math

import pytest
import torch

from vllm_specx.core.tree import build_tree_buffers
from vllm_specx.core.tree_attention import tree_attention_paged, tree_kv_slot_mapping


def random_parents(n_nodes, N, g):
    """[N] topological parents for a random tree of n_nodes nodes, padded with -1."""
    par = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, n_nodes)]
    return torch.tensor(par + [-1] * (N - n_nodes))


def make_case(seed, ctx_lens, n_nodes, N, Hq, Hkv, D, block_size, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    B = len(ctx_lens)
    ctx = torch.tensor(ctx_lens)
    nq = torch.tensor(n_nodes)
    parents = torch.stack([random_parents(n, N, g) for n in n_nodes])
    valid = torch.arange(N)[None, :] < nq[:, None]
    buf = build_tree_buffers(parents, valid, ctx)
    # shuffled paged blocks; unused table entries are -1, unwritten cache slots are NaN
    need = [math.ceil((c + n) / block_size) for c, n in zip(ctx_lens, n_nodes)]
    max_blocks = max(need) + 1
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks, generator=g)
    block_table = torch.full((B, max_blocks), -1, dtype=torch.int32)
    used = 0
    for b in range(B):
        block_table[b, : need[b]] = perm[used: used + need[b]].int()
        used += need[b]
    key_cache = torch.full((num_blocks, block_size, Hkv, D), float("nan"), dtype=dtype)
    value_cache = key_cache.clone()
    # context K/V per request, written position by position
    ctx_k = [torch.randn(c, Hkv, D, generator=g, dtype=dtype) for c in ctx_lens]
    ctx_v = [torch.randn(c, Hkv, D, generator=g, dtype=dtype) for c in ctx_lens]
    for b in range(B):
        for p in range(ctx_lens[b]):
            blk = int(block_table[b, p // block_size])
            key_cache[blk, p % block_size] = ctx_k[b][p]
            value_cache[blk, p % block_size] = ctx_v[b][p]
    # tree nodes: packed queries and K/V written through the slot mapping
    qsl = torch.cat([torch.zeros(1, dtype=torch.long), nq.cumsum(0)])
    T = int(qsl[-1])
    query = torch.randn(T, Hq, D, generator=g, dtype=dtype)
    tree_k = torch.randn(T, Hkv, D, generator=g, dtype=dtype)
    tree_v = torch.randn(T, Hkv, D, generator=g, dtype=dtype)
    slots = tree_kv_slot_mapping(block_table, ctx, qsl, block_size)
    key_cache.view(-1, Hkv, D)[slots] = tree_k
    value_cache.view(-1, Hkv, D)[slots] = tree_v
    return dict(query=query, qsl=qsl, key_cache=key_cache, value_cache=value_cache,
                block_table=block_table, ctx=ctx, buf=buf, ctx_k=ctx_k, ctx_v=ctx_v,
                tree_k=tree_k, tree_v=tree_v)


def causal_attention(q, k, v, offset, scale):
    """q [n, Hq, D] are the last n of the L keys; plain causal attention with repeated KV heads."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, dim=1).double(), v.repeat_interleave(G, dim=1).double()
    s = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    allowed = torch.arange(k.shape[0])[None, :] <= offset + torch.arange(q.shape[0])[:, None]
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.einsum("hqk,khd->qhd", p, v)


def check_against_branches(case, out, scale, atol):
    buf, qsl = case["buf"], case["qsl"]
    seen = set()
    for b in range(len(case["ctx_k"])):
        t0 = int(qsl[b])
        for path in buf.retrieve_paths[b].tolist():
            path = [i for i in path if i >= 0]
            if not path:
                continue
            idx = torch.tensor(path) + t0
            k = torch.cat([case["ctx_k"][b], case["tree_k"][idx]])
            v = torch.cat([case["ctx_v"][b], case["tree_v"][idx]])
            ref = causal_attention(case["query"][idx], k, v, len(case["ctx_k"][b]), scale)
            err = float((out[idx].double() - ref).abs().max())
            assert err <= atol * (1 + float(ref.abs().max())), (b, path, err)
            seen.update(idx.tolist())
    assert seen == set(range(out.shape[0]))  # every node lies on some branch


@pytest.mark.parametrize("seed,ctx_lens,n_nodes,N,Hq,Hkv,D,block_size", [
    (0, [0, 5, 13, 30], [1, 7, 9, 4], 11, 6, 2, 5, 3),
    (1, [17, 1], [12, 3], 12, 4, 4, 8, 4),
    (2, [2, 40, 9, 0, 33], [5, 5, 1, 8, 10], 10, 8, 1, 7, 16),
])
def test_tree_attention_equals_per_branch_chain_attention(seed, ctx_lens, n_nodes, N, Hq, Hkv, D, block_size):
    case = make_case(seed, ctx_lens, n_nodes, N, Hq, Hkv, D, block_size)
    scale = D ** -0.5
    out = tree_attention_paged(case["query"], case["qsl"], case["key_cache"], case["value_cache"],
                               case["block_table"], case["ctx"], case["buf"].ancestor_mask, scale,
                               requests_per_chunk=2)
    assert out.shape == case["query"].shape and not out.isnan().any()
    check_against_branches(case, out, scale, atol=2e-5)


def test_bf16_inputs_accumulate_in_float32():
    case = make_case(3, [7, 20], [6, 9], 9, 4, 2, 8, 4, dtype=torch.bfloat16)
    out = tree_attention_paged(case["query"], case["qsl"], case["key_cache"], case["value_cache"],
                               case["block_table"], case["ctx"], case["buf"].ancestor_mask, 0.3)
    assert out.dtype == torch.bfloat16
    check_against_branches(case, out, 0.3, atol=2e-2)


def test_slot_mapping_follows_node_order():
    block_table = torch.tensor([[5, 2, 7], [1, 0, 3]])
    slots = tree_kv_slot_mapping(block_table, torch.tensor([3, 0]), torch.tensor([0, 3, 5]), 4)
    # request 0: positions 3, 4, 5 -> block 5 off 3, block 2 off 0/1; request 1: positions 0, 1
    assert slots.tolist() == [23, 8, 9, 4, 5]


@pytest.mark.parametrize("rows_per_chunk", [2, 16])
def test_branch_attention_equals_attention_over_context_prefix_plus_own_key(rows_per_chunk):
    """Each branch row attends to a prefix of its request's (shuffled, paged) context and to its own
    key, which is not in the cache: the same as dense attention over [prefix ; own key]."""
    from vllm_specx.core.tree_attention import branch_attention_paged

    case = make_case(4, [9, 30, 0, 17], [1, 1, 1, 1], 1, 6, 2, 8, 4)
    g = torch.Generator().manual_seed(5)
    req = torch.tensor([1, 0, 1, 3, 1, 2, 3])             # several rows per request, in any order
    ctx = torch.tensor([30, 4, 12, 17, 0, 0, 1])           # prefix lengths, up to the whole context
    R, Hq, Hkv, D = len(req), 6, 2, 8
    q, k, v = (torch.randn(R, h, D, generator=g) for h in (Hq, Hkv, Hkv))
    out = branch_attention_paged(q, k, v, case["key_cache"], case["value_cache"], case["block_table"][req], ctx,
                                 0.4, rows_per_chunk=rows_per_chunk)
    assert out.shape == q.shape and not out.isnan().any()
    for r in range(R):
        b, n = int(req[r]), int(ctx[r])
        keys = torch.cat([case["ctx_k"][b][:n], k[r:r + 1]])
        vals = torch.cat([case["ctx_v"][b][:n], v[r:r + 1]])
        ref = causal_attention(q[r:r + 1], keys, vals, n, 0.4)
        assert torch.allclose(out[r].double(), ref[0], atol=1e-5), r
